"""Integrations with model libraries and with the official adapter code.

`pyadapt.integrations.open_clip` (needs open_clip_torch, the `clip` extra) places MMA,
R-Adapter and bottleneck adapters into open_clip models; `load_official` maps checkpoints of
the official MMA / R-Adapter code into injected pyadapt modules. Submodules import lazily, so
`import pyadapt` never needs open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["open_clip", "load_official"]


def __getattr__(name: str) -> Any:
    if name == "open_clip":
        return importlib.import_module(".open_clip", __name__)
    if name == "load_official":
        return importlib.import_module(".official", __name__).load_official
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
