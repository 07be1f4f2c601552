"""The CUDA kernels pyadapt._C_cuda (csrc/cuda/), when they were built.

A separate module from the CPU extension pyadapt._C, so that a failed or skipped CUDA build never
costs the CPU kernels. Importing it runs its TORCH_LIBRARY registrations (torch.ops.pyadapt_cuda.*)
and needs no GPU: on a machine without one (CI after a compile-only build) it imports, registers
its ops, and they are simply never called. `available` says whether that worked; `error` keeps
the reason it did not (not built: PYADAPT_CUDA=OFF, no nvcc, a CPU-only torch; or built against
another torch).
"""

from __future__ import annotations

from typing import Optional

import torch

OPS = ("bottleneck_forward", "bottleneck_backward", "lowrank_forward", "lowrank_backward",
       "radapter_forward", "radapter_backward", "fold_weights")

error: Optional[str] = None
try:
    from .. import _C_cuda  # noqa: F401  (registers torch.ops.pyadapt_cuda.*)

    missing = [name for name in OPS if not hasattr(torch.ops.pyadapt_cuda, name)]
    available = not missing
    if missing:
        error = f"pyadapt._C_cuda imported but does not register {missing}"
except (ImportError, OSError) as exc:  # not built, or built against another torch / CUDA
    available = False
    error = f"{type(exc).__name__}: {exc}"

# dtypes the CUDA kernels compute in (float32 accumulation; float64 in float64).
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def ops():
    return torch.ops.pyadapt_cuda
