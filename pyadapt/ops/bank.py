"""The adapter-bank op: N bottleneck adapters applied to one batch, each row by its own adapter,

    y[m] = residual[m] + scale[a] * up_a(act(shared_a?(act(down_a(x[m])))))   a = ids[m] >= 0
    y[m] = residual[m]                                                       ids[m] == -1

with the N adapters' weights stacked: down (N, r, d), shared (N, r, r) optional, up
(N, d_out, r), biases (N, r) / (N, d_out) optional, scale (N,). The residual defaults to x
(d_out = d); the LoRA form (identity activation, no bias, no shared layer) has d_out != d and
passes the frozen base layer's output as the residual. Declared once as
`pyadapt::bank_bottleneck_forward` / `pyadapt::bank_bottleneck_backward` custom ops (fake rules,
registered autograd). The reference backend loops over adapter ids and calls
pyadapt.reference.bottleneck_forward / backward on each group: the ground truth (with dropout,
`dropout_rows` = the group's batch rows, so each group draws its rows of the batch mask). The triton
backend (kernels/bank.py) groups rows by id on the device and runs one grouped launch.

Dropout (training) acts where the single-adapter op puts it, on the r-wide input of `up`
(after act(shared) when there is a shared layer), with one mask for every backend: element
(m, k) keeps iff philox_uniform(seed, m * r + k) >= p, m being the row's index in the bank
call's batch (never its position within its adapter's group), kept values scaled by 1/(1-p).
A bank whose rows all name one adapter draws exactly the mask of pyadapt.ops.bottleneck with
the same seed; rows without an adapter are untouched. The seed (a 0-dim int64 tensor) is saved
for the backward, which regenerates the mask.

Also here: `pyadapt::mma_pair_forward` / `mma_pair_backward`, MMA's image and text branches of
one layer (different widths, one shared middle projection) as one op, see `mma_pair`.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from .. import _validate as check
from .. import reference
from . import _grads
from ._registry import kernel_for, register, register_autograd, register_from
from ._scalars import seed_tensor

Tensor = torch.Tensor

_GRAD_INPUTS = ("x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight",
                "up_bias", "scale")


@torch.library.custom_op("pyadapt::bank_bottleneck_forward", mutates_args=())
def bank_bottleneck_forward(x: Tensor, residual: Optional[Tensor], ids: Tensor,
                            down_weight: Tensor, down_bias: Optional[Tensor],
                            shared_weight: Optional[Tensor], shared_bias: Optional[Tensor],
                            up_weight: Tensor, up_bias: Optional[Tensor], scale: Tensor,
                            activation: str, grad_scale_invariant: bool, dropout_p: float = 0.0,
                            seed: Optional[Tensor] = None) -> Tensor:
    fn = kernel_for("bank_bottleneck_forward", x.device)
    return fn(x, residual, ids, down_weight, down_bias, shared_weight, shared_bias, up_weight,
              up_bias, scale, activation, dropout_p, seed).contiguous()


@bank_bottleneck_forward.register_fake
def _(x, residual, ids, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
      scale, activation, grad_scale_invariant, dropout_p=0.0, seed=None):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty((x.shape[0], up_weight.shape[1]), dtype=dtype)


@torch.library.custom_op("pyadapt::bank_bottleneck_backward", mutates_args=())
def bank_bottleneck_backward(grad_y: Tensor, x: Tensor, ids: Tensor, has_residual: bool,
                             down_weight: Tensor, down_bias: Optional[Tensor],
                             shared_weight: Optional[Tensor], shared_bias: Optional[Tensor],
                             up_weight: Tensor, up_bias: Optional[Tensor], scale: Tensor,
                             activation: str, grad_scale_invariant: bool,
                             needs: List[bool], dropout_p: float = 0.0,
                             seed: Optional[Tensor] = None) -> List[Tensor]:
    fn = kernel_for("bank_bottleneck_backward", x.device)
    return fn(grad_y, x, ids, has_residual, down_weight, down_bias, shared_weight, shared_bias,
              up_weight, up_bias, scale, activation, grad_scale_invariant, needs, dropout_p, seed)


@bank_bottleneck_backward.register_fake
def _(grad_y, x, ids, has_residual, down_weight, down_bias, shared_weight, shared_bias, up_weight,
      up_bias, scale, activation, grad_scale_invariant, needs, dropout_p=0.0, seed=None):
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    return _grads.fake(inputs, needs, x)


def _setup_context(ctx, inputs, output):
    (x, residual, ids, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias,
     scale, activation, grad_scale_invariant, dropout_p, seed) = inputs
    # the seed, not the mask: every backend regenerates the mask in the backward
    ctx.save_for_backward(x, ids, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                          up_bias, scale, seed)
    ctx.has_residual = residual is not None
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.hyper = (activation, grad_scale_invariant, dropout_p)


def _backward(ctx, grad_y):
    (x, ids, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale,
     seed) = ctx.saved_tensors
    activation, grad_scale_invariant, dropout_p = ctx.hyper
    n = ctx.needs_input_grad
    # forward input positions: x 0, residual 1, ids 2, down 3-4, shared 5-6, up 7-8, scale 9
    needs = [n[0], n[3], n[4], n[5], n[6], n[7], n[8], n[9]]
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    grads = [None] * len(_GRAD_INPUTS)
    if any(_grads.wanted(inputs, needs)):
        packed = bank_bottleneck_backward(grad_y, x, ids, ctx.has_residual, down_weight,
                                          down_bias, shared_weight, shared_bias, up_weight,
                                          up_bias, scale, activation, grad_scale_invariant, needs,
                                          dropout_p, seed)
        grads = _grads.unpack(packed, inputs, needs)
    dx, d_down_w, d_down_b, d_shared_w, d_shared_b, d_up_w, d_up_b, d_scale = grads
    d_residual = grad_y.to(ctx.residual_dtype) if ctx.has_residual and n[1] else None
    return (dx, d_residual, None, d_down_w, d_down_b, d_shared_w, d_shared_b, d_up_w, d_up_b,
            d_scale, None, None, None, None)


register_autograd(bank_bottleneck_forward, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------
# reference backend: a loop over adapter ids (host syncs; the ground truth, not the fast path)

def _pick(t: Optional[Tensor], a: int) -> Optional[Tensor]:
    return None if t is None else t[a]


def _reference_forward(x, residual, ids, down_weight, down_bias, shared_weight, shared_bias,
                       up_weight, up_bias, scale, activation, dropout_p=0.0, seed=None):
    base = x if residual is None else residual
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = base.to(out_dtype).clone()
    for a in range(down_weight.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        y[rows] = reference.bottleneck_forward(
            x[rows], down_weight[a], _pick(down_bias, a), up_weight[a], _pick(up_bias, a),
            _pick(shared_weight, a), _pick(shared_bias, a),
            residual=None if residual is None else residual[rows], scale=scale[a].to(x.dtype),
            activation_name=activation, dropout_p=dropout_p, seed=seed,
            dropout_rows=rows).to(out_dtype)
    return y


def _reference_backward(grad_y, x, ids, has_residual, down_weight, down_bias, shared_weight,
                        shared_bias, up_weight, up_bias, scale, activation, grad_scale_invariant,
                        needs, dropout_p=0.0, seed=None):
    g = grad_y.to(x.dtype)
    # rows without an adapter: y = x (dx = g) or y = residual (dx = 0)
    dx = torch.zeros_like(x) if has_residual else g.clone()
    stacked = [down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias]
    d_stacked = [None if t is None else torch.zeros_like(t) for t in stacked]
    d_scale = torch.zeros_like(scale)
    for a in range(down_weight.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        grads = reference.bottleneck_backward(
            g[rows], x[rows], down_weight[a], _pick(down_bias, a), up_weight[a],
            _pick(up_bias, a), _pick(shared_weight, a), _pick(shared_bias, a),
            has_residual=has_residual, scale=scale[a].to(x.dtype), activation_name=activation,
            dropout_p=dropout_p, seed=seed, row_scale=None,
            grad_scale_invariant=grad_scale_invariant, dropout_rows=rows)
        dx[rows] = grads[0]
        # reference order: dx, d down_w, d down_b, d shared_w, d shared_b, d up_w, d up_b, d scale
        for target, grad in zip(d_stacked, grads[1:7]):
            if target is not None:
                target[a] = grad
        d_scale[a] = grads[7]
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    return _grads.pack([dx] + d_stacked + [d_scale], inputs, needs, x)


register("bank_bottleneck_forward", "reference", _reference_forward)
register("bank_bottleneck_backward", "reference", _reference_backward)


# ---------------------------------------------------------------------------------------------
# cpu backend: one stable sort of the ids, then the native single-adapter kernels
# (csrc/cpu/bottleneck.cpp, OpenMP) on each adapter's contiguous group of rows. On the host the
# group sizes cost no device sync, so grouping in Python is free next to the kernels. The native
# kernel takes each group row's batch index (dropout_rows) and draws that row of the batch mask.
# Calls it does not cover (the LoRA form d_out != d, other dtypes) run the reference loop.

import importlib  # noqa: E402

from . import _native  # noqa: E402

# the module, not the function `bottleneck` that pyadapt.ops re-exports under the same name
_single = importlib.import_module(".bottleneck", __package__)


def _groups(ids: Tensor, n: int) -> list[tuple[int, Tensor]]:
    """[(adapter, its rows)] for the adapters that have rows, rows in ascending order."""
    order = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids + 1, minlength=n + 1).tolist()
    out, start = [], counts[0]          # counts[0]: the id -1 rows, first after sorting
    for a in range(n):
        if counts[a + 1]:
            out.append((a, order[start:start + counts[a + 1]]))
        start += counts[a + 1]
    return out


def _cpu_covers(x, residual, up_weight, grad_y=None) -> bool:
    """What the native kernel runs: d -> d (not the LoRA form), and the dtypes the single-adapter
    cpu backend takes (a grad_y of another dtype means a mixed-dtype residual)."""
    return (up_weight.shape[1] == x.shape[1] and _single._cpu_covers(x, residual)
            and (grad_y is None or grad_y.dtype == x.dtype))


def _cpu_forward(x, residual, ids, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                 up_bias, scale, activation, dropout_p=0.0, seed=None):
    if not _cpu_covers(x, residual, up_weight):
        return _reference_forward(x, residual, ids, down_weight, down_bias, shared_weight,
                                  shared_bias, up_weight, up_bias, scale, activation, dropout_p,
                                  seed)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = (x if residual is None else residual).to(out_dtype).clone()
    drop = dropout_p > 0.0
    for a, rows in _groups(ids, down_weight.shape[0]):
        # dropout_rows: the group's batch rows, so the kernel draws the batch's mask rows
        y[rows] = _native.ops().bottleneck_forward(
            x[rows], None if residual is None else residual[rows], down_weight[a],
            _pick(down_bias, a), _pick(shared_weight, a), _pick(shared_bias, a), up_weight[a],
            _pick(up_bias, a), _single._scale_float(scale[a], 1.0, x), None,
            seed if drop else None, activation, float(dropout_p) if drop else 0.0,
            rows if drop else None).to(out_dtype)
    return y


def _cpu_backward(grad_y, x, ids, has_residual, down_weight, down_bias, shared_weight,
                  shared_bias, up_weight, up_bias, scale, activation, grad_scale_invariant, needs,
                  dropout_p=0.0, seed=None):
    if not _cpu_covers(x, None, up_weight, grad_y):
        return _reference_backward(grad_y, x, ids, has_residual, down_weight, down_bias,
                                   shared_weight, shared_bias, up_weight, up_bias, scale,
                                   activation, grad_scale_invariant, needs, dropout_p, seed)
    inputs = [x, down_weight, down_bias, shared_weight, shared_bias, up_weight, up_bias, scale]
    wanted = _grads.wanted(inputs, needs)
    dx = (torch.zeros_like(x) if has_residual else grad_y.clone()) if wanted[0] else None
    stacked = [torch.zeros_like(t) if w else None for t, w in zip(inputs[1:], wanted[1:])]
    drop = dropout_p > 0.0
    for a, rows in _groups(ids, down_weight.shape[0]):
        # native order: dx, d down_w, d down_b, d shared_w, d shared_b, d up_w, d up_b, d scale
        grads = _native.ops().bottleneck_backward(
            grad_y[rows], x[rows], has_residual, down_weight[a], _pick(down_bias, a),
            _pick(shared_weight, a), _pick(shared_bias, a), up_weight[a], _pick(up_bias, a),
            _single._scale_float(scale[a], 1.0, x), None, seed if drop else None, activation,
            float(dropout_p) if drop else 0.0, bool(grad_scale_invariant), bool(wanted[0]),
            bool(wanted[7]), rows if drop else None)
        if dx is not None:
            dx[rows] = grads[0].to(x.dtype)
        for target, grad in zip(stacked, grads[1:]):
            if target is not None:
                target[a] = grad
    return _grads.pack([dx] + stacked, inputs, needs, x)


if _native.available:
    register("bank_bottleneck_forward", "cpu", _cpu_forward)
    register("bank_bottleneck_backward", "cpu", _cpu_backward)

# triton backend (kernels/bank.py), when triton imports
register_from("triton", "pyadapt.kernels.bank",
              {"bank_bottleneck_forward": "forward", "bank_bottleneck_backward": "backward"})


# ---------------------------------------------------------------------------------------------

def _check_stacked(x: Tensor, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                   up_bias, scale) -> tuple[int, int, int]:
    check.tensor("x", x, ndim=2)
    d = x.shape[1]
    check.tensor("down_weight", down_weight, ndim=3)
    n, r = down_weight.shape[0], down_weight.shape[1]
    check.shape("down_weight", down_weight, (n, r, d), "adapters x bottleneck x in_features")
    check.same_dtype_device("down_weight", down_weight, "x", x)
    check.tensor("up_weight", up_weight, ndim=3)
    d_out = up_weight.shape[1]
    check.shape("up_weight", up_weight, (n, d_out, r), "adapters x out_features x bottleneck")
    check.same_dtype_device("up_weight", up_weight, "x", x)
    for name, b, shape in (("down_bias", down_bias, (n, r)), ("up_bias", up_bias, (n, d_out)),
                           ("shared_bias", shared_bias, (n, r))):
        if b is not None:
            check.tensor(name, b)
            check.shape(name, b, shape)
            check.same_dtype_device(name, b, "x", x)
    if shared_weight is not None:
        check.tensor("shared_weight", shared_weight)
        check.shape("shared_weight", shared_weight, (n, r, r),
                    "adapters x bottleneck x bottleneck")
        check.same_dtype_device("shared_weight", shared_weight, "x", x)
    elif shared_bias is not None:
        raise ValueError("shared_bias: given without shared_weight")
    check.tensor("scale", scale)
    check.shape("scale", scale, (n,), "one scale per adapter")
    check.same_device("scale", scale, "x", x)
    return n, d_out, r


def adapter_rows(ids, x: Tensor, n_adapters: int, *, validate: bool = True) -> Tensor:
    """ids for each row of x (..., d) as an int64 (M,) tensor on x's device.

    `ids` is one id per sample (shape x.shape[:1], broadcast over the sample's rows), or one id
    per row (shape x.shape[:-1], or flat (M,)). An id is in [0, n_adapters) or -1 (no adapter).
    validate=True checks the range and raises ValueError (one host sync: the only way to
    raise on a device-side value); validate=False never syncs, and ids outside [-1, n_adapters)
    then act as -1 (the row passes through unchanged), so a bad id cannot read out of bounds."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"adapter_ids: expected an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids: expected an integer tensor, got dtype {ids.dtype}")
    check.same_device("adapter_ids", ids, "x", x)
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if tuple(ids.shape) == lead or (ids.dim() == 1 and ids.shape[0] == m):
        rows = ids.reshape(-1)
    elif x.dim() >= 2 and tuple(ids.shape) == lead[:1]:
        per_sample = m // max(lead[0], 1)
        rows = ids[:, None].expand(lead[0], per_sample).reshape(-1)
    else:
        raise ValueError(f"adapter_ids: expected shape {lead[:1]} (one id per sample) or "
                         f"{lead} (one id per row), got {tuple(ids.shape)}")
    rows = rows.to(torch.int64)
    if validate and rows.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < -1 or hi >= n_adapters:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_ids: expected ids in [-1, {n_adapters}) (-1: no adapter), "
                             f"got {bad}")
    return torch.where((rows >= -1) & (rows < n_adapters), rows, -1)


