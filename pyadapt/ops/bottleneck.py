"""The bottleneck / MMA adapter op:

    y = residual + scale * row_scale * up(drop(act(shared?(act(down(x))))))

Declared once as `pyadapt::bottleneck_forward` and `pyadapt::bottleneck_backward` custom ops with
fake-tensor rules and registered autograd. The body of each asks the registry which backend runs
it. `bottleneck()` is the checked entry point the modules call.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _validate as check
from .. import reference
from . import _grads
from ._registry import (backend_for, kernel_for, kernel_of, register, register_autograd,
                        register_from)
from ._scalars import effective_scale, seed_tensor, split_scale

Tensor = torch.Tensor

# Differentiable inputs of the forward, in the order the backward op returns their gradients.
_GRAD_INPUTS = ("x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight",
                "up_bias", "scale")


@torch.library.custom_op("pyadapt::bottleneck_forward", mutates_args=())
def bottleneck_forward(x: Tensor, residual: Optional[Tensor], down_weight: Tensor,
                       down_bias: Optional[Tensor], shared_weight: Optional[Tensor],
                       shared_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
                       scale: Optional[Tensor], scale_value: float, row_scale: Optional[Tensor],
                       seed: Optional[Tensor], activation: str, dropout_p: float,
                       grad_scale_invariant: bool) -> Tensor:
    fn = kernel_for("bottleneck_forward", x.device)
    return fn(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
              scale, scale_value, row_scale, seed, activation, dropout_p).contiguous()


@bottleneck_forward.register_fake
def _(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale,
      scale_value, row_scale, seed, activation, dropout_p, grad_scale_invariant):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("pyadapt::bottleneck_backward", mutates_args=())
def bottleneck_backward(grad_y: Tensor, x: Tensor, has_residual: bool, down_weight: Tensor,
                        down_bias: Optional[Tensor], shared_weight: Optional[Tensor],
                        shared_bias: Optional[Tensor], up_weight: Tensor,
                        up_bias: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
                        row_scale: Optional[Tensor], seed: Optional[Tensor], activation: str,
                        dropout_p: float, grad_scale_invariant: bool, needs: List[bool],
                        saved_pre: Optional[Tensor] = None) -> List[Tensor]:
    fn = kernel_for("bottleneck_backward", x.device)
    return fn(grad_y, x, has_residual, down_weight, down_bias, shared_weight, shared_bias,
              up_weight, up_bias, scale, scale_value, row_scale, seed, activation, dropout_p,
              grad_scale_invariant, needs, saved_pre)


@bottleneck_backward.register_fake
def _(grad_y, x, has_residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
      up_bias, scale, scale_value, row_scale, seed, activation, dropout_p, grad_scale_invariant,
      needs, saved_pre=None):
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    return _grads.fake(inputs, needs, x)


def _setup_context(ctx, inputs, output, saved_pre=None):
    (x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale,
     scale_value, row_scale, seed, activation, dropout_p, grad_scale_invariant) = inputs
    ctx.save_for_backward(x, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                          up_bias, scale, row_scale, seed, saved_pre)
    ctx.has_residual = residual is not None
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.hyper = (scale_value, activation, dropout_p, grad_scale_invariant)


def _backward(ctx, grad_y):
    (x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale, row_scale,
     seed, saved_pre) = ctx.saved_tensors
    scale_value, activation, dropout_p, grad_scale_invariant = ctx.hyper
    n = ctx.needs_input_grad
    # forward input positions: x 0, residual 1, down 2-3, shared 4-5, up 6-7, scale 8
    needs = [n[0], n[2], n[3], n[4], n[5], n[6], n[7], n[8]]
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    grads = [None] * len(_GRAD_INPUTS)
    if any(_grads.wanted(inputs, needs)):
        packed = bottleneck_backward(grad_y, x, ctx.has_residual, down_weight, down_bias,
                                     shared_weight, shared_bias, up_weight, up_bias, scale,
                                     scale_value, row_scale, seed, activation, dropout_p,
                                     grad_scale_invariant, needs, saved_pre)
        grads = _grads.unpack(packed, inputs, needs)
    dx, d_down_w, d_down_b, d_shared_w, d_shared_b, d_up_w, d_up_b, d_scale = grads
    d_residual = grad_y.to(ctx.residual_dtype) if ctx.has_residual and n[1] else None
    return (dx, d_residual, d_down_w, d_down_b, d_shared_w, d_shared_b, d_up_w, d_up_b, d_scale,
            None, None, None, None, None, None)


register_autograd(bottleneck_forward, _backward, _setup_context)


# The training forward of the cpu backend: y and the rows' pre-activations (M, r), with pre2
# after them (M, 2r) when shared, in the compute dtype (float32; float64 for float64 storage).
# The backward reads them instead of recomputing down(x) (a product over d): `bottleneck()`
# takes this op in eager training on the cpu backend. On any other backend the op still answers
# (y from that backend, the pre-activations computed in torch), so a choice made under one
# backend stays correct under another.

@torch.library.custom_op("pyadapt::bottleneck_forward_saving", mutates_args=())
def bottleneck_forward_saving(x: Tensor, residual: Optional[Tensor], down_weight: Tensor,
                              down_bias: Optional[Tensor], shared_weight: Optional[Tensor],
                              shared_bias: Optional[Tensor], up_weight: Tensor,
                              up_bias: Optional[Tensor], scale: Optional[Tensor],
                              scale_value: float, row_scale: Optional[Tensor],
                              seed: Optional[Tensor], activation: str, dropout_p: float,
                              grad_scale_invariant: bool) -> Tuple[Tensor, Tensor]:
    args = (x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
            scale, scale_value, row_scale, seed, activation, dropout_p)
    saving = kernel_of("bottleneck_forward_saving", backend_for("bottleneck_forward", x.device))
    if saving is not None:
        y, pre = saving(*args)
    else:   # this backend has no saving kernel: its y, the pre-activations in torch
        y = kernel_for("bottleneck_forward", x.device)(*args)
        pre = _pre_activations(x, down_weight, down_bias, shared_weight, shared_bias, activation)
    return y.contiguous(), pre.contiguous()


def _pre_shape(x: Tensor, down_weight: Tensor, shared_weight: Optional[Tensor]):
    width = down_weight.shape[0] * (1 if shared_weight is None else 2)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.shape[0], width), dtype


@bottleneck_forward_saving.register_fake
def _(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale,
      scale_value, row_scale, seed, activation, dropout_p, grad_scale_invariant):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    shape, pre_dtype = _pre_shape(x, down_weight, shared_weight)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(shape, dtype=pre_dtype)


def _setup_saving(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    _setup_context(ctx, inputs, output[0], saved_pre=output[1])


def _backward_saving(ctx, grad_y, grad_pre):
    return _backward(ctx, grad_y)


register_autograd(bottleneck_forward_saving, _backward_saving, _setup_saving)


def _pre_activations(x, down_weight, down_bias, shared_weight, shared_bias, activation):
    """The saved pre-activations computed in torch (for backends without a saving kernel)."""
    _, dtype = _pre_shape(x, down_weight, shared_weight)
    cast = [None if t is None else t.to(dtype) for t in
            (x, down_weight, down_bias, shared_weight, shared_bias)]
    pre1 = torch.nn.functional.linear(cast[0], cast[1], cast[2])
    if shared_weight is None:
        return pre1
    pre2 = torch.nn.functional.linear(reference.activation(pre1, activation), cast[3], cast[4])
    return torch.cat([pre1, pre2], dim=1)


# ---------------------------------------------------------------------------------------------
# reference backend

def _reference_forward(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                       up_bias, scale, scale_value, row_scale, seed, activation, dropout_p):
    return reference.bottleneck_forward(
        x, down_weight, down_bias, up_weight, up_bias, shared_weight, shared_bias,
        residual=residual, scale=effective_scale(scale, scale_value, x), activation_name=activation,
        dropout_p=dropout_p, seed=seed, row_scale=row_scale)


def _reference_forward_saving(x, residual, down_weight, down_bias, shared_weight, shared_bias,
                              up_weight, up_bias, scale, scale_value, row_scale, seed,
                              activation, dropout_p):
    y = _reference_forward(x, residual, down_weight, down_bias, shared_weight, shared_bias,
                           up_weight, up_bias, scale, scale_value, row_scale, seed, activation,
                           dropout_p)
    return y, _pre_activations(x, down_weight, down_bias, shared_weight, shared_bias, activation)


def _reference_backward(grad_y, x, has_residual, down_weight, down_bias, shared_weight,
                        shared_bias, up_weight, up_bias, scale, scale_value, row_scale, seed,
                        activation, dropout_p, grad_scale_invariant, needs, saved_pre=None):
    """saved_pre (the saving forward's pre-activations) is not used: the reference recomputes
    everything from x, the ground truth."""
    grads = reference.bottleneck_backward(
        grad_y.to(x.dtype), x, down_weight, down_bias, up_weight, up_bias, shared_weight,
        shared_bias, has_residual=has_residual, scale=effective_scale(scale, scale_value, x),
        activation_name=activation, dropout_p=dropout_p, seed=seed, row_scale=row_scale,
        grad_scale_invariant=grad_scale_invariant)
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    return _grads.pack(grads, inputs, needs, x)


register("bottleneck_forward", "reference", _reference_forward)
register("bottleneck_forward_saving", "reference", _reference_forward_saving)
register("bottleneck_backward", "reference", _reference_backward)


# ---------------------------------------------------------------------------------------------

def bottleneck(x: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
               up_bias: Optional[Tensor], shared_weight: Optional[Tensor] = None,
               shared_bias: Optional[Tensor] = None, *, residual: Optional[Tensor] = None,
               scale: Tensor | float = 1.0, activation: str = "relu", dropout_p: float = 0.0,
               seed: Optional[Tensor] = None, row_scale: Optional[Tensor] = None,
               grad_scale_invariant: bool = False) -> Tensor:
    """Checked entry point of the bottleneck op on row matrices.

    x (M, d); down_weight (r, d); up_weight (d, r); shared_weight (r, r) or None; biases
    matching or None; residual (M, d) or None (then x is the residual); scale a float or a
    0-dim tensor (learnable); row_scale (M,) or None; seed a 0-dim int64 tensor in
    [0, 2**31) when dropout_p > 0. Returns y (M, d)."""
    check.tensor("x", x, ndim=2)
    m, d = x.shape
    check.tensor("down.weight", down_weight, ndim=2)
    r = down_weight.shape[0]
    check.shape("down.weight", down_weight, (r, d), "bottleneck x in_features")
    check.same_dtype_device("down.weight", down_weight, "x", x)
    check.tensor("up.weight", up_weight, ndim=2)
    check.shape("up.weight", up_weight, (d, r), "in_features x bottleneck")
    check.same_dtype_device("up.weight", up_weight, "x", x)
    for name, b, size in (("down.bias", down_bias, r), ("up.bias", up_bias, d),
                          ("shared.bias", shared_bias, r)):
        if b is not None:
            check.tensor(name, b)
            check.shape(name, b, (size,))
            check.same_dtype_device(name, b, "x", x)
    if shared_weight is not None:
        check.tensor("shared.weight", shared_weight)
        check.shape("shared.weight", shared_weight, (r, r), "bottleneck x bottleneck")
        check.same_dtype_device("shared.weight", shared_weight, "x", x)
    elif shared_bias is not None:
        raise ValueError("shared_bias: given without shared_weight")
    if residual is not None:
        check.tensor("residual", residual)
        check.shape("residual", residual, (m, d), "the shape of x")
        check.same_device("residual", residual, "x", x)
    scale_t, scale_value = split_scale(scale, x)
    if row_scale is not None:
        check.tensor("row_scale", row_scale)
        check.shape("row_scale", row_scale, (m,), "one factor per row of x")
        check.same_device("row_scale", row_scale, "x", x)
        check.no_grad_required("row_scale", row_scale, "it carries masks and drop factors")
    check.choice("activation", activation, reference.ACTIVATIONS)
    dropout_p = check.probability("dropout", dropout_p)
    seed = seed_tensor(seed, dropout_p, x)
    args = (x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
            scale_t, scale_value, row_scale, seed, activation, dropout_p,
            bool(grad_scale_invariant))
    if _saves_pre_activations(x, args):
        return bottleneck_forward_saving(*args)[0]
    return bottleneck_forward(*args)


def _saves_pre_activations(x: Tensor, args) -> bool:
    """Eager training on the cpu backend: the forward keeps the pre-activations (M x r, or
    2r) so the backward skips the product over d that recomputes them. Not under torch.compile
    (its graph holds the plain op) and not when no gradient will be taken."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
            and backend_for("bottleneck_forward", x.device) == "cpu")


