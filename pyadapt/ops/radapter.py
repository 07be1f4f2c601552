"""The R-Adapter op: a frozen linear followed by its linear adapter, as one computation.

y = z + scale * row_scale * q,  z = x W_o^T + b_o,  q = z W_f^T (full rank) or (z W_d^T) W_u^T.
Declared as `pyadapt::radapter_forward` / `pyadapt::radapter_backward`; the frozen W_o, b_o get
gradients only if they require them (they do not in RAdapter).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _validate as check
from .. import reference
from . import _grads
from ._registry import (backend_for, kernel_for, kernel_of, register, register_autograd,
                        register_from)
from ._scalars import effective_scale, split_scale

Tensor = torch.Tensor


@torch.library.custom_op("pyadapt::radapter_forward", mutates_args=())
def radapter_forward(x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
                     full_weight: Optional[Tensor], down_weight: Optional[Tensor],
                     up_weight: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
                     row_scale: Optional[Tensor]) -> Tensor:
    fn = kernel_for("radapter_forward", x.device)
    return fn(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale, scale_value,
              row_scale).contiguous()


@radapter_forward.register_fake
def _(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale, scale_value,
      row_scale):
    return x.new_empty((x.shape[0], base_weight.shape[0]))


@torch.library.custom_op("pyadapt::radapter_backward", mutates_args=())
def radapter_backward(grad_y: Tensor, x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
                      full_weight: Optional[Tensor], down_weight: Optional[Tensor],
                      up_weight: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
                      row_scale: Optional[Tensor], needs: List[bool],
                      saved_z: Optional[Tensor] = None,
                      saved_q: Optional[Tensor] = None) -> List[Tensor]:
    fn = kernel_for("radapter_backward", x.device)
    return fn(grad_y, x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
              scale_value, row_scale, needs, saved_z, saved_q)


@radapter_backward.register_fake
def _(grad_y, x, base_weight, base_bias, full_weight, down_weight, up_weight, scale, scale_value,
      row_scale, needs, saved_z=None, saved_q=None):
    return _grads.fake([x, base_weight, base_bias, full_weight, down_weight, up_weight, scale],
                       needs, x)


def _setup_context(ctx, inputs, output, saved=(None, None)):
    *tensors, scale_value, row_scale = inputs
    ctx.save_for_backward(*tensors, row_scale, *saved)
    ctx.scale_value = scale_value


def _backward(ctx, grad_y):
    (x, base_weight, base_bias, full_weight, down_weight, up_weight, scale, row_scale, saved_z,
     saved_q) = ctx.saved_tensors
    inputs = [x, base_weight, base_bias, full_weight, down_weight, up_weight, scale]
    needs = list(ctx.needs_input_grad[:7])
    grads = [None] * 7
    if any(_grads.wanted(inputs, needs)):
        packed = radapter_backward(grad_y, x, base_weight, base_bias, full_weight, down_weight,
                                   up_weight, scale, ctx.scale_value, row_scale, needs, saved_z,
                                   saved_q)
        grads = _grads.unpack(packed, inputs, needs)
    return (*grads, None, None)


register_autograd(radapter_forward, _backward, _setup_context)


# The training forward of the cpu backend for the full-rank form: y, and z and q (compute dtype:
# float32, float64 for float64) for the backward, which then neither recomputes z nor forms
# g^T z in float64 for dscale (what eager autograd keeps, it keeps). q is the backward's: rows
# whose row_scale is 0 (dropped adapters) may hold zeros instead. `radapter()` takes it in
# eager training on the cpu backend; on any other backend the op still answers (that backend's
# y, z and q computed in torch), so a choice made under one backend stays correct under another.

@torch.library.custom_op("pyadapt::radapter_forward_saving", mutates_args=())
def radapter_forward_saving(x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor],
                            full_weight: Optional[Tensor], down_weight: Optional[Tensor],
                            up_weight: Optional[Tensor], scale: Optional[Tensor],
                            scale_value: float,
                            row_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    args = (x, base_weight, base_bias, full_weight, down_weight, up_weight, scale, scale_value,
            row_scale)
    saving = kernel_of("radapter_forward_saving", backend_for("radapter_forward", x.device))
    if saving is not None:
        y, z, q = saving(*args)
    else:   # this backend has no saving kernel: its y, z and q in torch
        y = kernel_for("radapter_forward", x.device)(*args)
        z, q = _z_and_q(x, base_weight, base_bias, full_weight)
    return y.contiguous(), z.contiguous(), q.contiguous()


def _saved_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@radapter_forward_saving.register_fake
def _(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale, scale_value,
      row_scale):
    shape = (x.shape[0], base_weight.shape[0]) if full_weight is not None else (0,)
    return (x.new_empty((x.shape[0], base_weight.shape[0])),
            x.new_empty(shape, dtype=_saved_dtype(x)), x.new_empty(shape, dtype=_saved_dtype(x)))


def _z_and_q(x, base_weight, base_bias, full_weight):
    """z = x W_o^T + b_o and q = z W_f^T in the compute dtype (empty for the low-rank form)."""
    dtype = _saved_dtype(x)
    if full_weight is None:
        return x.new_empty(0, dtype=dtype), x.new_empty(0, dtype=dtype)
    z = torch.nn.functional.linear(x.to(dtype), base_weight.to(dtype),
                                   None if base_bias is None else base_bias.to(dtype))
    return z, z @ full_weight.to(dtype).T


def _setup_saving(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    full = inputs[3] is not None
    _setup_context(ctx, inputs, output[0],
                   saved=(output[1], output[2]) if full else (None, None))


def _backward_saving(ctx, grad_y, grad_z, grad_q):
    return _backward(ctx, grad_y)


register_autograd(radapter_forward_saving, _backward_saving, _setup_saving)


def _reference_forward(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
                       scale_value, row_scale):
    return reference.radapter_forward(x, base_weight, base_bias, full_weight, down_weight,
                                      up_weight, scale=effective_scale(scale, scale_value, x),
                                      row_scale=row_scale)


def _reference_forward_saving(x, base_weight, base_bias, full_weight, down_weight, up_weight,
                              scale, scale_value, row_scale):
    y = _reference_forward(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
                           scale_value, row_scale)
    return (y, *_z_and_q(x, base_weight, base_bias, full_weight))


def _reference_backward(grad_y, x, base_weight, base_bias, full_weight, down_weight, up_weight,
                        scale, scale_value, row_scale, needs, saved_z=None, saved_q=None):
    """saved_z / saved_q (the saving forward's) are not used: the reference recomputes from x,
    the ground truth."""
    grads = reference.radapter_backward(grad_y, x, base_weight, base_bias, full_weight,
                                        down_weight, up_weight,
                                        scale=effective_scale(scale, scale_value, x),
                                        row_scale=row_scale, needs=needs)
    inputs = [x, base_weight, base_bias, full_weight, down_weight, up_weight, scale]
    return _grads.pack(grads, inputs, needs, x)


register("radapter_forward", "reference", _reference_forward)
register("radapter_forward_saving", "reference", _reference_forward_saving)
register("radapter_backward", "reference", _reference_backward)


def radapter(x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor], *,
             full_weight: Optional[Tensor] = None, down_weight: Optional[Tensor] = None,
             up_weight: Optional[Tensor] = None, scale: Tensor | float = 0.1,
             row_scale: Optional[Tensor] = None) -> Tensor:
    """Checked entry point on row matrices: x (M, in); base_weight (out, in); base_bias (out,)
    or None; either full_weight (out, out) or down_weight (r, out) with up_weight (out, r);
    scale a float or 0-dim tensor; row_scale (M,) or None. Returns y (M, out)."""
    check.tensor("x", x, ndim=2)
    m, d_in = x.shape
    check.tensor("base.weight", base_weight, ndim=2)
    d_out = base_weight.shape[0]
    check.shape("base.weight", base_weight, (d_out, d_in), "out_features x in_features")
    check.same_dtype_device("base.weight", base_weight, "x", x)
    if base_bias is not None:
        check.tensor("base.bias", base_bias)
        check.shape("base.bias", base_bias, (d_out,))
        check.same_dtype_device("base.bias", base_bias, "x", x)
    if (full_weight is None) == (down_weight is None or up_weight is None):
        raise ValueError("radapter: give either full_weight, or both down_weight and up_weight")
    if full_weight is not None:
        check.tensor("adapter.weight", full_weight)
        check.shape("adapter.weight", full_weight, (d_out, d_out), "out_features x out_features")
        check.same_dtype_device("adapter.weight", full_weight, "x", x)
    else:
        check.tensor("adapter.down", down_weight, ndim=2)
        r = down_weight.shape[0]
        check.shape("adapter.down", down_weight, (r, d_out), "rank x out_features")
        check.shape("adapter.up", up_weight, (d_out, r), "out_features x rank")
        check.same_dtype_device("adapter.down", down_weight, "x", x)
        check.same_dtype_device("adapter.up", up_weight, "x", x)
    if row_scale is not None:
        check.tensor("row_scale", row_scale)
        check.shape("row_scale", row_scale, (m,), "one factor per row of x")
        check.same_device("row_scale", row_scale, "x", x)
        check.no_grad_required("row_scale", row_scale, "it carries masks and drop factors")
    scale_t, scale_value = split_scale(scale, x)
    args = (x, base_weight, base_bias, full_weight, down_weight, up_weight, scale_t, scale_value,
            row_scale)
    if full_weight is not None and _trains_on_cpu_backend(x, args):
        return radapter_forward_saving(*args)[0]
    return radapter_forward(*args)


def _trains_on_cpu_backend(x: Tensor, args) -> bool:
    """Eager training on the cpu backend (not under torch.compile, whose graph holds the plain
    op; not without a gradient to take)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
            and backend_for("radapter_forward", x.device) == "cpu")


