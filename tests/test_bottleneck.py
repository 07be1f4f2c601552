"""The bottleneck / MMA adapter: pyadapt.ops.bottleneck, FusedAdapter, MultiModalAdapter.

Formula checked (DESIGN.md 7.1, 7.2; REFERENCE-SEMANTICS.md 1.3, 1.4, 4.1):

    y = residual + scale * row_scale * up(drop(act(shared?(act(down(x))))))   (residual: x if None)

    down (r x d), optional shared (r x r) followed by the same act, up (d x r), act in
    relu / gelu (erf) / quick_gelu (h sigmoid(1.702 h)) / silu / identity; drop is inverted dropout
    whose mask is reference.dropout_multiplier(seed, M, r, p); row_scale (M,) scales each row.

Backward, g = dL/dy, g_u = scale * row_scale * g:
    dW_u = g_u^T h, db_u = sum g_u, dh = (g_u W_u) D, dpre2 = dh act'(pre2), dW_s = dpre2^T h1,
    dpre1 = (dpre2 W_s) act'(pre1), dW_d = dpre1^T x, dx = dpre1 W_d (+ g when residual is x),
    dscale = sum(g row_scale u).
grad_scale_invariant=True (MMA's gradient-scale layers, GSL(x, a) in, GSL(a u, 1/a) out):
    every parameter gradient is divided by scale, dx stays the true gradient.

The ground truth here is that formula written out below with plain torch ops in float64 (it does
not call pyadapt.reference), differentiated by torch.autograd.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt import reference
from conftest import REL_TOL, assert_close_rel, rel_err

F64 = torch.float64
ACTS = ("relu", "gelu", "quick_gelu", "silu", "identity")
GRAD_NAMES = ("x", "down_w", "down_b", "shared_w", "shared_b", "up_w", "up_b", "scale")
PARAM_NAMES = GRAD_NAMES[1:7]
SEED = 123



# ---------------------------------------------------------------------------------------------
# The formula, by hand


def act_hand(h, name):
    if name == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "quick_gelu":
        return h / (1.0 + torch.exp(-1.702 * h))
    if name == "silu":
        return h / (1.0 + torch.exp(-h))
    if name == "identity":
        return h
    raise AssertionError(name)


def adapter_hand(x, p, act, keep=None):
    """u = up(drop(act(shared?(act(down(x)))))) with plain matmuls."""
    h = x @ p["down_w"].T
    if p["down_b"] is not None:
        h = h + p["down_b"]
    h = act_hand(h, act)
    if p["shared_w"] is not None:
        h = h @ p["shared_w"].T
        if p["shared_b"] is not None:
            h = h + p["shared_b"]
        h = act_hand(h, act)
    if keep is not None:
        h = h * keep
    u = h @ p["up_w"].T
    if p["up_b"] is not None:
        u = u + p["up_b"]
    return u


def forward_hand(x, p, act, *, residual=None, scale=1.0, row_scale=None, keep=None):
    delta = scale * adapter_hand(x, p, act, keep)
    if row_scale is not None:
        delta = delta * row_scale[:, None]
    return (x if residual is None else residual) + delta


def make_params(d, r, *, shared=True, bias=True, dtype=F64, shared_bias=None):
    """Weights scaled like a trained adapter: pre-activations and outputs of order one."""
    shared_bias = bias if shared_bias is None else shared_bias
    p = {
        "down_w": torch.randn(r, d, dtype=dtype) / math.sqrt(d),
        "down_b": 0.3 * torch.randn(r, dtype=dtype) if bias else None,
        "shared_w": torch.randn(r, r, dtype=dtype) / math.sqrt(r) if shared else None,
        "shared_b": 0.3 * torch.randn(r, dtype=dtype) if (shared and shared_bias) else None,
        "up_w": torch.randn(d, r, dtype=dtype) / math.sqrt(r),
        "up_b": 0.3 * torch.randn(d, dtype=dtype) if bias else None,
    }
    return p


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def hand_grads(x, p, act, g, *, residual=None, scale=1.0, row_scale=None, keep=None):
    """(y, {name: gradient}) of the hand formula by torch.autograd, in float64."""
    xl = leaf(x)
    pl = {k: leaf(v) for k, v in p.items()}
    sl = leaf(torch.as_tensor(scale, dtype=x.dtype))
    res = None if residual is None else leaf(residual)
    y = forward_hand(xl, pl, act, residual=res, scale=sl, row_scale=row_scale, keep=keep)
    y.backward(g)
    grads = {"x": xl.grad, "scale": sl.grad, "residual": None if res is None else res.grad}
    for k in PARAM_NAMES:
        grads[k] = None if pl[k] is None else pl[k].grad
    return y.detach(), grads


def set_module_params(a: pyadapt.FusedAdapter, p):
    with torch.no_grad():
        a.down.weight.copy_(p["down_w"])
        a.up.weight.copy_(p["up_w"])
        if p["down_b"] is not None:
            a.down.bias.copy_(p["down_b"])
            a.up.bias.copy_(p["up_b"])
        if a.shared is not None:
            a.shared.weight.copy_(p["shared_w"])
            if p["shared_b"] is not None:
                a.shared.bias.copy_(p["shared_b"])


def module_params(a: pyadapt.FusedAdapter):
    s = a.shared
    return {"down_w": a.down.weight.detach(), "down_b": _det(a.down.bias),
            "shared_w": None if s is None else s.weight.detach(),
            "shared_b": None if s is None else _det(s.bias),
            "up_w": a.up.weight.detach(), "up_b": _det(a.up.bias)}


def module_grads(a: pyadapt.FusedAdapter):
    s = a.shared
    return {"down_w": a.down.weight.grad, "down_b": _grad(a.down.bias),
            "shared_w": None if s is None else s.weight.grad,
            "shared_b": None if s is None else _grad(s.bias),
            "up_w": a.up.weight.grad, "up_b": _grad(a.up.bias),
            "scale": a.scale.grad if isinstance(a.scale, torch.Tensor) else None}


def module_scale(a: pyadapt.FusedAdapter):
    """The scale the module multiplies by (a learnable scale is stored in the parameter dtype)."""
    return a.scale.detach() if isinstance(a.scale, torch.Tensor) else a.scale


def _det(t):
    return None if t is None else t.detach()


def _grad(t):
    return None if t is None else t.grad


def build_adapter(d, r, *, act="relu", bias=True, shared=True, scale=0.7, learn_scale=False,
                  dtype=F64, grad_scale_invariant=False, shared_bias=True):
    sh = nn.Linear(r, r, bias=shared_bias) if shared else None
    a = pyadapt.FusedAdapter(d, r, activation=act, bias=bias, scale=scale, shared=sh,
                             learn_scale=learn_scale, grad_scale_invariant=grad_scale_invariant)
    a = a.to(dtype)
    p = make_params(d, r, shared=shared, bias=bias, dtype=dtype,
                    shared_bias=shared and shared_bias)
    set_module_params(a, p)
    return a


def check_grads(got: dict, want: dict, names, what: str, tol: float = 1e-12):
    for k in names:
        if want.get(k) is None:
            assert got.get(k) is None, f"{what}: gradient of {k} should be absent"
            continue
        assert got.get(k) is not None, f"{what}: gradient of {k} is missing"
        assert got[k].shape == want[k].shape, (
            f"{what}: d{k} shape {tuple(got[k].shape)} vs hand {tuple(want[k].shape)}")
        err = rel_err(got[k], want[k])
        assert err <= tol, f"{what}: d{k} vs hand-formula autograd, relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# 1. reference forward == the hand formula (float64)

# (M, d, r) alternates with the activation so that both a wide and an r = 1 case meet every
# other option without multiplying the test count.
SHAPE_BY_ACT = {"relu": (37, 24, 7), "gelu": (5, 8, 1), "quick_gelu": (37, 24, 7),
                "silu": (5, 8, 1), "identity": (37, 24, 7)}
SHAPE_BY_ACT_BWD = {"relu": (3, 8, 1), "gelu": (29, 20, 6), "quick_gelu": (3, 8, 1),
                    "silu": (29, 20, 6), "identity": (3, 8, 1)}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shared", [False, True], ids=["noshared", "shared"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["res=x", "res=sep"])
@pytest.mark.parametrize("row_scale", [False, True], ids=["norow", "rowscale"])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_reference_forward_matches_hand_formula(act, shared, bias, residual, row_scale,
                                                scale_kind):
    M, d, r = SHAPE_BY_ACT[act]
    x = torch.randn(M, d, dtype=F64)
    p = make_params(d, r, shared=shared, bias=bias)
    res = torch.randn(M, d, dtype=F64) if residual else None
    rs = torch.rand(M, dtype=F64) + 0.5 if row_scale else None
    scale = 0.37 if scale_kind == "float" else torch.tensor(0.37, dtype=F64)
    y = reference.bottleneck_forward(x, p["down_w"], p["down_b"], p["up_w"], p["up_b"],
                                     p["shared_w"], p["shared_b"], residual=res, scale=scale,
                                     activation_name=act, row_scale=rs)
    want = forward_hand(x, p, act, residual=res, scale=0.37, row_scale=rs)
    assert y.shape == (M, d) and y.dtype == F64, f"reference output shape/dtype {y.shape} {y.dtype}"
    err = rel_err(y, want)
    assert err <= 1e-12, f"reference.bottleneck_forward vs hand formula: relative error {err:.2e}"
    # the adapter part alone (y minus the residual) must match too, not only the sum
    base = x if res is None else res
    err = rel_err(y - base, want - base)
    assert err <= 1e-12, f"reference adapter delta vs hand delta: relative error {err:.2e}"


@pytest.mark.parametrize("act", ACTS)
def test_reference_activation_and_grad_match_hand(act):
    h = 3.0 * torch.randn(4000, dtype=F64)
    err = rel_err(reference.activation(h, act), act_hand(h, act))
    assert err <= 1e-14, f"reference.activation({act}) vs hand: relative error {err:.2e}"
    hl = h.clone().requires_grad_(True)
    act_hand(hl, act).sum().backward()
    err = rel_err(reference.activation_grad(h, act), hl.grad)
    assert err <= 1e-12, f"reference.activation_grad({act}) vs autograd of hand: rel err {err:.2e}"


@pytest.mark.parametrize("p_drop", [0.1, 0.5])
def test_reference_forward_dropout_uses_counter_mask(p_drop):
    M, d, r = 50, 16, 12
    x = torch.randn(M, d, dtype=F64)
    p = make_params(d, r)
    keep = reference.dropout_multiplier(SEED, M, r, p_drop, F64, "cpu")
    y = reference.bottleneck_forward(x, p["down_w"], p["down_b"], p["up_w"], p["up_b"],
                                     p["shared_w"], p["shared_b"], scale=0.5,
                                     activation_name="gelu",
                                     dropout_p=p_drop, seed=torch.tensor(SEED))
    want = forward_hand(x, p, "gelu", scale=0.5, keep=keep)
    err = rel_err(y, want)
    assert err <= 1e-12, f"reference forward with dropout vs hand formula with the mask: {err:.2e}"
    nodrop = forward_hand(x, p, "gelu", scale=0.5)
    assert rel_err(y, nodrop) > 1e-3, "dropout p>0 must change the output (mask had no effect)"


# ---------------------------------------------------------------------------------------------
# 2. reference backward == autograd of the hand formula (float64)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shared", [False, True], ids=["noshared", "shared"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["res=x", "res=sep"])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_reference_backward_matches_autograd_of_hand(act, shared, bias, residual, p_drop):
    M, d, r = SHAPE_BY_ACT_BWD[act]
    x = torch.randn(M, d, dtype=F64)
    p = make_params(d, r, shared=shared, bias=bias)
    res = torch.randn(M, d, dtype=F64) if residual else None
    rs = torch.rand(M, dtype=F64) + 0.5
    g = torch.randn(M, d, dtype=F64)
    keep = reference.dropout_multiplier(SEED, M, r, p_drop, F64, "cpu") if p_drop else None
    scale = 0.6
    _, want = hand_grads(x, p, act, g, residual=res, scale=scale, row_scale=rs, keep=keep)
    got = reference.bottleneck_backward(
        g, x, p["down_w"], p["down_b"], p["up_w"], p["up_b"], p["shared_w"], p["shared_b"],
        has_residual=residual, scale=scale, activation_name=act, dropout_p=p_drop,
        seed=torch.tensor(SEED) if p_drop else None, row_scale=rs)
    assert len(got) >= 8, f"reference.bottleneck_backward returns 8 gradients, got {len(got)}"
    check_grads(dict(zip(GRAD_NAMES, got)), want, GRAD_NAMES,
                f"reference.bottleneck_backward(act={act}, residual={residual}, p={p_drop})")


def test_reference_backward_dx_includes_identity_only_without_residual():
    M, d, r = 17, 12, 4
    x = torch.randn(M, d, dtype=F64)
    p = make_params(d, r)
    g = torch.randn(M, d, dtype=F64)
    kw = dict(scale=0.5, activation_name="silu", dropout_p=0.0, seed=None, row_scale=None)
    args = (g, x, p["down_w"], p["down_b"], p["up_w"], p["up_b"], p["shared_w"], p["shared_b"])
    dx_self = reference.bottleneck_backward(*args, has_residual=False, **kw)[0]
    dx_sep = reference.bottleneck_backward(*args, has_residual=True, **kw)[0]
    err = rel_err(dx_self - dx_sep, g)
    assert err <= 1e-13, f"dx(residual=x) - dx(separate residual) vs grad_y: rel err {err:.2e}"


# ---------------------------------------------------------------------------------------------
# 3. module / custom-op autograd path == hand formula (float64)


@pytest.mark.parametrize("M,d,r", [(33, 40, 8)])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shared", [False, True], ids=["noshared", "shared"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["res=x", "res=sep"])
@pytest.mark.parametrize("learn_scale", [False, True], ids=["fixedscale", "learnscale"])
def test_module_forward_backward_match_hand(M, d, r, act, shared, bias, residual, learn_scale):
    a = build_adapter(d, r, act=act, bias=bias, shared=shared, scale=0.45, learn_scale=learn_scale)
    x = torch.randn(M, d, dtype=F64, requires_grad=True)
    res = torch.randn(M, d, dtype=F64, requires_grad=True) if residual else None
    rs = torch.rand(M, dtype=F64) + 0.5
    g = torch.randn(M, d, dtype=F64)
    y = a(x, residual=res, row_scale=rs)
    y.backward(g)
    want_y, want = hand_grads(x, module_params(a), act, g, residual=res, scale=module_scale(a),
                              row_scale=rs)
    assert y.dtype == F64 and y.shape == (M, d), f"module output dtype/shape {y.dtype} {y.shape}"
    err = rel_err(y, want_y)
    assert err <= 1e-12, f"FusedAdapter output vs hand formula: relative error {err:.2e}"
    got = module_grads(a)
    got["x"] = x.grad
    names = list(GRAD_NAMES) if learn_scale else list(GRAD_NAMES[:-1])
    check_grads(got, want, names, f"FusedAdapter(act={act}) gradients")
    if not learn_scale:
        assert got["scale"] is None, "a fixed scale must not get a gradient"
    if residual:
        err = rel_err(res.grad, g)
        assert err == 0.0, f"gradient of a separate residual vs grad_y: rel err {err:.2e}"


def test_spec_mma_formula_fused_adapter_768_32_shared():
    """Spec: pyadapt.FusedAdapter(768, 32, shared=torch.nn.Linear(32, 32)) matches MMA's
    y = x + 0.001 * up(relu(shared(relu(down(x))))) on random data in float64 to 1e-12."""
    a = pyadapt.FusedAdapter(768, 32, shared=torch.nn.Linear(32, 32)).double()
    with torch.no_grad():  # lora init zeroes up; give every parameter random values
        a.up.weight.normal_(0.0, 1.0 / math.sqrt(32))
        a.up.bias.normal_(0.0, 0.1)
        a.down.bias.normal_(0.0, 0.1)
    x = torch.randn(4, 197, 768, dtype=F64, requires_grad=True)
    y = a(x)
    with torch.no_grad():
        h1 = torch.relu(x @ a.down.weight.T + a.down.bias)
        h2 = torch.relu(h1 @ a.shared.weight.T + a.shared.bias)
        delta = 0.001 * (h2 @ a.up.weight.T + a.up.bias)
    assert y.shape == x.shape, f"output shape {tuple(y.shape)} vs input {tuple(x.shape)}"
    err = rel_err(y, x + delta)
    assert err <= 1e-12, f"FusedAdapter(768, 32, shared) vs MMA formula: rel err {err:.2e}"
    err = rel_err(y - x, delta)
    assert err <= 1e-12, f"FusedAdapter(768, 32, shared) adapter part vs MMA's: rel err {err:.2e}"
    g = torch.randn_like(y)
    y.backward(g)
    _, want = hand_grads(x.detach().reshape(-1, 768), module_params(a), "relu",
                         g.reshape(-1, 768), scale=0.001)
    got = module_grads(a)
    got["x"] = x.grad.reshape(-1, 768)
    check_grads(got, want, GRAD_NAMES[:-1], "FusedAdapter(768, 32, shared) gradients vs MMA")


# ---------------------------------------------------------------------------------------------
# 4. gradcheck (float64) of the checked entry point


def _gradcheck_inputs(M, d, r, *, shared=True, bias=True, learn_scale=True, residual=True):
    def mk(*s):
        return torch.randn(*s, dtype=F64, requires_grad=True)
    return dict(
        x=mk(M, d), down_w=mk(r, d), down_b=mk(r) if bias else None, up_w=mk(d, r),
        up_b=mk(d) if bias else None, shared_w=mk(r, r) if shared else None,
        shared_b=mk(r) if (shared and bias) else None,
        residual=mk(M, d) if residual else None,
        scale=torch.tensor(0.8, dtype=F64, requires_grad=True) if learn_scale else 0.8)


def _run_gradcheck(ins, act, p_drop, row_scale):
    names = [k for k, v in ins.items() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        kw = dict(ins)
        kw.update(zip(names, tensors))
        return pyadapt.ops.bottleneck(
            kw["x"], kw["down_w"], kw["down_b"], kw["up_w"], kw["up_b"], kw["shared_w"],
            kw["shared_b"], residual=kw["residual"], scale=kw["scale"], activation=act,
            dropout_p=p_drop, seed=torch.tensor(123, dtype=torch.int64), row_scale=row_scale)

    return torch.autograd.gradcheck(f, tuple(ins[k] for k in names))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p_drop", [0.0, 0.4])
def test_gradcheck_full_op(act, p_drop):
    ins = _gradcheck_inputs(6, 5, 3)
    rs = torch.rand(6, dtype=F64) + 0.5
    assert _run_gradcheck(ins, act, p_drop, rs), f"gradcheck of pyadapt.ops.bottleneck ({act})"


@pytest.mark.parametrize("cfg", ["no_shared_no_bias_fixed_scale", "no_residual_no_rowscale"])
def test_gradcheck_reduced_op(cfg):
    if cfg == "no_shared_no_bias_fixed_scale":
        ins = _gradcheck_inputs(7, 4, 2, shared=False, bias=False, learn_scale=False)
    else:
        ins = _gradcheck_inputs(7, 4, 2, residual=False)
    rs = torch.rand(7, dtype=F64) + 0.5 if cfg.startswith("no_shared") else None
    assert _run_gradcheck(ins, "silu", 0.25, rs), f"gradcheck of pyadapt.ops.bottleneck ({cfg})"


def test_gradcheck_row_scale_is_differentiable():
    """row_scale is a float tensor input of the op; when it requires grad, its gradient must be
    sum_j g_ij * scale * u_ij (as for the eager reference), or the call must refuse it by name:
    silently dropping the gradient is wrong."""
    ins = _gradcheck_inputs(6, 5, 3)
    rs = (torch.rand(6, dtype=F64) + 0.5).requires_grad_(True)
    names = [k for k, v in ins.items() if isinstance(v, torch.Tensor)]

    def f(rs_, *tensors):
        kw = dict(ins)
        kw.update(zip(names, tensors))
        return pyadapt.ops.bottleneck(
            kw["x"], kw["down_w"], kw["down_b"], kw["up_w"], kw["up_b"], kw["shared_w"],
            kw["shared_b"], residual=kw["residual"], scale=kw["scale"], activation="gelu",
            row_scale=rs_)

    x = ins["x"]
    try:
        y = f(rs, *(ins[k] for k in names))
    except (ValueError, TypeError, RuntimeError) as e:  # refusing loudly is acceptable too
        assert "row_scale" in str(e), f"error for a row_scale requiring grad must name it: {e}"
        return
    g = torch.randn_like(y)
    y.backward(g)
    with torch.no_grad():
        p = {"down_w": ins["down_w"], "down_b": ins["down_b"], "shared_w": ins["shared_w"],
             "shared_b": ins["shared_b"], "up_w": ins["up_w"], "up_b": ins["up_b"]}
        want = (g * ins["scale"] * adapter_hand(x, p, "gelu")).sum(1)
    assert rs.grad is not None, "row_scale.grad is None although row_scale requires grad"
    err = rel_err(rs.grad, want)
    assert err <= 1e-12, f"d row_scale vs sum_j g * scale * u: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# 5. torch.library.opcheck of the two custom ops


def _op_args(M, d, r, *, full=True, x=None):
    def mk(*s, rg=True):
        return torch.randn(*s, dtype=F64, requires_grad=rg)
    x = mk(M, d) if x is None else x
    if full:
        return (x, mk(M, d), mk(r, d), mk(r), mk(r, r), mk(r), mk(d, r), mk(d),
                torch.tensor(0.7, dtype=F64, requires_grad=True), 1.0, torch.rand(M, dtype=F64),
                torch.tensor(SEED, dtype=torch.int64), "gelu", 0.3, False)
    return (x, None, mk(r, d), None, None, None, mk(d, r), None, None, 0.25, None, None, "relu",
            0.0, True)


def _detach_args(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _backward_args(fwd_args, needs):
    (x, residual, dw, db, sw, sb, uw, ub, sc, sv, rs, seed, act, p, gsi) = _detach_args(fwd_args)
    g = torch.randn(x.shape, dtype=x.dtype)
    return (g, x, residual is not None, dw, db, sw, sb, uw, ub, sc, sv, rs, seed, act, p, gsi,
            needs)


@pytest.mark.parametrize("full", [True, False], ids=["all_inputs", "minimal"])
def test_opcheck_bottleneck_forward(full):
    args = _op_args(11, 10, 4, full=full)
    res = torch.library.opcheck(torch.ops.pyadapt.bottleneck_forward.default, args)
    assert all(v == "SUCCESS" for v in res.values()), f"opcheck(bottleneck_forward): {res}"


@pytest.mark.parametrize("full,needs", [
    (True, [True] * 8),
    (True, [False, True, False, True, False, False, True, True]),
    (False, [True, True, True, True, True, True, True, True]),
], ids=["all_needed", "some_needed", "minimal"])
def test_opcheck_bottleneck_backward(full, needs):
    args = _backward_args(_op_args(11, 10, 4, full=full), needs)
    res = torch.library.opcheck(torch.ops.pyadapt.bottleneck_backward.default, args)
    assert all(v == "SUCCESS" for v in res.values()), f"opcheck(bottleneck_backward): {res}"


def test_opcheck_bottleneck_forward_strided_x():
    """The fake rule must describe the real output, strides included, for a non-contiguous x
    (FusedAdapter passes a transposed 2-D x through unchanged)."""
    x = torch.randn(10, 11, dtype=F64).t().requires_grad_(True)
    args = _op_args(11, 10, 4, full=False, x=x)
    res = torch.library.opcheck(torch.ops.pyadapt.bottleneck_forward.default, args)
    assert all(v == "SUCCESS" for v in res.values()), f"opcheck(forward, strided x): {res}"


def test_opcheck_bottleneck_backward_strided_x():
    x = torch.randn(10, 11, dtype=F64).t()
    args = _backward_args(_op_args(11, 10, 4, full=False, x=x), [True] * 8)
    res = torch.library.opcheck(torch.ops.pyadapt.bottleneck_backward.default, args)
    assert all(v == "SUCCESS" for v in res.values()), f"opcheck(backward, strided x): {res}"


# ---------------------------------------------------------------------------------------------
# 6. grad_scale_invariant == MMA's gradient-scale layers, exactly


class GradientScale(torch.autograd.Function):
    """MMA's gradient_scale_layer: identity forward, gradient times c backward."""

    @staticmethod
    def forward(ctx, t, c):
        ctx.c = c
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.c, None


