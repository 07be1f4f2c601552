"""Triton kernels of the bottleneck / MMA adapter (DESIGN.md 7.1, 7.2).

    y = residual + scale * row_scale * up(drop(act(shared?(act(down(x))))))

x (M, d) row matrix (any leading shape in the launchers), down W_d (r, d), shared W_s (r, r)
optional, up W_u (d, r), every bias optional, act in relu / gelu / quick_gelu / silu / identity,
inverted dropout on the (M x r) input of `up` drawn by Philox from (seed, i * r + j) exactly as
`pyadapt.reference.dropout_multiplier`, row_scale (M,) optional, scale a float or a learnable
0-dim tensor. The maths (forward and backward) is `pyadapt.reference.bottleneck_forward` /
`bottleneck_backward`; these kernels must match it.

Plan (one row block of BLOCK_M rows per program):
  forward   pass 1 over d: pre1 = x W_d^T; then act / shared / dropout in registers (r-space);
            pass 2 over d: y = residual + (h W_u^T + b_u) * scale * row_scale.
            Nothing of size (M x r) is written: y is the only output. When d fits one BLOCK_D
            tile the x row block stays in registers for both passes (it is the residual);
            otherwise pass 2 re-reads the row block pass 1 just read, from L2.
  backward  kernel 1 (rows): pass A over d recomputes pre1 = x W_d^T and G = g W_u together,
            then the r-space chain (h, dropout mask, dpre2, dpre1, d_scale) in registers,
            pass B over d writes dx = dpre1 W_d (+ g when the residual is x).
            kernel 2 (weights): grid (d blocks + 1, S row splits); each program sums its rows in
            a fixed order: dW_d = dpre1^T x, dW_u = g_row^T h_in, db_u, and (last column) dW_s,
            db_s, db_d; it writes one fp32 partial per split. kernel 3 sums the S partials in a
            fixed order, applies scale / grad_scale_invariant's 1/scale, casts, stores.

Recompute versus save: the forward saves nothing but its inputs (the op's backward receives x,
not intermediates); the backward recomputes pre1 (and pre2) from x. That costs one extra
x W_d^T (2 M d r flops, small against the 4 M d bytes the pass reads anyway at r = 32) and
saves writing and re-reading (M x r) activations plus the dropout mask (regenerated from the
seed). Inside the backward the (M x r) quantities kernel 2 needs (dpre1, h_in, and with a shared
layer dpre2, h1) do round-trip once, in fp32 (fp64 for float64): the weight gradients are sums over M, which are
reduced in a different parallel layout (over d blocks) to stay deterministic without atomics.

Determinism: no atomics; every sum over M is a per-program partial in a fixed loop order plus
a fixed-order reduction over splits, with block sizes and split counts that depend only on
(M, d, r, dtype, device). Autotuning of the backward only varies num_warps / num_stages, which
leave the order of additions unchanged, so two runs give bit-identical gradients.

Interpreter rules (TRITON_INTERPRET=1 on CPU, see ENVIRONMENT.md): loads are upcast to the
accumulation dtype (fp32, or fp64 for float64 inputs) right after tl.load; tl.dot gets fp32/fp64
operands there (bf16 dot is wrong in the interpreter) and bf16/fp16 operands on the GPU
(DOT_DTYPE switch); every dot tile dimension is >= 16 (r is padded to R_PAD >= 16 inside);
no tl.make_block_ptr, no libdevice (tl.erf, tl.sigmoid, tl.exp only); one autotune config.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import List, Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


def _interpreter_on() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once, as Triton does when it defines the kernels below: under the interpreter they run
# on CPU tensors; otherwise they need CUDA tensors and CPU inputs fall back to the reference.
_INTERPRET = _interpreter_on()

_ACTIVATIONS = {"relu": 0, "gelu": 1, "quick_gelu": 2, "silu": 3, "identity": 4}


# ----------------------------------------------------------------------------------------------
# Small device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _act(h, ACT: tl.constexpr):
    """activation(h): relu, gelu (exact erf form), quick_gelu, silu, identity."""
    if ACT == 0:
        return tl.where(h > 0, h, 0.0)
    elif ACT == 1:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 2:
        return h * tl.sigmoid(1.702 * h)
    elif ACT == 3:
        return h * tl.sigmoid(h)
    else:
        return h


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d activation(h) / dh (relu' = [h > 0], as the reference)."""
    if ACT == 0:
        return tl.where(h > 0, 1.0, 0.0).to(h.dtype)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        return cdf + h * pdf
    elif ACT == 2:
        sig = tl.sigmoid(1.702 * h)
        return sig + 1.702 * h * sig * (1.0 - sig)
    elif ACT == 3:
        sig = tl.sigmoid(h)
        return sig + h * sig * (1.0 - sig)
    else:
        return tl.full(h.shape, 1.0, h.dtype)


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b accumulated in fp32 (fp64 for float64). DOT_DTYPE is the operand dtype: the
    accumulation dtype under the interpreter and for fp32/fp64 inputs (ieee, no tf32), the input's
    bf16/fp16 on the GPU so the tensor cores run."""
    if DOT_DTYPE == tl.float64:
        return tl.dot(a, b)
    elif DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), out_dtype=tl.float32)


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok, ACC: tl.constexpr):
    """(len(rows) x len(cols)) tile, zero outside the masks, upcast right after the load."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)


