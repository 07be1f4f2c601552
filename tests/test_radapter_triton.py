"""Triton backend of the R-Adapter op (kernels/radapter.py) against the float64 reference.

    y = z + c * r * q,  z = x W_o^T + b_o,  q = z W_f^T (full rank) or (z W_d^T) W_u^T (low rank)

gradients [dx, dW_o, db_o, dW_f, dW_d, dW_u, dscale]. The backend folds before the GEMM:
W_k = W_o + k c W_f W_o (one rounding to the weight dtype) and mixes it with W_o per row by
lambda = r / k, so its rounding differs from eager's (which rounds z and q instead).

Tolerances (conftest.REL_TOL, relative Frobenius error against float64 on the same rounded
inputs): float64 1e-12, float32 1e-5, bf16/fp16 2e-2. Justification for the fold: rounding W_k
once perturbs each weight by at most u |W_k| (u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32), so y moves
by at most u |x| |W_k| per element: the same order as eager's own roundings of z, q and y; the
accumulation is fp32 (fp64 for fp64) in every product. For bf16/fp16 we additionally require the
error to stay within 3x the error of eager PyTorch in the same dtype (eager rounds z, q, y: three
roundings; the fold path rounds W_k, y and the fp32 intermediates of the backward). dscale is a
scalar sum of M * out terms of both signs: its error is bounded relative to sum |r g q| (the
condition of the sum), not to |dscale|.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py) at small shapes. GPU tests
(@pytest.mark.gpu) FAIL without CUDA; the default `-m 'not gpu'` deselects them.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from torch import nn

from conftest import require_triton  # before the kernels: fails or skips first

triton = require_triton()

import pyadapt  # noqa: E402
from pyadapt.kernels import radapter as K  # noqa: E402

from conftest import REL_TOL, assert_close_rel, rel_err  # noqa: E402

OPS = importlib.import_module("pyadapt.ops.radapter")
F64 = torch.float64
Tensor = torch.Tensor
GRAD_NAMES = ("dx", "dW_o", "db_o", "dW_f", "dW_d", "dW_u", "dscale")
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
        torch.float16: 2.0**-11}


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype = F64
    m: int = 65
    d_in: int = 100
    d_out: int = 40
    rank: object = None         # None: full rank (W_f out x out)
    bias: bool = True
    rows: str = "none"          # none | mask ({0, 1/(1-p)}) | arbitrary
    learn: bool = False         # learnable 0-dim scale tensor, else a float
    needs: tuple = (True,) * 7


def make_inputs(c: Case, device="cpu") -> dict:
    def rnd(*s, std=1.0):
        return (torch.randn(*s, dtype=F64) * std).to(c.dtype).to(device)

    d_in, d_out = c.d_in, c.d_out
    a = {"x": rnd(c.m, d_in), "base_weight": rnd(d_out, d_in, std=d_in ** -0.5),
         "base_bias": rnd(d_out) if c.bias else None, "full_weight": None, "down_weight": None,
         "up_weight": None}
    if c.rank is None:
        a["full_weight"] = rnd(d_out, d_out, std=d_out ** -0.5)
    else:
        a["down_weight"] = rnd(c.rank, d_out, std=d_out ** -0.5)
        a["up_weight"] = rnd(d_out, c.rank, std=c.rank ** -0.5)
    a["scale"] = torch.tensor(0.37, dtype=c.dtype, device=device) if c.learn else None
    a["scale_value"] = 1.0 if c.learn else 0.37
    if c.rows == "none":
        a["row_scale"] = None
    elif c.rows == "mask":
        p = 0.25
        a["row_scale"] = ((torch.rand(c.m) >= p).to(torch.float32) / (1 - p)).to(device)
    else:
        a["row_scale"] = torch.randn(c.m, dtype=torch.float32).to(device)
    return a


def _f64(a: dict) -> dict:
    return {k: (v.to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in a.items()}


def _dscale_bound(a: dict, g: Tensor, dtype) -> float:
    """sum |r g q| in float64: the condition of the dscale sum."""
    a = _f64(a)
    z = torch.nn.functional.linear(a["x"], a["base_weight"], a["base_bias"])
    q = (z @ a["full_weight"].T if a["full_weight"] is not None
         else (z @ a["down_weight"].T) @ a["up_weight"].T)
    r = a["row_scale"][:, None] if a["row_scale"] is not None else 1.0
    return float((r * g.to(F64) * q).abs().sum())



def run_and_compare(c: Case, device="cpu", baseline=True) -> None:
    a = make_inputs(c, device)
    g = torch.randn(c.m, c.d_out, dtype=F64).to(c.dtype).to(device)
    y = K.forward(**a)
    want = OPS._reference_forward(**_f64(a))
    base = OPS._reference_forward(**a) if baseline else None
    assert_close_rel(y, want, c.dtype, f"y {c}")
    if base is not None and c.dtype in (torch.bfloat16, torch.float16) and c.m:
        assert rel_err(y, want) <= 3 * rel_err(base, want) + 1e-6, f"y vs 3x eager {c}"
    needs = list(c.needs)
    got = K.backward(g, **a, needs=needs)
    ref = OPS._reference_backward(g.to(F64), **_f64(a), needs=needs)
    eager = OPS._reference_backward(g, **a, needs=needs) if baseline else [None] * 7
    inputs = [a["x"], a["base_weight"], a["base_bias"], a["full_weight"], a["down_weight"],
              a["up_weight"], a["scale"]]
    for i, (name, out, want_i, base_i) in enumerate(zip(GRAD_NAMES, got, ref, eager)):
        present = inputs[i] is not None and needs[i]
        if not present:
            assert out.numel() == 0, f"{name}: expected an empty placeholder"
            continue
        assert out.dtype == inputs[i].dtype and out.shape == inputs[i].shape, name
        assert out.is_contiguous(), f"{name} not contiguous"
        if name == "dscale":
            assert torch.isfinite(out.double()).all(), "dscale not finite"
            bound = _dscale_bound(a, g, c.dtype) * max(REL_TOL[c.dtype], 64 * UNIT[c.dtype])
            err = abs(float(out) - float(want_i))
            assert err <= bound + 1e-300, f"dscale error {err:.3e} > {bound:.3e} ({c})"
            continue
        assert_close_rel(out, want_i, c.dtype, f"{name} {c}")
        if (base_i is not None and c.dtype in (torch.bfloat16, torch.float16)
                and want_i.norm() > 0):
            assert rel_err(out, want_i) <= 3 * rel_err(base_i, want_i) + 1e-6, (
                f"{name}: more than 3x eager {c.dtype} error ({c})")


# ----------------------------------------------------------------------------------------------
# Forward and every gradient against float64
# ----------------------------------------------------------------------------------------------

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MATRIX = [Case(dtype=d, rank=rk, rows=rows, learn=learn)
          for d in DTYPES for rk in (None, 7) for rows in ("none", "mask", "arbitrary")
          for learn in (False, True)]
EDGES = [
    Case(m=0), Case(m=0, rank=7, rows="mask", learn=True),
    Case(m=1, rows="mask"), Case(m=1, rank=1, learn=True),
    Case(m=130, d_in=24, d_out=24, rows="mask", learn=True),
    Case(m=130, d_in=24, d_out=24, rank=32, rows="arbitrary"),
    Case(d_in=24, d_out=24, rank=1, bias=False, rows="mask", learn=True),
    Case(bias=False, rows="arbitrary", learn=True),
    Case(dtype=torch.bfloat16, m=130, rank=32, bias=False, rows="mask"),
    Case(dtype=torch.float32, m=130, d_in=24, d_out=24, bias=False, learn=True),
    Case(dtype=torch.float16, m=1, rank=1, rows="arbitrary"),
    Case(needs=(False, True, True, False, False, False, False), learn=True),
    Case(rank=7, needs=(True, False, False, False, True, False, True), learn=True,
         rows="mask"),
    Case(rank=7, needs=(False, False, False, False, False, True, False)),
]


@pytest.mark.parametrize("case", MATRIX + EDGES, ids=str)
def test_forward_and_every_gradient_match_the_float64_reference(case):
    run_and_compare(case)


def test_row_scale_all_dropped_all_kept_equal_the_plain_paths():
    """lambda all 0: y = x W_o^T + b_o; all 1/(1-p): the reference with that scale."""
    c = Case(m=70, rows="mask")
    a = make_inputs(c)
    a["row_scale"] = torch.zeros(c.m)
    assert_close_rel(K.forward(**a), OPS._reference_forward(**a), F64, "all dropped")
    a["row_scale"] = torch.full((c.m,), 4.0 / 3.0)
    assert_close_rel(K.forward(**a), OPS._reference_forward(**a), F64, "all kept")


def test_row_strided_x_is_read_in_place_bit_identically():
    c = Case(dtype=torch.float32, rank=7, rows="mask", learn=True)
    a = make_inputs(c)
    big = torch.randn(c.m, 2 * c.d_in + 3)
    big[:, 5:5 + c.d_in] = a["x"]
    strided = big[:, 5:5 + c.d_in]
    assert strided.stride() == (2 * c.d_in + 3, 1)
    g = torch.randn(c.m, c.d_out)
    g_big = torch.randn(2 * c.m, c.d_out)
    g_big[::2] = g
    y0 = K.forward(**a)
    grads0 = K.backward(g, **a, needs=[True] * 7)
    a["x"] = strided
    assert torch.equal(K.forward(**a), y0), "row-strided x changes y"
    for name, u, v in zip(GRAD_NAMES, K.backward(g_big[::2], **a, needs=[True] * 7), grads0):
        assert torch.equal(u, v), f"row-strided x / grad_y changes {name}"


def test_every_dot_tile_dimension_is_at_least_16(dot_tile_shapes):
    """The GPU compiler rejects tl.dot tiles below 16: M = 1, 8 -> 8, rank 1 must still give
    16-wide operands (masks pad every block)."""
    shapes = dot_tile_shapes(K)
    run_and_compare(Case(m=1, d_in=8, d_out=8, rank=1, rows="mask", learn=True))
    run_and_compare(Case(m=1, d_in=8, d_out=8, rows="arbitrary"))
    assert shapes, "no tl.dot was traced"
    small = [s for s in shapes if min(s[0] + s[1]) < 16]
    assert not small, f"tl.dot operand tiles below 16: {sorted(set(small))}"
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert min(K._blocks(dtype)[:3]) >= 16


def test_mixed_batch_homogeneous_row_tiles_do_one_gemm(dot_tile_shapes):
    """Per-sample dropping keeps a sample's rows contiguous: a row tile whose rows are all kept
    (or all dropped) does ONE product per K step; only mixed tiles do two. Interpreter blocks are
    64 x 64 x 64: M = 128, 100 -> 40 is 2 row tiles x 1 column tile x 2 K steps."""
    assert K._blocks(torch.float64)[:3] == (64, 64, 64)
    c = Case(m=128, rows="mask", learn=True)
    a = make_inputs(c)
    shapes = dot_tile_shapes(K)
    a["row_scale"] = torch.cat([torch.full((64,), 4.0 / 3.0), torch.zeros(64)])
    assert_close_rel(K.forward(**a), OPS._reference_forward(**_f64(a)), F64, "homogeneous tiles")
    assert len(shapes) == 4, f"homogeneous tiles: {len(shapes)} dots, expected 4"
    shapes.clear()
    a["row_scale"] = torch.tensor([4.0 / 3.0, 0.0]).repeat(64)
    assert_close_rel(K.forward(**a), OPS._reference_forward(**_f64(a)), F64, "mixed tiles")
    assert len(shapes) == 8, f"mixed tiles: {len(shapes)} dots, expected 8"
    shapes.clear()
    a["row_scale"] = None
    assert_close_rel(K.forward(**a), OPS._reference_forward(**_f64(a)), F64, "no row_scale")
    assert len(shapes) == 4, f"no row_scale: {len(shapes)} dots, expected 4"


# ----------------------------------------------------------------------------------------------
# Determinism, poisoned outputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [None, 7])
def test_gradients_are_bit_identical_across_two_runs(rank):
    c = Case(dtype=torch.float32, m=130, rank=rank, rows="mask", learn=True)
    a = make_inputs(c)
    g = torch.randn(c.m, c.d_out)
    first = [K.forward(**a)] + K.backward(g, **a, needs=[True] * 7)
    second = [K.forward(**a)] + K.backward(g, **a, needs=[True] * 7)
    for name, u, v in zip(("y",) + GRAD_NAMES, first, second):
        assert torch.equal(u, v), f"{name}: two runs differ"


@pytest.mark.parametrize("case", [Case(rows="mask", learn=True),
                                  Case(rank=7, rows="arbitrary", learn=True),
                                  Case(dtype=torch.bfloat16, rank=1, m=130, rows="none")],
                         ids=str)
def test_poisoned_outputs_every_element_is_written(case, poison_allocations):
    allocated = poison_allocations(K)
    run_and_compare(case, baseline=False)
    assert len(allocated) >= 8, "the launchers did not allocate through _new"


def test_cpu_without_the_interpreter_falls_back_to_the_reference(monkeypatch, forbid_launches):
    monkeypatch.setattr(K, "_INTERPRET", False)
    monkeypatch.setattr(K, "_runs_here", lambda t: t.is_cuda)
    forbid_launches(K, "_mix_gemm_kernel")
    forbid_launches(K._fold, "_fold_kernel")
    for rank in (None, 7):
        c = Case(dtype=torch.float32, rank=rank, rows="mask", learn=True)
        a = make_inputs(c)
        g = torch.randn(c.m, c.d_out)
        assert torch.equal(K.forward(**a), OPS._reference_forward(**a))
        for name, u, v in zip(GRAD_NAMES, K.backward(g, **a, needs=[True] * 7),
                              OPS._reference_backward(g, **a, needs=[True] * 7)):
            assert torch.equal(u, v), f"fallback {name} differs from the reference"


def test_launchers_refuse_inconsistent_shapes_by_name():
    a = make_inputs(Case(rank=7))
    a["up_weight"] = a["up_weight"][:, :3]
    with pytest.raises(ValueError, match="up_weight"):
        K.forward(**a)
    a = make_inputs(Case(rows="mask"))
    a["row_scale"] = a["row_scale"][:-1]
    with pytest.raises(ValueError, match="row_scale"):
        K.forward(**a)


# ----------------------------------------------------------------------------------------------
# Through the custom op and the module
# ----------------------------------------------------------------------------------------------

def test_triton_backend_is_registered_and_available_under_the_interpreter():
    table = pyadapt.ops.kernel_table()
    assert "triton" in table["radapter_forward"] and "triton" in table["radapter_backward"]
    with pyadapt.use_backend("triton"):
        assert pyadapt.ops.backend_for("radapter_forward", "cpu") == "triton"


@pytest.mark.parametrize("variant", ["full-bias-mask-learn", "low-nobias-arbitrary-learn",
                                     "low-bias-none-float"])
def test_gradcheck_float64_through_the_op_with_the_triton_backend(variant):
    torch.manual_seed(7)
    m, d_in, d_out, r = 6, 5, 4, 2

    def leaf(*s, std=1.0):
        return (torch.randn(s, dtype=F64) * std).requires_grad_()

    x, w = leaf(m, d_in), leaf(d_out, d_in, std=0.5)
    b = leaf(d_out) if "-bias" in variant else None
    if variant.startswith("full"):
        fw, dw, uw = leaf(d_out, d_out, std=0.5), None, None
    else:
        fw, dw, uw = None, leaf(r, d_out, std=0.5), leaf(d_out, r, std=0.5)
    s = leaf(std=0.5) if variant.endswith("learn") else None
    rows = variant.split("-")[2]
    rs = {"none": None, "mask": torch.tensor([0.0, 2, 2, 0, 2, 2], dtype=F64),
          "arbitrary": torch.randn(m, dtype=F64)}[rows]
    given = [t for t in (x, w, b, fw, dw, uw, s) if t is not None]

    def fn(*ts):
        it = iter(ts)
        x_, w_, b_, f_, d_, u_, s_ = [next(it) if t is not None else None
                                      for t in (x, w, b, fw, dw, uw, s)]
        return pyadapt.ops.radapter(x_, w_, b_, full_weight=f_, down_weight=d_, up_weight=u_,
                                    scale=s_ if s_ is not None else -0.6, row_scale=rs)

    with pyadapt.use_backend("triton"):
        assert torch.autograd.gradcheck(fn, tuple(given), eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True), f"gradcheck failed ({variant})"


@pytest.mark.parametrize("rank", [None, 7])
def test_opcheck_with_the_triton_backend(rank):
    c = Case(m=9, d_in=12, d_out=10, rank=rank, rows="mask", learn=True)
    a = make_inputs(c)
    leaves = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor)
                  and v.is_floating_point() and k != "row_scale" else v) for k, v in a.items()}
    with pyadapt.use_backend("triton"):
        torch.library.opcheck(torch.ops.pyadapt.radapter_forward.default, tuple(leaves.values()))
        g = torch.randn(c.m, c.d_out, dtype=F64)
        torch.library.opcheck(torch.ops.pyadapt.radapter_backward.default,
                              (g, *a.values(), [True, False, True, True, True, True, True]))


def _module_results(module, x, g, backend):
    module.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(1234)      # the same adapter-dropping draw for both backends
    with pyadapt.use_backend(backend):
        y = module(x)
        (y * g).sum().backward()
    return [y.detach(), x.grad.clone()] + [
        p.grad.clone() for p in module.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("rank", [None, 7])
@pytest.mark.parametrize("learn_scale", [True, False])
def test_radapter_module_training_step_triton_equals_reference_backend(rank, learn_scale):
    """RAdapter (frozen base) in training with per-sample adapter dropping: y, dx and every
    adapter gradient (and one SGD step) equal the reference backend's."""
    base = nn.Linear(24, 20, dtype=F64)
    mod = pyadapt.RAdapter(base, rank=rank, scale=0.37, learn_scale=learn_scale, drop_prob=0.3,
                           drop_granularity="sample")
    with torch.no_grad():
        for p in mod.parameters():
            if p.requires_grad and p.dim() > 0:
                p.normal_(std=0.3)
    mod.train()
    x = torch.randn(4, 9, 24, dtype=F64, requires_grad=True)
    g = torch.randn(4, 9, 20, dtype=F64)
    tri, ref = (_module_results(mod, x, g, b) for b in ("triton", "reference"))
    n_params = sum(1 for p in mod.parameters() if p.requires_grad)
    assert len(tri) == len(ref) == 2 + n_params
    for i, (out, want) in enumerate(zip(tri, ref)):
        assert_close_rel(out, want, F64, f"RAdapter result {i} (triton vs reference)")
    # one SGD step from each backend's gradients lands on the same weights
    params = [p for p in mod.parameters() if p.requires_grad]
    for p, gt, gr in zip(params, tri[2:], ref[2:]):
        assert_close_rel(p.detach() - 0.1 * gt, p.detach() - 0.1 * gr, F64, "SGD step")


