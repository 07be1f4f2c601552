"""Folding, unfolding, the adapter EMA and adapter checkpoints (DESIGN.md 3 and 7.3,
REFERENCE-SEMANTICS.md 2.4-2.5).

    R-Adapter   W_rep = (I + s' W_f) W_o,  b_rep = (I + s' W_f) b_o,  s' = s * eval_scale * alpha
                (low rank: W_f = W_u W_d)
    LoRA        W' = W + alpha * (lora_alpha / r) B A
    CP/Tucker   W' = W + alpha * B K^T A: block (o, j) of W gains V M_oj^T U,
                M_oj = C x_3 lambda_oj (tucker) or diag(lambda_oj) (cp)
    fold op     W'_i = round_to(W_i.dtype)(W_i + s_i L_i R_i), accumulated in fp32 (fp64 for fp64)
    unfold_     restores the saved originals bit for bit (never inverts)
    EMA         shadow <- m * shadow + (1 - m) * param after each update(), adapter tensors only,
                one shadow per distinct tensor; eval (use_in_eval) and fold_(use_ema=True) use it

After fold_, the eval forward of every foldable adapter equals its unfolded eval forward with the
adapter delta multiplied by alpha; fold_ and load_adapter_state_dict either complete or change
nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt import reference
from pyadapt._module import AdapterModule
from conftest import REL_TOL, assert_close_rel, rel_err

FOLDABLE_TYPES = (pyadapt.RAdapter, pyadapt.LowRankAdapter, pyadapt.CPLinear)

F64 = torch.float64
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}



# ----------------------------------------------------------------------------------------------
# a small model with nested adapters of every kind
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.attn = pyadapt.RAdapter(nn.Linear(d, d, dtype=dtype), rank=None, eval_scale=0.8)
        self.mlp = pyadapt.RAdapter(nn.Linear(2 * d, d, dtype=dtype), rank=3, learn_scale=False,
                                    scale=0.3)
        self.proj = pyadapt.LowRankAdapter(nn.Linear(d, 12, bias=False, dtype=dtype), rank=4,
                                           alpha=8)


class Model(nn.Module):
    def __init__(self, dtype, core="tucker"):
        super().__init__()
        self.blocks = nn.Sequential(Block(16, dtype), Block(16, dtype))
        self.low_nobias = pyadapt.RAdapter(nn.Linear(8, 16, bias=False, dtype=dtype), rank=16)
        # wide sites: 16 -> 64 and 64 -> 16 with width 16, and a 2 x 3 block site
        self.cp = pyadapt.CPAdapter([nn.Linear(16, 64, dtype=dtype), nn.Linear(64, 16, dtype=dtype),
                                     nn.Linear(32, 48, dtype=dtype)], rank=4, core=core,
                                    width=16, dropout=0.1)
        self.mma = pyadapt.MultiModalAdapter(vision_dim=16, text_dim=12, bottleneck=4,
                                             layers=[1, 2], dtype=dtype)
        self.head = nn.Linear(16, 4, dtype=dtype)  # plain, never folded


FOLDABLE = ["blocks.0.attn", "blocks.0.mlp", "blocks.0.proj", "blocks.1.attn", "blocks.1.mlp",
            "blocks.1.proj", "low_nobias", "cp.sites.0", "cp.sites.1", "cp.sites.2"]


def build(dtype=F64, seed=0, core="tucker", randomize=True):
    """The model with random base weights (fixed by `seed`) and random adapter weights."""
    torch.manual_seed(seed)
    model = Model(dtype, core)
    if randomize:
        randomize_adapters(model)
    return model


def randomize_adapters(model, gen=None):
    """Fill every adapter tensor with fresh random values (zero-init ones included)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdapterModule):
                for name, t in m.adapter_tensors():
                    if name == "scale":
                        t.copy_(torch.empty(()).uniform_(0.2, 0.6, generator=gen))
                    else:
                        fan = t.shape[-1]
                        t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(fan))


def foldables(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FOLDABLE_TYPES)}


def make_inputs(model, dtype, lead=(3, 5)):
    return {n: torch.randn(*lead, m.in_features, dtype=dtype) for n, m in foldables(model).items()}


def outputs(model, inputs):
    with torch.no_grad():
        return {n: foldables(model)[n](x) for n, x in inputs.items()}


