"""Triton backend of the R-Adapter op `pyadapt::radapter_forward` / `radapter_backward`
(DESIGN.md 7.3, REFERENCE-SEMANTICS.md 2.1-2.6).

    y = z + c * r * q,   z = x W_o^T + b_o,   q = z W_f^T  or  (z W_d^T) W_u^T   (W_f = W_u W_d)

c the scale (float, or learnable 0-dim tensor rounded to x's dtype as the reference does),
r = row_scale (M,) or None. The maths is `pyadapt.reference.radapter_forward` / `_backward`.

Training-time folding (REFERENCE-SEMANTICS 2.6, issue: "fold before the GEMM"):
  W_k = W_o + (k c) W_f W_o,   b_k = b_o + (k c) W_f b_o        (low rank: W_f W_o = W_u (W_d W_o),
                                                                W_f b_o = W_u (W_d b_o))
  formed by ONE launch of the grouped fold kernel (kernels/fold.py: the weight and the bias column
  are two items; fp32 accumulation, one rounding to the weight dtype). Low rank re-associates: the
  small factor A = W_d W_o (r x in) and a0 = W_d b_o are formed first (a fold launch onto zeros,
  kept in the accumulation dtype), then W_k = W_o + k c W_u A: out*r*in flops, h = z never
  exists. Then one GEMM per step: y = x W_k^T + b_k.

Why not compose kernels/lowrank.py for low rank (x W^T + b_eff + s (x A^T) W_u^T with A = W_d W_o,
b_eff = b_o + s W_u (W_d b_o)): its scale is a host float (a learnable scale would cost a host
sync per step), it has no row_scale epilogue, and it does M (in out + r (in + out)) flops per
step against M in out + out r in for the folded GEMM here (M = 25216 >> out = 768). The
re-association is the same: only A = W_d W_o (r x in) and W_d b_o are formed, never h.

Mixed batch (adapter dropping, r_i in {0, k}, k = 1/(1-p)): k = max |r_i| is found ON THE DEVICE
(no host sync), lambda_i = r_i / k, and the GEMM kernel below computes
      y_i = (1 - lambda_i) (x_i W_o^T + b_o) + lambda_i (x_i W_k^T + b_k),
  which equals the reference for ANY row_scale (algebra: y_i = z_i + r_i c q_i), and which is
  exact selection for lambda in {0, 1}. Per row tile the kernel tests lambda: a tile whose rows
  are all kept (lambda = 1) does only the W_k GEMM, a tile all dropped (lambda = 0) only the W_o
  GEMM, and only a mixed tile does both. With per-SAMPLE dropping the rows of a sample (197
  tokens in ViT-B/16) are contiguous, so most tiles are homogeneous and the one-GEMM saving is
  kept; only tiles straddling a kept/dropped sample boundary pay double. Row-level dropping or
  arbitrary factors degrade gracefully to two GEMMs (never wrong). We chose this over gathering
  kept rows (argsort + two launches) because it needs no permutation buffers or scatter and no
  host sync, and over a "delta" weight c W_f W_o (which always needs two GEMMs on kept rows).

Backward (G = r * g, rounded to x's dtype as the reference; s = c):
  dx   = g [(1 - lambda) W_o + lambda W_k]   (same mixing GEMM kernel; W_k re-folded: one d^3 /
         out*r*in fold per step, against storing it)
  full rank:  P = G^T x (out x in, the one reduction over M), Pz = G^T z = P W_o^T + colsum(G) b^T
         (out x out x in, d^3, never z), dW_f = s Pz, dscale = <Pz, W_f> (= sum_i r_i <g_i, q_i>
         = trace(G^T z W_f^T): no q stored, no extra GEMM over M).
         dW_o = g^T x + s W_f^T P (= (I + s W_f^T) P without row_scale),
         db_o = colsum(g) + s W_f^T colsum(G).
         Large GEMMs over M per step: forward 1, dx 1, P 1 (3, against eager's 5).
  low rank:   t = x A^T + a0 (M x r), P_u = G^T t, dW_u = s P_u, dscale = <P_u, W_u>,
         dt = s G W_u, Q = dt^T x (r x in), dW_d = Q W_o^T + colsum(dt) b^T,
         dW_o = g^T x + W_d^T Q, db_o = colsum(g) + W_d^T colsum(dt).
  The frozen W_o / b_o gradients are computed only when `needs` asks.

Kernels: the grouped fold (kernels/fold.py) and `_mix_gemm_kernel` below, a tiled GEMM
C = A B with arbitrary strides (so transposed views cost no copy), an optional second right
operand mixed per row by lambda (with per-tile skipping), bias vectors, and a rank-1 epilogue
term u v^T. Vector glue (colsums, r-sized products, <P, W>) uses torch (deterministic sums).
Each output element is written by one program in a fixed K order: bit-identical across runs.
On the GPU the reduction over M (P = G^T x) runs in a single K-loop per tile (no split-K): correct
and deterministic, not tuned.

Rounding: folding rounds W_k to the weight dtype once (|error| <= u |W_k|), which the reference
never forms: bf16/fp16 results differ from eager by about one rounding of y; fp32 by ~1e-7
relative; fp64 by ~1e-16. Interpreter rules (ENVIRONMENT.md): loads upcast right after tl.load,
dots in fp32/fp64 operands under the interpreter, every dot tile dimension >= 16, bf16 stores as
round-to-nearest-even bit patterns (fold._round_bf16_bits).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from pyadapt.kernels import fold as _fold
from pyadapt.kernels.bottleneck import (_INTERPRET, _TL_DTYPES, _acc_dtype, _dot, _dot_dtype,
                                        _load_tile, _runs_here)
from pyadapt.kernels.fold import _round_bf16_bits

Tensor = torch.Tensor


def _new(t: Tensor) -> Tensor:
    """Every buffer the launchers allocate passes through here (the tests poison them with NaN)."""
    return t


def _empty(shape, dtype, device) -> Tensor:
    return _new(torch.empty(shape, dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mix_gemm_kernel(
        a_ptr, b0_ptr, b1_ptr, bias0_ptr, bias1_ptr, lam_ptr, u_ptr, v_ptr, c_ptr,
        M, N, K,
        s_am, s_ak, s_b0k, s_b0n, s_b1k, s_b1n, s_cm, s_cn,
        MIX: tl.constexpr, HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr,
        HAS_OUTER: tl.constexpr, C_DTYPE: tl.constexpr, BF16_BITS: tl.constexpr,
        ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A B0 + bias0 (+ u v^T); with MIX: C_i = (1 - lam_i)(A B0 + bias0)_i
    + lam_i (A B1 + bias1)_i, a product skipped on tiles whose lam makes it irrelevant."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MIX:
        lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        need0 = tl.sum(tl.where(row_ok & (lam != 1.0), 1, 0), 0) > 0
        need1 = tl.sum(tl.where(row_ok & (lam != 0.0), 1, 0), 0) > 0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = _load_tile(a_ptr, rows, ks, s_am, s_ak, row_ok, k_ok, ACC)
            if need0:
                b0 = _load_tile(b0_ptr, ks, cols, s_b0k, s_b0n, k_ok, col_ok, ACC)
                acc0 += _dot(a, b0, DOT_DTYPE).to(ACC)
            if need1:
                b1 = _load_tile(b1_ptr, ks, cols, s_b1k, s_b1n, k_ok, col_ok, ACC)
                acc1 += _dot(a, b1, DOT_DTYPE).to(ACC)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = _load_tile(a_ptr, rows, ks, s_am, s_ak, row_ok, k_ok, ACC)
            b0 = _load_tile(b0_ptr, ks, cols, s_b0k, s_b0n, k_ok, col_ok, ACC)
            acc0 += _dot(a, b0, DOT_DTYPE).to(ACC)
    out = acc0
    if HAS_BIAS0:
        out += tl.load(bias0_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if MIX:
        y1 = acc1
        if HAS_BIAS1:
            y1 += tl.load(bias1_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        # exact selection for lam in {0, 1}: (1 - 1) * y0 = 0 and 0 * y1 = 0 (finite values)
        out = (1.0 - lam)[:, None] * out + lam[:, None] * y1
    if HAS_OUTER:
        u = tl.load(u_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        v = tl.load(v_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        out += u[:, None] * v[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * s_cm + cols[None, :] * s_cn
    if BF16_BITS:
        # c_ptr is an int16 view of the bf16 output (the interpreter's own cast truncates)
        tl.store(c_ptr + offs, _round_bf16_bits(out).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(c_ptr + offs, out.to(C_DTYPE), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps), fixed (they fix the K order: determinism)."""
    if _INTERPRET:
        return 64, 64, 64, 4
    if dtype in (torch.bfloat16, torch.float16):
        return 128, 128, 32, 8
    if dtype == torch.float64:
        return 64, 64, 16, 4
    return 64, 64, 32, 4


