"""The native `cpu` backend of the bottleneck op (csrc/cpu/bottleneck.cpp) against the float64
reference: forward and every gradient in float32, float64, bfloat16 and float16 storage (the last
two computed in float32 and rounded once), NaN-poisoned outputs and scratch, dropout masks
bit-equal to the reference's Philox, gradcheck in float64, bit-identical weight gradients across
runs and thread counts, opcheck.

The extension is built by `pip install --no-build-isolation -e .` (CI: `make install`). If it is
missing these tests FAIL, so a broken native build cannot pass CI unnoticed; on a machine
deliberately installed without a compiler set PYADAPT_ALLOW_NO_NATIVE=1 to skip them instead.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pyadapt
from pyadapt import reference
from pyadapt.ops.bottleneck import bottleneck

from conftest import REL_TOL, assert_close_rel, rel_err

F64 = torch.float64
ACTS = reference.ACTIVATIONS


pytestmark = pytest.mark.usefixtures("needs_native")


def _inputs(M, d, r, *, shared=True, bias=True, residual=True, row_scale=True, learn=True,
            gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)

    def mk(*s, std=1.0):
        return torch.randn(*s, generator=g, dtype=F64) * std

    return dict(
        x=mk(M, d), down_w=mk(r, d, std=d ** -0.5), down_b=mk(r, std=0.1) if bias else None,
        shared_w=mk(r, r, std=r ** -0.5) if shared else None,
        shared_b=mk(r, std=0.1) if (shared and bias) else None,
        up_w=mk(d, r, std=r ** -0.5), up_b=mk(d, std=0.1) if bias else None,
        residual=mk(M, d) if residual else None,
        row_scale=torch.rand(M, generator=g, dtype=F64) * 2 if row_scale else None,
        scale=torch.tensor(0.7, dtype=F64) if learn else 0.7,
        grad_y=mk(M, d))


_PARAMS = ("x", "down_w", "down_b", "shared_w", "shared_b", "up_w", "up_b")


def _run(ins, dtype, backend, *, act="relu", dropout_p=0.0, gsi=False, seed=1234):
    """y and the gradients of every present input (scale last when learnable)."""
    leaves = {k: (None if ins[k] is None else ins[k].detach().to(dtype).clone().requires_grad_(True))
              for k in _PARAMS}
    scale = ins["scale"]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(dtype).clone().requires_grad_(True)
    residual = (None if ins["residual"] is None
                else ins["residual"].detach().to(dtype).clone().requires_grad_(True))
    rs = None if ins["row_scale"] is None else ins["row_scale"].to(dtype)
    with pyadapt.use_backend(backend):
        y = bottleneck(leaves["x"], leaves["down_w"], leaves["down_b"], leaves["up_w"],
                       leaves["up_b"], leaves["shared_w"], leaves["shared_b"], residual=residual,
                       scale=scale, activation=act, dropout_p=dropout_p,
                       seed=torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None,
                       row_scale=rs, grad_scale_invariant=gsi)
        y.backward(ins["grad_y"].to(dtype))
    out = {"y": y.detach()}
    for k, t in leaves.items():
        if t is not None:
            out["d_" + k] = t.grad
    if residual is not None:
        out["d_residual"] = residual.grad
    if isinstance(scale, torch.Tensor):
        out["d_scale"] = scale.grad
    return out


def _dot_within_bound(got, ref, ins, y_ref, dtype, gsi):
    """d_scale is one dot product, sum(g * row_scale * u) over all M x d elements, and it can
    cancel to far below its terms (M = 1 especially): then its relative error only measures the
    luck of rounding, whoever computes it. Its error is judged like a dot product's, against the
    sum of the magnitudes of its terms, |g * (y - residual)| / |scale| (y - residual = scale *
    row_scale * u, from the float64 reference)."""
    scale = abs(float(ins["scale"]))
    res = ins["x"] if ins["residual"] is None else ins["residual"]
    terms = (ins["grad_y"] * (y_ref - res)).abs().sum().item() / scale
    if gsi:
        terms /= scale
    return abs(got.double().item() - ref.item()) <= REL_TOL[dtype] * terms


def _compare(ins, dtype=torch.float32, **kw):
    """Relative error against float64 within REL_TOL[dtype], or (DESIGN.md section 5, the
    flash-attention rule) within 2x the error of the eager reference computed in `dtype`: a
    gradient that is a short sum with cancellation (a bias gradient at r = 1) can miss 1e-5 in
    float32 whoever computes it."""
    got = _run(ins, dtype, "cpu", **kw)
    ref = _run(ins, F64, "reference", **kw)
    eager = _run(ins, dtype, "reference", **kw) if dtype != F64 else None
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype}"
        if name == "d_scale" and _dot_within_bound(got[name], ref[name], ins, ref["y"], dtype,
                                                   kw.get("gsi", False)):
            continue
        if eager is not None and rel_err(got[name], ref[name]) > REL_TOL[dtype]:
            err, base = rel_err(got[name], ref[name]), rel_err(eager[name], ref[name])
            assert err <= 2 * base, (f"cpu {name}: relative error {err:.3e} > {REL_TOL[dtype]:.0e} "
                                     f"and > 2x eager {dtype} error {base:.3e}")
        else:
            assert_close_rel(got[name], ref[name], dtype, f"cpu {name}")


def test_cpu_backend_registered():
    info = pyadapt.build_info()
    assert info["native_extension"] is True
    assert "cpu" in info["backends"]
    assert "cpu" in info["ops"]["bottleneck_forward"]
    assert "cpu" in info["ops"]["bottleneck_backward"]
    assert pyadapt.ops.backend_for("bottleneck_forward", "cpu") in ("cpu", "reference")
    with pyadapt.use_backend("auto"):
        assert pyadapt.ops.backend_for("bottleneck_forward", "cpu") == "cpu"


@pytest.mark.parametrize("M", [0, 1, 63, 64, 65, 1000])
@pytest.mark.parametrize("d", [8, 100, 768])
@pytest.mark.parametrize("r", [1, 7, 32, 128])
def test_shapes_fp32(M, d, r):
    _compare(_inputs(M, d, r, gen_seed=M * 7919 + d * 31 + r), act="gelu", dropout_p=0.25)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_options(act, shared, dropout_p, dtype):
    variants = [
        dict(bias=True, residual=True, row_scale=True, learn=True, gsi=False),
        dict(bias=False, residual=False, row_scale=False, learn=False, gsi=False),
        dict(bias=True, residual=False, row_scale=True, learn=True, gsi=True),
        dict(bias=False, residual=True, row_scale=False, learn=False, gsi=True),
    ]
    for i, v in enumerate(variants):
        gsi = v.pop("gsi")
        ins = _inputs(65, 100, 7, shared=shared, gen_seed=i, **v)
        _compare(ins, dtype, act=act, dropout_p=dropout_p, gsi=gsi)


def test_strided_inputs():
    ins = _inputs(64, 32, 8)
    ins["x"] = ins["x"].t().contiguous().t()                 # column-major view
    ins["up_w"] = ins["up_w"].t().contiguous().t()
    ins["residual"] = torch.randn(64, 64, dtype=F64)[:, ::2]  # every second column
    _compare(ins, act="silu", dropout_p=0.2)


def test_dropout_mask_bit_equal_to_reference():
    for seed, rows, cols, p in [(0, 1, 1, 0.5), (123, 37, 13, 0.3), (2**31 - 1, 100, 128, 0.1),
                                (77, 1000, 7, 0.9)]:
        keep = torch.ops.pyadapt_C.dropout_keep(seed, rows, cols, p)
        ref = reference.dropout_multiplier(seed, rows, cols, p, torch.float32, "cpu") > 0
        assert torch.equal(keep, ref), f"mask differs for seed {seed}, p {p}"


def test_dropout_in_op_uses_reference_mask():
    """Identity activation, zero biases, up = I: y - x is exactly the dropped, scaled h."""
    M, d = 50, 16
    x = torch.randn(M, d, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    seed = torch.tensor(4242, dtype=torch.int64)
    with pyadapt.use_backend("cpu"):
        y = bottleneck(x, eye, None, eye, None, activation="identity", dropout_p=0.5, seed=seed)
    keep = reference.dropout_multiplier(4242, M, d, 0.5, F64, "cpu")
    assert torch.equal((y - x) == 0, (keep == 0) | (x == 0))
    torch.testing.assert_close(y - x, x * keep, rtol=0, atol=1e-15)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    ins = _inputs(6, 5, 3)
    names = [k for k in _PARAMS if ins[k] is not None] + ["residual", "scale"]
    tensors = tuple(ins[k].clone().requires_grad_(True) for k in names)
    rs = ins["row_scale"] + 0.5

    def f(*ts):
        kw = dict(zip(names, ts))
        with pyadapt.use_backend("cpu"):
            return bottleneck(kw["x"], kw["down_w"], kw["down_b"], kw["up_w"], kw["up_b"],
                              kw["shared_w"], kw["shared_b"], residual=kw["residual"],
                              scale=kw["scale"], activation=act, dropout_p=0.3,
                              seed=torch.tensor(9, dtype=torch.int64), row_scale=rs)

    assert torch.autograd.gradcheck(f, tensors)


def test_gradcheck_float64_no_residual_grad_scale_invariant_off():
    ins = _inputs(7, 4, 2, shared=False, bias=False, residual=False)
    x = ins["x"].clone().requires_grad_(True)
    wd = ins["down_w"].clone().requires_grad_(True)
    wu = ins["up_w"].clone().requires_grad_(True)

    def f(x_, wd_, wu_):
        with pyadapt.use_backend("cpu"):
            return bottleneck(x_, wd_, None, wu_, None, scale=0.6, activation="silu")

    assert torch.autograd.gradcheck(f, (x, wd, wu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_across_runs_and_threads(dtype):
    ins = _inputs(1000, 100, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _run(ins, dtype, "cpu", act="gelu", dropout_p=0.2)
        b = _run(ins, dtype, "cpu", act="gelu", dropout_p=0.2)
        torch.set_num_threads(2)
        c = _run(ins, dtype, "cpu", act="gelu", dropout_p=0.2)
        d = _run(ins, dtype, "cpu", act="gelu", dropout_p=0.2)
    finally:
        torch.set_num_threads(before)
    for name in a:
        for other in (b, c, d):
            assert torch.equal(a[name], other[name]), f"{name} not bit-identical"


def test_residual_of_other_dtype_falls_back_to_reference():
    """bfloat16 x with a float32 residual (y then float32): not a case the kernel takes, so the
    cpu backend must give exactly the reference's output and gradients."""
    ins = _inputs(9, 16, 4)
    results = []
    for backend in ("cpu", "reference"):
        x = ins["x"].to(torch.bfloat16).requires_grad_(True)
        wd = ins["down_w"].to(torch.bfloat16).requires_grad_(True)
        wu = ins["up_w"].to(torch.bfloat16).requires_grad_(True)
        res = ins["residual"].float().requires_grad_(True)
        with pyadapt.use_backend(backend):
            y = bottleneck(x, wd, None, wu, None, residual=res, scale=0.7)
            y.backward(ins["grad_y"].float())
        assert y.dtype == torch.float32
        results.append([y.detach(), x.grad, wd.grad, wu.grad, res.grad])
    for name, a, b in zip(("y", "d_x", "d_down_w", "d_up_w", "d_residual"), *results):
        assert torch.equal(a, b), name