def base_outputs(model, inputs):
    with torch.no_grad():
        return {n: foldables(model)[n].base(x) for n, x in inputs.items()}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                  torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a, b):
    """Bit-for-bit equality (NaN payloads included), unlike torch.equal."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _SAME_SIZE_INT.get(a.dtype)
    if as_int is None:
        return torch.equal(a, b)
    return torch.equal(a.detach().view(as_int), b.detach().view(as_int))


def assert_bit_identical(model, snap, what):
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(snap), f"{what}: state_dict keys changed"
    for k, v in snap.items():
        assert bits_equal(now[k], v), f"{what}: {k} is not bit-identical"


def tensors64(m, use=None):
    """The adapter tensors of m in float64 (the EMA shadows when `use` is an AdapterEMA)."""
    return {n: (t if use is None else use.shadow(t)).detach().double()
            for n, t in m.adapter_tensors()}


def hand_fold(m, alpha, t):
    """[(parameter, W' in float64, |W| + |s'| |L||R| in float64, inner size)] by hand."""
    w = m.base.weight.detach().double()
    if isinstance(m, pyadapt.RAdapter):
        s = m.scale if isinstance(m.scale, float) else float(t["scale"])
        s1 = s * m.eval_scale * alpha
        if m.rank is None:
            w_f, w_f_abs, inner = t["full_weight"], t["full_weight"].abs(), m.out_features
        else:
            w_f = t["up_weight"] @ t["down_weight"]
            w_f_abs = t["up_weight"].abs() @ t["down_weight"].abs()
            inner = m.out_features + m.rank
        eye = torch.eye(m.out_features, dtype=F64)
        out = [(m.base.weight, (eye + s1 * w_f) @ w, w.abs() + abs(s1) * w_f_abs @ w.abs(), inner)]
        if m.base.bias is not None:
            b = m.base.bias.detach().double()
            out.append((m.base.bias, (eye + s1 * w_f) @ b, b.abs() + abs(s1) * w_f_abs @ b.abs(),
                        inner))
        return out
    if isinstance(m, pyadapt.LowRankAdapter):
        s1 = alpha * m.alpha / m.rank
        delta = t["up_weight"] @ t["down_weight"]
        mag = t["up_weight"].abs() @ t["down_weight"].abs()
        return [(m.base.weight, w + s1 * delta, w.abs() + abs(s1) * mag, m.rank)]
    assert isinstance(m, pyadapt.CPLinear), f"hand_fold: unexpected module {type(m).__name__}"
    wd = m.U.shape[1]
    delta, mag = torch.zeros_like(w), torch.zeros_like(w)
    for o in range(m.out_features // wd):
        for j in range(m.in_features // wd):
            lam = t["lam"][o, j]
            if m.core_kind == "tucker":
                core = torch.einsum("abc,c->ab", t["C"], lam)
                core_abs = torch.einsum("abc,c->ab", t["C"].abs(), lam.abs())
            else:
                core, core_abs = torch.diag(lam), torch.diag(lam.abs())
            blk = (slice(o * wd, (o + 1) * wd), slice(j * wd, (j + 1) * wd))
            delta[blk] = t["V"] @ core.T @ t["U"]
            mag[blk] = t["V"].abs() @ core_abs.T @ t["U"].abs()
    return [(m.base.weight, w + alpha * delta, w.abs() + abs(alpha) * mag, 3 * m.rank)]


def assert_fold_close(param, ref, mag, inner, dtype, what):
    """Folded param against the float64 fold: relative error within REL_TOL, and elementwise
    within one rounding to `dtype` (u |ref|) plus the fp32 (fp64) accumulation error bound."""
    got = param.detach()
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} vs {dtype}"
    assert_close_rel(got, ref, dtype, what)
    acc_u = UNIT_ROUNDOFF[F64 if dtype == F64 else torch.float32]
    bound = UNIT_ROUNDOFF[dtype] * ref.abs() + 2 * (inner + 4) * acc_u * mag + 1e-300
    excess = ((got.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"{what}: an element is off by more than one rounding (excess {excess:.3e})"


# ----------------------------------------------------------------------------------------------
# 1. fold_ equals the eval forward, alpha scales the delta, hand-written folds
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.5, -1.0])
@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_fold_matches_eval_forward(alpha, core):
    model = build(F64, core=core).eval()
    inputs = make_inputs(model, F64)
    before = outputs(model, inputs)
    base = base_outputs(model, inputs)
    names = pyadapt.fold_(model, alpha=alpha)
    assert sorted(names) == sorted(FOLDABLE), f"fold_ returned {names} vs the foldable modules"
    after = outputs(model, inputs)
    for n in FOLDABLE:
        assert foldables(model)[n].merged, f"{n}: merged flag after fold_"
        want = base[n] + alpha * (before[n] - base[n])
        assert rel_err(after[n], want) <= 1e-12, (
            f"{n}: folded forward vs base + alpha * (unfolded eval forward - base), alpha={alpha}")
        if alpha == 1.0:
            assert rel_err(after[n], before[n]) <= 1e-12, f"{n}: folded vs unfolded eval forward"


@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_fold_equals_hand_fold_fp64(alpha, core):
    model = build(F64, core=core)
    expected = {n: hand_fold(m, alpha, tensors64(m)) for n, m in foldables(model).items()}
    pyadapt.fold_(model, alpha=alpha)
    for n, terms in expected.items():
        for param, ref, _, _ in terms:
            assert rel_err(param, ref) <= 1e-12, (
                f"{n}: folded {tuple(param.shape)} vs hand fold fp64")


def test_radapter_fold_formula_by_hand():
    """W_rep = (I + s' W_f) W_o, b_rep = (I + s' W_f) b_o with s' = s * eval_scale * alpha."""
    base = nn.Linear(20, 12, dtype=F64)
    m = pyadapt.RAdapter(base, rank=None, scale=0.1, eval_scale=0.8)
    with torch.no_grad():
        m.full_weight.copy_(torch.randn(12, 12) / 12 ** 0.5)
        m.scale.fill_(0.45)
    w_o, b_o, w_f = base.weight.detach().clone(), base.bias.detach().clone(), m.full_weight.detach()
    s1 = 0.45 * 0.8 * 0.6
    w_rep = w_o + s1 * (w_f @ w_o)
    b_rep = b_o + s1 * (w_f @ b_o)
    pyadapt.fold_(m, alpha=0.6)
    assert rel_err(base.weight, w_rep) <= 1e-12, "R-Adapter folded weight vs (I + s' W_f) W_o"
    assert rel_err(base.bias, b_rep) <= 1e-12, "R-Adapter folded bias vs (I + s' W_f) b_o"
    x = torch.randn(7, 20, dtype=F64)
    z = x @ w_o.T + b_o
    assert rel_err(m(x), z + 0.45 * 0.8 * 0.6 * (z @ w_f.T)) <= 1e-12, (
        "folded forward vs z + s * eval_scale * alpha * z W_f^T")


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_fold_alpha_zero_leaves_weights(dtype):
    model = build(dtype)
    snap = snapshot(model)
    pyadapt.fold_(model, alpha=0.0)
    assert all(m.merged for m in foldables(model).values()), "alpha=0 still marks modules folded"
    assert_bit_identical(model, snap, "fold_(alpha=0) weights vs originals")


