"""What every benchmark shares: the workload description, the implementations compared, the
correctness gate that runs before any timing, and device synchronisation.

An op's bench file defines `build(preset, dtype, device) -> Workload`; this module turns a
workload into one callable per implementation:
  eager           the papers' eager PyTorch maths (pyadapt.reference functions, autograd)
  torch.compile   torch.compile of exactly that eager function
  pyadapt-<b>     pyadapt's checked op entry point with backend <b> selected
and checks each against the eager maths evaluated in float64 (forward output and every
gradient) before it is timed, so a fast wrong kernel fails instead of being reported.

Passes: "forward" is a training forward (trainable inputs require grad, so autograd records
and the ops save what their backward needs); "forward+backward" adds the backward of a fixed
random grad_out. Dropout is off in the op benchmarks (every implementation would draw masks
differently); R-Adapter's per-sample dropping is an input (row_scale), so it is on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest
import torch

import pyadapt

from .presets import DTYPES, Preset, presets

Tensor = torch.Tensor
Args = Dict[str, Any]

PASSES = ("forward", "forward+backward")

# The custom op whose registered backends say which pyadapt-<b> implementations exist.
FORWARD_OP = {"bottleneck": "bottleneck_forward", "radapter": "radapter_forward",
              "lowrank": "lowrank_forward", "fold": "fold_weights",
              "mpm_nce": "mpm_nce_forward"}

# Backends worth timing per device kind (triton on CPU would be its interpreter: not a timing).
DEVICE_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

# Relative Frobenius error allowed against float64, per dtype (DESIGN.md 5). fp32 allows TF32
# on CUDA, where Triton's fp32 dot defaults to it.
TOLERANCE = {("cpu", torch.float32): 1e-4, ("cuda", torch.float32): 2e-3,
             ("cpu", torch.bfloat16): 2e-2, ("cuda", torch.bfloat16): 2e-2,
             ("cpu", torch.float16): 2e-2, ("cuda", torch.float16): 2e-2}

ROUNDS = {"cpu": 20, "cuda": 50}
WARMUP_ROUNDS = {"cpu": 2, "cuda": 5}


@dataclass
class Workload:
    """One op at one preset and dtype.

    args: the inputs by name; tensors or lists of tensors (lists for multi-site ops). Names in
    `grads` are the trainable leaves whose gradients are checked (they require grad).
    `check_overrides` replaces entries for the correctness run only: adapter scales become 1 so
    that a wrong adapter branch cannot hide under MMA's 0.001 (the kernels take the scale as a
    runtime value, so the checked code path is the timed one). eager(args) and fused(args)
    return a tensor or a list of tensors; grad_out matches that structure."""
    op: str
    preset: Preset
    dtype: torch.dtype
    device: str
    args: Args
    grads: Sequence[str]
    eager: Callable[[Args], Any]
    fused: Callable[[Args], Any]
    grad_out: Any = None
    check_overrides: Args = field(default_factory=dict)

    @property
    def has_backward(self) -> bool:
        return bool(self.grads)


# ----------------------------------------------------------------------------------------------
# building inputs
# ----------------------------------------------------------------------------------------------

def generator(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, dtype, device, gen, std: float = 1.0) -> Tensor:
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def linear_weight(out_f: int, in_f: int, dtype, device, gen) -> Tensor:
    """nn.Linear's default range, never zero: every term of the maths contributes."""
    bound = 1.0 / in_f ** 0.5
    w = torch.rand((out_f, in_f), generator=gen, device=device, dtype=torch.float32)
    return ((2 * w - 1) * bound).to(dtype)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        return [fn(v) for v in value]
    return value


def _tensors(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Tensor)]
    return []


def fresh_args(args: Args, grads: Sequence[str], dtype: Optional[torch.dtype] = None,
               overrides: Optional[Args] = None) -> Args:
    """Detached copies of args (floating tensors cast to `dtype` when given), the `grads` leaves
    requiring grad; `overrides` replaces entries before the copy."""
    src = {**args, **(overrides or {})}
    out = {}
    for name, value in src.items():
        def copy(t: Tensor, name=name) -> Tensor:
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.clone()
            return t.requires_grad_(name in grads)
        out[name] = _map(value, copy)
    return out