def _operand_dtype(*ts: Tensor) -> torch.dtype:
    """The dtype the dot runs in: the operands' own when they agree (bf16/fp16 feed the tensor
    cores on the GPU), else the accumulation dtype (an fp32 intermediate is never rounded down)."""
    dtypes = {t.dtype for t in ts}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _mm(a: Tensor, b0: Tensor, *, out_dtype: torch.dtype, bias0: Optional[Tensor] = None, b1: Optional[Tensor] = None,
        bias1: Optional[Tensor] = None, lam: Optional[Tensor] = None,
        outer: Optional[tuple] = None) -> Tensor:
    """C = a @ b0 + bias0 [+ u v^T], or the lam-mixed form with b1 / bias1. a (M, K), b0/b1
    (K, N) any strides; accumulation in fp32 (fp64 for fp64 operands)."""
    m, k = a.shape
    n = b0.shape[1]
    c = _empty((m, n), out_dtype, a.device)
    if c.numel() == 0:
        return c
    compute = _operand_dtype(a, b0, *([b1] if b1 is not None else []))
    acc = _acc_dtype(compute)
    block_m, block_n, block_k, num_warps = _blocks(compute)
    mix = lam is not None
    b1_ = b1 if mix else b0
    u, v = outer if outer is not None else (a, a)
    bf16_bits = _INTERPRET and out_dtype == torch.bfloat16
    c_arg = c.view(torch.int16) if bf16_bits else c
    _mix_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        a, b0, b1_, bias0 if bias0 is not None else a, bias1 if bias1 is not None else a,
        lam if mix else a, u, v, c_arg, m, n, k,
        a.stride(0), a.stride(1), b0.stride(0), b0.stride(1), b1_.stride(0), b1_.stride(1),
        c.stride(0), c.stride(1),
        MIX=mix, HAS_BIAS0=bias0 is not None, HAS_BIAS1=mix and bias1 is not None,
        HAS_OUTER=outer is not None, C_DTYPE=_TL_DTYPES[out_dtype],
        BF16_BITS=bf16_bits,
        ACC=_TL_DTYPES[acc], DOT_DTYPE=_dot_dtype(compute),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        enable_fp_fusion=False)
    return c


