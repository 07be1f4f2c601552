"""The native `cpu` backend of the R-Adapter op (csrc/cpu/radapter.cpp) against the float64
reference: forward and every gradient (dscale included) for float32/float64 and bf16/fp16
storage, full and low-rank adapters, with and without per-row scales (adapter dropping), the
folded path (y = b_k + x W_k^T, W_k = (I + c W_f) W_o) and the unfolded one, odd sizes, M = 0,
`needs` combinations, gradcheck in float64, opcheck, bit-identical results across runs and
thread counts, and the fallback to the reference.

If the native extension is missing these tests FAIL (PYADAPT_ALLOW_NO_NATIVE=1 skips them on a
deliberately pure-Python install), as in tests/test_bottleneck_cpu.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pyadapt
from pyadapt.ops.radapter import radapter

from conftest import REL_TOL, assert_close_rel, rel_err

radapter_mod = importlib.import_module("pyadapt.ops.radapter")  # the module, not the function

F64 = torch.float64
NAMES = ("x", "base_w", "base_b", "full", "down", "up")


pytestmark = pytest.mark.usefixtures("needs_native")


def _inputs(M, d_in, d_out, rank=None, *, bias=True, row_scale="drop", learn=True, gen_seed=0):
    """Fresh float64 data. rank None: full adapter. row_scale: None, "drop" ({0, 1/(1-p)} per
    row, as adapter dropping makes) or "any" (arbitrary positive factors)."""
    g = torch.Generator().manual_seed(gen_seed)

    def mk(*s, std=1.0):
        return torch.randn(*s, generator=g, dtype=F64) * std

    rs = None
    if row_scale == "drop":
        rs = (torch.rand(M, generator=g, dtype=F64) >= 0.3).to(F64) / 0.7
    elif row_scale == "any":
        rs = torch.rand(M, generator=g, dtype=F64) * 2
    return dict(
        x=mk(M, d_in), base_w=mk(d_out, d_in, std=d_in ** -0.5),
        base_b=mk(d_out, std=0.1) if bias else None,
        full=mk(d_out, d_out, std=d_out ** -0.5) if rank is None else None,
        down=mk(rank, d_out, std=d_out ** -0.5) if rank is not None else None,
        up=mk(d_out, rank, std=rank ** -0.5) if rank is not None else None,
        row_scale=rs, scale=torch.tensor(0.6, dtype=F64) if learn else 0.6, grad_y=mk(M, d_out))


def _run(ins, dtype, backend, *, grads=NAMES + ("scale",)):
    leaves = {k: (None if ins[k] is None
                  else ins[k].detach().to(dtype).clone().requires_grad_(k in grads))
              for k in NAMES}
    scale = ins["scale"]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(dtype).clone().requires_grad_("scale" in grads)
    rs = None if ins["row_scale"] is None else ins["row_scale"].to(dtype)
    with pyadapt.use_backend(backend):
        y = radapter(leaves["x"], leaves["base_w"], leaves["base_b"], full_weight=leaves["full"],
                     down_weight=leaves["down"], up_weight=leaves["up"], scale=scale,
                     row_scale=rs)
        if y.requires_grad:
            y.backward(ins["grad_y"].to(dtype))
    out = {"y": y.detach()}
    for k, t in leaves.items():
        if t is not None and t.requires_grad:
            out["d_" + k] = t.grad
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        out["d_scale"] = scale.grad
    return out


def _rounded(ins, dtype):
    return {k: (v.to(dtype).to(F64) if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}


def _compare(ins, dtype=torch.float32, **kw):
    """As tests/test_lowrank_cpu.py: REL_TOL[dtype] against float64, or within 2x the error of
    the eager reference in `dtype`. The float64 reference runs on the inputs rounded to `dtype`:
    dscale is one sum of d_out^2 (or M d_out) cancelling terms, so the inputs' own rounding would
    otherwise be amplified into an error no kernel can avoid (and the test would measure it)."""
    got = _run(ins, dtype, "cpu", **kw)
    ref = _run(_rounded(ins, dtype), F64, "reference", **kw)
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
    for op in ("radapter_forward", "radapter_backward"):
        assert "cpu" in info["ops"][op]
        with pyadapt.use_backend("auto"):
            assert pyadapt.ops.backend_for(op, "cpu") == "cpu"


# M >= d_in folds (without row_scale); M < d_in does not.
@pytest.mark.parametrize("M", [0, 1, 65, 300])
@pytest.mark.parametrize("d_in,d_out", [(8, 8), (100, 36), (72, 130)])
@pytest.mark.parametrize("rank", [None, 1, 7, 128])
def test_shapes_fp32(M, d_in, d_out, rank):
    seed = M * 7919 + d_in * 31 + (rank or 0)
    _compare(_inputs(M, d_in, d_out, rank, row_scale=None, gen_seed=seed))
    _compare(_inputs(M, d_in, d_out, rank, row_scale="drop", bias=False, gen_seed=seed + 1))


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("row_scale", [None, "drop", "any"])
@pytest.mark.parametrize("learn", [True, False])
def test_options(dtype, rank, row_scale, learn):
    for M, bias in ((40, True), (200, False)):
        _compare(_inputs(M, 64, 48, rank, bias=bias, row_scale=row_scale, learn=learn,
                         gen_seed=M), dtype)


@pytest.mark.parametrize("grads", [
    ("full", "down", "up", "scale"),     # RAdapter training: the base is frozen
    ("full", "down", "up"),
    ("x",),
    ("x", "scale"),
    ("base_w", "base_b"),
    ("down",),
    ("up",),
    ("scale",),
    NAMES + ("scale",),
])
@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("row_scale", [None, "drop"])
def test_needs_combinations(grads, rank, row_scale):
    for M in (20, 120):   # unfolded, folded (when no row_scale)
        ins = _inputs(M, 48, 40, rank, row_scale=row_scale, gen_seed=M)
        got = _compare(ins, grads=grads)
        present = {k for k in NAMES if ins[k] is not None} | {"scale"}
        assert set(got) == {"y"} | {"d_" + k for k in grads if k in present}


def test_all_rows_dropped_is_the_base():
    ins = _inputs(50, 24, 20, 3)
    ins["row_scale"] = torch.zeros(50, dtype=F64)
    got = _run(ins, F64, "cpu")
    z = ins["x"] @ ins["base_w"].T + ins["base_b"]
    torch.testing.assert_close(got["y"], z, rtol=1e-13, atol=1e-13)
    assert torch.count_nonzero(got["d_down"]) == 0 and torch.count_nonzero(got["d_up"]) == 0
    assert float(got["d_scale"]) == 0.0


def test_strided_inputs():
    ins = _inputs(200, 48, 40, None, row_scale="any")
    ins["x"] = ins["x"].t().contiguous().t()
    ins["full"] = ins["full"].t().contiguous().t()
    ins["row_scale"] = torch.rand(400, dtype=F64)[::2]
    _compare(ins)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("row_scale", [None, "any"])
@pytest.mark.parametrize("M", [3, 12])   # unfolded, folded (without row_scale)
def test_gradcheck_float64(rank, row_scale, M):
    ins = _inputs(M, 5, 4, rank, row_scale=row_scale)
    names = [k for k in NAMES if ins[k] is not None]
    tensors = tuple(ins[k].clone().requires_grad_(True) for k in names) + (
        ins["scale"].clone().requires_grad_(True),)

    def f(*ts):
        kw = dict(zip(names + ["scale"], ts))
        with pyadapt.use_backend("cpu"):
            return radapter(kw["x"], kw["base_w"], kw["base_b"], full_weight=kw.get("full"),
                            down_weight=kw.get("down"), up_weight=kw.get("up"),
                            scale=kw["scale"], row_scale=ins["row_scale"])

    assert torch.autograd.gradcheck(f, tensors)


def test_bit_identical_across_runs_and_threads():
    """Several row and column tiles (M = 600, d_out = 300); folded and row-scaled."""
    cases = [_inputs(600, 96, 300, None, row_scale=None), _inputs(600, 96, 300, 16),
             _inputs(600, 96, 300, None, row_scale="drop")]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 1, 2, 2):
            torch.set_num_threads(threads)
            results.append([_run(ins, dt, "cpu") for ins in cases
                            for dt in (torch.float32, torch.bfloat16)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for name in a:
                assert torch.equal(a[name], b[name]), f"{name} not bit-identical"


def test_uncovered_dtype_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(radapter_mod, "_CPU_DTYPES", (torch.float32, F64))

    def no_native():
        raise AssertionError("the native op ran for an uncovered dtype")

    monkeypatch.setattr(radapter_mod._native, "ops", no_native)
    ins = _inputs(9, 16, 12, 3)
    got = _run(ins, torch.bfloat16, "cpu")
    ref = _run(ins, torch.bfloat16, "reference")
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("rank,row_scale,learn", [(None, "drop", True), (3, None, False),
                                                  (3, "any", True)])
def test_opcheck_cpu_backend(rank, row_scale, learn):
    ins = _inputs(12, 10, 9, rank, row_scale=row_scale, learn=learn)
    t = {k: (None if ins[k] is None else ins[k].float().requires_grad_(True)) for k in NAMES}
    scale = ins["scale"].float().requires_grad_(True) if learn else None
    rs = None if ins["row_scale"] is None else ins["row_scale"].float()
    args = [t[k] for k in NAMES] + [scale, 1.0 if learn else 0.6, rs]
    with pyadapt.use_backend("cpu"):
        torch.library.opcheck(torch.ops.pyadapt.radapter_forward.default, args)
        needs = [True, False, True, rank is None, rank is not None, rank is not None, learn]
        bwd = [ins["grad_y"].float()] + [a.detach() if isinstance(a, torch.Tensor) else a
                                         for a in args]
        torch.library.opcheck(torch.ops.pyadapt.radapter_backward.default, bwd + [needs])


# ----------------------------------------------------------------------------------------------
# The saving forward (full rank): eager training on the cpu backend keeps z and q, and the
# backward neither recomputes z nor forms g^T z in float64
# ----------------------------------------------------------------------------------------------

def _spy(monkeypatch):
    calls = {"plain": 0, "saving": 0}
    for name, key in (("radapter_forward", "plain"), ("radapter_forward_saving", "saving")):
        fn = getattr(radapter_mod, name)

        def run(*a, _fn=fn, _key=key):
            calls[_key] += 1
            return _fn(*a)
        monkeypatch.setattr(radapter_mod, name, run)
    return calls


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("row_scale", [None, "drop"])
def test_training_takes_the_saving_forward_for_the_full_form(monkeypatch, rank, row_scale):
    ins = _inputs(90, 40, 36, rank, row_scale=row_scale)
    calls = _spy(monkeypatch)
    got = _compare(ins)   # one cpu run, then two reference runs (plain: not the cpu backend)
    want = {"plain": 2, "saving": 1} if rank is None else {"plain": 3, "saving": 0}
    assert calls == want, f"training forwards: {calls}"
    # the same maths through the plain op (its backward recomputes z): the same numbers
    monkeypatch.undo()
    monkeypatch.setattr(radapter_mod, "_trains_on_cpu_backend", lambda x, args: False)
    plain = _run(ins, torch.float32, "cpu")
    for k in got:
        assert_close_rel(got[k].double(), plain[k].double(), torch.float32, f"{k}: saved path")


def test_saving_forward_answers_on_every_backend():
    ins = _inputs(33, 24, 20, None)
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    args = (f["x"], f["base_w"], f["base_b"], f["full"], None, None, None, 0.6, f["row_scale"])
    z_ref = f["x"].double() @ f["base_w"].double().T + f["base_b"].double()
    q_ref = z_ref @ f["full"].double().T
    for backend in pyadapt.available_backends():
        with pyadapt.use_backend(backend):
            y, z, q = torch.ops.pyadapt.radapter_forward_saving(*args)
            y_plain = torch.ops.pyadapt.radapter_forward(*args)
        assert_close_rel(y.double(), y_plain.double(), torch.float32, f"{backend}: y")
        assert_close_rel(z.double(), z_ref, torch.float32, f"{backend}: z")
        # q on the rows whose adapter is kept; a dropped row's q is never read by the backward
        # (the cpu kernel skips it and leaves zeros)
        kept = f["row_scale"] != 0
        assert 0 < int(kept.sum()) < kept.numel(), "the inputs drop some rows and keep others"
        assert_close_rel(q[kept].double(), q_ref[kept], torch.float32, f"{backend}: q kept")
        if backend == "cpu":
            assert (q[~kept] == 0).all(), "cpu: dropped rows' q is not computed (zeros)"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_saving_forward(backend):
    ins = _inputs(12, 10, 8, None)
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    full = f["full"].requires_grad_(True)
    scale = f["scale"].requires_grad_(True)
    args = (f["x"], f["base_w"], f["base_b"], full, None, None, scale, 1.0, f["row_scale"])
    with pyadapt.use_backend(backend):
        torch.library.opcheck(torch.ops.pyadapt.radapter_forward_saving.default, args)


def test_backward_checks_the_saved_tensors():
    ins = _inputs(10, 8, 6, None)
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    with pytest.raises(RuntimeError, match="saved_z and saved_q"):
        torch.ops.pyadapt_C.radapter_backward(
            f["grad_y"], f["x"], f["base_w"], f["base_b"], f["full"], None, None, 0.6, None,
            [True] * 7, torch.zeros(10, 5), torch.zeros(10, 6))


def test_backward_reads_the_saved_tensors():
    """The native backward uses the z and q it is given (so the saving path really skips the
    recompute): true ones give the recompute's gradients, an altered q changes dscale and an
    altered z changes dW_f."""
    ins = _inputs(40, 16, 12, None, row_scale=None)
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    fwd = (f["x"], f["base_w"], f["base_b"], f["full"], None, None, 0.6, None)
    _, z, q = torch.ops.pyadapt_C.radapter_forward_saving(*fwd)
    bwd = (f["grad_y"], f["x"], f["base_w"], f["base_b"], f["full"], None, None, 0.6, None,
           [True] * 7)
    recomputed = torch.ops.pyadapt_C.radapter_backward(*bwd)
    saved = torch.ops.pyadapt_C.radapter_backward(*bwd, z, q)
    for i, (a, b) in enumerate(zip(recomputed, saved)):
        if a.numel():
            assert_close_rel(b.double(), a.double(), torch.float32, f"gradient {i}")
    assert not torch.equal(torch.ops.pyadapt_C.radapter_backward(*bwd, z, q + 1)[6], saved[6])
    assert not torch.equal(torch.ops.pyadapt_C.radapter_backward(*bwd, z + 1, q)[3], saved[3])