@pytest.mark.parametrize("scale", [0.001, 0.3])
@pytest.mark.parametrize("learn_scale", [False, True], ids=["fixedscale", "learnscale"])
@pytest.mark.parametrize("residual", [False, True], ids=["res=x", "res=sep"])
@pytest.mark.parametrize("shared", [False, True], ids=["noshared", "shared"])
@pytest.mark.parametrize("row_scale", [False, True], ids=["norow", "rowscale"])
def test_grad_scale_invariant_equals_gradient_scale_layers(scale, learn_scale, residual, shared,
                                                          row_scale):
    M, d, r = 40, 24, 8
    a = build_adapter(d, r, shared=shared, scale=scale, learn_scale=learn_scale,
                      grad_scale_invariant=True)
    x = torch.randn(M, d, dtype=F64, requires_grad=True)
    res = torch.randn(M, d, dtype=F64, requires_grad=True) if residual else None
    rs = torch.rand(M, dtype=F64) + 0.5 if row_scale else None
    g = torch.randn(M, d, dtype=F64)
    a(x, residual=res, row_scale=rs).backward(g)
    got = module_grads(a)
    got["x"] = x.grad

    # eager MMA: out = base + GSL(alpha * row_scale * A(GSL(x, alpha)), 1/alpha)
    p = {k: leaf(v) for k, v in module_params(a).items()}
    xe = x.detach().clone().requires_grad_(True)
    c = float(module_scale(a))  # a learnable scale holds 'scale' rounded to its dtype
    alpha = torch.tensor(c, dtype=F64, requires_grad=True)
    u = adapter_hand(GradientScale.apply(xe, c), p, "relu")
    delta = alpha * u
    if rs is not None:
        delta = delta * rs[:, None]
    base = xe if res is None else res.detach()
    out = base + GradientScale.apply(delta, 1.0 / c)
    out.backward(g)
    want = {k: None if p[k] is None else p[k].grad for k in PARAM_NAMES}
    want["x"] = xe.grad
    want["scale"] = alpha.grad
    names = list(GRAD_NAMES) if learn_scale else list(GRAD_NAMES[:-1])
    check_grads(got, want, names, f"grad_scale_invariant vs GSL formulation (scale={scale})")

    # and the parameter gradients really are the true ones divided by scale (dx unchanged)
    _, true = hand_grads(x.detach(), module_params(a), "relu", g, residual=res,
                         scale=module_scale(a), row_scale=rs)
    err = rel_err(got["up_w"], true["up_w"] / c)
    assert err <= 1e-12, f"grad_scale_invariant d up_w vs true d up_w / scale: rel err {err:.2e}"
    err = rel_err(got["x"], true["x"])
    assert err <= 1e-12, f"grad_scale_invariant dx vs true dx: rel err {err:.2e}"


