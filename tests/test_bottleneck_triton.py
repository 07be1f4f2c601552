"""Triton backend of the bottleneck op (kernels/bottleneck.py) against the float64 reference.

    y = residual + scale * row_scale * up(drop(act(shared?(act(down(x))))))

and its gradients [dx, dW_d, db_d, dW_s, db_s, dW_u, db_u, d scale] (grad_scale_invariant divides
every parameter gradient by scale; dx includes the identity path when the residual is x).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before the kernels are
defined), at small shapes. Every check compares with pyadapt.reference evaluated in float64 on the
same inputs: ||out - ref|| / ||ref|| within conftest.REL_TOL, and for bf16/fp16 also within 2x the
error of eager PyTorch in the same dtype (plus one final rounding: half an ulp, a whole ulp for
bf16 under the interpreter, whose fp32 -> bf16 cast truncates).

GPU tests (@pytest.mark.gpu) run the benchmark shapes on a CUDA device with compiled kernels:
`pytest -m gpu tests/test_bottleneck_triton.py` (conftest turns the interpreter off when CUDA is
available). Without a GPU they FAIL rather than skip; the default `-m 'not gpu'` (pyproject)
deselects them on CPU-only machines.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from conftest import require_triton  # before the kernels: fails or skips first

triton = require_triton()

import pyadapt  # noqa: E402
from pyadapt import reference  # noqa: E402
from pyadapt.kernels import bottleneck as K  # noqa: E402

from conftest import assert_close_rel, rel_err  # noqa: E402

OPS = importlib.import_module("pyadapt.ops.bottleneck")
_grads = importlib.import_module("pyadapt.ops._grads")
GRAD_NAMES = ("dx", "d down.weight", "d down.bias", "d shared.weight", "d shared.bias",
              "d up.weight", "d up.bias", "d scale")
# Half an ulp, relative: the cost of the one final rounding to the output dtype.
HALF_ULP = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


# ----------------------------------------------------------------------------------------------
# Inputs and comparison
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float64
    m: int = 65
    d: int = 100
    r: int = 7
    activation: str = "gelu"
    shared: bool = True
    bias: bool = True
    residual: object = None          # None (x is the residual) or the residual's dtype
    row_scale: bool = True
    learn_scale: bool = True
    invariant: bool = False
    dropout: float = 0.0
    needs: tuple = (True,) * 8

    def id(self) -> str:
        parts = [str(self.dtype).replace("torch.", ""), f"M{self.m}", f"d{self.d}", f"r{self.r}",
                 self.activation, "shared" if self.shared else "noshared",
                 "bias" if self.bias else "nobias"]
        if self.residual is not None:
            parts.append("res-" + str(self.residual).replace("torch.", ""))
        parts.append("rowscale" if self.row_scale else "norowscale")
        parts.append("learnscale" if self.learn_scale else "floatscale")
        if self.invariant:
            parts.append("invariant")
        if self.dropout:
            parts.append(f"p{self.dropout}")
        if not all(self.needs):
            parts.append("needs" + "".join("1" if n else "0" for n in self.needs))
        return "-".join(parts)


def make_inputs(c: Case, device="cpu", lead=None) -> dict:
    """Launcher arguments (kernels.bottleneck.forward order) with activations of unit scale:
    x ~ N(0, 1), weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), scale ~ 0.4-0.8."""
    m, d, r, dt = c.m, c.d, c.r, c.dtype
    shape = (m, d) if lead is None else tuple(lead) + (d,)

    def rnd(*s, std=1.0, dtype=dt):
        return (torch.randn(*s, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    return dict(
        x=rnd(*shape),
        residual=None if c.residual is None else rnd(*shape, dtype=c.residual),
        down_weight=rnd(r, d, std=d ** -0.5),
        down_bias=rnd(r, std=0.1) if c.bias else None,
        shared_weight=rnd(r, r, std=r ** -0.5) if c.shared else None,
        shared_bias=rnd(r, std=0.1) if (c.shared and c.bias) else None,
        up_weight=rnd(d, r, std=r ** -0.5),
        up_bias=rnd(d, std=0.1) if c.bias else None,
        scale=(0.4 + 0.4 * torch.rand((), dtype=torch.float64)).to(device=device, dtype=dt)
        if c.learn_scale else None,
        scale_value=1.0 if c.learn_scale else 0.37,
        row_scale=(0.5 + torch.rand(shape[:-1], dtype=torch.float64)).to(device=device, dtype=dt)
        if c.row_scale else None,
        seed=torch.tensor(987654321, dtype=torch.int64, device=device) if c.dropout else None,
        activation=c.activation,
        dropout_p=c.dropout,
    )


def as_2d(a: dict) -> dict:
    """The same arguments as row matrices (the reference works on (M, d))."""
    d = a["x"].shape[-1]
    out = dict(a)
    out["x"] = a["x"].reshape(-1, d)
    if a["residual"] is not None:
        out["residual"] = a["residual"].reshape(-1, d)
    if a["row_scale"] is not None:
        out["row_scale"] = a["row_scale"].reshape(-1)
    return out


def to64(a: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in a.items()}


def fwd_ref(a: dict) -> torch.Tensor:
    return OPS._reference_forward(**as_2d(a))


def bwd_args(a: dict, grad_y: torch.Tensor, invariant: bool, needs) -> tuple:
    b = dict(a)
    residual = b.pop("residual")
    return (grad_y, b.pop("x"), residual is not None, *b.values(), invariant, list(needs))


def bwd_ref(a: dict, grad_y, invariant, needs):
    a2 = as_2d(a)
    return OPS._reference_backward(*bwd_args(a2, grad_y.reshape(a2["x"].shape), invariant, needs))


def check(out, ref, dtype, what, eager=None):
    """out against the float64 ref: REL_TOL[dtype], and for bf16/fp16 at most 2x eager's error
    plus one final rounding (a whole ulp for bf16 in the interpreter: its cast truncates)."""
    assert_close_rel(out, ref, dtype, what)
    if eager is not None and dtype in HALF_ULP:
        floor = HALF_ULP[dtype] * (2 if (dtype == torch.bfloat16 and K._INTERPRET) else 1)
        err, base = rel_err(out, ref), rel_err(eager, ref)
        assert err <= 2 * base + floor, (
            f"{what}: error {err:.3e} exceeds 2x eager {dtype} error {base:.3e} + {floor:.1e}")


def run_and_compare(c: Case, device="cpu", lead=None):
    """Forward and every wanted gradient of the Triton launchers against the float64 reference."""
    a = make_inputs(c, device, lead)
    x = a["x"]
    out_dtype = x.dtype if c.residual is None else torch.promote_types(x.dtype, c.residual)
    y = K.forward(**a)
    assert y.shape == x.shape and y.dtype == out_dtype, (
        f"y: expected {tuple(x.shape)} {out_dtype}, got {tuple(y.shape)} {y.dtype}")
    a64 = to64(a)
    low = c.dtype in HALF_ULP
    check(y, fwd_ref(a64).reshape(x.shape), c.dtype, "y", fwd_ref(a) if low else None)

    grad_y = torch.randn(x.shape, dtype=torch.float64, device=device).to(out_dtype)
    grads = K.backward(*bwd_args(a, grad_y, c.invariant, c.needs))
    refs = bwd_ref(a64, grad_y.double(), c.invariant, c.needs)
    eager = bwd_ref(a, grad_y, c.invariant, c.needs) if low else [None] * 8
    inputs = [x, a["down_weight"], a["down_bias"], a["shared_weight"], a["shared_bias"],
              a["up_weight"], a["up_bias"], a["scale"]]
    assert len(grads) == 8, f"backward: expected 8 tensors, got {len(grads)}"
    for name, g, ref, base, t, need in zip(GRAD_NAMES, grads, refs, eager, inputs, c.needs):
        if t is None or not need:
            assert g.numel() == 0, f"{name}: expected an empty placeholder, got {tuple(g.shape)}"
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, (
            f"{name}: expected {tuple(t.shape)} {t.dtype}, got {tuple(g.shape)} {g.dtype}")
        check(g, ref.reshape(t.shape), c.dtype, name,
              None if base is None else base.reshape(t.shape))
    return y, grads


# ----------------------------------------------------------------------------------------------
# The combination matrix (a chosen subset of the product; the whole file runs in minutes)
# ----------------------------------------------------------------------------------------------

CASES = (
    # every activation, fp64, shared + biases + row_scale + learnable scale
    [Case(activation=act) for act in reference.ACTIVATIONS]
    # every dtype at a two-chunk d (200 > BLOCK_D 128, not a power of two) and r = 32
    + [Case(dtype=dt, m=65, d=200, r=32, activation=act)
       for dt in (torch.float32, torch.bfloat16, torch.float16) for act in ("relu", "gelu")]
    # shapes: M in {0, 1, 63, 64, 65, 257}, d in {8, 100, 200, 256}, r in {1, 7, 32, 128, 256}
    + [Case(m=0, d=8, r=7), Case(m=1, d=8, r=1), Case(dtype=torch.float32, m=63, d=100, r=7),
       Case(m=64, d=8, r=32), Case(dtype=torch.float32, m=257, d=100, r=128, activation="silu"),
       Case(m=257, d=200, r=256, activation="quick_gelu"), Case(m=1, d=200, r=256),
       Case(dtype=torch.float32, m=257, d=8, r=1, activation="relu"),
       Case(m=64, d=256, r=32, activation="relu"), Case(dtype=torch.bfloat16, m=257, d=100, r=128),
       Case(dtype=torch.float16, m=63, d=8, r=1, activation="silu")]
    # structure toggles
    + [Case(shared=False), Case(bias=False), Case(shared=False, bias=False, activation="identity"),
       Case(residual=torch.float64), Case(dtype=torch.float32, residual=torch.float32),
       Case(dtype=torch.bfloat16, d=200, r=32, residual=torch.float32),
       Case(dtype=torch.float32, residual=torch.bfloat16), Case(row_scale=False),
       Case(learn_scale=False), Case(learn_scale=False, row_scale=False, residual=torch.float64),
       Case(invariant=True), Case(invariant=True, learn_scale=False, shared=False),
       Case(dtype=torch.float32, invariant=True, d=200, r=32)]
    # dropout (mask regenerated in the backward from seed and offset)
    + [Case(dropout=0.3), Case(dropout=0.5, shared=False, m=257, d=200, r=32, activation="relu"),
       Case(dtype=torch.float32, dropout=0.1, residual=torch.float32, invariant=True),
       Case(dtype=torch.bfloat16, dropout=0.2, d=200, r=32)]
    # which gradients are wanted
    + [Case(needs=(True,) + (False,) * 7), Case(needs=(False,) + (True,) * 7),
       Case(needs=(False,) * 7 + (True,)), Case(needs=(False, True, False, False, True, False,
                                                     True, False), dropout=0.3)]
)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_forward_and_every_gradient_match_the_float64_reference(case):
    run_and_compare(case)


def test_leading_batch_dimensions_b_t_d():
    """x (B, T, d), residual (B, T, d), row_scale (B, T): same as the row-matrix reference."""
    run_and_compare(Case(m=0, d=100, r=7, residual=torch.float64), lead=(3, 22))
    run_and_compare(Case(dtype=torch.float32, d=100, r=7), lead=(2, 5, 7))


def test_leading_dims_through_fused_adapter_with_triton_backend():
    """FusedAdapter on (B, T, d) with the triton backend equals the reference backend, output and
    every parameter gradient."""
    adapter = pyadapt.FusedAdapter(24, 8, activation="gelu", init="bert", scale=0.3,
                                   learn_scale=True, dtype=torch.float64)
    x = torch.randn(3, 11, 24, dtype=torch.float64, requires_grad=True)
    results = {}
    for backend in ("triton", "reference"):
        adapter.zero_grad()
        x.grad = None
        with pyadapt.use_backend(backend):
            y = adapter(x)
            (y * torch.linspace(-1, 1, 24, dtype=torch.float64)).sum().backward()
        results[backend] = [y.detach(), x.grad.clone()] + [p.grad.clone()
                                                           for p in adapter.parameters()]
    names = ["y", "dx"] + ["d " + n for n, _ in adapter.named_parameters()]
    for name, out, ref in zip(names, results["triton"], results["reference"]):
        assert_close_rel(out, ref, torch.float64, f"FusedAdapter {name} (triton vs reference)")


def test_row_strided_x_is_read_in_place():
    """x a slice of a wider tensor (stride(0) != d), grad_y and residual with other strides: the
    launcher passes strides instead of copying, and the results match the reference."""
    c = Case(dtype=torch.float32, m=65, d=100, r=7, residual=torch.float32)
    a = make_inputs(c)
    wide = torch.randn(c.m, c.d + 13)
    a["x"] = wide[:, 5:5 + c.d]
    a["residual"] = torch.randn(c.d, c.m).t()          # column-major
    assert a["x"].stride() == (c.d + 13, 1) and not a["x"].is_contiguous()
    assert K._rows2d(a["x"], c.d) is a["x"], "a row-strided 2-D x must not be copied"
    y = K.forward(**a)
    check(y, fwd_ref(to64(a)), c.dtype, "y (strided x, column-major residual)")
    grad_y = torch.randn(c.m, 2 * c.d)[:, ::2]          # column stride 2
    grads = K.backward(*bwd_args(a, grad_y, False, [True] * 8))
    refs = bwd_ref(to64(a), grad_y.double(), False, [True] * 8)
    for name, g, ref in zip(GRAD_NAMES, grads, refs):
        check(g, ref, c.dtype, f"{name} (strided inputs)")


def test_column_major_x_and_transposed_weight_views():
    """x = (d, M)^T and up.weight a transposed view: y and every gradient are laid out as the
    op's fake rules say (y contiguous, gradients as pyadapt.ops._grads.fake), values as the
    reference."""
    c = Case(dtype=torch.float64, m=65, d=100, r=7, activation="silu")
    a = make_inputs(c)
    a["x"] = torch.randn(c.d, c.m, dtype=torch.float64).t()
    a["up_weight"] = (torch.randn(c.r, c.d, dtype=torch.float64) * c.r ** -0.5).t()
    y = K.forward(**a)
    assert y.is_contiguous(), f"y: expected contiguous (fake rule), got strides {y.stride()}"
    assert_close_rel(y, fwd_ref(a), torch.float64, "y (column-major x)")
    g = torch.randn(c.m, c.d, dtype=torch.float64)
    args = bwd_args(a, g, False, [True] * 8)
    grads = K.backward(*args)
    inputs = [a["x"], a["down_weight"], a["down_bias"], a["shared_weight"], a["shared_bias"],
              a["up_weight"], a["up_bias"], a["scale"]]
    fakes = _grads.fake(inputs, [True] * 8, a["x"])
    for name, out, ref, fake in zip(GRAD_NAMES, grads, bwd_ref(a, g, False, [True] * 8), fakes):
        assert_close_rel(out, ref, torch.float64, f"{name} (column-major x, transposed up)")
        assert out.stride() == fake.stride(), (
            f"{name}: strides {out.stride()} differ from the fake rule's {fake.stride()}")


@pytest.mark.parametrize("bad", ["residual", "row_scale", "up_bias", "shared_weight",
                                 "activation", "grad_y"])
def test_launchers_refuse_inconsistent_shapes_by_name(bad):
    """The kernels trust their shapes (a wrong one would read out of bounds): the launchers check
    them first and name the argument."""
    a = make_inputs(Case(m=8, d=16, r=4))
    g = torch.randn(8, 16, dtype=torch.float64)
    if bad == "activation":
        a["activation"] = "tanh"
    elif bad == "grad_y":
        g = g[:, :15]
    elif bad == "residual":
        a["residual"] = torch.randn(8, 15, dtype=torch.float64)
    else:
        a[bad] = a[bad][..., :-1]
    with pytest.raises(ValueError, match=bad):
        if bad != "grad_y":
            K.forward(**a)
        K.backward(*bwd_args(a, g, False, [True] * 8))


# ----------------------------------------------------------------------------------------------
# Dropout: the same mask as the reference, bit for bit
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_the_reference_mask_bit_for_bit(p):
    """With W_d = W_u = I (d = r), x = 1, identity activation, scale 1 and a zero residual, y is
    the dropout multiplier itself: it must equal reference.dropout_multiplier exactly."""
    m, r = 70, 32
    seed = torch.tensor(2**31 - 5, dtype=torch.int64)
    eye = torch.eye(r, dtype=torch.float64)
    y = K.forward(torch.ones(m, r, dtype=torch.float64), torch.zeros(m, r, dtype=torch.float64),
                  eye, None, None, None, eye, None, None, 1.0, None, seed, "identity", p)
    expected = reference.dropout_multiplier(seed, m, r, p, torch.float64, "cpu")
    assert torch.equal(y, expected), (
        f"dropout mask differs from the reference at {(y != expected).sum().item()} elements")


def test_dropout_depends_on_the_seed_and_the_backward_reuses_the_forward_mask():
    c = Case(dropout=0.5, m=64, d=100, r=16)
    a = make_inputs(c)
    y1 = K.forward(**a)
    a2 = dict(a, seed=torch.tensor(12345, dtype=torch.int64))
    y2 = K.forward(**a2)
    assert not torch.equal(y1, y2), "different seeds must give different dropout masks"
    for args in (a, a2):     # outputs and gradients at 1e-12: a single differing mask bit fails
        y = K.forward(**args)
        assert_close_rel(y, fwd_ref(args), torch.float64, "y with dropout")
        g = torch.randn_like(y)
        for name, out, ref in zip(GRAD_NAMES, K.backward(*bwd_args(args, g, False, [True] * 8)),
                                  bwd_ref(args, g, False, [True] * 8)):
            assert_close_rel(out, ref, torch.float64, f"{name} with dropout")


# ----------------------------------------------------------------------------------------------
# Determinism, poisoned outputs, tile sizes
# ----------------------------------------------------------------------------------------------

def test_gradients_are_bit_identical_across_two_runs():
    """Per-split partials reduced in a fixed order, no atomics: two runs, same bits."""
    c = Case(dtype=torch.float32, m=257, d=200, r=32, dropout=0.2, invariant=True)
    a = make_inputs(c)
    g = torch.randn(c.m, c.d)
    first = K.backward(*bwd_args(a, g, False, [True] * 8))
    second = K.backward(*bwd_args(a, g, False, [True] * 8))
    for name, u, v in zip(GRAD_NAMES, first, second):
        assert torch.equal(u, v), f"{name}: two runs differ (non-deterministic reduction)"
    assert torch.equal(K.forward(**a), K.forward(**a)), "y: two runs differ"


@pytest.mark.parametrize("case", [
    Case(dtype=torch.float32, m=257, d=200, r=32, dropout=0.2, residual=torch.float32),
    Case(m=65, d=100, r=7, shared=False,
         needs=(True, True, False, False, False, True, False, True)),
    Case(m=1, d=8, r=1, invariant=True),
], ids=lambda c: c.id())
def test_poisoned_outputs_every_element_is_written(case, poison_allocations):
    """Every buffer the launchers allocate (outputs, workspaces, partials) starts as NaN: an
    element the kernels leave unwritten, or a workspace element read before it is written,
    makes the comparison fail."""
    allocated = poison_allocations(K)
    run_and_compare(case)
    assert len(allocated) >= 8, "the launchers did not allocate through _new"


def test_every_dot_tile_dimension_is_at_least_16(dot_tile_shapes):
    """The GPU compiler rejects tl.dot tiles below 16: r = 1, d = 8, M = 1 must still give
    16-wide operands (r padded to R_PAD inside the kernels)."""
    shapes = dot_tile_shapes(K)
    run_and_compare(Case(m=1, d=8, r=1))
    assert shapes, "no tl.dot was traced"
    small = [s for s in shapes if min(s[0] + s[1]) < 16]
    assert not small, f"tl.dot operand tiles below 16: {sorted(set(small))}"


def test_gpu_block_sizes_and_configs_keep_dot_tiles_at_least_16():
    for r in (1, 7, 16, 32, 64, 100, 128, 200, 256):
        r_pad = K._r_pad(r)
        assert r_pad >= 16 and r_pad >= r and r_pad & (r_pad - 1) == 0, f"R_PAD({r}) = {r_pad}"
        kept = K._prune_fwd(K._FWD_GPU_CONFIGS, {}, R_PAD=r_pad)
        assert 1 <= len(kept) <= 4, f"r={r}: {len(kept)} forward configs after pruning"
        for cfg in kept:
            bm, bd = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_D"]
            assert bm >= 16 and bd >= 16 and bm * r_pad <= 8192, f"r={r}: config {cfg}"
    for cfg in K._fwd_configs():
        assert min(cfg.kwargs.values()) >= 16, f"active forward config {cfg}"
    assert min(K._bwd_blocks(256)) >= 16 and min(K._bwd_blocks(16)) >= 16


# ----------------------------------------------------------------------------------------------
# Through the custom op: gradcheck, opcheck, MMA sharing, fallback
# ----------------------------------------------------------------------------------------------

def test_triton_backend_is_available_under_the_interpreter():
    assert "triton" in pyadapt.available_backends(), "triton backend not registered/available"
    table = pyadapt.ops.kernel_table()
    assert "triton" in table["bottleneck_forward"] and "triton" in table["bottleneck_backward"]


@pytest.mark.parametrize("variant", ["shared-gelu-dropout-learnscale", "silu-residual-floatscale"])
def test_gradcheck_float64_through_the_op_with_the_triton_backend(variant):
    torch.manual_seed(7)
    m, d, r = 4, 6, 3
    dt = torch.float64

    def leaf(*s, std=1.0):
        return (torch.randn(*s, dtype=dt) * std).requires_grad_()

    x, wd, bd, wu, bu = leaf(m, d), leaf(r, d, std=0.5), leaf(r), leaf(d, r, std=0.5), leaf(d)
    row_scale = torch.rand(m, dtype=dt) + 0.5
    if variant.startswith("shared"):
        ws, bs, scale = leaf(r, r, std=0.5), leaf(r), torch.tensor(0.6, dtype=dt).requires_grad_()
        seed = torch.tensor(4242, dtype=torch.int64)

        def fn(x, wd, bd, ws, bs, wu, bu, scale):
            return pyadapt.ops.bottleneck(x, wd, bd, wu, bu, ws, bs, scale=scale,
                                          activation="gelu", dropout_p=0.4, seed=seed,
                                          row_scale=row_scale)
        inputs = (x, wd, bd, ws, bs, wu, bu, scale)
    else:
        residual = leaf(m, d)

        def fn(x, residual, wd, bd, wu, bu):
            return pyadapt.ops.bottleneck(x, wd, bd, wu, bu, residual=residual, scale=0.7,
                                          activation="silu", row_scale=row_scale)
        inputs = (x, residual, wd, bd, wu, bu)
    with pyadapt.use_backend("triton"):
        # fast mode (random projections of the Jacobian): the full Jacobian costs ~1 min in the
        # interpreter; every gradient is also compared elementwise in the matrix above
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True), f"gradcheck failed ({variant})"


def test_opcheck_with_the_triton_backend():
    c = Case(m=9, d=12, r=4, dropout=0.25, residual=torch.float64, invariant=True)
    a = make_inputs(c)
    for k in ("x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight",
              "up_bias", "scale", "residual"):
        a[k].requires_grad_()
    fwd_args = (a["x"], a["residual"], a["down_weight"], a["down_bias"], a["shared_weight"],
                a["shared_bias"], a["up_weight"], a["up_bias"], a["scale"], a["scale_value"],
                a["row_scale"], a["seed"], a["activation"], a["dropout_p"], True)
    with pyadapt.use_backend("triton"):
        torch.library.opcheck(torch.ops.pyadapt.bottleneck_forward.default, fwd_args)
        plain = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        bwd = bwd_args(plain, torch.randn(c.m, c.d, dtype=torch.float64), True, [True] * 8)
        torch.library.opcheck(torch.ops.pyadapt.bottleneck_backward.default, bwd)
        # a column-major x: outputs must have the layouts the fake rules promise
        xt = torch.randn(c.d, c.m, dtype=torch.float64).t()
        torch.library.opcheck(torch.ops.pyadapt.bottleneck_forward.default,
                              (xt.requires_grad_(),) + fwd_args[1:])
        torch.library.opcheck(torch.ops.pyadapt.bottleneck_backward.default,
                              bwd[:1] + (xt.detach(),) + bwd[2:])


def test_mma_shared_projection_gets_the_sum_of_both_branches_gradients():
    """MMA: one nn.Linear(r, r) used by the image and the text adapter of a layer. With the triton
    backend its gradient is the sum of each branch's own gradient (computed separately on the
    reference backend), under MMA's grad_scale_invariant convention."""
    torch.manual_seed(3)
    r, dt = 8, torch.float64
    shared = torch.nn.Linear(r, r, dtype=dt)
    image = pyadapt.FusedAdapter(16, r, "relu", True, 0.001, 0.0, "kaiming", shared,
                                 grad_scale_invariant=True, dtype=dt)
    text = pyadapt.FusedAdapter(12, r, "relu", True, 0.001, 0.0, "kaiming", shared,
                                grad_scale_invariant=True, dtype=dt)
    xi, xt = torch.randn(2, 9, 16, dtype=dt), torch.randn(5, 12, dtype=dt)
    gi, gt = torch.randn(2, 9, 16, dtype=dt), torch.randn(5, 12, dtype=dt)

    shared.zero_grad()
    with pyadapt.use_backend("triton"):
        ((image(xi) * gi).sum() + (text(xt) * gt).sum()).backward()
    both = (shared.weight.grad.clone(), shared.bias.grad.clone())

    per_branch = []
    for adapter, x, g in ((image, xi, gi), (text, xt, gt)):
        shared.zero_grad()
        with pyadapt.use_backend("reference"):
            (adapter(x) * g).sum().backward()
        per_branch.append((shared.weight.grad.clone(), shared.bias.grad.clone()))
    for i, name in enumerate(("shared.weight", "shared.bias")):
        expected = per_branch[0][i] + per_branch[1][i]
        assert_close_rel(both[i], expected, dt, f"d {name}: triton (both branches) vs sum")
        assert rel_err(per_branch[0][i], expected) > 1e-3, f"d {name}: text branch contributes"
        assert rel_err(per_branch[1][i], expected) > 1e-3, f"d {name}: image branch contributes"