def bank_bottleneck(x: Tensor, ids: Tensor, down_weight: Tensor, down_bias: Optional[Tensor],
                    up_weight: Tensor, up_bias: Optional[Tensor],
                    shared_weight: Optional[Tensor] = None, shared_bias: Optional[Tensor] = None,
                    *, scale: Tensor, residual: Optional[Tensor] = None,
                    activation: str = "relu", grad_scale_invariant: bool = False,
                    dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """Checked entry point of the bank op on row matrices.

    x (M, d); ids (M,) int64 in [-1, N) (see `adapter_rows`: out-of-range ids must already be
    -1); down_weight (N, r, d), up_weight (N, d_out, r), shared_weight (N, r, r) or None,
    biases (N, r) / (N, d_out) or None; scale (N,) (a parameter when learnable); residual
    (M, d_out), or None when d_out = d (then x). dropout_p > 0: rank-space dropout with the
    batch-row mask of the module docstring; seed a 0-dim int64 tensor in [0, 2**31), drawn
    (torch.randint, as pyadapt.ops.bottleneck does) when None. Returns y (M, d_out)."""
    _, d_out, _ = _check_stacked(x, down_weight, down_bias, shared_weight, shared_bias, up_weight,
                             up_bias, scale)
    m = x.shape[0]
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        raise TypeError("ids: expected an int64 tensor (see pyadapt.ops.bank.adapter_rows)")
    check.same_device("ids", ids, "x", x)
    if tuple(ids.shape) != (m,):
        raise ValueError(f"ids: expected shape {(m,)} (one id per row of x), got "
                         f"{tuple(ids.shape)}")
    if residual is not None:
        check.tensor("residual", residual)
        check.shape("residual", residual, (m, d_out), "rows of x x out_features")
        check.same_device("residual", residual, "x", x)
    elif d_out != x.shape[1]:
        raise ValueError(f"residual: required when out_features ({d_out}) differs from x's last "
                         f"dimension ({x.shape[1]})")
    check.choice("activation", activation, reference.ACTIVATIONS)
    dropout_p = check.probability("dropout_p", dropout_p)
    seed = seed_tensor(seed, dropout_p, x)
    return bank_bottleneck_forward(x, residual, ids, down_weight, down_bias, shared_weight,
                                   shared_bias, up_weight, up_bias, scale, activation,
                                   bool(grad_scale_invariant), dropout_p, seed)


# =============================================================================================
# MMA pair: one layer's image and text branches, sharing the middle projection, as one op
# =============================================================================================

# Differentiable inputs, in the order the backward op returns their gradients.
_PAIR_GRAD_INPUTS = ("x_v", "down_v", "down_b_v", "up_v", "up_b_v", "scale_v", "x_t", "down_t",
                     "down_b_t", "up_t", "up_b_t", "scale_t", "shared_w", "shared_b")


def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@torch.library.custom_op("pyadapt::mma_pair_forward", mutates_args=())
def mma_pair_forward(x_v: Tensor, res_v: Optional[Tensor], down_v: Tensor,
                     down_b_v: Optional[Tensor], up_v: Tensor, up_b_v: Optional[Tensor],
                     x_t: Tensor, res_t: Optional[Tensor], down_t: Tensor,
                     down_b_t: Optional[Tensor], up_t: Tensor, up_b_t: Optional[Tensor],
                     shared_w: Tensor, shared_b: Optional[Tensor], scale_v: Optional[Tensor],
                     scale_value_v: float, scale_t: Optional[Tensor], scale_value_t: float,
                     activation: str, grad_scale_invariant: bool) -> List[Tensor]:
    fn = kernel_for("mma_pair_forward", x_v.device)
    y_v, y_t = fn(x_v, res_v, down_v, down_b_v, up_v, up_b_v, x_t, res_t, down_t, down_b_t, up_t,
                  up_b_t, shared_w, shared_b, scale_v, scale_value_v, scale_t, scale_value_t,
                  activation)
    return [y_v.contiguous(), y_t.contiguous()]


@mma_pair_forward.register_fake
def _(x_v, res_v, down_v, down_b_v, up_v, up_b_v, x_t, res_t, down_t, down_b_t, up_t, up_b_t,
      shared_w, shared_b, scale_v, scale_value_v, scale_t, scale_value_t, activation,
      grad_scale_invariant):
    return [x_v.new_empty(x_v.shape, dtype=_out_dtype(x_v, res_v)),
            x_t.new_empty(x_t.shape, dtype=_out_dtype(x_t, res_t))]


@torch.library.custom_op("pyadapt::mma_pair_backward", mutates_args=())
def mma_pair_backward(g_v: Tensor, g_t: Tensor, x_v: Tensor, has_res_v: bool, down_v: Tensor,
                      down_b_v: Optional[Tensor], up_v: Tensor, up_b_v: Optional[Tensor],
                      x_t: Tensor, has_res_t: bool, down_t: Tensor, down_b_t: Optional[Tensor],
                      up_t: Tensor, up_b_t: Optional[Tensor], shared_w: Tensor,
                      shared_b: Optional[Tensor], scale_v: Optional[Tensor], scale_value_v: float,
                      scale_t: Optional[Tensor], scale_value_t: float, activation: str,
                      grad_scale_invariant: bool, needs: List[bool]) -> List[Tensor]:
    fn = kernel_for("mma_pair_backward", x_v.device)
    grads = fn(g_v, g_t, x_v, has_res_v, down_v, down_b_v, up_v, up_b_v, x_t, has_res_t, down_t,
               down_b_t, up_t, up_b_t, shared_w, shared_b, scale_v, scale_value_v, scale_t,
               scale_value_t, activation, grad_scale_invariant)
    inputs = [x_v, down_v, down_b_v, up_v, up_b_v, scale_v, x_t, down_t, down_b_t, up_t, up_b_t,
              scale_t, shared_w, shared_b]
    return _grads.pack(grads, inputs, needs, x_v)


@mma_pair_backward.register_fake
def _(g_v, g_t, x_v, has_res_v, down_v, down_b_v, up_v, up_b_v, x_t, has_res_t, down_t,
      down_b_t, up_t, up_b_t, shared_w, shared_b, scale_v, scale_value_v, scale_t, scale_value_t,
      activation, grad_scale_invariant, needs):
    inputs = [x_v, down_v, down_b_v, up_v, up_b_v, scale_v, x_t, down_t, down_b_t, up_t, up_b_t,
              scale_t, shared_w, shared_b]
    return _grads.fake(inputs, needs, x_v)


def _pair_setup_context(ctx, inputs, output):
    (x_v, res_v, down_v, down_b_v, up_v, up_b_v, x_t, res_t, down_t, down_b_t, up_t, up_b_t,
     shared_w, shared_b, scale_v, scale_value_v, scale_t, scale_value_t, activation,
     grad_scale_invariant) = inputs
    ctx.save_for_backward(x_v, down_v, down_b_v, up_v, up_b_v, x_t, down_t, down_b_t, up_t,
                          up_b_t, shared_w, shared_b, scale_v, scale_t)
    ctx.res = (None if res_v is None else res_v.dtype, None if res_t is None else res_t.dtype)
    ctx.hyper = (scale_value_v, scale_value_t, activation, grad_scale_invariant)


def _pair_backward(ctx, grads):
    g_v, g_t = grads
    (x_v, down_v, down_b_v, up_v, up_b_v, x_t, down_t, down_b_t, up_t, up_b_t, shared_w,
     shared_b, scale_v, scale_t) = ctx.saved_tensors
    scale_value_v, scale_value_t, activation, grad_scale_invariant = ctx.hyper
    res_dtype_v, res_dtype_t = ctx.res
    n = ctx.needs_input_grad
    # forward positions: x_v 0, res_v 1, down_v 2-3, up_v 4-5, x_t 6, res_t 7, down_t 8-9,
    # up_t 10-11, shared 12-13, scale_v 14, scale_t 16
    needs = [n[0], n[2], n[3], n[4], n[5], n[14], n[6], n[8], n[9], n[10], n[11], n[16], n[12],
             n[13]]
    inputs = [x_v, down_v, down_b_v, up_v, up_b_v, scale_v, x_t, down_t, down_b_t, up_t, up_b_t,
              scale_t, shared_w, shared_b]
    out = [None] * len(_PAIR_GRAD_INPUTS)
    if any(_grads.wanted(inputs, needs)):
        g_v = torch.zeros_like(x_v) if g_v is None else g_v
        g_t = torch.zeros_like(x_t) if g_t is None else g_t
        packed = mma_pair_backward(g_v, g_t, x_v, res_dtype_v is not None, down_v, down_b_v,
                                   up_v, up_b_v, x_t, res_dtype_t is not None, down_t, down_b_t,
                                   up_t, up_b_t, shared_w, shared_b, scale_v, scale_value_v,
                                   scale_t, scale_value_t, activation, grad_scale_invariant,
                                   needs)
        out = _grads.unpack(packed, inputs, needs)
    (dx_v, d_down_v, d_down_b_v, d_up_v, d_up_b_v, d_scale_v, dx_t, d_down_t, d_down_b_t, d_up_t,
     d_up_b_t, d_scale_t, d_shared_w, d_shared_b) = out
    d_res_v = g_v.to(res_dtype_v) if res_dtype_v is not None and n[1] else None
    d_res_t = g_t.to(res_dtype_t) if res_dtype_t is not None and n[7] else None
    return (dx_v, d_res_v, d_down_v, d_down_b_v, d_up_v, d_up_b_v, dx_t, d_res_t, d_down_t,
            d_down_b_t, d_up_t, d_up_b_t, d_shared_w, d_shared_b, d_scale_v, None, d_scale_t,
            None, None, None)


register_autograd(mma_pair_forward, _pair_backward, _pair_setup_context)


def _scale_of(scale: Optional[Tensor], value: float, x: Tensor):
    return value if scale is None else scale.to(x.dtype)


def _pair_reference_forward(x_v, res_v, down_v, down_b_v, up_v, up_b_v, x_t, res_t, down_t,
                            down_b_t, up_t, up_b_t, shared_w, shared_b, scale_v, scale_value_v,
                            scale_t, scale_value_t, activation):
    return [reference.bottleneck_forward(x, down, down_b, up, up_b, shared_w, shared_b,
                                         residual=res, scale=_scale_of(s, value, x),
                                         activation_name=activation)
            for x, res, down, down_b, up, up_b, s, value in (
                (x_v, res_v, down_v, down_b_v, up_v, up_b_v, scale_v, scale_value_v),
                (x_t, res_t, down_t, down_b_t, up_t, up_b_t, scale_t, scale_value_t))]


def _pair_reference_backward(g_v, g_t, x_v, has_res_v, down_v, down_b_v, up_v, up_b_v, x_t,
                             has_res_t, down_t, down_b_t, up_t, up_b_t, shared_w, shared_b,
                             scale_v, scale_value_v, scale_t, scale_value_t, activation,
                             grad_scale_invariant):
    per_branch = []
    for g, x, has_res, down, down_b, up, up_b, s, value in (
            (g_v, x_v, has_res_v, down_v, down_b_v, up_v, up_b_v, scale_v, scale_value_v),
            (g_t, x_t, has_res_t, down_t, down_b_t, up_t, up_b_t, scale_t, scale_value_t)):
        per_branch.append(reference.bottleneck_backward(
            g.to(x.dtype), x, down, down_b, up, up_b, shared_w, shared_b, has_residual=has_res,
            scale=_scale_of(s, value, x), activation_name=activation, dropout_p=0.0, seed=None,
            row_scale=None, grad_scale_invariant=grad_scale_invariant))
    out = []
    for dx, d_down, d_down_b, _, _, d_up, d_up_b, d_scale in per_branch:
        out += [dx, d_down, d_down_b, d_up, d_up_b, d_scale]
    (v, t) = per_branch
    out.append(v[3] + t[3])                                     # d shared: both branches
    out.append(None if shared_b is None else v[4] + t[4])
    return out


register("mma_pair_forward", "reference", _pair_reference_forward)
register("mma_pair_backward", "reference", _pair_reference_backward)


# cpu backend: the two branches through the native single-adapter kernels (a CPU has no launch
# to save), d shared summed in a fixed order.
def _pair_cpu_forward(x_v, res_v, down_v, down_b_v, up_v, up_b_v, x_t, res_t, down_t, down_b_t,
                      up_t, up_b_t, shared_w, shared_b, scale_v, scale_value_v, scale_t,
                      scale_value_t, activation):
    return [_single._cpu_forward(x, res, down, down_b, shared_w, shared_b, up, up_b, s, value,
                                 None, None, activation, 0.0)
            for x, res, down, down_b, up, up_b, s, value in (
                (x_v, res_v, down_v, down_b_v, up_v, up_b_v, scale_v, scale_value_v),
                (x_t, res_t, down_t, down_b_t, up_t, up_b_t, scale_t, scale_value_t))]


def _pair_cpu_backward(g_v, g_t, x_v, has_res_v, down_v, down_b_v, up_v, up_b_v, x_t, has_res_t,
                       down_t, down_b_t, up_t, up_b_t, shared_w, shared_b, scale_v, scale_value_v,
                       scale_t, scale_value_t, activation, grad_scale_invariant):
    per_branch = []
    for g, x, has_res, down, down_b, up, up_b, s, value in (
            (g_v, x_v, has_res_v, down_v, down_b_v, up_v, up_b_v, scale_v, scale_value_v),
            (g_t, x_t, has_res_t, down_t, down_b_t, up_t, up_b_t, scale_t, scale_value_t)):
        inputs = [x, down, down_b, shared_w, shared_b, up, up_b, s]
        packed = _single._cpu_backward(g.to(x.dtype), x, has_res, down, down_b, shared_w,
                                       shared_b, up, up_b, s, value, None, None, activation, 0.0,
                                       grad_scale_invariant, [True] * 8)
        per_branch.append(_grads.unpack(packed, inputs, [True] * 8))
    out = []
    for dx, d_down, d_down_b, _, _, d_up, d_up_b, d_scale in per_branch:
        out += [dx, d_down, d_down_b, d_up, d_up_b, d_scale]
    v, t = per_branch
    out.append(v[3] + t[3])
    out.append(None if shared_b is None else v[4] + t[4])
    return out


if _native.available:
    register("mma_pair_forward", "cpu", _pair_cpu_forward)
    register("mma_pair_backward", "cpu", _pair_cpu_backward)

try:
    from ..kernels import mma_pair as _pair_kernels
except ImportError:     # no triton: the reference runs
    _pair_kernels = None

if _pair_kernels is not None:
    def _pair_triton_forward(x_v, *args):
        if not _pair_kernels.runs_here(x_v):
            return _pair_reference_forward(x_v, *args)
        return _pair_kernels.forward(x_v, *args)

    def _pair_triton_backward(g_v, g_t, x_v, *args):
        if not _pair_kernels.runs_here(x_v):
            return _pair_reference_backward(g_v, g_t, x_v, *args)
        return _pair_kernels.backward(g_v, g_t, x_v, *args)

    register("mma_pair_forward", "triton", _pair_triton_forward)
    register("mma_pair_backward", "triton", _pair_triton_backward)


def _check_branch(tag: str, x, residual, down, down_b, up, up_b, r: int, ref: Tensor) -> None:
    check.tensor(f"x_{tag}", x, ndim=2)
    d = x.shape[1]
    check.same_device(f"x_{tag}", x, "x_v", ref)
    if x.dtype != ref.dtype:
        raise TypeError(f"x_{tag}: expected dtype {ref.dtype} (the dtype of x_v), got {x.dtype}")
    for name, t, shape in ((f"down_{tag}.weight", down, (r, d)), (f"up_{tag}.weight", up, (d, r)),
                           (f"down_{tag}.bias", down_b, (r,)), (f"up_{tag}.bias", up_b, (d,))):
        if t is not None:
            check.tensor(name, t)
            check.shape(name, t, shape)
            check.same_dtype_device(name, t, f"x_{tag}", x)
    if residual is not None:
        check.tensor(f"residual_{tag}", residual)
        check.shape(f"residual_{tag}", residual, tuple(x.shape), f"the shape of x_{tag}")
        check.same_device(f"residual_{tag}", residual, f"x_{tag}", x)


def mma_pair(x_v: Tensor, x_t: Tensor, down_v: Tensor, down_b_v: Optional[Tensor], up_v: Tensor,
             up_b_v: Optional[Tensor], down_t: Tensor, down_b_t: Optional[Tensor], up_t: Tensor,
             up_b_t: Optional[Tensor], shared_weight: Tensor,
             shared_bias: Optional[Tensor] = None, *, residual_v: Optional[Tensor] = None,
             residual_t: Optional[Tensor] = None, scale_v: Tensor | float = 1.0,
             scale_t: Tensor | float = 1.0, activation: str = "relu",
             grad_scale_invariant: bool = False) -> tuple[Tensor, Tensor]:
    """One MMA layer's two branches in one op (one launch on the triton backend):

        y_v = residual_v + scale_v * up_v(act(shared(act(down_v(x_v)))))    x_v (M_v, d_v)
        y_t = residual_t + scale_t * up_t(act(shared(act(down_t(x_t)))))    x_t (M_t, d_t)

    residuals default to the inputs; the gradient of `shared` is the sum of both branches'.
    Both branches have the same dtype, device and bias layout. Returns (y_v, y_t)."""
    from ._scalars import split_scale

    check.tensor("shared.weight", shared_weight, ndim=2)
    r = shared_weight.shape[0]
    check.shape("shared.weight", shared_weight, (r, r), "bottleneck x bottleneck")
    _check_branch("v", x_v, residual_v, down_v, down_b_v, up_v, up_b_v, r, x_v)
    _check_branch("t", x_t, residual_t, down_t, down_b_t, up_t, up_b_t, r, x_v)
    check.same_dtype_device("shared.weight", shared_weight, "x_v", x_v)
    if shared_bias is not None:
        check.tensor("shared.bias", shared_bias)
        check.shape("shared.bias", shared_bias, (r,))
        check.same_dtype_device("shared.bias", shared_bias, "x_v", x_v)
    if (down_b_v is None) != (down_b_t is None) or (up_b_v is None) != (up_b_t is None) or \
            (down_b_v is None) != (up_b_v is None):
        raise ValueError("down_b_t: expected both branches, down and up, all with or all "
                         "without bias")
    check.choice("activation", activation, reference.ACTIVATIONS)
    s_v, value_v = split_scale(scale_v, x_v)
    s_t, value_t = split_scale(scale_t, x_t)
    y_v, y_t = mma_pair_forward(x_v, residual_v, down_v, down_b_v, up_v, up_b_v, x_t, residual_t,
                                down_t, down_b_t, up_t, up_b_t, shared_weight, shared_bias, s_v,
                                value_v, s_t, value_t, activation, bool(grad_scale_invariant))
    return y_v, y_t
