"""The grouped-linear bank op (pyadapt/ops/bank_linear.py, kernels/bank_linear.py):

    y[m] = z[m] + c[a] * z[m] W[a]^T      a = ids[m] >= 0
    y[m] = z[m]                           ids[m] == -1

W (N, d, d), c (N,); gradients dz, dW (per adapter) and dc (per adapter). The reference backend
(a loop over ids) is checked against a naive row-by-row float64 loop differentiated by autograd;
the cpu and triton backends (triton under TRITON_INTERPRET=1 on CPU, every buffer its launchers
allocate poisoned with NaN) against the reference evaluated in float64 on the same inputs, for
id patterns (all one id, all different, -1 rows, all -1, unsorted, empty groups), odd d, M = 0
and 1, strided inputs and every dtype. bf16/fp16 also meet the 2x-eager rule (conftest).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pyadapt

from conftest import REL_TOL, rel_err, require_native, require_triton

from test_bank import make_ids as _bank_ids

ops = importlib.import_module("pyadapt.ops.bank_linear")  # the module, not the function

triton = require_triton()
from pyadapt.kernels import bank_linear as K  # noqa: E402

BACKENDS = ["reference", "cpu", "triton"]
NAMES = ("z", "weight", "scale")
PATTERNS = ("one_id", "all_different", "with_unadapted", "all_unadapted", "unsorted",
            "empty_groups")
# one ulp on top of the 2x rule: the output's own rounding (dc has only N elements, where
# eager can be luckier by a rounding) and the triton interpreter's truncating fp32 -> bf16 store
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def make_ids(pattern: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "all_unadapted":
        return torch.full((m,), -1, dtype=torch.int64)
    return _bank_ids(pattern, m, n, gen)


def make_inputs(m: int, d: int, n: int, dtype, gen) -> tuple:
    """z like activations, W like a trained full-rank adapter (never zero), c near 0.1-0.6."""
    z = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(n, d, d, generator=gen, dtype=torch.float64) * d ** -0.5).to(dtype)
    c = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.1).to(dtype)
    return z, w, c


def _ready(backend: str) -> None:
    if backend == "cpu":
        require_native()


def run(backend, z, ids, w, c, g=None, grad_of=NAMES):
    """(y, {name: gradient}) of the op on `backend`, gradients of the names in grad_of."""
    leaves = {"z": z.detach().clone().requires_grad_("z" in grad_of),
              "weight": w.detach().clone().requires_grad_("weight" in grad_of),
              "scale": c.detach().clone().requires_grad_("scale" in grad_of)}
    with pyadapt.use_backend(backend):
        y = ops.bank_linear(leaves["z"], ids, leaves["weight"], leaves["scale"])
        wanted = {k: t for k, t in leaves.items() if t.requires_grad}
        grads = {}
        if g is not None and wanted:
            grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), g)))
    return y.detach(), grads


def compare(backend, z, ids, w, c, dtype, grad_of=NAMES):
    """backend in `dtype` against the reference in float64 (and, for bf16/fp16, against 2x the
    error of the reference run in the same dtype)."""
    gen = torch.Generator().manual_seed(123)
    g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    y, grads = run(backend, z, ids, w, c, g.to(dtype), grad_of)
    y_ref, grads_ref = run("reference", z.double(), ids, w.double(), c.double(), g, grad_of)
    eager, grads_eager = None, {}
    if dtype in ULP:
        eager, grads_eager = run("reference", z, ids, w, c, g.to(dtype), grad_of)
    assert set(grads) == set(grads_ref) == set(grad_of), "the asked gradients are returned"
    for what, out, ref, base in [("y", y, y_ref, eager)] + [
            (f"d{k}", grads[k], grads_ref[k], grads_eager.get(k)) for k in grads_ref]:
        assert out.shape == ref.shape, f"{backend} {what}: shape {tuple(out.shape)}"
        assert out.dtype == (dtype if what != "dscale" else c.dtype), f"{backend} {what}: dtype"
        assert torch.isfinite(out.double()).all(), f"{backend} {what}: non-finite (unwritten)"
        err = rel_err(out, ref)
        assert err <= REL_TOL[dtype], f"{backend} {what}: relative error {err:.3e} ({dtype})"
        if base is not None:
            limit = 2 * rel_err(base, ref) + ULP[dtype]
            assert err <= limit, f"{backend} {what}: error {err:.3e} > 2x eager ({limit:.3e})"


@pytest.fixture
def poisoned(poison_allocations):
    return poison_allocations(K)


# ----------------------------------------------------------------------------------------------
# The reference backend is the maths
# ----------------------------------------------------------------------------------------------

def naive(z, ids, w, c):
    """Row by row: y[m] = z[m] + c[a] * W[a] z[m]."""
    out = []
    for m in range(z.shape[0]):
        a = int(ids[m])
        out.append(z[m] if a < 0 else z[m] + c[a] * (w[a] @ z[m]))
    return torch.stack(out) if out else z.clone()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_is_the_row_loop(pattern):
    gen = torch.Generator().manual_seed(1)
    m, d, n = (12, 9, 16) if pattern == "all_different" else (30, 9, 4)
    z, w, c = make_inputs(m, d, n, torch.float64, gen)
    ids = make_ids(pattern, m, n, gen)
    g = torch.randn(m, d, generator=gen, dtype=torch.float64)
    y, grads = run("reference", z, ids, w, c, g)
    leaves = [t.clone().requires_grad_() for t in (z, w, c)]
    y_naive = naive(*leaves[:1], ids, *leaves[1:])
    expect = [torch.zeros_like(t) if e is None else e
              for t, e in zip(leaves, torch.autograd.grad(y_naive, leaves, g, allow_unused=True))]
    assert rel_err(y, y_naive) <= 1e-14, "y"
    for name, e in zip(NAMES, expect):
        assert rel_err(grads[name], e) <= 1e-14, f"d{name}"
    unused = [a for a in range(n) if not (ids == a).any()]
    for a in unused:
        assert torch.equal(grads["weight"][a], torch.zeros_like(w[a])), f"dW[{a}] of no row"
        assert grads["scale"][a] == 0, f"dc[{a}] of no row"


# ----------------------------------------------------------------------------------------------
# cpu and triton against the float64 reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_patterns_float64(backend, pattern, poisoned):
    _ready(backend)
    gen = torch.Generator().manual_seed(2)
    # all_different: every row its own adapter (about N programs per launch): N small
    m, d, n = (20, 40, 24) if pattern == "all_different" else (70, 40, 5)
    z, w, c = make_inputs(m, d, n, torch.float64, gen)
    compare(backend, z, make_ids(pattern, m, n, gen), w, c, torch.float64)
    if backend == "triton":
        assert poisoned, "the launchers allocated through the poisoned hook"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dtypes(backend, dtype, poisoned):
    _ready(backend)
    gen = torch.Generator().manual_seed(3)
    m, d, n = 64, 72, 3
    z, w, c = make_inputs(m, d, n, dtype, gen)
    compare(backend, z, make_ids("with_unadapted", m, n, gen), w, c, dtype)


@pytest.mark.parametrize("m,d,n", [(0, 16, 3), (1, 5, 1), (33, 72, 2), (65, 17, 7)])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_odd_sizes(backend, m, d, n, poisoned):
    """M = 0 and 1; d not a power of two, below one tile (5, 17) and across tiles (72)."""
    _ready(backend)
    gen = torch.Generator().manual_seed(4)
    z, w, c = make_inputs(m, d, n, torch.float64, gen)
    compare(backend, z, make_ids("with_unadapted", m, n, gen), w, c, torch.float64)


@pytest.mark.parametrize("grad_of", [("z",), ("weight",), ("scale",), ("weight", "scale")])
def test_partial_gradients_triton(grad_of, poisoned):
    gen = torch.Generator().manual_seed(5)
    z, w, c = make_inputs(40, 24, 3, torch.float64, gen)
    compare("triton", z, make_ids("unsorted", 40, 3, gen), w, c, torch.float64, grad_of)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_inputs(backend, poisoned):
    """z a column slice (row stride 50), W a transposed view, c a strided view."""
    _ready(backend)
    gen = torch.Generator().manual_seed(6)
    big = torch.randn(45, 50, generator=gen, dtype=torch.float64)
    z = big[:, 3:36]
    w = (torch.randn(4, 33, 33, generator=gen, dtype=torch.float64) / 6).transpose(1, 2)
    c = torch.rand(8, generator=gen, dtype=torch.float64)[::2]
    assert not z.is_contiguous() and not w.is_contiguous() and not c.is_contiguous()
    compare(backend, z, make_ids("with_unadapted", 45, 4, gen), w, c, torch.float64)


def test_mixed_scale_dtype():
    """A float64 scale buffer with float32 z: c is used rounded to float32 (as the reference)
    and dc comes back in float64."""
    gen = torch.Generator().manual_seed(7)
    z, w, _ = make_inputs(30, 20, 3, torch.float32, gen)
    c = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    ids = make_ids("with_unadapted", 30, 3, gen)
    g = torch.randn(30, 20, generator=gen)
    results = {b: run(b, z, ids, w, c, g) for b in ("reference", "triton")}
    y_ref, grads_ref = results["reference"]
    y, grads = results["triton"]
    assert grads["scale"].dtype == torch.float64
    assert rel_err(y, y_ref) <= REL_TOL[torch.float32], "y"
    for k in NAMES:
        assert rel_err(grads[k], grads_ref[k]) <= REL_TOL[torch.float32], f"d{k}"


def test_triton_deterministic_gradients():
    """Two backward runs give bit-identical gradients (no atomics, fixed summation order)."""
    gen = torch.Generator().manual_seed(8)
    z, w, c = make_inputs(70, 40, 3, torch.float32, gen)
    ids = make_ids("with_unadapted", 70, 3, gen)
    g = torch.randn(70, 40, generator=gen)
    first, second = run("triton", z, ids, w, c, g)[1], run("triton", z, ids, w, c, g)[1]
    for k in NAMES:
        assert torch.equal(first[k], second[k]), f"d{k} differs between runs"


def test_triton_dot_tiles_at_least_16(dot_tile_shapes):
    shapes = dot_tile_shapes(K)
    gen = torch.Generator().manual_seed(9)
    z, w, c = make_inputs(20, 5, 2, torch.float32, gen)
    run("triton", z, make_ids("with_unadapted", 20, 2, gen), w, c, torch.randn(20, 5))
    assert shapes, "the kernels traced tl.dot calls"
    assert all(min(a + b) >= 16 for a, b in shapes), f"a dot tile below 16: {shapes}"


def test_triton_grid_is_fixed_by_m_n_d(monkeypatch):
    """The launch grids depend on (M, N, d) only, never on the ids (no host read of them)."""
    grids = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    for name in ("_bank_linear_rows_kernel", "_bank_linear_weight_kernel"):
        monkeypatch.setattr(K, name, Spy(getattr(K, name)))
    gen = torch.Generator().manual_seed(10)
    z, w, c = make_inputs(40, 24, 4, torch.float64, gen)
    seen = []
    for pattern in ("one_id", "with_unadapted", "all_unadapted"):
        grids.clear()
        run("triton", z, make_ids(pattern, 40, 4, gen), w, c, torch.ones(40, 24,
                                                                          dtype=torch.float64))
        seen.append(list(grids))
    assert len(seen[0]) == 3, "forward, dz and dW/dc launches"
    assert seen[0] == seen[1] == seen[2], f"grids changed with the ids: {seen}"


def test_triton_launchers_read_nothing_back(monkeypatch):
    """Grouping stays on the device: .item() / .tolist() are never called by the launchers."""
    gen = torch.Generator().manual_seed(11)
    z, w, c = make_inputs(40, 16, 3, torch.float64, gen)
    ids = make_ids("with_unadapted", 40, 3, gen)

    def host_read(*args, **kwargs):
        raise AssertionError("a host read of a tensor value in the bank_linear launchers")

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    y = K.forward(z, ids, w, c)
    grads = K.backward(torch.ones_like(y), z, ids, w, c, [True, True, True])
    monkeypatch.undo()
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)


def test_passthrough_rows_are_exact_copies():
    gen = torch.Generator().manual_seed(12)
    z, w, c = make_inputs(50, 24, 3, torch.float32, gen)
    ids = make_ids("with_unadapted", 50, 3, gen)
    g = torch.randn(50, 24, generator=gen)
    keep = ids < 0
    for backend in ("cpu", "triton"):
        _ready(backend)
        y, grads = run(backend, z, ids, w, c, g)
        assert torch.equal(y[keep], z[keep]), f"{backend}: y of -1 rows"
        assert torch.equal(grads["z"][keep], g[keep]), f"{backend}: dz of -1 rows"


# ----------------------------------------------------------------------------------------------
# gradcheck and opcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    _ready(backend)
    gen = torch.Generator().manual_seed(13)
    z, w, c = make_inputs(7, 5, 3, torch.float64, gen)
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0])      # adapter 1: an empty group
    leaves = [t.clone().requires_grad_() for t in (z, w, c)]
    with pyadapt.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, s: ops.bank_linear(a, ids, b, s), leaves,
                                        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    _ready(backend)
    gen = torch.Generator().manual_seed(14)
    z, w, c = make_inputs(9, 6, 2, torch.float64, gen)
    ids = torch.tensor([1, -1, 0, 1, 1, 0, -1, 1, 0])
    args = (z.requires_grad_(), ids, w.requires_grad_(), c.requires_grad_())
    with pyadapt.use_backend(backend):
        torch.library.opcheck(torch.ops.pyadapt.bank_linear_forward.default, args)


def test_compiles_fullgraph():
    gen = torch.Generator().manual_seed(15)
    z, w, c = make_inputs(10, 8, 2, torch.float32, gen)
    ids = torch.tensor([1, -1, 0, 1, 1, 0, -1, 1, 0, 0])
    compiled = torch.compile(ops.bank_linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(z, ids, w, c), ops.bank_linear(z, ids, w, c))


# ----------------------------------------------------------------------------------------------
# Bad input: named, before any kernel
# ----------------------------------------------------------------------------------------------

def test_bad_input(forbid_launches):
    forbid_launches(K, "_bank_linear_rows_kernel", "_bank_linear_weight_kernel")
    z, w, c = torch.randn(6, 4), torch.randn(2, 4, 4), torch.rand(2)
    ids = torch.tensor([0, 1, -1, 0, 1, 1])
    cases = [
        ((z[0], ids, w, c), ValueError, "z: expected 2 dimensions"),
        ((z.long(), ids, w, c), TypeError, "z: expected a floating-point tensor"),
        ((z, ids, w[:, :3], c), ValueError, r"weight: expected shape \(2, 4, 4\)"),
        ((z, ids, w.double(), c), TypeError, "weight: expected dtype torch.float32"),
        ((z, ids, w, c[:1]), ValueError, r"scale: expected shape \(2,\)"),
        ((z, ids.int(), w, c), TypeError, "ids: expected an int64 tensor"),
        ((z, ids[:5], w, c), ValueError, r"ids: expected shape \(6,\)"),
        ((z, [0] * 6, w, c), TypeError, "ids: expected an int64 tensor"),
    ]
    for args, error, message in cases:
        with pyadapt.use_backend("triton"), pytest.raises(error, match=message):
            ops.bank_linear(*args)


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels at the shipped R-Adapter shape (fail, not skip, without CUDA)
# ----------------------------------------------------------------------------------------------

def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("CUDA is required for @pytest.mark.gpu tests")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_shipped_shape(n, dtype):
    """128 images x 197 tokens at d 768, forward and every gradient, against float64."""
    _need_cuda()
    gen = torch.Generator().manual_seed(16)
    m, d = 128 * 197, 768
    z, w, c = (t.cuda() for t in make_inputs(m, d, n, dtype, gen))
    ids = torch.randint(-1, n, (128,), generator=gen).repeat_interleave(197).cuda()
    g = torch.randn(m, d, generator=gen, dtype=torch.float64).cuda()
    y, grads = run("triton", z, ids, w, c, g.to(dtype))
    y_ref, grads_ref = run("reference", z.double(), ids, w.double(), c.double(), g)
    tol = 1e-5 if dtype == torch.float32 else REL_TOL[dtype]
    assert rel_err(y, y_ref) <= tol, "y"
    for k in NAMES:
        assert rel_err(grads[k], grads_ref[k]) <= tol, f"d{k}"
