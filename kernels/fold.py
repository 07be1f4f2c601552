"""Triton kernel of the grouped fold op `pyadapt::fold_weights` (DESIGN.md 7.3, 7.5).

    W'_i = round_to(W_i.dtype)(W_i + s_i * L_i @ R_i)      for every item i, in one launch

W_i (rows x cols), L_i (rows x k), R_i (k x cols), s_i = scales[i] (float64). Accumulated in
float32 (float64 for float64 weights), rounded once, exactly as `pyadapt.reference.fold_weight`
(which defines the maths): L and R are rounded to the accumulation dtype, the product is summed
in it, then W + s * (L @ R) with s rounded to it. R-Adapter: L = W_f (or W_u), R = W_o (or
W_d W_o), and the bias as an (out x 1) column; LoRA: L = B, R = A; Aurora CP: L = blockdiag V,
R = K^T blockdiag U.

Plan (grouped GEMM over a flattened tile space):
  host      one small int64 table per launch, a row per item: pointers of W, L, R and the output,
            rows, cols, k, all strides, the item's scale index and the index of its first tile
            in the flattened (item, row tile, col tile) space. Items are ordered by decreasing k,
            so the longest tiles start first (the GPU's tail is made of short ones).
  kernel    program p finds its item by a binary search over the first-tile column (ceil(log2 n)
            scalar loads, no per-tile table), then its (row tile, col tile) inside the item,
            accumulates L[rows, :] @ R[:, cols] over k in BLOCK_K steps (k padded to >= 16 by
            masks), then out = W + s * acc in ACC, stored once in W's dtype.
One launch per (weight dtype, left dtype, right dtype) group: the pointer types are compile-time
constants. A model normally has one group (every weight in one dtype, factors in its
accumulation dtype), so `pyadapt.fold_` costs one launch per device.

Rounding: out-of-place results, one rounding of W + s * acc. No atomics, each output element is
written by exactly one program, in a fixed k order: two runs are bit-identical. The order of the
k sum differs from torch's matmul, so results can differ from the reference backend by one ulp
of the output plus the error bound of two summation orders, 2 k u |s| |L| |R| (u the unit
roundoff of the accumulation dtype); items with k <= 1 are equal bit for bit (up to the sign of
an exactly zero product, +0.0 here: the accumulator starts at +0.0). On the GPU fp32 operands use
input_precision="ieee" (no tf32, like torch's default matmul) and FMA contraction is disabled so
that s * acc and + W round separately, as the reference does.

Interpreter rules (TRITON_INTERPRET=1 on CPU, see ENVIRONMENT.md): pointer tables work (int64
loaded and cast to a pointer type); loads are upcast right after tl.load; tl.dot gets fp32/fp64
operands there; every dot tile dimension is >= 16; no tl.make_block_ptr. The interpreter's
fp32 -> bf16 cast truncates (and mangles subnormals): there bf16 results are rounded to nearest
even by integer arithmetic on the fp32 bits and stored as raw 16-bit patterns, so bf16 results
equal torch's rounding bit for bit.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

# shared with the bottleneck kernels: interpreter flag, dtype maps, the fp32/fp64/tensor-core dot
# switch, the masked upcasting tile load, and `_new`, the allocation hook the tests poison
from pyadapt.kernels.bottleneck import (_INTERPRET, _TL_DTYPES, _acc_dtype, _dot, _load_tile,
                                        _new, _runs_here)

Tensor = torch.Tensor

# Columns of the item table (int64, one row per item).
_W, _L, _R, _OUT, _ROWS, _COLS, _K = 0, 1, 2, 3, 4, 5, 6
_S_WM, _S_WN, _S_LM, _S_LK, _S_RK, _S_RN, _S_OM, _S_ON = 7, 8, 9, 10, 11, 12, 13, 14
_SCALE_INDEX, _FIRST_TILE = 15, 16
_TABLE_WIDTH = 17


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _round_bf16_bits(y):
    """fp32 -> bf16 bit pattern (uint16), round to nearest even; NaN -> 0x7FC0 as torch does.
    Used under the interpreter only, whose own cast truncates."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(y != y, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _fold_kernel(
        table_ptr, first_tiles_ptr, scales_ptr, N_ITEMS,
        W_DTYPE: tl.constexpr, L_DTYPE: tl.constexpr, R_DTYPE: tl.constexpr,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, BF16_BITS: tl.constexpr,
        UNIT_COLS: tl.constexpr,
        SEARCH_STEPS: tl.constexpr, TABLE_WIDTH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)

    # item = the last i with first_tile[i] <= pid (first_tiles is non-decreasing, [0] = 0; an
    # empty item repeats its successor's start and is skipped). Invariant: first[lo] <= pid <
    # first[hi], first[N_ITEMS] = the tile count; mid < hi <= N_ITEMS, so no load is past the end.
    lo = tl.zeros((), tl.int64)
    hi = lo + N_ITEMS
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(first_tiles_ptr + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    row = table_ptr + lo * TABLE_WIDTH

    w_ptr = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
    l_ptr = tl.load(row + 1).to(tl.pointer_type(L_DTYPE))
    r_ptr = tl.load(row + 2).to(tl.pointer_type(R_DTYPE))
    n_rows = tl.load(row + 4)
    n_cols = tl.load(row + 5)
    k = tl.load(row + 6)
    s_wm, s_lm = tl.load(row + 7), tl.load(row + 9)
    s_rk, s_om = tl.load(row + 11), tl.load(row + 13)
    if UNIT_COLS:
        # every matrix of the group is row-major (column stride 1): a compile-time stride lets
        # the GPU coalesce and vectorise the loads along columns
        s_wn, s_lk, s_rn, s_on = 1, 1, 1, 1
    else:
        s_wn, s_lk = tl.load(row + 8), tl.load(row + 10)
        s_rn, s_on = tl.load(row + 12), tl.load(row + 14)
    scale = tl.load(scales_ptr + tl.load(row + 15)).to(ACC)   # rounded to ACC, as the reference

    tile = pid - tl.load(first_tiles_ptr + lo)
    col_tiles = tl.cdiv(n_cols, BLOCK_N)
    rows = (tile // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols

    # acc = L[rows, :] @ R[:, cols]; k (1 for a rank-1 term) padded to BLOCK_K >= 16 by masks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        left = _load_tile(l_ptr, rows, ks, s_lm, s_lk, row_ok, k_ok, ACC)
        right = _load_tile(r_ptr, ks, cols, s_rk, s_rn, k_ok, col_ok, ACC)
        acc += _dot(left, right, DOT_DTYPE).to(ACC)

    w = _load_tile(w_ptr, rows, cols, s_wm, s_wn, row_ok, col_ok, ACC)
    out = w + scale * acc
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * s_om + cols[None, :] * s_on
    if BF16_BITS:
        out_bits = tl.load(row + 3).to(tl.pointer_type(tl.uint16))
        tl.store(out_bits + offs, _round_bf16_bits(out), mask=mask)
    else:
        out_ptr = tl.load(row + 3).to(tl.pointer_type(W_DTYPE))
        tl.store(out_ptr + offs, out.to(W_DTYPE), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def _blocks(acc: torch.dtype, dot_dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Fixed, not autotuned: a fold runs once per model,
    so benchmarking configs would cost more than the fold. Under the interpreter few, wide
    programs (each costs ~0.5 ms of Python). On the GPU: 128 x 128 tiles with bf16/fp16 tensor-core
    operands; fp32 (ieee, no tensor cores) and fp64 operands keep 64 x 64 to hold registers."""
    if _INTERPRET:
        return 64, 128, 64, 4
    if dot_dtype in (tl.bfloat16, tl.float16):
        return 128, 128, 32, 8
    if acc == torch.float64:
        return 64, 64, 16, 4
    return 64, 64, 32, 4


def _dot_dtype_for(left: Tensor, right: Tensor, acc: torch.dtype):
    """bf16/fp16 factors of an fp32-accumulated fold feed the tensor cores on the GPU (their
    products are exact in fp32); everything else (and the interpreter) dots in ACC."""
    if (left.dtype == right.dtype and left.dtype in (torch.bfloat16, torch.float16)
            and acc == torch.float32 and not _INTERPRET):
        return _TL_DTYPES[left.dtype]
    return _TL_DTYPES[acc]


def _launch_group(items: list[int], weights, lefts, rights, outs, scales: Tensor) -> None:
    """One launch for items sharing (weight dtype, left dtype, right dtype)."""
    w0, l0, r0 = weights[items[0]], lefts[items[0]], rights[items[0]]
    acc = _acc_dtype(w0.dtype)
    dot_dtype = _dot_dtype_for(l0, r0, acc)
    block_m, block_n, block_k, num_warps = _blocks(acc, dot_dtype)
    # longest k first: on the GPU the last wave is made of the cheapest tiles
    items = sorted(items, key=lambda i: -lefts[i].shape[1])
    rows, first_tiles, total = [], [], 0
    for i in items:
        w, left, right, out = weights[i], lefts[i], rights[i], outs[i]
        first_tiles.append(total)
        total += triton.cdiv(w.shape[0], block_m) * triton.cdiv(w.shape[1], block_n)
        rows.append([w.data_ptr(), left.data_ptr(), right.data_ptr(), out.data_ptr(),
                     w.shape[0], w.shape[1], left.shape[1], *w.stride(), *left.stride(),
                     *right.stride(), *out.stride(), i, first_tiles[-1]])
    first_tiles.append(total)
    # a column stride is irrelevant where there is one column (a bias column, k = 1)
    unit_cols = all(t.stride(1) == 1 or t.shape[1] <= 1 for i in items
                    for t in (weights[i], lefts[i], rights[i], outs[i]))
    device = w0.device
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    starts = torch.tensor(first_tiles, dtype=torch.int64).to(device)
    _fold_kernel[(total,)](
        table, starts, scales, len(items),
        W_DTYPE=_TL_DTYPES[w0.dtype], L_DTYPE=_TL_DTYPES[l0.dtype], R_DTYPE=_TL_DTYPES[r0.dtype],
        ACC=_TL_DTYPES[acc], DOT_DTYPE=dot_dtype,
        BF16_BITS=_INTERPRET and w0.dtype == torch.bfloat16, UNIT_COLS=unit_cols,
        SEARCH_STEPS=max(1, len(items).bit_length()), TABLE_WIDTH=_TABLE_WIDTH,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, enable_fp_fusion=False)


def _check(weights, lefts, rights, scales) -> None:
    """The kernel trusts these (a wrong shape reads out of bounds): check them, cheaply."""
    n = len(weights)
    if len(lefts) != n or len(rights) != n or scales.shape != (n,):
        raise ValueError(f"fold: expected {n} lefts, rights and scales, got {len(lefts)}, "
                         f"{len(rights)}, {tuple(scales.shape)}")
    if scales.dtype != torch.float64:
        raise TypeError(f"scales: expected float64, got {scales.dtype}")
    for i, (w, left, right) in enumerate(zip(weights, lefts, rights)):
        k = left.shape[1] if left.dim() == 2 else -1
        if w.dim() != 2 or tuple(left.shape) != (w.shape[0], k) or \
                tuple(right.shape) != (k, w.shape[1]):
            raise ValueError(f"fold: item {i}: expected weight (rows, cols), left (rows, k), "
                             f"right (k, cols), got {tuple(w.shape)}, {tuple(left.shape)}, "
                             f"{tuple(right.shape)}")
        for name, t in (("weights", w), ("lefts", left), ("rights", right)):
            if t.dtype not in _TL_DTYPES:
                raise TypeError(f"{name}[{i}]: expected float32/float64/bfloat16/float16, "
                                f"got {t.dtype}")
            if t.device != weights[0].device:
                raise ValueError(f"{name}[{i}]: expected device {weights[0].device}, "
                                 f"got {t.device}")


def fold(weights: List[Tensor], lefts: List[Tensor], rights: List[Tensor],
         scales: Tensor) -> List[Tensor]:
    """[round_to(W_i.dtype)(W_i + s_i L_i R_i)] as new tensors (inputs untouched), each laid out
    like W_i (torch.empty_like, as the op's fake rule). scales: float64 (n,), on the weights'
    device. One launch per (weight, left, right) dtype group. CPU tensors without
    TRITON_INTERPRET=1 fall back to the reference."""
    if not weights:
        return []
    if not _runs_here(weights[0]):
        from pyadapt import reference
        return [reference.fold_weight(w, left, right, scales[i])
                for i, (w, left, right) in enumerate(zip(weights, lefts, rights))]
    _check(weights, lefts, rights, scales)
    scales = scales.to(weights[0].device)
    outs = [_new(torch.empty_like(w)) for w in weights]
    groups: dict[tuple, list[int]] = {}
    for i, (w, left, right) in enumerate(zip(weights, lefts, rights)):
        if w.numel():     # nothing to write for an empty weight
            groups.setdefault((w.dtype, left.dtype, right.dtype), []).append(i)
    for items in groups.values():
        _launch_group(items, weights, lefts, rights, outs, scales)
    return outs

