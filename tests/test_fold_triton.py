"""Triton backend of the grouped fold op (kernels/fold.py) against the float64 fold.

    W'_i = round_to(W_i.dtype)(W_i + s_i * L_i @ R_i)     for many items in one launch,

accumulated in float32 (float64 for float64 weights), rounded once. Every result is compared
with pyadapt.reference.fold_weight evaluated in float64 on float64 copies (conftest.REL_TOL),
and with the reference backend's own result in the same dtype: bit for bit where the inner size
k is 0 or 1 (no sum to reorder); otherwise within one ulp of the output plus the error bound of
two orders of the k-sum, 2 k u |s| |L| |R| (u: the accumulation dtype's unit roundoff), since the
kernel sums over k in another order than torch's matmul (where W + s L R cancels, a pure ulp
count of the output would be meaningless). One kernel launch per (weight dtype, left dtype,
right dtype) group.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py), at small shapes. GPU tests
(@pytest.mark.gpu) fold the linears of a ViT-B/16 on a CUDA device: `pytest -m gpu
tests/test_fold_triton.py`; without a GPU they FAIL rather than skip (the default
`-m 'not gpu'` deselects them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import require_triton  # before the kernels: fails or skips first

triton = require_triton()

import pyadapt  # noqa: E402
from pyadapt import reference  # noqa: E402
from pyadapt.kernels import bottleneck as K  # noqa: E402
from pyadapt.kernels import fold as F  # noqa: E402

from conftest import assert_close_rel  # noqa: E402

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.bfloat16: torch.int16, torch.float16: torch.int16}

# (rows, cols, inner k): a square R-Adapter-like term, a wide LoRA-like one, an (out x 1) bias
# column, odd sizes with a rank-1 term, a k that spans several BLOCK_K steps under the interpreter
SHAPES = [(40, 24, 7), (8, 100, 16), (100, 1, 40), (17, 33, 1), (3, 130, 70)]


def acc_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def make_items(shapes, dtype, factor_dtype=None, bias_column=True, strided=True,
               transposed=True):
    """Weights ~ N(0, 1) in `dtype`, factors ~ N(0, 1/k) in `factor_dtype` (default: the
    accumulation dtype, as the modules' fold_terms give them), scales in [-1, 1]. Items of one
    column are views of a 1-D bias, as RAdapter's bias term; the first weight is a column slice
    of a wider matrix (row stride != cols); every second left factor is a transposed view."""
    factor_dtype = factor_dtype or acc_dtype(dtype)
    ws, ls, rs = [], [], []
    for j, (m, n, k) in enumerate(shapes):
        if n == 1 and bias_column:
            ws.append(torch.randn(m, dtype=F64).to(dtype).view(-1, 1))
        elif j == 0 and strided:
            ws.append(torch.randn(m, n + 5, dtype=F64).to(dtype)[:, 2:n + 2])
        else:
            ws.append(torch.randn(m, n, dtype=F64).to(dtype))
        left = torch.randn(k, m, dtype=F64).t() if (j % 2 and transposed) else \
            torch.randn(m, k, dtype=F64)
        ls.append(left.to(factor_dtype))
        rs.append((torch.randn(k, n, dtype=F64) / max(k, 1) ** 0.5).to(factor_dtype))
    scales = torch.rand(len(shapes), dtype=F64) * 2 - 1
    return ws, ls, rs, scales


def fold64(ws, ls, rs, scales):
    return [reference.fold_weight(w.double(), left.double(), right.double(), scales[i])
            for i, (w, left, right) in enumerate(zip(ws, ls, rs))]


def fold_reference_backend(ws, ls, rs, scales):
    return [reference.fold_weight(w, left, right, scales[i])
            for i, (w, left, right) in enumerate(zip(ws, ls, rs))]


def bits_equal(a, b):
    """Bit-for-bit equality (signed zeros and NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _SAME_SIZE_INT[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def ulps(a, b):
    """|a - b| in ulps of the output dtype, at the larger magnitude of the two (elementwise)."""
    p = MANTISSA_BITS[a.dtype]
    a64, b64 = a.double(), b.double()
    _, exp = torch.frexp(torch.maximum(a64.abs(), b64.abs()))
    ulp = torch.ldexp(torch.ones_like(a64), exp - p)
    return (a64 - b64).abs() / ulp.clamp_min(torch.finfo(a.dtype).tiny * 2.0 ** (1 - p))


def assert_same_fold_up_to_sum_order(out, ref, w, left, right, scale, what):
    """out and ref are two foldings of W + s L R that differ only in the order of the k-sum:
    |out - ref| <= 1 ulp of the output (the final rounding may fall either side) + the bound
    on two summation orders, 2 k u |s| (|L| |R|) with u the accumulation dtype's unit roundoff.
    (Where W + s L R cancels, the second term dominates: a pure ulp count would be wrong.)"""
    acc = acc_dtype(w.dtype)
    u = 2.0 ** -MANTISSA_BITS[acc]
    k = left.shape[1]
    sum_order = 2 * k * u * abs(float(scale)) * (left.to(acc).double().abs()
                                                  @ right.to(acc).double().abs())
    p = MANTISSA_BITS[out.dtype]
    mag = torch.maximum(out.double().abs(), ref.double().abs())
    _, exp = torch.frexp(mag)
    ulp = torch.ldexp(torch.ones_like(mag), exp - p)
    excess = (out.double() - ref.double()).abs() - (ulp + sum_order)
    assert excess.numel() == 0 or excess.max().item() <= 0.0, (
        f"{what}: differs from the reference backend by more than 1 ulp + the summation-order "
        f"bound (by {excess.max().item():.3e}; {ulps(out, ref).max().item()} ulps)")


def check_items(outs, ws, ls, rs, scales, what):
    """Each output: dtype, shape and strides of its weight; the float64 fold within REL_TOL; the
    reference backend up to the order of the k-sum, bit for bit where k <= 1 (no sum)."""
    assert len(outs) == len(ws), f"{what}: {len(outs)} outputs for {len(ws)} weights"
    refs64 = fold64(ws, ls, rs, scales)
    refs = fold_reference_backend(ws, ls, rs, scales)
    for i, (out, w, left, right, ref64, ref) in enumerate(zip(outs, ws, ls, rs, refs64, refs)):
        tag = f"{what} item {i} {tuple(w.shape)} k={left.shape[1]} {w.dtype}"
        assert out.dtype == w.dtype and out.shape == w.shape, (
            f"{tag}: got {tuple(out.shape)} {out.dtype}")
        assert out.stride() == torch.empty_like(w).stride(), f"{tag}: strides {out.stride()}"
        assert_close_rel(out, ref64, w.dtype, f"{tag} vs float64 fold")
        if left.shape[1] <= 1:
            assert bits_equal(out, ref), f"{tag}: not bit-identical to the reference backend"
        else:
            assert_same_fold_up_to_sum_order(out, ref, w, left, right, scales[i], tag)


class CountLaunches:
    """Wraps F._fold_kernel: records each launch's keyword arguments (dtypes, flags, blocks)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def count_launches(monkeypatch):
    counter = CountLaunches(F._fold_kernel)
    monkeypatch.setattr(F, "_fold_kernel", counter)
    return counter


# ----------------------------------------------------------------------------------------------
# The launcher against the float64 fold and the reference backend
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_many_shapes_in_one_launch_match_the_float64_fold(dtype, count_launches):
    ws, ls, rs, scales = make_items(SHAPES, dtype)
    outs = F.fold(ws, ls, rs, scales)
    check_items(outs, ws, ls, rs, scales, "fold")
    assert len(count_launches.launches) == 1, (
        f"expected one launch for one dtype group, got {len(count_launches.launches)}")
    assert not count_launches.launches[0]["UNIT_COLS"], "transposed lefts: strides are runtime"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_low_precision_factors(dtype):
    """Factors in the weight's own low precision (ops.fold accepts them): upcast before the dot."""
    ws, ls, rs, scales = make_items(SHAPES[:4], dtype, factor_dtype=dtype)
    check_items(F.fold(ws, ls, rs, scales), ws, ls, rs, scales, "low-precision factors")


def test_items_of_different_dtypes_launch_once_per_dtype_group(count_launches):
    """Interleaved items of six (weight, left, right) dtype groups (fp64 factors of an fp32 weight
    are rounded to fp32 first, as the reference does): six launches, each result as if folded
    alone."""
    groups = [(torch.float32, None), (torch.bfloat16, None), (torch.float64, None),
              (torch.bfloat16, torch.bfloat16), (torch.float16, None), (torch.float32, F64)]
    ws, ls, rs, scales = [], [], [], []
    for j, shape in enumerate(SHAPES[:4] * 3):
        dtype, factor_dtype = groups[j % len(groups)]
        w, left, right, s = make_items([shape], dtype, factor_dtype)
        ws += w
        ls += left
        rs += right
        scales.append(s)
    scales = torch.cat(scales)
    outs = F.fold(ws, ls, rs, scales)
    check_items(outs, ws, ls, rs, scales, "mixed dtypes")
    got = sorted(str((a["W_DTYPE"], a["L_DTYPE"], a["R_DTYPE"])) for a in count_launches.launches)
    want = sorted({str((w.dtype, left.dtype, right.dtype)) for w, left, right in zip(ws, ls, rs)})
    assert len(count_launches.launches) == len(want) == 6, (
        f"expected one launch per dtype group {want}, got {got}")
    assert len(set(got)) == 6, f"two launches for one dtype group: {got}"


def test_many_items_exercise_the_tile_search(count_launches):
    """37 items (some empty, some with k = 0) in one launch: the binary search over the items'
    first tiles must give every program its own item."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(int(torch.randint(1, 70, (), generator=gen)),
               int(torch.randint(1, 140, (), generator=gen)),
               int(torch.randint(0, 20, (), generator=gen))) for _ in range(34)]
    shapes += [(0, 5, 3), (4, 0, 2), (6, 5, 0)]
    ws, ls, rs, scales = make_items(shapes, torch.float32)
    check_items(F.fold(ws, ls, rs, scales), ws, ls, rs, scales, "37 items")
    assert len(count_launches.launches) == 1, "expected one launch"


def test_empty_list_and_empty_items(count_launches):
    assert F.fold([], [], [], torch.zeros(0, dtype=F64)) == [], "fold of no items returns []"
    assert count_launches.launches == [], "fold of no items launched a kernel"
    ws, ls, rs, scales = make_items([(0, 4, 2), (3, 0, 2)], torch.float32)
    outs = F.fold(ws, ls, rs, scales)
    assert [tuple(o.shape) for o in outs] == [(0, 4), (3, 0)], "empty items keep their shapes"
    assert count_launches.launches == [], "empty items launched a kernel"


def test_k_zero_and_signed_zeros():
    """k = 0: W + s * 0, so -0.0 + 0.0 = +0.0, bit for bit as the reference. An exactly zero
    product sum is +0.0 in the kernel (its accumulator starts at +0.0, as any blocked GEMM's),
    where torch's k = 1 matmul may keep -0.0: results agree as values (-0.0 == +0.0)."""
    w = torch.tensor([[-0.0, 1.0], [2.0, -0.0]])
    cases = [(w, torch.zeros(2, 0), torch.zeros(0, 2), 0.5, True),
             (w, torch.tensor([[0.0], [1.0]]), torch.tensor([[-0.0, 3.0]]), -2.0, False)]
    for i, (w, left, right, s, bitwise) in enumerate(cases):
        scales = torch.tensor([s], dtype=F64)
        out = F.fold([w], [left], [right], scales)[0]
        ref = reference.fold_weight(w, left, right, scales[0])
        same = bits_equal(out, ref) if bitwise else torch.equal(out, ref)
        assert same, f"case {i}: {out.tolist()} != reference {ref.tolist()}"


def test_bf16_rounds_to_nearest_even_like_torch():
    """The interpreter's fp32 -> bf16 cast truncates: the kernel rounds by hand there. Values
    just above a bf16 midpoint, ties, overflow to inf and a subnormal must round as torch."""
    vals = torch.tensor([1.0 + 2**-8 + 2**-20, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                         -(1.0 + 2**-8 + 2**-20),
                         3.39e38, 1e-39, -2.5, 0.0])
    w = torch.zeros(len(vals), 1, dtype=torch.bfloat16)
    left, right = vals.view(-1, 1), torch.ones(1, 1)
    out = F.fold([w], [left], [right], torch.ones(1, dtype=F64))[0]
    ref = reference.fold_weight(w, left, right, 1.0)
    assert bits_equal(out, ref), (
        f"bf16 rounding: {out.view(-1).tolist()} != {ref.view(-1).tolist()}")


def test_poisoned_outputs_every_element_is_written(poison_allocations):
    """Outputs start as NaN (through the shared `_new` hook): an unwritten element fails."""
    allocated = poison_allocations(F)
    ws, ls, rs, scales = make_items(SHAPES, torch.float32)
    check_items(F.fold(ws, ls, rs, scales), ws, ls, rs, scales, "poisoned")
    assert len(allocated) == len(SHAPES), "the launcher did not allocate through _new"


def test_inputs_are_untouched():
    ws, ls, rs, scales = make_items(SHAPES, torch.bfloat16)
    before = [t.clone() for t in ws + ls + rs + [scales]]
    F.fold(ws, ls, rs, scales)
    for i, (t, b) in enumerate(zip(ws + ls + rs + [scales], before)):
        assert bits_equal(t, b), f"input tensor {i} was modified"


def test_every_dot_tile_dimension_is_at_least_16(dot_tile_shapes):
    """k = 1, a single row and a single column must still give tl.dot tiles >= 16."""
    shapes = dot_tile_shapes(F)
    ws, ls, rs, scales = make_items([(1, 1, 1), (100, 1, 1), (1, 7, 3)], torch.float32)
    check_items(F.fold(ws, ls, rs, scales), ws, ls, rs, scales, "tiny")
    assert shapes, "no tl.dot was traced"
    small = [s for s in shapes if min(s[0] + s[1]) < 16]
    assert not small, f"tl.dot operand tiles below 16: {sorted(set(small))}"
    for acc, dot in ((torch.float32, triton.language.float32), (F64, triton.language.float64),
                     (torch.float32, triton.language.bfloat16)):
        assert min(F._blocks(acc, dot)[:3]) >= 16, f"block sizes {F._blocks(acc, dot)}"


def test_launcher_refuses_inconsistent_shapes():
    w, left, right = torch.randn(4, 6), torch.randn(4, 3), torch.randn(2, 6)
    with pytest.raises(ValueError, match="item 0"):
        F.fold([w], [left], [right], torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="scales"):
        F.fold([w], [left], [torch.randn(3, 6)], torch.ones(2, dtype=F64))


def test_cpu_without_the_interpreter_falls_back_to_the_reference(monkeypatch, forbid_launches):
    monkeypatch.setattr(K, "_INTERPRET", False)   # read by _runs_here
    monkeypatch.setattr(F, "_INTERPRET", False)
    forbid_launches(F, "_fold_kernel")
    ws, ls, rs, scales = make_items(SHAPES, torch.float32)
    for i, (out, ref) in enumerate(zip(F.fold(ws, ls, rs, scales),
                                       fold_reference_backend(ws, ls, rs, scales))):
        assert bits_equal(out, ref), f"fallback item {i} differs from the reference"


# ----------------------------------------------------------------------------------------------
# Through the custom op and the models
# ----------------------------------------------------------------------------------------------

def test_triton_backend_is_registered_for_fold_weights():
    assert "triton" in pyadapt.available_backends(), "triton backend not available"
    assert "triton" in pyadapt.ops.kernel_table()["fold_weights"], "fold_weights has no triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_opcheck_with_the_triton_backend(dtype, count_launches):
    ws, ls, rs, scales = make_items([(6, 8, 6), (6, 1, 6), (3, 5, 2)], dtype)
    with pyadapt.use_backend("triton"):
        result = torch.library.opcheck(torch.ops.pyadapt.fold_weights.default, (ws, ls, rs, scales))
        assert all(v == "SUCCESS" for v in result.values()), f"opcheck fold_weights: {result}"
        n = len(count_launches.launches)
        outs = torch.ops.pyadapt.fold_weights(ws, ls, rs, scales)
    assert n >= 1 and len(count_launches.launches) == n + 1, "the op did not run the triton kernel"
    check_items(outs, ws, ls, rs, scales, "op")


class Model(nn.Module):
    """Every foldable kind: R-Adapter full and low rank with bias (weight + bias column terms),
    LoRA, and an Aurora CPAdapter with a wide site (16 -> 48: three blocks) and a square one."""

    def __init__(self, dtype):
        super().__init__()
        self.attn = pyadapt.RAdapter(nn.Linear(16, 16, dtype=dtype), rank=None, eval_scale=0.8)
        self.mlp = pyadapt.RAdapter(nn.Linear(40, 16, dtype=dtype), rank=3)
        self.lora = pyadapt.LowRankAdapter(nn.Linear(16, 24, bias=False, dtype=dtype), rank=4,
                                           alpha=8)
        self.cp = pyadapt.CPAdapter([nn.Linear(16, 48, dtype=dtype),
                                     nn.Linear(16, 16, dtype=dtype)], rank=4, width=16, dropout=0.0)


def build(dtype):
    torch.manual_seed(5)
    model = Model(dtype)
    with torch.no_grad():   # random adapter weights (several are zero-initialised)
        for m in model.modules():
            if isinstance(m, pyadapt._module.AdapterModule):
                for name, t in m.adapter_tensors():
                    if name == "scale":
                        t.fill_(0.4)
                    else:
                        t.copy_(torch.randn(t.shape) / t.shape[-1] ** 0.5)
    return model.eval()


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_fold_model_with_triton_equals_the_reference_backend(dtype, count_launches):
    model = build(dtype)
    original = params(model)
    with pyadapt.use_backend("reference"):
        pyadapt.fold_(model, alpha=0.7)
    by_reference = params(model)
    pyadapt.unfold_(model)
    with pyadapt.use_backend("triton"):
        names = pyadapt.fold_(model, alpha=0.7)
    by_triton = params(model)
    assert sorted(names) == ["attn", "cp.sites.0", "cp.sites.1", "lora", "mlp"], names
    # 7 terms (2 R-Adapters x (weight, bias), LoRA, 2 CP sites), all of one dtype group
    assert len(count_launches.launches) == 1, (
        f"fold_ launched {len(count_launches.launches)} kernels for one dtype group")
    assert count_launches.launches[0]["UNIT_COLS"], "row-major terms: unit column strides"
    # each term's result against the reference backend's (up to the k-sum order) and the
    # float64 fold of the same factors
    pyadapt.unfold_(model)
    name_of = {id(p): k for k, p in model.named_parameters()}
    terms = [t for m in model.modules() if isinstance(m, (pyadapt.RAdapter, pyadapt.LowRankAdapter,
                                                         pyadapt.CPLinear))
             for t in m.fold_terms(0.7, False)]
    assert len(terms) == 7, f"expected 7 fold terms, got {len(terms)}"
    for t in terms:
        k = name_of[id(t.target)]
        out, ref = by_triton[k].view_as(t.matrix), by_reference[k].view_as(t.matrix)
        assert not bits_equal(ref, original[k]), f"{k}: the fold changed nothing"
        assert_close_rel(out, reference.fold_weight(t.matrix.double(), t.left.double(),
                                                    t.right.double(), t.scale),
                         dtype, f"{k} vs float64 fold")
        assert_same_fold_up_to_sum_order(out, ref, t.matrix, t.left, t.right, t.scale, k)
    pyadapt.unfold_(model)
    for k, v in params(model).items():
        assert bits_equal(v, original[k]), f"{k}: unfold_ did not restore the original bits"


# ----------------------------------------------------------------------------------------------
# GPU: the linears of a ViT-B/16 (12 blocks, width 768, MLP 3072), compiled kernel
# ----------------------------------------------------------------------------------------------

def _require_gpu():
    if not torch.cuda.is_available():
        pytest.fail("GPU test without a CUDA device: deselect with -m 'not gpu'")


def vit_b16_items(dtype, factor_dtype, device):
    """Per block: R-Adapter full rank on attn out_proj (768 x 768, L = W_f 768 x 768) and on
    mlp c_proj (768 x 3072), each with its bias column; LoRA r = 16 on in_proj (2304 x 768) and
    c_fc (3072 x 768). Factors in the accumulation dtype (as fold_terms gives them) or in bf16
    (the tensor-core path). All row-major, as a model's parameters."""
    shapes = []
    for _ in range(12):
        shapes += [(768, 768, 768), (768, 1, 768), (768, 3072, 768), (768, 1, 768),
                   (2304, 768, 16), (3072, 768, 16)]
    ws, ls, rs, scales = make_items(shapes, dtype, factor_dtype, strided=False, transposed=False)
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return move(ws), move(ls), move(rs), scales.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,factor_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                                (torch.bfloat16, torch.bfloat16)],
                         ids=["bf16", "fp32", "bf16-bf16factors"])
def test_gpu_vit_b16_linears_match_the_reference(dtype, factor_dtype, count_launches):
    _require_gpu()
    torch.manual_seed(0)
    ws, ls, rs, scales = vit_b16_items(dtype, factor_dtype, "cuda")
    before = [t.clone() for t in ws + ls + rs]
    with pyadapt.use_backend("triton"):
        outs = pyadapt.ops.fold(ws, ls, rs, scales)
    torch.cuda.synchronize()
    assert len(count_launches.launches) == 1, "expected one launch for the whole model"
    assert count_launches.launches[0]["UNIT_COLS"], "row-major parameters: unit column strides"
    check_items(outs, ws, ls, rs, scales, "ViT-B/16")
    for i, (t, b) in enumerate(zip(ws + ls + rs, before)):
        assert bits_equal(t, b), f"input tensor {i} was modified"
