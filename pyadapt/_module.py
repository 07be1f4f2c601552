"""What every pyadapt adapter module shares: the adapter-state protocol used by folding, EMA and
checkpoints, and the input handling of forward (leading dims, autocast, dtype checks)."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from . import _validate as check

Tensor = torch.Tensor


class AdapterModule(nn.Module):
    """Base of every adapter module.

    `adapter_tensors()` names the tensors that make up the trained adapter (its trainable
    parameters and the scale), which is what EMA averages and checkpoints save; frozen base
    weights are never part of it. Modules that can be folded into a frozen linear also implement
    `fold_terms` (see pyadapt.fold)."""

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) of the trained adapter; by default every trainable parameter."""
        for name, p in self.named_parameters():
            if p.requires_grad:
                yield name, p

    # Set by pyadapt.AdapterEMA: {tensor name: EMA shadow}, and whether eval uses it.
    _ema_shadow: Optional[dict] = None
    _ema_in_eval: bool = False

    def _current(self, name: str, tensor: Tensor) -> Tensor:
        """The tensor the forward should use: its EMA shadow in eval when EMA evaluation is on."""
        if not self.training and self._ema_in_eval and self._ema_shadow is not None:
            return self._ema_shadow.get(name, tensor)
        return tensor


def compute_dtype(x: Tensor, param: Tensor, param_name: str) -> torch.dtype:
    """dtype the adapter computes in: the autocast dtype when autocast is on for x's device
    (weights are cast, as nn.Linear is under autocast), else x's dtype, which must then equal the
    adapter's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if x.dtype != param.dtype:
        raise TypeError(f"x: expected dtype {param.dtype} (the dtype of {param_name}), got "
                        f"{x.dtype}; convert the input or the module, or use torch.autocast")
    return x.dtype


def rows(name: str, x: Tensor, features: int, meaning: str) -> Tensor:
    """Check x (..., features) and view it as a row matrix (M, features); a copy happens only when
    the strides make a view impossible."""
    check.tensor(name, x, min_ndim=1)
    check.last_dim(name, x, features, meaning)
    return x.reshape(-1, features)


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)