# ----------------------------------------------------------------------------------------------
# 2. low-precision folds against the float64 fold; the fold op rounds once
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_fold_low_precision_vs_fp64(dtype, alpha):
    model = build(dtype)
    expected = {n: hand_fold(m, alpha, tensors64(m)) for n, m in foldables(model).items()}
    pyadapt.fold_(model, alpha=alpha)
    for n, terms in expected.items():
        for param, ref, mag, inner in terms:
            assert_fold_close(param, ref, mag, inner, dtype,
                              f"{n}: {dtype} fold of {tuple(param.shape)} vs fp64 fold")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (16, 8, 24), (33, 5, 70), (64, 16, 64)])
def test_fold_op_vs_fp64(dtype, shape):
    rows, k, cols = shape
    ws = [torch.randn(rows, cols, dtype=dtype), torch.randn(cols, rows, dtype=dtype)]
    acc = F64 if dtype == F64 else torch.float32
    lefts = [torch.randn(rows, k, dtype=acc), torch.randn(cols, k + 1, dtype=acc)]
    rights = [torch.randn(k, cols, dtype=acc), torch.randn(k + 1, rows, dtype=acc)]
    scales = [0.3, -1.7]
    keep = [w.clone() for w in ws]
    out = pyadapt.ops.fold(ws, lefts, rights, scales)
    for i in range(2):
        assert torch.equal(ws[i], keep[i]), f"weights[{i}] left untouched by ops.fold"
        ref = ws[i].double() + scales[i] * (lefts[i].double() @ rights[i].double())
        mag = ws[i].double().abs() + abs(scales[i]) * (lefts[i].double().abs()
                                                       @ rights[i].double().abs())
        assert_fold_close(out[i], ref, mag, lefts[i].shape[1], dtype,
                          f"ops.fold weights[{i}] ({dtype}) vs fp64 W + s L R")


def test_fold_op_rounds_once_fp32_exact_cases():
    """Where W + s L R is exactly representable in fp32 (small integers, power-of-two s) the
    fp32 fold is bit-exact against the float64 fold rounded to fp32."""
    w = torch.randint(-50, 50, (24, 40)).float()
    left = torch.randint(-8, 8, (24, 6)).float()
    right = torch.randint(-8, 8, (6, 40)).float()
    out = pyadapt.ops.fold([w], [left], [right], [0.25])[0]
    ref = (w.double() + 0.25 * (left.double() @ right.double())).float()
    assert torch.equal(out, ref), "fp32 fold of exactly representable values vs fp64 fold rounded"
    # bf16: 256 + 1 * (1 + 2^-9) rounded once is 258; rounding the product to bf16 first
    # (1.0) and then the sum (257, a tie) gives 256
    wb = torch.full((1, 1), 256.0, dtype=torch.bfloat16)
    lb = torch.full((1, 1), 1.0)
    rb = torch.full((1, 1), 1.0 + 2.0 ** -9)  # product rounds to 1.0 in bf16, sum is 257.0019
    outb = pyadapt.ops.fold([wb], [lb], [rb], [1.0])[0]
    exact = (256.0 + 1.0 + 2.0 ** -9)
    assert float(outb) == float(torch.tensor(exact).to(torch.bfloat16)), (
        "bf16 fold vs exact sum rounded once to bf16")


