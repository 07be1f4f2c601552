"""MPM-NCE loss (DESIGN.md 7.4, REFERENCE-SEMANTICS 2.7): reference, custom ops, MPMNCELoss.

Formulas checked, with I, T the L2-normalised (N x D) features, lambda = 1 / temperature the logit
scale, P_ij = [y_i = y_j], n_i = sum_j P_ij, margin delta, label smoothing eps:
  A_ij = lambda <I_i, T_j> + lambda delta (1 - P_ij);   B_ij = lambda <T_i, I_j> + lambda delta (1 - P_ij)
  q_ij = (1 - eps) P_ij / n_i + eps (1 - P_ij) / (N - n_i);  a row with n_i = N: q_ij = P_ij / n_i
  loss = 1/2 [ mean_i sum_j q_ij (-log_softmax_j A_ij) + mean_i sum_j q_ij (-log_softmax_j B_ij) ]
Gradient: dL/dA_ij = (softmax_j(A_i) - q_ij) / (2N), the same for B, then
  dI = lambda [dA T + dB^T T],  dT = lambda [dA^T I + dB I]   (times the incoming grad_loss).
positives=None is CLIP's InfoNCE (P = identity); with delta = eps = 0 it is
  1/2 [CE(lambda I T^T, arange) + CE(lambda T I^T, arange)].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pyadapt
from pyadapt import ops, reference
from conftest import assert_close_rel, rel_err

F64 = torch.float64
CPU_BACKENDS = [b for b in ("cpu", "reference") if b in pyadapt.available_backends()]

# (N, D): batch and feature width; N = 1 has a single positive and no negative.
SHAPES = [(1, 8), (6, 8), (64, 100), (65, 32)]
# (margin, label_smoothing, logit_scale): ImageNet, retrieval, base-to-novel recipes and extremes.
RECIPES = [(0.05, 0.02, 100.0), (0.05, 0.0, 100.0), (0.1, 0.0, 100.0), (0.0, 0.0, 10.0),
           (0.3, 0.2, 7.0)]


def unit(n, d, dtype=F64):
    return F.normalize(torch.randn(n, d, dtype=F64), dim=-1).to(dtype)


def labels_with_repeats(n):
    """Random class labels with repeated classes (about n/3 classes) and a forced repeat."""
    y = torch.randint(0, max(1, n // 3), (n,))
    if n >= 3:
        y[2] = y[0]
    return y


def positives_of(y):
    return y[:, None] == y[None, :]


# ----------------------------------------------------------------------------------------------
# Hand-written mathematics (float64), independent of pyadapt.reference
# ----------------------------------------------------------------------------------------------

def hand_q(P, eps):
    """q_ij of DESIGN 7.4 element by element (P a nested list of bools)."""
    N = len(P)
    q = []
    for i in range(N):
        n_i = sum(P[i])
        row = []
        for j in range(N):
            if n_i == N:  # no negatives: the positives take all the mass
                row.append(P[i][j] / n_i)
            else:
                row.append((1 - eps) * P[i][j] / n_i + eps * (1 - P[i][j]) / (N - n_i))
        q.append(row)
    return q


def hand_loss_loops(I, T, P, lam, delta, eps):
    """Double loop over i, j in Python floats of the DESIGN 7.4 loss."""
    I, T, P = I.tolist(), T.tolist(), P.tolist()
    N = len(I)
    q = hand_q(P, eps)
    total = 0.0
    for X, Y in ((I, T), (T, I)):
        acc = 0.0
        for i in range(N):
            logits = [lam * sum(a * b for a, b in zip(X[i], Y[j])) + lam * delta * (1 - P[i][j])
                      for j in range(N)]
            top = max(logits)
            lse = top + math.log(sum(math.exp(v - top) for v in logits))
            acc += sum(q[i][j] * (lse - logits[j]) for j in range(N))
        total += acc / N
    return 0.5 * total


def hand_loss_torch(I, T, P, lam, delta, eps):
    """The same loss vectorised (logsumexp form), differentiable, for autograd comparisons."""
    q = torch.tensor(hand_q(P.tolist(), eps), dtype=I.dtype)
    pen = lam * delta * (1.0 - P.to(I.dtype))
    out = 0.0
    for logits in (lam * I @ T.T + pen, lam * T @ I.T + pen):
        nll = torch.logsumexp(logits, dim=1, keepdim=True) - logits
        out = out + (q * nll).sum(1).mean()
    return 0.5 * out


def explicit_grads(I, T, P, lam, delta, eps, grad_loss=1.0):
    """REFERENCE-SEMANTICS 2.7: dA = (softmax(A) - q)/(2N); dI = lam(dA T + dB^T T), dT = lam(dA^T I + dB I)."""
    N = I.shape[0]
    q = torch.tensor(hand_q(P.tolist(), eps), dtype=I.dtype)
    pen = lam * delta * (1.0 - P.to(I.dtype))
    dA = (torch.softmax(lam * I @ T.T + pen, 1) - q) / (2 * N) * grad_loss
    dB = (torch.softmax(lam * T @ I.T + pen, 1) - q) / (2 * N) * grad_loss
    return lam * (dA @ T + dB.T @ T), lam * (dA.T @ I + dB @ I)


# ----------------------------------------------------------------------------------------------
# 1. targets and forward vs the double loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.02, 0.3])
@pytest.mark.parametrize("n", [1, 6, 65])
def test_targets_match_formula_and_rows_sum_to_one(n, eps):
    P = positives_of(labels_with_repeats(n))
    q = reference.mpm_nce_targets(P, eps, F64)
    assert_close_rel(q, torch.tensor(hand_q(P.tolist(), eps), dtype=F64), F64,
                     "mpm_nce_targets vs (1-eps) P/n_i + eps (1-P)/(N-n_i)")
    assert_close_rel(q.sum(1), torch.ones(n, dtype=F64), F64, "rows of q sum to 1")
    assert (q >= 0).all(), "q must be non-negative"


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.3])
def test_row_without_negatives_gives_positives_all_the_mass(eps):
    P = positives_of(torch.tensor([0, 1, 0, 2, 1, 0]))
    P[3] = True  # row 3 is positive with the whole batch: no negatives
    q = reference.mpm_nce_targets(P, eps, F64)
    assert_close_rel(q[3], torch.full((6,), 1 / 6, dtype=F64), F64,
                     "row without negatives: q = 1/N on every positive, nothing lost to eps")
    assert_close_rel(q.sum(1), torch.ones(6, dtype=F64), F64, "rows of q sum to 1")
    I, T = unit(6, 8), unit(6, 8)
    got = reference.mpm_nce_forward(I, T, P, logit_scale=100.0, margin=0.05, label_smoothing=eps)
    want = hand_loss_loops(I, T, P, 100.0, 0.05, eps)
    assert abs(got.item() - want) <= 1e-12 * abs(want), \
        f"loss with a no-negative row: reference {got.item()} vs double loop {want}"
    same = torch.ones(6, 6, dtype=torch.bool)  # one class for the whole batch
    got = reference.mpm_nce_forward(I, T, same, logit_scale=100.0, margin=0.05, label_smoothing=eps)
    logits = 100.0 * I @ T.T
    want = -0.5 * (torch.log_softmax(logits, 1).mean() + torch.log_softmax(logits.T, 1).mean())
    assert_close_rel(got, want, F64, "single-class batch: loss = mean over all pairs of -log_softmax")
    assert torch.isfinite(got), "single-class batch gave a non-finite loss"


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"m{r[0]}-eps{r[1]}-s{r[2]}")
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"N{s[0]}xD{s[1]}")
def test_reference_forward_matches_double_loop(shape, recipe, dtype):
    (n, d), (margin, eps, lam) = shape, recipe
    I, T = unit(n, d), unit(n, d)
    P = positives_of(labels_with_repeats(n))
    want = torch.tensor(hand_loss_loops(I, T, P, lam, margin, eps), dtype=F64)
    got = reference.mpm_nce_forward(I.to(dtype), T.to(dtype), P, logit_scale=lam, margin=margin,
                                    label_smoothing=eps)
    assert got.dtype == dtype and got.dim() == 0, f"loss: expected a {dtype} scalar, got {got.dtype} {tuple(got.shape)}"
    assert_close_rel(got, want, dtype, "reference.mpm_nce_forward vs double loop over i, j")
    got_op = ops.mpm_nce(I.to(dtype), T.to(dtype), P, logit_scale=lam, margin=margin,
                         label_smoothing=eps)
    assert_close_rel(got_op, want, dtype, "ops.mpm_nce vs double loop over i, j")


def test_margin_penalises_negatives_only_and_both_directions_count():
    I, T = unit(6, 8), unit(6, 8)
    P = positives_of(torch.tensor([0, 1, 0, 2, 1, 0]))
    base = reference.mpm_nce_forward(I, T, P, logit_scale=100.0)
    with_margin = reference.mpm_nce_forward(I, T, P, logit_scale=100.0, margin=0.1)
    assert with_margin > base, "a positive margin on negatives must raise the loss"
    # Shifting positive logits instead leaves a different value: the margin is on negatives.
    swapped = reference.mpm_nce_forward(I, T, ~P, logit_scale=100.0, margin=0.1)
    assert rel_err(swapped, with_margin) > 1e-3, "margin must depend on which pairs are positive"
    one_way = hand_loss_loops(I, T, P, 100.0, 0.0, 0.0)
    assert abs(base.item() - one_way) < 1e-12 * abs(one_way), "loss vs double loop (both directions)"
    asym = reference.mpm_nce_forward(I, T.flip(0), P, logit_scale=100.0)
    assert rel_err(asym, base) > 1e-3, "loss must depend on which text goes with which image"


# ----------------------------------------------------------------------------------------------
# 2. reference backward vs autograd and vs the explicit gradient
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"m{r[0]}-eps{r[1]}-s{r[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xD{s[1]}")
def test_reference_backward_matches_autograd_and_explicit_gradient(shape, recipe):
    (n, d), (margin, eps, lam) = shape, recipe
    I, T = unit(n, d), unit(n, d)
    P = positives_of(labels_with_repeats(n))
    grad_loss = torch.tensor(1.7, dtype=F64)
    dI, dT = reference.mpm_nce_backward(grad_loss, I, T, P, logit_scale=lam, margin=margin,
                                        label_smoothing=eps)
    Ig, Tg = I.clone().requires_grad_(), T.clone().requires_grad_()
    aI, aT = torch.autograd.grad(hand_loss_torch(Ig, Tg, P, lam, margin, eps), (Ig, Tg), grad_loss)
    rI, rT = torch.autograd.grad(reference.mpm_nce_forward(Ig, Tg, P, logit_scale=lam, margin=margin,
                                                           label_smoothing=eps), (Ig, Tg), grad_loss)
    eI, eT = explicit_grads(I, T, P, lam, margin, eps, 1.7)
    for name, got, a, r, e in [("d image", dI, aI, rI, eI), ("d text", dT, aT, rT, eT)]:
        assert_close_rel(got, a, F64, f"reference backward {name} vs autograd of the hand formula")
        assert_close_rel(got, r, F64, f"reference backward {name} vs autograd of reference forward")
        assert_close_rel(got, e, F64, f"reference backward {name} vs lambda[(softmax - q)/(2N)] form")


# ----------------------------------------------------------------------------------------------
# 3. MPMNCELoss module
# ----------------------------------------------------------------------------------------------

def loss_and_grads(loss_fn, I, T, positives=None):
    Ig, Tg = I.clone().requires_grad_(), T.clone().requires_grad_()
    loss = loss_fn(Ig, Tg, positives)
    loss.backward()
    return loss.detach(), Ig.grad, Tg.grad


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n", [6, 64])
def test_module_labels_equal_bool_matrix_and_formula(n, dtype):
    fn = pyadapt.MPMNCELoss(temperature=0.01, margin=0.05, label_smoothing=0.02)
    I, T = torch.randn(n, 16, dtype=dtype) * 3, torch.randn(n, 16, dtype=dtype) * 3  # not unit
    y = labels_with_repeats(n)
    by_labels = loss_and_grads(fn, I, T, y)
    by_matrix = loss_and_grads(fn, I, T, positives_of(y))
    for name, a, b in zip(["loss", "d image", "d text"], by_labels, by_matrix):
        assert torch.equal(a, b), f"MPMNCELoss {name}: labels (N,) vs bool (N, N) matrix differ"
    Ig, Tg = I.double().requires_grad_(), T.double().requires_grad_()
    want = hand_loss_torch(F.normalize(Ig, dim=-1), F.normalize(Tg, dim=-1), positives_of(y),
                           100.0, 0.05, 0.02)
    wI, wT = torch.autograd.grad(want, (Ig, Tg))
    assert_close_rel(by_labels[0], want, dtype, "MPMNCELoss vs formula on L2-normalised features")
    assert_close_rel(by_labels[1], wI, dtype, "MPMNCELoss d image vs autograd of formula with normalize")
    assert_close_rel(by_labels[2], wT, dtype, "MPMNCELoss d text vs autograd of formula with normalize")


@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
@pytest.mark.parametrize("n", [1, 6, 65])
def test_module_without_positives_is_clip_infonce(n, temperature):
    fn = pyadapt.MPMNCELoss(temperature=temperature, margin=0.0, label_smoothing=0.0)
    I, T = torch.randn(n, 12, dtype=F64), torch.randn(n, 12, dtype=F64)
    loss, dI, dT = loss_and_grads(fn, I, T, None)
    Ig, Tg = I.clone().requires_grad_(), T.clone().requires_grad_()
    logits = F.normalize(Ig, dim=-1) @ F.normalize(Tg, dim=-1).T / temperature
    target = torch.arange(n)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    cI, cT = torch.autograd.grad(clip, (Ig, Tg))
    assert_close_rel(loss, clip, F64, "MPMNCELoss(positives=None, margin 0, eps 0) vs CLIP InfoNCE")
    assert_close_rel(dI, cI, F64, "d image: MPMNCELoss(positives=None) vs CLIP InfoNCE")
    assert_close_rel(dT, cT, F64, "d text: MPMNCELoss(positives=None) vs CLIP InfoNCE")
    # With its defaults (margin, smoothing) positives=None means the identity matrix.
    fd = pyadapt.MPMNCELoss(temperature=temperature)
    eye = torch.eye(n, dtype=torch.bool)
    assert torch.equal(fd(I, T), fd(I, T, eye)), "positives=None vs explicit identity matrix"


def test_module_normalize_on_unit_vectors():
    """Re-normalising unit vectors leaves the loss unchanged; the gradient of the normalised loss
    is the tangential part of the plain one, g - x <x, g> (the loss of x/|x| is scale-invariant),
    so it equals the plain gradient only after projecting the radial component away."""
    n = 12
    I, T = unit(n, 16), unit(n, 16)
    y = labels_with_repeats(n)
    on = loss_and_grads(pyadapt.MPMNCELoss(normalize=True), I, T, y)
    off = loss_and_grads(pyadapt.MPMNCELoss(normalize=False), I, T, y)
    assert abs(on[0].item() - off[0].item()) <= 1e-12 * abs(off[0].item()), \
        f"normalize=True on unit vectors changed the loss: {on[0].item()} vs {off[0].item()}"
    for name, x, g_on, g_off in [("d image", I, on[1], off[1]), ("d text", T, on[2], off[2])]:
        tangential = g_off - x * (x * g_off).sum(-1, keepdim=True)
        assert rel_err(g_on, tangential) <= 1e-12, \
            f"{name}: normalize=True gradient vs tangential part of the normalize=False gradient"
        assert rel_err(g_on - (x * g_on).sum(-1, keepdim=True) * x, g_on) <= 1e-12, \
            f"{name}: normalize=True gradient must be orthogonal to each unit feature"


@pytest.mark.parametrize("eps", [0.0, 0.02])
def test_huge_logit_gaps_stay_finite_where_naive_softmax_fails(eps):
    n = 8
    I, T = unit(n, 4), unit(n, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    P = positives_of(y)
    lam = 1e4  # temperature 1e-4: |logit| up to 1e4, gaps far beyond exp's range
    logits = lam * I @ T.T
    assert (logits.max(1).values - logits.min(1).values).max() > 800, "test data: logit gap too small"
    # The official formulation: -log of an explicit softmax.
    q = reference.mpm_nce_targets(P, eps, F64)
    naive = 0.5 * sum(-(q * torch.log(torch.softmax(a, 1))).sum(1).mean() for a in (logits, logits.T))
    assert not torch.isfinite(naive), f"naive -log(softmax) was finite ({naive.item()}): test data too mild"
    fn = pyadapt.MPMNCELoss(temperature=1e-4, margin=0.0, label_smoothing=eps)
    loss, dI, dT = loss_and_grads(fn, I, T, y)
    assert torch.isfinite(loss), f"MPMNCELoss with |logit| ~ 1e4 gave {loss.item()}"
    assert torch.isfinite(dI).all() and torch.isfinite(dT).all(), "MPMNCELoss gradients not finite"
    want = hand_loss_loops(I, T, P, lam, 0.0, eps)
    assert abs(loss.item() - want) <= 1e-9 * abs(want), \
        f"MPMNCELoss at temperature 1e-4: {loss.item()} vs double loop {want}"
    for dt in (torch.float32, torch.bfloat16):
        l32, g1, g2 = loss_and_grads(fn, I.to(dt), T.to(dt), y)
        assert torch.isfinite(l32) and torch.isfinite(g1).all() and torch.isfinite(g2).all(), \
            f"MPMNCELoss in {dt} with |logit| ~ 1e4: non-finite loss or gradient"


# ----------------------------------------------------------------------------------------------
# 4. gradcheck and opcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("recipe", [(0.1, 0.1, 5.0), (0.05, 0.0, 20.0)],
                         ids=lambda r: f"m{r[0]}-eps{r[1]}-s{r[2]}")
def test_gradcheck_mpm_nce(recipe, backend):
    margin, eps, lam = recipe
    I, T = unit(7, 5).requires_grad_(), unit(7, 5).requires_grad_()
    P = positives_of(torch.tensor([0, 1, 0, 2, 1, 0, 3]))

    def fn(a, b):
        return ops.mpm_nce(a, b, P, logit_scale=lam, margin=margin, label_smoothing=eps)

    with pyadapt.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (I, T)), f"gradcheck of ops.mpm_nce {recipe} ({backend})"
        module = pyadapt.MPMNCELoss(temperature=1 / lam, margin=margin, label_smoothing=eps)
        Iraw = (torch.randn(7, 5, dtype=F64) * 2).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: module(a, b, P), (Iraw, T)), \
            f"gradcheck of MPMNCELoss with normalize ({backend})"


def test_opcheck_mpm_nce_ops():
    I, T = unit(6, 8).requires_grad_(), unit(6, 8).requires_grad_()
    P = positives_of(torch.tensor([0, 1, 0, 2, 1, 0]))
    torch.library.opcheck(torch.ops.pyadapt.mpm_nce_forward.default, (I, T, P, 100.0, 0.05, 0.02))
    g = torch.tensor(0.9, dtype=F64)
    for needs in ([True, True], [True, False]):
        torch.library.opcheck(torch.ops.pyadapt.mpm_nce_backward.default,
                              (g, I.detach(), T.detach(), P, 100.0, 0.05, 0.02, needs))
    dI, dT = torch.ops.pyadapt.mpm_nce_backward(g, I.detach(), T.detach(), P, 100.0, 0.05, 0.02,
                                                [True, False])
    eI, _ = explicit_grads(I.detach(), T.detach(), P, 100.0, 0.05, 0.02, 0.9)
    assert_close_rel(dI, eI, F64, "torch.ops.pyadapt.mpm_nce_backward d image vs explicit gradient")
    assert dT.numel() == 0, "mpm_nce_backward: d text not needed, expected an empty placeholder"


# ----------------------------------------------------------------------------------------------
# 5. float32 / bf16 / fp16 against float64
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 100), (65, 32), (512, 512)], ids=lambda s: f"N{s[0]}xD{s[1]}")
def test_mpm_nce_low_precision_vs_float64(shape, dtype, backend):
    n, d = shape
    I, T = unit(n, d, dtype), unit(n, d, dtype)
    P = positives_of(labels_with_repeats(n))
    kw = dict(logit_scale=100.0, margin=0.05, label_smoothing=0.02)
    Id, Td = I.double().requires_grad_(), T.double().requires_grad_()  # same rounded inputs
    ref = reference.mpm_nce_forward(Id, Td, P, **kw)
    rI, rT = torch.autograd.grad(ref, (Id, Td))
    Ib, Tb = I.clone().requires_grad_(), T.clone().requires_grad_()  # eager PyTorch in dtype
    base = reference.mpm_nce_forward(Ib, Tb, P, **kw)
    bI, bT = torch.autograd.grad(base, (Ib, Tb))
    Ig, Tg = I.clone().requires_grad_(), T.clone().requires_grad_()
    with pyadapt.use_backend(backend):
        loss = ops.mpm_nce(Ig, Tg, P, **kw)
        gI, gT = torch.autograd.grad(loss, (Ig, Tg))
    assert loss.dtype == dtype and gI.dtype == dtype, f"loss/grad dtype {loss.dtype}/{gI.dtype} != {dtype}"
    assert_close_rel(loss, ref, dtype, f"mpm_nce loss ({dtype}, {backend}) vs float64", base)
    assert_close_rel(gI, rI, dtype, f"mpm_nce d image ({dtype}, {backend}) vs float64", bI)
    assert_close_rel(gT, rT, dtype, f"mpm_nce d text ({dtype}, {backend}) vs float64", bT)


# ----------------------------------------------------------------------------------------------
# 6. Bad input: error type and a message naming the argument
# ----------------------------------------------------------------------------------------------

def test_module_bad_construction():
    for t in (0.0, -0.01):
        with pytest.raises(ValueError, match=r"^temperature: expected > 0"):
            pyadapt.MPMNCELoss(temperature=t)
    with pytest.raises(ValueError, match=r"^temperature: "):
        pyadapt.MPMNCELoss(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"^label_smoothing: "):
        pyadapt.MPMNCELoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"^label_smoothing: "):
        pyadapt.MPMNCELoss(label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"^margin: "):
        pyadapt.MPMNCELoss(margin=float("inf"))


def test_module_bad_call():
    fn = pyadapt.MPMNCELoss()
    I, T = torch.randn(6, 8), torch.randn(6, 8)
    with pytest.raises(TypeError, match=r"^positives: .*float"):
        fn(I, T, torch.tensor([0.0, 1, 0, 2, 1, 0]))
    with pytest.raises(TypeError, match=r"^positives: .*bool"):
        fn(I, T, torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^positives: expected shape \(6,\)"):
        fn(I, T, torch.tensor([0, 1, 0, 2, 1]))
    with pytest.raises(TypeError, match=r"^positives: expected a bool tensor"):
        fn(I, T, torch.eye(6))
    with pytest.raises(ValueError, match=r"^positives: expected shape \(6, 6\)"):
        fn(I, T, torch.eye(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^text\w*: expected shape \(6, 8\)"):
        fn(I, torch.randn(6, 7))
    with pytest.raises(ValueError, match=r"^text\w*: expected shape \(6, 8\)"):
        fn(I, torch.randn(5, 8), torch.tensor([0, 1, 0, 2, 1, 0]))
    with pytest.raises(TypeError, match=r"^image_features: expected a floating-point tensor"):
        fn(I.long(), T)
    with pytest.raises(ValueError, match=r"^text_features: expected 2 dimensions"):
        fn(I, T[None])
    with pytest.raises(TypeError, match=r"^text\w*: expected dtype torch.float32"):
        fn(I, T.double())


def test_op_bad_input():
    I, T = unit(6, 8), unit(6, 8)
    P = torch.eye(6, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"^positives: expected a bool tensor"):
        ops.mpm_nce(I, T, P.long())
    with pytest.raises(TypeError, match=r"^positives: expected a bool tensor"):
        ops.mpm_nce(I, T, P.double())
    with pytest.raises(ValueError, match=r"^text: expected shape \(6, 8\)"):
        ops.mpm_nce(I, T[:, :7], P)
    with pytest.raises(TypeError, match=r"^text: expected dtype torch.float64"):
        ops.mpm_nce(I, T.float(), P)
    with pytest.raises(ValueError, match=r"^positives: expected shape \(6, 6\)"):
        ops.mpm_nce(I, T, P[:5])
    with pytest.raises(ValueError, match=r"^logit_scale: expected > 0"):
        ops.mpm_nce(I, T, P, logit_scale=0.0)
    with pytest.raises(ValueError, match=r"^label_smoothing: "):
        ops.mpm_nce(I, T, P, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"^image: expected at least one row"):
        ops.mpm_nce(I[:0], T[:0], P[:0, :0])
