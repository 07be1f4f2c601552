"""The `cuda` backend: glue between the op modules and the CUDA kernels of pyadapt._C_cuda.

Each function has the signature of the reference implementation its op module registers. The
kernels cover CUDA tensors of float32 / float64 / float16 / bfloat16 (a bottleneck residual of
x's dtype); anything else (CPU tensors, other dtypes, a residual of another dtype) runs the
reference, so choosing the backend is never an error. Registered only when the module loaded.
"""

from __future__ import annotations

import importlib

import torch

from . import _grads, _native_cuda
from ._registry import register

# The op modules (by module path: pyadapt.ops re-exports functions under the same names).
_bottleneck = importlib.import_module(__package__ + ".bottleneck")
_fold = importlib.import_module(__package__ + ".fold")
_lowrank = importlib.import_module(__package__ + ".lowrank")
_radapter = importlib.import_module(__package__ + ".radapter")


def _covers(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _native_cuda.CUDA_DTYPES


def _unpacked(packed, inputs, needs, like):
    """The kernels return an empty tensor for each gradient not computed; pack them for the op."""
    wanted = _grads.wanted(inputs, needs)
    return _grads.pack([g if w else None for g, w in zip(packed, wanted)], inputs, needs, like)


# bottleneck / MMA

def bottleneck_forward(x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                       up_bias, scale, scale_value, row_scale, seed, activation, dropout_p):
    if not _covers(x) or (residual is not None and residual.dtype != x.dtype):
        return _bottleneck._reference_forward(x, residual, down_weight, down_bias, shared_weight,
                                              shared_bias, up_weight, up_bias, scale, scale_value,
                                              row_scale, seed, activation, dropout_p)
    return _native_cuda.ops().bottleneck_forward(
        x, residual, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale,
        float(scale_value), row_scale, seed, activation, float(dropout_p))


def bottleneck_backward(grad_y, x, has_residual, down_weight, down_bias, shared_weight,
                        shared_bias, up_weight, up_bias, scale, scale_value, row_scale, seed,
                        activation, dropout_p, grad_scale_invariant, needs, saved_pre=None):
    # saved_pre (the cpu backend's saved pre-activations) is not used: the kernel recomputes
    if not _covers(x):
        return _bottleneck._reference_backward(
            grad_y, x, has_residual, down_weight, down_bias, shared_weight, shared_bias,
            up_weight, up_bias, scale, scale_value, row_scale, seed, activation, dropout_p,
            grad_scale_invariant, needs)
    packed = _native_cuda.ops().bottleneck_backward(
        grad_y.to(x.dtype), x, bool(has_residual), down_weight, down_bias, shared_weight,
        shared_bias, up_weight, up_bias, scale, float(scale_value), row_scale, seed, activation,
        float(dropout_p), bool(grad_scale_invariant), [bool(n) for n in needs])
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    return _unpacked(packed, inputs, needs, x)


# frozen linear + LoRA / CP / Tucker-core

def lowrank_forward(x, weight, bias, down, core, up, scale, seed, dropout_p, dropout_after_core):
    if not _covers(x):
        return _lowrank._reference_forward(x, weight, bias, down, core, up, scale, seed,
                                           dropout_p, dropout_after_core)
    return _native_cuda.ops().lowrank_forward(x, weight, bias, down, core, up, float(scale), seed,
                                              float(dropout_p), bool(dropout_after_core))


def lowrank_backward(grad_y, x, weight, bias, down, core, up, scale, seed, dropout_p,
                     dropout_after_core, needs):
    if not _covers(x):
        return _lowrank._reference_backward(grad_y, x, weight, bias, down, core, up, scale, seed,
                                            dropout_p, dropout_after_core, needs)
    packed = _native_cuda.ops().lowrank_backward(
        grad_y.to(x.dtype), x, weight, bias, down, core, up, float(scale), seed, float(dropout_p),
        bool(dropout_after_core), [bool(n) for n in needs])
    return _unpacked(packed, [x, weight, bias, down, core, up], needs, x)


# R-Adapter

def radapter_forward(x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
                     scale_value, row_scale):
    if not _covers(x):
        return _radapter._reference_forward(x, base_weight, base_bias, full_weight, down_weight,
                                            up_weight, scale, scale_value, row_scale)
    return _native_cuda.ops().radapter_forward(x, base_weight, base_bias, full_weight,
                                               down_weight, up_weight, scale, float(scale_value),
                                               row_scale)


def radapter_backward(grad_y, x, base_weight, base_bias, full_weight, down_weight, up_weight,
                      scale, scale_value, row_scale, needs, saved_z=None, saved_q=None):
    # saved_z / saved_q (the cpu backend's saving forward) are not used: the kernels recompute
    if not _covers(x):
        return _radapter._reference_backward(grad_y, x, base_weight, base_bias, full_weight,
                                             down_weight, up_weight, scale, scale_value,
                                             row_scale, needs)
    packed = _native_cuda.ops().radapter_backward(
        grad_y.to(x.dtype), x, base_weight, base_bias, full_weight, down_weight, up_weight, scale,
        float(scale_value), row_scale, [bool(n) for n in needs])
    inputs = [x, base_weight, base_bias, full_weight, down_weight, up_weight, scale]
    return _unpacked(packed, inputs, needs, x)


# grouped fold

def fold_weights(weights, lefts, rights, scales):
    if not weights or not all(_covers(w) for w in weights):
        return _fold._reference_fold(weights, lefts, rights, scales)
    return list(_native_cuda.ops().fold_weights(list(weights), list(lefts), list(rights),
                                                scales))


KERNELS = {"bottleneck_forward": bottleneck_forward, "bottleneck_backward": bottleneck_backward,
           "lowrank_forward": lowrank_forward, "lowrank_backward": lowrank_backward,
           "radapter_forward": radapter_forward, "radapter_backward": radapter_backward,
           "fold_weights": fold_weights}

if _native_cuda.available:
    for _op, _fn in KERNELS.items():
        register(_op, "cuda", _fn)