# ----------------------------------------------------------------------------------------------
# 3. unfold_ is exact; fold_ twice; unfold_ of nothing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_unfold_restores_bit_for_bit(dtype):
    model = build(dtype).eval()
    inputs = make_inputs(model, dtype)
    before = outputs(model, inputs)
    snap = snapshot(model)
    pyadapt.fold_(model, alpha=0.9)
    now = model.state_dict()
    for n, m in foldables(model).items():
        assert not torch.equal(m.base.weight, snap[f"{n}.base.weight"]), (
            f"{n}: base weight changed by fold_ (test setup)")
    assert torch.equal(now["head.weight"], snap["head.weight"]), (
        "plain nn.Linear untouched by fold_")
    names = pyadapt.unfold_(model)
    assert sorted(names) == sorted(FOLDABLE), f"unfold_ returned {names} vs the folded modules"
    assert not any(m.merged for m in foldables(model).values()), "merged flags after unfold_"
    assert_bit_identical(model, snap, f"unfold_ after fold_ ({dtype}) vs originals")
    after = outputs(model, inputs)
    for n in FOLDABLE:
        assert torch.equal(after[n], before[n]), f"{n}: eval forward after unfold_ vs before fold_"
    # and the cycle can be repeated
    pyadapt.fold_(model)
    pyadapt.unfold_(model)
    assert_bit_identical(model, snap, "second fold_/unfold_ cycle vs originals")


def test_merged_forward_is_base_linear():
    model = build(F64).train()
    pyadapt.fold_(model)
    for n, x in make_inputs(model, F64).items():
        m = foldables(model)[n]
        assert torch.equal(m(x), m.base(x)), f"{n}: folded forward (training mode) vs base linear"
    with pytest.raises(ValueError, match=r"^x: "):
        foldables(model)["blocks.0.attn"](torch.randn(2, 15, dtype=F64))


def test_fold_twice_raises_and_changes_nothing():
    model = build(torch.float32)
    pyadapt.fold_(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"already folded"):
        pyadapt.fold_(model)
    assert all(m.merged for m in foldables(model).values()), "merged flags after refused fold_"
    assert_bit_identical(model, snap, "refused second fold_ vs first fold_")
    pyadapt.unfold_(model)
    fresh = build(torch.float32)
    assert_bit_identical(model, snapshot(fresh), "unfold_ after refused second fold_ vs originals")


def test_unfold_without_fold_is_noop():
    model = build(torch.float32)
    snap = snapshot(model)
    assert pyadapt.unfold_(model) == [], "unfold_ with nothing folded returns no names"
    assert_bit_identical(model, snap, "unfold_ with nothing folded vs before")
    pyadapt.fold_(model.blocks[1])
    done = pyadapt.unfold_(model)
    assert done == ["blocks.1.attn", "blocks.1.mlp", "blocks.1.proj"], (
        f"unfold_ of the model returns only the folded modules, got {done}")
    assert_bit_identical(model, snap, "unfold_ of a partly folded model vs originals")


# ----------------------------------------------------------------------------------------------
# 4. atomicity: a fold that cannot complete changes nothing
# ----------------------------------------------------------------------------------------------

def _assert_unchanged_and_unfolded(model, snap, what):
    assert_bit_identical(model, snap, what)
    assert not any(m.merged for m in foldables(model).values()), f"{what}: no module marked folded"
    assert pyadapt.unfold_(model) == [], f"{what}: nothing to unfold afterwards"
    assert_bit_identical(model, snap, f"{what} (after unfold_)")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_fold_bad_alpha_changes_nothing(alpha):
    model = build(torch.float32)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^alpha: "):
        pyadapt.fold_(model, alpha=alpha)
    _assert_unchanged_and_unfolded(model, snap, f"fold_(alpha={alpha})")


def test_fold_use_ema_without_ema_on_second_adapter_changes_nothing():
    model = build(torch.float32)
    pyadapt.AdapterEMA(model.blocks[0], momentum=0.9)  # only the first block has shadows
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^use_ema: .*blocks\.1"):
        pyadapt.fold_(model, use_ema=True)
    _assert_unchanged_and_unfolded(model, snap, "fold_(use_ema=True) without EMA on blocks.1")


def test_fold_nan_scale_in_second_adapter_changes_nothing():
    """The first adapters' folds are computed before the second's scale is found invalid."""
    model = build(torch.float32)
    with torch.no_grad():
        model.blocks[1].attn.scale.fill_(float("nan"))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"scales\["):
        pyadapt.fold_(model)
    _assert_unchanged_and_unfolded(model, snap, "fold_ with a NaN scale in blocks.1.attn")


def test_fold_with_one_module_already_folded_changes_nothing():
    model = build(torch.float32)
    orig = snapshot(model)
    pyadapt.fold_(model.blocks[0].proj)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.proj"):
        pyadapt.fold_(model)
    assert_bit_identical(model, snap, "fold_ refused because blocks.0.proj is folded")
    merged = {n for n, m in foldables(model).items() if m.merged}
    assert merged == {"blocks.0.proj"}, f"folded modules after refused fold_: {merged}"
    pyadapt.unfold_(model)
    assert_bit_identical(model, orig, "unfold_ after refused fold_ vs originals")


def test_fold_bad_model_argument():
    with pytest.raises(TypeError, match=r"^model: "):
        pyadapt.fold_(torch.randn(3, 3))
    with pytest.raises(TypeError, match=r"^model: "):
        pyadapt.unfold_([nn.Linear(2, 2)])


