"""Triton kernels of the frozen linear + low-rank adapter (LoRA, Aurora CP / Tucker; DESIGN.md 7.5).

    y = x W^T + b + scale * p B^T,   u = x A^T,
    p = (u D1) K  (dropout before the core)   or   p = (u K) D2  (after the core),

x (M, in) row matrix, W (out, in) frozen, b (out,) optional, A = down (r1, in), K = core (r1, r2)
optional (identity: r2 = r1, and both orderings coincide), B = up (out, r2); D the inverted
dropout factors of the (M x cols) rank-space tensor they multiply, element (i, j) drawn by Philox
from (seed, i * cols + j) with cols its TRUE column count, exactly as
`pyadapt.reference.dropout_multiplier`. The maths (forward and backward) is
`pyadapt.reference.lowrank_linear_forward` / `lowrank_linear_backward`; these kernels match it.

Plan:
  forward   grid (M blocks, out blocks). One K-loop over `in` reads each (BLOCK_M x BLOCK_K) x
            tile once for both products: acc += x W^T (BLOCK_M x BLOCK_N) and u += x A^T
            (BLOCK_M x R1_PAD). The epilogue, in registers: dropout, core, dropout, p B^T for the
            tile's columns, scale, bias, store. Every out-block program recomputes u for its rows
            (out / BLOCK_N times in all): each K step does a (BLOCK_M x BLOCK_K x R1_PAD) dot
            beside the (BLOCK_M x BLOCK_K x BLOCK_N) one, i.e. R1_PAD / BLOCK_N extra tensor-core
            work (1/8 for LoRA r = 16 at BLOCK_N = 128, 1/4 for R = 64 at BLOCK_N = 256), and no
            extra memory traffic: the x tile is already in registers for x W^T. That is cheap
            while r << out; sharing u across programs would instead need a second launch and an
            (M x r) round trip through memory, and the epilogue could not start before it.
  backward  kernel 1 (rows): per row block, u = x A^T (pass over in) and g B (pass over out), the
            r-space chain (scale, dropout masks regenerated from the seed, core, K^T) in
            registers; writes the (M x r) factors the weight gradients need (du, p, and for dK its
            two factors) once in fp32 (fp64 for float64), then dx = g W + du A (pass over in,
            each dx tile summing g W over out).
            kernel 2 (weights): grid (tiles, S row splits), every tile summing its rows in a fixed
            order into one fp32 partial per split: dW = g^T x tiles, dA = du^T x, dB = g^T p and
            db = sum g, dK = u_in^T g_p. kernel 3 (kernels.bottleneck's) sums the S partials in a
            fixed order, applies scale to dB, casts and stores.
            dW and db are only computed when `needs` asks (the modules freeze the base).

Recompute versus save: the forward saves nothing but its inputs; the backward recomputes u from x
(2 M in r flops, small against the x W^T-sized products of the backward) and regenerates the
dropout masks from the seed instead of storing them.

Determinism: no atomics; sums over M are per-split partials in a fixed loop order plus a
fixed-order reduction; backward block sizes and split counts depend only on the shapes and the
device, and the backward autotuning only varies warps / stages. Two runs are bit-identical.

Interpreter rules as kernels/bottleneck.py (whose device helpers this file uses): upcast right
after tl.load, fp32/fp64 tl.dot operands under the interpreter (DOT_DTYPE), every dot tile
dimension >= 16 (ranks padded to R1_PAD, R2_PAD >= 16), no tl.make_block_ptr, one config.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .bottleneck import (_INTERPRET, _TL_DTYPES, _acc_dtype, _bwd_configs, _dot, _dot_dtype,
                         _dropout_multiplier, _host_double, _load_tile, _or, _r_pad,
                         _reduce_partials_kernel, _sm_count, _split_double)

Tensor = torch.Tensor


@triton.jit
def _rank_space(u, seed_ptr, k_ptr, rows, c1, c1_ok, c2, c2_ok, R1, R2, stride_k1, stride_k2,
                dropout_p, keep_hi, keep_mid, keep_lo,
                HAS_CORE: tl.constexpr, DROP_BEFORE: tl.constexpr, DROP_AFTER: tl.constexpr,
                ACC: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(u_in, p): u_in = u D1 (dropout before the core, or without one), p = u_in K, then D2
    (after the core). The masks use the true column counts R1 / R2."""
    u_in = u
    if DROP_BEFORE:
        u_in = u * _dropout_multiplier(seed_ptr, rows, c1, R1, dropout_p, keep_hi, keep_mid,
                                       keep_lo, ACC)
    p = u_in
    if HAS_CORE:
        core = _load_tile(k_ptr, c1, c2, stride_k1, stride_k2, c1_ok, c2_ok, ACC)
        p = _dot(u_in, core, DOT_DTYPE).to(ACC)
    if DROP_AFTER:
        p = p * _dropout_multiplier(seed_ptr, rows, c2, R2, dropout_p, keep_hi, keep_mid,
                                    keep_lo, ACC)
    return u_in, p


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------

