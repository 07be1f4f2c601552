"""Triton backend of the low-rank op (kernels/lowrank.py) against the float64 reference.

    y = x W^T + b + scale * p B^T,  u = x A^T,  p = (u D) K  (dropout before the core)
                                                 p = (u K) D  (dropout after the core)

with W (out, in), b optional, A = down (r1, in), K = core (r1, r2) optional (LoRA: identity),
B = up (out, r2), and gradients [dx, dW, db, dA, dK, dB]:
    g_p = scale g B (times D after the core), dB = scale g^T p, dK = u_in^T g_p,
    du = g_p K^T (times D before the core), dA = du^T x, dx = g W + du A, dW = g^T x, db = sum g.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py), at small shapes. Every check
compares with pyadapt.reference in float64 on the same inputs: ||out - ref|| / ||ref|| within
conftest.REL_TOL (float64 1e-12: a single wrong dropout mask bit fails), and for bf16/fp16 also
within 2x the error of eager PyTorch in the same dtype plus one final rounding.

GPU tests (@pytest.mark.gpu) run R-Adapter / CLIP shapes with compiled kernels:
`pytest -m gpu tests/test_lowrank_triton.py`. Without a GPU they FAIL rather than skip; the
default `-m 'not gpu'` (pyproject) deselects them.
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
from pyadapt import reference  # noqa: E402
from pyadapt.kernels import lowrank as K  # noqa: E402

from conftest import assert_close_rel, rel_err  # noqa: E402

OPS = importlib.import_module("pyadapt.ops.lowrank")
_grads = importlib.import_module("pyadapt.ops._grads")
F64 = torch.float64
GRAD_NAMES = ("dx", "dW", "db", "dA", "dK", "dB")
HALF_ULP = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


# ----------------------------------------------------------------------------------------------
# Inputs and comparison
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype = F64
    m: int = 65
    d_in: int = 100
    d_out: int = 64
    r1: int = 7
    r2: object = 7            # None: no core (LoRA, r2 = r1); else the core is r1 x r2
    bias: bool = True
    dropout: float = 0.0
    after: bool = True        # dropout after the core (Aurora ViT) or before it (Aurora BERT)
    needs: tuple = (True,) * 6

    def id(self) -> str:
        core = "lora" if self.r2 is None else f"core{self.r1}x{self.r2}"
        parts = [str(self.dtype).replace("torch.", ""), f"M{self.m}", f"{self.d_in}to{self.d_out}",
                 f"r{self.r1}", core, "bias" if self.bias else "nobias"]
        if self.dropout:
            parts.append(f"p{self.dropout}-" + ("after" if self.after else "before"))
        if not all(self.needs):
            parts.append("needs" + "".join("1" if n else "0" for n in self.needs))
        return "-".join(parts)


def make_inputs(c: Case, device="cpu") -> dict:
    """Launcher arguments (kernels.lowrank.forward order), activations of unit scale:
    x ~ N(0, 1), weights ~ N(0, 1/fan_in), bias ~ N(0, 0.1), scale 0.75."""
    dt = c.dtype
    r2 = c.r1 if c.r2 is None else c.r2

    def rnd(*s, std=1.0):
        return (torch.randn(*s, dtype=F64) * std).to(device=device, dtype=dt)

    return dict(
        x=rnd(c.m, c.d_in),
        weight=rnd(c.d_out, c.d_in, std=c.d_in ** -0.5),
        bias=rnd(c.d_out, std=0.1) if c.bias else None,
        down=rnd(c.r1, c.d_in, std=c.d_in ** -0.5),
        core=None if c.r2 is None else rnd(c.r1, c.r2, std=c.r1 ** -0.5),
        up=rnd(c.d_out, r2, std=r2 ** -0.5),
        scale=0.75,
        seed=torch.tensor(987654321, dtype=torch.int64, device=device) if c.dropout else None,
        dropout_p=c.dropout,
        dropout_after_core=c.after,
    )


def to64(a: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in a.items()}


def inputs_of(a: dict) -> list:
    return [a["x"], a["weight"], a["bias"], a["down"], a["core"], a["up"]]


def fwd_ref(a: dict) -> torch.Tensor:
    return OPS._reference_forward(**a)


def bwd_ref(a: dict, grad_y, needs):
    return OPS._reference_backward(grad_y, *a.values(), list(needs))


def check(out, ref, dtype, what, eager=None):
    """out against the float64 ref: REL_TOL[dtype], and for bf16/fp16 at most 2x eager's error
    plus one final rounding (a whole ulp for bf16 in the interpreter: its cast truncates)."""
    assert_close_rel(out, ref, dtype, what)
    if eager is not None and dtype in HALF_ULP:
        floor = HALF_ULP[dtype] * (2 if (dtype == torch.bfloat16 and K._INTERPRET) else 1)
        err, base = rel_err(out, ref), rel_err(eager, ref)
        assert err <= 2 * base + floor, (
            f"{what}: error {err:.3e} exceeds 2x eager {dtype} error {base:.3e} + {floor:.1e}")


def run_and_compare(c: Case, device="cpu", a=None, grad_y=None):
    """Forward and every wanted gradient of the Triton launchers against the float64 reference."""
    a = make_inputs(c, device) if a is None else a
    x = a["x"]
    y = K.forward(**a)
    assert y.shape == (x.shape[0], c.d_out) and y.dtype == x.dtype and y.is_contiguous(), (
        f"y: expected contiguous {(x.shape[0], c.d_out)} {x.dtype}, got {tuple(y.shape)} "
        f"{y.dtype} strides {y.stride()}")
    a64 = to64(a)
    low = c.dtype in HALF_ULP
    check(y, fwd_ref(a64), c.dtype, "y", fwd_ref(a) if low else None)

    if grad_y is None:
        grad_y = torch.randn(x.shape[0], c.d_out, dtype=F64, device=device).to(x.dtype)
    grads = K.backward(grad_y, *a.values(), list(c.needs))
    refs = bwd_ref(a64, grad_y.double(), c.needs)
    eager = bwd_ref(a, grad_y, c.needs) if low else [None] * 6
    assert len(grads) == 6, f"backward: expected 6 tensors, got {len(grads)}"
    for name, g, ref, base, t, need in zip(GRAD_NAMES, grads, refs, eager, inputs_of(a), c.needs):
        if t is None or not need:
            assert g.numel() == 0, f"{name}: expected an empty placeholder, got {tuple(g.shape)}"
            continue
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_contiguous(), (
            f"{name}: expected contiguous {tuple(t.shape)} {t.dtype}, got {tuple(g.shape)} "
            f"{g.dtype} strides {g.stride()}")
        check(g, ref, c.dtype, name, base)
    return y, grads


# ----------------------------------------------------------------------------------------------
# The combination matrix (a chosen subset of the product)
# ----------------------------------------------------------------------------------------------

CASES = (
    # structure, fp64: LoRA, square core, rectangular cores (CPAdapter's wide sites), bias off
    [Case(r2=None), Case(r2=None, bias=False), Case(r2=7), Case(r1=7, r2=20),
     Case(r1=20, r2=7, bias=False)]
    # dropout after / before the core, LoRA and cores (fp64: the mask must be bit-exact)
    + [Case(r2=r2, dropout=0.3, after=after) for r2 in (None, 7, 20) for after in (True, False)]
    # every dtype: rectangular core with dropout, and LoRA
    + [Case(dtype=dt, r1=7, r2=20, dropout=0.2, after=after)
       for dt in (torch.float32, torch.bfloat16, torch.float16) for after in (True, False)]
    + [Case(dtype=dt, m=130, d_in=64, d_out=100, r1=32, r2=None)
       for dt in (torch.float32, torch.bfloat16, torch.float16)]
    # shapes: M in {0, 1, 63, 65, 130}, in/out in {8, 100, 64}, rank in {1, 7, 32, 128}
    + [Case(m=0, d_in=8, d_out=8, r1=1, r2=None), Case(m=0, r1=7, r2=20, dropout=0.1),
       Case(m=1, d_in=8, d_out=8, r1=1, r2=None), Case(m=1, d_in=8, d_out=100, r1=1, r2=1),
       Case(dtype=torch.float32, m=63, d_in=100, d_out=8, r1=7, r2=None),
       Case(m=63, d_in=64, d_out=64, r1=32, r2=32, dropout=0.5),
       Case(dtype=torch.float32, m=130, d_in=100, d_out=100, r1=128, r2=None, dropout=0.1),
       Case(m=130, d_in=64, d_out=8, r1=32, r2=128, dropout=0.3, after=False),
       Case(dtype=torch.bfloat16, m=130, d_in=8, d_out=64, r1=7, r2=32),
       Case(dtype=torch.float16, m=65, d_in=100, d_out=100, r1=128, r2=128, bias=False)]
    # which gradients are wanted (the modules freeze W and b; adapters without x grad; ...)
    + [Case(needs=(True, False, False, True, True, True), dropout=0.3),
       Case(needs=(False, True, True, False, False, False)),
       Case(needs=(False, False, False, False, True, False), dropout=0.3, after=False),
       Case(needs=(False, False, False, False, False, True), r2=None),
       Case(needs=(True,) + (False,) * 5, r1=7, r2=20, dropout=0.2)]
)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_forward_and_every_gradient_match_the_float64_reference(case):
    run_and_compare(case)


def test_row_strided_x_and_strided_grad_and_weights_are_read_in_place():
    """x a slice of a wider tensor (stride(0) != in), grad_y with column stride 2, W and B
    transposed views: strides go to the kernels; values as the reference, outputs contiguous."""
    c = Case(dtype=torch.float32, m=65, d_in=100, d_out=64, r1=7, r2=20, dropout=0.2)
    a = make_inputs(c)
    a["x"] = torch.randn(c.m, c.d_in + 13)[:, 5:5 + c.d_in]
    a["weight"] = (torch.randn(c.d_in, c.d_out) * c.d_in ** -0.5).t()
    a["up"] = (torch.randn(20, c.d_out) * 20 ** -0.5).t()
    assert a["x"].stride() == (c.d_in + 13, 1) and not a["x"].is_contiguous()
    run_and_compare(c, a=a, grad_y=torch.randn(c.m, 2 * c.d_out)[:, ::2])


@pytest.mark.parametrize("after", [True, False])
def test_dropout_mask_is_the_reference_mask_bit_for_bit(after):
    """W = 0, x = 1, A = I (in = r1), K = I_(r1 x r2) padded, B = I (out = r2), scale 1: y is the
    dropout multiplier of the (M x r2) rank tensor (after the core) or of the (M x r1) one before
    it (its first r2 columns), and must equal reference.dropout_multiplier exactly."""
    m, r1, r2, p = 70, 20, 12, 0.4
    seed = torch.tensor(2**31 - 5, dtype=torch.int64)
    core = torch.eye(r1, r2, dtype=F64)
    y = K.forward(torch.ones(m, r1, dtype=F64), torch.zeros(r2, r1, dtype=F64), None,
                  torch.eye(r1, dtype=F64), core, torch.eye(r2, dtype=F64), 1.0, seed, p, after)
    expected = (reference.dropout_multiplier(seed, m, r2, p, F64, "cpu") if after else
                reference.dropout_multiplier(seed, m, r1, p, F64, "cpu")[:, :r2])
    assert torch.equal(y, expected), (
        f"dropout mask differs from the reference at {(y != expected).sum().item()} elements")


def test_dropout_depends_on_the_seed():
    c = Case(r1=7, r2=20, dropout=0.5)
    a = make_inputs(c)
    y1 = K.forward(**a)
    y2 = K.forward(**dict(a, seed=torch.tensor(12345, dtype=torch.int64)))
    assert not torch.equal(y1, y2), "different seeds must give different dropout masks"


@pytest.mark.parametrize("bad", ["weight", "bias", "down", "core", "up", "grad_y"])
def test_launchers_refuse_inconsistent_shapes_by_name(bad):
    """The kernels trust their shapes (a wrong one would read out of bounds): the launchers check
    them first and name the argument."""
    a = make_inputs(Case(m=8, d_in=16, d_out=12, r1=4, r2=6))
    g = torch.randn(8, 12, dtype=F64)
    if bad == "grad_y":
        g = g[:, :11]
    elif bad == "core":
        a[bad] = a[bad][:-1]        # (its column count defines r2: checked against up)
    else:
        a[bad] = a[bad][..., :-1]
    with pytest.raises(ValueError, match=bad):
        if bad != "grad_y":
            K.forward(**a)
        K.backward(g, *a.values(), [True] * 6)


# ----------------------------------------------------------------------------------------------
# Determinism, poisoned outputs, tile sizes
# ----------------------------------------------------------------------------------------------

def test_gradients_are_bit_identical_across_two_runs():
    """Per-split partials reduced in a fixed order, no atomics: two runs, same bits."""
    c = Case(dtype=torch.float32, m=130, d_in=100, d_out=64, r1=7, r2=20, dropout=0.2)
    a = make_inputs(c)
    g = torch.randn(c.m, c.d_out)
    first = K.backward(g, *a.values(), [True] * 6)
    second = K.backward(g, *a.values(), [True] * 6)
    for name, u, v in zip(GRAD_NAMES, first, second):
        assert torch.equal(u, v), f"{name}: two runs differ (non-deterministic reduction)"
    assert torch.equal(K.forward(**a), K.forward(**a)), "y: two runs differ"


@pytest.mark.parametrize("case", [
    Case(dtype=torch.float32, m=130, d_in=100, d_out=64, r1=7, r2=20, dropout=0.2, after=False),
    Case(m=65, r2=None, needs=(True, False, True, True, False, True)),
    Case(m=1, d_in=8, d_out=8, r1=1, r2=1),
], ids=lambda c: c.id())
def test_poisoned_outputs_every_element_is_written(case, poison_allocations):
    """Every buffer the launchers allocate (outputs, workspaces, partials) starts as NaN: an
    element the kernels leave unwritten, or a workspace element read before it is written,
    makes the comparison fail."""
    allocated = poison_allocations(K)
    run_and_compare(case)
    assert len(allocated) >= 7, "the launchers did not allocate through _new"


def test_every_dot_tile_dimension_is_at_least_16(dot_tile_shapes):
    """The GPU compiler rejects tl.dot tiles below 16: r = 1, in = out = 8, M = 1 must still give
    16-wide operands (ranks padded to R1_PAD / R2_PAD inside the kernels)."""
    shapes = dot_tile_shapes(K)
    run_and_compare(Case(m=1, d_in=8, d_out=8, r1=1, r2=1, dropout=0.5))
    assert shapes, "no tl.dot was traced"
    small = [s for s in shapes if min(s[0] + s[1]) < 16]
    assert not small, f"tl.dot operand tiles below 16: {sorted(set(small))}"


def test_gpu_block_sizes_and_configs_keep_dot_tiles_at_least_16():
    for r in (1, 7, 16, 32, 64, 128):
        r_pad = K._r_pad(r)
        kept = K._prune_fwd(K._FWD_GPU_CONFIGS, {}, R1_PAD=r_pad, R2_PAD=16)
        assert kept, f"r={r}: no forward config after pruning"
        for cfg in kept:
            assert min(cfg.kwargs.values()) >= 16 and cfg.kwargs["BLOCK_M"] * r_pad <= 8192, (
                f"r={r}: config {cfg}")
        assert min(K._bwd_blocks(r_pad)) >= 16, f"r={r}: backward blocks {K._bwd_blocks(r_pad)}"
    for cfg in K._fwd_configs():
        assert min(cfg.kwargs.values()) >= 16, f"active forward config {cfg}"


# ----------------------------------------------------------------------------------------------
# Through the custom op and the modules: gradcheck, opcheck, LowRankAdapter, CPAdapter
# ----------------------------------------------------------------------------------------------

def test_triton_backend_is_registered_and_available_under_the_interpreter():
    assert "triton" in pyadapt.available_backends(), "triton backend not registered/available"
    table = pyadapt.ops.kernel_table()
    assert "triton" in table["lowrank_forward"] and "triton" in table["lowrank_backward"]
    with pyadapt.use_backend("triton"):
        assert pyadapt.ops.backend_for("lowrank_forward", "cpu") == "triton"


@pytest.mark.parametrize("variant", ["lora-bias-dropout", "rect-core-dropout-before",
                                     "square-core-dropout-after"])
def test_gradcheck_float64_through_the_op_with_the_triton_backend(variant):
    torch.manual_seed(11)
    m, d_in, d_out, r1 = 5, 6, 4, 3
    r2 = {"lora": None, "rect": 5, "square": 3}[variant.split("-")[0]]

    def leaf(*s, std=1.0):
        return (torch.randn(*s, dtype=F64) * std).requires_grad_()

    x, w, a = leaf(m, d_in), leaf(d_out, d_in, std=0.5), leaf(r1, d_in, std=0.5)
    b = leaf(d_out) if "bias" in variant else None
    k = None if r2 is None else leaf(r1, r2, std=0.5)
    up = leaf(d_out, r1 if r2 is None else r2, std=0.5)
    seed = torch.tensor(4242, dtype=torch.int64)
    inputs = tuple(t for t in (x, w, b, a, k, up) if t is not None)

    def fn(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, w, b, a, k, up)]
        return pyadapt.ops.lowrank_linear(*args, scale=0.8, dropout_p=0.4, seed=seed,
                                          dropout_after_core="after" in variant)

    with pyadapt.use_backend("triton"):
        # fast mode (random projections of the Jacobian): the full Jacobian is slow in the
        # interpreter; every gradient is also compared elementwise in the matrix above
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=True), f"gradcheck failed ({variant})"


@pytest.mark.parametrize("variant", ["core-bias-dropout-after", "lora-nobias"])
def test_opcheck_with_the_triton_backend(variant):
    core = variant.startswith("core")
    c = Case(m=9, d_in=12, d_out=10, r1=4, r2=6 if core else None, bias=core,
             dropout=0.25 if core else 0.0)
    a = make_inputs(c)
    leaves = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in a.items()}
    needs = [True, False, True, True, True, True]
    with pyadapt.use_backend("triton"):
        torch.library.opcheck(torch.ops.pyadapt.lowrank_forward.default, tuple(leaves.values()))
        g = torch.randn(c.m, c.d_out, dtype=F64)
        torch.library.opcheck(torch.ops.pyadapt.lowrank_backward.default,
                              (g, *a.values(), needs))


def _module_results(module, x, g, backend):
    module.zero_grad(set_to_none=True)
    x.grad = None
    with pyadapt.use_backend(backend):
        y = module(x)
        (y * g).sum().backward()
    return [y.detach(), x.grad.clone()] + [
        p.grad.clone() for p in module.parameters() if p.requires_grad and p.grad is not None]


def test_lowrank_adapter_triton_equals_reference_backend():
    """LowRankAdapter (LoRA, frozen base) on (B, T, in): output, dx and dA, dB equal the
    reference backend's."""
    base = nn.Linear(24, 20, dtype=F64)
    lora = pyadapt.LowRankAdapter(base, rank=6, alpha=12)
    with torch.no_grad():
        lora.up_weight.normal_()        # B starts at zero: give it values
    x = torch.randn(3, 11, 24, dtype=F64, requires_grad=True)
    g = torch.randn(3, 11, 20, dtype=F64)
    tri, ref = (_module_results(lora, x, g, b) for b in ("triton", "reference"))
    assert len(tri) == len(ref) == 4, f"expected y, dx, dA, dB; got {len(tri)} / {len(ref)}"
    for name, out, want in zip(["y", "dx", "d down_weight", "d up_weight"], tri, ref):
        assert_close_rel(out, want, F64, f"LowRankAdapter {name} (triton vs reference)")


