"""Checks shared by every public entry point. Messages name the argument and what was expected,
and every check runs before any kernel, so a bad call changes nothing."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> Tensor:
    """t must be a floating-point tensor (optionally with the given number of dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape "
                         f"{tuple(t.shape)}")
    return t


def last_dim(name: str, t: Tensor, size: int, meaning: str) -> None:
    if t.shape[-1] != size:
        raise ValueError(f"{name}: expected last dimension {size} ({meaning}), got {t.shape[-1]}")


def shape(name: str, t: Tensor, expected: Sequence[int], meaning: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{why}, got {tuple(t.shape)}")


def same_dtype_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), "
                         f"got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), "
                        f"got {t.dtype}")


def same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), "
                         f"got {t.device}")


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int >= 1, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def finite(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a finite float, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite float, got {v}")
    return float(v)


def probability(name: str, p) -> float:
    """A drop probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(p).__name__}")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name}: expected a float in [0, 1), got {p}")
    return float(p)


def choice(name: str, v, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {v!r}")
    return v


def no_grad_required(name: str, t: Tensor, why: str) -> None:
    if t.requires_grad:
        raise ValueError(f"{name}: gradients with respect to {name} are not supported ({why}); "
                         f"pass {name}.detach()")