# ----------------------------------------------------------------------------------------------
# GPU: ViT-B/16 shapes, compiled kernels
# ----------------------------------------------------------------------------------------------

def _require_gpu():
    if not torch.cuda.is_available():
        pytest.fail("GPU test without a CUDA device: deselect with -m 'not gpu'")
    if K._INTERPRET:
        pytest.fail("GPU tests need compiled kernels: run with TRITON_INTERPRET=0")


GPU_SHAPES = [pytest.param((768, 768), id="768-768"), pytest.param((3072, 768), id="3072-768")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [None, 16])
@pytest.mark.parametrize("rows", ["none", "mask"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_vit_shapes_match_reference(shape, rows, rank, dtype):
    """x: 128 * 197 tokens (ViT-B/16 at batch 128)."""
    _require_gpu()
    d_in, d_out = shape
    run_and_compare(Case(dtype=dtype, m=128 * 197, d_in=d_in, d_out=d_out, rank=rank, rows=rows,
                         learn=True), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_gradients_bit_identical_and_every_element_written(shape, monkeypatch):
    _require_gpu()
    d_in, d_out = shape
    c = Case(dtype=torch.bfloat16, m=128 * 197, d_in=d_in, d_out=d_out, rows="mask", learn=True)
    a = make_inputs(c, device="cuda")
    g = torch.randn(c.m, c.d_out, device="cuda", dtype=torch.bfloat16)
    first = K.backward(g, **a, needs=[True] * 7)
    second = K.backward(g, **a, needs=[True] * 7)
    for name, u, v in zip(GRAD_NAMES, first, second):
        assert torch.equal(u, v), f"{name}: two runs differ on the GPU"
    monkeypatch.setattr(K, "_new", lambda t: t.fill_(float("nan")))
    run_and_compare(c, device="cuda", baseline=False)