# triton backend (kernels/bottleneck.py), when triton imports
register_from("triton", "pyadapt.kernels.bottleneck",
              {"bottleneck_forward": "forward", "bottleneck_backward": "backward"})


# ---------------------------------------------------------------------------------------------
# cpu backend (csrc/cpu/bottleneck.cpp), when the native extension was built. It takes float32,
# float64, bfloat16 and float16 storage (the last two computed in float32, outputs rounded once)
# with a residual of x's dtype (or none); any other case (a residual of another dtype, non-CPU
# tensors) runs the reference.

from . import _native  # noqa: E402


def _cpu_covers(x, residual) -> bool:
    return (x.device.type == "cpu" and x.dtype in _native.CPU_DTYPES
            and (residual is None or residual.dtype == x.dtype))


def _scale_float(scale, scale_value, x) -> float:
    return scale_value if scale is None else float(scale.to(x.dtype))


def _cpu_forward(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                 up_bias, scale, scale_value, row_scale, seed, activation, dropout_p):
    if not _cpu_covers(x, residual):
        return _reference_forward(x, residual, down_weight, down_bias, shared_weight, shared_bias,
                                  up_weight, up_bias, scale, scale_value, row_scale, seed,
                                  activation, dropout_p)
    return _native.ops().bottleneck_forward(
        x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
        _scale_float(scale, scale_value, x), row_scale, seed, activation, float(dropout_p))