@triton.jit
def _host_double(hi, mid, lo, ACC: tl.constexpr):
    """A host double passed as three fp32 parts (hi, mid, lo; see _split_double): their sum is the
    double exactly in fp64 kernels and its fp32 rounding in fp32 ones. Each part is cast to fp32
    explicitly: launchers pass Python floats as fp32 (Triton) or fp64 (Inductor)."""
    return (tl.cast(hi, tl.float32).to(ACC) + tl.cast(mid, tl.float32).to(ACC)) \
        + tl.cast(lo, tl.float32).to(ACC)


@triton.jit
def _adapter_scale(scale_ptr, scale_hi, scale_mid, scale_lo, SCALE_IS_TENSOR: tl.constexpr,
                   X_DTYPE: tl.constexpr, ACC: tl.constexpr):
    if SCALE_IS_TENSOR:
        # learnable scale: loaded on device (no host sync), rounded to x's dtype as the
        # reference does (scale.to(x.dtype))
        return tl.load(scale_ptr).to(X_DTYPE).to(ACC)
    else:
        return _host_double(scale_hi, scale_mid, scale_lo, ACC)


@triton.jit
def _dropout_multiplier(seed_ptr, rows, cols, R, dropout_p, keep_hi, keep_mid, keep_lo,
                        ACC: tl.constexpr):
    """1/(1-p) where tl.rand(seed, i * r + j) >= p (p in fp32), else 0: a pure function of
    (seed, global row, true column), so the backward regenerates the mask instead of storing it."""
    seed = tl.load(seed_ptr)
    u = tl.rand(seed, rows[:, None] * R + cols[None, :])
    keep = u >= tl.cast(dropout_p, tl.float32)
    return tl.where(keep, _host_double(keep_hi, keep_mid, keep_lo, ACC), 0.0).to(ACC)


@triton.jit
def _row_factor(rs_ptr, rows, row_ok, stride_rs, HAS_ROW_SCALE: tl.constexpr,
                X_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    if HAS_ROW_SCALE:
        # rounded to x's dtype as the reference does (row_scale.to(delta.dtype))
        return tl.load(rs_ptr + rows * stride_rs, mask=row_ok, other=0.0).to(X_DTYPE).to(ACC)
    else:
        return tl.full((BLOCK_M,), 1.0, ACC)


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------

# GPU search space of the forward: pruned by r below to at most 4 configs per (d, r, dtype).
_FWD_GPU_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                    for bm, bd, w, s in ((16, 128, 4, 2), (32, 128, 4, 2), (64, 64, 4, 3),
                                         (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2))]


def _fwd_configs():
    if _INTERPRET:
        # one config (the interpreter cannot benchmark); few, wide programs: each program costs
        # ~0.5 ms of Python, so BLOCK_D 128 keeps d <= 128 in a single chunk
        return [triton.Config({"BLOCK_M": 64, "BLOCK_D": 128}, num_warps=4)]
    return _FWD_GPU_CONFIGS


def _prune_fwd(configs, named_args, **kwargs):
    # The (BLOCK_M x R_PAD) fp32 activations live in registers through both passes: keep
    # BLOCK_M * R_PAD <= 8192 (BLOCK_M 64-128 at r <= 64, 64 at r = 128, 32 at r = 256).
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    limit = 8192 // r_pad
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= limit and c.kwargs["BLOCK_M"] >= min(64, limit)]
    return kept or configs[:1]