def test_cpu_without_the_interpreter_falls_back_to_the_reference(monkeypatch, forbid_launches):
    """CPU tensors with the interpreter off: the launchers return the reference's results (and
    launch nothing)."""
    monkeypatch.setattr(K, "_INTERPRET", False)
    forbid_launches(K, "_bottleneck_fwd_kernel", "_bottleneck_bwd_rows_kernel",
                    "_bottleneck_bwd_weights_kernel", "_reduce_partials_kernel")
    c = Case(dtype=torch.float32, dropout=0.3, residual=torch.float32, invariant=True)
    a = make_inputs(c)
    assert torch.equal(K.forward(**a), fwd_ref(a)), "fallback forward differs from the reference"
    g = torch.randn(c.m, c.d)
    for name, out, ref in zip(GRAD_NAMES, K.backward(*bwd_args(a, g, True, [True] * 8)),
                              bwd_ref(a, g, True, [True] * 8)):
        assert torch.equal(out, ref), f"fallback {name} differs from the reference"


# ----------------------------------------------------------------------------------------------
# GPU: the benchmark shapes (DESIGN.md 7.6), compiled kernels, bf16
# ----------------------------------------------------------------------------------------------

GPU_SHAPES = [pytest.param(128 * 197, 768, 32, id="mma-image-M25216-d768-r32"),
              pytest.param(500 * 77, 512, 32, id="mma-text-M38500-d512-r32")]


