"""The native `cpu` backend of the low-rank op (csrc/cpu/lowrank.cpp) against the float64
reference: forward and every gradient for float32/float64 and bf16/fp16 storage, odd sizes, r
from 1 to 128, M = 0, dropout before/after the core, core present/absent, `needs` combinations,
both the folded (one GEMM on W' = W + s B K^T A) and the unfolded path, gradcheck in float64,
opcheck, bit-identical results across runs and thread counts, and the fallback to the reference.

If the native extension is missing these tests FAIL (PYADAPT_ALLOW_NO_NATIVE=1 skips them on a
deliberately pure-Python install), as in tests/test_bottleneck_cpu.py.
"""

from __future__ import annotations


import pytest
import torch

import pyadapt
from pyadapt.ops import lowrank as lowrank_mod
from pyadapt.ops.lowrank import lowrank_linear

from conftest import REL_TOL, assert_close_rel, rel_err

F64 = torch.float64
NAMES = ("x", "weight", "bias", "down", "core", "up")


pytestmark = pytest.mark.usefixtures("needs_native")


def _inputs(M, d_in, d_out, r1, r2=None, *, core=True, bias=True, gen_seed=0):
    """Fresh float64 data (never zeros); r2 is the core's column count (r1 without a core)."""
    g = torch.Generator().manual_seed(gen_seed)
    r2 = r1 if (r2 is None or not core) else r2

    def mk(*s, std=1.0):
        return torch.randn(*s, generator=g, dtype=F64) * std

    return dict(x=mk(M, d_in), weight=mk(d_out, d_in, std=d_in ** -0.5),
                bias=mk(d_out, std=0.1) if bias else None, down=mk(r1, d_in, std=d_in ** -0.5),
                core=mk(r1, r2, std=r1 ** -0.5) if core else None,
                up=mk(d_out, r2, std=r2 ** -0.5), grad_y=mk(M, d_out))


def _run(ins, dtype, backend, *, scale=0.7, p=0.0, after=True, grads=NAMES, seed=1234):
    """y and the gradients of the inputs named in `grads` (the others do not require grad)."""
    leaves = {k: (None if ins[k] is None
                  else ins[k].detach().to(dtype).clone().requires_grad_(k in grads))
              for k in NAMES}
    with pyadapt.use_backend(backend):
        y = lowrank_linear(*(leaves[k] for k in NAMES), scale=scale, dropout_p=p,
                           seed=torch.tensor(seed, dtype=torch.int64) if p > 0 else None,
                           dropout_after_core=after)
        if any(t is not None and t.requires_grad for t in leaves.values()):
            y.backward(ins["grad_y"].to(dtype))
    out = {"y": y.detach()}
    for k, t in leaves.items():
        if t is not None and t.requires_grad:
            out["d_" + k] = t.grad
    return out


def _compare(ins, dtype=torch.float32, **kw):
    """Every output within REL_TOL[dtype] of float64, or within 2x the error of the eager
    reference in `dtype` (a short cancelling sum such as db at M = 1 can miss 1e-5 in float32
    whoever computes it); bf16/fp16 also at most 2x eager's error."""
    got = _run(ins, dtype, "cpu", **kw)
    ref = _run(ins, F64, "reference", **kw)
    eager = _run(ins, dtype, "reference", **kw) if dtype != F64 else None
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype}"
        assert got[name].shape == ref[name].shape, name
        if eager is not None and rel_err(got[name], ref[name]) > REL_TOL[dtype]:
            err, base = rel_err(got[name], ref[name]), rel_err(eager[name], ref[name])
            assert err <= 2 * base, (f"cpu {name}: relative error {err:.3e} > {REL_TOL[dtype]:.0e} "
                                     f"and > 2x eager {dtype} error {base:.3e}")
        else:
            assert_close_rel(got[name], ref[name], dtype, f"cpu {name}",
                             baseline=None if eager is None else eager[name])
    return got


def test_cpu_backend_registered():
    info = pyadapt.build_info()
    assert info["native_extension"] is True
    for op in ("lowrank_forward", "lowrank_backward"):
        assert "cpu" in info["ops"][op]
        with pyadapt.use_backend("auto"):
            assert pyadapt.ops.backend_for(op, "cpu") == "cpu"


