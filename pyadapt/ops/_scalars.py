"""Normalisation of the scalar arguments every op shares: the adapter scale and the dropout seed."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as check
from .. import reference

Tensor = torch.Tensor


def split_scale(scale, x: Tensor) -> tuple[Optional[Tensor], float]:
    """A scale argument as the ops take it: (0-dim tensor, 1.0) for a learnable (tensor) scale,
    (None, value) for a fixed float, which stays exact (a float32 buffer would round 0.001)."""
    if isinstance(scale, torch.Tensor):
        check.tensor("scale", scale)
        if scale.numel() != 1:
            raise ValueError(f"scale: expected a single value, got shape {tuple(scale.shape)}")
        check.same_device("scale", scale, "x", x)
        return scale.reshape(()), 1.0
    return None, check.finite("scale", scale)


def seed_tensor(seed: Optional[Tensor], dropout_p: float, x: Tensor) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(0, reference.SEED_LIMIT, (), dtype=torch.int64, device=x.device)
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed: expected a single-element int64 tensor in [0, 2**31)")
    # Only a user-given seed reaches this check (one host read); drawn seeds are in range.
    if not torch.compiler.is_compiling():
        value = int(seed.reshape(()))
        if not 0 <= value <= reference.SEED_LIMIT:
            raise ValueError(f"seed: expected a value in [0, 2**31), got {value}")
    return seed.reshape(()).to(x.device)


def effective_scale(scale: Optional[Tensor], scale_value: float, x: Tensor) -> Tensor | float:
    """The scale a backend multiplies by: the tensor (in x's dtype) if learnable, else the float."""
    return scale_value if scale is None else scale.to(x.dtype)