@pytest.mark.parametrize("position", ["after_core", "before_core"])
def test_cp_adapter_wide_site_triton_equals_reference_backend(position):
    """A CPAdapter tucker site on a wide 16 -> 64 base (width 16: r1 = R, r2 = 4 R, a
    rectangular core) in training with dropout: output, dx and dU, dV, dC, dlambda equal the
    reference backend's (same seed: the module's RNG state is replayed)."""
    bases = [nn.Linear(16, 64, dtype=F64), nn.Linear(16, 16, dtype=F64)]
    cp = pyadapt.CPAdapter(bases, rank=4, core="tucker", dropout=0.3,
                           dropout_position=position, width=16)
    with torch.no_grad():
        cp.V.normal_()                  # V starts at zero: give it values
    site = cp[0]
    assert (site.n_out, site.n_in) == (4, 1), "16 -> 64 at width 16: 4 x 1 blocks"
    x = torch.randn(37, 16, dtype=F64, requires_grad=True)
    g = torch.randn(37, 64, dtype=F64)
    state = torch.get_rng_state()
    tri = _module_results(site, x, g, "triton")
    torch.set_rng_state(state)
    ref = _module_results(site, x, g, "reference")
    names = ["y", "dx"] + [f"d {n}" for n, p in site.named_parameters()
                           if p.requires_grad and p.grad is not None]
    assert len(tri) == len(ref) >= 6, f"expected y, dx, dlam, dU, dV, dC; got {len(tri)}"
    for name, out, want in zip(names, tri, ref):
        assert_close_rel(out, want, F64, f"CPAdapter wide site {name} ({position}, triton vs "
                                         "reference)")