# M = 300 with d <= 100 takes the folded path, M <= 65 with d = 130 the unfolded one.
@pytest.mark.parametrize("M", [0, 1, 65, 300])
@pytest.mark.parametrize("d_in,d_out", [(8, 8), (100, 36), (96, 130)])
@pytest.mark.parametrize("r", [1, 7, 128])
def test_shapes_fp32(M, d_in, d_out, r):
    seed = M * 7919 + d_in * 31 + r
    _compare(_inputs(M, d_in, d_out, r, max(1, r // 2), gen_seed=seed))
    _compare(_inputs(M, d_in, d_out, r, core=False, bias=False, gen_seed=seed + 1), p=0.25,
             after=bool(r % 2))


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("after", [True, False])
@pytest.mark.parametrize("core", [True, False])
def test_options(dtype, p, after, core):
    for M, bias in ((65, True), (300, False)):  # unfolded and folded without dropout
        ins = _inputs(M, 100, 36, 7, 5, core=core, bias=bias, gen_seed=M + 3 * core)
        _compare(ins, dtype, p=p, after=after, scale=0.5)


@pytest.mark.parametrize("grads", [
    ("down", "core", "up"),              # LoRA / Aurora training: the base is frozen
    ("x", "down", "up"),
    ("x",),
    ("weight", "bias"),
    ("up",),
    ("down",),
    ("core",),
    NAMES,
])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_needs_combinations(grads, p):
    for M in (40, 300):
        got = _compare(_inputs(M, 64, 48, 8, 6, gen_seed=M), p=p, after=False, grads=grads)
        assert set(got) == {"y"} | {"d_" + k for k in grads}


def test_strided_inputs():
    ins = _inputs(300, 48, 40, 6, 4)
    ins["x"] = ins["x"].t().contiguous().t()                 # column-major
    ins["weight"] = ins["weight"].t().contiguous().t()
    ins["down"] = torch.randn(6, 96, dtype=F64)[:, ::2] * 0.2  # every second column
    for p in (0.0, 0.3):
        _compare(ins, p=p)


def test_dropout_mask_is_the_references():
    """x = I, W = 0, A = 1 (so u = x A^T = 1), B = I, no core: y is exactly the multiplier."""
    n = 37
    eye = torch.eye(n, dtype=F64)
    ones = torch.ones(n, n, dtype=F64)
    seed = torch.tensor(4242, dtype=torch.int64)
    with pyadapt.use_backend("cpu"):
        y = lowrank_linear(eye, torch.zeros(n, n, dtype=F64), None, ones, None, eye, scale=1.0,
                           dropout_p=0.4, seed=seed)
    keep = pyadapt.reference.dropout_multiplier(4242, n, n, 0.4, F64, "cpu")
    assert torch.equal(y, keep)


@pytest.mark.parametrize("p,after,core", [(0.0, True, True), (0.3, True, True),
                                          (0.3, False, True), (0.3, True, False)])
@pytest.mark.parametrize("M", [3, 40])   # unfolded and folded
def test_gradcheck_float64(p, after, core, M):
    ins = _inputs(M, 6, 5, 3, 2, core=core)
    names = [k for k in NAMES if ins[k] is not None]
    tensors = tuple(ins[k].clone().requires_grad_(True) for k in names)

    def f(*ts):
        kw = dict(zip(names, ts))
        with pyadapt.use_backend("cpu"):
            return lowrank_linear(kw["x"], kw["weight"], kw["bias"], kw["down"], kw.get("core"),
                                  kw["up"], scale=0.8, dropout_p=p,
                                  seed=torch.tensor(9, dtype=torch.int64) if p else None,
                                  dropout_after_core=after)

    assert torch.autograd.gradcheck(f, tensors)


def test_bit_identical_across_runs_and_threads():
    """Several row and column tiles (M = 600, d_out = 300), folded and dropout paths."""
    ins = _inputs(600, 96, 300, 16, 8)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 1, 2, 2):
            torch.set_num_threads(threads)
            results.append([_run(ins, dt, "cpu", p=p)
                            for dt in (torch.float32, torch.bfloat16) for p in (0.0, 0.3)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for name in a:
                assert torch.equal(a[name], b[name]), f"{name} not bit-identical"


def test_uncovered_dtype_falls_back_to_reference(monkeypatch):
    """A dtype outside the covered set runs the reference (bit-equal), never the native op."""
    monkeypatch.setattr(lowrank_mod, "_CPU_DTYPES", (torch.float32, F64))

    def no_native():
        raise AssertionError("the native op ran for an uncovered dtype")

    monkeypatch.setattr(lowrank_mod._native, "ops", no_native)
    ins = _inputs(9, 16, 12, 4, 3)
    got = _run(ins, torch.bfloat16, "cpu", p=0.3)
    ref = _run(ins, torch.bfloat16, "reference", p=0.3)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def _op_args(p, core=True, bias=True):
    ins = _inputs(12, 10, 9, 4, 3, core=core, bias=bias)
    t = {k: (None if ins[k] is None else ins[k].float().requires_grad_(True)) for k in NAMES}
    seed = torch.tensor(5, dtype=torch.int64) if p > 0 else None
    return [t[k] for k in NAMES] + [0.6, seed, p, True], ins["grad_y"].float()


@pytest.mark.parametrize("p,core,bias", [(0.3, True, True), (0.0, False, False)])
def test_opcheck_cpu_backend(p, core, bias):
    args, grad_y = _op_args(p, core, bias)
    with pyadapt.use_backend("cpu"):
        torch.library.opcheck(torch.ops.pyadapt.lowrank_forward.default, args)
        needs = [True, False, bias, True, core, True]
        bwd = [grad_y] + [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(torch.ops.pyadapt.lowrank_backward.default, bwd + [needs])
