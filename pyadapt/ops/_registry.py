"""Which backend runs an op: the registry, the user's choice, and `auto`.

Each op module registers one implementation per backend (`register`). A custom op's body asks
`kernel_for(op, device)` at call time, so the choice is made per call (and stays outside any
torch.compile graph, where the custom op is opaque).

Choice, in order: `use_backend(...)` / `set_backend(...)`, else the environment variable
PYADAPT_BACKEND, else `auto`. `auto` on a CUDA tensor takes the backend measured fastest for the
op on that device's model (the shipped table pyadapt/ops/auto_choice.json, written by
`python -m bench.choose_backends`; a backward follows its forward's entry) when that backend has
the op's kernel and is available here; otherwise, and on every other device, the first backend
in `_AUTO_PREFERENCE` that implements the op. A named backend that is available but has no
kernel for an op falls back to `reference` for that op; `kernel_table()` shows what runs where,
`auto_choice()` what `auto` picks and why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Union

from . import _auto_choice

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

# The fixed preference of `auto` per device type, for ops the table records nothing usable for on
# this device. Only backends that registered a kernel are considered.
_AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

_kernels: Dict[str, Dict[str, Callable]] = {}
_available: Dict[str, bool] = {"reference": True}
_state = threading.local()
_global_choice: list[str | None] = [None]

# `auto` on CUDA: the shipped table, read on first use (importing pyadapt makes no CUDA call
# and reads no file), and per CUDA device index {op: backend recorded for the device's name},
# backward and saving ops under their forward's entry, so that a call costs a dict lookup.
_table: list[Optional[dict]] = [None]
_recorded_by_index: Dict[int, Dict[str, str]] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Record `fn` as `backend`'s implementation of `op` (name without namespace)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend: expected one of {BACKENDS[1:]}, got {backend!r}")
    _kernels.setdefault(op, {})[backend] = fn
    _available.setdefault(backend, _usable(backend))
    _recorded_by_index.clear()  # a new op or kernel changes what the table maps


def register_from(backend: str, module_name: str, kernels: Dict[str, str]) -> bool:
    """Register `backend`'s kernels {op: function name} from an optional module, whose import
    fails when the backend's toolchain (e.g. triton) is missing. Returns whether it imported."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    for op, attr in kernels.items():
        register(op, backend, getattr(module, attr))
    return True


def _usable(backend: str) -> bool:
    """Whether a backend that registered kernels can run here. Triton needs a CUDA device, or
    its CPU interpreter (TRITON_INTERPRET=1, set before the kernels are defined: tests, CI)."""
    if backend == "triton":
        import torch

        interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
        return interpret or torch.cuda.is_available()
    if backend == "cuda":
        import torch

        return torch.cuda.is_available()
    return True


def available_backends() -> list[str]:
    """Backends usable in this process, in preference order (always includes 'reference')."""
    return [b for b in BACKENDS[1:] if _available.get(b, False)]


