"""Triton kernels of the grouped-linear bank: N full-rank adapters, each row of z by its own.

    y[m] = z[m] + c[a] * z[m] W[a]^T      a = ids[m] >= 0
    y[m] = z[m]                           ids[m] == -1

W stacked (N, d, d), c (N,). The maths is pyadapt/ops/bank_linear.py's reference backend (a loop
over ids); these kernels must match it.

Grouping without a host sync is kernels/bank.py's (its `_Segments` and `_tile_positions` are
reused): a stable device sort of id + 1 gives `perm` (sorted position -> row), searchsorted the
segment bounds, a cumsum of ceil(count / BLOCK_M) each segment's first tile. The row kernel's
grid is fixed by M, N and d: (cdiv(M, BLOCK_M) + N + 1) row tiles x cdiv(d, BLOCK_N) column
blocks; a program past the last tile finds an empty range and writes nothing.

Forward and dz are one kernel, a grouped GEMM with the identity added:
    out[m, j] = in[m, j] + c[a] * sum_k in[m, k] V[a, j, k]
with (in, V) = (z, W) for y and (grad_y, W^T) for dz = g + c g W (W^T is W read with swapped
strides, no copy). Tiles of segment 0 (the -1 rows) skip the k-loop and copy.

dW and dc: program (a, t) owns tile t (BLOCK_I x BLOCK_J) of adapter a's d x d matrix and sums
G^T Z over the adapter's rows in sorted order, BLOCK_M rows at a time: no atomics, one fixed
order, so gradients are bit-identical run to run. It stores dW[a] = c[a] * G^T Z for its tile
and its share <G^T Z, W[a]> of dc[a] into a (N, tiles) partial table, summed per adapter by one
torch reduction (deterministic: no atomics). Grid (N, tiles), fixed by N and d. Adapters with
no rows get exact zeros.

Interpreter rules are kernels/bottleneck.py's (whose helpers are reused): loads upcast right
after tl.load, fp32 dot operands under the interpreter (bf16 dot is wrong there), every dot tile
>= 16. c is rounded to z's dtype by torch in the launcher (the interpreter's fp32 -> bf16 cast
truncates).
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .bank import _Segments, _tile_positions
from .bottleneck import _INTERPRET, _TL_DTYPES, _acc_dtype, _dot, _dot_dtype, _load_tile

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Forward (and dz): a grouped GEMM over rows sorted by adapter id
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bank_linear_rows_kernel(
        in_ptr, out_ptr, w_ptr, c_ptr, perm_ptr, seg_row_ptr, tile_start_ptr,
        D, NSEG,
        stride_im, stride_id, stride_om, stride_od, stride_wn, stride_wj, stride_wk,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, SEG_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows, cols] = in[rows, cols] + c[a] * in[rows, :] V[a, cols, :]^T for one tile of
    BLOCK_M sorted rows of one segment and BLOCK_N output columns."""
    s, first, seg_end = _tile_positions(seg_row_ptr, tile_start_ptr, tl.program_id(0), NSEG,
                                        BLOCK_M, SEG_PAD)
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < seg_end
    rows = tl.load(perm_ptr + pos, mask=row_ok, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    is_adapter = s > 0                      # segment 0: rows without an adapter (id -1)
    a = tl.maximum(s - 1, 0).to(tl.int64)
    w = w_ptr + a * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    k_end = tl.where(is_adapter & (first < seg_end), D, 0)   # pass-through tiles read no W
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        lhs = _load_tile(in_ptr, rows, ks, stride_im, stride_id, row_ok, k_ok, ACC)
        rhs = _load_tile(w, ks, cols, stride_wk, stride_wj, k_ok, col_ok, ACC)
        acc += _dot(lhs, rhs, DOT_DTYPE)
    c = tl.load(c_ptr + a).to(ACC)
    base = _load_tile(in_ptr, rows, cols, stride_im, stride_id, row_ok, col_ok, ACC)
    out = tl.where(is_adapter, base + acc * c, base)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: dW and dc per adapter
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bank_linear_weight_kernel(
        g_ptr, z_ptr, w_ptr, c_ptr, perm_ptr, seg_row_ptr, dw_ptr, dc_part_ptr,
        D, N_TILES_J,
        stride_gm, stride_gd, stride_zm, stride_zd, stride_wn, stride_wi, stride_wj,
        stride_dwn, stride_dwi, stride_dwj,
        NEED_DW: tl.constexpr, NEED_DC: tl.constexpr, ACC: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr):
    """Program (a, t): P = G^T Z on tile t of adapter a, its rows summed in sorted order;
    dW[a] tile = c[a] P, dc partial (a, t) = sum(P * W[a] tile)."""
    a = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    ti = t // N_TILES_J
    tj = t % N_TILES_J
    start = tl.load(seg_row_ptr + a + 1)    # segment a + 1 holds adapter a
    end = tl.load(seg_row_ptr + a + 2)
    ci = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    cj = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = ci < D
    j_ok = cj < D
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC)
    for m0 in range(start, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        ok = pos < end
        rows = tl.load(perm_ptr + pos, mask=ok, other=0)
        g = _load_tile(g_ptr, rows, ci, stride_gm, stride_gd, ok, i_ok, ACC)
        z = _load_tile(z_ptr, rows, cj, stride_zm, stride_zd, ok, j_ok, ACC)
        acc += _dot(tl.trans(g), z, DOT_DTYPE)
    if NEED_DW:
        c = tl.load(c_ptr + a).to(ACC)
        tl.store(dw_ptr + a * stride_dwn + ci[:, None] * stride_dwi + cj[None, :] * stride_dwj,
                 (acc * c).to(dw_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])
    if NEED_DC:
        w = _load_tile(w_ptr + a * stride_wn, ci, cj, stride_wi, stride_wj, i_ok, j_ok, ACC)
        tl.store(dc_part_ptr + a * tl.num_programs(1) + t, tl.sum(tl.sum(acc * w, 1), 0))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _new(t: Tensor) -> Tensor:
    """Every buffer the launchers allocate passes through here (tests poison them with NaN)."""
    return t


def _runs_here(t: Tensor) -> bool:
    return t.is_cuda or _INTERPRET


def _row_blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the row kernel, fixed per device: BLOCK_M sets the tile
    table (built before the launch, so it cannot be autotuned). Under the interpreter 32s, so
    the test sizes (d 40, 72) cross column and k blocks."""
    if _INTERPRET:
        return 32, 32, 32
    return 64, 64, 32


def _weight_blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_I, BLOCK_J) of the dW kernel; BLOCK_M sets the order of the row sums."""
    if _INTERPRET:
        return 32, 32, 32
    return 32, 64, 64


def _c_table(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """c rounded to z's dtype (the reference's scale[a].to(z.dtype)), held in the accumulation
    dtype: a device-side cast, no host read."""
    return scale.detach().to(dtype).to(_acc_dtype(dtype)).contiguous()


def _rows_launch(src: Tensor, out: Tensor, weight: Tensor, c: Tensor, seg: _Segments,
                 transpose: bool) -> None:
    m, d = src.shape
    block_m, block_n, block_k = _row_blocks()
    tile_start = seg.starts(block_m)
    stride_wj, stride_wk = weight.stride(1), weight.stride(2)
    if transpose:
        stride_wj, stride_wk = stride_wk, stride_wj
    grid = (triton.cdiv(m, block_m) + seg.nseg, triton.cdiv(d, block_n))
    _bank_linear_rows_kernel[grid](
        src, out, weight, c, seg.perm, seg.seg_row, tile_start, d, seg.nseg,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1), weight.stride(0),
        stride_wj, stride_wk,
        ACC=_TL_DTYPES[_acc_dtype(src.dtype)], DOT_DTYPE=_dot_dtype(src.dtype),
        SEG_PAD=seg.seg_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def _fallback_reference():
    from pyadapt.ops import bank_linear as ops
    return ops._reference_forward, ops._reference_backward


def forward(z: Tensor, ids: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """y (M, d) in z's dtype; z (M, d), ids (M,) int64 in [-1, N), weight (N, d, d), scale (N,)
    (checked by pyadapt.ops.bank_linear). CPU tensors without TRITON_INTERPRET=1 run the
    reference loop."""
    if not _runs_here(z):
        return _fallback_reference()[0](z, ids, weight, scale)
    y = _new(torch.empty_like(z, memory_format=torch.contiguous_format))
    if z.shape[0] == 0:
        return y
    seg = _Segments(ids, weight.shape[0])
    _rows_launch(z, y, weight, _c_table(scale, z.dtype), seg, transpose=False)
    return y


def backward(grad_y: Tensor, z: Tensor, ids: Tensor, weight: Tensor, scale: Tensor,
             needs: List[bool]) -> List[Tensor]:
    """[dz, dW, dc] as pyadapt.ops._grads.pack returns them (empty placeholders where not
    wanted)."""
    from pyadapt.ops import _grads

    if not _runs_here(z):
        return _fallback_reference()[1](grad_y, z, ids, weight, scale, needs)
    inputs = [z, weight, scale]
    need_dz, need_dw, need_dc = _grads.wanted(inputs, needs)
    outs = [_new(t) for t in _grads.fake(inputs, needs, z)]
    m, d = z.shape
    n = weight.shape[0]
    if m == 0:
        for i in (1, 2):
            if (need_dw, need_dc)[i - 1]:
                outs[i].zero_()     # a sum over no rows
        return outs
    g = grad_y if grad_y.dtype == z.dtype else grad_y.to(z.dtype)
    seg = _Segments(ids, n)
    c = _c_table(scale, z.dtype)
    if need_dz:
        _rows_launch(g, outs[0], weight, c, seg, transpose=True)
    if not (need_dw or need_dc):
        return outs
    acc = _acc_dtype(z.dtype)
    block_m, block_i, block_j = _weight_blocks()
    tiles_j = triton.cdiv(d, block_j)
    tiles = triton.cdiv(d, block_i) * tiles_j
    dw = outs[1] if need_dw else weight
    dc_part = _new(torch.empty((n, tiles), dtype=acc, device=z.device)) if need_dc else c
    _bank_linear_weight_kernel[(n, tiles)](
        g, z, weight, c, seg.perm, seg.seg_row, dw, dc_part, d, tiles_j,
        g.stride(0), g.stride(1), z.stride(0), z.stride(1), weight.stride(0), weight.stride(1),
        weight.stride(2), dw.stride(0), dw.stride(1), dw.stride(2),
        NEED_DW=need_dw, NEED_DC=need_dc, ACC=_TL_DTYPES[acc], DOT_DTYPE=_dot_dtype(z.dtype),
        BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4)
    if need_dc:
        # per adapter, its tiles' shares in tile order (a plain reduction: no atomics)
        outs[2].copy_(dc_part.sum(1))
    return outs