@triton.autotune(configs=_fwd_configs(), key=["D", "R"],  # + every tensor argument's dtype
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _bottleneck_fwd_kernel(
        x_ptr, res_ptr, y_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr,
        scale_ptr, rs_ptr, seed_ptr,
        M, D, R,
        stride_xm, stride_xd, stride_resm, stride_resd, stride_ym, stride_yd,
        stride_wd_r, stride_wd_d, stride_ws_o, stride_ws_i, stride_wu_d, stride_wu_r, stride_rs,
        scale_hi, scale_mid, scale_lo, dropout_p, keep_hi, keep_mid, keep_lo,
        HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr,
        HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, SCALE_IS_TENSOR: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACT: tl.constexpr,
        ACC: tl.constexpr, OUT_ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        R_PAD: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, R_PAD)              # bottleneck columns, padded to >= 16 for tl.dot
    col_ok = cols < R

    # pass 1 over d: pre1 = x W_d^T
    if D_PAD <= BLOCK_D:
        # the whole row block is one tile: it stays in registers and is the residual of pass 2
        offs = tl.arange(0, BLOCK_D)
        x_tile = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, row_ok, offs < D, ACC)
        wd_t = _load_tile(wd_ptr, offs, cols, stride_wd_d, stride_wd_r, offs < D, col_ok, ACC)
        pre1 = _dot(x_tile, wd_t, DOT_DTYPE)
    else:
        pre1 = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs < D
            x = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, row_ok, d_ok, ACC)
            wd_t = _load_tile(wd_ptr, offs, cols, stride_wd_d, stride_wd_r, d_ok, col_ok, ACC)
            pre1 += _dot(x, wd_t, DOT_DTYPE)

    # r-space, in registers: h = drop(act(shared(act(pre1 + b_d))))
    if HAS_DOWN_BIAS:
        pre1 += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h = _act(pre1, ACT)
    if HAS_SHARED:
        ws_t = _load_tile(ws_ptr, cols, cols, stride_ws_i, stride_ws_o, col_ok, col_ok, ACC)
        pre2 = _dot(h, ws_t, DOT_DTYPE)
        if HAS_SHARED_BIAS:
            pre2 += tl.load(bs_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        h = _act(pre2, ACT)
    if HAS_DROPOUT:
        h = h * _dropout_multiplier(seed_ptr, rows, cols, R, dropout_p, keep_hi, keep_mid,
                                    keep_lo, ACC)
    h = tl.where(col_ok[None, :], h, 0.0)   # padded columns exactly zero, whatever act(0) is

    scale = _adapter_scale(scale_ptr, scale_hi, scale_mid, scale_lo, SCALE_IS_TENSOR, X_DTYPE, ACC)
    factor = scale * _row_factor(rs_ptr, rows, row_ok, stride_rs, HAS_ROW_SCALE, X_DTYPE, ACC,
                                 BLOCK_M)

    # pass 2 over d: y = residual + (h W_u^T + b_u) * scale * row_scale
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        wu_t = _load_tile(wu_ptr, cols, offs, stride_wu_r, stride_wu_d, col_ok, d_ok, ACC)
        u = _dot(h, wu_t, DOT_DTYPE).to(ACC)
        if HAS_UP_BIAS:
            u += tl.load(bu_ptr + offs, mask=d_ok, other=0.0).to(ACC)[None, :]
        if HAS_RESIDUAL:
            base = _load_tile(res_ptr, rows, offs, stride_resm, stride_resd, row_ok, d_ok, OUT_ACC)
        elif D_PAD <= BLOCK_D:
            base = x_tile.to(OUT_ACC)
        else:
            # a second read of this row block, just read by pass 1: served from L2
            base = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, row_ok, d_ok, OUT_ACC)
        y = base + (u * factor[:, None]).to(OUT_ACC)
        tl.store(y_ptr + rows[:, None] * stride_ym + offs[None, :] * stride_yd,
                 y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------

def _bwd_configs():
    # Block sizes are chosen by the launcher (they fix the order of every sum: determinism);
    # autotuning only varies warps and pipelining, which leave that order unchanged.
    if _INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2))]


