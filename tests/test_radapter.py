"""R-Adapter (DESIGN.md 7.3, REFERENCE-SEMANTICS.md 2.1-2.6): a frozen linear followed by a
linear adapter on its output.

    z   = x W_o^T + b_o
    q   = z W_f^T                       (rank=None, full out x out)
        = (z W_d^T) W_u^T               (rank r, W_f = W_u W_d)
    y   = z + c * m * q                 c = s (training), s * eval_scale (eval);
                                        m = adapter-dropping factor of the row, in {0, 1/(1-p)}

Backward with g = dL/dy and g_q = c * m * g:
    dz   = g + g_q W_f                  (low rank: t = z W_d^T, dW_u = g_q^T t, dt = g_q W_u,
    dW_f = g_q^T z                       dW_d = dt^T z, dz = g + dt W_d)
    ds   = sum_t m_t <g_t, q_t>
    dx   = dz W_o,  dW_o = dz^T x,  db_o = sum_t dz_t

Adapter dropping draws one factor per sample ("sample", dim 0 when batch_first), per sequence
position shared across the batch ("position"), or per token row ("row").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt import reference
from conftest import REL_TOL, assert_close_rel, rel_err

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (M, in_features, out_features)
SHAPES = ((1, 8, 8), (63, 100, 72), (65, 16, 24))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def hand_forward(x, w_o, b_o, w_f=None, w_d=None, w_u=None, c=0.1, row_scale=None):
    """The formula written out with @ (independent of F.linear and of pyadapt)."""
    z = x @ w_o.T
    if b_o is not None:
        z = z + b_o
    q = z @ w_f.T if w_f is not None else (z @ w_d.T) @ w_u.T
    m = 1.0 if row_scale is None else row_scale[:, None]
    return z + c * m * q


def hand_grads(g, x, w_o, b_o, w_f, w_d, w_u, s, row_scale):
    """REFERENCE-SEMANTICS 2.6 written out: (dx, dW_o, db_o, dW_f, dW_d, dW_u, ds)."""
    z = x @ w_o.T + (b_o if b_o is not None else 0.0)
    m = torch.ones(x.shape[0], dtype=x.dtype) if row_scale is None else row_scale
    mg = m[:, None] * g
    d_f = d_d = d_u = None
    if w_f is not None:
        q = z @ w_f.T
        dz = g + s * mg @ w_f
        d_f = s * mg.T @ z
    else:
        h = z @ w_d.T
        q = h @ w_u.T
        d_u = s * mg.T @ h
        dh = s * mg @ w_u
        d_d = dh.T @ z
        dz = g + dh @ w_d
    ds = (m * (g * q).sum(1)).sum()
    db = dz.sum(0) if b_o is not None else None
    return dz @ w_o, dz.T @ x, db, d_f, d_d, d_u, ds


def assert_dscale_close(out, ref, natural, dtype, what):
    """ds = sum_t m_t <g_t, q_t> is one reduction with cancellation: its error is measured against
    its natural size ||m g|| ||q|| (a Cauchy-Schwarz bound on |ds|), not against |ds| itself."""
    assert out.shape == ref.shape == (), f"{what}: ds is a 0-dim tensor"
    err = abs(float(out) - float(ref)) / max(float(natural), 1e-300)
    assert err <= REL_TOL[dtype], (
        f"{what}: error {err:.3e} (of ||m g|| ||q||) > {REL_TOL[dtype]:.0e}")


def ds_natural(g, q, row_scale=None):
    mg = g if row_scale is None else row_scale[:, None] * g
    return mg.double().norm() * q.double().norm()


def random_weights(d_in, d_out, rank, bias, dtype=F64):
    w_o = torch.randn(d_out, d_in, dtype=F64) / d_in ** 0.5
    b_o = torch.randn(d_out, dtype=F64) if bias else None
    if rank is None:
        ad = {"full_weight": torch.randn(d_out, d_out, dtype=F64) / d_out ** 0.5}
    else:
        ad = {"down_weight": torch.randn(rank, d_out, dtype=F64) / d_out ** 0.5,
              "up_weight": torch.randn(d_out, rank, dtype=F64) / rank ** 0.5}
    cast = {k: v.to(dtype) for k, v in ad.items()}
    return w_o.to(dtype), (None if b_o is None else b_o.to(dtype)), cast


def random_row_scale(m, p=0.25, dtype=F64):
    keep = torch.rand(m) >= p
    return keep.to(dtype) / (1.0 - p)


def make_module(d_in, d_out, rank=None, *, dtype=F64, bias=True, scale=0.37, learn_scale=True,
                **kw):
    """An RAdapter whose zero-initialised adapter weights are filled with random values."""
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    m = pyadapt.RAdapter(base, rank=rank, scale=scale, learn_scale=learn_scale, **kw)
    with torch.no_grad():
        if rank is None:
            m.full_weight.copy_(torch.randn(d_out, d_out) / d_out ** 0.5)
        else:
            m.down_weight.copy_(torch.randn(rank, d_out) / d_out ** 0.5)
            m.up_weight.copy_(torch.randn(d_out, rank) / rank ** 0.5)
        if bias:
            base.bias.copy_(torch.randn(d_out))
    return m


def module_factors(m, dtype=F64):
    if m.rank is None:
        return {"w_f": m.full_weight.detach().to(dtype)}
    return {"w_d": m.down_weight.detach().to(dtype), "w_u": m.up_weight.detach().to(dtype)}


def module_s(m):
    return float(m.scale) if isinstance(m.scale, float) else float(m.scale.detach())


def module_hand(m, x, c, row_scale=None):
    """hand_forward in float64 on the module's own weights, x of any leading shape."""
    x2 = x.detach().to(F64).reshape(-1, m.in_features)
    b = None if m.base.bias is None else m.base.bias.detach().to(F64)
    y = hand_forward(x2, m.base.weight.detach().to(F64), b, c=c, row_scale=row_scale,
                     **module_factors(m))
    return y.reshape(*x.shape[:-1], m.out_features)


