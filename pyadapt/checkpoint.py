"""Adapter checkpoints in safetensors: adapter tensors only, plus what is needed to rebuild them.

    pyadapt.save_adapters(model, "run.safetensors")          # adapters (+ EMA shadows if any)
    fresh = make_backbone()                                   # no adapters yet
    pyadapt.load_adapters(fresh, "run.safetensors")          # re-attaches them, then loads

The file holds every adapter tensor under its `pyadapt.adapter_state_dict` name (a tensor shared
by several adapters once), the AdapterEMA shadows under "ema:<name>" when the model has them,
and a JSON header (safetensors metadata, key "pyadapt") with the pyadapt and torch versions,
the placements recorded by `pyadapt.inject` / the open_clip `add_*` functions, and each adapter
module's configuration. Frozen backbone weights are never stored.

Decisions:
- A model whose adapters were attached by a callable (not describable in JSON) is saved with a
  warning and `"replayable": false`; loading it needs a model that already has the adapters.
- Saving a folded model (`pyadapt.fold_`) is allowed: folding never changes adapter tensors.
  Loading into a folded model is refused (unfold first), because the folded base weights
  would no longer match the loaded adapters.
- Tensors are copied into the model's own tensors, converting dtype like
  nn.Module.load_state_dict; a model built in the checkpoint's dtype gets the values bit for bit.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _placement
from .adapters import FusedAdapter
from .bank import RAdapterBank
from .fold import _adapter_modules, _foldables, _named_adapter_tensors
from .linear import CPLinear, LowRankAdapter, RAdapter

Tensor = torch.Tensor
PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "pyadapt-adapters"
FORMAT_VERSION = 1
HEADER_KEY = "pyadapt"
EMA_PREFIX = "ema:"


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a core dependency
        raise ImportError("pyadapt checkpoints need the `safetensors` package "
                          "(pip install safetensors)") from exc
    return st, safe_open


def _scale_value(scale) -> Union[float, str]:
    return "learned" if isinstance(scale, nn.Parameter) else float(scale)


def module_config(m: nn.Module) -> Dict[str, Dict[str, Any]]:
    """{"function": what changes the adapter's eval output, "training": training-only knobs}."""
    if isinstance(m, RAdapter):
        return {"function": {"class": "RAdapter", "rank": m.rank, "scale": _scale_value(m.scale),
                             "eval_scale": m.eval_scale},
                "training": {"drop_prob": m.drop_prob, "drop_granularity": m.drop_granularity,
                             "batch_first": m.batch_first}}
    if isinstance(m, LowRankAdapter):
        return {"function": {"class": "LowRankAdapter", "rank": m.rank, "alpha": m.alpha},
                "training": {"dropout": m.dropout}}
    if isinstance(m, CPLinear):
        return {"function": {"class": "CPLinear", "rank": m.rank, "core": m.core_kind,
                             "blocks": [m.n_out, m.n_in]},
                "training": {"dropout": m.dropout, "dropout_position": m.dropout_position}}
    if isinstance(m, FusedAdapter):
        return {"function": {"class": "FusedAdapter", "in_features": m.in_features,
                             "bottleneck": m.bottleneck, "activation": m.activation,
                             "scale": _scale_value(m.scale), "shared": m.shared is not None},
                "training": {"dropout": m.dropout,
                             "grad_scale_invariant": m.grad_scale_invariant}}
    if isinstance(m, RAdapterBank):
        return {"function": {"class": "RAdapterBank", "rank": m.rank,
                             "num_adapters": m.num_adapters,
                             "scale": "learned" if m.learn_scale else m.scale.tolist(),
                             "eval_scale": m.eval_scale.tolist()},
                "training": {"drop_prob": m.drop_prob, "drop_granularity": m.drop_granularity,
                             "batch_first": m.batch_first}}
    return {"function": {"class": type(m).__name__}, "training": {}}


def _ema_named(model: nn.Module) -> Dict[str, Tensor]:
    """{name: EMA shadow}, named and deduplicated exactly as the live adapter tensors."""
    out, seen = {}, set()
    for name, m in _adapter_modules(model):
        if m._ema_shadow is None:
            continue
        for tname, t in m.adapter_tensors():
            if id(t) not in seen and tname in m._ema_shadow:
                seen.add(id(t))
                out[f"{name}.{tname}" if name else tname] = m._ema_shadow[tname]
    return out


def save_adapters(model: nn.Module, path: PathLike, *, ema: bool = True,
                  metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write `model`'s adapter tensors (and, with ema=True, its AdapterEMA shadows when it has
    them) to a safetensors file at `path`, with a JSON header describing how to rebuild the
    adapters. `metadata` (JSON-serialisable) is stored in the header under "user". Returns
    the header."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    st, _ = _safetensors()
    modules = list(_adapter_modules(model))
    if not modules:
        raise ValueError("model: contains no pyadapt adapter module to save")
    live = _named_adapter_tensors(modules)
    shadows = _ema_named(model) if ema else {}
    tensors = {k: t.detach().cpu().contiguous() for k, t in live.items()}
    tensors.update({EMA_PREFIX + k: t.detach().cpu().contiguous() for k, t in shadows.items()})
    import pyadapt
    reasons = _placement.unreplayable_reasons(model)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "pyadapt_version": pyadapt.__version__, "torch_version": torch.__version__,
        "placements": _placement.placements(model),
        "replayable": not reasons, "unreplayable": reasons,
        "adapters": {name: module_config(m) for name, m in modules},
        "ema": bool(shadows),
        "user": metadata if metadata is not None else {},
    }
    try:
        text = json.dumps(header)
    except TypeError as exc:
        raise TypeError(f"metadata: expected JSON-serialisable values: {exc}") from None
    if reasons:
        warnings.warn(f"save_adapters: adapters were attached in a way a checkpoint cannot "
                      f"describe ({'; '.join(reasons)}); {os.fspath(path)} holds tensors only and "
                      f"can be loaded only into a model that already has these adapters",
                      stacklevel=2)
    st.save_file(tensors, os.fspath(path), metadata={HEADER_KEY: text})
    return header