def test_grad_scale_invariant_forward_unchanged():
    M, d, r = 30, 16, 4
    a = build_adapter(d, r, scale=0.01, grad_scale_invariant=True)
    b = copy.deepcopy(a)
    b.grad_scale_invariant = False
    x = torch.randn(M, d, dtype=F64)
    assert torch.equal(a(x), b(x)), "grad_scale_invariant must not change the forward output"
    with pytest.raises(ValueError, match="scale"):
        pyadapt.FusedAdapter(8, 2, scale=0.0, grad_scale_invariant=True)


# ---------------------------------------------------------------------------------------------
# 7. MultiModalAdapter


def _randomize(module, gen_std=0.3):
    with torch.no_grad():
        for prm in module.parameters():
            prm.normal_(0.0, gen_std)


def test_mma_shared_projection_gradient_is_sum_of_branches():
    mma = pyadapt.MultiModalAdapter(vision_dim=48, text_dim=40, bottleneck=8, layers=[3, 4],
                                    scale=0.05).double()
    _randomize(mma)
    v, t = mma.vision(3), mma.text(3)
    assert v.shared is t.shared, "vision(i).shared must be the same module as text(i).shared"
    assert v.shared is mma.shared["3"], "vision(i).shared must be the layer's shared module"
    assert mma.vision(3).shared is not mma.vision(4).shared, "layers 3 and 4 must not share"
    assert mma.text(3).shared is not mma.text(4).shared, "layers 3 and 4 must not share (text)"
    xv = torch.randn(2, 9, 48, dtype=F64)
    xt = torch.randn(3, 7, 40, dtype=F64)
    gv, gt = torch.randn_like(xv), torch.randn_like(xt)

    def loss_v():
        return (v(xv) * gv).sum()

    def loss_t():
        return (t(xt) * gt).sum()

    sw, sb = v.shared.weight, v.shared.bias
    mma.zero_grad(set_to_none=True)
    loss_v().backward()
    gw_v, gb_v = sw.grad.clone(), sb.grad.clone()
    mma.zero_grad(set_to_none=True)
    loss_t().backward()
    gw_t, gb_t = sw.grad.clone(), sb.grad.clone()
    mma.zero_grad(set_to_none=True)
    (loss_v() + loss_t()).backward()
    err = rel_err(sw.grad, gw_v + gw_t)
    assert err <= 1e-12, f"shared.weight.grad vs sum of per-branch gradients: rel err {err:.2e}"
    err = rel_err(sb.grad, gb_v + gb_t)
    assert err <= 1e-12, f"shared.bias.grad vs sum of per-branch gradients: rel err {err:.2e}"
    assert rel_err(gw_v, gw_t) > 1e-3, "branch gradients of shared must differ (test has power)"
    for name, prm in mma.shared["4"].named_parameters():
        assert prm.grad is None, f"layer 4 shared.{name} got a gradient from layer 3's loss"

    # and the per-branch gradient is the hand formula's, with MMA's 1/scale convention
    _, want_v = hand_grads(xv.reshape(-1, 48), module_params(v), "relu", gv.reshape(-1, 48),
                           scale=0.05)
    _, want_t = hand_grads(xt.reshape(-1, 40), module_params(t), "relu", gt.reshape(-1, 40),
                           scale=0.05)
    err = rel_err(sw.grad, (want_v["shared_w"] + want_t["shared_w"]) / 0.05)
    assert err <= 1e-12, f"shared.weight.grad vs hand (sum of branches) / scale: {err:.2e}"