def module_zq(m, x):
    """(z, q) of the module in float64 as row matrices."""
    x2 = x.detach().to(F64).reshape(-1, m.in_features)
    z = x2 @ m.base.weight.detach().to(F64).T
    if m.base.bias is not None:
        z = z + m.base.bias.detach().to(F64)
    f = module_factors(m)
    q = z @ f["w_f"].T if "w_f" in f else (z @ f["w_d"].T) @ f["w_u"].T
    return z, q


# ----------------------------------------------------------------------------------------------
# 1. reference forward against the formula
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 1, 7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_row_scale", [False, True])
def test_reference_forward_matches_formula(dtype, shape, rank, bias, with_row_scale):
    m, d_in, d_out = shape
    x = torch.randn(m, d_in, dtype=F64)
    w_o, b_o, ad = random_weights(d_in, d_out, rank, bias)
    rs = random_row_scale(m) if with_row_scale else None
    s = 0.37
    want = hand_forward(x, w_o, b_o, ad.get("full_weight"), ad.get("down_weight"),
                        ad.get("up_weight"), c=s, row_scale=rs)
    got = reference.radapter_forward(
        x.to(dtype), w_o.to(dtype), None if b_o is None else b_o.to(dtype),
        **{k: v.to(dtype) for k, v in ad.items()}, scale=s,
        row_scale=None if rs is None else rs.to(dtype))
    assert got.dtype == dtype, (
        f"reference.radapter_forward output dtype {got.dtype} vs input {dtype}")
    assert_close_rel(got, want, dtype, f"reference.radapter_forward ({dtype}) vs hand formula fp64")


def test_reference_forward_scale_tensor_and_zero_rows():
    x = torch.randn(9, 12, dtype=F64)
    w_o, b_o, ad = random_weights(12, 10, None, True)
    s = torch.tensor(-0.8, dtype=F64)
    got = reference.radapter_forward(x, w_o, b_o, ad["full_weight"], scale=s)
    want = hand_forward(x, w_o, b_o, ad["full_weight"], c=-0.8)
    assert rel_err(got, want) <= 1e-12, "radapter_forward with 0-dim tensor scale vs hand formula"
    rs = torch.zeros(9, dtype=F64)
    z_only = reference.radapter_forward(x, w_o, b_o, ad["full_weight"], scale=s, row_scale=rs)
    assert rel_err(z_only, x @ w_o.T + b_o) <= 1e-12, "row_scale 0 output vs z = x W_o^T + b_o"


# ----------------------------------------------------------------------------------------------
# 2. reference backward against autograd of the formula and against the 2.6 formulas
# ----------------------------------------------------------------------------------------------

