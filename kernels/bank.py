"""Triton kernels of the adapter bank: N bottleneck adapters, each row of x by its own adapter.

    y[m] = residual[m] + scale[a] * up_a(act(shared_a?(act(down_a(x[m])))))   a = ids[m] >= 0
    y[m] = residual[m]                                                       ids[m] == -1

Weights are stacked: down (N, r, d), shared (N, r, r), up (N, d_out, r), biases (N, r) /
(N, d_out), scale (N,). d_out = d for bottleneck adapters; a LoRA bank (identity activation, no
bias, no shared layer) has d_out != d and its residual is the frozen base layer's output.
The maths is `pyadapt.reference.bottleneck_forward / backward` applied per id group
(pyadapt/ops/bank.py, reference backend); these kernels must match it.

Grouping without a host sync: key = id + 1 in [0, N] (segment 0 holds the rows without an
adapter). A stable device sort of the keys gives the permutation `perm` (sorted position ->
row); `searchsorted` of the sorted keys gives each segment's row range `seg_row` (N + 2
entries), and a cumsum of ceil(count / BLOCK_M) gives each segment's first tile. The grid is
fixed by M and N alone, cdiv(M, BLOCK_M) + N + 1 programs (an upper bound on the tiles),
so nothing is read back to the host: each program finds its segment by counting the tile
starts <= its id, takes BLOCK_M consecutive sorted positions of that segment, gathers their
rows through perm, applies that segment's adapter, and writes the rows back in place. Programs
past the last tile find an empty range and write nothing.

Backward (training): kernel 1 (same tiles) recomputes the r-space chain, writes dx at the
original rows and stores dpre1, h_in (dpre2, h1 with a shared layer) and each row's share of
d scale in SORTED order, so every adapter's rows are contiguous. Kernel 2 cuts each segment
into chunks of CHUNK rows (again a fixed grid, cdiv(M, CHUNK) + N chunks) and writes one fp32
partial of every weight gradient per chunk; kernel 3 sums, per adapter, its chunks' partials
in chunk order. No atomics, block sizes fixed per (r, device), so gradients are bit-identical
from run to run. Adapters that no row names get exact zeros.

Dropout (training): the r-wide input of `up` is multiplied by the inverted-dropout factors of
kernels/bottleneck.py's `_dropout_multiplier`, drawn with the ORIGINAL row index (rows = perm of
the sorted position), never the sorted position: the mask of row m is tl.rand(seed, m * r + k)
whatever group and tile the row lands in, the mask of pyadapt.reference.dropout_multiplier
over the whole batch. The backward regenerates it from the seed (nothing stored).

Interpreter rules are those of kernels/bottleneck.py (whose device helpers are reused): loads
upcast right after tl.load, fp32 dot operands under the interpreter, every dot tile >= 16.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .bottleneck import (_ACTIVATIONS, _INTERPRET, _TL_DTYPES, _acc_dtype, _act, _act_grad,
                         _dot, _dot_dtype, _dropout_multiplier, _load_tile, _r_pad,
                         _split_double)

Tensor = torch.Tensor

_NOT_STARTED = tl.constexpr(2**31 - 1)   # tile start of the padded segment slots


@triton.jit
def _segment_of(starts_ptr, idx, NSEG, SEG_PAD: tl.constexpr):
    """The segment whose tiles contain tile idx: the last s with starts[s] <= idx (starts is
    non-decreasing; empty segments share their successor's start and are skipped)."""
    segs = tl.arange(0, SEG_PAD)
    starts = tl.load(starts_ptr + segs, mask=segs < NSEG, other=_NOT_STARTED)
    return tl.sum((starts <= idx).to(tl.int32), 0) - 1


@triton.jit
def _tile_positions(seg_row_ptr, starts_ptr, idx, NSEG, TILE, SEG_PAD: tl.constexpr):
    """(segment, first sorted position, end of the segment) of tile idx of size TILE."""
    s = _segment_of(starts_ptr, idx, NSEG, SEG_PAD)
    local = idx - tl.load(starts_ptr + s)
    first = tl.load(seg_row_ptr + s) + local * TILE
    return s, first, tl.load(seg_row_ptr + s + 1)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bank_fwd_kernel(
        x_ptr, res_ptr, y_ptr, perm_ptr, seg_row_ptr, tile_start_ptr,
        wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr, scale_ptr, seed_ptr,
        D, D_OUT, R, NSEG,
        stride_xm, stride_xd, stride_resm, stride_resd, stride_ym, stride_yd,
        stride_wd_n, stride_wd_r, stride_wd_d, stride_bd_n, stride_ws_n, stride_ws_o,
        stride_ws_i, stride_bs_n, stride_wu_n, stride_wu_d, stride_wu_r, stride_bu_n,
        stride_scale, dropout_p, keep_hi, keep_mid, keep_lo,
        HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr,
        HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        ACT: tl.constexpr, ACC: tl.constexpr, OUT_ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        R_PAD: tl.constexpr, SEG_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr):
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    s, first, seg_end = _tile_positions(seg_row_ptr, tile_start_ptr, tl.program_id(0), NSEG,
                                        BLOCK_M, SEG_PAD)
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < seg_end
    rows = tl.load(perm_ptr + pos, mask=row_ok, other=0)
    is_adapter = s > 0                      # segment 0: rows without an adapter (id -1)
    work = row_ok & is_adapter              # pass-through tiles read no x and no weights
    a = tl.maximum(s - 1, 0).to(tl.int64)
    wd = wd_ptr + a * stride_wd_n
    wu = wu_ptr + a * stride_wu_n
    cols = tl.arange(0, R_PAD)
    col_ok = (cols < R) & is_adapter

    # pass 1 over d: pre1 = x W_d^T on the gathered rows
    pre1 = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        x = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, work, d_ok, ACC)
        wd_t = _load_tile(wd, offs, cols, stride_wd_d, stride_wd_r, d_ok, col_ok, ACC)
        pre1 += _dot(x, wd_t, DOT_DTYPE)

    # r-space in registers: h = drop(act(shared(act(pre1 + b_d))))
    if HAS_DOWN_BIAS:
        pre1 += tl.load(bd_ptr + a * stride_bd_n + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h = _act(pre1, ACT)
    if HAS_SHARED:
        ws_t = _load_tile(ws_ptr + a * stride_ws_n, cols, cols, stride_ws_i, stride_ws_o, col_ok,
                          col_ok, ACC)
        pre2 = _dot(h, ws_t, DOT_DTYPE)
        if HAS_SHARED_BIAS:
            pre2 += tl.load(bs_ptr + a * stride_bs_n + cols, mask=col_ok,
                            other=0.0).to(ACC)[None, :]
        h = _act(pre2, ACT)
    if HAS_DROPOUT:   # keyed by the original row, not the sorted position
        h = h * _dropout_multiplier(seed_ptr, rows, cols, R, dropout_p, keep_hi, keep_mid,
                                    keep_lo, ACC)
    h = tl.where(col_ok[None, :], h, 0.0)   # padded columns exactly zero, whatever act(0) is
    # rounded to x's dtype as the reference does (scale[a].to(x.dtype))
    scale = tl.load(scale_ptr + a * stride_scale).to(X_DTYPE).to(ACC)

    # pass 2 over d_out: y = residual + (h W_u^T + b_u) * scale, back to the original rows
    for d0 in range(0, D_OUT, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D_OUT
        wu_t = _load_tile(wu, cols, offs, stride_wu_r, stride_wu_d, col_ok, d_ok, ACC)
        u = _dot(h, wu_t, DOT_DTYPE).to(ACC)
        if HAS_UP_BIAS:
            u += tl.load(bu_ptr + a * stride_bu_n + offs, mask=d_ok & is_adapter,
                         other=0.0).to(ACC)[None, :]
        if HAS_RESIDUAL:
            base = _load_tile(res_ptr, rows, offs, stride_resm, stride_resd, row_ok, d_ok, OUT_ACC)
        else:
            base = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, row_ok, d_ok, OUT_ACC)
        y = tl.where(is_adapter, base + (u * scale).to(OUT_ACC), base)
        tl.store(y_ptr + rows[:, None] * stride_ym + offs[None, :] * stride_yd,
                 y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bank_bwd_rows_kernel(
        gy_ptr, x_ptr, dx_ptr, perm_ptr, seg_row_ptr, tile_start_ptr,
        wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr, scale_ptr, seed_ptr,
        dpre1_ptr, hin_ptr, dpre2_ptr, h1_ptr, drow_ptr,
        D, D_OUT, R, NSEG,
        stride_gm, stride_gd, stride_xm, stride_xd, stride_dxm, stride_dxd,
        stride_wd_n, stride_wd_r, stride_wd_d, stride_bd_n, stride_ws_n, stride_ws_o,
        stride_ws_i, stride_bs_n, stride_wu_n, stride_wu_d, stride_wu_r, stride_bu_n,
        stride_scale, dropout_p, keep_hi, keep_mid, keep_lo,
        HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr,
        HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        ACT: tl.constexpr,
        NEED_DX: tl.constexpr, SAVE_DOWN_UP: tl.constexpr, SAVE_SHARED: tl.constexpr,
        NEED_DSCALE: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        R_PAD: tl.constexpr, SEG_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """Per tile of one segment: recompute the r-space chain, write dx at the original rows, and
    store the (M x r) factors of the weight gradients at the SORTED positions."""
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    s, first, seg_end = _tile_positions(seg_row_ptr, tile_start_ptr, tl.program_id(0), NSEG,
                                        BLOCK_M, SEG_PAD)
    pos = first + tl.arange(0, BLOCK_M)
    row_ok = pos < seg_end
    rows = tl.load(perm_ptr + pos, mask=row_ok, other=0)
    is_adapter = s > 0
    work = row_ok & is_adapter
    a = tl.maximum(s - 1, 0).to(tl.int64)
    wd = wd_ptr + a * stride_wd_n
    wu = wu_ptr + a * stride_wu_n
    cols = tl.arange(0, R_PAD)
    col_ok = (cols < R) & is_adapter

    # pass A: pre1 = x W_d^T over d and G = g W_u, gb = g . b_u over d_out (one pass reading
    # both x and g when they have the same width, the bottleneck case)
    pre1 = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    gw = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    gb = tl.zeros((BLOCK_M,), dtype=ACC)
    for d0 in range(0, tl.maximum(D, D_OUT), BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        o_ok = offs < D_OUT
        x = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, work, d_ok, ACC)
        g = _load_tile(gy_ptr, rows, offs, stride_gm, stride_gd, work, o_ok, ACC)
        wd_t = _load_tile(wd, offs, cols, stride_wd_d, stride_wd_r, d_ok, col_ok, ACC)
        wu_t = _load_tile(wu, offs, cols, stride_wu_d, stride_wu_r, o_ok, col_ok, ACC)
        pre1 += _dot(x, wd_t, DOT_DTYPE)
        gw += _dot(g, wu_t, DOT_DTYPE)
        if NEED_DSCALE and HAS_UP_BIAS:
            b_u = tl.load(bu_ptr + a * stride_bu_n + offs, mask=o_ok & is_adapter, other=0.0)
            gb += tl.sum(g * b_u.to(ACC)[None, :], 1)
    scale = tl.load(scale_ptr + a * stride_scale).to(X_DTYPE).to(ACC)

    # r-space chain in registers (recomputed: the forward saved nothing)
    if HAS_DOWN_BIAS:
        pre1 += tl.load(bd_ptr + a * stride_bd_n + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h1 = tl.where(col_ok[None, :], _act(pre1, ACT), 0.0)
    h_in = h1
    if HAS_SHARED:
        ws_t = _load_tile(ws_ptr + a * stride_ws_n, cols, cols, stride_ws_i, stride_ws_o, col_ok,
                          col_ok, ACC)
        pre2 = _dot(h1, ws_t, DOT_DTYPE)
        if HAS_SHARED_BIAS:
            pre2 += tl.load(bs_ptr + a * stride_bs_n + cols, mask=col_ok,
                            other=0.0).to(ACC)[None, :]
        h_in = tl.where(col_ok[None, :], _act(pre2, ACT), 0.0)
    dh = gw * scale                         # d(up input) = (scale * g) W_u
    if HAS_DROPOUT:   # the forward's mask, regenerated from (seed, original row, column)
        keep = _dropout_multiplier(seed_ptr, rows, cols, R, dropout_p, keep_hi, keep_mid,
                                   keep_lo, ACC)
        h_in = h_in * keep
        dh = dh * keep
    r_mask = work[:, None] & col_ok[None, :]
    if NEED_DSCALE:
        # this row's share of d scale[a] = g . u = h_in . (g W_u) + g . b_u
        tl.store(drow_ptr + pos, tl.sum(h_in * gw, 1) + gb, mask=work)
    if HAS_SHARED:
        dpre2 = dh * _act_grad(pre2, ACT)
        ws = _load_tile(ws_ptr + a * stride_ws_n, cols, cols, stride_ws_o, stride_ws_i, col_ok,
                        col_ok, ACC)
        dh = _dot(dpre2, ws, DOT_DTYPE).to(ACC)
        if SAVE_SHARED:
            tl.store(dpre2_ptr + pos[:, None] * R + cols[None, :], dpre2, mask=r_mask)
            tl.store(h1_ptr + pos[:, None] * R + cols[None, :], h1, mask=r_mask)
    dpre1 = dh * _act_grad(pre1, ACT)
    if SAVE_DOWN_UP:
        tl.store(dpre1_ptr + pos[:, None] * R + cols[None, :], dpre1, mask=r_mask)
        tl.store(hin_ptr + pos[:, None] * R + cols[None, :], h_in, mask=r_mask)

    # pass B over d: dx = dpre1 W_d (+ g when the residual is x; pass-through rows get g or 0)
    if NEED_DX:
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs < D
            wd_r = _load_tile(wd, cols, offs, stride_wd_r, stride_wd_d, col_ok, d_ok, ACC)
            dx = _dot(dpre1, wd_r, DOT_DTYPE).to(ACC)
            if not HAS_RESIDUAL:
                dx += _load_tile(gy_ptr, rows, offs, stride_gm, stride_gd, row_ok, d_ok, ACC)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + offs[None, :] * stride_dxd,
                     dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bank_bwd_weights_kernel(
        gy_ptr, x_ptr, perm_ptr, seg_row_ptr, chunk_start_ptr,
        dpre1_ptr, hin_ptr, dpre2_ptr, h1_ptr, drow_ptr,
        p_wd_ptr, p_bd_ptr, p_ws_ptr, p_bs_ptr, p_wu_ptr, p_bu_ptr, p_ds_ptr,
        D, D_OUT, R, NSEG, N_DBLOCKS, CHUNK,
        stride_gm, stride_gd, stride_xm, stride_xd,
        NEED_WD: tl.constexpr, NEED_BD: tl.constexpr, NEED_WS: tl.constexpr,
        NEED_BS: tl.constexpr, NEED_WU: tl.constexpr, NEED_BU: tl.constexpr,
        NEED_DSCALE: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        R_PAD: tl.constexpr, SEG_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """Program (j, c): the rows of chunk c (CHUNK consecutive sorted positions of one adapter's
    segment) summed in order into partial c. j < N_DBLOCKS: columns j of dW_d, dW_u, db_u;
    j == N_DBLOCKS: the r-space sums dW_s, db_s, db_d and d scale. Every program writes its
    partial (zeros for a chunk past the last), so kernel 3 never reads an unwritten element."""
    pid_d = tl.program_id(0)
    c = tl.program_id(1)
    _, p_start, seg_end = _tile_positions(seg_row_ptr, chunk_start_ptr, c, NSEG, CHUNK,
                                          SEG_PAD)
    p_end = tl.minimum(p_start + CHUNK, seg_end)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    if pid_d < N_DBLOCKS:
        offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs < D                                    # columns of x / W_d
        o_ok = offs < D_OUT                                # columns of g / W_u
        acc_wd = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)    # dW_d^T[offs, :]
        acc_wu = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)    # dW_u[offs, :] / scale
        acc_bu = tl.zeros((BLOCK_D,), dtype=ACC)
        for m0 in range(p_start, p_end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            ok = pos < p_end
            rows = tl.load(perm_ptr + pos, mask=ok, other=0)
            if NEED_WD:
                x = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, ok, d_ok, ACC)
                dpre1 = _load_tile(dpre1_ptr, pos, cols, R, 1, ok, col_ok, ACC)
                acc_wd += _dot(tl.trans(x), dpre1, DOT_DTYPE)
            if NEED_WU or NEED_BU:
                g = _load_tile(gy_ptr, rows, offs, stride_gm, stride_gd, ok, o_ok, ACC)
                if NEED_WU:
                    h_in = _load_tile(hin_ptr, pos, cols, R, 1, ok, col_ok, ACC)
                    acc_wu += _dot(tl.trans(g), h_in, DOT_DTYPE)
                if NEED_BU:
                    acc_bu += tl.sum(g, 0)
        if NEED_WD:   # partial c of dW_d, layout (C, r, d) like one adapter's weight
            tl.store(p_wd_ptr + c * R * D + cols[None, :] * D + offs[:, None], acc_wd,
                     mask=d_ok[:, None] & col_ok[None, :])
        if NEED_WU:   # layout (C, d_out, r)
            tl.store(p_wu_ptr + c * D_OUT * R + offs[:, None] * R + cols[None, :], acc_wu,
                     mask=o_ok[:, None] & col_ok[None, :])
        if NEED_BU:
            tl.store(p_bu_ptr + c * D_OUT + offs, acc_bu, mask=o_ok)
    else:
        acc_ws = tl.zeros((R_PAD, R_PAD), dtype=ACC)
        acc_bs = tl.zeros((R_PAD,), dtype=ACC)
        acc_bd = tl.zeros((R_PAD,), dtype=ACC)
        acc_ds = tl.zeros((BLOCK_M,), dtype=ACC)
        for m0 in range(p_start, p_end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            ok = pos < p_end
            if NEED_WS or NEED_BS:
                dpre2 = _load_tile(dpre2_ptr, pos, cols, R, 1, ok, col_ok, ACC)
                if NEED_WS:
                    h1 = _load_tile(h1_ptr, pos, cols, R, 1, ok, col_ok, ACC)
                    acc_ws += _dot(tl.trans(dpre2), h1, DOT_DTYPE)
                if NEED_BS:
                    acc_bs += tl.sum(dpre2, 0)
            if NEED_BD:
                acc_bd += tl.sum(_load_tile(dpre1_ptr, pos, cols, R, 1, ok, col_ok, ACC), 0)
            if NEED_DSCALE:
                acc_ds += tl.load(drow_ptr + pos, mask=ok, other=0.0).to(ACC)
        if NEED_WS:
            tl.store(p_ws_ptr + c * R * R + cols[:, None] * R + cols[None, :], acc_ws,
                     mask=col_ok[:, None] & col_ok[None, :])
        if NEED_BS:
            tl.store(p_bs_ptr + c * R + cols, acc_bs, mask=col_ok)
        if NEED_BD:
            tl.store(p_bd_ptr + c * R + cols, acc_bd, mask=col_ok)
        if NEED_DSCALE:
            tl.store(p_ds_ptr + c, tl.sum(acc_ds, 0))


@triton.jit
def _bank_reduce_kernel(part_ptr, out_ptr, chunk_start_ptr, scale_ptr, N_ELEM, stride_scale,
                        MUL_SCALE: tl.constexpr, DIV_SCALE: tl.constexpr,
                        X_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[a, n] = (sum over adapter a's chunks, in chunk order, of part[c, n]) times scale[a]
    (MUL_SCALE: dW_u, db_u) or divided by it (DIV_SCALE: grad_scale_invariant). An adapter with
    no chunk gets exact zeros."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    a = tl.program_id(1).to(tl.int64)
    n_ok = offs < N_ELEM
    c0 = tl.load(chunk_start_ptr + a + 1)   # segment a + 1 holds adapter a
    c1 = tl.load(chunk_start_ptr + a + 2)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for c in range(c0, c1):
        acc += tl.load(part_ptr + c * N_ELEM + offs, mask=n_ok, other=0.0).to(ACC)
    if MUL_SCALE or DIV_SCALE:
        scale = tl.load(scale_ptr + a * stride_scale).to(X_DTYPE).to(ACC)
        if MUL_SCALE:
            acc = acc * scale
        if DIV_SCALE:
            acc = acc / scale
    tl.store(out_ptr + a * N_ELEM + offs, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _new(t: Tensor) -> Tensor:
    """Every buffer the launchers allocate passes through here (tests poison them with NaN)."""
    return t


def _empty(shape, dtype: torch.dtype, device) -> Tensor:
    return _new(torch.empty(shape, dtype=dtype, device=device))


def _runs_here(t: Tensor) -> bool:
    return t.is_cuda or _INTERPRET


def _blocks(r_pad: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D), fixed per (r, device): BLOCK_M sets the tile table (built before the
    launch, so it cannot be autotuned) and the order of every sum (determinism)."""
    if _INTERPRET:
        return 32, 128
    return max(16, min(64, 4096 // r_pad)), 64


def _chunk_rows(m: int, block_m: int) -> int:
    """Rows per weight-gradient chunk: one row tile under the interpreter (exercises the chunk
    reduction at test sizes); on the GPU about 256 chunks over the batch, so the partial buffers
    (chunks x r x d fp32) stay small. Depends only on (M, r, device)."""
    if _INTERPRET:
        return block_m
    return block_m * max(1, triton.cdiv(triton.cdiv(m, block_m), 256))


class _Segments:
    """The device-side grouping of rows by adapter id (no host sync): perm (sorted position ->
    row), seg_row (N + 2: first sorted position of each segment, then M), and the tile-start
    table for a given tile size."""

    def __init__(self, ids: Tensor, n_adapters: int):
        self.nseg = n_adapters + 1
        keys = ids + 1
        sorted_keys, self.perm = torch.sort(keys, stable=True)
        bounds = torch.arange(self.nseg + 1, device=ids.device, dtype=keys.dtype)
        self.seg_row = torch.searchsorted(sorted_keys, bounds)
        self.counts = self.seg_row[1:] - self.seg_row[:-1]
        self.seg_pad = max(16, triton.next_power_of_2(self.nseg))

    def starts(self, tile: int, skip_unadapted: bool = False) -> Tensor:
        """First tile of each segment (N + 2 entries, the last the total) for tiles of `tile`
        rows; skip_unadapted gives segment 0 (the id -1 rows) no tile."""
        tiles = (self.counts + tile - 1) // tile
        if skip_unadapted:
            tiles = torch.cat([tiles[:1] * 0, tiles[1:]])
        return torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)])


def _rows2d(t: Tensor, d: int) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, d)


def _stride(t: Optional[Tensor], dim: int) -> int:
    return 0 if t is None else t.stride(dim)


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    return dummy if t is None else t


def _weight_args(down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale,
                 dummy):
    ws = shared_weight if shared_weight is not None else down_weight
    pointers = (down_weight, _or(down_bias, dummy), ws, _or(shared_bias, dummy), up_weight,
                _or(up_bias, dummy), scale)
    strides = (down_weight.stride(0), down_weight.stride(1), down_weight.stride(2),
               _stride(down_bias, 0), ws.stride(0), ws.stride(1), ws.stride(2),
               _stride(shared_bias, 0), up_weight.stride(0), up_weight.stride(1),
               up_weight.stride(2), _stride(up_bias, 0), scale.stride(0))
    return pointers, strides


def _check_bias_strides(*biases) -> None:
    # the kernels index a bias row as ptr + a * stride(0) + j: the inner stride must be 1
    for name, b in biases:
        if b is not None and b.dim() == 2 and b.shape[1] > 1 and b.stride(1) != 1:
            raise ValueError(f"{name}: expected unit stride along its last dimension")


def _dropout_args(dropout_p: float, seed: Optional[Tensor], x: Tensor) -> dict:
    """Kernel arguments of the dropout: the seed pointer (x as a placeholder when off), then
    (p, the three fp32 parts of 1/(1-p)), and the HAS_DROPOUT switch."""
    on = dropout_p > 0.0
    if on and seed is None:
        raise ValueError("seed: expected a 0-dim int64 tensor when dropout_p > 0")
    keep = _split_double(1.0 / (1.0 - dropout_p) if on else 1.0)
    return {"on": on, "seed": seed if on else x, "scalars": (float(dropout_p), *keep)}


def _fallback_reference():
    from pyadapt.ops import bank as bank_ops
    return bank_ops._reference_forward, bank_ops._reference_backward


def forward(x: Tensor, residual: Optional[Tensor], ids: Tensor, down_weight: Tensor,
            down_bias: Optional[Tensor], shared_weight: Optional[Tensor],
            shared_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
            scale: Tensor, activation: str, dropout_p: float = 0.0,
            seed: Optional[Tensor] = None) -> Tensor:
    """y (M, d_out) in promote_types(x.dtype, residual.dtype); x (M, d), ids (M,) int64 in
    [-1, N); residual (M, d_out), required when d_out != d (checked by pyadapt.ops.bank);
    seed a 0-dim int64 tensor when dropout_p > 0. CPU tensors without TRITON_INTERPRET=1 run
    the reference loop."""
    if not _runs_here(x):
        return _fallback_reference()[0](x, residual, ids, down_weight, down_bias, shared_weight,
                                        shared_bias, up_weight, up_bias, scale, activation,
                                        dropout_p, seed)
    _check_bias_strides(("down_bias", down_bias), ("up_bias", up_bias),
                        ("shared_bias", shared_bias))
    m, d = x.shape
    n, r, d_out = down_weight.shape[0], down_weight.shape[1], up_weight.shape[1]
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    drop = _dropout_args(dropout_p, seed, x)
    y = _new(x.new_empty((m, d_out), dtype=out_dtype))
    if m == 0:
        return y
    r_pad = _r_pad(r)
    block_m, block_d = _blocks(r_pad)
    seg = _Segments(ids, n)
    tile_start = seg.starts(block_m)
    res = x if residual is None else residual
    pointers, strides = _weight_args(down_weight, down_bias, shared_weight, shared_bias,
                                     up_weight, up_bias, scale, x)
    grid = (triton.cdiv(m, block_m) + seg.nseg,)
    _bank_fwd_kernel[grid](
        x, res, y, seg.perm, seg.seg_row, tile_start, *pointers, drop["seed"],
        d, d_out, r, seg.nseg,
        x.stride(0), x.stride(1), res.stride(0), res.stride(1), y.stride(0), y.stride(1),
        *strides, *drop["scalars"],
        HAS_RESIDUAL=residual is not None, HAS_DOWN_BIAS=down_bias is not None,
        HAS_SHARED=shared_weight is not None, HAS_SHARED_BIAS=shared_bias is not None,
        HAS_UP_BIAS=up_bias is not None, HAS_DROPOUT=drop["on"], ACT=_ACTIVATIONS[activation],
        ACC=_TL_DTYPES[_acc_dtype(x.dtype)], OUT_ACC=_TL_DTYPES[_acc_dtype(out_dtype)],
        DOT_DTYPE=_dot_dtype(x.dtype), R_PAD=r_pad, SEG_PAD=seg.seg_pad, BLOCK_M=block_m,
        BLOCK_D=block_d, num_warps=4)
    return y


def backward(grad_y: Tensor, x: Tensor, ids: Tensor, has_residual: bool, down_weight: Tensor,
             down_bias: Optional[Tensor], shared_weight: Optional[Tensor],
             shared_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
             scale: Tensor, activation: str, grad_scale_invariant: bool,
             needs: List[bool], dropout_p: float = 0.0,
             seed: Optional[Tensor] = None) -> List[Tensor]:
    """[dx, d down_w, d down_b, d shared_w, d shared_b, d up_w, d up_b, d scale] as
    pyadapt.ops._grads.pack returns them (empty placeholders where not wanted); dropout_p and
    seed those of the forward."""
    from pyadapt.ops import _grads

    if not _runs_here(x):
        return _fallback_reference()[1](grad_y, x, ids, has_residual, down_weight, down_bias,
                                        shared_weight, shared_bias, up_weight, up_bias, scale,
                                        activation, grad_scale_invariant, needs, dropout_p, seed)
    drop = _dropout_args(dropout_p, seed, x)
    _check_bias_strides(("down_bias", down_bias), ("up_bias", up_bias),
                        ("shared_bias", shared_bias))
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    wanted = _grads.wanted(inputs, needs)
    need_dx, need_wd, need_bd, need_ws, need_bs, need_wu, need_bu, need_dscale = wanted
    outs = [_new(t) for t in _grads.fake(inputs, needs, x)]
    m, d = x.shape
    n, r, d_out = down_weight.shape[0], down_weight.shape[1], up_weight.shape[1]
    if m == 0:
        for i in range(1, 8):
            if wanted[i]:
                outs[i].zero_()     # a sum over no rows
        return outs
    device = x.device
    acc = _acc_dtype(x.dtype)
    tl_acc = _TL_DTYPES[acc]
    dot_dtype = _dot_dtype(x.dtype)
    r_pad = _r_pad(r)
    block_m, block_d = _blocks(r_pad)
    seg = _Segments(ids, n)
    tile_start = seg.starts(block_m)
    g = grad_y
    save_down_up = need_wd or need_bd or need_wu
    save_shared = shared_weight is not None and (need_ws or need_bs)
    # (M x r) factors of the weight gradients in sorted order (fp32; fp64 for float64)
    dpre1 = _empty((m, r), acc, device) if save_down_up else x
    h_in = _empty((m, r), acc, device) if save_down_up else x
    dpre2 = _empty((m, r), acc, device) if save_shared else x
    h1 = _empty((m, r), acc, device) if save_shared else x
    drow = _empty((m,), acc, device) if need_dscale else x
    dx = outs[0] if need_dx else x
    pointers, strides = _weight_args(down_weight, down_bias, shared_weight, shared_bias,
                                     up_weight, up_bias, scale, x)
    flags = dict(HAS_DOWN_BIAS=down_bias is not None, HAS_SHARED=shared_weight is not None,
                 HAS_SHARED_BIAS=shared_bias is not None, HAS_UP_BIAS=up_bias is not None)
    _bank_bwd_rows_kernel[(triton.cdiv(m, block_m) + seg.nseg,)](
        g, x, dx, seg.perm, seg.seg_row, tile_start, *pointers, drop["seed"],
        dpre1, h_in, dpre2, h1, drow,
        d, d_out, r, seg.nseg,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
        *strides, *drop["scalars"],
        HAS_RESIDUAL=bool(has_residual), HAS_DROPOUT=drop["on"], ACT=_ACTIVATIONS[activation],
        NEED_DX=need_dx,
        SAVE_DOWN_UP=save_down_up, SAVE_SHARED=save_shared, NEED_DSCALE=need_dscale,
        ACC=tl_acc, DOT_DTYPE=dot_dtype, R_PAD=r_pad, SEG_PAD=seg.seg_pad, BLOCK_M=block_m,
        BLOCK_D=block_d, num_warps=4, **flags)

    need_dblocks = need_wd or need_wu or need_bu
    need_rspace = need_ws or need_bs or need_bd or need_dscale
    if not (need_dblocks or need_rspace):
        return outs
    chunk = _chunk_rows(m, block_m)
    chunk_start = seg.starts(chunk, skip_unadapted=True)
    n_chunks = triton.cdiv(m, chunk) + n
    n_dblocks = triton.cdiv(max(d, d_out), block_d) if need_dblocks else 0
    part = {name: (_empty((n_chunks,) + shape, acc, device) if want else x)
            for name, shape, want in (("wd", (r, d), need_wd), ("bd", (r,), need_bd),
                                      ("ws", (r, r), need_ws), ("bs", (r,), need_bs),
                                      ("wu", (d_out, r), need_wu), ("bu", (d_out,), need_bu),
                                      ("ds", (), need_dscale))}
    _bank_bwd_weights_kernel[(n_dblocks + (1 if need_rspace else 0), n_chunks)](
        g, x, seg.perm, seg.seg_row, chunk_start, dpre1, h_in, dpre2, h1, drow,
        part["wd"], part["bd"], part["ws"], part["bs"], part["wu"], part["bu"], part["ds"],
        d, d_out, r, seg.nseg, n_dblocks, chunk,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        NEED_WD=need_wd, NEED_BD=need_bd, NEED_WS=need_ws, NEED_BS=need_bs, NEED_WU=need_wu,
        NEED_BU=need_bu, NEED_DSCALE=need_dscale, ACC=tl_acc, DOT_DTYPE=dot_dtype, R_PAD=r_pad,
        SEG_PAD=seg.seg_pad, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)

    block_n = 4096 if _INTERPRET else 256
    for i, name in ((1, "wd"), (2, "bd"), (3, "ws"), (4, "bs"), (5, "wu"), (6, "bu"),
                    (7, "ds")):
        if not wanted[i]:
            continue
        out = outs[i]
        n_elem = out[0].numel()
        mul = name in ("wu", "bu")
        _bank_reduce_kernel[(triton.cdiv(n_elem, block_n), n)](
            part[name], out, chunk_start, scale, n_elem, scale.stride(0),
            MUL_SCALE=mul and not grad_scale_invariant,
            DIV_SCALE=grad_scale_invariant and not mul, X_DTYPE=_TL_DTYPES[x.dtype],
            ACC=tl_acc, BLOCK_N=block_n, num_warps=4)
    return outs