def test_torch_compile_fullgraph_with_the_triton_backend():
    """LowRankAdapter under torch.compile(fullgraph=True): the custom ops are opaque to the graph
    and launch the Triton kernels at run time; output and gradients equal eager reference."""
    torch._dynamo.reset()
    base = nn.Linear(16, 12, dtype=F64)
    lora = pyadapt.LowRankAdapter(base, rank=4, alpha=8)
    with torch.no_grad():
        lora.up_weight.normal_()
    x = torch.randn(2, 9, 16, dtype=F64, requires_grad=True)
    g = torch.randn(2, 9, 12, dtype=F64)
    compiled = torch.compile(lora, fullgraph=True)
    tri = _module_results(compiled, x, g, "triton")
    ref = _module_results(lora, x, g, "reference")
    for name, out, want in zip(["y", "dx", "d down_weight", "d up_weight"], tri, ref):
        assert_close_rel(out, want, F64, f"compiled LowRankAdapter {name} (triton vs reference)")


def test_cpu_without_the_interpreter_falls_back_to_the_reference(monkeypatch, forbid_launches):
    """CPU tensors with the interpreter off: the launchers return the reference's results (and
    launch nothing)."""
    monkeypatch.setattr(K, "_INTERPRET", False)
    forbid_launches(K, "_lowrank_fwd_kernel", "_lowrank_bwd_rows_kernel",
                    "_lowrank_bwd_weights_kernel", "_reduce_partials_kernel")
    c = Case(dtype=torch.float32, r1=7, r2=20, dropout=0.3)
    a = make_inputs(c)
    assert torch.equal(K.forward(**a), fwd_ref(a)), "fallback forward differs from the reference"
    g = torch.randn(c.m, c.d_out)
    for name, out, ref in zip(GRAD_NAMES, K.backward(g, *a.values(), [True] * 6),
                              bwd_ref(a, g, [True] * 6)):
        assert torch.equal(out, ref), f"fallback {name} differs from the reference"


