"""How adapters were attached to a model, so a checkpoint can attach them again.

Every function that puts adapters into a model (`pyadapt.inject`, the open_clip `add_*`
functions, ...) records one entry `{"kind": <name>, "config": <JSON-serialisable dict>}` on the
model with `record(model, kind, config)`, and registers, once at import, how to replay it with
`register(kind, fn)` where `fn(model, **config)` attaches the same adapters to a fresh model.
`save_adapters` writes `placements(model)` into the checkpoint's JSON header; `load_adapters`
into a model without adapters calls `replay(model, entries)` before loading the tensors.
Adapters attached in a way no JSON entry can describe (a callable target or factory given to
`pyadapt.inject`) are noted with `unreplayable(model, reason)`; their checkpoints hold tensors
only and load only into a model that already has the adapters.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Dict, List

import torch.nn as nn

ATTR = "_pyadapt_placements"
UNREPLAYABLE_ATTR = "_pyadapt_unreplayable"

_replayers: Dict[str, Callable[..., Any]] = {}
# Modules that register replayers; imported on demand so that replaying a checkpoint works
# without the caller having imported them first.
_PROVIDERS = ("pyadapt.inject", "pyadapt.integrations.open_clip")


def register(kind: str, fn: Callable[..., Any]) -> None:
    """Declare that entries of `kind` are replayed by `fn(model, **config)`."""
    _replayers[kind] = fn


def record(model: nn.Module, kind: str, config: Dict[str, Any]) -> None:
    """Append one placement entry to `model` (config must survive a JSON round trip)."""
    try:
        config = json.loads(json.dumps(config))
    except TypeError as exc:
        raise TypeError(f"placement config of {kind!r} is not JSON-serialisable: {exc}") from None
    entries = list(getattr(model, ATTR, []))
    entries.append({"kind": kind, "config": config})
    # object.__setattr__: a plain attribute, not a submodule/parameter/buffer of the model.
    object.__setattr__(model, ATTR, entries)


def unreplayable(model: nn.Module, reason: str) -> None:
    """Note that adapters were attached in a way no entry can describe (a callable target or
    factory): a checkpoint of `model` can then hold tensors only."""
    reasons = list(getattr(model, UNREPLAYABLE_ATTR, []))
    reasons.append(str(reason))
    object.__setattr__(model, UNREPLAYABLE_ATTR, reasons)


def unreplayable_reasons(model: nn.Module) -> List[str]:
    return list(getattr(model, UNREPLAYABLE_ATTR, []))


def placements(model: nn.Module) -> List[Dict[str, Any]]:
    """The entries recorded on `model`, oldest first (copies)."""
    return json.loads(json.dumps(getattr(model, ATTR, [])))


def replay(model: nn.Module, entries: List[Dict[str, Any]]) -> None:
    """Attach the adapters described by `entries` to `model`, in order."""
    for entry in entries:
        kind = entry.get("kind")
        if kind not in _replayers:
            for name in _PROVIDERS:
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
        if kind not in _replayers:
            raise ValueError(f"checkpoint placement {kind!r} is unknown; known: "
                             f"{sorted(_replayers)}")
        _replayers[kind](model, **entry.get("config", {}))
