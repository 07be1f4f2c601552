"""The grouped fold op: W'_i = W_i + s_i * L_i @ R_i for many weights of different shapes.

Declared as `pyadapt::fold_weights`, out of place (the caller copies the results in only after
every fold succeeded). Accumulates in float32 (float64 for float64 weights) and rounds once to
each weight's dtype. No autograd: folding is an inference-time transformation.
"""

from __future__ import annotations

from typing import List

import torch

from .. import _validate as check
from .. import reference
from ._registry import kernel_for, register, register_from

Tensor = torch.Tensor


@torch.library.custom_op("pyadapt::fold_weights", mutates_args=())
def fold_weights(weights: List[Tensor], lefts: List[Tensor], rights: List[Tensor],
                 scales: Tensor) -> List[Tensor]:
    device = weights[0].device if weights else "cpu"
    return kernel_for("fold_weights", device)(weights, lefts, rights, scales)


@fold_weights.register_fake
def _(weights, lefts, rights, scales):
    return [torch.empty_like(w) for w in weights]


def _reference_fold(weights, lefts, rights, scales):
    return [reference.fold_weight(w, left, right, scales[i])
            for i, (w, left, right) in enumerate(zip(weights, lefts, rights))]


register("fold_weights", "reference", _reference_fold)


def fold(weights: List[Tensor], lefts: List[Tensor], rights: List[Tensor],
         scales: List[float] | Tensor) -> List[Tensor]:
    """Checked entry point: returns new tensors W_i + s_i L_i R_i (inputs untouched)."""
    if isinstance(scales, torch.Tensor):
        check.tensor("scales", scales, ndim=1)
        bad = (~torch.isfinite(scales)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"scales[{i}]: expected a finite float, got {float(scales[i])}")
    n = len(weights)
    if len(lefts) != n or len(rights) != n or len(scales) != n:
        raise ValueError(f"fold: expected equal numbers of weights, lefts, rights and scales, got "
                         f"{n}, {len(lefts)}, {len(rights)}, {len(scales)}")
    for i, (w, left, right) in enumerate(zip(weights, lefts, rights)):
        check.tensor(f"weights[{i}]", w, ndim=2)
        check.tensor(f"lefts[{i}]", left, ndim=2)
        check.tensor(f"rights[{i}]", right, ndim=2)
        k = left.shape[1]
        check.shape(f"lefts[{i}]", left, (w.shape[0], k), "rows of the weight x inner size")
        check.shape(f"rights[{i}]", right, (k, w.shape[1]), "inner size x columns of the weight")
        check.same_device(f"lefts[{i}]", left, f"weights[{i}]", w)
        check.same_device(f"rights[{i}]", right, f"weights[{i}]", w)
    if n == 0:
        return []
    if not isinstance(scales, torch.Tensor):
        scales = torch.tensor([check.finite(f"scales[{i}]", s) for i, s in enumerate(scales)],
                              dtype=torch.float64)
    scales = scales.to(device=weights[0].device, dtype=torch.float64)
    return fold_weights(list(weights), list(lefts), list(rights), scales)


# triton backend (kernels/fold.py), when triton imports
register_from("triton", "pyadapt.kernels.fold", {"fold_weights": "fold"})


# ---------------------------------------------------------------------------------------------
# cpu backend (csrc/cpu/fold.cpp), when the native extension was built: every fold of the call
# in one parallel region, float32 accumulation (float64 for float64 weights). Weights of other
# dtypes or devices run the reference.

from . import _native  # noqa: E402

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_covers(weights) -> bool:
    return all(w.device.type == "cpu" and w.dtype in _CPU_DTYPES for w in weights)


def _cpu_fold(weights, lefts, rights, scales):
    if not weights or not _cpu_covers(weights):
        return _reference_fold(weights, lefts, rights, scales)
    return list(_native.ops().fold_weights(weights, lefts, rights, scales))


if _native.available:
    register("fold_weights", "cpu", _cpu_fold)
