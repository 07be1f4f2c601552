"""pyadapt: fused kernels for parameter-efficient adapters behind a plain PyTorch autograd API.

    import pyadapt
    adapter = pyadapt.FusedAdapter(768, 32)            # y = x + scale * up(act(down(x)))
    lin = pyadapt.RAdapter(nn.Linear(768, 768))        # frozen linear + R-Adapter, foldable
    pyadapt.fold_(model); pyadapt.unfold_(model)       # zero-cost inference, exact undo

The mathematics is in pyadapt.reference; every op is a torch.library custom op (pyadapt.ops)
dispatched to a backend (pyadapt.set_backend / use_backend / PYADAPT_BACKEND).
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference
from .adapters import FusedAdapter, MultiModalAdapter
from .bank import AdapterBank, CPAdapterBank, LowRankAdapterBank, RAdapterBank
from .checkpoint import load_adapters, save_adapters
from .fold import AdapterEMA, adapter_state_dict, fold_, load_adapter_state_dict, unfold_
from .inject import inject
from .linear import (CPAdapter, CPLinear, ContextEnhancement, GatedQueryTransform, LowRankAdapter,
                     RAdapter)
from .losses import MPMNCELoss
from .ops import available_backends, current_backend, set_backend, use_backend


def build_info() -> dict:
    """What this install can run: backends, native extension, versions, and whether `auto`
    has measurements for the current CUDA device (`auto_choice`; ops.auto_choice() per op)."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "pyadapt": __version__,
        "backends": available_backends(),
        "ops": ops.kernel_table(),
        "native_extension": ops._native.available,
        "native_extension_error": ops._native.error,
        "cuda_extension": ops._native_cuda.available,
        "cuda_extension_error": ops._native_cuda.error,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "auto_choice": ops._registry.measured_device(),
    }


__all__ = ["AdapterBank", "AdapterEMA", "CPAdapterBank", "LowRankAdapterBank", "RAdapterBank", "CPAdapter", "CPLinear", "ContextEnhancement", "FusedAdapter",
           "GatedQueryTransform", "LowRankAdapter", "MPMNCELoss", "MultiModalAdapter",
           "RAdapter", "adapter_state_dict", "available_backends", "build_info",
           "current_backend", "fold_", "inject", "load_adapter_state_dict", "load_adapters", "ops",
           "reference", "save_adapters", "set_backend", "unfold_", "use_backend"]
