"""The CPU kernels' GEMM (csrc/cpu/gemm.h), driven directly through torch.ops.pyadapt_C.gemm_into:
    out = beta * init + alpha * a @ b     (init: none, a bias row broadcast to every row, or a
                                           matrix, possibly out itself)
against float64 at every tile edge of every micro-tile shape (n picks the shape: wide, narrow,
one vector; 4 m <= n takes the transposed path), inner sizes that need one and several k-blocks,
operands as stored, transposed and sliced, and bit-identical results across runs and OMP thread
counts. Outputs start as NaN, so an element the GEMM fails to write shows up.

Error bound per element (the standard one for a length-K dot product in floating point, with
the blocked sum's constant): |out - exact| <= (K + 4) * eps * (|alpha| |a| @ |b| + |beta init|).
"""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.usefixtures("needs_native")

F64 = torch.float64
EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}

# Tile edges: AVX-512 tiles are 6 / 12 / 24 rows and 64 / 32 / 16 float32 columns; AVX2 6 / 12
# rows and 16 / 8 columns; float64 halves the columns.
ROWS = (1, 5, 6, 7, 12, 13, 24, 25, 97)
COLS = (1, 7, 8, 9, 16, 17, 32, 33, 48, 49, 64, 65, 130)
INNER = (0, 1, 7, 300, 769, 1600)   # 769, 1600: more than one k-block (768 at most per block)


def gemm(a, b, init=None, alpha=1.0, beta=0.0, out=None, blas_for_small=False):
    if out is None:
        out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype)
    torch.ops.pyadapt_C.gemm_into(out, a, b, init, alpha, beta, blas_for_small)
    return out


def exact(a, b, init=None, alpha=1.0, beta=0.0):
    ref = alpha * (a.double() @ b.double())
    if init is not None:
        ref = ref + beta * init.double()
    return ref


def assert_within_bound(out, a, b, init=None, alpha=1.0, beta=0.0, what=""):
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite elements"
    k = a.shape[1]
    bound = abs(alpha) * (a.double().abs() @ b.double().abs())
    if init is not None:
        bound = bound + abs(beta) * init.double().abs().expand_as(bound)
    bound = (k + 4) * EPS[out.dtype] * bound + 1e-300
    err = (out.double() - exact(a, b, init, alpha, beta)).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the dot-product bound"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("k", INNER)
