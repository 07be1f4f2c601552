"""Every fused computation of pyadapt, declared once as a torch.library custom op.

One module per op: `bottleneck` (bottleneck adapter and MMA), `radapter` (frozen linear +
R-Adapter), `lowrank` (frozen linear + LoRA / CP / Tucker-core adapter), `fold` (grouped
weight folding) and `mpm_nce` (the loss). Each registers its backends with `_registry`; the
checked entry points below are what the modules call.
"""

from ._registry import (available_backends, backend_for, current_backend, kernel_table,
                        set_backend, use_backend)
from .bottleneck import bottleneck
from .fold import fold
from .lowrank import lowrank_linear
from .mpm_nce import mpm_nce
from .radapter import radapter

CUSTOM_OPS = ("bottleneck_forward", "bottleneck_backward", "radapter_forward",
              "radapter_backward", "lowrank_forward", "lowrank_backward", "fold_weights",
              "mpm_nce_forward", "mpm_nce_backward")

__all__ = ["available_backends", "backend_for", "bottleneck", "current_backend", "fold",
           "kernel_table", "lowrank_linear", "mpm_nce", "radapter", "set_backend", "use_backend",
           "CUSTOM_OPS"]