# ----------------------------------------------------------------------------------------------
# 5. AdapterEMA
# ----------------------------------------------------------------------------------------------

def expected_adapter_tensors(model):
    """{qualified name: live tensor} of every adapter tensor, listed from the model's structure,
    each shared tensor once (under its first user's name)."""
    out = {}
    for b in ("blocks.0", "blocks.1"):
        blk = model.get_submodule(b)
        out[f"{b}.attn.full_weight"] = blk.attn.full_weight
        out[f"{b}.attn.scale"] = blk.attn.scale
        out[f"{b}.mlp.down_weight"] = blk.mlp.down_weight
        out[f"{b}.mlp.up_weight"] = blk.mlp.up_weight
        out[f"{b}.proj.down_weight"] = blk.proj.down_weight
        out[f"{b}.proj.up_weight"] = blk.proj.up_weight
    out["low_nobias.down_weight"] = model.low_nobias.down_weight
    out["low_nobias.up_weight"] = model.low_nobias.up_weight
    out["low_nobias.scale"] = model.low_nobias.scale
    for i in range(3):
        out[f"cp.sites.{i}.lam"] = model.cp[i].lam
    out["cp.sites.0.U"] = model.cp.U
    out["cp.sites.0.V"] = model.cp.V
    if model.cp.C is not None:
        out["cp.sites.0.C"] = model.cp.C
    for kind in ("vision", "text"):
        for layer in (1, 2):
            a = getattr(model.mma, kind)(layer)
            for part in ("down", "up"):
                for p in ("weight", "bias"):
                    out[f"mma.{kind}_adapters.{layer}.{part}.{p}"] = getattr(getattr(a, part), p)
    for layer in (1, 2):
        for p in ("weight", "bias"):
            shared = model.mma.shared[str(layer)]
            out[f"mma.vision_adapters.{layer}.shared.{p}"] = getattr(shared, p)
    return out


def base_tensors(model):
    out = [m.base.weight for m in foldables(model).values()]
    out += [m.base.bias for m in foldables(model).values() if m.base.bias is not None]
    return out + [model.head.weight, model.head.bias]


def step(model, scale=0.1):
    """A stand-in optimizer step: every adapter tensor moves by a random amount."""
    with torch.no_grad():
        for t in expected_adapter_tensors(model).values():
            t.add_(scale * torch.randn(t.shape, dtype=t.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.9, 0.999, 0.0, 1.0])
def test_ema_update_matches_hand_loop(dtype, momentum):
    model = build(dtype)
    live = expected_adapter_tensors(model)
    bases = [t.detach().clone() for t in base_tensors(model)]
    ema = pyadapt.AdapterEMA(model, momentum=momentum)
    inplace = {k: t.detach().clone() for k, t in live.items()}
    formula = {k: t.detach().double().clone() for k, t in live.items()}
    for _ in range(5):
        step(model)
        ema.update()
        for k, t in live.items():
            inplace[k].mul_(momentum).add_(t.detach(), alpha=1 - momentum)
            formula[k] = momentum * formula[k] + (1 - momentum) * t.detach().double()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for k, t in live.items():
        sh = ema.shadow(t)
        assert sh.dtype == t.dtype and sh.shape == t.shape, f"{k}: shadow dtype/shape vs parameter"
        assert sh.data_ptr() != t.data_ptr(), f"{k}: shadow is a copy, not the live tensor"
        assert torch.equal(sh, inplace[k]), f"{k}: shadow vs c.mul_(m).add_(p, alpha=1-m) loop"
        err = (sh.double() - formula[k]).abs().max().item()
        assert err <= tol * max(1.0, formula[k].abs().max().item()), (
            f"{k}: shadow vs m*c + (1-m)*p in float64 (max abs error {err:.2e})")
    for b, b0 in zip(base_tensors(model), bases):
        assert torch.equal(b, b0), "base weights unchanged by EMA updates"
        with pytest.raises(KeyError):
            ema.shadow(b)  # base weights have no shadow
    sd = ema.state_dict()
    assert set(sd) == set(live), (
        f"EMA state_dict keys vs adapter tensors: extra {set(sd) - set(live)}, "
        f"missing {set(live) - set(sd)}")
    for k, t in live.items():
        assert sd[k] is ema.shadow(t), f"{k}: EMA state_dict entry is the shadow"


