"""The native `cpu` backend of the grouped fold (csrc/cpu/fold.cpp): W'_i = W_i + s_i L_i R_i
for many weights of different shapes and dtypes in one call, against the float64 reference
(float32 accumulation, float64 for float64 weights, one rounding), odd sizes, empty weights,
inner sizes 1 to 128, inputs left untouched, bit-identical across runs and thread counts,
opcheck, and the fallback to the reference.

If the native extension is missing these tests FAIL (PYADAPT_ALLOW_NO_NATIVE=1 skips them on a
deliberately pure-Python install), as in tests/test_bottleneck_cpu.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pyadapt
from pyadapt import reference
from pyadapt.ops.fold import fold

from conftest import REL_TOL, rel_err

fold_mod = importlib.import_module("pyadapt.ops.fold")  # the module, not the function

F64 = torch.float64
DTYPES = (torch.float32, F64, torch.bfloat16, torch.float16)


pytestmark = pytest.mark.usefixtures("needs_native")


def _problem(shapes, dtypes, gen_seed=0, factor_dtype=None):
    """(out, in, k) per weight: W (out x in), L (out x k), R (k x in), scale; fresh data."""
    g = torch.Generator().manual_seed(gen_seed)
    ws, ls, rs, ss = [], [], [], []
    for (o, i, k), dt in zip(shapes, dtypes):
        fd = factor_dtype or dt
        ws.append(torch.randn(o, i, generator=g, dtype=F64).to(dt))
        ls.append((torch.randn(o, k, generator=g, dtype=F64) * max(k, 1) ** -0.5).to(fd))
        rs.append(torch.randn(k, i, generator=g, dtype=F64).to(fd))
        ss.append(float(torch.rand((), generator=g, dtype=F64)) * 2 - 1)
    return ws, ls, rs, ss


def _check(ws, ls, rs, ss):
    before = [w.clone() for w in ws]
    with pyadapt.use_backend("cpu"):
        got = fold(ws, ls, rs, ss)
    for i, (w, l_, r_, s) in enumerate(zip(ws, ls, rs, ss)):
        assert torch.equal(w, before[i]), f"weights[{i}] modified"
        exact = w.double() + s * (l_.double() @ r_.double())
        eager = reference.fold_weight(w, l_, r_, s)
        assert got[i].dtype == w.dtype and got[i].shape == w.shape, i
        assert got[i].is_contiguous()
        err = rel_err(got[i], exact)
        # One rounding of the float32 (float64) accumulator: as accurate as the reference.
        tol = max(REL_TOL[w.dtype], 2 * rel_err(eager, exact))
        assert err <= tol, f"fold {i} ({w.dtype}, {tuple(w.shape)}): {err:.3e} > {tol:.3e}"
    return got


def test_cpu_backend_registered():
    assert "cpu" in pyadapt.build_info()["ops"]["fold_weights"]
    with pyadapt.use_backend("auto"):
        assert pyadapt.ops.backend_for("fold_weights", "cpu") == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_shapes_one_call(dtype):
    shapes = [(1, 1, 1), (8, 8, 7), (100, 36, 1), (36, 100, 128), (300, 257, 16), (0, 5, 3),
              (5, 0, 3), (768, 64, 4), (65, 513, 32)]
    _check(*_problem(shapes, [dtype] * len(shapes), gen_seed=DTYPES.index(dtype)))


def test_mixed_dtypes_and_factor_dtypes():
    shapes = [(64, 48, 8), (40, 30, 3), (100, 7, 5), (9, 300, 2)]
    _check(*_problem(shapes, DTYPES, gen_seed=1))
    # factors in another dtype than the weight: converted to the accumulation dtype
    _check(*_problem(shapes[:2], [torch.bfloat16, torch.float32], gen_seed=2, factor_dtype=F64))


def test_inner_size_zero_is_a_copy():
    ws, ls, rs, ss = _problem([(20, 30, 0)], [torch.float32])
    with pyadapt.use_backend("cpu"):
        (out,) = fold(ws, ls, rs, ss)
    assert torch.equal(out, ws[0]) and out.data_ptr() != ws[0].data_ptr()


def test_strided_inputs():
    ws, ls, rs, ss = _problem([(64, 40, 6), (30, 50, 4)], [torch.float32, F64])
    ws[0] = ws[0].t().contiguous().t()
    ls[1] = torch.randn(30, 8, dtype=F64)[:, ::2]
    rs[0] = rs[0].t().contiguous().t()
    _check(ws, ls, rs, ss)


def test_scales_tensor_and_empty_call():
    ws, ls, rs, ss = _problem([(10, 12, 3), (7, 5, 2)], [torch.float32] * 2)
    with pyadapt.use_backend("cpu"):
        a = fold(ws, ls, rs, torch.tensor(ss, dtype=F64))
        b = fold(ws, ls, rs, ss)
        assert fold([], [], [], []) == []
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bit_identical_across_runs_and_threads():
    shapes = [(600, 300, 16), (300, 600, 64), (12, 9, 3)]
    prob = _problem(shapes, [torch.float32, torch.bfloat16, F64])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 1, 2, 2):
            torch.set_num_threads(threads)
            with pyadapt.use_backend("cpu"):
                results.append(fold(*prob))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_uncovered_dtype_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(fold_mod, "_CPU_DTYPES", (torch.float32, F64))

    def no_native():
        raise AssertionError("the native op ran for an uncovered dtype")

    monkeypatch.setattr(fold_mod._native, "ops", no_native)
    prob = _problem([(10, 12, 3), (7, 5, 2)], [torch.float32, torch.bfloat16])
    with pyadapt.use_backend("cpu"):
        got = fold(*prob)
    ref = [reference.fold_weight(w, l_, r_, s) for w, l_, r_, s in zip(*prob)]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_opcheck_cpu_backend():
    ws, ls, rs, ss = _problem([(10, 12, 3), (7, 5, 2)], [torch.float32, F64])
    with pyadapt.use_backend("cpu"):
        torch.library.opcheck(torch.ops.pyadapt.fold_weights.default,
                              (ws, ls, rs, torch.tensor(ss, dtype=F64)))
