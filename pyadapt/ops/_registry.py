"""Which backend runs an op: the registry, the user's choice, and `auto`.

Each op module registers one implementation per backend (`register`). A custom op's body asks
`kernel_for(op, device)` at call time, so the choice is made per call (and stays outside any
torch.compile graph, where the custom op is opaque).

Choice, in order: `use_backend(...)` / `set_backend(...)`, else the environment variable
PYADAPT_BACKEND, else `auto`. `auto` takes, for the tensor's device, the first backend in
`_AUTO_PREFERENCE` that implements the op. A named backend that is available but has no kernel
for an op falls back to `reference` for that op; `kernel_table()` shows what runs where.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable, Dict, Iterator

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

# Preference of `auto` per device type. Only backends that registered a kernel are considered.
_AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

_kernels: Dict[str, Dict[str, Callable]] = {}
_available: Dict[str, bool] = {"reference": True}
_state = threading.local()
_global_choice: list[str | None] = [None]


def register(op: str, backend: str, fn: Callable) -> None:
    """Record `fn` as `backend`'s implementation of `op` (name without namespace)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend: expected one of {BACKENDS[1:]}, got {backend!r}")
    _kernels.setdefault(op, {})[backend] = fn
    _available.setdefault(backend, _usable(backend))


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


def backend_for(op: str, device_type: str) -> str:
    """Name of the backend that will run `op` on a tensor of `device_type` right now."""
    impls = _kernels[op]
    choice = current_backend()
    if choice == "auto":
        for name in _AUTO_PREFERENCE.get(device_type, ("reference",)):
            if name in impls:
                return name
        return "reference"
    return choice if choice in impls else "reference"


def kernel_for(op: str, device_type: str) -> Callable:
    return _kernels[op][backend_for(op, device_type)]


def kernel_of(op: str, backend: str) -> Optional[Callable]:
    """`backend`'s kernel of `op`, or None when it has none (no fallback)."""
    return _kernels.get(op, {}).get(backend)


def kernel_table() -> dict[str, list[str]]:
    """{op: [backends implementing it]}."""
    return {op: sorted(impls) for op, impls in sorted(_kernels.items())}