def test_ema_shared_tensors_have_one_shadow():
    model = build(torch.float64).eval()
    ema = pyadapt.AdapterEMA(model, momentum=0.5)
    sd = ema.state_dict()
    u_keys = [k for k, v in sd.items() if v is ema.shadow(model.cp.U)]
    assert u_keys == ["cp.sites.0.U"], f"CP U has one shadow entry, got {u_keys}"
    sh_keys = [k for k, v in sd.items() if v is ema.shadow(model.mma.shared["1"].weight)]
    assert sh_keys == ["mma.vision_adapters.1.shared.weight"], (
        f"MMA shared projection has one shadow entry, got {sh_keys}")
    # all three CP sites and both MMA branches compute with that single shadow in eval
    with torch.no_grad():
        ema.shadow(model.cp.U).mul_(-2.0)
        ema.shadow(model.mma.shared["1"].weight).mul_(3.0)
    x_cp = {i: torch.randn(4, model.cp[i].in_features, dtype=F64) for i in range(3)}
    for i in range(3):
        site = model.cp[i]
        use = tensors64(site, ema)
        ref = hand_fold(site, 1.0, use)[0][1]
        want = x_cp[i] @ ref.T + site.base.bias.detach()
        assert rel_err(site(x_cp[i]), want) <= 1e-12, f"cp site {i} eval forward vs shadow U, V, C"
    for kind, dim in (("vision", 16), ("text", 12)):
        a = getattr(model.mma, kind)(1)
        x = torch.randn(5, dim, dtype=F64)
        sh = {n: ema.shadow(p) for n, p in a.named_parameters()}
        want = reference.bottleneck_forward(
            x, sh["down.weight"], sh["down.bias"], sh["up.weight"], sh["up.bias"],
            sh["shared.weight"], sh["shared.bias"], scale=a.scale, activation_name="relu")
        assert rel_err(a(x), want) <= 1e-12, f"MMA {kind} eval forward vs the shared shadow"


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("use_in_eval", [True, False])
def test_ema_radapter_eval_uses_shadows(rank, use_in_eval):
    base = nn.Linear(12, 10, dtype=F64)
    m = pyadapt.RAdapter(base, rank=rank, eval_scale=0.7)
    randomize_adapters(m)
    ema = pyadapt.AdapterEMA(m, momentum=0.8, use_in_eval=use_in_eval)
    for _ in range(3):
        step_tensors = [t for _, t in m.adapter_tensors()]
        with torch.no_grad():
            for t in step_tensors:
                t.add_(0.2 * torch.randn(t.shape, dtype=F64))
        ema.update()
    x = torch.randn(2, 6, 12, dtype=F64)
    x2 = x.reshape(-1, 12)
    w_o, b_o = base.weight.detach().clone(), base.bias.detach().clone()

    def formula(t, c):
        z = x2 @ w_o.T + b_o
        w_f = t["full_weight"] if rank is None else t["up_weight"] @ t["down_weight"]
        return (z + c * z @ w_f.T).reshape(2, 6, 10)

    live, shadow = tensors64(m), tensors64(m, ema)
    assert not torch.equal(live["scale"], shadow["scale"]), "test setup: shadow differs from live"
    m.train()
    assert rel_err(m(x), formula(live, float(live["scale"]))) <= 1e-12, (
        "training forward vs live weights with c = s")
    m.eval()
    use = shadow if use_in_eval else live
    assert rel_err(m(x), formula(use, float(use["scale"]) * 0.7)) <= 1e-12, (
        f"eval forward vs {'shadow' if use_in_eval else 'live'} weights, c = s * eval_scale")
    # fold_(use_ema=True) folds the shadows, fold_ () the live weights
    want = formula(shadow, float(shadow["scale"]) * 0.7)
    pyadapt.fold_(m, use_ema=True)
    assert rel_err(m(x), want) <= 1e-12, "fold_(use_ema=True) forward vs shadow eval formula"
    pyadapt.unfold_(m)
    pyadapt.fold_(m)
    assert rel_err(m(x), formula(live, float(live["scale"]) * 0.7)) <= 1e-12, (
        "fold_(use_ema=False) forward vs live eval formula")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_use_ema_folds_shadows(dtype):
    model = build(dtype)
    ema = pyadapt.AdapterEMA(model, momentum=0.7)
    for _ in range(3):
        step(model, 0.3)
        ema.update()
    model.eval()
    inputs = make_inputs(model, dtype)
    ema_eval = outputs(model, inputs)
    expected = {n: hand_fold(m, 1.0, tensors64(m, ema)) for n, m in foldables(model).items()}
    pyadapt.fold_(model, use_ema=True)
    for n, terms in expected.items():
        for param, ref, mag, inner in terms:
            assert_fold_close(param, ref, mag, inner, dtype, f"{n}: fold_(use_ema=True) vs hand "
                              f"fold of the shadows")
    after = outputs(model, inputs)
    tol = REL_TOL[dtype] if dtype == F64 else 1e-5
    for n in FOLDABLE:
        assert rel_err(after[n], ema_eval[n]) <= tol, (
            f"{n}: folded (EMA) forward vs unfolded eval forward with shadows")


def test_ema_bad_arguments():
    model = build(torch.float32, randomize=False)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^momentum: "):
            pyadapt.AdapterEMA(model, momentum=bad)
    with pytest.raises(TypeError, match=r"^momentum: "):
        pyadapt.AdapterEMA(model, momentum="0.9")
    with pytest.raises(ValueError, match=r"^model: "):
        pyadapt.AdapterEMA(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match=r"^model: "):
        pyadapt.AdapterEMA(torch.randn(4))