@triton.autotune(configs=_bwd_configs(), key=["D", "R"])
@triton.jit
def _bottleneck_bwd_rows_kernel(
        gy_ptr, x_ptr, dx_ptr, wd_ptr, bd_ptr, ws_ptr, bs_ptr, wu_ptr, bu_ptr,
        scale_ptr, rs_ptr, seed_ptr,
        dpre1_ptr, hin_ptr, dpre2_ptr, h1_ptr, dscale_part_ptr,
        M, D, R,
        stride_gm, stride_gd, stride_xm, stride_xd, stride_dxm, stride_dxd,
        stride_wd_r, stride_wd_d, stride_ws_o, stride_ws_i, stride_wu_d, stride_wu_r, stride_rs,
        scale_hi, scale_mid, scale_lo, dropout_p, keep_hi, keep_mid, keep_lo,
        HAS_RESIDUAL: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_SHARED: tl.constexpr,
        HAS_SHARED_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, SCALE_IS_TENSOR: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACT: tl.constexpr,
        NEED_DX: tl.constexpr, SAVE_DOWN_UP: tl.constexpr, SAVE_SHARED: tl.constexpr,
        NEED_DSCALE: tl.constexpr,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row block: recompute the forward's r-space chain, write dx, and hand the (M x r)
    factors of the weight gradients to kernel 2 (dpre1, h_in; dpre2, h1 with a shared layer)."""
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R

    # pass A over d, one read of x and g for both: pre1 = x W_d^T, G = g W_u, gb = g . b_u
    pre1 = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    gw = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    gb = tl.zeros((BLOCK_M,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        x = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, row_ok, d_ok, ACC)
        g = _load_tile(gy_ptr, rows, offs, stride_gm, stride_gd, row_ok, d_ok, ACC)
        wd_t = _load_tile(wd_ptr, offs, cols, stride_wd_d, stride_wd_r, d_ok, col_ok, ACC)
        wu = _load_tile(wu_ptr, offs, cols, stride_wu_d, stride_wu_r, d_ok, col_ok, ACC)
        pre1 += _dot(x, wd_t, DOT_DTYPE)
        gw += _dot(g, wu, DOT_DTYPE)
        if NEED_DSCALE and HAS_UP_BIAS:
            gb += tl.sum(g * tl.load(bu_ptr + offs, mask=d_ok, other=0.0).to(ACC)[None, :], 1)
    rs = _row_factor(rs_ptr, rows, row_ok, stride_rs, HAS_ROW_SCALE, X_DTYPE, ACC, BLOCK_M)
    gw = gw * rs[:, None]                   # g_row W_u, g_row = row_scale * g
    scale = _adapter_scale(scale_ptr, scale_hi, scale_mid, scale_lo, SCALE_IS_TENSOR, X_DTYPE, ACC)

    # r-space chain in registers (recomputed: the forward saved nothing)
    if HAS_DOWN_BIAS:
        pre1 += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    h1 = tl.where(col_ok[None, :], _act(pre1, ACT), 0.0)
    h = h1
    if HAS_SHARED:
        ws_t = _load_tile(ws_ptr, cols, cols, stride_ws_i, stride_ws_o, col_ok, col_ok, ACC)
        pre2 = _dot(h1, ws_t, DOT_DTYPE)
        if HAS_SHARED_BIAS:
            pre2 += tl.load(bs_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        h = tl.where(col_ok[None, :], _act(pre2, ACT), 0.0)
    h_in = h
    dh = gw * scale                         # d(up input) = (scale * g_row) W_u
    if HAS_DROPOUT:
        keep = _dropout_multiplier(seed_ptr, rows, cols, R, dropout_p, keep_hi, keep_mid,
                                   keep_lo, ACC)
        h_in = h * keep
        dh = dh * keep
    if NEED_DSCALE:
        # d_scale = sum(g_row * u) = sum(h_in * (g_row W_u)) + sum(g_row . b_u): no pass for u
        part = tl.sum(tl.sum(h_in * gw, 1) + gb * rs, 0)
        tl.store(dscale_part_ptr + pid, part)
    if HAS_SHARED:
        dpre2 = dh * _act_grad(pre2, ACT)
        ws = _load_tile(ws_ptr, cols, cols, stride_ws_o, stride_ws_i, col_ok, col_ok, ACC)
        dh = _dot(dpre2, ws, DOT_DTYPE).to(ACC)
        if SAVE_SHARED:
            r_mask = row_ok[:, None] & col_ok[None, :]
            tl.store(dpre2_ptr + rows[:, None] * R + cols[None, :], dpre2, mask=r_mask)
            tl.store(h1_ptr + rows[:, None] * R + cols[None, :], h1, mask=r_mask)
    dpre1 = dh * _act_grad(pre1, ACT)
    if SAVE_DOWN_UP:
        r_mask = row_ok[:, None] & col_ok[None, :]
        tl.store(dpre1_ptr + rows[:, None] * R + cols[None, :], dpre1, mask=r_mask)
        tl.store(hin_ptr + rows[:, None] * R + cols[None, :], h_in, mask=r_mask)

    # pass B over d: dx = dpre1 W_d (+ g: the identity path when the residual is x)
    if NEED_DX:
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs < D
            wd = _load_tile(wd_ptr, cols, offs, stride_wd_r, stride_wd_d, col_ok, d_ok, ACC)
            dx = _dot(dpre1, wd, DOT_DTYPE).to(ACC)
            if not HAS_RESIDUAL:
                dx += _load_tile(gy_ptr, rows, offs, stride_gm, stride_gd, row_ok, d_ok, ACC)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + offs[None, :] * stride_dxd,
                     dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_bwd_configs(), key=["D", "R"])
@triton.jit
def _bottleneck_bwd_weights_kernel(
        gy_ptr, x_ptr, rs_ptr, dpre1_ptr, hin_ptr, dpre2_ptr, h1_ptr,
        p_wd_ptr, p_bd_ptr, p_ws_ptr, p_bs_ptr, p_wu_ptr, p_bu_ptr,
        M, D, R, N_DBLOCKS, ROWS_PER_SPLIT,
        stride_gm, stride_gd, stride_xm, stride_xd, stride_rs,
        HAS_ROW_SCALE: tl.constexpr, NEED_WD: tl.constexpr, NEED_BD: tl.constexpr,
        NEED_WS: tl.constexpr, NEED_BS: tl.constexpr, NEED_WU: tl.constexpr,
        NEED_BU: tl.constexpr, X_DTYPE: tl.constexpr,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (j, s): rows [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT) summed in order into
    one fp32 partial per split. j < N_DBLOCKS: columns j of dW_d, dW_u, db_u; j == N_DBLOCKS:
    the r-space sums dW_s, db_s, db_d. The row loop keeps the (BLOCK_D x R_PAD) accumulators in
    registers, so x and g are read once more but nothing is read-modified-written."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < R
    if pid_d < N_DBLOCKS:
        offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs < D
        acc_wd = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)    # dW_d^T[offs, :]
        acc_wu = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)    # dW_u[offs, :] / scale
        acc_bu = tl.zeros((BLOCK_D,), dtype=ACC)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            if NEED_WD:
                x = _load_tile(x_ptr, rows, offs, stride_xm, stride_xd, row_ok, d_ok, ACC)
                dpre1 = _load_tile(dpre1_ptr, rows, cols, R, 1, row_ok, col_ok, ACC)
                acc_wd += _dot(tl.trans(x), dpre1, DOT_DTYPE)
            if NEED_WU or NEED_BU:
                g = _load_tile(gy_ptr, rows, offs, stride_gm, stride_gd, row_ok, d_ok, ACC)
                if HAS_ROW_SCALE:
                    rs = tl.load(rs_ptr + rows * stride_rs, mask=row_ok, other=0.0)
                    g = g * rs.to(X_DTYPE).to(ACC)[:, None]
                if NEED_WU:
                    h_in = _load_tile(hin_ptr, rows, cols, R, 1, row_ok, col_ok, ACC)
                    acc_wu += _dot(tl.trans(g), h_in, DOT_DTYPE)
                if NEED_BU:
                    acc_bu += tl.sum(g, 0)
        part_mask = d_ok[:, None] & col_ok[None, :]
        if NEED_WD:   # partial s of dW_d, layout (S, r, d) like the weight
            tl.store(p_wd_ptr + pid_s * R * D + cols[None, :] * D + offs[:, None], acc_wd,
                     mask=part_mask)
        if NEED_WU:   # partial s of dW_u, layout (S, d, r)
            tl.store(p_wu_ptr + pid_s * D * R + offs[:, None] * R + cols[None, :], acc_wu,
                     mask=part_mask)
        if NEED_BU:
            tl.store(p_bu_ptr + pid_s * D + offs, acc_bu, mask=d_ok)
    else:
        acc_ws = tl.zeros((R_PAD, R_PAD), dtype=ACC)
        acc_bs = tl.zeros((R_PAD,), dtype=ACC)
        acc_bd = tl.zeros((R_PAD,), dtype=ACC)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            if NEED_WS or NEED_BS:
                dpre2 = _load_tile(dpre2_ptr, rows, cols, R, 1, row_ok, col_ok, ACC)
                if NEED_WS:
                    h1 = _load_tile(h1_ptr, rows, cols, R, 1, row_ok, col_ok, ACC)
                    acc_ws += _dot(tl.trans(dpre2), h1, DOT_DTYPE)
                if NEED_BS:
                    acc_bs += tl.sum(dpre2, 0)
            if NEED_BD:
                acc_bd += tl.sum(_load_tile(dpre1_ptr, rows, cols, R, 1, row_ok, col_ok, ACC), 0)
        if NEED_WS:
            tl.store(p_ws_ptr + pid_s * R * R + cols[:, None] * R + cols[None, :], acc_ws,
                     mask=col_ok[:, None] & col_ok[None, :])
        if NEED_BS:
            tl.store(p_bs_ptr + pid_s * R + cols, acc_bs, mask=col_ok)
        if NEED_BD:
            tl.store(p_bd_ptr + pid_s * R + cols, acc_bd, mask=col_ok)


@triton.jit
def _reduce_partials_kernel(part_ptr, out_ptr, scale_ptr, S, N, scale_hi, scale_mid, scale_lo,
                            MUL_SCALE: tl.constexpr, DIV_SCALE: tl.constexpr,
                            SCALE_IS_TENSOR: tl.constexpr, X_DTYPE: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = (sum over s in order of part[s, n]) * scale^MUL / scale^DIV, in out's dtype.

    The scale factors are applied here, on the reduced value, at no extra pass: the partials of
    dW_u and db_u are sums of g_row (scale applied once here); grad_scale_invariant divides
    every parameter gradient by scale (MMA's gradient-scale layers)."""
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        tile = _load_tile(part_ptr, ss, offs, N, 1, ss < S, n_ok, ACC)
        acc += tl.sum(tile, 0)
    if MUL_SCALE or DIV_SCALE:
        scale = _adapter_scale(scale_ptr, scale_hi, scale_mid, scale_lo, SCALE_IS_TENSOR, X_DTYPE,
                               ACC)
        if MUL_SCALE:
            acc = acc * scale
        if DIV_SCALE:
            acc = acc / scale
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
              torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _new(t: Tensor) -> Tensor:
    """Every buffer the launchers allocate (outputs, workspaces, partials) passes through here,
    so the tests can poison them all with NaN: an element a kernel fails to write shows up."""
    return t


def _empty(shape, dtype: torch.dtype, device) -> Tensor:
    return _new(torch.empty(shape, dtype=dtype, device=device))


def _runs_here(t: Tensor) -> bool:
    """True when the Triton kernels can run on t's device (CUDA, or any under the interpreter)."""
    return t.is_cuda or _INTERPRET


def _to_fp32(v: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return v


def _split_double(v: float) -> tuple[float, float, float]:
    """v = hi + mid + lo exactly, each part an fp32 value (3 x 24 bits cover a double's 53), so
    fp64 kernels see the exact double and fp32 kernels its fp32 rounding."""
    v = float(v)
    hi = _to_fp32(v)
    mid = _to_fp32(v - hi)
    return hi, mid, _to_fp32(v - hi - mid)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of tl.dot: bf16/fp16 stay low precision on the GPU (tensor cores); under the
    interpreter, and for fp32/fp64, the accumulation dtype."""
    if dtype in (torch.bfloat16, torch.float16) and not _INTERPRET:
        return _TL_DTYPES[dtype]
    return _TL_DTYPES[_acc_dtype(dtype)]


def _bwd_blocks(r_pad: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the backward kernels. Fixed per (r, device), not autotuned, since
    they set the order of every sum over M (bit-identical gradients across runs and processes).
    (BLOCK_M x R_PAD) stays <= 4096 fp32 per accumulator: several live at once."""
    if _INTERPRET:
        return 64, 128
    return max(16, min(64, 4096 // r_pad)), 64


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(m: int, block_m: int, n_dblocks: int, device: torch.device) -> tuple[int, int]:
    """(S, rows per split) for the weight-gradient kernel: about 4 programs per SM on the GPU
    (small partial buffers: S x r x d fp32), 3 splits under the interpreter (exercises the
    fixed-order split reduction at test sizes). Depends only on (M, d, device)."""
    n_blocks = triton.cdiv(m, block_m)
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else 0)
        want = triton.cdiv(target, n_dblocks + 1)
    else:
        want = 3
    splits = max(1, min(n_blocks, want))
    rows_per_split = triton.cdiv(n_blocks, splits) * block_m
    return triton.cdiv(m, rows_per_split), rows_per_split


def _rows2d(t: Tensor, d: int) -> Tensor:
    """(..., d) as (M, d), a view whenever the strides allow it (a row-strided 2-D x stays a
    view: its strides go to the kernel)."""
    if t.dim() == 2:
        return t
    return t.reshape(-1, d)


def _reference_scale(scale: Optional[Tensor], scale_value: float, x: Tensor):
    return scale_value if scale is None else scale.to(x.dtype)


def forward(x: Tensor, residual: Optional[Tensor], down_weight: Tensor, down_bias: Optional[Tensor],
            shared_weight: Optional[Tensor], shared_bias: Optional[Tensor], up_weight: Tensor,
            up_bias: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
            row_scale: Optional[Tensor], seed: Optional[Tensor], activation: str,
            dropout_p: float) -> Tensor:
    """y = residual + scale * row_scale * up(drop(act(shared?(act(down(x)))))), y in
    promote_types(x.dtype, residual.dtype). x (..., d); residual like x or None (then x);
    scale a 0-dim tensor (learnable) or None with the float scale_value; seed a 0-dim int64
    tensor when dropout_p > 0. CPU tensors without TRITON_INTERPRET=1 fall back to the reference."""
    if not _runs_here(x):
        from pyadapt import reference
        shape = x.shape
        d = shape[-1]
        y = reference.bottleneck_forward(
            _rows2d(x, d), down_weight, down_bias, up_weight, up_bias, shared_weight, shared_bias,
            residual=None if residual is None else _rows2d(residual, d),
            scale=_reference_scale(scale, scale_value, x), activation_name=activation,
            dropout_p=dropout_p, seed=seed,
            row_scale=None if row_scale is None else row_scale.reshape(-1))
        return y.reshape(shape)
    d, r = _check_shapes(x, residual, down_weight, down_bias, shared_weight, shared_bias,
                         up_weight, up_bias, row_scale, activation)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    x2 = _rows2d(x, d)
    m = x2.shape[0]
    # allocated as the op's fake rule does (contiguous), written through its strides
    y = _new(x.new_empty(x.shape, dtype=out_dtype))
    if m == 0:
        return y
    y2 = y.view(m, d)
    res2 = x2 if residual is None else _rows2d(residual, d)
    rs = x2 if row_scale is None else row_scale.reshape(-1)
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("seed: expected a 0-dim int64 tensor when dropout_p > 0")
    scale_hi, scale_mid, scale_lo = _split_double(scale_value)
    keep_hi, keep_mid, keep_lo = _split_double(1.0 / (1.0 - dropout_p) if has_dropout else 1.0)
    acc = _acc_dtype(x.dtype)
    ws = shared_weight if shared_weight is not None else down_weight
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _bottleneck_fwd_kernel[grid](
        x2, res2, y2, down_weight, _or(down_bias, x2), ws, _or(shared_bias, x2), up_weight,
        _or(up_bias, x2), _or(scale, x2), rs, _or(seed, x2),
        m, d, r,
        x2.stride(0), x2.stride(1), res2.stride(0), res2.stride(1), y2.stride(0), y2.stride(1),
        down_weight.stride(0), down_weight.stride(1), ws.stride(0), ws.stride(1),
        up_weight.stride(0), up_weight.stride(1), rs.stride(0) if row_scale is not None else 0,
        scale_hi, scale_mid, scale_lo, float(dropout_p), keep_hi, keep_mid, keep_lo,
        HAS_RESIDUAL=residual is not None, HAS_DOWN_BIAS=down_bias is not None,
        HAS_SHARED=shared_weight is not None, HAS_SHARED_BIAS=shared_bias is not None,
        HAS_UP_BIAS=up_bias is not None, SCALE_IS_TENSOR=scale is not None,
        HAS_ROW_SCALE=row_scale is not None, HAS_DROPOUT=has_dropout,
        ACT=_ACTIVATIONS[activation], ACC=_TL_DTYPES[acc],
        OUT_ACC=_TL_DTYPES[_acc_dtype(out_dtype)], DOT_DTYPE=_dot_dtype(x.dtype),
        R_PAD=_r_pad(r), D_PAD=triton.next_power_of_2(d))
    return y.reshape(x.shape)


def _check_shapes(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                  up_bias, row_scale, activation) -> tuple[int, int]:
    """The kernels trust these shapes (a wrong one reads out of bounds): check them, cheaply."""
    d = x.shape[-1]
    r = down_weight.shape[0]
    expected = {"down_weight": (down_weight, (r, d)), "down_bias": (down_bias, (r,)),
                "shared_weight": (shared_weight, (r, r)), "shared_bias": (shared_bias, (r,)),
                "up_weight": (up_weight, (d, r)), "up_bias": (up_bias, (d,)),
                "residual": (residual, tuple(x.shape)),
                "row_scale": (row_scale, tuple(x.shape[:-1]))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape and not (
                name == "row_scale" and t.numel() == x.numel() // max(d, 1) and t.dim() == 1):
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    return d, r


def _or(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    """Absent optional tensors are passed as a dummy pointer the kernel never reads."""
    return dummy if t is None else t


def backward(grad_y: Tensor, x: Tensor, has_residual: bool, down_weight: Tensor,
             down_bias: Optional[Tensor], shared_weight: Optional[Tensor],
             shared_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
             scale: Optional[Tensor], scale_value: float, row_scale: Optional[Tensor],
             seed: Optional[Tensor], activation: str, dropout_p: float,
             grad_scale_invariant: bool, needs: List[bool],
             saved_pre: Optional[Tensor] = None) -> List[Tensor]:
    """Gradients [dx, d down_w, d down_b, d shared_w, d shared_b, d up_w, d up_b, d scale], each
    in its input's dtype where the input is present and needs[i], else an empty placeholder
    (pyadapt.ops._grads.pack). has_residual=False adds the residual's identity path to dx.
    saved_pre (the cpu backend's saved pre-activations) is not used: the kernels recompute."""
    from pyadapt.ops import _grads

    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    wanted = _grads.wanted(inputs, needs)
    if not _runs_here(x):
        from pyadapt import reference
        d = x.shape[-1]
        grads = reference.bottleneck_backward(
            _rows2d(grad_y, d).to(x.dtype), _rows2d(x, d), down_weight, down_bias, up_weight,
            up_bias, shared_weight, shared_bias, has_residual=has_residual,
            scale=_reference_scale(scale, scale_value, x), activation_name=activation,
            dropout_p=dropout_p, seed=seed,
            row_scale=None if row_scale is None else row_scale.reshape(-1),
            grad_scale_invariant=grad_scale_invariant)
        return _grads.pack(grads, inputs, needs, x)

    d, r = _check_shapes(x, None, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                         up_bias, row_scale, activation)
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"grad_y: expected shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    x2 = _rows2d(x, d)
    g2 = _rows2d(grad_y, d)
    m = x2.shape[0]
    device = x.device
    need_dx, need_wd, need_bd, need_ws, need_bs, need_wu, need_bu, need_dscale = wanted
    # Gradients allocated by the op's own fake rule (dtype, shape and strides of each input, empty
    # placeholders where not wanted); the kernels write every element (no zero-fill).
    outs = [_new(t) for t in _grads.fake(inputs, needs, x)]
    if m == 0:
        for i in range(1, 8):
            if wanted[i]:
                outs[i].zero_()     # a sum over no rows
        return outs

    acc = _acc_dtype(x.dtype)
    tl_acc = _TL_DTYPES[acc]
    dot_dtype = _dot_dtype(x.dtype)
    r_pad = _r_pad(r)
    block_m, block_d = _bwd_blocks(r_pad)
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("seed: expected a 0-dim int64 tensor when dropout_p > 0")
    scale_hi, scale_mid, scale_lo = _split_double(scale_value)
    keep_hi, keep_mid, keep_lo = _split_double(1.0 / (1.0 - dropout_p) if has_dropout else 1.0)
    rs = x2 if row_scale is None else row_scale.reshape(-1)
    rs_stride = rs.stride(0) if row_scale is not None else 0
    ws = shared_weight if shared_weight is not None else down_weight
    save_down_up = need_wd or need_bd or need_wu
    save_shared = shared_weight is not None and (need_ws or need_bs)
    # The (M x r) factors of the weight gradients (fp32, fp64 for float64): the only (M x r)
    # round trip, because kernel 2 reduces over M in a different layout.
    dpre1 = _empty((m, r), acc, device) if save_down_up else x2
    h_in = _empty((m, r), acc, device) if save_down_up else x2
    dpre2 = _empty((m, r), acc, device) if save_shared else x2
    h1 = _empty((m, r), acc, device) if save_shared else x2
    n_blocks = triton.cdiv(m, block_m)
    dscale_part = _empty((n_blocks,), acc, device) if need_dscale else x2
    dx = x2
    if need_dx:
        try:
            dx = outs[0].view(m, d)     # written in place through its strides
        except RuntimeError:            # an N-d x whose layout does not flatten (launcher calls)
            dx = _empty((m, d), x.dtype, device)

    _bottleneck_bwd_rows_kernel[(n_blocks,)](
        g2, x2, dx, down_weight, _or(down_bias, x2), ws, _or(shared_bias, x2), up_weight,
        _or(up_bias, x2), _or(scale, x2), rs, _or(seed, x2),
        dpre1, h_in, dpre2, h1, dscale_part,
        m, d, r,
        g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), dx.stride(0), dx.stride(1),
        down_weight.stride(0), down_weight.stride(1), ws.stride(0), ws.stride(1),
        up_weight.stride(0), up_weight.stride(1), rs_stride,
        scale_hi, scale_mid, scale_lo, float(dropout_p), keep_hi, keep_mid, keep_lo,
        HAS_RESIDUAL=bool(has_residual), HAS_DOWN_BIAS=down_bias is not None,
        HAS_SHARED=shared_weight is not None, HAS_SHARED_BIAS=shared_bias is not None,
        HAS_UP_BIAS=up_bias is not None, SCALE_IS_TENSOR=scale is not None,
        HAS_ROW_SCALE=row_scale is not None, HAS_DROPOUT=has_dropout,
        ACT=_ACTIVATIONS[activation], NEED_DX=need_dx, SAVE_DOWN_UP=save_down_up,
        SAVE_SHARED=save_shared, NEED_DSCALE=need_dscale,
        ACC=tl_acc, DOT_DTYPE=dot_dtype, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_D=block_d)
    if need_dx and dx.data_ptr() != outs[0].data_ptr():
        outs[0].copy_(dx.view(x.shape))

    def reduce(part: Tensor, out: Tensor, mul_scale: bool) -> None:
        if not out.is_contiguous():     # a strided weight: reduce flat, then copy (r x d, small)
            flat = _empty(out.shape, out.dtype, device)
            reduce(part, flat, mul_scale)
            out.copy_(flat)
            return
        s, n = part.shape[0], part[0].numel()
        # the interpreter pays per program, the GPU per register: wide blocks only there
        block_n = 4096 if _INTERPRET else 256
        _reduce_partials_kernel[(triton.cdiv(n, block_n),)](
            part, out, _or(scale, x2), s, n, scale_hi, scale_mid, scale_lo,
            MUL_SCALE=mul_scale and not grad_scale_invariant,
            DIV_SCALE=grad_scale_invariant and not mul_scale,
            SCALE_IS_TENSOR=scale is not None, X_DTYPE=_TL_DTYPES[x.dtype], ACC=tl_acc,
            BLOCK_S=16, BLOCK_N=block_n)

    need_rspace = need_ws or need_bs or need_bd
    if save_down_up or need_bu or save_shared:
        n_dblocks = triton.cdiv(d, block_d) if (need_wd or need_wu or need_bu) else 0
        splits, rows_per_split = _splits(m, block_m, n_dblocks, device)
        part = {name: (_empty((splits,) + shape, acc, device) if want else x2)
                for name, shape, want in (("wd", (r, d), need_wd), ("bd", (r,), need_bd),
                                          ("ws", (r, r), need_ws), ("bs", (r,), need_bs),
                                          ("wu", (d, r), need_wu), ("bu", (d,), need_bu))}
        grid = (n_dblocks + (1 if need_rspace else 0), splits)
        _bottleneck_bwd_weights_kernel[grid](
            g2, x2, rs, dpre1, h_in, dpre2, h1,
            part["wd"], part["bd"], part["ws"], part["bs"], part["wu"], part["bu"],
            m, d, r, n_dblocks, rows_per_split,
            g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), rs_stride,
            HAS_ROW_SCALE=row_scale is not None, NEED_WD=need_wd, NEED_BD=need_bd,
            NEED_WS=need_ws, NEED_BS=need_bs, NEED_WU=need_wu, NEED_BU=need_bu,
            X_DTYPE=_TL_DTYPES[x.dtype], ACC=tl_acc, DOT_DTYPE=dot_dtype, R_PAD=r_pad,
            BLOCK_M=block_m, BLOCK_D=block_d)
        for i, name in ((1, "wd"), (2, "bd"), (3, "ws"), (4, "bs"), (5, "wu"), (6, "bu")):
            if wanted[i]:
                reduce(part[name], outs[i], mul_scale=name in ("wu", "bu"))
    if need_dscale:
        reduce(dscale_part.view(n_blocks, 1), outs[7], mul_scale=False)
    return outs
