"""The frozen linear + low-rank adapter op (LoRA, CP and Tucker-core forms).

y = x W^T + b + scale * (x A^T -> core K -> dropout in rank space) B^T, declared as
`pyadapt::lowrank_forward` / `pyadapt::lowrank_backward`. K (r1 x r2) is optional (identity);
the modules compute it from the shared Tucker core and the per-site lambda (or diag(lambda)), so
its gradient flows on to them through ordinary autograd.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .. import _validate as check
from .. import reference
from . import _grads
from ._registry import kernel_for, register, register_autograd, register_from
from ._scalars import seed_tensor

Tensor = torch.Tensor


@torch.library.custom_op("pyadapt::lowrank_forward", mutates_args=())
def lowrank_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor,
                    core: Optional[Tensor], up: Tensor, scale: float, seed: Optional[Tensor],
                    dropout_p: float, dropout_after_core: bool) -> Tensor:
    fn = kernel_for("lowrank_forward", x.device)
    y = fn(x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core)
    return y.contiguous()


@lowrank_forward.register_fake
def _(x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("pyadapt::lowrank_backward", mutates_args=())
def lowrank_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     down: Tensor, core: Optional[Tensor], up: Tensor, scale: float,
                     seed: Optional[Tensor], dropout_p: float, dropout_after_core: bool,
                     needs: List[bool]) -> List[Tensor]:
    fn = kernel_for("lowrank_backward", x.device)
    return fn(grad_y, x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core,
              needs)


@lowrank_backward.register_fake
def _(grad_y, x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core, needs):
    return _grads.fake([x, weight, bias, down, core, up], needs, x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core = inputs
    ctx.save_for_backward(x, weight, bias, down, core, up, seed)
    ctx.hyper = (scale, dropout_p, dropout_after_core)


def _backward(ctx, grad_y):
    x, weight, bias, down, core, up, seed = ctx.saved_tensors
    scale, dropout_p, dropout_after_core = ctx.hyper
    inputs = [x, weight, bias, down, core, up]
    needs = list(ctx.needs_input_grad[:6])
    grads = [None] * 6
    if any(_grads.wanted(inputs, needs)):
        packed = lowrank_backward(grad_y, x, weight, bias, down, core, up, scale, seed, dropout_p,
                                  dropout_after_core, needs)
        grads = _grads.unpack(packed, inputs, needs)
    return (*grads, None, None, None, None)


register_autograd(lowrank_forward, _backward, _setup_context)


def _reference_forward(x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core):
    return reference.lowrank_linear_forward(x, weight, bias, down, core, up, scale=scale,
                                            dropout_p=dropout_p, seed=seed,
                                            dropout_after_core=dropout_after_core)


def _reference_backward(grad_y, x, weight, bias, down, core, up, scale, seed, dropout_p,
                        dropout_after_core, needs):
    grads = reference.lowrank_linear_backward(grad_y, x, weight, bias, down, core, up,
                                              scale=scale, dropout_p=dropout_p, seed=seed,
                                              dropout_after_core=dropout_after_core,
                                              needs=needs)
    return _grads.pack(grads, [x, weight, bias, down, core, up], needs, x)


register("lowrank_forward", "reference", _reference_forward)
register("lowrank_backward", "reference", _reference_backward)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor,
                   core: Optional[Tensor], up: Tensor, *, scale: float = 1.0,
                   dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                   dropout_after_core: bool = True) -> Tensor:
    """Checked entry point on row matrices: x (M, in); weight (out, in); bias (out,) or None;
    down A (r1, in); core K (r1, r2) or None (then r2 = r1); up B (out, r2). Returns (M, out)."""
    check.tensor("x", x, ndim=2)
    m, d_in = x.shape
    check.tensor("base.weight", weight, ndim=2)
    d_out = weight.shape[0]
    check.shape("base.weight", weight, (d_out, d_in), "out_features x in_features")
    check.same_dtype_device("base.weight", weight, "x", x)
    if bias is not None:
        check.tensor("base.bias", bias)
        check.shape("base.bias", bias, (d_out,))
        check.same_dtype_device("base.bias", bias, "x", x)
    check.tensor("down", down, ndim=2)
    r1 = down.shape[0]
    check.shape("down", down, (r1, d_in), "rank x in_features")
    check.same_dtype_device("down", down, "x", x)
    r2 = r1
    if core is not None:
        check.tensor("core", core, ndim=2)
        r2 = core.shape[1]
        check.shape("core", core, (r1, r2), "rank of down x rank of up")
        check.same_dtype_device("core", core, "x", x)
    check.tensor("up", up, ndim=2)
    check.shape("up", up, (d_out, r2), "out_features x rank")
    check.same_dtype_device("up", up, "x", x)
    scale = check.finite("scale", scale)
    dropout_p = check.probability("dropout", dropout_p)
    return lowrank_forward(x, weight, bias, down, core, up, scale,
                           seed_tensor(seed, dropout_p, x), dropout_p, bool(dropout_after_core))


# triton backend (kernels/lowrank.py), when triton imports
register_from("triton", "pyadapt.kernels.lowrank",
              {"lowrank_forward": "forward", "lowrank_backward": "backward"})


# ---------------------------------------------------------------------------------------------
# cpu backend (csrc/cpu/lowrank.cpp), when the native extension was built. It computes float32
# and float64, and bf16/fp16 storage in float32 (rounded once, here); other dtypes or devices
# run the reference.

from . import _native  # noqa: E402

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_covers(x) -> bool:
    return x.device.type == "cpu" and x.dtype in _CPU_DTYPES


def _cpu_forward(x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core):
    if not _cpu_covers(x):
        return _reference_forward(x, weight, bias, down, core, up, scale, seed, dropout_p,
                                  dropout_after_core)
    y = _native.ops().lowrank_forward(x, weight, bias, down, core, up, float(scale), seed,
                                      float(dropout_p), bool(dropout_after_core))
    return y.to(x.dtype)


def _cpu_backward(grad_y, x, weight, bias, down, core, up, scale, seed, dropout_p,
                  dropout_after_core, needs):
    if not _cpu_covers(x):
        return _reference_backward(grad_y, x, weight, bias, down, core, up, scale, seed,
                                   dropout_p, dropout_after_core, needs)
    grads = _native.ops().lowrank_backward(grad_y, x, weight, bias, down, core, up, float(scale),
                                           seed, float(dropout_p), bool(dropout_after_core),
                                           [bool(n) for n in needs])
    return _grads.pack(grads, [x, weight, bias, down, core, up], needs, x)


if _native.available:
    register("lowrank_forward", "cpu", _cpu_forward)
    register("lowrank_backward", "cpu", _cpu_backward)
