"""Frozen linear + low-rank adapter: LoRA form, Aurora's CP / Tucker-core mode approximation.

Formulas checked (storage W: out x in; x: M x in, one token per row; s the scale):
  y = x W^T + b + s * drop((x A^T) K) B^T      dropout after the core  (Aurora's ViT)
  y = x W^T + b + s * (drop(x A^T) K) B^T      dropout before the core (Aurora's BERT)
      A (r1 x in), K (r1 x r2; None = identity), B (out x r2); drop(z) = D * z elementwise with
      D = reference.dropout_multiplier(seed, M, cols, p) in {0, 1/(1-p)}.
  Backward (REFERENCE-SEMANTICS 3.4), g = dL/dy, u = x A^T:
      after:  z = D*(u K);  dB = s g^T z;  dp = D*(s g B);  dK = u^T dp;  du = dp K^T
      before: z = (D*u) K;  dB = s g^T z;  dK = (D*u)^T (s g B);  du = D*(s g B K^T)
      dA = du^T x;  dx = g W + du A;  dW = g^T x;  db = sum_rows g
  LoRA (LowRankAdapter): K = I, s = alpha / rank.
  Aurora site k (CPAdapter): M_k = sum_c C[:, :, c] lambda_k[c] ("tucker") or diag(lambda_k) ("cp"),
      y = x W_k^T + b_k + drop(x U^T M_k) V^T, i.e. Delta W_k = V M_k^T U; a wide site is split
      into width-sized blocks, block (o, i) of Delta W = V M_oi^T U with its own lambda_oi;
      dlambda_k[c] = sum_ab C[a, b, c] dM_k[a, b];  dC[a, b, c] += dM_k[a, b] lambda_k[c];
      U, V, C gradients are sums over sites.
  Gated query: r = 0.1 (a * gamma + beta); dgamma = 0.1 sum g*a, dbeta = 0.1 sum g, da = 0.1 g*gamma.
  Context enhancement: cls + 0.1 * mean_rows(text_cls).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt import ops, reference
from conftest import assert_close_rel, rel_err

F64 = torch.float64
SEED = torch.tensor(7, dtype=torch.int64)
# Op-level comparisons run on every backend that serves CPU tensors here.
CPU_BACKENDS = [b for b in ("cpu", "reference") if b in pyadapt.available_backends()]

# (M, in, out, r1, r2): M in {0, 1, 63, 64, 65, 1000}, d in {8, 100, ...}, r in {1, 7, 32};
# r1 != r2 makes the core rectangular.
SHAPES = [
    (0, 8, 8, 1, 1),
    (1, 8, 100, 7, 7),
    (63, 100, 8, 7, 5),
    (64, 100, 100, 32, 16),
    (65, 64, 96, 1, 7),
    (1000, 100, 64, 32, 32),
]


# ----------------------------------------------------------------------------------------------
# Hand-written mathematics (float64), independent of pyadapt.reference
# ----------------------------------------------------------------------------------------------

def hand_forward(x, W, b, A, K, B, s, D=None, after=True):
    """y[m, o] = sum_i x[m, i] W[o, i] + b[o] + s sum_k z[m, k] B[o, k] with z as in the header."""
    u = torch.einsum("mi,ri->mr", x, A)
    if K is None:
        K = torch.eye(A.shape[0], dtype=x.dtype)
    if D is not None and not after:
        u = u * D
    z = torch.einsum("mr,rk->mk", u, K)
    if D is not None and after:
        z = z * D
    y = torch.einsum("mi,oi->mo", x, W) + s * torch.einsum("mk,ok->mo", z, B)
    return y if b is None else y + b


def aurora_grads(g, x, W, A, K, B, s, D, after):
    """The explicit backward of REFERENCE-SEMANTICS 3.4 (with scale s and an optional core)."""
    Kd = torch.eye(A.shape[0], dtype=x.dtype) if K is None else K
    ones = torch.ones(x.shape[0], Kd.shape[1] if after else Kd.shape[0], dtype=x.dtype)
    D = ones if D is None else D
    u = x @ A.T
    gV = s * (g @ B)
    if after:  # ViT: z = D*(u K)
        z = D * (u @ Kd)
        dp = D * gV
        dK = u.T @ dp
        du = dp @ Kd.T
    else:      # BERT: z = (D*u) K
        z = (D * u) @ Kd
        dK = (D * u).T @ gV
        du = D * (gV @ Kd.T)
    return {"dx": g @ W + du @ A, "dW": g.T @ x, "db": g.sum(0), "dA": du.T @ x,
            "dK": None if K is None else dK, "dB": s * g.T @ z}


def make(M, d_in, d_out, r1, r2, dtype=F64, *, bias=True, core=True):
    """Fresh random inputs scaled like activations and trained weights (nothing zero)."""
    x = torch.randn(M, d_in, dtype=F64)
    W = torch.randn(d_out, d_in, dtype=F64) / d_in ** 0.5
    b = torch.randn(d_out, dtype=F64) * 0.1 if bias else None
    A = torch.randn(r1, d_in, dtype=F64) / d_in ** 0.5
    K = torch.randn(r1, r2, dtype=F64) / r1 ** 0.5 if core else None
    B = torch.randn(d_out, r2 if core else r1, dtype=F64) / r2 ** 0.5
    return [None if t is None else t.to(dtype) for t in (x, W, b, A, K, B)]


def mask(M, cols, p, dtype=F64, seed=SEED):
    return reference.dropout_multiplier(seed, M, cols, p, dtype, "cpu")


def replay_seed(state):
    """The dropout seed a module drew: ops draw it with torch.randint from the global generator
    (pyadapt/ops/_scalars.py seed_tensor); restoring the RNG state replays the draw."""
    torch.set_rng_state(state)
    return torch.randint(0, reference.SEED_LIMIT, (), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# 1. reference forward vs the hand formula
# ----------------------------------------------------------------------------------------------

def test_dropout_multiplier_is_a_pure_function_of_seed_and_flat_index():
    m = mask(40, 50, 0.3)
    vals = set(torch.unique(m).tolist())
    assert vals <= {0.0, 1.0 / 0.7}, f"dropout factors: expected {{0, 1/(1-p)}}, got {vals}"
    keep = (m > 0).double().mean().item()
    assert abs(keep - 0.7) < 0.03, f"dropout keep fraction {keep:.3f} != 1 - p = 0.7"
    assert torch.equal(mask(40, 50, 0.3), m), "same seed: dropout mask differs between calls"
    assert not torch.equal(mask(40, 50, 0.3, seed=torch.tensor(8)), m), \
        "different seeds: dropout masks are identical"
    assert torch.equal(mask(8, 250, 0.3).reshape(-1), m.reshape(-1)), \
        "dropout mask: element (i, j) must depend only on the flat index i * cols + j"


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["no_dropout", "after_core", "before_core", "no_core",
                                     "no_core_dropout", "no_bias"])
def test_reference_forward_matches_hand_formula(variant, shape, dtype):
    M, d_in, d_out, r1, r2 = shape
    core = variant not in ("no_core", "no_core_dropout")
    x, W, b, A, K, B = make(*shape, bias=variant != "no_bias", core=core)
    p = 0.0 if variant in ("no_dropout", "no_core", "no_bias") else 0.25
    after = variant != "before_core"
    cols = (r2 if core else r1) if after else r1
    D = mask(M, cols, p) if p > 0 else None
    want = hand_forward(x, W, b, A, K, B, 0.7, D, after)
    args = [None if t is None else t.to(dtype) for t in (x, W, b, A, K, B)]
    got = reference.lowrank_linear_forward(*args, scale=0.7, dropout_p=p, seed=SEED,
                                           dropout_after_core=after)
    assert got.dtype == dtype, f"reference forward: dtype {got.dtype} != input dtype {dtype}"
    assert_close_rel(got, want, dtype, f"reference.lowrank_linear_forward ({variant}) vs hand formula")


def test_dropout_actually_drops_in_rank_space():
    x, W, b, A, K, B = make(64, 16, 16, 8, 8)
    y_drop = reference.lowrank_linear_forward(x, W, b, A, K, B, dropout_p=0.5, seed=SEED)
    y_keep = reference.lowrank_linear_forward(x, W, b, A, K, B)
    assert rel_err(y_drop, y_keep) > 1e-2, "dropout p=0.5 left the output unchanged"
    y_b = reference.lowrank_linear_forward(x, W, b, A, K, B, dropout_p=0.5, seed=SEED,
                                           dropout_after_core=False)
    assert rel_err(y_b, y_drop) > 1e-2, "dropout before and after the core gave the same output"


# ----------------------------------------------------------------------------------------------
# 2. reference backward vs autograd of the hand formula and vs REFERENCE-SEMANTICS 3.4
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ordering", ["vit_after_core", "bert_before_core", "no_dropout",
                                      "lora_no_core"])
def test_reference_backward_matches_autograd_and_aurora_formulas(ordering, shape):
    M, d_in, d_out, r1, r2 = shape
    core = ordering != "lora_no_core"
    x, W, b, A, K, B = make(*shape, core=core)
    after = ordering != "bert_before_core"
    p = 0.0 if ordering == "no_dropout" else 0.2
    cols = (r2 if core else r1) if after else r1
    D = mask(M, cols, p) if p > 0 else None
    s = 1.3
    g = torch.randn(M, d_out, dtype=F64)
    got = reference.lowrank_linear_backward(g, x, W, b, A, K, B, scale=s, dropout_p=p, seed=SEED,
                                            dropout_after_core=after)
    names = ["dx", "dW", "db", "dA", "dK", "dB"]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, W, b, A, K, B)]
    y = hand_forward(*leaves, s, D, after)
    present = [t for t in leaves if t is not None]
    auto = iter(torch.autograd.grad(y, present, g))
    explicit = aurora_grads(g, x, W, A, K, B, s, D, after)
    for name, leaf, gr in zip(names, leaves, got):
        if leaf is None:
            assert gr is None, f"{name}: expected None for an absent input, got a tensor"
            continue
        want = next(auto)
        assert_close_rel(gr, want, F64, f"reference backward {name} vs autograd ({ordering})")
        assert_close_rel(gr, explicit[name], F64,
                         f"reference backward {name} vs REFERENCE-SEMANTICS 3.4 formula ({ordering})")


# ----------------------------------------------------------------------------------------------
# 3. LowRankAdapter (LoRA form)
# ----------------------------------------------------------------------------------------------

def lora(d_in, d_out, rank, alpha=16.0, dtype=F64, dropout=0.0):
    base = nn.Linear(d_in, d_out, dtype=dtype)
    m = pyadapt.LowRankAdapter(base, rank=rank, alpha=alpha, dropout=dropout)
    with torch.no_grad():  # up_weight starts at zero: give it real values
        m.up_weight.copy_(torch.randn_like(m.up_weight) / rank ** 0.5)
    return m


def lora_hand(m, x, D=None):
    W, b = m.base.weight.detach().double(), m.base.bias.detach().double()
    A, B = m.down_weight.detach().double(), m.up_weight.detach().double()
    x2 = x.detach().double().reshape(-1, m.in_features)
    y = hand_forward(x2, W, b, A, None, B, m.alpha / m.rank, D)
    return y.reshape(*x.shape[:-1], m.out_features)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("d_in,d_out,rank", [(8, 100, 1), (8, 100, 7), (128, 144, 1),
                                             (128, 144, 7), (128, 144, 32), (128, 144, 128),
                                             (144, 128, 128)])
def test_lowrank_adapter_is_base_plus_scaled_lora(d_in, d_out, rank, dtype):
    m = lora(d_in, d_out, rank, alpha=16.0, dtype=dtype)
    x = torch.randn(65, d_in, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.dtype == dtype, f"LowRankAdapter output dtype {y.dtype} != {dtype}"
    assert_close_rel(y, lora_hand(m, x), dtype,
                     f"LowRankAdapter(rank={rank}) vs base(x) + (alpha/r) x A^T B^T")
    g = torch.randn_like(y)
    y.backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (x, m.down_weight, m.up_weight)]
    W, b = m.base.weight.detach().double(), m.base.bias.detach().double()
    want = torch.autograd.grad(hand_forward(leaves[0], W, b, leaves[1], None, leaves[2], 16.0 / rank),
                               leaves, g.double())
    for name, got, w in zip(["x", "down_weight", "up_weight"],
                            [x.grad, m.down_weight.grad, m.up_weight.grad], want):
        assert_close_rel(got, w, dtype, f"LowRankAdapter d{name} vs autograd of the LoRA formula")


def test_lowrank_adapter_base_is_frozen():
    m = lora(16, 24, 4)
    assert not m.base.weight.requires_grad and not m.base.bias.requires_grad, \
        "LowRankAdapter: base weight/bias must be frozen (requires_grad False)"
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"down_weight", "up_weight"}, f"trainable parameters: {trainable}"
    m(torch.randn(5, 16, dtype=F64)).sum().backward()
    assert m.base.weight.grad is None and m.base.bias.grad is None, \
        "LowRankAdapter: backward wrote a gradient into the frozen base"
    assert m.down_weight.grad is not None and m.down_weight.grad.abs().sum() > 0, \
        "LowRankAdapter: down_weight received no gradient"


def test_lowrank_adapter_dropout_only_in_training():
    m = lora(32, 48, 8, dropout=0.5)
    x = torch.randn(64, 32, dtype=F64)
    m.eval()
    assert_close_rel(m(x), lora_hand(m, x), F64, "LowRankAdapter eval (dropout off) vs formula")
    m.train()
    state = torch.get_rng_state()
    y = m(x)
    seed = replay_seed(state)
    D = mask(64, 8, 0.5, seed=seed)
    assert_close_rel(y, lora_hand(m, x, D), F64,
                     "LowRankAdapter training output vs formula with drop(x A^T) in rank space")
    assert rel_err(y, lora_hand(m, x)) > 1e-2, "LowRankAdapter training with dropout 0.5 dropped nothing"


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_lowrank_adapter_leading_dims_and_strided_input(dtype):
    m = lora(24, 40, 6, dtype=dtype)
    x = torch.randn(3, 24, 5, dtype=dtype).transpose(1, 2)  # (B, T, d), non-contiguous
    assert not x.is_contiguous(), "test data: x must be a strided (non-contiguous) view"
    xs = x.detach().clone().requires_grad_()
    y = m(xs)
    assert y.shape == (3, 5, 40), f"LowRankAdapter output shape {tuple(y.shape)} != (3, 5, 40)"
    assert_close_rel(y, lora_hand(m, x), dtype, "LowRankAdapter on strided (B, T, d) input vs formula")
    assert_close_rel(y, m(x.contiguous()), dtype, "LowRankAdapter strided vs contiguous input")
    y.backward(torch.ones_like(y))
    ref_dx = torch.ones(15, 40, dtype=F64) @ (m.base.weight.double() + (m.alpha / m.rank) *
                                              m.up_weight.double() @ m.down_weight.double())
    assert_close_rel(xs.grad, ref_dx.reshape(3, 5, 24), dtype,
                     "LowRankAdapter dx on strided input vs g (W + s B A)")
    x_sliced = torch.randn(4, 7, 48, dtype=dtype)[:, :, ::2]
    assert_close_rel(m(x_sliced), lora_hand(m, x_sliced), dtype,
                     "LowRankAdapter on last-dim-strided input vs formula")


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_lowrank_adapter_empty_batch(lead):
    m = lora(16, 24, 4)
    x = torch.randn(*lead, 16, dtype=F64, requires_grad=True)
    y = m(x)
    assert y.shape == (*lead, 24), f"LowRankAdapter output of M = 0 rows: shape {tuple(y.shape)}"
    y.sum().backward()
    for name, p in [("down_weight", m.down_weight), ("up_weight", m.up_weight)]:
        assert p.grad is not None and p.grad.shape == p.shape, f"{name}.grad missing for M = 0"
        assert torch.equal(p.grad, torch.zeros_like(p)), f"{name}.grad must be 0 for M = 0 rows"
    assert x.grad.shape == x.shape, "dx shape for M = 0 rows"


# ----------------------------------------------------------------------------------------------
# 4. CPAdapter / CPLinear (Aurora)
# ----------------------------------------------------------------------------------------------

def cp_adapter(bases, rank, core="tucker", dropout=0.0, position="after_core", width=None):
    cp = pyadapt.CPAdapter(bases, rank=rank, core=core, dropout=dropout,
                           dropout_position=position, width=width)
    with torch.no_grad():  # V starts at zero: give it real values
        cp.V.copy_(torch.randn_like(cp.V) / rank ** 0.5)
    return cp


def hand_core(C, lam, kind):
    """M = sum_c C[:, :, c] lambda[c] (tucker) or diag(lambda) (cp), written out."""
    if kind == "cp":
        return torch.diag(lam)
    return sum(C[:, :, c] * lam[c] for c in range(lam.shape[0]))


def hand_delta_w(site, kind):
    """Delta W in float64: block (o, i) (rows o*w.., cols i*w..) is V M_oi^T U."""
    U, V = site.U.detach().double(), site.V.detach().double()
    C = None if site.C is None else site.C.detach().double()
    lam = site.lam.detach().double()
    w = U.shape[1]
    dw = torch.zeros(site.out_features, site.in_features, dtype=F64)
    for o in range(site.n_out):
        for i in range(site.n_in):
            dw[o * w:(o + 1) * w, i * w:(i + 1) * w] = V @ hand_core(C, lam[o, i], kind).T @ U
    return dw


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", ["tucker", "cp"])
def test_cp_site_forward_is_frozen_linear_plus_mode_approximation(kind, dtype):
    bases = [nn.Linear(32, 32, dtype=dtype) for _ in range(3)]
    cp = cp_adapter(bases, rank=8, core=kind).eval()
    if kind == "cp":
        assert cp.C is None and cp[0].C is None, "core='cp' must have no core tensor C"
    x = torch.randn(2, 33, 32, dtype=dtype)
    for k in range(3):
        site = cp[k]
        U, V = cp.U.detach().double(), cp.V.detach().double()
        C = None if cp.C is None else cp.C.detach().double()
        Mk = hand_core(C, site.lam.detach().double()[0, 0], kind)
        if kind == "tucker":
            assert_close_rel(reference.tucker_core(C, site.lam.detach().double()[0, 0]), Mk, F64,
                             "reference.tucker_core vs sum_c C[:, :, c] lambda[c]")
        xd = x.double().reshape(-1, 32)
        want = (xd @ bases[k].weight.double().T + bases[k].bias.double() + (xd @ U.T @ Mk) @ V.T)
        assert_close_rel(site(x), want.reshape(2, 33, 32), dtype,
                         f"CPAdapter[{k}] ({kind}) vs x W^T + b + (x U^T M_k) V^T")


@pytest.mark.parametrize("kind", ["tucker", "cp"])
def test_cp_gradients_accumulate_over_sites_and_match_aurora_formulas(kind):
    bases = [nn.Linear(16, 16, dtype=F64) for _ in range(2)]
    cp = cp_adapter(bases, rank=6, core=kind).eval()
    xs = [torch.randn(40, 16, dtype=F64), torch.randn(23, 16, dtype=F64)]
    gs = [torch.randn(40, 16, dtype=F64), torch.randn(23, 16, dtype=F64)]
    shared = [p for p in (cp.U, cp.V, cp.C) if p is not None]

    def grads_of(sites):
        cp.zero_grad(set_to_none=True)
        sum((cp[k](xs[k]) * gs[k]).sum() for k in sites).backward()
        return ([p.grad.clone() for p in shared],
                [None if cp[k].lam.grad is None else cp[k].lam.grad.clone() for k in range(2)])

    both, lam_both = grads_of([0, 1])
    only0, lam0 = grads_of([0])
    only1, lam1 = grads_of([1])
    for name, gb, g0, g1 in zip(["U", "V", "C"], both, only0, only1):
        assert_close_rel(gb, g0 + g1, F64, f"d{name} of site0+site1 vs sum of per-site d{name}")
    assert lam0[1] is None and lam1[0] is None, "a site's lambda got a gradient from another site"

    # Explicit formulas (REFERENCE-SEMANTICS 3.4, no dropout).
    U, V = cp.U.detach(), cp.V.detach()
    C = None if cp.C is None else cp.C.detach()
    dU = torch.zeros_like(U)
    dV = torch.zeros_like(V)
    dC = None if C is None else torch.zeros_like(C)
    for k in range(2):
        lam = cp[k].lam.detach()[0, 0]
        Mk = hand_core(C, lam, kind)
        u = xs[k] @ U.T
        z = u @ Mk
        dV += gs[k].T @ z
        dz = gs[k] @ V
        dM = u.T @ dz
        du = dz @ Mk.T
        dU += du.T @ xs[k]
        if kind == "tucker":
            dlam = torch.einsum("abc,ab->c", C, dM)
            dC += dM[:, :, None] * lam[None, None, :]
        else:
            dlam = torch.diagonal(dM)
        got = lam_both[k][0, 0]
        assert_close_rel(got, dlam, F64, f"site {k} dlambda vs sum_ab C[a,b,c] dM_k[a,b] ({kind})")
    assert_close_rel(both[0], dU, F64, "dU vs sum over sites of du_k^T x_k")
    assert_close_rel(both[1], dV, F64, "dV vs sum over sites of g_k^T z_k")
    if kind == "tucker":
        assert_close_rel(both[2], dC, F64, "dC vs sum over sites of dM_k (x) lambda_k")


@pytest.mark.parametrize("kind", ["tucker", "cp"])
@pytest.mark.parametrize("d_in,d_out", [(16, 64), (64, 16), (32, 48)])
def test_cp_wide_sites_block_delta_w(d_in, d_out, kind):
    bases = [nn.Linear(d_in, d_out, dtype=F64), nn.Linear(16, 16, dtype=F64)]
    cp = cp_adapter(bases, rank=5, core=kind).eval()
    assert cp.width == 16, f"CPAdapter width {cp.width} != 16 (smallest feature size)"
    site = cp[0]
    assert (site.n_out, site.n_in) == (d_out // 16, d_in // 16), \
        f"blocks {(site.n_out, site.n_in)} != ({d_out // 16}, {d_in // 16})"
    assert site.lam.shape == (d_out // 16, d_in // 16, 5), f"lambda shape {tuple(site.lam.shape)}"
    dw = hand_delta_w(site, kind)
    x = torch.randn(37, d_in, dtype=F64)
    want = x @ (bases[0].weight.double() + dw).T + bases[0].bias.double()
    assert_close_rel(site(x), want, F64,
                     f"wide site {d_in}->{d_out} ({kind}) vs x (W + Delta W)^T + b, "
                     "Delta W block (o, i) = V M_oi^T U")
    a, k, b = site.factors()
    assert_close_rel(b @ k.T @ a, dw, F64, "CPLinear.factors(): B K^T A vs hand-built Delta W")


def hand_wide_dropout(site, x, D, after, kind):
    """Block form of one site with dropout: u_i = x_i U^T for each input block i;
    before: u_i <- D_i * u_i; z_o = sum_i u_i M_oi; after: z_o <- D_o * z_o; y_o = z_o V^T."""
    U, V = site.U.detach().double(), site.V.detach().double()
    C = None if site.C is None else site.C.detach().double()
    lam = site.lam.detach().double()
    w, R = U.shape[1], U.shape[0]
    us = [x[:, i * w:(i + 1) * w] @ U.T for i in range(site.n_in)]
    if not after:
        us = [u * D[:, i * R:(i + 1) * R] for i, u in enumerate(us)]
    out = []
    for o in range(site.n_out):
        z = sum(us[i] @ hand_core(C, lam[o, i], kind) for i in range(site.n_in))
        if after:
            z = z * D[:, o * R:(o + 1) * R]
        out.append(z @ V.T)
    return x @ site.base.weight.double().T + site.base.bias.double() + torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["tucker", "cp"])
@pytest.mark.parametrize("position", ["after_core", "before_core"])
@pytest.mark.parametrize("d_in,d_out", [(16, 16), (16, 64), (64, 16)])
def test_cp_dropout_position_with_fixed_seed(d_in, d_out, position, kind):
    bases = [nn.Linear(d_in, d_out, dtype=F64)]
    cp = cp_adapter(bases, rank=4, core=kind, dropout=0.3, position=position, width=16)
    site = cp[0]
    after = position == "after_core"
    R = 4
    cols = (site.n_out if after else site.n_in) * R
    x = torch.randn(50, d_in, dtype=F64)
    # Op level with the fixed seed.
    a, k, b = site.factors()
    y = ops.lowrank_linear(x, site.base.weight, site.base.bias, a, k, b, scale=1.0, dropout_p=0.3,
                           seed=SEED, dropout_after_core=after)
    want = hand_wide_dropout(site, x, mask(50, cols, 0.3), after, kind)
    assert_close_rel(y, want, F64, f"lowrank_linear on CPLinear.factors(), dropout {position}, "
                                   f"{d_in}->{d_out} ({kind}) vs block formula")
    # Module level (training): the module passes its dropout and position to the op.
    state = torch.get_rng_state()
    y_mod = site(x)
    seed = replay_seed(state)
    want_mod = hand_wide_dropout(site, x, mask(50, cols, 0.3, seed=seed), after, kind)
    assert_close_rel(y_mod, want_mod, F64,
                     f"CPLinear training forward with dropout {position} vs block formula")
    if kind == "tucker" or (site.n_in, site.n_out) != (1, 1):
        # (A diagonal core on a single block commutes with the mask: both orderings coincide.)
        other = hand_wide_dropout(site, x, mask(50, (site.n_in if after else site.n_out) * R, 0.3,
                                                seed=seed), not after, kind)
        assert rel_err(y_mod, other) > 1e-3, \
            f"CPLinear dropout {position}: output matches the other ordering"


def test_cp_shared_factors_are_one_parameter_each():
    bases = [nn.Linear(16, 16), nn.Linear(16, 64), nn.Linear(64, 16)]
    cp = pyadapt.CPAdapter(bases, rank=8)
    for k in range(len(cp)):
        assert cp[k].U is cp.U and cp[k].V is cp.V and cp[k].C is cp.C, \
            f"site {k}: U, V, C must be the adapter's own Parameter objects"
        assert cp[k].base is bases[k], f"site {k}: base is not bases[{k}]"
        assert not bases[k].weight.requires_grad, f"bases[{k}].weight must be frozen"
    params = list(cp.parameters())
    ids = [id(p) for p in params]
    assert len(ids) == len(set(ids)), "cp.parameters() lists a parameter twice"
    for name, p in [("U", cp.U), ("V", cp.V), ("C", cp.C)]:
        assert ids.count(id(p)) == 1, f"{name} must appear exactly once in cp.parameters()"
    trainable = [p for p in params if p.requires_grad]
    assert len(trainable) == 3 + len(bases), \
        f"trainable cp.parameters(): expected U, V, C + one lambda per site, got {len(trainable)}"
    assert len(params) == len(trainable) + 2 * len(bases), \
        "cp.parameters(): expected the trainable ones plus each base's frozen weight and bias"
    assert torch.equal(cp.V, torch.zeros_like(cp.V)), "V must be zero-initialised"
    cp_cp = pyadapt.CPAdapter([nn.Linear(16, 16)], rank=8, core="cp")
    assert cp_cp.C is None and len([p for p in cp_cp.parameters() if p.requires_grad]) == 3, \
        "core='cp': expected parameters U, V, lambda only (C is None)"


# ----------------------------------------------------------------------------------------------
# 5. Gated query transformation and informative context enhancement
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 24), (2, 9, 24)])
def test_gated_query_value_and_gradients(shape, dtype):
    gq = pyadapt.GatedQueryTransform(24, dtype=dtype)
    with torch.no_grad():  # init is normal(0, 2e-4): use values of order 1 to see errors
        gq.gamma.normal_()
        gq.beta.normal_()
    a = torch.randn(*shape, dtype=dtype, requires_grad=True)
    r = gq(a)
    gamma, beta = gq.gamma.detach().double(), gq.beta.detach().double()
    ad = a.detach().double()
    assert_close_rel(r, 0.1 * (ad * gamma + beta), dtype, "GatedQueryTransform vs 0.1 (a gamma + beta)")
    g = torch.randn_like(r)
    r.backward(g)
    gd = g.double().reshape(-1, 24)
    assert_close_rel(gq.gamma.grad, 0.1 * (gd * ad.reshape(-1, 24)).sum(0), dtype,
                     "dgamma vs 0.1 sum g*a")
    assert_close_rel(gq.beta.grad, 0.1 * gd.sum(0), dtype, "dbeta vs 0.1 sum g")
    assert_close_rel(a.grad, 0.1 * g.double() * gamma, dtype, "da vs 0.1 g*gamma")


def test_gated_query_init_scale():
    gq = pyadapt.GatedQueryTransform(4096)
    for name, p in [("gamma", gq.gamma), ("beta", gq.beta)]:
        std = p.detach().std().item()
        assert 1.5e-4 < std < 2.5e-4, f"{name} init std {std:.2e}, expected about 2e-4"


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_context_enhancement_adds_tenth_of_text_cls_mean(dtype):
    ce = pyadapt.ContextEnhancement()
    cls = torch.randn(5, 32, dtype=dtype, requires_grad=True)
    text = torch.randn(9, 32, dtype=dtype, requires_grad=True)
    out = ce(cls, text)
    want = cls.detach().double() + 0.1 * text.detach().double().mean(0)
    assert_close_rel(out, want, dtype, "ContextEnhancement vs cls + 0.1 * mean(text_cls)")
    g = torch.randn_like(out)
    out.backward(g)
    assert_close_rel(cls.grad, g, dtype, "ContextEnhancement d cls vs g")
    assert_close_rel(text.grad, (0.1 / 9) * g.double().sum(0).expand(9, 32), dtype,
                     "ContextEnhancement d text_cls vs 0.1/B_text * sum_rows g")


# ----------------------------------------------------------------------------------------------
# 6. gradcheck and opcheck of the custom ops
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["after_core", "before_core", "no_core_no_bias"])
def test_gradcheck_lowrank_linear(variant, backend):
    core = variant != "no_core_no_bias"
    x, W, b, A, K, B = make(9, 6, 5, 3, 4, bias=core, core=core)
    args = tuple(None if t is None else t.requires_grad_() for t in (x, W, b, A, K, B))

    def fn(*a):
        return ops.lowrank_linear(*a, scale=0.8, dropout_p=0.3, seed=SEED,
                                  dropout_after_core=variant != "before_core")

    with pyadapt.use_backend(backend):
        assert torch.autograd.gradcheck(fn, args), f"gradcheck of lowrank_linear ({variant}, {backend})"


@pytest.mark.parametrize("variant", ["core_bias_dropout_after", "core_dropout_before",
                                     "no_core_no_bias"])
def test_opcheck_lowrank_ops(variant):
    core = variant != "no_core_no_bias"
    x, W, b, A, K, B = make(9, 6, 5, 3, 4, bias=variant == "core_bias_dropout_after", core=core)
    after = variant != "core_dropout_before"
    seed, p = (SEED, 0.3) if core else (None, 0.0)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, W, b, A, K, B)]
    torch.library.opcheck(torch.ops.pyadapt.lowrank_forward.default,
                          (*leaves, 0.8, seed, p, after))
    g = torch.randn(9, 5, dtype=F64)
    needs = [True, False, True, True, True, True]
    torch.library.opcheck(torch.ops.pyadapt.lowrank_backward.default,
                          (g, x, W, b, A, K, B, 0.8, seed, p, after, needs))
    out = torch.ops.pyadapt.lowrank_backward(g, x, W, b, A, K, B, 0.8, seed, p, after, needs)
    assert len(out) == 6, f"lowrank_backward returned {len(out)} tensors, expected 6"
    assert out[1].numel() == 0, "lowrank_backward: dW not needed, expected an empty placeholder"
    want = reference.lowrank_linear_backward(g, x, W, b, A, K, B, scale=0.8, dropout_p=p,
                                             seed=seed, dropout_after_core=after)
    for i, name in [(0, "dx"), (3, "dA"), (5, "dB")]:
        assert_close_rel(out[i], want[i], F64, f"torch.ops.pyadapt.lowrank_backward {name} vs reference")


# ----------------------------------------------------------------------------------------------
# 7. Low precision against the float64 reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,after", [((64, 100, 96, 32, 16), True),
                                         ((65, 128, 64, 7, 7), False),
                                         ((1000, 64, 64, 32, 32), True)],
                         ids=["64x100x96x32x16-after", "65x128x64x7x7-before",
                              "1000x64x64x32x32-after"])
def test_lowrank_linear_low_precision_vs_float64(shape, after, dtype, backend):
    M, d_out = shape[0], shape[2]
    low = [t.to(dtype) for t in make(*shape)]
    ref_in = [t.double() for t in low]  # the same (rounded) inputs in float64
    kw = dict(scale=0.5, dropout_p=0.1, seed=SEED, dropout_after_core=after)
    g = torch.randn(M, d_out, dtype=F64)
    ref_y = reference.lowrank_linear_forward(*ref_in, **kw)
    ref_g = reference.lowrank_linear_backward(g, *ref_in, **kw)
    base_in = [t.clone().requires_grad_() for t in low]  # eager PyTorch in the low dtype
    base_y = reference.lowrank_linear_forward(*base_in, **kw)
    base_g = torch.autograd.grad(base_y, base_in, g.to(dtype))
    leaves = [t.clone().requires_grad_() for t in low]
    with pyadapt.use_backend(backend):
        y = ops.lowrank_linear(*leaves, **kw)
        got_g = torch.autograd.grad(y, leaves, g.to(dtype))
    assert y.dtype == dtype, f"lowrank_linear output dtype {y.dtype} != {dtype}"
    assert_close_rel(y, ref_y, dtype, f"lowrank_linear y ({dtype}, {backend}) vs float64", base_y)
    for name, gg, rg, bg in zip(["dx", "dW", "db", "dA", "dK", "dB"], got_g, ref_g, base_g):
        assert gg.dtype == dtype, f"{name} dtype {gg.dtype} != {dtype}"
        assert_close_rel(gg, rg, dtype, f"lowrank_linear {name} ({dtype}, {backend}) vs float64", bg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowrank_adapter_low_precision_module_and_autocast(dtype):
    m = lora(64, 96, 16, dtype=torch.float32)
    x = torch.randn(4, 33, 64)
    want = lora_hand(m, x.to(dtype).float())
    m_low = lora(64, 96, 16, dtype=torch.float32)
    m_low.load_state_dict(m.state_dict())
    m_low.to(dtype)
    want_low = lora_hand(m_low, x.to(dtype))  # float64 on the rounded weights and inputs
    y_low = m_low(x.to(dtype))
    assert y_low.dtype == dtype, f"LowRankAdapter in {dtype}: output dtype {y_low.dtype}"
    assert_close_rel(y_low, want_low, dtype, f"LowRankAdapter in {dtype} vs float64 formula")
    with torch.autocast("cpu", dtype=dtype):
        y_ac = m(x)
    assert y_ac.dtype == dtype, f"LowRankAdapter under autocast({dtype}): output dtype {y_ac.dtype}"
    assert_close_rel(y_ac, want, dtype, f"LowRankAdapter under autocast({dtype}) vs float64 formula")


# ----------------------------------------------------------------------------------------------
# 8. Bad input: error type and a message naming the argument
# ----------------------------------------------------------------------------------------------

def test_lowrank_adapter_bad_input():
    m = lora(16, 24, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^x: expected last dimension 16"):
        m(torch.randn(3, 15))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor"):
        m(torch.ones(3, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
        m(torch.randn(3, 16, dtype=F64))
    with pytest.raises(ValueError, match=r"^rank: "):
        pyadapt.LowRankAdapter(nn.Linear(16, 24), rank=0)
    with pytest.raises(ValueError, match=r"^rank: .*16"):
        pyadapt.LowRankAdapter(nn.Linear(16, 24), rank=17)
    with pytest.raises(ValueError, match=r"^rank: .*8"):
        pyadapt.LowRankAdapter(nn.Linear(24, 8), rank=9)
    with pytest.raises(TypeError, match=r"^base: expected an nn.Linear"):
        pyadapt.LowRankAdapter(nn.Conv1d(16, 24, 1), rank=4)
    with pytest.raises(ValueError, match=r"^dropout: "):
        pyadapt.LowRankAdapter(nn.Linear(16, 24), rank=4, dropout=1.0)


def test_cp_adapter_bad_input():
    with pytest.raises(ValueError, match=r"^bases: "):
        pyadapt.CPAdapter([], rank=4)
    with pytest.raises(TypeError, match=r"^bases\[1\]: expected an nn.Linear"):
        pyadapt.CPAdapter([nn.Linear(16, 16), nn.Identity()], rank=4)
    with pytest.raises(ValueError, match=r"^bases\[1\]: .*multiples of width=16"):
        pyadapt.CPAdapter([nn.Linear(16, 16), nn.Linear(16, 40)], rank=4)
    with pytest.raises(ValueError, match=r"^bases\[0\]: .*multiples of width=16"):
        pyadapt.CPAdapter([nn.Linear(24, 32)], rank=4, width=16)
    with pytest.raises(ValueError, match=r"^rank: .*16"):
        pyadapt.CPAdapter([nn.Linear(16, 32)], rank=17)
    with pytest.raises(ValueError, match=r"^rank: "):
        pyadapt.CPAdapter([nn.Linear(16, 32)], rank=0)
    with pytest.raises(ValueError, match=r"^core: .*'svd'"):
        pyadapt.CPAdapter([nn.Linear(16, 16)], rank=4, core="svd")
    with pytest.raises(ValueError, match=r"^dropout_position: .*'middle'"):
        pyadapt.CPAdapter([nn.Linear(16, 16)], rank=4, dropout_position="middle")
    with pytest.raises(ValueError, match=r"^dropout: "):
        pyadapt.CPAdapter([nn.Linear(16, 16)], rank=4, dropout=1.0)
    cp = pyadapt.CPAdapter([nn.Linear(16, 32)], rank=4)
    with pytest.raises(ValueError, match=r"^x: expected last dimension 16"):
        cp[0](torch.randn(2, 32))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor"):
        cp[0](torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^x: expected dtype torch.float32"):
        cp[0](torch.randn(2, 16, dtype=F64))


def test_aurora_small_modules_bad_input():
    with pytest.raises(ValueError, match=r"^a: expected last dimension 8"):
        pyadapt.GatedQueryTransform(8)(torch.randn(3, 7))
    with pytest.raises(TypeError, match=r"^a: expected a floating-point tensor"):
        pyadapt.GatedQueryTransform(8)(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^text_cls: expected last dimension 8"):
        pyadapt.ContextEnhancement()(torch.randn(2, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"^cls_positive: expected 2 dimensions"):
        pyadapt.ContextEnhancement()(torch.randn(8), torch.randn(4, 8))


def test_lowrank_linear_op_bad_input():
    x, W, b, A, K, B = make(5, 6, 7, 3, 4)
    with pytest.raises(ValueError, match=r"^core: expected shape \(3, 4\) .*got \(2, 4\)"):
        ops.lowrank_linear(x, W, b, A, K[:2], B)
    with pytest.raises(ValueError, match=r"^core: expected 2 dimensions"):
        ops.lowrank_linear(x, W, b, A, K[None], B)
    with pytest.raises(ValueError, match=r"^up: expected shape \(7, 4\)"):
        ops.lowrank_linear(x, W, b, A, K, B[:, :3])
    with pytest.raises(ValueError, match=r"^down: expected shape \(3, 6\)"):
        ops.lowrank_linear(x, W, b, A[:, :5], K, B)
    with pytest.raises(ValueError, match=r"^base.weight: expected shape \(7, 6\)"):
        ops.lowrank_linear(x, W[:, :5], b, A, K, B)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor"):
        ops.lowrank_linear(x.long(), W, b, A, K, B)
    with pytest.raises(TypeError, match=r"^core: expected dtype torch.float64"):
        ops.lowrank_linear(x, W, b, A, K.float(), B)
    with pytest.raises(ValueError, match=r"^dropout: "):
        ops.lowrank_linear(x, W, b, A, K, B, dropout_p=1.0)
    with pytest.raises(TypeError, match=r"^seed: "):
        ops.lowrank_linear(x, W, b, A, K, B, dropout_p=0.1, seed=torch.tensor(7.0))


@pytest.mark.parametrize("seed", [-1, 2**31, 2**40])
def test_lowrank_linear_rejects_seed_outside_philox_range(seed):
    """Seeds must lie in [0, 2**31) (reference.py: so every backend, whatever integer type it
    loads the seed as, keys Philox identically); the seed error message promises that range.
    Out-of-range seeds change the reference mask through the key's high word, so accepting them
    silently lets backends disagree."""
    x, W, b, A, K, B = make(4, 6, 5, 3, 3)
    with pytest.raises(ValueError, match=r"^seed: "):
        ops.lowrank_linear(x, W, b, A, K, B, dropout_p=0.5, seed=torch.tensor(seed))


def test_reference_backward_skips_the_frozen_base_gradients_it_is_not_asked_for():
    """needs = [x, W, b, A, K, B]: a frozen base costs no dW = g^T x GEMM; the rest is unchanged."""
    x, W, b = torch.randn(9, 12, dtype=F64), torch.randn(10, 12, dtype=F64), torch.randn(10, dtype=F64)
    A, K, B = torch.randn(4, 12, dtype=F64), torch.randn(4, 5, dtype=F64), torch.randn(10, 5, dtype=F64)
    g = torch.randn(9, 10, dtype=F64)
    kw = dict(scale=0.7, dropout_p=0.0, seed=None, dropout_after_core=True)
    full = reference.lowrank_linear_backward(g, x, W, b, A, K, B, **kw)
    lean = reference.lowrank_linear_backward(g, x, W, b, A, K, B, needs=[True, False, False,
                                                                          True, True, True], **kw)
    assert lean[1] is None and lean[2] is None, "dW/db computed although not needed"
    for i in (0, 3, 4, 5):
        assert torch.equal(lean[i], full[i]), f"gradient {i} changed when dW/db are skipped"
