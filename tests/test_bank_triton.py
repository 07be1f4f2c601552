"""Triton backend of the bank op (kernels/bank.py) against the reference loop in float64.

    y[m] = residual[m] + scale[a] * up_a(act(shared_a?(act(down_a(x[m])))))   a = ids[m] >= 0
    y[m] = residual[m]                                                       ids[m] == -1

and every gradient [dx, d down, d down bias, d shared, d shared bias, d up, d up bias, d scale]
(grad_scale_invariant divides the parameter gradients by each adapter's scale). The reference
backend (a Python loop over ids calling pyadapt.reference per group) is itself checked against a
naive per-row loop in test_bank.py. Every buffer the launchers allocate is poisoned with NaN.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py) at small shapes. GPU tests
(@pytest.mark.gpu) FAIL without CUDA; `pytest -m gpu tests/test_bank_triton.py` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_triton  # before the kernels: fails or skips first

triton = require_triton()

import pyadapt  # noqa: E402
from pyadapt.bank import AdapterBank  # noqa: E402
from pyadapt.kernels import bank as K  # noqa: E402
from pyadapt.ops import bank as bank_ops  # noqa: E402

from conftest import REL_TOL, rel_err  # noqa: E402
from test_bank import make_ids, make_weights  # noqa: E402

NAMES = ("x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight", "up_bias",
         "scale")
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def run(backend, x, ids, w, *, residual=None, activation="relu", invariant=False, g=None,
        grad_of=NAMES):
    """(y, {name: gradient}) of the bank op on `backend`; gradients of the names in grad_of."""
    x = x.detach().clone().requires_grad_("x" in grad_of)
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k in grad_of)
              for k, v in w.items()}
    with pyadapt.use_backend(backend):
        y = bank_ops.bank_bottleneck(
            x, ids, leaves["down_weight"], leaves["down_bias"], leaves["up_weight"],
            leaves["up_bias"], leaves["shared_weight"], leaves["shared_bias"],
            scale=leaves["scale"], residual=residual, activation=activation,
            grad_scale_invariant=invariant)
        tensors = {k: t for k, t in [("x", x)] + list(leaves.items())
                   if t is not None and t.requires_grad}
        grads = {}
        if g is not None and tensors:
            grads = dict(zip(tensors, torch.autograd.grad(y, list(tensors.values()), g)))
    return y.detach(), grads


def compare(x, ids, w, dtype, *, residual=None, activation="relu", invariant=False,
            grad_of=NAMES):
    gen = torch.Generator().manual_seed(11)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    g = torch.randn((x.shape[0], w["up_weight"].shape[1]), generator=gen, dtype=torch.float64)
    y, grads = run("triton", x, ids, w, residual=residual, activation=activation,
                   invariant=invariant, g=g.to(out_dtype), grad_of=grad_of)
    w64 = {k: None if v is None else v.double() for k, v in w.items()}
    y_ref, grads_ref = run("reference", x.double(), ids, w64,
                           residual=None if residual is None else residual.double(),
                           activation=activation, invariant=invariant, g=g, grad_of=grad_of)
    base, grads_base = None, {}
    if dtype in ULP:    # eager reference in the same low dtype: the 2x rule's yardstick
        base, grads_base = run("reference", x, ids, w, residual=residual,
                               activation=activation, invariant=invariant, g=g.to(out_dtype),
                               grad_of=grad_of)
    pairs = [("y", y, y_ref, base)] + [(f"d{k}", grads[k], grads_ref[k], grads_base.get(k))
                                       for k in grads_ref]
    assert set(grads) == set(grads_ref), "the same gradients are returned"
    for what, out, ref, eager in pairs:
        assert out.shape == ref.shape, f"{what}: shape"
        assert torch.isfinite(out.double()).all(), f"{what}: non-finite (unwritten) elements"
        err = rel_err(out, ref)
        assert err <= REL_TOL[dtype], f"triton {what}: relative error {err:.3e} ({dtype})"
        if eager is not None:
            limit = 2 * rel_err(eager, ref) + ULP[dtype]
            assert err <= limit, f"triton {what}: error {err:.3e} > 2x eager + 1 ulp {limit:.3e}"


@pytest.fixture
def poisoned(poison_allocations):
    return poison_allocations(K)


@pytest.mark.parametrize("pattern", ["one_id", "all_different", "with_unadapted", "unsorted",
                                     "empty_groups"])
def test_patterns_float64(pattern, poisoned):
    gen = torch.Generator().manual_seed(1)
    # all_different: every row its own adapter, so the grids have ~N programs: keep N small
    m, d, r, n = (20, 40, 7, 24) if pattern == "all_different" else (70, 40, 7, 5)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    ids = make_ids(pattern, m, n, gen)
    compare(x, ids, make_weights(n, d, r, torch.float64, gen=gen), torch.float64,
            activation="gelu")
    assert poisoned, "the launchers allocated through the poisoned hook"


@pytest.mark.parametrize("layout", ["no_bias", "no_shared", "shared_no_bias", "residual_bf16",
                                    "invariant", "weights_only", "x_only"])
def test_layouts(layout, poisoned):
    gen = torch.Generator().manual_seed(2)
    m, d, r, n = 45, 33, 16, 3
    dtype = torch.float64
    x = torch.randn(m, d, generator=gen, dtype=dtype)
    ids = make_ids("with_unadapted", m, n, gen)
    w = make_weights(n, d, r, dtype, bias=layout != "no_bias", shared=layout != "no_shared",
                     shared_bias=layout != "shared_no_bias", gen=gen)
    residual = None
    if layout == "residual_bf16":
        residual = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    grad_of = NAMES
    if layout == "weights_only":
        grad_of = ("up_weight", "shared_bias", "scale")
    elif layout == "x_only":
        grad_of = ("x",)
    compare(x, ids, w, dtype, residual=residual, activation="silu",
            invariant=layout == "invariant", grad_of=grad_of)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype, poisoned):
    gen = torch.Generator().manual_seed(3)
    m, d, r, n = 64, 100, 32, 4
    x = torch.randn(m, d, generator=gen).to(dtype)
    ids = make_ids("with_unadapted", m, n, gen)
    compare(x, ids, make_weights(n, d, r, dtype, gen=gen), dtype)


@pytest.mark.parametrize("m,d,r,n", [(1, 8, 1, 1), (33, 130, 33, 2), (0, 16, 4, 3)])
def test_odd_sizes(m, d, r, n, poisoned):
    """M = 1 and 0, d above one BLOCK_D and not a power of two, r = 1 and r = 33 (padded)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    ids = make_ids("with_unadapted", m, n, gen)
    compare(x, ids, make_weights(n, d, r, torch.float64, gen=gen), torch.float64,
            activation="quick_gelu")