GRAD_NAMES = ("dx", "dW_o", "db_o", "dW_f", "dW_d", "dW_u", "dscale")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 1, 7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_row_scale", [False, True])
def test_reference_backward(dtype, shape, rank, bias, with_row_scale):
    m, d_in, d_out = shape
    x = torch.randn(m, d_in, dtype=F64)
    w_o, b_o, ad = random_weights(d_in, d_out, rank, bias)
    w_f, w_d, w_u = ad.get("full_weight"), ad.get("down_weight"), ad.get("up_weight")
    rs = random_row_scale(m) if with_row_scale else None
    s = torch.tensor(0.37, dtype=F64)
    g = torch.randn(m, d_out, dtype=F64)

    # autograd of the hand formula (float64)
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in (x, w_o, b_o, w_f, w_d, w_u, s)]
    y = hand_forward(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5],
                     c=leaves[6], row_scale=rs)
    y.backward(g)
    auto = [None if t is None else t.grad for t in leaves]
    explicit = hand_grads(g, x, w_o, b_o, w_f, w_d, w_u, s, rs)

    def lo(t):
        return None if t is None else t.to(dtype)

    got = reference.radapter_backward(lo(g), lo(x), lo(w_o), lo(b_o), lo(w_f), lo(w_d), lo(w_u),
                                      scale=lo(s), row_scale=lo(rs))
    assert len(got) == 7, f"radapter_backward returns {len(got)} gradients, expected 7"
    for name, a, e, r in zip(GRAD_NAMES, auto, explicit, got):
        if a is None:
            assert r is None, f"{name}: reference gives a gradient for an absent input"
            assert e is None, f"{name}: test setup, explicit formula for an absent input"
            continue
        assert r is not None, f"{name}: reference returns None for a present input"
        assert r.dtype == dtype, f"{name}: gradient dtype {r.dtype} vs inputs {dtype}"
        # the hand formulas of 2.6 must agree with autograd of the forward (both float64)
        assert rel_err(e, a) <= 1e-12, f"{name}: REFERENCE-SEMANTICS 2.6 formula vs autograd"
        what = f"{name}: reference.radapter_backward ({dtype}) vs autograd fp64"
        if name == "dscale":
            q = hand_forward(x, w_o, b_o, w_f, w_d, w_u, c=1.0) - hand_forward(x, w_o, b_o, w_f,
                                                                              w_d, w_u, c=0.0)
            assert_dscale_close(r, a, ds_natural(g, q, rs), dtype, what)
        else:
            assert_close_rel(r, a, dtype, what)