# ----------------------------------------------------------------------------------------------
# GPU: R-Adapter / CLIP shapes (DESIGN.md 7.6), compiled kernels
# ----------------------------------------------------------------------------------------------

def _require_gpu():
    if not torch.cuda.is_available():
        pytest.fail("GPU test without a CUDA device: deselect with -m 'not gpu'")
    if K._INTERPRET:
        pytest.fail("GPU tests need compiled kernels: run with TRITON_INTERPRET=0")


GPU_CASES = [
    pytest.param(dict(r1=16, r2=None), id="lora-r16"),
    pytest.param(dict(r1=64, r2=64, dropout=0.1, after=True), id="cp-R64-after"),
    pytest.param(dict(r1=64, r2=64, dropout=0.1, after=False), id="cp-R64-before"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kw", GPU_CASES)
def test_gpu_clip_shapes_match_reference(kw, dtype):
    """x: 128 * 197 tokens x 768 into a 768 -> 768 linear (ViT-B/16 at batch 128)."""
    _require_gpu()
    run_and_compare(Case(dtype=dtype, m=128 * 197, d_in=768, d_out=768, **kw), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kw", GPU_CASES)
def test_gpu_gradients_bit_identical_and_every_element_written(kw, monkeypatch):
    _require_gpu()
    c = Case(dtype=torch.bfloat16, m=128 * 197, d_in=768, d_out=768, **kw)
    a = make_inputs(c, device="cuda")
    g = torch.randn(c.m, c.d_out, device="cuda", dtype=torch.bfloat16)
    first = K.backward(g, *a.values(), [True] * 6)
    second = K.backward(g, *a.values(), [True] * 6)
    for name, u, v in zip(GRAD_NAMES, first, second):
        assert torch.equal(u, v), f"{name}: two runs differ on the GPU"
    monkeypatch.setattr(K, "_new", lambda t: t.fill_(float("nan")))
    run_and_compare(c, device="cuda")


@pytest.mark.gpu
def test_gpu_odd_shapes_and_wide_cp_site():
    _require_gpu()
    for r1, r2 in ((1, None), (7, 7), (128, 128), (32, 128)):
        run_and_compare(Case(dtype=torch.bfloat16, m=4099, d_in=769, d_out=3072, r1=r1, r2=r2,
                             dropout=0.1), device="cuda")