def test_mma_forward_formula_and_api():
    mma = pyadapt.MultiModalAdapter(vision_dim=32, text_dim=24, bottleneck=4, layers=range(2, 4),
                                    scale=0.2).double()
    _randomize(mma)
    x = torch.randn(5, 32, dtype=F64)
    a = mma.vision(2)
    want = x + 0.2 * adapter_hand(x, module_params(a), "relu")
    err = rel_err(mma(x, 2, "vision"), want)
    assert err <= 1e-12, f"MultiModalAdapter(x, 2, 'vision') vs MMA formula: rel err {err:.2e}"
    xt = torch.randn(5, 24, dtype=F64)
    err = rel_err(mma(xt, 3, "text"), mma.text(3)(xt))
    assert err == 0.0, f"MultiModalAdapter(x, 3, 'text') vs mma.text(3)(x): rel err {err:.2e}"
    for bad in (1, 4, 12):
        with pytest.raises(KeyError, match="layer"):
            mma.vision(bad)
        with pytest.raises(KeyError, match="layer"):
            mma.text(bad)
    with pytest.raises(ValueError, match="modality"):
        mma(x, 2, "audio")
    assert a.grad_scale_invariant, "MMA adapters use the gradient-scale convention by default"


def test_mma_parameter_count_vit_b16():
    mma = pyadapt.MultiModalAdapter(vision_dim=768, text_dim=512, bottleneck=32,
                                    layers=range(5, 13))
    n = sum(p.numel() for p in mma.parameters())
    assert n == 674_560, f"MMA ViT-B/16 parameter count {n} vs 674,560 (REFERENCE-SEMANTICS 1.1)"
    assert mma.layers == list(range(5, 13)), f"adapted layers {mma.layers} vs 5..12"
    per_layer = (sum(p.numel() for p in mma.vision(5).parameters()),
                 sum(p.numel() for p in mma.text(5).parameters()))
    assert per_layer == (24_608 + 25_344 + 1_056, 16_416 + 16_896 + 1_056), (
        f"per-layer vision/text parameter counts (incl. shared) {per_layer}")
    default = pyadapt.MultiModalAdapter()
    n = sum(p.numel() for p in default.parameters())
    assert n == 674_560, f"MultiModalAdapter() default parameter count {n} vs 674,560"