@pytest.mark.parametrize("d,d_out", [(40, 24), (24, 150)])
def test_lora_form(d, d_out, poisoned):
    """d_out != d (LoRA: identity, no bias, no shared; the residual is the base output), both
    narrower and wider than x, d_out spanning two BLOCK_D tiles."""
    gen = torch.Generator().manual_seed(9)
    m, r, n = 50, 4, 3
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    w = make_weights(n, d, r, torch.float64, bias=False, shared=False, gen=gen, d_out=d_out)
    base_out = torch.randn(m, d_out, generator=gen, dtype=torch.float64)
    compare(x, make_ids("with_unadapted", m, n, gen), w, torch.float64, residual=base_out,
            activation="identity")


def test_strided_x(poisoned):
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(40, 50, generator=gen, dtype=torch.float64)
    x = big[:, 3:35]                       # row stride 50, not contiguous
    ids = make_ids("unsorted", 40, 6, gen)
    compare(x, ids, make_weights(6, 32, 8, torch.float64, gen=gen), torch.float64)


def test_deterministic_gradients():
    """Two backward runs give bit-identical gradients (no atomics, fixed reduction order)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(50, 24, generator=gen)
    ids = make_ids("with_unadapted", 50, 3, gen)
    w = make_weights(3, 24, 8, torch.float32, gen=gen)
    g = torch.randn(50, 24, generator=gen)
    first = run("triton", x, ids, w, g=g)[1]
    second = run("triton", x, ids, w, g=g)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), f"d{k} differs between runs"


def test_dot_tiles_at_least_16(dot_tile_shapes):
    shapes = dot_tile_shapes(K)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 8, generator=gen)
    w = make_weights(2, 8, 1, torch.float32, gen=gen)
    run("triton", x, make_ids("with_unadapted", 20, 2, gen), w, g=torch.randn(20, 8))
    assert shapes, "the kernels traced tl.dot calls"
    assert all(min(a + b) >= 16 for a, b in shapes), f"a dot tile below 16: {shapes}"


def test_module_on_triton_matches_reference():
    """AdapterBank end to end on the triton backend: per-sample ids over (B, T, d)."""
    adapters = [pyadapt.FusedAdapter(24, 8, init="bert", shared=torch.nn.Linear(8, 8),
                                      dtype=torch.float64) for _ in range(3)]
    bank = AdapterBank.from_adapters(adapters)
    x = torch.randn(4, 5, 24, dtype=torch.float64)
    ids = torch.tensor([1, -1, 2, 1])
    with pyadapt.use_backend("triton"):
        y = bank(x, ids)
    with pyadapt.use_backend("reference"):
        y_ref = bank(x, ids)
    assert rel_err(y, y_ref) <= REL_TOL[torch.float64]


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels at serving shapes (fail, not skip, without CUDA)
# ----------------------------------------------------------------------------------------------

def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("CUDA is required for @pytest.mark.gpu tests")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_serving_shapes(n, dtype):
    _need_cuda()
    gen = torch.Generator().manual_seed(8)
    m, d, r = 128 * 197, 768, 32
    x = torch.randn(m, d, generator=gen).to(dtype).cuda()
    ids = torch.randint(-1, n, (128,), generator=gen).repeat_interleave(197).cuda()
    w = {k: None if v is None else v.cuda()
         for k, v in make_weights(n, d, r, dtype, gen=gen).items()}
    y, _ = run("triton", x, ids, w)          # serving: forward only
    w64 = {k: None if v is None else v.double() for k, v in w.items()}
    y_ref, _ = run("reference", x.double(), ids, w64)
    tol = 1e-3 if dtype == torch.float32 else REL_TOL[dtype]
    assert rel_err(y, y_ref) <= tol, "y"


@pytest.mark.gpu
def test_gpu_gradients_float32():
    _need_cuda()
    gen = torch.Generator().manual_seed(9)
    m, d, r, n = 4096, 512, 32, 8
    x = torch.randn(m, d, generator=gen).cuda()
    ids = torch.randint(-1, n, (m,), generator=gen).cuda()
    w = {k: None if v is None else v.cuda()
         for k, v in make_weights(n, d, r, torch.float32, gen=gen).items()}
    g = torch.randn(m, d, generator=gen).cuda()
    y, grads = run("triton", x, ids, w, g=g)
    w64 = {k: None if v is None else v.double() for k, v in w.items()}
    y_ref, grads_ref = run("reference", x.double(), ids, w64, g=g.double())
    assert rel_err(y, y_ref) <= 1e-5, "y"
    for k in grads_ref:
        assert rel_err(grads[k], grads_ref[k]) <= 1e-5, f"d{k}"


def test_lora_bank_on_triton_matches_reference():
    base = torch.nn.Linear(24, 40, dtype=torch.float64)
    adapters = [pyadapt.LowRankAdapter(base, rank=4, alpha=3.0 + i) for i in range(2)]
    for a in adapters:
        with torch.no_grad():
            a.up_weight.normal_(0, 0.2)
    bank = AdapterBank.from_adapters(adapters)
    x = torch.randn(3, 6, 24, dtype=torch.float64)
    ids = torch.tensor([1, 0, -1])
    with pyadapt.use_backend("triton"):
        y = bank(x, ids)
    with pyadapt.use_backend("reference"):
        y_ref = bank(x, ids)
    assert rel_err(y, y_ref) <= REL_TOL[torch.float64]


def test_launchers_read_nothing_back_to_the_host(monkeypatch):
    """The grouping (sort, segment offsets, tile tables) stays on the device: the launchers never
    read a tensor value with .item() or .tolist() (on a GPU, a sync). Checked by making those two
    fail while the triton forward and backward run (int()/bool() of a tensor bypass a Python
    patch, so they are not covered here; the launchers use neither)."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    ids = make_ids("with_unadapted", 40, 3, gen)
    w = make_weights(3, 16, 4, torch.float64, gen=gen)
    leaves = {k: v.requires_grad_() for k, v in w.items()}
    x.requires_grad_()

    def host_read(*args, **kwargs):
        raise AssertionError("a host read of a tensor value in the bank launchers")

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    y = K.forward(x, None, ids, leaves["down_weight"], leaves["down_bias"],
                  leaves["shared_weight"], leaves["shared_bias"], leaves["up_weight"],
                  leaves["up_bias"], leaves["scale"], "relu")
    grads = K.backward(torch.ones_like(y), x, ids, False, leaves["down_weight"],
                       leaves["down_bias"], leaves["shared_weight"], leaves["shared_bias"],
                       leaves["up_weight"], leaves["up_bias"], leaves["scale"], "relu", False,
                       [True] * 8)
    monkeypatch.undo()
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