def test_ema_state_dict_round_trip():
    src = build(torch.float32, seed=3)
    ema = pyadapt.AdapterEMA(src, momentum=0.6)
    for _ in range(3):
        step(src, 0.2)
        ema.update()
    dst = build(torch.float32, seed=3)
    randomize_adapters(dst)  # different live adapters, same base weights
    ema2 = pyadapt.AdapterEMA(dst, momentum=0.6)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    ema2.load_state_dict(state)
    sd2 = ema2.state_dict()
    assert set(sd2) == set(state), "EMA state_dict keys after load vs saved"
    for k, v in state.items():
        assert torch.equal(sd2[k], v), f"{k}: loaded shadow vs saved shadow"
    src.eval(), dst.eval()
    inputs = make_inputs(src, torch.float32)
    a, b = outputs(src, inputs), outputs(dst, inputs)
    for n in FOLDABLE:
        assert torch.equal(a[n], b[n]), f"{n}: eval forward with loaded shadows vs source"
    bad = dict(state)
    bad["cp.sites.0.U"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"cp\.sites\.0\.U"):
        ema2.load_state_dict(bad)
    missing = dict(state)
    del missing["blocks.1.attn.scale"]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.scale"):
        ema2.load_state_dict(missing)
    for k, v in state.items():
        assert torch.equal(ema2.state_dict()[k], v), f"{k}: shadow unchanged by refused loads"


# ----------------------------------------------------------------------------------------------
# 6. adapter_state_dict / load_adapter_state_dict
# ----------------------------------------------------------------------------------------------

def test_adapter_state_dict_contents():
    model = build(torch.float32)
    sd = pyadapt.adapter_state_dict(model)
    want = expected_adapter_tensors(model)
    assert set(sd) == set(want), (
        f"adapter_state_dict keys: extra {sorted(set(sd) - set(want))}, "
        f"missing {sorted(set(want) - set(sd))}")
    for k, t in want.items():
        assert torch.equal(sd[k], t.detach()), f"{k}: adapter_state_dict value vs live tensor"
        assert not sd[k].requires_grad, f"{k}: adapter_state_dict values are detached"
    base_ptrs = {t.data_ptr() for t in base_tensors(model)}
    assert not any(v.data_ptr() in base_ptrs for v in sd.values()), (
        "adapter_state_dict holds no base weight")
    assert not any(".base." in k or k.startswith("head") for k in sd), "no base weight key"
    ptrs = [v.data_ptr() for v in sd.values()]
    assert len(ptrs) == len(set(ptrs)), "every shared tensor appears once"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_state_dict_round_trip(dtype):
    src = build(dtype, seed=5)
    state = {k: v.clone() for k, v in pyadapt.adapter_state_dict(src).items()}
    dst = build(dtype, seed=5, randomize=False)  # same bases, freshly initialised adapters
    missing, unexpected = pyadapt.load_adapter_state_dict(dst, state)
    assert (missing, unexpected) == ([], []), f"strict load returned {missing}, {unexpected}"
    for mode in ("train", "eval"):
        getattr(src, mode)(), getattr(dst, mode)()
        inputs = make_inputs(src, dtype)
        if mode == "train":  # dropout-free training comparison: CP sites drop in training
            inputs = {n: x for n, x in inputs.items() if not n.startswith("cp")}
        a, b = outputs(src, inputs), outputs(dst, inputs)
        for n in inputs:
            assert torch.equal(a[n], b[n]), f"{n}: {mode} forward after load vs source"
    x = torch.randn(4, 16, dtype=dtype)
    assert torch.equal(src.mma(x, 1, "vision"), dst.mma(x, 1, "vision")), (
        "MMA vision forward after load vs source")


@pytest.mark.parametrize("bad_key", ["blocks.0.attn.full_weight", "mma.vision_adapters.2.up.bias",
                                     "cp.sites.0.U"])
def test_load_wrong_shape_changes_nothing(bad_key):
    src = build(torch.float32, seed=1)
    dst = build(torch.float32, seed=1)
    randomize_adapters(dst)
    snap = snapshot(dst)
    state = {k: v.clone() for k, v in pyadapt.adapter_state_dict(src).items()}
    shape = state[bad_key].shape
    state[bad_key] = torch.randn(*shape, 2)
    with pytest.raises(ValueError, match=rf"^state_dict\[{bad_key!r}\]".replace(".", r"\.")):
        pyadapt.load_adapter_state_dict(dst, state)
    assert_bit_identical(dst, snap, f"refused load (wrong shape of {bad_key}) vs before")
    state[bad_key] = torch.ones(shape, dtype=torch.int64)
    with pytest.raises(TypeError, match=bad_key.replace(".", r"\.")):
        pyadapt.load_adapter_state_dict(dst, state)
    assert_bit_identical(dst, snap, f"refused load (integer {bad_key}) vs before")