def _cpu_forward_saving(x, residual, down_weight, down_bias, shared_weight, shared_bias,
                        up_weight, up_bias, scale, scale_value, row_scale, seed, activation,
                        dropout_p):
    if not _cpu_covers(x, residual):
        return _reference_forward_saving(x, residual, down_weight, down_bias, shared_weight,
                                         shared_bias, up_weight, up_bias, scale, scale_value,
                                         row_scale, seed, activation, dropout_p)
    y, pre = _native.ops().bottleneck_forward_saving(
        x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
        _scale_float(scale, scale_value, x), row_scale, seed, activation, float(dropout_p))
    return y, pre


def _cpu_backward(grad_y, x, has_residual, down_weight, down_bias, shared_weight, shared_bias,
                  up_weight, up_bias, scale, scale_value, row_scale, seed, activation, dropout_p,
                  grad_scale_invariant, needs, saved_pre=None):
    # grad_y has the output's dtype: another one than x's means a mixed-dtype residual, which
    # the forward also left to the reference
    if not _cpu_covers(x, None) or grad_y.dtype != x.dtype:
        return _reference_backward(grad_y, x, has_residual, down_weight, down_bias, shared_weight,
                                   shared_bias, up_weight, up_bias, scale, scale_value, row_scale,
                                   seed, activation, dropout_p, grad_scale_invariant, needs)
    grads = _native.ops().bottleneck_backward(
        grad_y, x, has_residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
        up_bias, _scale_float(scale, scale_value, x), row_scale, seed, activation,
        float(dropout_p), bool(grad_scale_invariant), bool(needs[0]),
        scale is not None and bool(needs[7]), None, saved_pre)
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    return _grads.pack(grads, inputs, needs, x)


if _native.available:
    register("bottleneck_forward", "cpu", _cpu_forward)
    register("bottleneck_forward_saving", "cpu", _cpu_forward_saving)
    register("bottleneck_backward", "cpu", _cpu_backward)