def as_list(out: Any) -> List[Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def backward(out: Any, grad_out: Any) -> None:
    torch.autograd.backward(as_list(out), as_list(grad_out))


def clear_grads(args: Args, grads: Sequence[str]) -> None:
    for name in grads:
        for t in _tensors(args[name]):
            t.grad = None


# ----------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------

def impls(op: str, device: str) -> List[str]:
    """eager, torch.compile, and pyadapt-<b> for each backend usable here that has a kernel for
    `op` on this device kind."""
    implemented = set(pyadapt.ops.kernel_table().get(FORWARD_OP[op], ()))
    usable = set(pyadapt.available_backends())
    backends = [b for b in DEVICE_BACKENDS[device] if b in implemented and b in usable]
    return ["eager", "torch.compile"] + [f"pyadapt-{b}" for b in backends]


@contextlib.contextmanager
def backend(name: Optional[str]) -> Iterator[None]:
    """Select a pyadapt backend process-wide. Not `use_backend`: that choice is thread-local,
    and autograd runs CUDA backward ops on its own device thread, which would not see it."""
    if name is None:
        yield
        return
    pyadapt.set_backend(name)
    try:
        yield
    finally:
        pyadapt.set_backend("auto")


def runner(work: Workload, impl: str) -> Callable[[Args, bool], Any]:
    """run(args, with_backward) for one implementation: returns the forward output, after
    back-propagating grad_out through it when with_backward."""
    if impl == "eager":
        fn, name = work.eager, None
    elif impl == "torch.compile":
        # A fresh dynamo state per case: every case compiles its own graph, and earlier cases'
        # guards never push this one over the recompile limit (silently back to eager).
        torch._dynamo.reset()
        fn, name = torch.compile(work.eager, dynamic=False), None
    elif impl.startswith("pyadapt-"):
        fn, name = work.fused, impl.removeprefix("pyadapt-")
    else:
        raise ValueError(f"impl: expected eager, torch.compile or pyadapt-<backend>, got {impl!r}")

    def run(args: Args, with_backward: bool) -> Any:
        with backend(name):
            out = fn(args)
            if with_backward:
                backward(out, work.grad_out)
        return out
    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# the correctness gate
# ----------------------------------------------------------------------------------------------

def rel_err(out: Tensor, ref: Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def check(work: Workload, run: Callable[[Args, bool], Any], impl: str) -> Dict[str, float]:
    """Run `impl` once (forward, and backward when the op has one) on fresh copies of the
    workload's inputs and compare its output and every gradient with the eager maths in float64.
    Raises AssertionError naming the first quantity out of tolerance; returns all errors."""
    tol = TOLERANCE[(work.device, work.dtype)]
    args = fresh_args(work.args, work.grads, overrides=work.check_overrides)
    out = run(args, work.has_backward)
    sync(work.device)
    ref_args = fresh_args(work.args, work.grads, torch.float64, work.check_overrides)
    ref = work.eager(ref_args)
    if work.has_backward:
        backward(ref, [g.double() for g in as_list(work.grad_out)])
    errors: Dict[str, float] = {}
    for i, (o, r) in enumerate(zip(as_list(out), as_list(ref))):
        assert o.shape == r.shape, f"{impl}: output {i} shape {tuple(o.shape)} != {tuple(r.shape)}"
        errors[f"out[{i}]"] = rel_err(o, r)
    for name in work.grads:
        for i, (t, t_ref) in enumerate(zip(_tensors(args[name]), _tensors(ref_args[name]))):
            assert t.grad is not None, f"{impl}: no gradient for {name}[{i}]"
            errors[f"d{name}[{i}]"] = rel_err(t.grad, t_ref.grad)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (
        f"{impl} on {work.op}/{work.preset.name} {work.dtype}: {worst} relative error "
        f"{errors[worst]:.3e} > {tol:.0e} against float64")
    return errors


# ----------------------------------------------------------------------------------------------
# pytest-benchmark glue
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    preset: Preset
    dtype: str
    impl: str
    pass_: str

    @property
    def id(self) -> str:
        return f"{self.preset.name}-{self.dtype}-{self.impl}-{self.pass_}"


def cases(op: str, passes: Sequence[str] = PASSES) -> List[Any]:
    """pytest params over preset x dtype x implementation x pass; GPU presets skip without CUDA."""
    params = []
    for device in ("cpu", "cuda"):
        skip = pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(),
                                  reason="GPU preset: needs CUDA")
        for preset in presets(op, device):
            for dtype in DTYPES[device]:
                for impl in impls(op, device):
                    for pass_ in passes:
                        case = Case(preset, dtype, impl, pass_)
                        params.append(pytest.param(case, id=case.id, marks=[skip]))
    return params


def run_benchmark(benchmark, build: Callable[..., Workload], case: Case) -> Dict[str, float]:
    """Build the workload, check the implementation against float64, then time it."""
    preset = case.preset
    work = build(preset, dtype_of(case.dtype), preset.device)
    run = runner(work, case.impl)
    errors = check(work, run, case.impl)
    with_backward = case.pass_ == "forward+backward"
    args = fresh_args(work.args, work.grads)

    def step():
        clear_grads(args, work.grads)
        run(args, with_backward)
        sync(preset.device)

    # implementations of one workload side by side in pytest-benchmark's table
    benchmark.group = f"{work.op} {preset.name} {case.dtype} {case.pass_}"
    benchmark.extra_info.update({
        "op": work.op, "preset": preset.name, "device": preset.device, "dtype": case.dtype,
        "impl": case.impl, "pass": case.pass_, "dims": _jsonable(preset.dims),
        "max_rel_err_vs_float64": max(errors.values()),
    })
    benchmark.pedantic(step, rounds=ROUNDS[preset.device], iterations=1,
                       warmup_rounds=WARMUP_ROUNDS[preset.device])
    return errors


def _jsonable(dims: Dict[str, object]) -> Dict[str, object]:
    out = {}
    for k, v in dims.items():
        if isinstance(v, (list, tuple)):
            # fold presets list many identical items: keep the count, not the repetition
            out[k] = len(v) if k == "items" else list(v)
        else:
            out[k] = v
    return out