# ---------------------------------------------------------------------------------------------
# 8. shapes: every M, d, r of DESIGN.md 5; leading dims; strided inputs; M = 0

SHAPES = [(0, 8, 1), (1, 100, 7), (63, 512, 32), (64, 768, 128), (65, 8, 7), (1000, 100, 128),
          (1000, 768, 32), (64, 512, 1)]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("M,d,r", SHAPES)
def test_shapes_module_vs_hand(dtype, M, d, r):
    a = build_adapter(d, r, act="gelu", shared=True, scale=0.5, learn_scale=True, dtype=dtype)
    x = torch.randn(M, d, dtype=dtype, requires_grad=True)
    g = torch.randn(M, d, dtype=dtype)
    y = a(x)
    y.backward(g)
    p64 = {k: None if v is None else v.double() for k, v in module_params(a).items()}
    want_y, want = hand_grads(x.detach().double(), p64, "gelu", g.double(),
                              scale=module_scale(a).double())
    tol = REL_TOL[dtype]
    assert y.shape == (M, d) and y.dtype == dtype, f"output shape/dtype {y.shape} {y.dtype}"
    err = rel_err(y, want_y)
    assert err <= tol, f"FusedAdapter{(M, d, r)} {dtype} output vs fp64 hand: {err:.2e}"
    got = module_grads(a)
    got["x"] = x.grad
    for k in GRAD_NAMES:
        assert got[k].dtype == dtype, f"d{k} dtype {got[k].dtype} vs {dtype}"
    check_grads(got, want, GRAD_NAMES, f"FusedAdapter{(M, d, r)} {dtype}", tol)