def read_header(path: PathLike) -> Dict[str, Any]:
    """The JSON header of a pyadapt adapter checkpoint."""
    _, safe_open = _safetensors()
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if HEADER_KEY not in meta:
        raise ValueError(f"path: {os.fspath(path)} is not a pyadapt adapter checkpoint (no "
                         f"{HEADER_KEY!r} entry in its safetensors metadata)")
    header = json.loads(meta[HEADER_KEY])
    if header.get("format") != FORMAT or header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"path: {os.fspath(path)} has format {header.get('format')!r} version "
                         f"{header.get('format_version')!r}; this pyadapt reads {FORMAT!r} up to "
                         f"version {FORMAT_VERSION}")
    return header


@dataclass
class LoadResult:
    """What load_adapters did."""
    missing: List[str]
    unexpected: List[str]
    rebuilt: bool
    ema_loaded: List[str] = field(default_factory=list)
    # EMA shadows in the file that the model had no AdapterEMA for; after a rebuild, do
    # `ema = pyadapt.AdapterEMA(model, m); ema.load_state_dict(result.ema_state)`.
    ema_state: Dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def ema_skipped(self) -> List[str]:
        return sorted(self.ema_state)


class _Snapshot:
    """Enough of a model to undo a placement replay: every module's instance attributes (its
    children, parameters, hooks, placement records, a patched forward: dicts are copied one
    level deep and later restored in place, so existing hook handles stay valid) and every
    parameter's requires_grad. Tensor values are not copied: placing adapters never writes
    backbone values."""

    def __init__(self, model: nn.Module):
        self.modules = []
        for m in model.modules():
            attrs = {k: (v, dict(v) if isinstance(v, dict) else None)
                     for k, v in m.__dict__.items()}
            self.modules.append((m, attrs))
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for m, attrs in self.modules:
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            for k, (obj, content) in attrs.items():
                if content is not None:
                    obj.clear()
                    obj.update(content)
                m.__dict__[k] = obj
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _check_tensors(own: Dict[str, Tensor], given: Dict[str, Tensor], what: str,
                   strict: bool) -> Tuple[List[str], List[str]]:
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"{what}: missing tensors {missing}, unexpected tensors {unexpected}")
    for k in sorted(set(own) & set(given)):
        if tuple(given[k].shape) != tuple(own[k].shape):
            raise ValueError(f"{what}: tensor {k!r} has shape {tuple(given[k].shape)} in the "
                             f"checkpoint but {tuple(own[k].shape)} in the model")
        if not given[k].is_floating_point():
            raise TypeError(f"{what}: tensor {k!r} has dtype {given[k].dtype}; expected a "
                            f"floating-point tensor")
    return missing, unexpected