def _fold_items(weights, lefts, rights, scale64: Tensor) -> List[Tensor]:
    """[W_i + s L_i R_i] by the grouped fold kernel (one launch per dtype group), every item
    with the same float64 device scale; outputs allocated through _new, laid out contiguous."""
    outs = [_empty(tuple(w.shape), w.dtype, w.device) for w in weights]
    n = len(weights)
    scales = scale64.reshape(1).expand(n).contiguous()
    groups: dict = {}
    for i, (w, left, right) in enumerate(zip(weights, lefts, rights)):
        if w.numel():
            groups.setdefault((w.dtype, left.dtype, right.dtype), []).append(i)
    for items in groups.values():
        _fold._launch_group(items, weights, lefts, rights, outs, scales)
    return outs


def _check_shapes(x, w, b, wf, wd, wu, row_scale) -> tuple[int, int]:
    """The kernels trust these shapes: check them, cheaply. Returns (in, out)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D (M, in) tensor, got shape {tuple(x.shape)}")
    m, d_in = x.shape
    d_out = w.shape[0]
    if (wf is None) == (wd is None or wu is None):
        raise ValueError("radapter: give either full_weight, or both down_weight and up_weight")
    r = wd.shape[0] if wd is not None else 0
    expected = {"base_weight": (w, (d_out, d_in)), "base_bias": (b, (d_out,)),
                "full_weight": (wf, (d_out, d_out)), "down_weight": (wd, (r, d_out)),
                "up_weight": (wu, (d_out, r)), "row_scale": (row_scale, (m,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return d_in, d_out


def _scale_tensor(scale: Optional[Tensor], scale_value: float, x: Tensor, acc) -> Tensor:
    """c as a 0-dim tensor in the accumulation dtype (a learnable scale rounded to x's dtype
    first, as reference.effective_scale does): no host sync."""
    if scale is None:
        return torch.tensor(scale_value, dtype=torch.float64, device=x.device).to(acc)
    return scale.reshape(()).to(x.dtype).to(acc)


def _lambda(row_scale: Optional[Tensor], x: Tensor, acc):
    """(r, k, lam): r = row_scale rounded to x's dtype (as the reference) in acc, k = max |r|
    (1 where every r is 0), lam = r / k. All on the device."""
    if row_scale is None:
        return None, None, None
    r = row_scale.to(x.dtype).to(acc)
    k = r.abs().max()
    k = torch.where(k == 0, torch.ones_like(k), k)
    return r, k, (r / k).contiguous()


def _folded(x, w, b, wf, wd, wu, ks64: Tensor):
    """(W_k, b_k, A, a0): W_k = W_o + ks W_f W_o and b_k = b_o + ks W_f b_o in W_o's dtype;
    low rank through A = W_d W_o, a0 = W_d b_o (accumulation dtype)."""
    acc = _acc_dtype(x.dtype)
    one = torch.ones((), dtype=torch.float64, device=x.device)
    a = a0 = None
    if wf is not None:
        left, right_w, right_b = wf, w, (b[:, None] if b is not None else None)
    else:
        r = wd.shape[0]
        items_w = [torch.zeros((r, w.shape[1]), dtype=acc, device=x.device)]
        items_l, items_r = [wd], [w]
        if b is not None:
            items_w.append(torch.zeros((r, 1), dtype=acc, device=x.device))
            items_l.append(wd)
            items_r.append(b[:, None])
        folded = _fold_items(items_w, items_l, items_r, one)
        a = folded[0]
        a0 = folded[1] if b is not None else None
        left, right_w, right_b = wu, a, a0
    weights, lefts, rights = [w], [left], [right_w]
    if b is not None:
        weights.append(b[:, None])
        lefts.append(left)
        rights.append(right_b)
    outs = _fold_items(weights, lefts, rights, ks64)
    wk = outs[0]
    bk = outs[1][:, 0] if b is not None else None
    return wk, bk, a, a0


def forward(x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
            full_weight: Optional[Tensor], down_weight: Optional[Tensor],
            up_weight: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
            row_scale: Optional[Tensor]) -> Tensor:
    """y (M, out), contiguous in x's dtype. CPU without TRITON_INTERPRET=1: the reference."""
    if not _runs_here(x):
        from pyadapt.ops.radapter import _reference_forward
        return _reference_forward(x, base_weight, base_bias, full_weight, down_weight, up_weight,
                                  scale, scale_value, row_scale)
    _check_shapes(x, base_weight, base_bias, full_weight, down_weight, up_weight, row_scale)
    m, d_out = x.shape[0], base_weight.shape[0]
    if m == 0 or d_out == 0:
        return _empty((m, d_out), x.dtype, x.device)
    acc = _acc_dtype(x.dtype)
    c = _scale_tensor(scale, scale_value, x, acc)
    _, k, lam = _lambda(row_scale, x, acc)
    ks = c if k is None else c * k
    wk, bk, _, _ = _folded(x, base_weight, base_bias, full_weight, down_weight, up_weight,
                           ks.to(torch.float64))
    if lam is None:
        return _mm(x, wk.t(), bias0=bk, out_dtype=x.dtype)
    return _mm(x, base_weight.t(), bias0=base_bias, b1=wk.t(), bias1=bk, lam=lam,
               out_dtype=x.dtype)


