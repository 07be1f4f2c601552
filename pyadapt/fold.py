"""Model-level folding, unfolding and the temporal ensemble (EMA) of adapter weights.

fold_ rewrites every foldable adapter's base weight in place so inference costs nothing extra;
unfold_ puts the saved originals back bit for bit. Both validate everything before touching
any weight, so a call either completes or changes nothing."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from . import _validate as check
from . import ops
from ._module import AdapterModule
from .linear import _FoldableLinear

Tensor = torch.Tensor


def _foldables(model: nn.Module) -> list[tuple[str, _FoldableLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _FoldableLinear)]


def fold_(model: nn.Module, alpha: float = 1.0, use_ema: bool = False) -> list[str]:
    """Fold every RAdapter, LowRankAdapter and CPAdapter site of `model` into its base linear.

    The folded model computes what the unfolded one computes in eval mode, with every adapter
    delta multiplied by `alpha` (R-Adapter: W_rep = (I + s' W_f) W_o, b_rep = (I + s' W_f) b_o,
    s' = s * eval_scale * alpha; LoRA: W + alpha * (lora_alpha / r) B A; CP/Tucker:
    W + alpha * V M_k^T U). use_ema folds the AdapterEMA shadows instead of the live weights.
    Accumulates in float32 (float64 for float64 weights) and rounds once per weight; all
    weights of a device go through one grouped fold call. Returns the folded modules' names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    alpha = check.finite("alpha", alpha)
    found = _foldables(model)
    for name, m in found:
        if m.merged:
            raise ValueError(f"model: {name or type(m).__name__} is already folded; call "
                             f"pyadapt.unfold_(model) first")
        if use_ema and m._ema_shadow is None:
            raise ValueError(f"use_ema: {name or type(m).__name__} has no EMA; create "
                             f"pyadapt.AdapterEMA(model) before folding with use_ema=True")
    with torch.no_grad():
        terms = [(m, t) for _, m in found for t in m.fold_terms(alpha, use_ema)]
        results: dict[int, Tensor] = {}
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, t) in enumerate(terms):
            by_device.setdefault(t.matrix.device, []).append(i)
        for idx in by_device.values():
            folded = ops.fold([terms[i][1].matrix for i in idx], [terms[i][1].left for i in idx],
                              [terms[i][1].right for i in idx], [terms[i][1].scale for i in idx])
            results.update(zip(idx, folded))
        # Everything is computed: only now save the originals and overwrite.
        for _, m in found:
            m._saved_base = [p.detach().clone() for p in (m.base.weight, m.base.bias)
                             if p is not None]
        for i, (_, t) in enumerate(terms):
            t.target.copy_(results[i].view_as(t.target))
        for _, m in found:
            m.merged = True
    return [name for name, _ in found]


def unfold_(model: nn.Module) -> list[str]:
    """Restore the base weights saved by fold_ (bit for bit; never by inverting the fold).
    Returns the unfolded modules' names; modules that are not folded are left alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    done = []
    with torch.no_grad():
        for name, m in _foldables(model):
            if not m.merged:
                continue
            params = [p for p in (m.base.weight, m.base.bias) if p is not None]
            for p, saved in zip(params, m._saved_base):
                p.copy_(saved)
            m._saved_base = None
            m.merged = False
            done.append(name)
    return done


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    for name, m in model.named_modules():
        if isinstance(m, AdapterModule):
            yield name, m


class AdapterEMA:
    """Temporal ensemble of adapter weights: after each optimizer step call `update()`, which
    does shadow = m * shadow + (1 - m) * param for every adapter tensor (including a learnable
    scale), with torch's foreach ops and no bias correction. Frozen base weights are never
    averaged; a tensor shared by several adapters (MMA's shared projection, Aurora's U, V, core)
    has one shadow.

    With use_in_eval=True (the R-Adapter recipe) adapters in eval mode compute with the shadows;
    `pyadapt.fold_(model, use_ema=True)` folds them."""

    def __init__(self, model: nn.Module, momentum: float = 0.999, use_in_eval: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        momentum = check.finite("momentum", momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a float in [0, 1], got {momentum}")
        self.momentum = momentum
        self._shadows: dict[int, Tensor] = {}
        self._params: dict[int, Tensor] = {}
        self.modules = list(_adapter_modules(model))
        if not self.modules:
            raise ValueError("model: contains no pyadapt adapter module to average")
        for _, m in self.modules:
            shadow_of = {}
            for tname, t in m.adapter_tensors():
                key = id(t)
                if key not in self._shadows:
                    self._shadows[key] = t.detach().clone()
                    self._params[key] = t
                shadow_of[tname] = self._shadows[key]
            m._ema_shadow = shadow_of
            m._ema_in_eval = bool(use_in_eval)

    @torch.no_grad()
    def update(self) -> None:
        keys = list(self._shadows)
        shadows = [self._shadows[k] for k in keys]
        params = [self._params[k].detach() for k in keys]
        torch._foreach_mul_(shadows, self.momentum)
        torch._foreach_add_(shadows, params, alpha=1.0 - self.momentum)

    def shadow(self, tensor: Tensor) -> Tensor:
        """The EMA shadow of an adapter tensor."""
        return self._shadows[id(tensor)]

    def state_dict(self) -> dict[str, Tensor]:
        """{qualified name: shadow}, named as adapter_state_dict names the live tensors."""
        return {k: self._shadows[id(t)] for k, t in _named_adapter_tensors(self.modules).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        _load_into(self.state_dict(), state, "EMA state")


def _named_adapter_tensors(modules) -> dict[str, Tensor]:
    """A tensor shared by several adapters is named once, under its first name."""
    out, seen = {}, set()
    for name, m in modules:
        for tname, t in m.adapter_tensors():
            if id(t) not in seen:
                seen.add(id(t))
                out[f"{name}.{tname}" if name else tname] = t
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{qualified name: tensor} of every adapter tensor of `model` (no frozen base weight). A
    tensor shared by several adapters appears once, under its first name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    named = _named_adapter_tensors(_adapter_modules(model))
    return {k: t.detach() for k, t in named.items()}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, Tensor],
                            strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy adapter tensors into `model`. Every name and shape is checked before anything is
    copied: a wrong shape, or (strict) a missing or unexpected name, is a ValueError naming the
    tensor, and the model is unchanged. Returns (missing, unexpected) names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, m in _foldables(model):
        if m.merged:
            raise ValueError(f"model: {name} is folded; call pyadapt.unfold_(model) before "
                             f"loading adapter weights")
    return _load_into(adapter_state_dict(model), state_dict, "state_dict", strict)


def _load_into(own: dict[str, Tensor], given: dict, what: str,
               strict: bool = True) -> tuple[list[str], list[str]]:
    if not isinstance(given, dict):
        raise TypeError(f"{what}: expected a dict of tensors, got {type(given).__name__}")
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {unexpected}")
    for k in sorted(set(own) & set(given)):
        v = given[k]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}[{k!r}]: expected a tensor, got {type(v).__name__}")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{what}[{k!r}]: expected shape {tuple(own[k].shape)}, got "
                             f"{tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{what}[{k!r}]: expected a floating-point tensor, got {v.dtype}")
    with torch.no_grad():
        for k in sorted(set(own) & set(given)):
            own[k].copy_(given[k])
    return missing, unexpected