def _require_gpu():
    if not torch.cuda.is_available():
        pytest.fail("GPU test without a CUDA device: deselect with -m 'not gpu'")
    if K._INTERPRET:
        pytest.fail("GPU tests need compiled kernels: run with TRITON_INTERPRET=0")


@pytest.mark.gpu
@pytest.mark.parametrize("m,d,r", GPU_SHAPES)
def test_gpu_mma_benchmark_shapes_bf16_match_reference(m, d, r):
    """MMA configuration (relu, shared, biases, scale 0.001, grad_scale_invariant) in bf16."""
    _require_gpu()
    run_and_compare(Case(dtype=torch.bfloat16, m=m, d=d, r=r, activation="relu",
                         learn_scale=False, row_scale=False, invariant=True), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("m,d,r", GPU_SHAPES)
def test_gpu_benchmark_shapes_every_feature(m, d, r):
    """gelu, dropout, row_scale, learnable scale, fp32 residual beside bf16 x; fp16 and fp32."""
    _require_gpu()
    run_and_compare(Case(dtype=torch.bfloat16, m=m, d=d, r=r, dropout=0.1, residual=torch.float32),
                    device="cuda")
    run_and_compare(Case(dtype=torch.float16, m=m, d=d, r=r, activation="silu", shared=False),
                    device="cuda")
    run_and_compare(Case(dtype=torch.float32, m=m, d=d, r=r, activation="quick_gelu"),
                    device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("m,d,r", GPU_SHAPES)
def test_gpu_gradients_bit_identical_and_every_element_written(m, d, r, monkeypatch):
    _require_gpu()
    c = Case(dtype=torch.bfloat16, m=m, d=d, r=r, activation="relu", dropout=0.1)
    a = make_inputs(c, device="cuda")
    g = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    first = K.backward(*bwd_args(a, g, True, [True] * 8))
    second = K.backward(*bwd_args(a, g, True, [True] * 8))
    for name, u, v in zip(GRAD_NAMES, first, second):
        assert torch.equal(u, v), f"{name}: two runs differ on the GPU"
    monkeypatch.setattr(K, "_new", lambda t: t.fill_(float("nan")))
    run_and_compare(c, device="cuda")


@pytest.mark.gpu
def test_gpu_r_up_to_256_and_odd_d():
    _require_gpu()
    for r in (1, 7, 128, 200, 256):
        run_and_compare(Case(dtype=torch.bfloat16, m=4099, d=769, r=r), device="cuda")