# triton backend (kernels/radapter.py), when triton imports
register_from("triton", "pyadapt.kernels.radapter",
              {"radapter_forward": "forward", "radapter_backward": "backward"})


# ---------------------------------------------------------------------------------------------
# cpu backend (csrc/cpu/radapter.cpp), when the native extension was built. It computes float32
# and float64, and bf16/fp16 storage in float32 (rounded once, here); other dtypes or devices
# run the reference.

from . import _native  # noqa: E402

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_covers(x) -> bool:
    return x.device.type == "cpu" and x.dtype in _CPU_DTYPES


def _scale_float(scale, scale_value, x) -> float:
    # A learnable scale is used in x's dtype, as the reference uses it.
    return scale_value if scale is None else float(scale.to(x.dtype))


def _cpu_forward(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
                 scale_value, row_scale):
    if not _cpu_covers(x):
        return _reference_forward(x, base_weight, base_bias, full_weight, down_weight, up_weight,
                                  scale, scale_value, row_scale)
    y = _native.ops().radapter_forward(x, base_weight, base_bias, full_weight, down_weight,
                                       up_weight, _scale_float(scale, scale_value, x), row_scale)
    return y.to(x.dtype)


def _cpu_forward_saving(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
                        scale_value, row_scale):
    if not _cpu_covers(x):
        return _reference_forward_saving(x, base_weight, base_bias, full_weight, down_weight,
                                         up_weight, scale, scale_value, row_scale)
    y, z, q = _native.ops().radapter_forward_saving(
        x, base_weight, base_bias, full_weight, down_weight, up_weight,
        _scale_float(scale, scale_value, x), row_scale)
    return y.to(x.dtype), z, q


def _cpu_backward(grad_y, x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
                  scale_value, row_scale, needs, saved_z=None, saved_q=None):
    if not _cpu_covers(x):
        return _reference_backward(grad_y, x, base_weight, base_bias, full_weight, down_weight,
                                   up_weight, scale, scale_value, row_scale, needs)
    flags = [bool(n) for n in needs]
    flags[6] = flags[6] and scale is not None
    grads = _native.ops().radapter_backward(grad_y, x, base_weight, base_bias, full_weight,
                                            down_weight, up_weight,
                                            _scale_float(scale, scale_value, x), row_scale, flags,
                                            saved_z, saved_q)
    inputs = [x, base_weight, base_bias, full_weight, down_weight, up_weight, scale]
    return _grads.pack(grads, inputs, needs, x)


if _native.available:
    register("radapter_forward", "cpu", _cpu_forward)
    register("radapter_forward_saving", "cpu", _cpu_forward_saving)
    register("radapter_backward", "cpu", _cpu_backward)