def test_every_tile_edge_matches_float64(dtype, k):
    """out = a @ b for every (m, n) combination of tile edges, inner size k."""
    g = torch.Generator().manual_seed(k)
    for m in ROWS:
        for n in COLS:
            a = torch.randn(m, k, generator=g, dtype=F64).to(dtype)
            b = torch.randn(k, n, generator=g, dtype=F64).to(dtype)
            out = gemm(a, b)
            if k == 0:
                assert torch.equal(out, torch.zeros_like(out)), f"{m}x{n}, k=0: not zeros"
            else:
                assert_within_bound(out, a, b, what=f"{m}x{k} @ {k}x{n} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("layout", ["plain", "a_t", "b_t", "both_t", "sliced"])
@pytest.mark.parametrize("m,n,k", [(100, 768, 300), (16, 768, 1000), (768, 16, 1000),
                                   (300, 200, 769), (1, 130, 64), (130, 1, 64)])
def test_operand_layouts(dtype, layout, m, n, k):
    """Operands as stored, transposed (a column-major view) and column slices of wider matrices
    give the same products; 16 x 768 and 1 x 130 outputs take the transposed path."""
    g = torch.Generator().manual_seed(m * 7 + n)
    a = torch.randn(m, k, generator=g, dtype=F64).to(dtype)
    b = torch.randn(k, n, generator=g, dtype=F64).to(dtype)
    if layout in ("a_t", "both_t"):
        a = a.t().contiguous().t()
    if layout in ("b_t", "both_t"):
        b = b.t().contiguous().t()
    if layout == "sliced":
        a = torch.cat([a, torch.randn(m, 5, dtype=dtype)], 1)[:, :k]
        b = torch.cat([torch.randn(k, 3, dtype=dtype), b], 1)[:, 3:]
    out = gemm(a, b)
    assert_within_bound(out, a, b, what=f"{layout} {m}x{k} @ {k}x{n}")
    assert torch.equal(out, gemm(a.contiguous(), b.contiguous())), (
        f"{layout}: a strided operand changed the result bits")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("m,n,k", [(97, 130, 769), (12, 700, 300), (500, 33, 40)])
def test_epilogues(dtype, m, n, k):
    """alpha, a bias row (beta * bias + alpha * a @ b), a matrix init, and accumulation into out
    itself (out = beta * out + alpha * a @ b)."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(m, k, generator=g, dtype=F64).to(dtype)
    b = torch.randn(k, n, generator=g, dtype=F64).to(dtype)
    bias = torch.randn(n, generator=g, dtype=F64).to(dtype)
    init = torch.randn(m, n, generator=g, dtype=F64).to(dtype)
    assert_within_bound(gemm(a, b, alpha=-0.37), a, b, alpha=-0.37, what="alpha")
    assert_within_bound(gemm(a, b, bias, 0.5, 2.0), a, b, bias, 0.5, 2.0, what="bias row")
    assert_within_bound(gemm(a, b, init, 1.5, -0.25), a, b, init, 1.5, -0.25, what="matrix")
    acc = init.clone()
    gemm(a, b, acc, 0.75, 1.0, out=acc)
    assert_within_bound(acc, a, b, init, 0.75, 1.0, what="accumulate into out")


def test_output_column_slice_leaves_the_rest_untouched():
    """Writing into a column slice of a wider matrix (the kernels' joint outputs) writes exactly
    that slice."""
    a, b = torch.randn(50, 80), torch.randn(80, 70)
    wide = torch.full((50, 100), -7.0)
    gemm(a, b, out=wide[:, 20:90])
    assert_within_bound(wide[:, 20:90], a, b, what="slice")
    assert (wide[:, :20] == -7.0).all() and (wide[:, 90:] == -7.0).all(), "wrote outside the slice"


@pytest.mark.parametrize("blas_for_small", [False, True])
@pytest.mark.parametrize("m,n,k", [(4096, 768, 768), (768, 16, 4096), (16, 768, 4096),
                                   (40, 30, 20), (333, 1, 1000)])
def test_bit_identical_across_runs_and_thread_counts(m, n, k, blas_for_small):
    """The summation order depends on the shapes only: 1, 2 and 3 threads and a rerun give the
    same bits (the BLAS path of small products included, as tiled_gemm uses it)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    bias = torch.randn(n, generator=g)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3, 2):
            torch.set_num_threads(t)
            outs.append(gemm(a, b, bias, 1.0, 1.0, blas_for_small=blas_for_small))
    finally:
        torch.set_num_threads(threads)
    for t, o in zip((2, 3, 2), outs[1:]):
        assert torch.equal(o, outs[0]), f"{m}x{k} @ {k}x{n}: {t} threads differ from 1"


def test_zero_sized_outputs():
    for m, n, k in [(0, 5, 3), (5, 0, 3), (0, 0, 0)]:
        out = torch.empty(m, n)
        gemm(torch.randn(m, k), torch.randn(k, n), out=out)
        assert out.shape == (m, n)


def test_rejects_mismatched_shapes_and_dtypes():
    with pytest.raises(RuntimeError, match="shapes"):
        gemm(torch.randn(3, 4), torch.randn(5, 6), out=torch.empty(3, 6))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        gemm(torch.randn(3, 4), torch.randn(4, 6).double(), out=torch.empty(3, 6))


def test_built_kernels_are_vector_fma_code():
    """The CPU kernels are written with GCC vector types and rely on the compiler to emit packed
    FMAs (DESIGN: vectorisation checked in the assembly). A build that lost its -march target
    would compile them to SSE pairs without FMA: the disassembly of pyadapt._C must hold
    hundreds of packed FMAs on 32- or 64-byte registers."""
    import platform
    import shutil
    import subprocess

    from pyadapt import _C

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 code check")  # other architectures: different instruction names
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, installed with gcc) is needed to inspect the build"
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], check=True,
                         capture_output=True, text=True).stdout
    packed = re.findall(r"\bvfmadd\d{3}p[sd]\b[^\n]*%[yz]mm", asm)
    assert len(packed) >= 200, f"only {len(packed)} packed ymm/zmm FMAs in {_C.__file__}"
