"""The grouped-linear bank op: N full-rank linear adapters (R-Adapter's rank=None form) applied
to one batch, each row by its own adapter,

    y[m] = z[m] + c[a] * z[m] W[a]^T      a = ids[m] >= 0
    y[m] = z[m]                           ids[m] == -1

with W stacked (N, d, d) and c (N,) one scale per adapter (learnable: it gets a gradient per
adapter). Gradients, per adapter a over its rows (G, Z: the rows' grad_y and z):

    dz = g + c[a] * g W[a]   (dz = g for -1 rows),   dW[a] = c[a] G^T Z,
    dc[a] = sum(G * (Z W[a]^T)) = <G^T Z, W[a]>      (adapters no row names: zeros).

c is used rounded to z's dtype (as the bank_bottleneck op uses its scale). Declared once as
`pyadapt::bank_linear_forward` / `pyadapt::bank_linear_backward` custom ops (fake rules,
registered autograd). Backends: reference (a Python loop over ids: the ground truth), cpu (one
stable sort, then one BLAS product per adapter group), triton (kernels/bank_linear.py: a grouped
GEMM over rows sorted by id on the device, no host sync, deterministic backward).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .. import _validate as check
from . import _grads, _native
from ._registry import kernel_for, register, register_autograd, register_from
from .bank import _groups   # [(adapter, its rows)] after one stable sort of the ids

Tensor = torch.Tensor


@torch.library.custom_op("pyadapt::bank_linear_forward", mutates_args=())
def bank_linear_forward(z: Tensor, ids: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    fn = kernel_for("bank_linear_forward", z.device)
    return fn(z, ids, weight, scale).contiguous()


@bank_linear_forward.register_fake
def _(z, ids, weight, scale):
    return z.new_empty(z.shape)


@torch.library.custom_op("pyadapt::bank_linear_backward", mutates_args=())
def bank_linear_backward(grad_y: Tensor, z: Tensor, ids: Tensor, weight: Tensor, scale: Tensor,
                         needs: List[bool]) -> List[Tensor]:
    fn = kernel_for("bank_linear_backward", z.device)
    return fn(grad_y, z, ids, weight, scale, needs)


@bank_linear_backward.register_fake
def _(grad_y, z, ids, weight, scale, needs):
    return _grads.fake([z, weight, scale], needs, z)


def _setup_context(ctx, inputs, output):
    z, ids, weight, scale = inputs
    ctx.save_for_backward(z, ids, weight, scale)


def _backward(ctx, grad_y):
    z, ids, weight, scale = ctx.saved_tensors
    n = ctx.needs_input_grad
    inputs = [z, weight, scale]
    needs = [n[0], n[2], n[3]]      # forward positions: z 0, ids 1, weight 2, scale 3
    grads = [None, None, None]
    if any(_grads.wanted(inputs, needs)):
        packed = bank_linear_backward(grad_y.to(z.dtype), z, ids, weight, scale, needs)
        grads = _grads.unpack(packed, inputs, needs)
    dz, d_weight, d_scale = grads
    return dz, None, d_weight, d_scale


register_autograd(bank_linear_forward, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------
# reference backend: a loop over adapter ids in z's dtype (host syncs; the ground truth)

def _reference_forward(z, ids, weight, scale):
    y = z.clone()
    for a in range(weight.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel():
            zr = z[rows]
            y[rows] = zr + F.linear(zr, weight[a]) * scale[a].to(z.dtype)
    return y


def _reference_backward(grad_y, z, ids, weight, scale, needs):
    g = grad_y.to(z.dtype)
    dz = g.clone()                          # -1 rows: y = z
    d_weight = torch.zeros_like(weight)
    d_scale = torch.zeros_like(scale)
    for a in range(weight.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        gr, zr = g[rows], z[rows]
        c = scale[a].to(z.dtype)
        g_q = gr * c
        dz[rows] = gr + g_q @ weight[a]
        d_weight[a] = g_q.T @ zr
        d_scale[a] = (gr * F.linear(zr, weight[a])).sum()
    return _grads.pack([dz, d_weight, d_scale], [z, weight, scale], needs, z)


register("bank_linear_forward", "reference", _reference_forward)
register("bank_linear_backward", "reference", _reference_backward)


# ---------------------------------------------------------------------------------------------
# cpu backend: one stable sort of the ids (host-side group sizes cost nothing on a CPU), then per
# adapter group one BLAS product on the gathered rows, accumulated in float32 (float64 for
# float64) and rounded once. BLAS is the right tool for a d x d product; for a fixed thread
# count the results are the same run to run.

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_scale(scale: Tensor, a: int, dtype: torch.dtype) -> float:
    return float(scale[a].to(dtype))    # rounded to z's dtype, as the reference uses it


def _cpu_forward(z, ids, weight, scale):
    acc = _acc(z.dtype)
    y = z.clone()
    for a, rows in _groups(ids, weight.shape[0]):
        zr = z[rows].to(acc)
        y[rows] = torch.addmm(zr, zr, weight[a].to(acc).T,
                              alpha=_cpu_scale(scale, a, z.dtype)).to(z.dtype)
    return y


def _cpu_backward(grad_y, z, ids, weight, scale, needs):
    inputs = [z, weight, scale]
    need_dz, need_dw, need_dc = _grads.wanted(inputs, needs)
    acc = _acc(z.dtype)
    g = grad_y.to(z.dtype)
    dz = g.clone() if need_dz else None
    d_weight = torch.zeros_like(weight) if need_dw else None
    d_scale = torch.zeros(scale.shape, dtype=acc, device=z.device) if need_dc else None
    for a, rows in _groups(ids, weight.shape[0]):
        gr = g[rows].to(acc)
        w = weight[a].to(acc)
        c = _cpu_scale(scale, a, z.dtype)
        if need_dz:
            dz[rows] = torch.addmm(gr, gr, w, alpha=c).to(z.dtype)
        if need_dw or need_dc:
            p = gr.T @ z[rows].to(acc)      # G^T Z: dW / c, and dc = <G^T Z, W>
            if need_dw:
                d_weight[a] = (p * c).to(weight.dtype)
            if need_dc:
                d_scale[a] = (p * w).sum()
    return _grads.pack([dz, d_weight, d_scale], inputs, needs, z)


if _native.available:   # the cpu backend exists where the native extension was built
    register("bank_linear_forward", "cpu", _cpu_forward)
    register("bank_linear_backward", "cpu", _cpu_backward)

# triton backend (kernels/bank_linear.py), when triton imports
register_from("triton", "pyadapt.kernels.bank_linear",
              {"bank_linear_forward": "forward", "bank_linear_backward": "backward"})


# ---------------------------------------------------------------------------------------------

def bank_linear(z: Tensor, ids: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """Checked entry point on row matrices: z (M, d); ids (M,) int64 in [-1, N) (see
    pyadapt.ops.bank.adapter_rows: out-of-range ids must already be -1); weight (N, d, d);
    scale (N,) (a parameter when learnable; any floating dtype, used in z's dtype).
    Returns y (M, d) in z's dtype."""
    check.tensor("z", z, ndim=2)
    m, d = z.shape
    check.tensor("weight", weight, ndim=3)
    n = weight.shape[0]
    check.shape("weight", weight, (n, d, d), "adapters x out_features x out_features")
    check.same_dtype_device("weight", weight, "z", z)
    check.tensor("scale", scale)
    check.shape("scale", scale, (n,), "one scale per adapter")
    check.same_device("scale", scale, "z", z)
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        got = type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype
        raise TypeError(f"ids: expected an int64 tensor (see pyadapt.ops.bank.adapter_rows), "
                        f"got {got}")
    check.same_device("ids", ids, "z", z)
    if tuple(ids.shape) != (m,):
        raise ValueError(f"ids: expected shape {(m,)} (one id per row of z), got "
                         f"{tuple(ids.shape)}")
    return bank_linear_forward(z, ids, weight, scale)
