"""The MPM-NCE loss op: multi-positive, margin, label-smoothed InfoNCE in both directions.

Declared as `pyadapt::mpm_nce_forward` / `pyadapt::mpm_nce_backward` on L2-normalised features;
the module normalises them first with ordinary autograd.
"""

from __future__ import annotations

from typing import List

import torch

from .. import _validate as check
from .. import reference
from . import _grads
from ._registry import kernel_for, register, register_autograd

Tensor = torch.Tensor


@torch.library.custom_op("pyadapt::mpm_nce_forward", mutates_args=())
def mpm_nce_forward(image: Tensor, text: Tensor, positives: Tensor, logit_scale: float,
                    margin: float, label_smoothing: float) -> Tensor:
    fn = kernel_for("mpm_nce_forward", image.device)
    return fn(image, text, positives, logit_scale, margin, label_smoothing)


@mpm_nce_forward.register_fake
def _(image, text, positives, logit_scale, margin, label_smoothing):
    return image.new_empty(())


@torch.library.custom_op("pyadapt::mpm_nce_backward", mutates_args=())
def mpm_nce_backward(grad_loss: Tensor, image: Tensor, text: Tensor, positives: Tensor,
                     logit_scale: float, margin: float, label_smoothing: float,
                     needs: List[bool]) -> List[Tensor]:
    fn = kernel_for("mpm_nce_backward", image.device)
    return fn(grad_loss, image, text, positives, logit_scale, margin, label_smoothing, needs)


@mpm_nce_backward.register_fake
def _(grad_loss, image, text, positives, logit_scale, margin, label_smoothing, needs):
    return _grads.fake([image, text], needs, image)


def _setup_context(ctx, inputs, output):
    image, text, positives, logit_scale, margin, label_smoothing = inputs
    ctx.save_for_backward(image, text, positives)
    ctx.hyper = (logit_scale, margin, label_smoothing)


def _backward(ctx, grad_loss):
    image, text, positives = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    grads = [None, None]
    if any(needs):
        packed = mpm_nce_backward(grad_loss, image, text, positives, *ctx.hyper, needs)
        grads = _grads.unpack(packed, [image, text], needs)
    return (*grads, None, None, None, None)


register_autograd(mpm_nce_forward, _backward, _setup_context)


def _reference_forward(image, text, positives, logit_scale, margin, label_smoothing):
    return reference.mpm_nce_forward(image, text, positives, logit_scale=logit_scale,
                                     margin=margin, label_smoothing=label_smoothing)


def _reference_backward(grad_loss, image, text, positives, logit_scale, margin, label_smoothing,
                        needs):
    grads = reference.mpm_nce_backward(grad_loss, image, text, positives, logit_scale=logit_scale,
                                       margin=margin, label_smoothing=label_smoothing)
    return _grads.pack(grads, [image, text], needs, image)


register("mpm_nce_forward", "reference", _reference_forward)
register("mpm_nce_backward", "reference", _reference_backward)


def mpm_nce(image: Tensor, text: Tensor, positives: Tensor, *, logit_scale: float = 100.0,
            margin: float = 0.0, label_smoothing: float = 0.0) -> Tensor:
    """Checked entry point: image, text (N, D) L2-normalised; positives (N, N) bool (P_ij = 1 when
    pair (i, j) is positive; normally a true diagonal). Returns the scalar loss."""
    check.tensor("image", image, ndim=2)
    check.tensor("text", text, ndim=2)
    check.shape("text", text, tuple(image.shape), "the shape of image")
    check.same_dtype_device("text", text, "image", image)
    if not isinstance(positives, torch.Tensor) or positives.dtype != torch.bool:
        raise TypeError("positives: expected a bool tensor of shape (N, N)")
    n = image.shape[0]
    check.shape("positives", positives, (n, n), "N x N for N = image.shape[0]")
    check.same_device("positives", positives, "image", image)
    if n == 0:
        raise ValueError("image: expected at least one row (the loss of an empty batch is "
                         "undefined)")
    logit_scale = check.finite("logit_scale", logit_scale)
    if logit_scale <= 0:
        raise ValueError(f"logit_scale: expected > 0, got {logit_scale}")
    margin = check.finite("margin", margin)
    label_smoothing = check.probability("label_smoothing", label_smoothing)
    return mpm_nce_forward(image, text, positives, logit_scale, margin, label_smoothing)