def test_load_missing_and_unexpected_keys():
    src = build(torch.float32, seed=2)
    dst = build(torch.float32, seed=2)
    randomize_adapters(dst)
    snap = snapshot(dst)
    state = {k: v.clone() for k, v in pyadapt.adapter_state_dict(src).items()}
    partial = dict(state)
    del partial["blocks.1.proj.up_weight"]
    partial["blocks.9.attn.full_weight"] = torch.zeros(16, 16)
    with pytest.raises(ValueError, match=r"blocks\.1\.proj\.up_weight"):
        pyadapt.load_adapter_state_dict(dst, partial)
    assert_bit_identical(dst, snap, "strict load with missing/unexpected keys vs before")
    missing, unexpected = pyadapt.load_adapter_state_dict(dst, partial, strict=False)
    assert missing == ["blocks.1.proj.up_weight"], f"non-strict missing keys: {missing}"
    assert unexpected == ["blocks.9.attn.full_weight"], f"non-strict unexpected keys: {unexpected}"
    got = pyadapt.adapter_state_dict(dst)
    for k, v in state.items():
        if k == "blocks.1.proj.up_weight":
            assert torch.equal(got[k], snap[k]), f"{k}: missing key leaves the tensor as it was"
        else:
            assert torch.equal(got[k], v), f"{k}: non-strict load copied the given tensor"


def test_load_into_folded_model_raises():
    src = build(torch.float32, seed=4)
    dst = build(torch.float32, seed=4)
    randomize_adapters(dst)
    pyadapt.fold_(dst)
    snap = snapshot(dst)
    with pytest.raises(ValueError, match=r"folded"):
        pyadapt.load_adapter_state_dict(dst, pyadapt.adapter_state_dict(src))
    assert_bit_identical(dst, snap, "refused load into a folded model vs before")


def test_state_dict_bad_arguments():
    with pytest.raises(TypeError, match=r"^model: "):
        pyadapt.adapter_state_dict("model")
    with pytest.raises(TypeError, match=r"^state_dict: "):
        pyadapt.load_adapter_state_dict(build(torch.float32), [("a", torch.zeros(1))])


# ----------------------------------------------------------------------------------------------
# 7. the fold op: opcheck and argument checks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_fold_weights(dtype):
    acc = F64 if dtype == F64 else torch.float32
    weights = [torch.randn(6, 8, dtype=dtype), torch.randn(6, 1, dtype=dtype),
               torch.randn(3, 5, dtype=dtype)]
    lefts = [torch.randn(6, 6, dtype=acc), torch.randn(6, 6, dtype=acc),
             torch.randn(3, 2, dtype=acc)]
    rights = [torch.randn(6, 8, dtype=acc), torch.randn(6, 1, dtype=acc),
              torch.randn(2, 5, dtype=acc)]
    scales = torch.tensor([0.1, -0.2, 1.5], dtype=F64)
    result = torch.library.opcheck(torch.ops.pyadapt.fold_weights.default,
                                   (weights, lefts, rights, scales))
    assert all(v == "SUCCESS" for v in result.values()), f"opcheck fold_weights: {result}"
    out = torch.ops.pyadapt.fold_weights(weights, lefts, rights, scales)
    for i, (w, left, right) in enumerate(zip(weights, lefts, rights)):
        ref = w.double() + float(scales[i]) * (left.double() @ right.double())
        assert_close_rel(out[i], ref, dtype, f"fold_weights output {i} vs fp64 W + s L R")
    assert torch.ops.pyadapt.fold_weights([], [], [], torch.zeros(0, dtype=F64)) == [], (
        "fold_weights of no weights returns an empty list")


def test_fold_op_bad_arguments():
    w, left, right = torch.randn(4, 6), torch.randn(4, 3), torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"^lefts\[0\]: "):
        pyadapt.ops.fold([w], [torch.randn(5, 3)], [right], [0.1])
    with pytest.raises(ValueError, match=r"^rights\[1\]: "):
        pyadapt.ops.fold([w, w], [left, left], [right, torch.randn(2, 6)], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"^rights\[0\]: "):
        pyadapt.ops.fold([w], [left], [torch.randn(3, 5)], [0.1])
    with pytest.raises(ValueError, match=r"^weights\[0\]: "):
        pyadapt.ops.fold([torch.randn(4)], [left], [right], [0.1])
    with pytest.raises(TypeError, match=r"^weights\[0\]: "):
        pyadapt.ops.fold([torch.ones(4, 6, dtype=torch.int32)], [left], [right], [0.1])
    with pytest.raises(ValueError, match=r"^scales\[0\]: "):
        pyadapt.ops.fold([w], [left], [right], [float("nan")])
    with pytest.raises(ValueError, match=r"^fold: .*equal numbers"):
        pyadapt.ops.fold([w], [left, left], [right], [0.1])
    assert pyadapt.ops.fold([], [], [], []) == [], "ops.fold of nothing returns []"


def test_fold_op_tensor_scales_must_be_finite():
    """A scales tensor is checked like a list of floats (a NaN list entry is a ValueError)."""
    w, left, right = torch.randn(4, 6), torch.randn(4, 3), torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"^scales"):
        pyadapt.ops.fold([w], [left], [right], torch.tensor([float("nan")], dtype=F64))


def test_fold_op_scales_wrong_shape_names_argument():
    w, left, right = torch.randn(4, 6), torch.randn(4, 3), torch.randn(3, 6)
    with pytest.raises((TypeError, ValueError), match=r"^scales"):
        pyadapt.ops.fold([w], [left], [right], torch.tensor(0.5, dtype=F64))
