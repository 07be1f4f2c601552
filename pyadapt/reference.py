"""Eager PyTorch mathematics of every pyadapt op: the ground truth.

Every other backend (Triton, CUDA, CPU C++) is tested against these functions evaluated in
float64. They are written from the equations of DESIGN.md section 7, work in any floating dtype
(float64 included), operate on 2-D row matrices (M rows of tokens) and import nothing from
pyadapt. Storage convention: a linear layer keeps W as (out, in) and computes x W^T + b.

Backward passes are the exact vector-Jacobian products of the forwards (torch.autograd on the
forward written here), so a kernel's gradients are compared against the true derivative of the
very function its forward is compared against. The tests check these against hand-derived
formulas (REFERENCE-SEMANTICS.md, the backward sections of each method).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS = ("relu", "gelu", "quick_gelu", "silu", "identity")


# ----------------------------------------------------------------------------------------------
# Counter-based dropout: Philox4x32-10 keyed by (seed, element index)
# ----------------------------------------------------------------------------------------------
# Dropout masks are a pure function of (seed, flat element index), identical to Triton's
# `tl.rand(seed, offset)`, so a kernel regenerates the mask in the backward instead of storing it
# and every backend draws the same mask as this reference. Seeds live in [0, 2**31) so the
# 64-bit key's high word is 0 whatever integer type a backend loads the seed as.

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # 2**-31 as Triton rounds it
SEED_LIMIT = 2**31 - 1


def _mul32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * b for unsigned 32-bit a (int64 tensor) and constant b.

    Split into 16-bit halves so every partial product fits in a signed int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi
    partial = (mid << 16) + low
    hi = (a_hi * b_hi + (partial >> 32)) & _MASK32
    return hi, partial & _MASK32


def philox_uniform(seed: Tensor | int, offsets: Tensor) -> Tensor:
    """Uniform float32 numbers in [0, 1) for each int64 offset, equal to Triton's tl.rand."""
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=offsets.device)
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seed_t & _MASK32).expand_as(c0)
    k1 = ((seed_t >> 32) & _MASK32).expand_as(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    as_int32 = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    as_int32 = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    return as_int32.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_multiplier(seed: Tensor | int, rows: int, cols: int, p: float, dtype: torch.dtype,
                       device: torch.device | str, row_ids: Optional[Tensor] = None) -> Tensor:
    """(rows x cols) inverted-dropout factors: 0 where dropped, 1/(1-p) where kept.

    Element (i, j) keeps iff philox_uniform(seed, i * cols + j) >= p (p rounded to float32).
    row_ids (rows,) int64, optional: row i draws Philox row row_ids[i] instead of i (a subset of
    a larger batch, e.g. one adapter's rows in a bank, draws that batch's mask)."""
    if row_ids is None:
        offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    else:
        offsets = (row_ids.to(device=device, dtype=torch.int64)[:, None] * cols
                   + torch.arange(cols, dtype=torch.int64, device=device))
    keep = philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32)
    return keep.to(dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------

def activation(h: Tensor, name: str) -> Tensor:
    """relu, gelu (exact erf form), quick_gelu (h * sigmoid(1.702 h), CLIP's), silu, identity."""
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    if name == "silu":
        return F.silu(h)
    if name == "identity":
        return h
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def activation_grad(h: Tensor, name: str) -> Tensor:
    """d activation(h) / d h, elementwise (relu' = [h > 0])."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + h * pdf
    if name in ("quick_gelu", "silu"):
        k = 1.702 if name == "quick_gelu" else 1.0
        sig = torch.sigmoid(k * h)
        return sig + k * h * sig * (1.0 - sig)
    if name == "identity":
        return torch.ones_like(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


# ----------------------------------------------------------------------------------------------
# Bottleneck adapter and MMA (DESIGN.md 7.1, 7.2)
# ----------------------------------------------------------------------------------------------

def bottleneck_forward(x: Tensor, down_weight: Tensor, down_bias: Optional[Tensor],
                       up_weight: Tensor, up_bias: Optional[Tensor],
                       shared_weight: Optional[Tensor] = None, shared_bias: Optional[Tensor] = None,
                       *, residual: Optional[Tensor] = None, scale: Tensor | float = 1.0,
                       activation_name: str = "relu", dropout_p: float = 0.0,
                       seed: Tensor | int | None = None,
                       row_scale: Optional[Tensor] = None,
                       dropout_rows: Optional[Tensor] = None) -> Tensor:
    """y = residual + scale * row_scale * up(drop(act(shared(act(down(x)))))).

    x: (M, d); down (r, d); shared (r, r) optional (followed by the same activation);
    up (d, r). residual defaults to x. Dropout acts on the (M x r) input of `up`, with the
    counter-based mask of `dropout_multiplier`. row_scale (M,) multiplies each row's adapter
    output (adapter dropping, padding masks). dropout_rows: see dropout_multiplier's row_ids."""
    h = activation(F.linear(x, down_weight, down_bias), activation_name)
    if shared_weight is not None:
        h = activation(F.linear(h, shared_weight, shared_bias), activation_name)
    if dropout_p > 0.0:
        h = h * dropout_multiplier(seed, h.shape[0], h.shape[1], dropout_p, h.dtype, h.device,
                                   dropout_rows)
    delta = F.linear(h, up_weight, up_bias) * scale
    if row_scale is not None:
        delta = delta * row_scale.to(delta.dtype)[:, None]
    base = x if residual is None else residual
    return base + delta


def bottleneck_backward(grad_y: Tensor, x: Tensor, down_weight: Tensor, down_bias: Optional[Tensor],
                        up_weight: Tensor, up_bias: Optional[Tensor],
                        shared_weight: Optional[Tensor], shared_bias: Optional[Tensor], *,
                        has_residual: bool, scale: Tensor | float, activation_name: str,
                        dropout_p: float, seed: Tensor | int | None, row_scale: Optional[Tensor],
                        grad_scale_invariant: bool = False,
                        dropout_rows: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Gradients of bottleneck_forward: [dx, d down_w, d down_b, d shared_w, d shared_b, d up_w,
    d up_b, d scale] (None for absent inputs).

    With g = grad_y and g_u = scale * row_scale * g (the gradient reaching up's output):
      dW_u = g_u^T h, db_u = sum g_u, dh = (g_u W_u) * D, dpre2 = dh * act'(pre2),
      dW_s = dpre2^T h1, dh1 = dpre2 W_s, dpre1 = dh1 * act'(pre1), dW_d = dpre1^T x,
      dx = dpre1 W_d (+ g when the residual is x itself), dscale = sum(g * row_scale * u).
    grad_scale_invariant (MMA's gradient-scale layers) divides every PARAMETER gradient by
    scale, so parameters train as if scale were 1, while dx stays the true gradient. The
    gradient of a separate residual is g itself and is not returned here."""
    pre1 = F.linear(x, down_weight, down_bias)
    h1 = activation(pre1, activation_name)
    h = h1
    if shared_weight is not None:
        pre2 = F.linear(h1, shared_weight, shared_bias)
        h = activation(pre2, activation_name)
    keep = None
    if dropout_p > 0.0:
        keep = dropout_multiplier(seed, h.shape[0], h.shape[1], dropout_p, h.dtype, h.device,
                                  dropout_rows)
        h_in = h * keep
    else:
        h_in = h
    g_row = grad_y if row_scale is None else grad_y * row_scale.to(grad_y.dtype)[:, None]
    u = F.linear(h_in, up_weight, up_bias)
    d_scale = (g_row * u).sum()
    g_u = g_row * scale
    d_up_w = g_u.T @ h_in
    d_up_b = g_u.sum(0) if up_bias is not None else None
    dh = g_u @ up_weight
    if keep is not None:
        dh = dh * keep
    d_shared_w = d_shared_b = None
    if shared_weight is not None:
        dpre2 = dh * activation_grad(pre2, activation_name)
        d_shared_w = dpre2.T @ h1
        d_shared_b = dpre2.sum(0) if shared_bias is not None else None
        dh = dpre2 @ shared_weight
    dpre1 = dh * activation_grad(pre1, activation_name)
    d_down_w = dpre1.T @ x
    d_down_b = dpre1.sum(0) if down_bias is not None else None
    dx = dpre1 @ down_weight
    if not has_residual:
        dx = dx + grad_y
    params = [d_down_w, d_down_b, d_shared_w, d_shared_b, d_up_w, d_up_b, d_scale]
    if grad_scale_invariant:
        params = [None if g is None else g / scale for g in params]
    return [dx] + params


# ----------------------------------------------------------------------------------------------
# R-Adapter: frozen linear followed by a linear adapter (DESIGN.md 7.3)
# ----------------------------------------------------------------------------------------------

def radapter_forward(x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
                     full_weight: Optional[Tensor] = None, down_weight: Optional[Tensor] = None,
                     up_weight: Optional[Tensor] = None, *, scale: Tensor | float = 0.1,
                     row_scale: Optional[Tensor] = None) -> Tensor:
    """y = z + scale * row_scale * q with z = x W_o^T + b_o and q = z W_f^T (full rank) or
    q = (z W_d^T) W_u^T (low rank, W_f = W_u W_d). No bias, no nonlinearity in the adapter.

    scale is s in training and s * eval_scale in eval (the module decides); row_scale (M,)
    carries adapter dropping ({0, 1/(1-p)} per row)."""
    z = F.linear(x, base_weight, base_bias)
    if full_weight is not None:
        q = F.linear(z, full_weight)
    else:
        q = F.linear(F.linear(z, down_weight), up_weight)
    q = q * scale
    if row_scale is not None:
        q = q * row_scale.to(q.dtype)[:, None]
    return z + q


def radapter_backward(grad_y: Tensor, x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
                      full_weight: Optional[Tensor], down_weight: Optional[Tensor],
                      up_weight: Optional[Tensor], *, scale: Tensor | float,
                      row_scale: Optional[Tensor],
                      needs: Optional[Sequence[bool]] = None) -> list[Optional[Tensor]]:
    """Gradients of radapter_forward: [dx, dW_o, db_o, dW_f, dW_d, dW_u, dscale]. The frozen
    base's dW_o, db_o (a full GEMM) are computed only where `needs` asks for them (default: all).

    g_q = scale * row_scale * g; full: dW_f = g_q^T z, dz = g + g_q W_f; low rank with
    t = z W_d^T: dW_u = g_q^T t, dt = g_q W_u, dW_d = dt^T z, dz = g + dt W_d;
    dscale = sum(g * row_scale * q); dx = dz W_o, dW_o = dz^T x, db_o = sum dz."""
    z = F.linear(x, base_weight, base_bias)
    g_row = grad_y if row_scale is None else grad_y * row_scale.to(grad_y.dtype)[:, None]
    g_q = g_row * scale
    d_full = d_down = d_up = None
    if full_weight is not None:
        q = F.linear(z, full_weight)
        d_full = g_q.T @ z
        dz = grad_y + g_q @ full_weight
    else:
        t = F.linear(z, down_weight)
        q = F.linear(t, up_weight)
        d_up = g_q.T @ t
        dt = g_q @ up_weight
        d_down = dt.T @ z
        dz = grad_y + dt @ down_weight
    d_scale = (g_row * q).sum()
    need_w, need_b = (True, True) if needs is None else (needs[1], needs[2])
    d_base_w = dz.T @ x if need_w else None
    d_base_b = dz.sum(0) if base_bias is not None and need_b else None
    return [dz @ base_weight, d_base_w, d_base_b, d_full, d_down, d_up, d_scale]


def drop_multiplier(shape: Sequence[int], granularity: str, p: float, *, batch_first: bool = True,
                    generator: Optional[torch.Generator] = None, dtype=torch.float32,
                    device=None) -> Tensor:
    """Per-row adapter-dropping factors (prod(shape[:-1]),) in {0, 1/(1-p)} for an input of
    `shape` (..., d): "sample" draws one value per sample, "position" one per sequence position
    shared by the whole batch (the official code's behaviour in its L x N x d layout), "row" one
    per token row. A 2-D input (M, d) has no batch/position split: every granularity is per row."""
    lead = list(shape[:-1])
    if len(lead) <= 1 or granularity == "row":
        draw_shape = lead
    else:
        batch_dim, pos_dim = (0, 1) if batch_first else (1, 0)
        keep_dim = batch_dim if granularity == "sample" else pos_dim
        draw_shape = [n if i == keep_dim else 1 for i, n in enumerate(lead)]
    u = torch.rand(draw_shape, generator=generator, device=device, dtype=torch.float32)
    keep = (u >= p).to(dtype) * (1.0 / (1.0 - p))
    return keep.expand(lead).reshape(-1)


def ema_update(cache: Sequence[Tensor], params: Sequence[Tensor], momentum: float) -> None:
    """cache <- m * cache + (1 - m) * param for each pair, in place, no bias correction."""
    for c, p in zip(cache, params):
        c.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------------
# Frozen linear + low-rank / CP / Tucker-core adapter (DESIGN.md 7.5, LoRA form)
# ----------------------------------------------------------------------------------------------

def lowrank_linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor,
                           core: Optional[Tensor], up: Tensor, *, scale: float = 1.0,
                           dropout_p: float = 0.0, seed: Tensor | int | None = None,
                           dropout_after_core: bool = True) -> Tensor:
    """y = x W^T + b + scale * (drop(x A^T) K  or  drop((x A^T) K)) B^T.

    A = down (r1 x in), K = core (r1 x r2, None = identity), B = up (out x r2). LoRA: K = I,
    scale = alpha / r. Aurora: A = U, B = V, K = M_k = C x_3 lambda_k (Tucker) or diag(lambda_k)
    (CP), scale 1, dropout after the core (its ViT) or before it (its BERT)."""
    base = F.linear(x, weight, bias)
    u = F.linear(x, down)
    if dropout_p > 0.0 and not dropout_after_core:
        u = u * dropout_multiplier(seed, u.shape[0], u.shape[1], dropout_p, u.dtype, u.device)
    p = u if core is None else u @ core
    if dropout_p > 0.0 and dropout_after_core:
        p = p * dropout_multiplier(seed, p.shape[0], p.shape[1], dropout_p, p.dtype, p.device)
    return base + F.linear(p, up) * scale


def lowrank_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            down: Tensor, core: Optional[Tensor], up: Tensor, *, scale: float,
                            dropout_p: float, seed: Tensor | int | None,
                            dropout_after_core: bool,
                            needs: Optional[Sequence[bool]] = None) -> list[Optional[Tensor]]:
    """Gradients of lowrank_linear_forward: [dx, dW, db, dA, dK, dB]. The frozen base's dW, db
    (a full GEMM) are computed only where `needs` asks for them (default: all).

    With u = x A^T, D the dropout factors and p the rank-space input of B:
    dB = scale g^T p, g_p = scale g B; after the core: g_p0 = g_p D, dK = u^T g_p0,
    du = g_p0 K^T; before it: dK = (u D)^T g_p, du = (g_p K^T) D; dA = du^T x,
    dx = g W + du A, dW = g^T x, db = sum g."""
    u = F.linear(x, down)
    keep = None
    if dropout_p > 0.0:
        cols = core.shape[1] if (dropout_after_core and core is not None) else u.shape[1]
        keep = dropout_multiplier(seed, u.shape[0], cols, dropout_p, u.dtype, u.device)
    u_in = u * keep if (keep is not None and not dropout_after_core) else u
    p = u_in if core is None else u_in @ core
    if keep is not None and dropout_after_core:
        p = p * keep
    d_up = (grad_y.T @ p) * scale
    g_p = (grad_y @ up) * scale
    if keep is not None and dropout_after_core:
        g_p = g_p * keep
    d_core = None if core is None else u_in.T @ g_p
    du = g_p if core is None else g_p @ core.T
    if keep is not None and not dropout_after_core:
        du = du * keep
    d_down = du.T @ x
    dx = grad_y @ weight + du @ down
    need_w, need_b = (True, True) if needs is None else (needs[1], needs[2])
    d_weight = grad_y.T @ x if need_w else None
    d_bias = grad_y.sum(0) if bias is not None and need_b else None
    return [dx, d_weight, d_bias, d_down, d_core, d_up]


def tucker_core(core: Tensor, lam: Tensor) -> Tensor:
    """M = C x_3 lambda: M[a, b] = sum_c C[a, b, c] lambda[c] (R x R)."""
    return torch.einsum("abc,c->ab", core, lam)


def gated_query(a: Tensor, gamma: Tensor, beta: Tensor, weight: float = 0.1) -> Tensor:
    """Aurora's gated query transformation term: weight * (a * gamma + beta)."""
    return weight * (a * gamma + beta)


def context_enhance(cls_positive: Tensor, text_cls: Tensor, weight: float = 0.1) -> Tensor:
    """Aurora's informative context enhancement: cls + weight * mean over the batch of text CLS."""
    return cls_positive + weight * text_cls.mean(dim=0, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Folding (DESIGN.md 7.3 and 7.5): W' = W + s * L R with one rounding to the storage dtype
# ----------------------------------------------------------------------------------------------

def fold_weight(weight: Tensor, left: Tensor, right: Tensor, scale: float | Tensor) -> Tensor:
    """round_to(W.dtype)(W + s * L @ R), accumulated in float32 (float64 for float64 weights).

    R-Adapter: L = W_f (or W_u), R = W_o (or W_d W_o), and for the bias the same with W = b as a
    column. LoRA/CP/Tucker: L = B, R = K^T A."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    s = torch.as_tensor(scale, dtype=acc, device=weight.device)
    out = weight.to(acc) + s * (left.to(acc) @ right.to(acc))
    return out.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# MPM-NCE loss (DESIGN.md 7.4)
# ----------------------------------------------------------------------------------------------

def mpm_nce_targets(positives: Tensor, label_smoothing: float, dtype: torch.dtype) -> Tensor:
    """q_ij = (1 - eps) P_ij / n_i + eps (1 - P_ij) / (N - n_i); a row with no negatives gives
    its positives all the mass."""
    pos = positives.to(dtype)
    n_pos = pos.sum(dim=1, keepdim=True)
    n_neg = pos.shape[1] - n_pos
    has_neg = n_neg > 0
    pos_mass = torch.where(has_neg, torch.full_like(n_pos, 1.0 - label_smoothing),
                           torch.ones_like(n_pos))
    neg_mass = torch.where(has_neg, label_smoothing / n_neg.clamp_min(1), torch.zeros_like(n_pos))
    return pos * pos_mass / n_pos.clamp_min(1) + (1.0 - pos) * neg_mass


def mpm_nce_forward(image: Tensor, text: Tensor, positives: Tensor, *, logit_scale: float = 100.0,
                    margin: float = 0.0, label_smoothing: float = 0.0) -> Tensor:
    """1/2 [mean_i sum_j q_ij (-log_softmax_j A_ij) + same for B], A = s I T^T + s delta (1 - P),
    B = s T I^T + s delta (1 - P). image, text: L2-normalised (N, D); positives (N, N) bool with a
    true diagonal. Computed with log-softmax, so finite inputs never give NaN."""
    pos = positives.to(image.dtype)
    q = mpm_nce_targets(positives, label_smoothing, image.dtype)
    penalty = logit_scale * margin * (1.0 - pos)
    logits_a = logit_scale * (image @ text.T) + penalty
    logits_b = logit_scale * (text @ image.T) + penalty
    loss_a = -(q * torch.log_softmax(logits_a, dim=1)).sum(dim=1).mean()
    loss_b = -(q * torch.log_softmax(logits_b, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_a + loss_b)


def mpm_nce_backward(grad_loss: Tensor, image: Tensor, text: Tensor, positives: Tensor, *,
                     logit_scale: float, margin: float,
                     label_smoothing: float) -> list[Optional[Tensor]]:
    """Gradients of mpm_nce_forward: [d image, d text].

    dA_ij = (softmax_j(A_i) sum_j q_ij - q_ij) / (2N), likewise dB; then
    dI = lambda (dA T + dB^T T), dT = lambda (dA^T I + dB I)."""
    n = image.shape[0]
    pos = positives.to(image.dtype)
    q = mpm_nce_targets(positives, label_smoothing, image.dtype)
    q_sum = q.sum(dim=1, keepdim=True)
    penalty = logit_scale * margin * (1.0 - pos)
    logits_a = logit_scale * (image @ text.T) + penalty
    logits_b = logit_scale * (text @ image.T) + penalty
    w = grad_loss / (2 * n)
    d_a = (torch.softmax(logits_a, dim=1) * q_sum - q) * w
    d_b = (torch.softmax(logits_b, dim=1) * q_sum - q) * w
    d_image = logit_scale * (d_a @ text + d_b.T @ text)
    d_text = logit_scale * (d_a.T @ image + d_b @ image)
    return [d_image, d_text]