@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 5)])
def test_empty_input_gives_empty_output_and_zero_weight_grads(lead):
    d, r = 16, 4
    a = build_adapter(d, r, learn_scale=True, scale=0.5)
    x = torch.randn(*lead, d, dtype=F64, requires_grad=True)
    y = a(x)
    assert y.shape == (*lead, d), f"empty input: output shape {tuple(y.shape)} vs {(*lead, d)}"
    y.sum().backward()
    params = {"down_w": a.down.weight, "down_b": a.down.bias, "shared_w": a.shared.weight,
              "shared_b": a.shared.bias, "up_w": a.up.weight, "up_b": a.up.bias, "scale": a.scale}
    for k, gr in module_grads(a).items():
        assert gr is not None, f"M = 0: gradient of {k} missing"
        assert gr.shape == params[k].shape, (
            f"M = 0: d{k} shape {tuple(gr.shape)} vs parameter {tuple(params[k].shape)}")
        assert torch.count_nonzero(gr) == 0, f"M = 0: gradient of {k} must be zero"
    assert x.grad.shape == x.shape, f"M = 0: dx shape {tuple(x.grad.shape)}"


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_leading_batch_dims_equal_flat_rows(dtype):
    B, T, d, r = 3, 5, 24, 6
    a = build_adapter(d, r, act="silu", dtype=dtype)
    x = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    res = torch.randn(B, T, d, dtype=dtype)
    rs = torch.rand(B, T, dtype=dtype) + 0.5
    y = a(x, residual=res, row_scale=rs)
    assert y.shape == (B, T, d), f"(B, T, d) input: output shape {tuple(y.shape)}"
    g = torch.randn(B, T, d, dtype=dtype)
    y.backward(g)
    grads3 = {k: v.clone() for k, v in module_grads(a).items() if v is not None}
    dx3 = x.grad.clone()
    a.zero_grad(set_to_none=True)
    x2 = x.detach().reshape(-1, d).clone().requires_grad_(True)
    y2 = a(x2, residual=res.reshape(-1, d), row_scale=rs.reshape(-1))
    y2.backward(g.reshape(-1, d))
    assert torch.equal(y.reshape(-1, d), y2), "(B, T, d) output vs the same rows as (M, d)"
    assert torch.equal(dx3.reshape(-1, d), x2.grad), "(B, T, d) dx vs (M, d) dx"
    for k, v in grads3.items():
        assert torch.equal(v, module_grads(a)[k]), f"(B, T, d) d{k} vs (M, d) d{k}"


def _strided(kind, B, T, d, dtype):
    if kind == "transposed":     # memory (T, B, d), viewed as (B, T, d)
        return torch.randn(T, B, d, dtype=dtype).transpose(0, 1)
    if kind == "sliced_rows":    # row stride d + 5: a 2-D non-contiguous view reaches the op
        return torch.randn(B, T, d + 5, dtype=dtype)[..., 2:d + 2]
    if kind == "every_other":    # last-dim stride 2
        return torch.randn(B, T, 2 * d, dtype=dtype)[..., ::2]
    if kind == "transposed_2d":  # (M, d) with strides (1, M)
        return torch.randn(d, B * T, dtype=dtype).t()
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["transposed", "sliced_rows", "every_other", "transposed_2d"])
def test_strided_input_equals_contiguous(dtype, kind):
    B, T, d, r = 4, 6, 20, 5
    a = build_adapter(d, r, act="quick_gelu", learn_scale=True, dtype=dtype)
    xs = _strided(kind, B, T, d, dtype)
    assert not xs.is_contiguous(), f"{kind}: the test input must be non-contiguous"
    xs.requires_grad_(True)
    res = _strided(kind, B, T, d, dtype)
    g = torch.randn(xs.shape, dtype=dtype)
    ys = a(xs, residual=res)
    ys.backward(g)
    gs = {k: v.clone() for k, v in module_grads(a).items()}
    a.zero_grad(set_to_none=True)
    xc = xs.detach().contiguous().requires_grad_(True)
    yc = a(xc, residual=res.contiguous())
    yc.backward(g)
    tol = REL_TOL[dtype]
    err = rel_err(ys, yc)
    assert err <= tol, f"{kind} x: output vs contiguous x, relative error {err:.2e}"
    err = rel_err(xs.grad, xc.grad)
    assert err <= tol, f"{kind} x: dx vs contiguous x, relative error {err:.2e}"
    for k, v in module_grads(a).items():
        err = rel_err(gs[k], v)
        assert err <= tol, f"{kind} x: d{k} vs contiguous x, relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# 9. low precision and autocast


REDUCED = ("down_b", "shared_b", "up_b", "scale")  # gradients that are sums over rows


def _reference_low(x, p, act, g, scale):
    """Eager pyadapt.reference forward and backward in x's (low) dtype: the baseline."""
    args = (x, p["down_w"], p["down_b"], p["up_w"], p["up_b"], p["shared_w"], p["shared_b"])
    y = reference.bottleneck_forward(*args, scale=scale, activation_name=act)
    grads = reference.bottleneck_backward(g, *args, has_residual=False, scale=scale,
                                          activation_name=act, dropout_p=0.0, seed=None,
                                          row_scale=None)
    return y, dict(zip(GRAD_NAMES, grads))


def _term_norms(x, p, act, g, scale):
    """||per-row terms|| of each bias gradient and ||g * u|| for dscale, in float64: giving every
    row its own copy of a bias (and every element its own scale) makes autograd return the
    terms whose sum is the gradient."""
    M = x.shape[0]
    pl = dict(p)
    copies = {}
    for k in ("down_b", "shared_b", "up_b"):
        if p[k] is not None:
            copies[k] = p[k].expand(M, -1).clone().requires_grad_(True)
            pl[k] = copies[k]
    s = torch.full((M, x.shape[1]), float(scale), dtype=F64, requires_grad=True)
    forward_hand(x, pl, act, scale=s).backward(g)
    norms = {k: t.grad.norm().item() for k, t in copies.items()}
    norms["scale"] = s.grad.norm().item()
    return norms