def _check_configs(model: nn.Module, saved: Dict[str, Any], what: str) -> None:
    for name, m in _adapter_modules(model):
        if name not in saved:
            continue
        mine, theirs = module_config(m)["function"], saved[name].get("function", {})
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise ValueError(f"{what}: adapter {name!r} has {key}={mine.get(key)!r} in the "
                                 f"model but {key}={theirs.get(key)!r} in the checkpoint")


def load_adapters(model: nn.Module, path: PathLike, strict: bool = True, *, ema: bool = True,
                  rebuild: bool = True) -> LoadResult:
    """Load a checkpoint written by save_adapters into `model`.

    A model without pyadapt adapters first gets them re-attached from the checkpoint's
    placements (rebuild=True); a model that has adapters must have the same ones. Every name,
    shape and adapter configuration is checked before anything is copied: a mismatch (with
    strict, also a missing or unexpected tensor) is a ValueError naming the tensor, and the model
    is left exactly as it was (adapters re-attached by this call are removed again). EMA
    shadows in the file are loaded into the model's AdapterEMA shadows when it has them (and
    ema=True); otherwise they are returned in `result.ema_state`, ready for
    `pyadapt.AdapterEMA(model).load_state_dict(result.ema_state)`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    st, _ = _safetensors()
    header = read_header(path)
    what = f"checkpoint {os.fspath(path)}"
    tensors = st.load_file(os.fspath(path))
    for name, m in _foldables(model):
        if m.merged:
            raise ValueError(f"model: {name} is folded; call pyadapt.unfold_(model) before "
                             f"loading adapters")
    snapshot = None
    if not any(True for _ in _adapter_modules(model)):
        if not rebuild:
            raise ValueError("model: has no pyadapt adapters to load into (rebuild=False)")
        if not header.get("replayable", True):
            raise ValueError(f"{what}: cannot rebuild its adapters ("
                             f"{'; '.join(header.get('unreplayable', []))}); attach them to the "
                             f"model the same way before loading")
        if not header.get("placements"):
            raise ValueError(f"{what}: records no adapter placement, and the model has no "
                             f"pyadapt adapters to load into")
        snapshot = _Snapshot(model)
    try:
        if snapshot is not None:
            _placement.replay(model, header["placements"])
        _check_configs(model, header.get("adapters", {}), what)
        given = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
        given_ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items()
                     if k.startswith(EMA_PREFIX)}
        own = _named_adapter_tensors(_adapter_modules(model))
        missing, unexpected = _check_tensors(own, given, what, strict)
        own_ema = _ema_named(model) if ema else {}
        if given_ema and own_ema:
            _check_tensors(own_ema, given_ema, what + " (EMA)", strict)
            ema_names = sorted(set(own_ema) & set(given_ema))
            skipped = {}
        else:
            ema_names, skipped = [], given_ema
    except Exception:
        if snapshot is not None:
            snapshot.restore()
        raise
    with torch.no_grad():
        for k in sorted(set(own) & set(given)):
            own[k].copy_(given[k])
        for k in ema_names:
            own_ema[k].copy_(given_ema[k])
    return LoadResult(missing, unexpected, snapshot is not None, ema_names, skipped)
