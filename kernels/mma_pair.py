"""Triton kernels of one MMA layer's image and text branches in one launch (DESIGN.md 7.1).

    y_v = res_v + scale_v * up_v(act(shared(act(down_v(x_v)))))      x_v (M_v, d_v)
    y_t = res_t + scale_t * up_t(act(shared(act(down_t(x_t)))))      x_t (M_t, d_t)

Two problems of different width (768 and 512 in ViT-B/16) share the middle projection
`shared` (r x r). Each is `pyadapt.reference.bottleneck_forward` (no dropout, no row_scale);
the gradient of `shared` is the sum of both branches' (pyadapt/ops/bank.py, `mma_pair`).

One grid covers both problems: programs [0, T_v) take row blocks of the image branch, the rest
those of the text branch, each through the same tile function with that branch's pointers, so
the two towers cost one launch instead of two (they are small at r = 32: launch latency and
tail effects dominate). The backward does the same with its three steps: rows (dx and the
(M x r) factors), weights (one job list over both branches' d blocks and r-space sums, per-split
fp32 partials) and the fixed-order reduction of kernels/bottleneck.py; the two branches'
partials of d shared are reduced separately (each divided by its own scale under
grad_scale_invariant) and added, so gradients are deterministic.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .bottleneck import (_ACTIVATIONS, _INTERPRET, _TL_DTYPES, _acc_dtype, _act, _act_grad,
                         _adapter_scale, _dot, _dot_dtype, _load_tile, _r_pad,
                         _reduce_partials_kernel, _split_double)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(tile, x_ptr, res_ptr, y_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr,
              scale_ptr, M, D, R, stride_xm, stride_resm, stride_ym,
              scale_hi, scale_mid, scale_lo,
              HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
              HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
              SCALE_IS_TENSOR: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
              OUT_ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, R_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row block `tile` of one branch (x, residual, y row-major with unit column stride;
    weights contiguous)."""
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    pre1 = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        x = _load_tile(x_ptr, rows, offs, stride_xm, 1, row_ok, d_ok, ACC)
        wd_t = _load_tile(wd_ptr, offs, cols, 1, D, d_ok, col_ok, ACC)
        pre1 += _dot(x, wd_t, DOT_DTYPE)
    if HAS_DOWN_BIAS:
        pre1 += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h = _act(pre1, ACT)
    ws_t = _load_tile(ws_ptr, cols, cols, 1, R, col_ok, col_ok, ACC)
    pre2 = _dot(h, ws_t, DOT_DTYPE)
    if HAS_SHARED_BIAS:
        pre2 += tl.load(bs_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h = tl.where(col_ok[None, :], _act(pre2, ACT), 0.0)
    scale = _adapter_scale(scale_ptr, scale_hi, scale_mid, scale_lo, SCALE_IS_TENSOR, X_DTYPE, ACC)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        wu_t = _load_tile(wu_ptr, cols, offs, 1, R, col_ok, d_ok, ACC)
        u = _dot(h, wu_t, DOT_DTYPE).to(ACC)
        if HAS_UP_BIAS:
            u += tl.load(bu_ptr + offs, mask=d_ok, other=0.0).to(ACC)[None, :]
        if HAS_RESIDUAL:
            base = _load_tile(res_ptr, rows, offs, stride_resm, 1, row_ok, d_ok, OUT_ACC)
        else:
            base = _load_tile(x_ptr, rows, offs, stride_xm, 1, row_ok, d_ok, OUT_ACC)
        y = base + (u * scale).to(OUT_ACC)
        tl.store(y_ptr + rows[:, None] * stride_ym + offs[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _pair_fwd_kernel(
        xv_ptr, rv_ptr, yv_ptr, wdv_ptr, bdv_ptr, wuv_ptr, buv_ptr, sv_ptr,
        xt_ptr, rt_ptr, yt_ptr, wdt_ptr, bdt_ptr, wut_ptr, but_ptr, st_ptr, ws_ptr, bs_ptr,
        MV, DV, MT, DT, R, TILES_V,
        stride_xv, stride_rv, stride_yv, stride_xt, stride_rt, stride_yt,
        sv_hi, sv_mid, sv_lo, st_hi, st_mid, st_lo,
        HAS_RES_V: tl.constexpr, HAS_RES_T: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
        HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, SV_TENSOR: tl.constexpr,
        ST_TENSOR: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, OUT_V: tl.constexpr,
        OUT_T: tl.constexpr, DOT_DTYPE: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < TILES_V:
        _fwd_tile(pid, xv_ptr, rv_ptr, yv_ptr, wdv_ptr, bdv_ptr, ws_ptr, bs_ptr, wuv_ptr,
                  buv_ptr, sv_ptr, MV, DV, R, stride_xv, stride_rv, stride_yv, sv_hi, sv_mid,
                  sv_lo, HAS_RES_V, HAS_DOWN_BIAS, HAS_SHARED_BIAS, HAS_UP_BIAS, SV_TENSOR, ACT,
                  ACC, OUT_V, DOT_DTYPE, R_PAD, BLOCK_M, BLOCK_D)
    else:
        _fwd_tile(pid - TILES_V, xt_ptr, rt_ptr, yt_ptr, wdt_ptr, bdt_ptr, ws_ptr, bs_ptr,
                  wut_ptr, but_ptr, st_ptr, MT, DT, R, stride_xt, stride_rt, stride_yt, st_hi,
                  st_mid, st_lo, HAS_RES_T, HAS_DOWN_BIAS, HAS_SHARED_BIAS, HAS_UP_BIAS,
                  ST_TENSOR, ACT, ACC, OUT_T, DOT_DTYPE, R_PAD, BLOCK_M, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_rows_tile(tile, g_ptr, x_ptr, dx_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr,
                   scale_ptr, dpre1_ptr, hin_ptr, dpre2_ptr, h1_ptr, drow_ptr,
                   M, D, R, stride_gm, stride_xm, stride_dxm, scale_hi, scale_mid, scale_lo,
                   HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
                   HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
                   SCALE_IS_TENSOR: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Row block of one branch: dx, and the (M x r) factors dpre1, h_in, dpre2, h1 plus each
    row's share of d scale (g . u) for the weight kernel."""
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    pre1 = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    gw = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    gb = tl.zeros((BLOCK_M,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        x = _load_tile(x_ptr, rows, offs, stride_xm, 1, row_ok, d_ok, ACC)
        g = _load_tile(g_ptr, rows, offs, stride_gm, 1, row_ok, d_ok, ACC)
        pre1 += _dot(x, _load_tile(wd_ptr, offs, cols, 1, D, d_ok, col_ok, ACC), DOT_DTYPE)
        gw += _dot(g, _load_tile(wu_ptr, offs, cols, R, 1, d_ok, col_ok, ACC), DOT_DTYPE)
        if HAS_UP_BIAS:
            gb += tl.sum(g * tl.load(bu_ptr + offs, mask=d_ok, other=0.0).to(ACC)[None, :], 1)
    scale = _adapter_scale(scale_ptr, scale_hi, scale_mid, scale_lo, SCALE_IS_TENSOR, X_DTYPE, ACC)
    if HAS_DOWN_BIAS:
        pre1 += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h1 = tl.where(col_ok[None, :], _act(pre1, ACT), 0.0)
    pre2 = _dot(h1, _load_tile(ws_ptr, cols, cols, 1, R, col_ok, col_ok, ACC), DOT_DTYPE)
    if HAS_SHARED_BIAS:
        pre2 += tl.load(bs_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h_in = tl.where(col_ok[None, :], _act(pre2, ACT), 0.0)
    r_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(drow_ptr + rows, tl.sum(h_in * gw, 1) + gb, mask=row_ok)
    dpre2 = gw * scale * _act_grad(pre2, ACT)
    dh = _dot(dpre2, _load_tile(ws_ptr, cols, cols, R, 1, col_ok, col_ok, ACC), DOT_DTYPE)
    dpre1 = dh.to(ACC) * _act_grad(pre1, ACT)
    tl.store(dpre2_ptr + rows[:, None] * R + cols[None, :], dpre2, mask=r_mask)
    tl.store(h1_ptr + rows[:, None] * R + cols[None, :], h1, mask=r_mask)
    tl.store(dpre1_ptr + rows[:, None] * R + cols[None, :], dpre1, mask=r_mask)
    tl.store(hin_ptr + rows[:, None] * R + cols[None, :], h_in, mask=r_mask)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        dx = _dot(dpre1, _load_tile(wd_ptr, cols, offs, D, 1, col_ok, d_ok, ACC), DOT_DTYPE)
        dx = dx.to(ACC)
        if not HAS_RESIDUAL:
            dx += _load_tile(g_ptr, rows, offs, stride_gm, 1, row_ok, d_ok, ACC)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + offs[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _pair_bwd_rows_kernel(
        gv_ptr, xv_ptr, dxv_ptr, wdv_ptr, bdv_ptr, wuv_ptr, buv_ptr, sv_ptr,
        gt_ptr, xt_ptr, dxt_ptr, wdt_ptr, bdt_ptr, wut_ptr, but_ptr, st_ptr, ws_ptr, bs_ptr,
        dpre1v_ptr, hinv_ptr, dpre2v_ptr, h1v_ptr, drowv_ptr,
        dpre1t_ptr, hint_ptr, dpre2t_ptr, h1t_ptr, drowt_ptr,
        MV, DV, MT, DT, R, TILES_V,
        stride_gv, stride_xv, stride_dxv, stride_gt, stride_xt, stride_dxt,
        sv_hi, sv_mid, sv_lo, st_hi, st_mid, st_lo,
        HAS_RES_V: tl.constexpr, HAS_RES_T: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
        HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, SV_TENSOR: tl.constexpr,
        ST_TENSOR: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
        DOT_DTYPE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    if pid < TILES_V:
        _bwd_rows_tile(pid, gv_ptr, xv_ptr, dxv_ptr, wdv_ptr, bdv_ptr, ws_ptr, bs_ptr, wuv_ptr,
                       buv_ptr, sv_ptr, dpre1v_ptr, hinv_ptr, dpre2v_ptr, h1v_ptr, drowv_ptr,
                       MV, DV, R, stride_gv, stride_xv, stride_dxv, sv_hi, sv_mid, sv_lo,
                       HAS_RES_V, HAS_DOWN_BIAS, HAS_SHARED_BIAS, HAS_UP_BIAS, SV_TENSOR, ACT,
                       ACC, DOT_DTYPE, R_PAD, BLOCK_M, BLOCK_D)
    else:
        _bwd_rows_tile(pid - TILES_V, gt_ptr, xt_ptr, dxt_ptr, wdt_ptr, bdt_ptr, ws_ptr, bs_ptr,
                       wut_ptr, but_ptr, st_ptr, dpre1t_ptr, hint_ptr, dpre2t_ptr, h1t_ptr,
                       drowt_ptr, MT, DT, R, stride_gt, stride_xt, stride_dxt, st_hi, st_mid,
                       st_lo, HAS_RES_T, HAS_DOWN_BIAS, HAS_SHARED_BIAS, HAS_UP_BIAS, ST_TENSOR,
                       ACT, ACC, DOT_DTYPE, R_PAD, BLOCK_M, BLOCK_D)


@triton.jit
def _dblock_sums(j, s, g_ptr, x_ptr, dpre1_ptr, hin_ptr, p_wd_ptr, p_wu_ptr, p_bu_ptr,
                 M, D, R, ROWS_PER_SPLIT, stride_gm, stride_xm,
                 HAS_UP_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns block j of dW_d, dW_u / scale and db_u / scale over the rows of split s."""
    row_start = s.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    offs = j * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs < D
    acc_wd = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)
    acc_wu = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)
    acc_bu = tl.zeros((BLOCK_D,), dtype=ACC)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = rows < row_end
        x = _load_tile(x_ptr, rows, offs, stride_xm, 1, ok, d_ok, ACC)
        g = _load_tile(g_ptr, rows, offs, stride_gm, 1, ok, d_ok, ACC)
        acc_wd += _dot(tl.trans(x), _load_tile(dpre1_ptr, rows, cols, R, 1, ok, col_ok, ACC),
                       DOT_DTYPE)
        acc_wu += _dot(tl.trans(g), _load_tile(hin_ptr, rows, cols, R, 1, ok, col_ok, ACC),
                       DOT_DTYPE)
        acc_bu += tl.sum(g, 0)
    part_mask = d_ok[:, None] & col_ok[None, :]
    tl.store(p_wd_ptr + s * R * D + cols[None, :] * D + offs[:, None], acc_wd, mask=part_mask)
    tl.store(p_wu_ptr + s * D * R + offs[:, None] * R + cols[None, :], acc_wu, mask=part_mask)
    if HAS_UP_BIAS:
        tl.store(p_bu_ptr + s * D + offs, acc_bu, mask=d_ok)


@triton.jit
def _rspace_sums(s, dpre1_ptr, dpre2_ptr, h1_ptr, drow_ptr, p_ws_ptr, p_bs_ptr, p_bd_ptr,
                 p_ds_ptr, M, R, ROWS_PER_SPLIT, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """This branch's share of dW_s, db_s over split s, and its db_d and d scale."""
    row_start = s.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    acc_ws = tl.zeros((R_PAD, R_PAD), dtype=ACC)
    acc_bs = tl.zeros((R_PAD,), dtype=ACC)
    acc_bd = tl.zeros((R_PAD,), dtype=ACC)
    acc_ds = tl.zeros((BLOCK_M,), dtype=ACC)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = rows < row_end
        dpre2 = _load_tile(dpre2_ptr, rows, cols, R, 1, ok, col_ok, ACC)
        acc_ws += _dot(tl.trans(dpre2), _load_tile(h1_ptr, rows, cols, R, 1, ok, col_ok, ACC),
                       DOT_DTYPE)
        acc_bs += tl.sum(dpre2, 0)
        acc_bd += tl.sum(_load_tile(dpre1_ptr, rows, cols, R, 1, ok, col_ok, ACC), 0)
        acc_ds += tl.load(drow_ptr + rows, mask=ok, other=0.0).to(ACC)
    tl.store(p_ws_ptr + s * R * R + cols[:, None] * R + cols[None, :], acc_ws,
             mask=col_ok[:, None] & col_ok[None, :])
    tl.store(p_bs_ptr + s * R + cols, acc_bs, mask=col_ok)
    tl.store(p_bd_ptr + s * R + cols, acc_bd, mask=col_ok)
    tl.store(p_ds_ptr + s, tl.sum(acc_ds, 0))


@triton.jit
def _pair_bwd_weights_kernel(
        gv_ptr, xv_ptr, dpre1v_ptr, hinv_ptr, dpre2v_ptr, h1v_ptr, drowv_ptr,
        gt_ptr, xt_ptr, dpre1t_ptr, hint_ptr, dpre2t_ptr, h1t_ptr, drowt_ptr,
        pv_wd, pv_wu, pv_bu, pv_ws, pv_bs, pv_bd, pv_ds,
        pt_wd, pt_wu, pt_bu, pt_ws, pt_bs, pt_bd, pt_ds,
        MV, DV, MT, DT, R, NDB_V, NDB_T, SPLITS_V, SPLITS_T, ROWS_V, ROWS_T,
        stride_gv, stride_xv, stride_gt, stride_xt,
        HAS_UP_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One job list over both branches: image d blocks x splits, text d blocks x splits, then
    the image and text r-space sums per split."""
    job = tl.program_id(0)
    jobs_v = NDB_V * SPLITS_V
    jobs_t = NDB_T * SPLITS_T
    if job < jobs_v:
        _dblock_sums(job // SPLITS_V, job % SPLITS_V, gv_ptr, xv_ptr, dpre1v_ptr, hinv_ptr,
                     pv_wd, pv_wu, pv_bu, MV, DV, R, ROWS_V, stride_gv, stride_xv, HAS_UP_BIAS,
                     ACC, DOT_DTYPE, R_PAD, BLOCK_M, BLOCK_D)
    elif job < jobs_v + jobs_t:
        k = job - jobs_v
        _dblock_sums(k // SPLITS_T, k % SPLITS_T, gt_ptr, xt_ptr, dpre1t_ptr, hint_ptr,
                     pt_wd, pt_wu, pt_bu, MT, DT, R, ROWS_T, stride_gt, stride_xt, HAS_UP_BIAS,
                     ACC, DOT_DTYPE, R_PAD, BLOCK_M, BLOCK_D)
    elif job < jobs_v + jobs_t + SPLITS_V:
        _rspace_sums(job - jobs_v - jobs_t, dpre1v_ptr, dpre2v_ptr, h1v_ptr, drowv_ptr, pv_ws,
                     pv_bs, pv_bd, pv_ds, MV, R, ROWS_V, ACC, DOT_DTYPE, R_PAD, BLOCK_M)
    else:
        _rspace_sums(job - jobs_v - jobs_t - SPLITS_V, dpre1t_ptr, dpre2t_ptr, h1t_ptr,
                     drowt_ptr, pt_ws, pt_bs, pt_bd, pt_ds, MT, R, ROWS_T, ACC, DOT_DTYPE, R_PAD,
                     BLOCK_M)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _new(t: Tensor) -> Tensor:
    """Every buffer the launchers allocate passes through here (tests poison them with NaN)."""
    return t


def _empty(shape, dtype, device) -> Tensor:
    return _new(torch.empty(shape, dtype=dtype, device=device))


def runs_here(t: Tensor) -> bool:
    return t.is_cuda or _INTERPRET


def _blocks(r_pad: int) -> tuple[int, int]:
    if _INTERPRET:
        return 64, 128
    return max(16, min(64, 4096 // r_pad)), 64


def _splits(m: int, block_m: int) -> tuple[int, int]:
    """(S, rows per split): 2 under the interpreter (exercises the split reduction), about 64
    on the GPU; depends only on M."""
    n_blocks = max(1, triton.cdiv(m, block_m))
    want = 2 if _INTERPRET else 64
    splits = max(1, min(n_blocks, want))
    rows = triton.cdiv(n_blocks, splits) * block_m
    return max(1, triton.cdiv(m, rows)), rows


def _rows_contiguous(name: str, t: Tensor) -> Tensor:
    # the tile functions take unit column strides; a rare strided input is copied once
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(x_v: Tensor, res_v: Optional[Tensor], down_v: Tensor, down_b_v: Optional[Tensor],
            up_v: Tensor, up_b_v: Optional[Tensor], x_t: Tensor, res_t: Optional[Tensor],
            down_t: Tensor, down_b_t: Optional[Tensor], up_t: Tensor, up_b_t: Optional[Tensor],
            shared_w: Tensor, shared_b: Optional[Tensor], scale_v: Optional[Tensor],
            scale_value_v: float, scale_t: Optional[Tensor], scale_value_t: float,
            activation: str) -> List[Tensor]:
    """[y_v, y_t] in one launch. Inputs are 2-D row matrices (checked by pyadapt.ops.bank)."""
    x_v, x_t = _rows_contiguous("x_v", x_v), _rows_contiguous("x_t", x_t)
    weights = [t.contiguous() for t in (down_v, up_v, down_t, up_t, shared_w)]
    down_v, up_v, down_t, up_t, shared_w = weights
    res_v = None if res_v is None else _rows_contiguous("res_v", res_v)
    res_t = None if res_t is None else _rows_contiguous("res_t", res_t)
    out_v = x_v.dtype if res_v is None else torch.promote_types(x_v.dtype, res_v.dtype)
    out_t = x_t.dtype if res_t is None else torch.promote_types(x_t.dtype, res_t.dtype)
    y_v = _new(x_v.new_empty(x_v.shape, dtype=out_v))
    y_t = _new(x_t.new_empty(x_t.shape, dtype=out_t))
    (m_v, d_v), (m_t, d_t) = x_v.shape, x_t.shape
    r = shared_w.shape[0]
    r_pad = _r_pad(r)
    block_m, block_d = _blocks(r_pad)
    tiles_v, tiles_t = triton.cdiv(m_v, block_m), triton.cdiv(m_t, block_m)
    if tiles_v + tiles_t == 0:
        return [y_v, y_t]
    rv = x_v if res_v is None else res_v
    rt = x_t if res_t is None else res_t
    _pair_fwd_kernel[(tiles_v + tiles_t,)](
        x_v, rv, y_v, down_v, _or(down_b_v, x_v), up_v, _or(up_b_v, x_v), _or(scale_v, x_v),
        x_t, rt, y_t, down_t, _or(down_b_t, x_t), up_t, _or(up_b_t, x_t), _or(scale_t, x_t),
        shared_w, _or(shared_b, x_v),
        m_v, d_v, m_t, d_t, r, tiles_v,
        x_v.stride(0), rv.stride(0), y_v.stride(0), x_t.stride(0), rt.stride(0), y_t.stride(0),
        *_split_double(scale_value_v), *_split_double(scale_value_t),
        HAS_RES_V=res_v is not None, HAS_RES_T=res_t is not None,
        HAS_DOWN_BIAS=down_b_v is not None, HAS_SHARED_BIAS=shared_b is not None,
        HAS_UP_BIAS=up_b_v is not None, SV_TENSOR=scale_v is not None,
        ST_TENSOR=scale_t is not None, ACT=_ACTIVATIONS[activation],
        ACC=_TL_DTYPES[_acc_dtype(x_v.dtype)], OUT_V=_TL_DTYPES[_acc_dtype(out_v)],
        OUT_T=_TL_DTYPES[_acc_dtype(out_t)], DOT_DTYPE=_dot_dtype(x_v.dtype), R_PAD=r_pad,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return [y_v, y_t]


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    return dummy if t is None else t


def backward(g_v: Tensor, g_t: Tensor, x_v: Tensor, has_res_v: bool, down_v: Tensor,
             down_b_v: Optional[Tensor], up_v: Tensor, up_b_v: Optional[Tensor], x_t: Tensor,
             has_res_t: bool, down_t: Tensor, down_b_t: Optional[Tensor], up_t: Tensor,
             up_b_t: Optional[Tensor], shared_w: Tensor, shared_b: Optional[Tensor],
             scale_v: Optional[Tensor], scale_value_v: float, scale_t: Optional[Tensor],
             scale_value_t: float, activation: str, grad_scale_invariant: bool) -> List[Tensor]:
    """All gradients, full (every one computed; the op packs what is wanted):
    [dx_v, d down_v, d down_b_v, d up_v, d up_b_v, d scale_v, dx_t, d down_t, d down_b_t,
     d up_t, d up_b_t, d scale_t, d shared_w, d shared_b]; absent biases give None. d scale is
    a 0-dim fp32/fp64 tensor (the gradient of a learnable scale, else unused)."""
    x_v, x_t = _rows_contiguous("x_v", x_v), _rows_contiguous("x_t", x_t)
    g_v, g_t = g_v.to(x_v.dtype).contiguous(), g_t.to(x_t.dtype).contiguous()
    down_v, up_v, down_t, up_t, shared_w = [t.contiguous() for t in
                                            (down_v, up_v, down_t, up_t, shared_w)]
    device = x_v.device
    (m_v, d_v), (m_t, d_t) = x_v.shape, x_t.shape
    r = shared_w.shape[0]
    r_pad = _r_pad(r)
    block_m, block_d = _blocks(r_pad)
    acc = _acc_dtype(x_v.dtype)
    tl_acc = _TL_DTYPES[acc]
    dot_dtype = _dot_dtype(x_v.dtype)
    dx_v = _new(torch.empty_like(x_v, memory_format=torch.contiguous_format))
    dx_t = _new(torch.empty_like(x_t, memory_format=torch.contiguous_format))
    fac = {key: _empty(shape, acc, device) for key, shape in
           (("dpre1v", (m_v, r)), ("hinv", (m_v, r)), ("dpre2v", (m_v, r)), ("h1v", (m_v, r)),
            ("drowv", (m_v,)), ("dpre1t", (m_t, r)), ("hint", (m_t, r)), ("dpre2t", (m_t, r)),
            ("h1t", (m_t, r)), ("drowt", (m_t,)))}
    tiles_v, tiles_t = triton.cdiv(m_v, block_m), triton.cdiv(m_t, block_m)
    sv = _split_double(scale_value_v)
    st = _split_double(scale_value_t)
    flags = dict(HAS_DOWN_BIAS=down_b_v is not None, HAS_SHARED_BIAS=shared_b is not None,
                 HAS_UP_BIAS=up_b_v is not None, SV_TENSOR=scale_v is not None,
                 ST_TENSOR=scale_t is not None, ACT=_ACTIVATIONS[activation])
    if tiles_v + tiles_t:
        _pair_bwd_rows_kernel[(tiles_v + tiles_t,)](
            g_v, x_v, dx_v, down_v, _or(down_b_v, x_v), up_v, _or(up_b_v, x_v),
            _or(scale_v, x_v),
            g_t, x_t, dx_t, down_t, _or(down_b_t, x_t), up_t, _or(up_b_t, x_t),
            _or(scale_t, x_t), shared_w, _or(shared_b, x_v),
            fac["dpre1v"], fac["hinv"], fac["dpre2v"], fac["h1v"], fac["drowv"],
            fac["dpre1t"], fac["hint"], fac["dpre2t"], fac["h1t"], fac["drowt"],
            m_v, d_v, m_t, d_t, r, tiles_v,
            g_v.stride(0), x_v.stride(0), dx_v.stride(0), g_t.stride(0), x_t.stride(0),
            dx_t.stride(0), *sv, *st, HAS_RES_V=bool(has_res_v), HAS_RES_T=bool(has_res_t),
            ACC=tl_acc, DOT_DTYPE=dot_dtype, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=4, **flags)

    splits_v, rows_v = _splits(m_v, block_m)
    splits_t, rows_t = _splits(m_t, block_m)
    ndb_v, ndb_t = triton.cdiv(d_v, block_d), triton.cdiv(d_t, block_d)

    def parts(splits, d):
        return {k: _empty((splits,) + shape, acc, device) for k, shape in
                (("wd", (r, d)), ("wu", (d, r)), ("bu", (d,)), ("ws", (r, r)), ("bs", (r,)),
                 ("bd", (r,)), ("ds", ()))}

    pv, pt = parts(splits_v, d_v), parts(splits_t, d_t)
    order = ("wd", "wu", "bu", "ws", "bs", "bd", "ds")
    _pair_bwd_weights_kernel[(ndb_v * splits_v + ndb_t * splits_t + splits_v + splits_t,)](
        g_v, x_v, fac["dpre1v"], fac["hinv"], fac["dpre2v"], fac["h1v"], fac["drowv"],
        g_t, x_t, fac["dpre1t"], fac["hint"], fac["dpre2t"], fac["h1t"], fac["drowt"],
        *[pv[k] for k in order], *[pt[k] for k in order],
        m_v, d_v, m_t, d_t, r, ndb_v, ndb_t, splits_v, splits_t, rows_v, rows_t,
        g_v.stride(0), x_v.stride(0), g_t.stride(0), x_t.stride(0),
        HAS_UP_BIAS=up_b_v is not None, ACC=tl_acc, DOT_DTYPE=dot_dtype, R_PAD=r_pad,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)

    def reduce(part: Tensor, shape, dtype, scale, split, mul_scale: bool) -> Tensor:
        out = _empty(shape, dtype, device)
        n = max(1, out.numel())
        block_n = 4096 if _INTERPRET else 256
        _reduce_partials_kernel[(triton.cdiv(n, block_n),)](
            part, out, _or(scale, x_v), part.shape[0], n, *split,
            MUL_SCALE=mul_scale and not grad_scale_invariant,
            DIV_SCALE=grad_scale_invariant and not mul_scale, SCALE_IS_TENSOR=scale is not None,
            X_DTYPE=_TL_DTYPES[x_v.dtype], ACC=tl_acc, BLOCK_S=16, BLOCK_N=block_n)
        return out

    def branch(p, d, down_b, up_b, scale, split, dtype):
        return [reduce(p["wd"], (r, d), dtype, scale, split, False),
                None if down_b is None else reduce(p["bd"], (r,), dtype, scale, split, False),
                reduce(p["wu"], (d, r), dtype, scale, split, True),
                None if up_b is None else reduce(p["bu"], (d,), dtype, scale, split, True),
                reduce(p["ds"], (), acc, scale, split, False)]

    wdtype = shared_w.dtype
    grads_v = branch(pv, d_v, down_b_v, up_b_v, scale_v, sv, wdtype)
    grads_t = branch(pt, d_t, down_b_t, up_b_t, scale_t, st, wdtype)
    # d shared: each branch's share reduced (and, invariant, divided by its own scale) in fp32,
    # then added in a fixed order (image + text)
    d_ws = (reduce(pv["ws"], (r, r), acc, scale_v, sv, False)
            + reduce(pt["ws"], (r, r), acc, scale_t, st, False)).to(wdtype)
    d_bs = None
    if shared_b is not None:
        d_bs = (reduce(pv["bs"], (r,), acc, scale_v, sv, False)
                + reduce(pt["bs"], (r,), acc, scale_t, st, False)).to(wdtype)
    return [dx_v] + grads_v + [dx_t] + grads_t + [d_ws, d_bs]