def _validated(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    if name != "auto" and not _available.get(name, False):
        raise ValueError(f"{source}: backend {name!r} is not available here; "
                         f"available: {available_backends()}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op in this process; 'auto' drops the choice, so
    PYADAPT_BACKEND (if set) and then automatic selection apply again."""
    name = _validated(name, "backend")
    _global_choice[0] = None if name == "auto" else name


def current_backend() -> str:
    """The backend name in force for this thread ('auto' unless chosen)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice[0] is not None:
        return _global_choice[0]
    env = os.environ.get("PYADAPT_BACKEND")
    if env:
        return _validated(env, "PYADAPT_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run ops inside the block on backend `name` (thread-local)."""
    name = _validated(name, "backend")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """`op.register_autograd(backward, setup_context=...)`, with the backward run under the
    backend choice its forward saw. Autograd runs CUDA backwards on its own device threads,
    where the caller's thread-local `use_backend` would otherwise be invisible."""

    def setup(ctx, inputs, output):  # torch requires the name `output`
        ctx.pyadapt_backend = current_backend()
        setup_context(ctx, inputs, output)

    def backward_as_forward(ctx, *grads):
        with use_backend(ctx.pyadapt_backend):
            return backward(ctx, *grads)

    op.register_autograd(backward_as_forward, setup_context=setup)


def backend_for(op: str, device: Union[str, "torch.device"]) -> str:
    """Name of the backend that will run `op` on a tensor of `device` right now. `device` is a
    torch.device (the op bodies pass the tensor's, so `auto` reads the table of that CUDA device)
    or a device type such as "cuda" (then the current CUDA device)."""
    impls = _kernels[op]
    choice = current_backend()
    if choice != "auto":
        return choice if choice in impls else "reference"
    if isinstance(device, str) and ":" not in device:
        return _auto_backend(op, impls, device, None)
    if isinstance(device, str):  # "cuda:1"
        import torch

        device = torch.device(device)
    return _auto_backend(op, impls, device.type, device.index)


def _auto_backend(op: str, impls: Dict[str, Callable], device_type: str,
                  index: Optional[int]) -> str:
    if device_type == "cuda":
        recorded = _recorded_backends(index).get(op)
        if recorded is not None and recorded in impls and _available.get(recorded, False):
            return recorded
    for name in _AUTO_PREFERENCE.get(device_type, ("reference",)):
        if name in impls:
            return name
    return "reference"


def kernel_for(op: str, device: Union[str, "torch.device"]) -> Callable:
    return _kernels[op][backend_for(op, device)]


# ---------------------------------------------------------------------------------------------
# the measured table of `auto` on CUDA devices
# ---------------------------------------------------------------------------------------------

def _choice_table() -> dict:
    """The shipped table, read once. A missing or malformed file is a warning, not an error:
    `auto` still works with its fixed preference."""
    if _table[0] is None:
        try:
            _table[0] = _auto_choice.load_table()
        except (OSError, ValueError) as exc:
            warnings.warn(f"pyadapt: ignoring the auto choice table {_auto_choice.TABLE_PATH} "
                          f"({exc}); auto uses its fixed preference", RuntimeWarning)
            _table[0] = _auto_choice.empty_table()
    return _table[0]


def _cuda_device_name(index: int) -> Optional[str]:
    """torch.cuda.get_device_name(index), None without CUDA (tests replace this lookup)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(index)


def _current_cuda_index() -> int:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _recorded_backends(index: Optional[int]) -> Dict[str, str]:
    """{op: recorded backend} for CUDA device `index` (None: the current one), from the table
    entry of its name; empty when the table has none."""
    if index is None:
        index = _current_cuda_index()
    recorded = _recorded_by_index.get(index)
    if recorded is None:
        entry = _auto_choice.device_entry(_choice_table(), _cuda_device_name(index))
        measured = entry["ops"] if entry else {}
        recorded = {op: measured[_auto_choice.table_op(op)]["backend"] for op in _kernels
                    if _auto_choice.table_op(op) in measured}
        _recorded_by_index[index] = recorded
    return recorded


def _located(device: Union[str, "torch.device", None]) -> tuple:
    """(device type, CUDA index, CUDA device name) of `device`; None means the current CUDA
    device where there is one, else cpu. Index and name are None off CUDA."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device.type, None, None
    index = _current_cuda_index() if device.index is None else device.index
    return "cuda", index, _cuda_device_name(index)


def measured_device(device: Union[str, "torch.device", None] = None) -> dict:
    """Whether the table holds measurements for `device` (default: the current CUDA device):
    {"device": its name (None off CUDA), "measured": bool, "date": of the measurement or None}."""
    _, _, name = _located(device)
    entry = _auto_choice.device_entry(_choice_table(), name)
    return {"device": name, "measured": entry is not None,
            "date": entry["date"] if entry else None}


def auto_choice(device: Union[str, "torch.device", None] = None) -> Dict[str, Dict[str, str]]:
    """What `auto` runs each registered op on for `device` (default: the current CUDA device,
    else cpu), and why: {op: {"backend": name, "reason": "measured on <device> <date>" or
    "fixed preference: ..."}}. An explicit use_backend / set_backend / PYADAPT_BACKEND
    overrides `auto` and is not reflected here."""
    device_type, index, name = _located(device)
    entry = _auto_choice.device_entry(_choice_table(), name)
    out = {}
    for op, impls in sorted(_kernels.items()):
        backend = _auto_backend(op, impls, device_type, index)
        measured_op = _auto_choice.table_op(op)
        record = entry["ops"].get(measured_op) if entry else None
        if device_type != "cuda":
            reason = f"fixed preference: measurements cover CUDA devices, not {device_type}"
        elif name is None:
            reason = "fixed preference: no CUDA device here to look up"
        elif entry is None:
            reason = f"fixed preference: no measurement for this device ({name})"
        elif record is None:
            reason = f"fixed preference: {measured_op} not measured on {name}"
        elif record["backend"] in impls and _available.get(record["backend"], False):
            reason = f"measured on {name} {record['date']}"
        else:
            reason = (f"fixed preference: {record['backend']!r}, measured fastest on {name} "
                      f"{record['date']}, is not available here for {op}")
        out[op] = {"backend": backend, "reason": reason}
    return out


def kernel_of(op: str, backend: str) -> Optional[Callable]:
    """`backend`'s kernel of `op`, or None when it has none (no fallback)."""
    return _kernels.get(op, {}).get(backend)


def kernel_table() -> dict[str, list[str]]:
    """{op: [backends implementing it]}."""
    return {op: sorted(impls) for op, impls in sorted(_kernels.items())}