def assert_close_reduction(got, want, term_norm, dtype, what, baseline=None):
    """A gradient that sums M rows loses relative accuracy when the rows cancel; its error is
    measured against the size of the terms, ||terms||, and must meet REL_TOL (and 2x eager)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got.double() - want).norm().item() / term_norm
    assert err <= REL_TOL[dtype], f"{what}: error / ||terms|| {err:.2e} > {REL_TOL[dtype]:.0e}"
    if baseline is not None:
        base_err = (baseline.double() - want).norm().item() / term_norm
        assert err <= 2 * base_err + 1e-6, (
            f"{what}: error {err:.2e} exceeds 2x eager {dtype} error {base_err:.2e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,d,r", [(65, 100, 7), (64, 512, 32)])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_low_precision_module_vs_fp64(dtype, M, d, r, act):
    """Output and gradients against fp64 within REL_TOL and within 2x the eager low-precision
    reference. ReLU gradients are held to the 2x rule only: a pre-activation within rounding of
    0 flips relu' between 0 and 1, which alone gives eager bf16 errors of several percent."""
    a = build_adapter(d, r, act=act, scale=0.8, dtype=dtype)
    x = torch.randn(M, d, dtype=dtype, requires_grad=True)
    g = torch.randn(M, d, dtype=dtype)
    y = a(x)
    y.backward(g)
    assert y.dtype == dtype, f"{dtype} module output dtype {y.dtype}"
    p_low = module_params(a)
    p64 = {k: None if v is None else v.double() for k, v in p_low.items()}
    x64, g64 = x.detach().double(), g.double()
    want_y, want = hand_grads(x64, p64, act, g64, scale=0.8)
    norms = _term_norms(x64, p64, act, g64, 0.8)
    base_y, base = _reference_low(x.detach(), p_low, act, g, 0.8)
    assert_close_rel(y, want_y, dtype, f"{dtype} FusedAdapter output vs fp64", base_y)
    assert_close_rel(y - x.detach(), want_y - x64, dtype,
                     f"{dtype} FusedAdapter adapter part vs fp64", base_y - x.detach())
    got = module_grads(a)
    got["x"] = x.grad
    for k in GRAD_NAMES[:-1]:
        assert got[k].dtype == dtype, f"{dtype} module: d{k} dtype {got[k].dtype}"
        what = f"{dtype} FusedAdapter d{k} vs fp64"
        if act == "relu":
            err, base_err = rel_err(got[k], want[k]), rel_err(base[k], want[k])
            assert base_err < 0.25, f"{dtype} eager reference d{k} vs fp64: error {base_err:.2e}"
            assert err <= 2 * base_err + 1e-6, (
                f"{what}: error {err:.2e} exceeds 2x eager error {base_err:.2e}")
        elif k in REDUCED:
            assert_close_reduction(got[k], want[k], norms[k], dtype, what, base[k])
        else:
            assert_close_rel(got[k], want[k], dtype, what, base[k])