_FWD_GPU_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                  num_warps=w, num_stages=s)
                    for bm, bn, bk, w, s in ((64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
                                             (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                                             # wide out tiles amortise the recomputed u at r = 64
                                             (64, 256, 64, 8, 3), (128, 256, 64, 8, 3))]


def _fwd_configs():
    if _INTERPRET:
        # one config (the interpreter cannot benchmark); wide tiles: each program costs ~0.5 ms
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4)]
    return _FWD_GPU_CONFIGS


def _prune_fwd(configs, named_args, **kwargs):
    # u (BLOCK_M x R1_PAD) and p (BLOCK_M x R2_PAD) live beside the (BLOCK_M x BLOCK_N)
    # accumulator: keep BLOCK_M * max(R1_PAD, R2_PAD) <= 8192 fp32 (BLOCK_M 64 at r = 128).
    r_pad = max(kwargs.get("R1_PAD", named_args.get("R1_PAD", 16)),
                kwargs.get("R2_PAD", named_args.get("R2_PAD", 16)))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * r_pad <= 8192]
    return kept or configs[:1]


@triton.autotune(configs=_fwd_configs(), key=["IN", "OUT", "R1", "R2"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _lowrank_fwd_kernel(
        x_ptr, w_ptr, b_ptr, a_ptr, k_ptr, up_ptr, seed_ptr, y_ptr,
        M, IN, OUT, R1, R2,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_a1, stride_ak,
        stride_k1, stride_k2, stride_upn, stride_up2, stride_ym, stride_yn,
        scale_hi, scale_mid, scale_lo, dropout_p, keep_hi, keep_mid, keep_lo,
        HAS_BIAS: tl.constexpr, HAS_CORE: tl.constexpr, DROP_BEFORE: tl.constexpr,
        DROP_AFTER: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < OUT
    c1 = tl.arange(0, R1_PAD)               # ranks padded to >= 16 for tl.dot
    c1_ok = c1 < R1
    c2 = tl.arange(0, R2_PAD)
    c2_ok = c2 < R2

    # one pass over `in`: each x tile feeds both x W^T and x A^T (u recomputed per out block)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    u = tl.zeros((BLOCK_M, R1_PAD), dtype=ACC)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < IN
        x = _load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, row_ok, k_ok, ACC)
        w_t = _load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, k_ok, n_ok, ACC)
        a_t = _load_tile(a_ptr, offs_k, c1, stride_ak, stride_a1, k_ok, c1_ok, ACC)
        acc += _dot(x, w_t, DOT_DTYPE)
        u += _dot(x, a_t, DOT_DTYPE)

    # epilogue in registers: rank space, then this tile's columns of scale * p B^T
    _, p = _rank_space(u, seed_ptr, k_ptr, rows, c1, c1_ok, c2, c2_ok, R1, R2,
                       stride_k1, stride_k2, dropout_p, keep_hi, keep_mid, keep_lo,
                       HAS_CORE, DROP_BEFORE, DROP_AFTER, ACC, DOT_DTYPE)
    up_t = _load_tile(up_ptr, c2, offs_n, stride_up2, stride_upn, c2_ok, n_ok, ACC)
    scale = _host_double(scale_hi, scale_mid, scale_lo, ACC)
    y = acc + _dot(p, up_t, DOT_DTYPE).to(ACC) * scale
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_bwd_configs(), key=["IN", "OUT", "R1", "R2"])
@triton.jit
def _lowrank_bwd_rows_kernel(
        g_ptr, x_ptr, w_ptr, a_ptr, k_ptr, up_ptr, seed_ptr,
        dx_ptr, du_ptr, p_ptr, kl_ptr, kr_ptr,
        M, IN, OUT, R1, R2,
        stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_a1, stride_ak,
        stride_k1, stride_k2, stride_upn, stride_up2, stride_dxm, stride_dxk,
        scale_hi, scale_mid, scale_lo, dropout_p, keep_hi, keep_mid, keep_lo,
        HAS_CORE: tl.constexpr, DROP_BEFORE: tl.constexpr, DROP_AFTER: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_GP: tl.constexpr, SAVE_DU: tl.constexpr,
        SAVE_P: tl.constexpr, SAVE_K: tl.constexpr,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row block: recompute u and the rank-space chain, write the (M x r) factors of the
    weight gradients (du, p, u_in / g_p for dK) and dx = g W + du A."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    c1 = tl.arange(0, R1_PAD)
    c1_ok = c1 < R1
    c2 = tl.arange(0, R2_PAD)
    c2_ok = c2 < R2

    # u = x A^T (pass over in), recomputed: the forward saved nothing
    u = tl.zeros((BLOCK_M, R1_PAD), dtype=ACC)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < IN
        x = _load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, row_ok, k_ok, ACC)
        a_t = _load_tile(a_ptr, offs_k, c1, stride_ak, stride_a1, k_ok, c1_ok, ACC)
        u += _dot(x, a_t, DOT_DTYPE)
    u_in, p = _rank_space(u, seed_ptr, k_ptr, rows, c1, c1_ok, c2, c2_ok, R1, R2,
                          stride_k1, stride_k2, dropout_p, keep_hi, keep_mid, keep_lo,
                          HAS_CORE, DROP_BEFORE, DROP_AFTER, ACC, DOT_DTYPE)
    if SAVE_P:
        tl.store(p_ptr + rows[:, None] * R2 + c2[None, :], p,
                 mask=row_ok[:, None] & c2_ok[None, :])

    du = tl.zeros((BLOCK_M, R1_PAD), dtype=ACC)
    if NEED_GP:
        # g_p = scale * g B (pass over out), D2 after the core; du = g_p K^T, D1 before it
        gb = tl.zeros((BLOCK_M, R2_PAD), dtype=ACC)
        for n0 in range(0, OUT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < OUT
            g = _load_tile(g_ptr, rows, offs_n, stride_gm, stride_gn, row_ok, n_ok, ACC)
            up = _load_tile(up_ptr, offs_n, c2, stride_upn, stride_up2, n_ok, c2_ok, ACC)
            gb += _dot(g, up, DOT_DTYPE)
        g_p = gb * _host_double(scale_hi, scale_mid, scale_lo, ACC)
        if DROP_AFTER:
            g_p = g_p * _dropout_multiplier(seed_ptr, rows, c2, R2, dropout_p, keep_hi,
                                            keep_mid, keep_lo, ACC)
        if HAS_CORE:
            core_t = _load_tile(k_ptr, c2, c1, stride_k2, stride_k1, c2_ok, c1_ok, ACC)
            du = _dot(g_p, core_t, DOT_DTYPE).to(ACC)
            if SAVE_K:
                k_mask = row_ok[:, None] & c1_ok[None, :]
                tl.store(kl_ptr + rows[:, None] * R1 + c1[None, :], u_in, mask=k_mask)
                tl.store(kr_ptr + rows[:, None] * R2 + c2[None, :], g_p,
                         mask=row_ok[:, None] & c2_ok[None, :])
        else:
            du = g_p
        if DROP_BEFORE:
            du = du * _dropout_multiplier(seed_ptr, rows, c1, R1, dropout_p, keep_hi, keep_mid,
                                          keep_lo, ACC)
        if SAVE_DU:
            tl.store(du_ptr + rows[:, None] * R1 + c1[None, :], du,
                     mask=row_ok[:, None] & c1_ok[None, :])

    # dx = g W + du A, one (BLOCK_M x BLOCK_K) tile at a time, g W summed over out in order
    if NEED_DX:
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < IN
            a = _load_tile(a_ptr, c1, offs_k, stride_a1, stride_ak, c1_ok, k_ok, ACC)
            dx = _dot(du, a, DOT_DTYPE).to(ACC)
            for n0 in range(0, OUT, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < OUT
                g = _load_tile(g_ptr, rows, offs_n, stride_gm, stride_gn, row_ok, n_ok, ACC)
                w = _load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, n_ok, k_ok, ACC)
                dx += _dot(g, w, DOT_DTYPE)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                     dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.autotune(configs=_bwd_configs(), key=["IN", "OUT", "R1", "R2"])
@triton.jit
def _lowrank_bwd_weights_kernel(
        g_ptr, x_ptr, du_ptr, p_ptr, kl_ptr, kr_ptr,
        p_w_ptr, p_b_ptr, p_a_ptr, p_k_ptr, p_up_ptr,
        M, IN, OUT, R1, R2, N_W, N_A, N_UP, N_INB, ROWS_PER_SPLIT,
        stride_gm, stride_gn, stride_xm, stride_xk,
        NEED_W: tl.constexpr, NEED_B: tl.constexpr, NEED_A: tl.constexpr,
        NEED_K: tl.constexpr, NEED_UP: tl.constexpr,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (j, s): rows [s * ROWS_PER_SPLIT, (s + 1) * ROWS_PER_SPLIT) summed in order into
    one partial per split, for tile j of: dW = g^T x (N_W tiles), dA = du^T x (N_A), dB = g^T p
    with db = sum g (N_UP), dK = u_in^T g_p (the last one)."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    c1 = tl.arange(0, R1_PAD)
    c1_ok = c1 < R1
    c2 = tl.arange(0, R2_PAD)
    c2_ok = c2 < R2
    if pid < N_W:
        # dW tile (n block, k block): (BLOCK_N x BLOCK_K), partials (S, out, in)
        offs_n = (pid // N_INB) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = (pid % N_INB) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = offs_n < OUT
        k_ok = offs_k < IN
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            g = _load_tile(g_ptr, rows, offs_n, stride_gm, stride_gn, row_ok, n_ok, ACC)
            x = _load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, row_ok, k_ok, ACC)
            acc += _dot(tl.trans(g), x, DOT_DTYPE)
        if NEED_W:
            tl.store(p_w_ptr + pid_s * OUT * IN + offs_n[:, None] * IN + offs_k[None, :], acc,
                     mask=n_ok[:, None] & k_ok[None, :])
    elif pid < N_W + N_A:
        # dA columns (k block): (R1_PAD x BLOCK_K), partials (S, r1, in)
        offs_k = (pid - N_W) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < IN
        acc = tl.zeros((R1_PAD, BLOCK_K), dtype=ACC)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            du = _load_tile(du_ptr, rows, c1, R1, 1, row_ok, c1_ok, ACC)
            x = _load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, row_ok, k_ok, ACC)
            acc += _dot(tl.trans(du), x, DOT_DTYPE)
        if NEED_A:
            tl.store(p_a_ptr + pid_s * R1 * IN + c1[:, None] * IN + offs_k[None, :], acc,
                     mask=c1_ok[:, None] & k_ok[None, :])
    elif pid < N_W + N_A + N_UP:
        # dB rows and db (n block): (BLOCK_N x R2_PAD) / 1 x scale, partials (S, out, r2), (S, out)
        offs_n = (pid - N_W - N_A) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < OUT
        acc = tl.zeros((BLOCK_N, R2_PAD), dtype=ACC)
        acc_b = tl.zeros((BLOCK_N,), dtype=ACC)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            g = _load_tile(g_ptr, rows, offs_n, stride_gm, stride_gn, row_ok, n_ok, ACC)
            if NEED_UP:
                p = _load_tile(p_ptr, rows, c2, R2, 1, row_ok, c2_ok, ACC)
                acc += _dot(tl.trans(g), p, DOT_DTYPE)
            if NEED_B:
                acc_b += tl.sum(g, 0)
        if NEED_UP:
            tl.store(p_up_ptr + pid_s * OUT * R2 + offs_n[:, None] * R2 + c2[None, :], acc,
                     mask=n_ok[:, None] & c2_ok[None, :])
        if NEED_B:
            tl.store(p_b_ptr + pid_s * OUT + offs_n, acc_b, mask=n_ok)
    else:
        # dK: (R1_PAD x R2_PAD), partials (S, r1, r2)
        acc = tl.zeros((R1_PAD, R2_PAD), dtype=ACC)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            kl = _load_tile(kl_ptr, rows, c1, R1, 1, row_ok, c1_ok, ACC)
            kr = _load_tile(kr_ptr, rows, c2, R2, 1, row_ok, c2_ok, ACC)
            acc += _dot(tl.trans(kl), kr, DOT_DTYPE)
        if NEED_K:
            tl.store(p_k_ptr + pid_s * R1 * R2 + c1[:, None] * R2 + c2[None, :], acc,
                     mask=c1_ok[:, None] & c2_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _new(t: Tensor) -> Tensor:
    """Every buffer the launchers allocate (outputs, workspaces, partials) passes through here,
    so the tests can poison them all with NaN: an element a kernel fails to write shows up."""
    return t


def _empty(shape, dtype: torch.dtype, device) -> Tensor:
    return _new(torch.empty(shape, dtype=dtype, device=device))


def _runs_here(t: Tensor) -> bool:
    """True when the Triton kernels can run on t's device (CUDA, or any under the interpreter)."""
    return t.is_cuda or _INTERPRET


def _check_shapes(x, weight, bias, down, core, up) -> tuple[int, int, int, int]:
    """The kernels trust these shapes (a wrong one reads out of bounds): check them, cheaply.
    Returns (in, out, r1, r2)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D (M, in) tensor, got shape {tuple(x.shape)}")
    d_in, d_out, r1 = x.shape[1], weight.shape[0], down.shape[0]
    r2 = r1 if core is None else core.shape[-1]
    expected = {"weight": (weight, (d_out, d_in)), "bias": (bias, (d_out,)),
                "down": (down, (r1, d_in)), "core": (core, (r1, r2)), "up": (up, (d_out, r2))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return d_in, d_out, r1, r2


def _hyper(core, scale, seed, dropout_p, dropout_after_core) -> dict:
    """Scalars and switches shared by every kernel."""
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("seed: expected a 0-dim int64 tensor when dropout_p > 0")
    drop_after = has_dropout and dropout_after_core and core is not None
    scale_hi, scale_mid, scale_lo = _split_double(scale)
    keep_hi, keep_mid, keep_lo = _split_double(1.0 / (1.0 - dropout_p) if has_dropout else 1.0)
    return dict(scalars=(scale_hi, scale_mid, scale_lo, float(dropout_p), keep_hi, keep_mid,
                         keep_lo),
                flags=dict(HAS_CORE=core is not None, DROP_BEFORE=has_dropout and not drop_after,
                           DROP_AFTER=drop_after))


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor,
            core: Optional[Tensor], up: Tensor, scale: float, seed: Optional[Tensor],
            dropout_p: float, dropout_after_core: bool) -> Tensor:
    """y = x W^T + b + scale * p B^T (module docstring), (M, out) contiguous in x's dtype. CPU
    tensors without TRITON_INTERPRET=1 fall back to the reference."""
    if not _runs_here(x):
        from pyadapt import reference
        return reference.lowrank_linear_forward(x, weight, bias, down, core, up, scale=scale,
                                                dropout_p=dropout_p, seed=seed,
                                                dropout_after_core=dropout_after_core)
    d_in, d_out, r1, r2 = _check_shapes(x, weight, bias, down, core, up)
    m = x.shape[0]
    y = _new(x.new_empty((m, d_out)))       # as the op's fake rule: contiguous
    if m == 0 or d_out == 0:
        return y
    hyper = _hyper(core, scale, seed, dropout_p, dropout_after_core)
    k = core if core is not None else down
    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d_out, meta["BLOCK_N"])

    _lowrank_fwd_kernel[grid](
        x, weight, _or(bias, x), down, k, up, _or(seed, x), y,
        m, d_in, d_out, r1, r2,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), down.stride(0),
        down.stride(1), k.stride(0), k.stride(1), up.stride(0), up.stride(1),
        y.stride(0), y.stride(1),
        *hyper["scalars"], HAS_BIAS=bias is not None, **hyper["flags"],
        ACC=_TL_DTYPES[_acc_dtype(x.dtype)], DOT_DTYPE=_dot_dtype(x.dtype),
        R1_PAD=_r_pad(r1), R2_PAD=_r_pad(r2))
    return y


def _bwd_blocks(r_pad: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_NK) of the backward kernels, fixed per (r, device), not autotuned: they
    set the order of every sum over M and over out (bit-identical gradients across runs)."""
    if _INTERPRET:
        return 64, 128
    return max(16, min(64, 4096 // r_pad)), 64


def _splits(m: int, block_m: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(S, rows per split) of the weights kernel: about 4 programs per SM on the GPU, 3 splits
    under the interpreter (exercises the fixed-order split reduction at test sizes)."""
    n_blocks = triton.cdiv(m, block_m)
    if device.type == "cuda":
        want = triton.cdiv(4 * _sm_count(device.index if device.index is not None else 0),
                           max(n_tiles, 1))
    else:
        want = 3
    splits = max(1, min(n_blocks, want))
    rows_per_split = triton.cdiv(n_blocks, splits) * block_m
    return triton.cdiv(m, rows_per_split), rows_per_split


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor,
             core: Optional[Tensor], up: Tensor, scale: float, seed: Optional[Tensor],
             dropout_p: float, dropout_after_core: bool, needs: List[bool]) -> List[Tensor]:
    """Gradients [dx, dW, db, dA, dK, dB], each in its input's dtype where the input is present
    and needs[i], else an empty placeholder (pyadapt.ops._grads.pack)."""
    from pyadapt.ops import _grads

    inputs = [x, weight, bias, down, core, up]
    if not _runs_here(x):
        from pyadapt import reference
        grads = reference.lowrank_linear_backward(grad_y, x, weight, bias, down, core, up,
                                                  scale=scale, dropout_p=dropout_p, seed=seed,
                                                  dropout_after_core=dropout_after_core,
                                                  needs=needs)
        return _grads.pack(grads, inputs, needs, x)
    d_in, d_out, r1, r2 = _check_shapes(x, weight, bias, down, core, up)
    m = x.shape[0]
    if tuple(grad_y.shape) != (m, d_out):
        raise ValueError(f"grad_y: expected shape {(m, d_out)}, got {tuple(grad_y.shape)}")
    wanted = _grads.wanted(inputs, needs)
    need_dx, need_w, need_b, need_a, need_k, need_up = wanted
    outs = [_new(t) for t in _grads.fake(inputs, needs, x)]     # contiguous, every element written
    if m == 0 or d_in == 0 or d_out == 0:
        for i in range(6):
            if wanted[i]:
                outs[i].zero_()     # a sum over no rows (or an empty product)
        return outs

    device = x.device
    acc = _acc_dtype(x.dtype)
    tl_acc, dot_dtype = _TL_DTYPES[acc], _dot_dtype(x.dtype)
    r1_pad, r2_pad = _r_pad(r1), _r_pad(r2)
    block_m, block_nk = _bwd_blocks(max(r1_pad, r2_pad))
    hyper = _hyper(core, scale, seed, dropout_p, dropout_after_core)
    k = core if core is not None else down
    g = grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype)
    save_k = need_k and core is not None
    # The (M x r) factors of the weight gradients (fp32, fp64 for float64): the only (M x r)
    # round trip, because kernel 2 reduces over M in a different layout.
    du = _empty((m, r1), acc, device) if need_a else x
    p = _empty((m, r2), acc, device) if need_up else x
    kl = _empty((m, r1), acc, device) if save_k else x
    kr = _empty((m, r2), acc, device) if save_k else x
    dx = outs[0] if need_dx else x

    if need_dx or need_a or need_up or save_k:
        _lowrank_bwd_rows_kernel[(triton.cdiv(m, block_m),)](
            g, x, weight, down, k, up, _or(seed, x), dx, du, p, kl, kr,
            m, d_in, d_out, r1, r2,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), weight.stride(0),
            weight.stride(1), down.stride(0), down.stride(1), k.stride(0), k.stride(1),
            up.stride(0), up.stride(1), dx.stride(0), dx.stride(1),
            *hyper["scalars"], **hyper["flags"],
            NEED_DX=need_dx, NEED_GP=need_dx or need_a or save_k, SAVE_DU=need_a,
            SAVE_P=need_up, SAVE_K=save_k, ACC=tl_acc, DOT_DTYPE=dot_dtype,
            R1_PAD=r1_pad, R2_PAD=r2_pad, BLOCK_M=block_m, BLOCK_N=block_nk, BLOCK_K=block_nk)

    if not (need_w or need_b or need_a or need_k or need_up):
        return outs
    n_inb, n_outb = triton.cdiv(d_in, block_nk), triton.cdiv(d_out, block_nk)
    n_w = n_outb * n_inb if need_w else 0
    n_a = n_inb if need_a else 0
    n_up = n_outb if (need_up or need_b) else 0
    n_tiles = n_w + n_a + n_up + (1 if save_k else 0)
    splits, rows_per_split = _splits(m, block_m, n_tiles, device)
    part = {name: (_empty((splits,) + shape, acc, device) if want else x)
            for name, shape, want in (("w", (d_out, d_in), need_w), ("b", (d_out,), need_b),
                                      ("a", (r1, d_in), need_a), ("k", (r1, r2), save_k),
                                      ("up", (d_out, r2), need_up))}
    _lowrank_bwd_weights_kernel[(n_tiles, splits)](
        g, x, du, p, kl, kr, part["w"], part["b"], part["a"], part["k"], part["up"],
        m, d_in, d_out, r1, r2, n_w, n_a, n_up, n_inb, rows_per_split,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        NEED_W=need_w, NEED_B=need_b, NEED_A=need_a, NEED_K=save_k, NEED_UP=need_up,
        ACC=tl_acc, DOT_DTYPE=dot_dtype, R1_PAD=r1_pad, R2_PAD=r2_pad,
        BLOCK_M=block_m, BLOCK_N=block_nk, BLOCK_K=block_nk)
    scale_parts = hyper["scalars"][:3]
    for i, name in ((1, "w"), (2, "b"), (3, "a"), (4, "k"), (5, "up")):
        if wanted[i]:
            s, n = part[name].shape[0], part[name][0].numel()
            # the interpreter pays per program, the GPU per register: wide blocks only there
            block_n = 4096 if _INTERPRET else 256
            # dB = scale * g^T p: the scale is applied once, here, on the reduced sum
            _reduce_partials_kernel[(triton.cdiv(n, block_n),)](
                part[name], outs[i], x, s, n, *scale_parts, MUL_SCALE=name == "up",
                DIV_SCALE=False, SCALE_IS_TENSOR=False, X_DTYPE=_TL_DTYPES[x.dtype], ACC=tl_acc,
                BLOCK_S=16, BLOCK_N=block_n)
    return outs