def backward(grad_y: Tensor, x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
             full_weight: Optional[Tensor], down_weight: Optional[Tensor],
             up_weight: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
             row_scale: Optional[Tensor], needs: List[bool], saved_z: Optional[Tensor] = None,
             saved_q: Optional[Tensor] = None) -> List[Tensor]:
    """[dx, dW_o, db_o, dW_f, dW_d, dW_u, dscale] packed by pyadapt.ops._grads.pack. saved_z /
    saved_q (the cpu backend's saving forward) are not used: the kernels recompute."""
    from pyadapt.ops import _grads

    inputs = [x, base_weight, base_bias, full_weight, down_weight, up_weight, scale]
    if not _runs_here(x):
        from pyadapt.ops.radapter import _reference_backward
        return _reference_backward(grad_y, x, base_weight, base_bias, full_weight, down_weight,
                                   up_weight, scale, scale_value, row_scale, needs)
    _, d_out = _check_shapes(x, base_weight, base_bias, full_weight, down_weight, up_weight,
                             row_scale)
    m = x.shape[0]
    if tuple(grad_y.shape) != (m, d_out):
        raise ValueError(f"grad_y: expected shape {(m, d_out)}, got {tuple(grad_y.shape)}")
    wanted = _grads.wanted(inputs, needs)
    need_dx, need_w, need_b, need_f, need_d, need_u, need_s = wanted
    if m == 0:
        outs = [_new(t) for t in _grads.fake(inputs, needs, x)]
        for i in range(7):
            if wanted[i]:
                outs[i].zero_()     # sums over no rows
        return outs

    dt_ = x.dtype
    acc = _acc_dtype(dt_)
    g = grad_y if grad_y.dtype == dt_ else grad_y.to(dt_)
    s = _scale_tensor(scale, scale_value, x, acc)
    r, k, lam = _lambda(row_scale, x, acc)
    w, b, wf, wd, wu = base_weight, base_bias, full_weight, down_weight, up_weight
    grads: list = [None] * 7
    mm = {"out_dtype": acc}

    # G = r * g rounded to x's dtype, as the reference's g_row (g itself without row_scale)
    G = g if r is None else (g * row_scale.to(dt_)[:, None])
    colsum_g = g.to(acc).sum(0) if (need_b or need_w) else None
    colsum_G = G.to(acc).sum(0)

    # a0 / A (low rank) and W_k are needed for dx; A also for t
    if need_dx or (wd is not None and (need_u or need_s)):
        ks = s if k is None else s * k
        wk, _, a, a0 = _folded(x, w, b, wf, wd, wu, ks.to(torch.float64))
        if need_dx:
            if lam is None:
                grads[0] = _mm(g, wk, out_dtype=dt_)
            else:
                grads[0] = _mm(g, w, b1=wk, lam=lam, out_dtype=dt_)

    if wf is not None:
        if need_f or need_s or need_w:
            P = _mm(G.t(), x, **mm)                                     # G^T x  (out, in)
        if need_f or need_s:
            Pz = _mm(P, w.t(), outer=(colsum_G, b) if b is not None else None, **mm)   # G^T z
            if need_f:
                grads[3] = Pz * s
            if need_s:
                grads[6] = (Pz * wf.to(acc)).sum()
        if need_w:
            gx = P if r is None else _mm(g.t(), x, **mm)
            grads[1] = gx + s * _mm(wf.t(), P, **mm)
        if need_b:
            grads[2] = colsum_g + s * (wf.t().to(acc) @ colsum_G)
    else:
        if need_u or need_s:
            t = _mm(x, a.t(), bias0=a0[:, 0] if a0 is not None else None, **mm)   # z W_d^T
            Pu = _mm(G.t(), t, **mm)                                    # G^T t  (out, r)
            if need_u:
                grads[5] = Pu * s
            if need_s:
                grads[6] = (Pu * wu.to(acc)).sum()
        if need_d or need_w or need_b:
            dtt = _mm(G, wu, **mm) * s                                  # (M, r)
            colsum_dt = dtt.sum(0)
            if need_d or need_w:
                Q = _mm(dtt.t(), x, **mm)                               # dt^T x  (r, in)
            if need_d:
                grads[4] = _mm(Q, w.t(), outer=(colsum_dt, b) if b is not None else None, **mm)
            if need_w:
                grads[1] = _mm(g.t(), x, **mm) + _mm(wd.t(), Q, **mm)
            if need_b:
                grads[2] = colsum_g + wd.t().to(acc) @ colsum_dt
    return _grads.pack(grads, inputs, needs, x)