@pytest.mark.parametrize("M,d,r", [(50, 64, 8), (130, 256, 32)])
def test_autocast_bf16_float32_module(M, d, r):
    a = build_adapter(d, r, act="gelu", scale=0.6, learn_scale=True, dtype=torch.float32)
    x = torch.randn(M, d, requires_grad=True)
    g = torch.randn(M, d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
    assert y.dtype == torch.bfloat16, f"autocast bf16: output dtype {y.dtype} (want bfloat16)"
    y.backward(g.to(torch.bfloat16))
    p64 = {k: None if v is None else v.double() for k, v in module_params(a).items()}
    x64, g64, s64 = x.detach().double(), g.to(torch.bfloat16).double(), module_scale(a).double()
    want_y, want = hand_grads(x64, p64, "gelu", g64, scale=s64)
    norms = _term_norms(x64, p64, "gelu", g64, s64)
    assert_close_rel(y, want_y, torch.bfloat16, "autocast bf16 output vs fp64 reference")
    got = module_grads(a)
    got["x"] = x.grad
    for k in GRAD_NAMES:
        assert got[k].dtype == torch.float32, (
            f"autocast: d{k} must land in float32, got {got[k].dtype}")
        what = f"autocast bf16 d{k} vs fp64 reference"
        if k in REDUCED:
            assert_close_reduction(got[k], want[k], norms[k], torch.bfloat16, what)
        else:
            assert_close_rel(got[k], want[k], torch.bfloat16, what)


# ---------------------------------------------------------------------------------------------
# 10. init options


@pytest.mark.parametrize("d,r", [(768, 32), (512, 200)])
def test_init_lora_is_identity(d, r):
    a = pyadapt.FusedAdapter(d, r, init="lora")
    assert torch.count_nonzero(a.up.weight) == 0, "lora init: up.weight must be all zero"
    assert torch.count_nonzero(a.up.bias) == 0 and torch.count_nonzero(a.down.bias) == 0, (
        "lora init: biases must be zero")
    bound = 1.0 / math.sqrt(d)  # Kaiming-uniform a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = a.down.weight
    assert w.abs().max() <= bound, f"lora down.weight max {w.abs().max():.4f} > bound {bound:.4f}"
    std_want = bound / math.sqrt(3.0)
    assert abs(w.std().item() / std_want - 1.0) < 0.05, (
        f"lora down.weight std {w.std().item():.5f} vs Kaiming-uniform {std_want:.5f}")
    x = torch.randn(7, d)
    assert torch.equal(a(x), x), "lora init: the adapter must be the identity map at init"


@pytest.mark.parametrize("d,r", [(768, 32), (512, 200)])
def test_init_bert_std(d, r):
    a = pyadapt.FusedAdapter(d, r, init="bert")
    for name, w in (("down", a.down.weight), ("up", a.up.weight)):
        assert abs(w.std().item() / 0.02 - 1.0) < 0.05, (
            f"bert {name}.weight std {w.std():.5f} vs 0.02")
        assert abs(w.mean().item()) < 0.002, f"bert {name}.weight mean {w.mean():.5f} vs 0"
    assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0, (
        "bert init: biases must be zero")


@pytest.mark.parametrize("d,r", [(768, 32), (512, 200)])
def test_init_kaiming_std(d, r):
    a = pyadapt.FusedAdapter(d, r, init="kaiming")
    for name, w, out in (("down", a.down.weight, r), ("up", a.up.weight, d)):
        want = math.sqrt(2.0 / out)
        assert abs(w.std().item() / want - 1.0) < 0.05, (
            f"kaiming {name}.weight std {w.std():.5f} vs sqrt(2/out_features) {want:.5f}")
        assert abs(w.mean().item()) < 0.1 * want, f"kaiming {name}.weight mean {w.mean():.5f}"
    assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0, (
        "kaiming init: biases must be zero")
    mma = pyadapt.MultiModalAdapter(768, 512, 32, layers=[5])
    sw = mma.shared["5"].weight
    assert abs(sw.std().item() / 0.25 - 1.0) < 0.1, f"MMA shared.weight std {sw.std():.4f} vs 0.25"


# ---------------------------------------------------------------------------------------------
# 11. bad input: error type and the argument named


def _raises(exc, words, fn):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"error message {msg!r} should mention {w!r}"


def test_bad_input_module_forward():
    a = pyadapt.FusedAdapter(768, 32)
    _raises(ValueError, ["x: expected last dimension 768", "512"],
            lambda: a(torch.randn(4, 512)))
    _raises(TypeError, ["x", "floating"], lambda: a(torch.ones(4, 768, dtype=torch.int64)))
    _raises(TypeError, ["x", "float64", "float32"], lambda: a(torch.randn(4, 768, dtype=F64)))
    _raises(TypeError, ["x"], lambda: a([[1.0] * 768]))
    _raises(ValueError, ["residual", "(4, 768)"],
            lambda: a(torch.randn(4, 768), residual=torch.randn(4, 767)))
    _raises(ValueError, ["residual"],
            lambda: a(torch.randn(2, 3, 768), residual=torch.randn(6, 768)))
    _raises(TypeError, ["residual"],
            lambda: a(torch.randn(4, 768), residual=torch.ones(4, 768, dtype=torch.int32)))
    _raises(ValueError, ["row_scale", "(4,)"],
            lambda: a(torch.randn(4, 768), row_scale=torch.rand(5)))
    _raises(ValueError, ["row_scale", "(2, 3)"],
            lambda: a(torch.randn(2, 3, 768), row_scale=torch.rand(6)))
    _raises(ValueError, ["x"], lambda: a(torch.tensor(1.0)))


def test_bad_input_module_constructor():
    _raises(ValueError, ["bottleneck"], lambda: pyadapt.FusedAdapter(768, 0))
    _raises(ValueError, ["in_features"], lambda: pyadapt.FusedAdapter(0, 32))
    _raises(TypeError, ["bottleneck"], lambda: pyadapt.FusedAdapter(768, 32.0))
    _raises(ValueError, ["scale"], lambda: pyadapt.FusedAdapter(768, 32, scale=float("nan")))
    _raises(ValueError, ["scale"], lambda: pyadapt.FusedAdapter(768, 32, scale=float("inf")))
    _raises(ValueError, ["dropout"], lambda: pyadapt.FusedAdapter(768, 32, dropout=1.0))
    _raises(ValueError, ["dropout"], lambda: pyadapt.FusedAdapter(768, 32, dropout=-0.1))
    _raises(ValueError, ["activation", "tanh"],
            lambda: pyadapt.FusedAdapter(768, 32, activation="tanh"))
    _raises(ValueError, ["init"], lambda: pyadapt.FusedAdapter(768, 32, init="xavier"))
    _raises(ValueError, ["shared", "32"],
            lambda: pyadapt.FusedAdapter(768, 32, shared=nn.Linear(32, 16)))
    _raises(ValueError, ["shared"],
            lambda: pyadapt.FusedAdapter(768, 32, shared=nn.Linear(16, 16)))
    _raises(TypeError, ["shared"],
            lambda: pyadapt.FusedAdapter(768, 32, shared=nn.Conv1d(32, 32, 1)))
    _raises(TypeError, ["shared"],
            lambda: pyadapt.FusedAdapter(768, 32, shared=torch.randn(32, 32)))
    _raises(ValueError, ["bottleneck"], lambda: pyadapt.MultiModalAdapter(768, 512, 0))
    _raises(ValueError, ["layers"], lambda: pyadapt.MultiModalAdapter(768, 512, 32, layers=[]))


def test_bad_input_ops_level():
    M, d, r = 6, 10, 3
    x = torch.randn(M, d)
    wd, wu = torch.randn(r, d), torch.randn(d, r)
    op = pyadapt.ops.bottleneck
    _raises(ValueError, ["down.weight", "(3, 10)"],
            lambda: op(x, torch.randn(r, d + 1), None, wu, None))
    _raises(ValueError, ["down.weight"], lambda: op(x, torch.randn(r * d), None, wu, None))
    _raises(ValueError, ["up.weight", "(10, 3)"],
            lambda: op(x, wd, None, torch.randn(d, r + 1), None))
    _raises(ValueError, ["x", "2"], lambda: op(torch.randn(2, 3, d), wd, None, wu, None))
    _raises(TypeError, ["x"], lambda: op(torch.ones(M, d, dtype=torch.int64), wd, None, wu, None))
    _raises(TypeError, ["down.weight", "float64"], lambda: op(x, wd.double(), None, wu, None))
    _raises(ValueError, ["down.bias"], lambda: op(x, wd, torch.randn(r + 1), wu, None))
    _raises(ValueError, ["up.bias"], lambda: op(x, wd, None, wu, torch.randn(r)))
    _raises(ValueError, ["shared.weight"],
            lambda: op(x, wd, None, wu, None, torch.randn(r, r + 1)))
    _raises(ValueError, ["shared_bias"], lambda: op(x, wd, None, wu, None, None, torch.randn(r)))
    _raises(ValueError, ["residual"],
            lambda: op(x, wd, None, wu, None, residual=torch.randn(M, d - 1)))
    _raises(ValueError, ["row_scale"],
            lambda: op(x, wd, None, wu, None, row_scale=torch.rand(M, 1)))
    _raises(ValueError, ["scale"], lambda: op(x, wd, None, wu, None, scale=torch.ones(2)))
    _raises(ValueError, ["scale"], lambda: op(x, wd, None, wu, None, scale=float("nan")))
    _raises(ValueError, ["activation"], lambda: op(x, wd, None, wu, None, activation="tanh"))
    _raises(ValueError, ["dropout"], lambda: op(x, wd, None, wu, None, dropout_p=1.0))
    _raises(TypeError, ["seed"], lambda: op(x, wd, None, wu, None, dropout_p=0.5,
                                            seed=torch.tensor(1.5)))


# ---------------------------------------------------------------------------------------------
# 12. backends


@pytest.mark.parametrize("backend", pyadapt.available_backends())
def test_backend_matches_hand_and_default(backend):
    M, d, r = 45, 32, 8
    a = build_adapter(d, r, act="gelu", learn_scale=True, scale=0.4)
    x = torch.randn(M, d, dtype=F64, requires_grad=True)
    rs = torch.rand(M, dtype=F64) + 0.5
    g = torch.randn(M, d, dtype=F64)
    same_kernel = pyadapt.ops.backend_for("bottleneck_forward", "cpu") == backend
    y0 = a(x, row_scale=rs)
    y0.backward(g)
    g0 = {k: v.clone() for k, v in module_grads(a).items()}
    dx0 = x.grad.clone()
    a.zero_grad(set_to_none=True)
    x.grad = None
    with pyadapt.use_backend(backend):
        assert pyadapt.current_backend() == backend, f"use_backend({backend!r}) not in force"
        y1 = a(x, row_scale=rs)
        y1.backward(g)
    assert pyadapt.current_backend() == "auto", "use_backend must restore the previous backend"
    tol = 0.0 if same_kernel else 1e-12  # the very same kernel must give identical bits
    err = rel_err(y1, y0)
    assert err <= tol, f"use_backend({backend!r}) output vs default: rel err {err:.2e}"
    err = rel_err(x.grad, dx0)
    assert err <= tol, f"use_backend({backend!r}) dx vs default: rel err {err:.2e}"
    for k, v in module_grads(a).items():
        err = rel_err(v, g0[k])
        assert err <= tol, f"use_backend({backend!r}) d{k} vs default: rel err {err:.2e}"
    want_y, _ = hand_grads(x.detach(), module_params(a), "gelu", g, scale=module_scale(a),
                           row_scale=rs)
    err = rel_err(y1, want_y)
    assert err <= 1e-12, f"use_backend({backend!r}) output vs hand formula: rel err {err:.2e}"


def test_backend_unknown_or_unavailable_is_an_error():
    _raises(ValueError, ["backend", "nonsense"],
            lambda: pyadapt.use_backend("nonsense").__enter__())
    unavailable = [b for b in ("triton", "cuda", "cpu") if b not in pyadapt.available_backends()]
    for b in unavailable:
        _raises(ValueError, ["backend", b], lambda: pyadapt.use_backend(b).__enter__())
    assert pyadapt.current_backend() == "auto", "a refused use_backend must leave 'auto' in force"