LOW = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M,d,r", [(0, 100, 7), (1, 8, 1), (65, 100, 7), (300, 768, 32),
                                   (97, 40, 128)])
def test_low_precision_storage(dtype, M, d, r):
    """bf16/fp16 storage, float32 math: every output against float64 (REL_TOL or 2x the error
    of PyTorch computing in the same dtype)."""
    _compare(_inputs(M, d, r, gen_seed=M + d + r), dtype, act="gelu", dropout_p=0.25)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shared", [True, False])
def test_low_precision_options(dtype, act, shared):
    variants = [dict(bias=True, residual=True, row_scale=True, learn=True, gsi=False),
                dict(bias=False, residual=False, row_scale=False, learn=False, gsi=True)]
    for i, v in enumerate(variants):
        gsi = v.pop("gsi")
        _compare(_inputs(65, 100, 7, shared=shared, gen_seed=10 + i, **v), dtype, act=act,
                 dropout_p=0.3, gsi=gsi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,d,r", [(65, 100, 7), (49, 8, 1), (97, 40, 128)])
def test_poisoned_outputs_and_scratch(monkeypatch, dtype, M, d, r):
    """With PYADAPT_POISON_OUTPUTS=1 the kernel starts y, dx and its scratch buffers as NaN: an
    element it forgets to write, or a padding column it reads as if it were zero, turns NaN."""
    monkeypatch.setenv("PYADAPT_POISON_OUTPUTS", "1")
    _compare(_inputs(M, d, r, residual=False, gen_seed=7), dtype, act="silu", dropout_p=0.2)


@pytest.mark.parametrize("dtype,mantissa_bits", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_low_precision_output_rounded_once(dtype, mantissa_bits):
    """y is computed in float32 and rounded to the storage dtype once: every element lies within
    half an ulp of the float64 result (plus float32 noise), which rounding the intermediate
    bottleneck activations or the up projection to bf16/fp16 would break."""
    ins = _inputs(200, 100, 16, gen_seed=3)
    got = _run(ins, dtype, "cpu", act="gelu")["y"].double()
    # the float64 reference on the same (rounded) inputs
    rounded = {k: (v.to(dtype).double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v) for k, v in ins.items()}
    ref = _run(rounded, F64, "reference", act="gelu")["y"]
    bound = ref.abs() * 2.0 ** -mantissa_bits * (1 + 1e-3) + 1e-6 * ref.abs().max()
    excess = ((got - ref).abs() - bound).max().item()
    assert excess <= 0, f"{dtype}: y off by more than half an ulp (excess {excess:.3e})"
    eager = _run(rounded, dtype, "reference", act="gelu")["y"].double()
    assert ((eager - ref).abs() > bound).any(), "test cannot fail: eager rounding also within bound"


def _op_args(M=12, d=10, r=4, dropout_p=0.3, residual=True, learn=True):
    ins = _inputs(M, d, r, residual=residual, learn=learn)
    t = {k: (None if v is None else v.float()) for k, v in ins.items()
         if isinstance(v, torch.Tensor) or v is None}
    scale = t["scale"].requires_grad_(True) if learn else None
    for k in _PARAMS:
        if t[k] is not None:
            t[k].requires_grad_(True)
    seed = torch.tensor(5, dtype=torch.int64) if dropout_p > 0 else None
    return (t["x"], t["residual"], t["down_w"], t["down_b"], t["shared_w"], t["shared_b"],
            t["up_w"], t["up_b"], scale, 1.0 if learn else 0.7, t["row_scale"], seed, "gelu",
            dropout_p, False)


@pytest.mark.parametrize("case", ["full", "fixed_scale_no_residual_no_dropout"])
def test_opcheck_cpu_backend(case):
    args = _op_args() if case == "full" else _op_args(dropout_p=0.0, residual=False, learn=False)
    with pyadapt.use_backend("cpu"):
        torch.library.opcheck(torch.ops.pyadapt.bottleneck_forward.default, args)


# ----------------------------------------------------------------------------------------------
# The saving forward: eager training on the cpu backend keeps the pre-activations, and the
# backward reads them instead of recomputing down(x)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["full", "fixed_scale_no_residual_no_dropout"])
def test_opcheck_saving_forward(case):
    args = _op_args() if case == "full" else _op_args(dropout_p=0.0, residual=False, learn=False)
    for backend in ("cpu", "reference"):
        with pyadapt.use_backend(backend):
            torch.library.opcheck(torch.ops.pyadapt.bottleneck_forward_saving.default, args)


def _spy_ops(monkeypatch):
    """Counts of the forward ops that `bottleneck()` calls."""
    mod = importlib.import_module("pyadapt.ops.bottleneck")   # the module, not the function
    calls = {"plain": 0, "saving": 0}
    plain, saving = mod.bottleneck_forward, mod.bottleneck_forward_saving

    def count(name, fn):
        def run(*a):
            calls[name] += 1
            return fn(*a)
        return run

    monkeypatch.setattr(mod, "bottleneck_forward", count("plain", plain))
    monkeypatch.setattr(mod, "bottleneck_forward_saving", count("saving", saving))
    return calls


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_saved_pre_activations_give_the_recomputed_gradients(monkeypatch, shared, dtype,
                                                             dropout_p):
    """Training on the cpu backend takes the saving forward; its gradients are bit-identical to
    the plain forward's (whose backward recomputes the pre-activations from x), and the saved
    pre-activations are the float64 ones within the dtype's tolerance."""
    ins = _inputs(97, 40, 7, shared=shared)
    calls = _spy_ops(monkeypatch)
    saving = _run(ins, dtype, "cpu", act="gelu", dropout_p=dropout_p)
    assert calls == {"plain": 0, "saving": 1}, f"training did not save: {calls}"
    with torch.no_grad(), pyadapt.use_backend("cpu"):
        _run_plain = bottleneck(ins["x"].to(dtype), ins["down_w"].to(dtype), None,
                                ins["up_w"].to(dtype), None)
    assert calls["plain"] == 1, "inference (no grad) saved pre-activations"
    del _run_plain
    monkeypatch.undo()
    # the same maths through the plain op: its backward recomputes pre1 (and pre2)
    monkeypatch.setattr(importlib.import_module("pyadapt.ops.bottleneck"),
                        "_saves_pre_activations", lambda x, args: False)
    plain = _run(ins, dtype, "cpu", act="gelu", dropout_p=dropout_p)
    for k in saving:
        assert torch.equal(saving[k], plain[k]), f"{k}: saved and recomputed paths differ"
    x = ins["x"].to(dtype)
    args = (x, None, ins["down_w"].to(dtype), ins["down_b"].to(dtype),
            None if ins["shared_w"] is None else ins["shared_w"].to(dtype),
            None if ins["shared_b"] is None else ins["shared_b"].to(dtype),
            ins["up_w"].to(dtype), ins["up_b"].to(dtype), None, 0.7, None, None, "gelu", 0.0,
            False)
    with pyadapt.use_backend("cpu"):
        _, pre = torch.ops.pyadapt.bottleneck_forward_saving(*args)
    pre1 = ins["x"] @ ins["down_w"].T + ins["down_b"]
    want = pre1 if not shared else torch.cat(
        [pre1, reference.activation(pre1, "gelu") @ ins["shared_w"].T + ins["shared_b"]], 1)
    assert pre.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close_rel(pre.double(), want, dtype, "saved pre-activations")


def test_saving_forward_answers_on_every_backend():
    """A saving forward reached under another backend (a choice made, then the backend
    switched) still returns that backend's y and the pre-activations."""
    ins = _inputs(33, 24, 5)
    x = ins["x"].float()
    args = (x, None, ins["down_w"].float(), ins["down_b"].float(), ins["shared_w"].float(),
            ins["shared_b"].float(), ins["up_w"].float(), ins["up_b"].float(), None, 0.5, None,
            None, "relu", 0.0, False)
    with pyadapt.use_backend("cpu"):
        y_cpu, pre_cpu = torch.ops.pyadapt.bottleneck_forward_saving(*args)
    for backend in pyadapt.available_backends():
        with pyadapt.use_backend(backend):
            y, pre = torch.ops.pyadapt.bottleneck_forward_saving(*args)
            y_plain = torch.ops.pyadapt.bottleneck_forward(*args)
        assert torch.equal(y, y_plain), f"{backend}: y differs from its plain forward"
        assert_close_rel(pre.double(), pre_cpu.double(), torch.float32, f"{backend}: pre")
        assert_close_rel(y.double(), y_cpu.double(), torch.float32, f"{backend}: y")


def test_saved_pre_activations_of_the_wrong_shape_are_refused():
    ins = _inputs(10, 8, 3, shared=False)
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    with pytest.raises(RuntimeError, match="saved_pre"):
        torch.ops.pyadapt_C.bottleneck_backward(
            f["grad_y"], f["x"], False, f["down_w"], f["down_b"], None, None, f["up_w"],
            f["up_b"], 0.7, None, None, "relu", 0.0, False, True, False, None,
            torch.zeros(10, 6))


def test_backward_reads_the_saved_pre_activations():
    """The native backward uses what it is given (so the saving path really skips the
    recompute): the true saved rows give the recomputed gradients bit for bit, altered ones
    change them."""
    ins = _inputs(50, 16, 4, shared=True)
    f = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    fwd = (f["x"], None, f["down_w"], f["down_b"], f["shared_w"], f["shared_b"], f["up_w"],
           f["up_b"], 0.7, None, None, "relu", 0.0)
    _, pre = torch.ops.pyadapt_C.bottleneck_forward_saving(*fwd)
    bwd = (f["grad_y"], f["x"], False, f["down_w"], f["down_b"], f["shared_w"], f["shared_b"],
           f["up_w"], f["up_b"], 0.7, None, None, "relu", 0.0, False, True, True, None)
    recomputed = torch.ops.pyadapt_C.bottleneck_backward(*bwd, None)
    from_saved = torch.ops.pyadapt_C.bottleneck_backward(*bwd, pre)
    altered = torch.ops.pyadapt_C.bottleneck_backward(*bwd, pre + 0.25)
    for i, (a, b, c) in enumerate(zip(recomputed, from_saved, altered)):
        assert torch.equal(a, b), f"gradient {i}: saved rows differ from the recompute"
    assert not torch.equal(recomputed[1], altered[1]), "the backward ignored saved_pre"


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("M,d", [(97, 100), (50, 64)])
def test_streaming_stores_write_the_same_values(monkeypatch, dtype, M, d):
    """Large outputs (y, dx) are written with non-temporal stores; small ones with plain
    stores. PYADAPT_CPU_STREAM forces either: every value is identical, including rows that
    are not 32-byte aligned (d = 100) and partial column tiles."""
    ins = _inputs(M, d, 7)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("PYADAPT_CPU_STREAM", flag)
        out[flag] = _run(ins, dtype, "cpu", act="gelu")
    for k in out["0"]:
        assert torch.equal(out["0"][k], out["1"][k]), f"{k}: streamed and plain stores differ"
