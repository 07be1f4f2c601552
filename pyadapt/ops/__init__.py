"""Every fused computation of pyadapt, declared once as a torch.library custom op.

One module per op: `bottleneck` (bottleneck adapter and MMA), `radapter` (frozen linear +
R-Adapter), `lowrank` (frozen linear + LoRA / CP / Tucker-core adapter), `fold` (grouped
weight folding) and `mpm_nce` (the loss). Each registers its backends with `_registry`; the
checked entry points below are what the modules call.
"""

from ._registry import (auto_choice, available_backends, backend_for, current_backend,
                        kernel_table, set_backend, use_backend)
from .bank import bank_bottleneck, mma_pair
from .bank_linear import bank_linear
from .bottleneck import bottleneck
from .fold import fold
from .lowrank import lowrank_linear
from .mpm_nce import mpm_nce
from .radapter import radapter

CUSTOM_OPS = ("bottleneck_forward", "bottleneck_forward_saving", "bottleneck_backward",
              "radapter_forward", "radapter_forward_saving", "radapter_backward",
              "lowrank_forward", "lowrank_backward", "fold_weights", "mpm_nce_forward",
              "mpm_nce_backward", "bank_bottleneck_forward", "bank_bottleneck_backward",
              "mma_pair_forward", "mma_pair_backward", "bank_linear_forward",
              "bank_linear_backward")

__all__ = ["CUSTOM_OPS", "auto_choice", "available_backends", "backend_for", "bank_bottleneck",
           "bank_linear", "bottleneck", "current_backend", "fold", "kernel_table",
           "lowrank_linear", "mma_pair", "mpm_nce", "radapter", "set_backend", "use_backend"]

from . import _cuda_backend  # noqa: E402,F401  (the `cuda` backend, when pyadapt._C_cuda loaded)
