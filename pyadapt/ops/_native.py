"""The native extension pyadapt._C (csrc/), when it was built.

Importing pyadapt._C runs its TORCH_LIBRARY registrations: the kernels are then reachable as
`torch.ops.pyadapt_C.<name>`. `available` says whether that worked; `error` keeps the reason it
did not (no compiler at install time, a torch upgraded since the build, ...). Op modules register
their `cpu` backend only when `available`.
"""

from __future__ import annotations

from typing import Optional

import torch

error: Optional[str] = None
try:
    from .. import _C  # noqa: F401  (registers torch.ops.pyadapt_C.*)

    available = hasattr(torch.ops.pyadapt_C, "bottleneck_forward")
    if not available:
        error = "pyadapt._C imported but registered no ops"
except (ImportError, OSError) as exc:  # not built, or built against another torch
    available = False
    error = f"{type(exc).__name__}: {exc}"

# storage dtypes the C++ CPU bottleneck kernels take (bfloat16/float16 computed in float32 and
# rounded once on output); others fall back to the reference.
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def ops():
    return torch.ops.pyadapt_C