# ----------------------------------------------------------------------------------------------
# 3. RAdapter module
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [None, 1, 7, 32, 72])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (3, 4, 2), (0,), (2, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_module_train_and_eval_scale(rank, lead, bias):
    m = make_module(100, 72, rank, bias=bias, scale=0.37, eval_scale=0.6)
    x = torch.randn(*lead, 100, dtype=F64)
    m.train()
    y = m(x)
    assert y.shape == (*lead, 72), f"training output shape {tuple(y.shape)} vs {(*lead, 72)}"
    assert rel_err(y, module_hand(m, x, 0.37)) <= 1e-12, "training forward vs formula with c = s"
    m.eval()
    y = m(x)
    assert y.shape == (*lead, 72), f"eval output shape {tuple(y.shape)} vs {(*lead, 72)}"
    assert rel_err(y, module_hand(m, x, 0.37 * 0.6)) <= 1e-12, (
        "eval forward vs formula with c = s * eval_scale")


def test_module_init_is_identity_on_base_and_default_shapes():
    base = nn.Linear(100, 72, dtype=F64)
    full = pyadapt.RAdapter(base)
    assert full.rank is None and tuple(full.full_weight.shape) == (72, 72), (
        "rank=None builds a full out x out adapter")
    assert torch.count_nonzero(full.full_weight) == 0, "full_weight is zero-initialised"
    assert float(full.scale.detach()) == pytest.approx(0.1), "scale initialised to 0.1"
    assert full.eval_scale == 0.5, "eval_scale default 0.5"
    low = pyadapt.RAdapter(nn.Linear(100, 72, dtype=F64), rank=7)
    assert tuple(low.down_weight.shape) == (7, 72) and tuple(low.up_weight.shape) == (72, 7), (
        "low rank W_d (r x out), W_u (out x r)")
    assert torch.count_nonzero(low.up_weight) == 0, "up_weight is zero-initialised"
    assert torch.count_nonzero(low.down_weight) > 0, "down_weight is Xavier-initialised (non-zero)"
    x = torch.randn(4, 100, dtype=F64)
    assert torch.equal(full(x), base(x)), "zero-init adapter output vs base output"


@pytest.mark.parametrize("rank", [None, 7])
@pytest.mark.parametrize("learn_scale", [True, False])
def test_module_gradients_and_frozen_base(rank, learn_scale):
    m = make_module(100, 72, rank, scale=0.37, learn_scale=learn_scale)
    x = torch.randn(3, 5, 100, dtype=F64, requires_grad=True)
    g = torch.randn(3, 5, 72, dtype=F64)
    m(x).backward(g)
    assert not m.base.weight.requires_grad and not m.base.bias.requires_grad, (
        "base weight/bias requires_grad after wrapping")
    assert m.base.weight.grad is None and m.base.bias.grad is None, (
        "base weight/bias .grad after backward (must stay None)")
    w_o, b_o = m.base.weight.detach(), m.base.bias.detach()
    f = module_factors(m)
    want = hand_grads(g.reshape(-1, 72), x.detach().reshape(-1, 100), w_o, b_o, f.get("w_f"),
                      f.get("w_d"), f.get("w_u"), 0.37, None)
    assert rel_err(x.grad.reshape(-1, 100), want[0]) <= 1e-12, "module dx vs formula"
    if rank is None:
        assert rel_err(m.full_weight.grad, want[3]) <= 1e-12, "module dW_f vs formula"
    else:
        assert rel_err(m.down_weight.grad, want[4]) <= 1e-12, "module dW_d vs formula"
        assert rel_err(m.up_weight.grad, want[5]) <= 1e-12, "module dW_u vs formula"
    if learn_scale:
        assert isinstance(m.scale, nn.Parameter) and m.scale.requires_grad, (
            "learn_scale=True: scale is a trainable Parameter")
        assert m.scale.grad is not None, "learn_scale=True: scale.grad after backward"
        assert rel_err(m.scale.grad, want[6]) <= 1e-12, "module ds vs formula"
        names = [n for n, _ in m.adapter_tensors()]
        assert "scale" in names, "learnable scale is an adapter tensor"
    else:
        assert isinstance(m.scale, float) and m.scale == 0.37, "learn_scale=False: scale is a float"
        assert all(p is not m.scale for p in m.parameters()), "fixed scale is not a parameter"
        assert "scale" not in [n for n, _ in m.adapter_tensors()], (
            "fixed scale is not an adapter tensor")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = ({"full_weight"} if rank is None else {"down_weight", "up_weight"}) | (
        {"scale"} if learn_scale else set())
    assert trainable == expected, f"trainable parameters {trainable} vs {expected}"


@pytest.mark.parametrize("rank", [None, 7])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_module_strided_inputs(rank, layout):
    m = make_module(100, 72, rank)
    if layout == "transposed":
        x = torch.randn(3, 100, 6, dtype=F64).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(3, 12, 200, dtype=F64)[:, ::2, ::2]
    else:
        x = torch.randn(1, 6, 100, dtype=F64).expand(3, 6, 100)
    assert not x.is_contiguous(), "test setup: input must be strided"
    x.requires_grad_()
    y = m(x)
    want = module_hand(m, x, 0.37)
    assert rel_err(y, want) <= 1e-12, f"strided ({layout}) forward vs formula"
    g = torch.randn_like(y)
    y.backward(g)
    xc = x.detach().contiguous().requires_grad_()
    m.zero_grad()
    m(xc).backward(g)
    assert rel_err(x.grad, xc.grad) <= 1e-12, f"strided ({layout}) dx vs contiguous dx"


@pytest.mark.parametrize("rank", [None, 7])
def test_module_zero_rows(rank):
    m = make_module(100, 72, rank)
    x = torch.randn(0, 100, dtype=F64, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 72), f"M = 0 output shape {tuple(y.shape)}"
    y.sum().backward()
    assert x.grad.shape == (0, 100), "M = 0 dx shape"
    for n, t in m.adapter_tensors():
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0, (
            f"M = 0: gradient of {n} is zero")
    dropping = make_module(100, 72, rank, drop_prob=0.3)
    for lead in ((0,), (2, 0), (0, 4)):
        y = dropping(torch.randn(*lead, 100, dtype=F64))
        assert y.shape == (*lead, 72), f"M = 0 with adapter dropping: output shape {tuple(y.shape)}"


def test_module_rank_equal_out_features_and_1d_input():
    m = make_module(100, 72, 72)
    x = torch.randn(100, dtype=F64)
    y = m(x)
    assert y.shape == (72,), f"1-D input output shape {tuple(y.shape)}"
    assert rel_err(y, module_hand(m, x, 0.37)) <= 1e-12, (
        "rank = out_features 1-D forward vs formula")


# ----------------------------------------------------------------------------------------------
# 4. adapter dropping
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["sample", "position", "row"])
@pytest.mark.parametrize("p", [0.25, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_drop_multiplier_values_and_structure(granularity, p, dtype):
    b, t = 40, 30
    for batch_first in (True, False):
        shape = (b, t, 8) if batch_first else (t, b, 8)
        mult = reference.drop_multiplier(shape, granularity, p, batch_first=batch_first,
                                         dtype=dtype)
        assert mult.shape == (b * t,), f"drop_multiplier shape {tuple(mult.shape)} vs ({b * t},)"
        assert mult.dtype == dtype, f"drop_multiplier dtype {mult.dtype} vs {dtype}"
        kept = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
        is_zero, is_kept = mult == 0, mult == kept
        assert bool((is_zero | is_kept).all()), "drop_multiplier values are exactly 0 or 1/(1-p)"
        assert bool(is_zero.any()) and bool(is_kept.any()), "some rows dropped and some kept"
        grid = mult.view(shape[:2])
        bt = grid if batch_first else grid.T  # (batch, position)
        if granularity == "sample":
            assert torch.equal(bt, bt[:, :1].expand_as(bt)), (
                f"sample granularity (batch_first={batch_first}): one value per batch index")
        elif granularity == "position":
            assert torch.equal(bt, bt[:1, :].expand_as(bt)), (
                f"position granularity (batch_first={batch_first}): one value per position "
                "shared by the batch")
        else:
            assert not torch.equal(bt, bt[:, :1].expand_as(bt)), "row granularity is not per sample"
            assert not torch.equal(bt, bt[:1, :].expand_as(bt)), (
                "row granularity is not per position")


def test_drop_multiplier_keep_rate():
    p = 0.2
    mult = reference.drop_multiplier((20000, 4), "row", p)
    rate = float((mult > 0).double().mean())
    assert abs(rate - (1 - p)) < 0.02, f"kept fraction {rate:.3f} vs 1 - p = {1 - p}"
    assert abs(float(mult.double().mean()) - 1.0) < 0.03, "mean drop factor vs 1 (unbiased)"


def _classify_rows(y, z, q, c, p):
    """Per row: True if y = z + c/(1-p) q (kept), False if y = z (dropped); fails otherwise."""
    y = y.detach().to(F64).reshape(z.shape)
    kept_val = z + (c / (1.0 - p)) * q
    d_drop = (y - z).norm(dim=1)
    d_keep = (y - kept_val).norm(dim=1)
    tol = 1e-12 * z.norm(dim=1).clamp_min(1.0)
    assert bool((torch.minimum(d_drop, d_keep) <= tol).all()), (
        "every output row equals z (dropped) or z + c/(1-p) q (kept)")
    sep = ((c / (1.0 - p)) * q).norm(dim=1)
    assert bool((sep > 1e3 * tol).all()), "test setup: kept and dropped rows are distinguishable"
    return d_keep <= tol


@pytest.mark.parametrize("granularity", ["sample", "position", "row"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("rank", [None, 7])
def test_module_adapter_dropping(granularity, batch_first, rank):
    p, b, t = 0.25, 16, 12
    m = make_module(24, 20, rank, drop_prob=p, drop_granularity=granularity,
                    batch_first=batch_first)
    shape = (b, t, 24) if batch_first else (t, b, 24)
    x = torch.randn(*shape, dtype=F64)
    m.train()
    torch.manual_seed(1234)
    y = m(x)
    z, q = module_zq(m, x)
    keep = _classify_rows(y, z, q, 0.37, p).view(shape[:2])
    bt = keep if batch_first else keep.T  # (batch, position)
    assert bool(bt.any()) and not bool(bt.all()), "some rows kept and some dropped"
    if granularity == "sample":
        assert torch.equal(bt, bt[:, :1].expand_as(bt)), "sample: one draw per batch index"
    elif granularity == "position":
        assert torch.equal(bt, bt[:1, :].expand_as(bt)), "position: one draw per position"
    # the draw is torch.rand on the global generator, one number per sample / position / row
    torch.manual_seed(1234)
    draw = {"sample": (b, 1), "position": (1, t), "row": (b, t)}[granularity]
    if not batch_first:
        draw = draw[::-1]
    want = (torch.rand(draw) >= p).expand(shape[:2])
    assert torch.equal(keep.view(shape[:2]), want), "kept rows vs torch.rand draw after manual_seed"

    # gradients follow the same mask
    x.requires_grad_()
    g = torch.randn(*shape[:2], 20, dtype=F64)
    torch.manual_seed(1234)
    m.zero_grad()
    m(x).backward(g)
    rs = want.reshape(-1).to(F64) / (1 - p)
    f = module_factors(m)
    hg = hand_grads(g.reshape(-1, 20), x.detach().reshape(-1, 24), m.base.weight.detach(),
                    m.base.bias.detach(), f.get("w_f"), f.get("w_d"), f.get("w_u"), 0.37, rs)
    assert rel_err(x.grad.reshape(-1, 24), hg[0]) <= 1e-12, "dx with dropping vs formula"
    assert rel_err(m.scale.grad, hg[6]) <= 1e-12, "ds with dropping vs formula"
    if rank is None:
        assert rel_err(m.full_weight.grad, hg[3]) <= 1e-12, "dW_f with dropping vs formula"
    else:
        assert rel_err(m.up_weight.grad, hg[5]) <= 1e-12, "dW_u with dropping vs formula"


def test_module_dropping_2d_input_is_per_row():
    p = 0.5
    m = make_module(24, 20, None, drop_prob=p, drop_granularity="sample")
    x = torch.randn(64, 24, dtype=F64)
    y = m(x)
    z, q = module_zq(m, x)
    keep = _classify_rows(y, z, q, 0.37, p)
    assert bool(keep.any()) and not bool(keep.all()), "2-D input: rows dropped independently"


@pytest.mark.parametrize("granularity", ["sample", "position", "row"])
def test_module_no_dropping_in_eval(granularity):
    m = make_module(24, 20, 7, drop_prob=0.5, drop_granularity=granularity)
    m.eval()
    x = torch.randn(8, 9, 24, dtype=F64)
    assert rel_err(m(x), module_hand(m, x, 0.37 * 0.5)) <= 1e-12, (
        "eval forward with drop_prob > 0 vs formula without dropping")


# ----------------------------------------------------------------------------------------------
# 5. gradcheck and opcheck of the op
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [None, 1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_row_scale", [False, True])
def test_op_gradcheck(rank, bias, with_row_scale):
    m, d_in, d_out = 6, 5, 4
    x = torch.randn(m, d_in, dtype=F64, requires_grad=True)
    w_o, b_o, ad = random_weights(d_in, d_out, rank, bias)
    w_o.requires_grad_()
    if b_o is not None:
        b_o.requires_grad_()
    for t in ad.values():
        t.requires_grad_()
    s = torch.tensor(0.37, dtype=F64, requires_grad=True)
    rs = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0, 2.0], dtype=F64) if with_row_scale else None
    names = list(ad)

    def f(x, w_o, b_o, s, *factors):
        return pyadapt.ops.radapter(x, w_o, b_o, scale=s, row_scale=rs,
                                    **dict(zip(names, factors)))

    inputs = (x, w_o, b_o, s, *ad.values())
    assert torch.autograd.gradcheck(f, inputs), "gradcheck of pyadapt.ops.radapter (float64)"
    # fixed float scale: only tensor inputs get gradients
    assert torch.autograd.gradcheck(
        lambda x, *fs: pyadapt.ops.radapter(x, w_o.detach(), None, scale=-0.6, row_scale=rs,
                                            **dict(zip(names, fs))),
        (x, *ad.values())), "gradcheck of pyadapt.ops.radapter with float scale"


def _op_args(rank, bias, with_row_scale, dtype=F64, m=5):
    x = torch.randn(m, 6, dtype=dtype)
    w_o, b_o, ad = random_weights(6, 4, rank, bias, dtype)
    w_o = w_o.to(dtype)
    b_o = None if b_o is None else b_o.to(dtype)
    s = torch.tensor(0.37, dtype=dtype)
    rs = random_row_scale(m, dtype=dtype) if with_row_scale else None
    return x, w_o, b_o, ad.get("full_weight"), ad.get("down_weight"), ad.get("up_weight"), s, rs


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_row_scale", [False, True])
@pytest.mark.parametrize("tensor_scale", [True, False])
def test_opcheck_radapter_forward(rank, bias, with_row_scale, tensor_scale):
    x, w_o, b_o, w_f, w_d, w_u, s, rs = _op_args(rank, bias, with_row_scale)
    x.requires_grad_()
    for t in (w_f, w_d, w_u):
        if t is not None:
            t.requires_grad_()
    if tensor_scale:
        s.requires_grad_()
        args = (x, w_o, b_o, w_f, w_d, w_u, s, 1.0, rs)
    else:
        args = (x, w_o, b_o, w_f, w_d, w_u, None, 0.37, rs)
    result = torch.library.opcheck(torch.ops.pyadapt.radapter_forward.default, args)
    assert all(v == "SUCCESS" for v in result.values()), f"opcheck radapter_forward: {result}"
    y = torch.ops.pyadapt.radapter_forward(*args)
    want = hand_forward(x.detach(), w_o, b_o, None if w_f is None else w_f.detach(),
                        None if w_d is None else w_d.detach(),
                        None if w_u is None else w_u.detach(), c=0.37, row_scale=rs)
    assert rel_err(y, want) <= 1e-12, "torch.ops.pyadapt.radapter_forward vs hand formula"


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", [[True] * 7, [False, False, False, True, True, True, True],
                                   [True, True, True, False, False, False, False],
                                   [False] * 7])
def test_opcheck_radapter_backward(rank, bias, needs):
    x, w_o, b_o, w_f, w_d, w_u, s, rs = _op_args(rank, bias, True)
    g = torch.randn(5, 4, dtype=F64)
    args = (g, x, w_o, b_o, w_f, w_d, w_u, s, 1.0, rs, needs)
    result = torch.library.opcheck(torch.ops.pyadapt.radapter_backward.default, args)
    assert all(v == "SUCCESS" for v in result.values()), f"opcheck radapter_backward: {result}"
    out = torch.ops.pyadapt.radapter_backward(*args)
    inputs = (x, w_o, b_o, w_f, w_d, w_u, s)
    assert len(out) == 7, f"radapter_backward returns {len(out)} tensors, expected 7"
    want = hand_grads(g, x, w_o, b_o, w_f, w_d, w_u, s, rs)
    for name, o, t, n, w in zip(GRAD_NAMES, out, inputs, needs, want):
        if t is not None and n:
            assert o.shape == t.shape, f"{name}: gradient shape {tuple(o.shape)} vs input"
            assert rel_err(o, w) <= 1e-12, f"{name}: radapter_backward vs 2.6 formula"
        else:
            assert o.numel() == 0, f"{name}: placeholder for an absent/unneeded input is empty"


# ----------------------------------------------------------------------------------------------
# 6. low precision and autocast
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rank", [None, 7])
@pytest.mark.parametrize("lead", [(64,), (4, 17)])
def test_module_low_precision_vs_fp64(dtype, rank, lead):
    m = make_module(100, 72, rank, dtype=dtype, scale=0.37)
    x = torch.randn(*lead, 100, dtype=dtype, requires_grad=True)
    g = torch.randn(*lead, 72, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype, f"output dtype {y.dtype} vs module dtype {dtype}"
    y.backward(g)
    x64 = x.detach().double().reshape(-1, 100)
    g64 = g.double().reshape(-1, 72)
    w_o, b_o = m.base.weight.detach().double(), m.base.bias.detach().double()
    f = module_factors(m)
    s64 = float(m.scale.detach())
    ref_y = hand_forward(x64, w_o, b_o, f.get("w_f"), f.get("w_d"), f.get("w_u"), c=s64)
    # eager reference in the same low dtype: the 2x rule of DESIGN.md 5
    lp = [None if t is None else t.to(dtype) for t in (f.get("w_f"), f.get("w_d"), f.get("w_u"))]
    base_y = reference.radapter_forward(x.detach().reshape(-1, 100), m.base.weight, m.base.bias,
                                        *lp, scale=m.scale.detach())
    assert_close_rel(y.reshape(-1, 72), ref_y, dtype, f"RAdapter {dtype} forward vs fp64",
                     baseline=base_y)
    ref_g = hand_grads(g64, x64, w_o, b_o, f.get("w_f"), f.get("w_d"), f.get("w_u"), s64, None)
    assert_close_rel(x.grad.reshape(-1, 100), ref_g[0], dtype, f"RAdapter {dtype} dx vs fp64")
    if rank is None:
        assert_close_rel(m.full_weight.grad, ref_g[3], dtype, f"RAdapter {dtype} dW_f vs fp64")
    else:
        assert_close_rel(m.down_weight.grad, ref_g[4], dtype, f"RAdapter {dtype} dW_d vs fp64")
        assert_close_rel(m.up_weight.grad, ref_g[5], dtype, f"RAdapter {dtype} dW_u vs fp64")
    _, q = module_zq(m, x)
    assert_dscale_close(m.scale.grad, ref_g[6], ds_natural(g64, q), dtype,
                        f"RAdapter {dtype} ds vs fp64")


@pytest.mark.parametrize("rank", [None, 7])
def test_module_autocast_bf16(rank):
    m = make_module(100, 72, rank, dtype=torch.float32, scale=0.37)
    x = torch.randn(3, 21, 100, requires_grad=True)
    g = torch.randn(3, 21, 72)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16, f"autocast output dtype {y.dtype} vs bfloat16"
    y.backward(g.to(torch.bfloat16))
    x64, g64 = x.detach().double().reshape(-1, 100), g.to(torch.bfloat16).double().reshape(-1, 72)
    w_o, b_o = m.base.weight.detach().double(), m.base.bias.detach().double()
    f = module_factors(m)
    ref_y = hand_forward(x64, w_o, b_o, f.get("w_f"), f.get("w_d"), f.get("w_u"), c=0.37)
    assert_close_rel(y.reshape(-1, 72), ref_y, torch.bfloat16, "autocast bf16 forward vs fp64")
    ref_g = hand_grads(g64, x64, w_o, b_o, f.get("w_f"), f.get("w_d"), f.get("w_u"), 0.37, None)
    assert x.grad.dtype == torch.float32, f"autocast dx dtype {x.grad.dtype} vs x dtype float32"
    assert_close_rel(x.grad.reshape(-1, 100), ref_g[0], torch.bfloat16, "autocast dx vs fp64")
    _, q = module_zq(m, x)
    for name, idx in (("full_weight", 3), ("down_weight", 4), ("up_weight", 5), ("scale", 6)):
        if not hasattr(m, name):
            continue
        p = getattr(m, name)
        assert p.grad is not None and p.grad.dtype == torch.float32, (
            f"autocast: {name}.grad exists in the parameter dtype float32")
        if name == "scale":
            assert_dscale_close(p.grad, ref_g[idx], ds_natural(g64, q), torch.bfloat16,
                                "autocast scale.grad vs fp64")
        else:
            assert_close_rel(p.grad, ref_g[idx], torch.bfloat16, f"autocast {name}.grad vs fp64")
    assert m.base.weight.grad is None, "autocast: frozen base weight has no grad"


# ----------------------------------------------------------------------------------------------
# 7. bad input
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_forward():
    m = make_module(16, 12, 4)
    with pytest.raises(ValueError, match=r"^x: .*last dimension 16"):
        m(torch.randn(3, 15, dtype=F64))
    m.eval()
    with pytest.raises(ValueError, match=r"^x: .*last dimension 16"):
        m(torch.randn(3, 17, dtype=F64))
    with pytest.raises(TypeError, match=r"^x: .*floating"):
        m(torch.randint(0, 5, (3, 16)))
    with pytest.raises(TypeError, match=r"^x: .*dtype"):
        m(torch.randn(3, 16, dtype=torch.float32))
    with pytest.raises(TypeError, match=r"^x: "):
        m(torch.randn(3, 16, dtype=F64).numpy())


def test_bad_constructor_arguments():
    lin = nn.Linear(16, 12)
    with pytest.raises(TypeError, match=r"^base: "):
        pyadapt.RAdapter(nn.Conv1d(16, 12, 1))
    with pytest.raises(TypeError, match=r"^base: "):
        pyadapt.RAdapter(torch.randn(12, 16))
    with pytest.raises(ValueError, match=r"^rank: "):
        pyadapt.RAdapter(lin, rank=0)
    with pytest.raises(ValueError, match=r"^rank: "):
        pyadapt.RAdapter(lin, rank=-3)
    with pytest.raises(ValueError, match=r"^rank: .*12"):
        pyadapt.RAdapter(lin, rank=13)
    with pytest.raises(TypeError, match=r"^rank: "):
        pyadapt.RAdapter(lin, rank=2.0)
    with pytest.raises(ValueError, match=r"^drop_prob: "):
        pyadapt.RAdapter(lin, drop_prob=1.0)
    with pytest.raises(ValueError, match=r"^drop_prob: "):
        pyadapt.RAdapter(lin, drop_prob=-0.1)
    with pytest.raises(ValueError, match=r"^drop_granularity: "):
        pyadapt.RAdapter(lin, drop_granularity="batch")
    with pytest.raises(ValueError, match=r"^scale: "):
        pyadapt.RAdapter(lin, scale=float("nan"))
    with pytest.raises(ValueError, match=r"^scale: "):
        pyadapt.RAdapter(lin, scale=float("inf"), learn_scale=False)
    with pytest.raises(ValueError, match=r"^eval_scale: "):
        pyadapt.RAdapter(lin, eval_scale=float("nan"))


def test_bad_inputs_op():
    x, w_o, b_o, w_f, _, _, s, _ = _op_args(None, True, False)
    with pytest.raises(ValueError, match=r"^adapter.weight: "):
        pyadapt.ops.radapter(x, w_o, b_o, full_weight=torch.randn(4, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"^base.bias: "):
        pyadapt.ops.radapter(x, w_o, torch.randn(5, dtype=F64), full_weight=w_f)
    with pytest.raises(TypeError, match=r"^adapter.weight: .*dtype"):
        pyadapt.ops.radapter(x, w_o, b_o, full_weight=w_f.float())
    with pytest.raises(ValueError, match=r"^row_scale: "):
        pyadapt.ops.radapter(x, w_o, b_o, full_weight=w_f, row_scale=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=r"^scale: "):
        pyadapt.ops.radapter(x, w_o, b_o, full_weight=w_f, scale=float("nan"))
    with pytest.raises(ValueError, match=r"full_weight"):
        pyadapt.ops.radapter(x, w_o, b_o)


def test_reference_backward_skips_the_frozen_base_gradients_it_is_not_asked_for():
    """needs = [x, W_o, b_o, W_f, W_d, W_u, scale]: a frozen base costs no dW_o GEMM."""
    f64 = torch.float64
    x, w_o, b_o = torch.randn(9, 12, dtype=f64), torch.randn(10, 12, dtype=f64), torch.randn(10, dtype=f64)
    w_f, g = torch.randn(10, 10, dtype=f64), torch.randn(9, 10, dtype=f64)
    full = reference.radapter_backward(g, x, w_o, b_o, w_f, None, None, scale=0.3, row_scale=None)
    lean = reference.radapter_backward(g, x, w_o, b_o, w_f, None, None, scale=0.3, row_scale=None,
                                       needs=[True, False, False, True, False, False, True])
    assert lean[1] is None and lean[2] is None, "dW_o/db_o computed although not needed"
    for i in (0, 3, 6):
        assert torch.equal(lean[i], full[i]), f"gradient {i} changed when dW_o/db_o are skipped"
