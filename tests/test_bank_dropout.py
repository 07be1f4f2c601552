"""Rank-space dropout inside the adapter-bank op (pyadapt/ops/bank.py) and its modules.

    y[m] = residual[m] + scale[a] * up_a(D[m] * act(shared_a?(act(down_a(x[m])))))   a = ids[m]
    y[m] = residual[m]                                                  ids[m] == -1
    D[m, k] = 1/(1-p) if philox_uniform(seed, m * r + k) >= p else 0

m is the row's index in the flattened batch of the bank call, never its position in its
adapter's group: D is pyadapt.reference.dropout_multiplier(seed, M, r, p), the mask the
single-adapter op draws for the same batch and seed. Checked here:
- the op's reference backend against a per-row float64 loop with D (autograd for every
  gradient), odd d and r from 1 to 128, residual or not, every activation flag;
- the cpu and triton backends (TRITON_INTERPRET=1 on CPU, M <= 64) against the reference in
  float64: forward and every gradient, buffers NaN-poisoned;
- the mask itself, bit for bit, on every backend (an identity up projection shows it as the
  exact zeros of y), and that rows with id -1 keep y = residual and their dx;
- a bank whose rows all name one adapter equals the single-adapter op with the same seed;
- M = 0; bad dropout arguments;
- AdapterBank / CPAdapterBank in training equal, row group by row group, each source module
  run on the whole batch with the same torch seed (the module draws its seed as the bank does),
  gradients included; eval applies no dropout; each training call draws a fresh mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyadapt
from pyadapt import reference
from pyadapt.bank import AdapterBank, CPAdapterBank
from pyadapt.ops import bank as bank_ops

from conftest import assert_close_rel, rel_err, require_native, require_triton

F64 = torch.float64
NAMES = ("x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight", "up_bias",
         "scale")
BACKENDS = ("reference", "cpu", "triton")


def _ready(backend: str) -> None:
    if backend == "cpu":
        require_native()
    if backend == "triton":
        require_triton()


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def make_weights(n, d, r, dtype, *, shared=True, bias=True, gen=None):
    """Random stacked weights, never zero, scaled like trained adapters."""
    def rnd(*shape, std=1.0):
        return (torch.randn(shape, generator=gen, dtype=F64) * std).to(dtype)
    return {"down_weight": rnd(n, r, d, std=d ** -0.5), "up_weight": rnd(n, d, r, std=r ** -0.5),
            "down_bias": rnd(n, r, std=0.1) if bias else None,
            "up_bias": rnd(n, d, std=0.1) if bias else None,
            "shared_weight": rnd(n, r, r, std=r ** -0.5) if shared else None,
            "shared_bias": rnd(n, r, std=0.1) if shared and bias else None,
            "scale": (torch.rand(n, generator=gen, dtype=F64) + 0.5).to(dtype)}


def with_unadapted(m, n, gen):
    ids = torch.randint(-1, n, (m,), generator=gen)
    ids[0], ids[-1] = -1, n - 1
    return ids


def run(backend, x, ids, w, p, seed, *, residual=None, activation="relu", invariant=False,
        g=None):
    """(y, {name: gradient}) of the bank op with dropout on `backend`."""
    x = x.detach().clone().requires_grad_()
    leaves = {k: None if v is None else v.detach().clone().requires_grad_()
              for k, v in w.items()}
    with pyadapt.use_backend(backend):
        y = bank_ops.bank_bottleneck(
            x, ids, leaves["down_weight"], leaves["down_bias"], leaves["up_weight"],
            leaves["up_bias"], leaves["shared_weight"], leaves["shared_bias"],
            scale=leaves["scale"], residual=residual, activation=activation,
            grad_scale_invariant=invariant, dropout_p=p, seed=seed)
        grads = {}
        if g is not None:
            tensors = {k: t for k, t in [("x", x)] + list(leaves.items()) if t is not None}
            grads = dict(zip(tensors, torch.autograd.grad(y, list(tensors.values()), g)))
    return y.detach(), grads


def rowwise(x, ids, w, p, seed, *, residual=None, activation="relu", invariant=False, g=None):
    """Float64 ground truth: one row at a time, row m multiplied by row m of the batch's
    dropout_multiplier; autograd for the gradients (divided by scale[a] for MMA's
    grad_scale_invariant)."""
    m, r = x.shape[0], w["down_weight"].shape[1]
    keep = reference.dropout_multiplier(seed, m, r, p, F64, "cpu")
    x = x.detach().double().requires_grad_()
    leaves = {k: None if v is None else v.detach().double().requires_grad_()
              for k, v in w.items()}
    rows = []
    for i in range(m):
        a = int(ids[i])
        base = x[i] if residual is None else residual[i].double()
        if a < 0:
            rows.append(base)
            continue

        def pick(name):
            return None if leaves[name] is None else leaves[name][a]
        h = reference.activation(F.linear(x[i], pick("down_weight"), pick("down_bias")),
                                 activation)
        if leaves["shared_weight"] is not None:
            h = reference.activation(F.linear(h, pick("shared_weight"), pick("shared_bias")),
                                     activation)
        u = F.linear(h * keep[i], pick("up_weight"), pick("up_bias"))
        rows.append(base + leaves["scale"][a] * u)
    y = torch.stack(rows)
    tensors = {k: t for k, t in [("x", x)] + list(leaves.items()) if t is not None}
    grads = dict(zip(tensors, torch.autograd.grad(y, list(tensors.values()), g)))
    if invariant:
        for k in NAMES[1:]:
            if k in grads:
                grads[k] = grads[k] / leaves["scale"].detach().reshape(
                    (-1,) + (1,) * (grads[k].dim() - 1))
    return y.detach(), grads


def compare(got, want, dtype, what):
    y, grads = got
    y_ref, grads_ref = want
    assert set(grads) == set(grads_ref), f"{what}: the same gradients"
    assert_close_rel(y, y_ref, dtype, f"{what}: y")
    for k in grads_ref:
        assert_close_rel(grads[k], grads_ref[k], dtype, f"{what}: d{k}")


# ----------------------------------------------------------------------------------------------
# the reference backend against the per-row float64 loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,r,shared,bias,activation,residual,invariant", [
    (19, 1, True, True, "relu", False, False),
    (19, 7, False, True, "gelu", True, False),
    (33, 7, True, False, "silu", False, True),
    (12, 128, True, True, "quick_gelu", False, False),
])
def test_reference_matches_rowwise_float64(d, r, shared, bias, activation, residual, invariant):
    gen = torch.Generator().manual_seed(d * 131 + r)
    m, n, p, seed = 29, 3, 0.3, seed_of(1234 + r)
    x = torch.randn(m, d, generator=gen, dtype=F64)
    ids = with_unadapted(m, n, gen)
    w = make_weights(n, d, r, F64, shared=shared, bias=bias, gen=gen)
    res = torch.randn(m, d, generator=gen, dtype=F64) if residual else None
    g = torch.randn(m, d, generator=gen, dtype=F64)
    got = run("reference", x, ids, w, p, seed, residual=res, activation=activation,
              invariant=invariant, g=g)
    want = rowwise(x, ids, w, p, seed, residual=res, activation=activation, invariant=invariant,
                   g=g)
    compare(got, want, F64, f"reference d={d} r={r}")
    no_drop = run("reference", x, ids, w, 0.0, None, residual=res, activation=activation,
                  invariant=invariant, g=g)
    assert rel_err(got[0], no_drop[0]) > 1e-3, "dropout changed the output"


# ----------------------------------------------------------------------------------------------
# cpu and triton backends against the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype,d,r,shared,residual", [
    (torch.float32, 37, 7, True, False),
    (torch.float32, 20, 33, False, True),
    (F64, 19, 1, True, False),
])
def test_backend_matches_reference(backend, dtype, d, r, shared, residual, poison_allocations,
                                   monkeypatch):
    _ready(backend)
    if backend == "triton":
        from pyadapt.kernels import bank as K
        allocated = poison_allocations(K)
    else:
        # the native kernel must cover dropout itself, not hand it to the reference loop
        def no_reference(*args, **kwargs):
            raise AssertionError("the cpu backend fell back to the reference")
        monkeypatch.setattr(bank_ops, "_reference_forward", no_reference)
        monkeypatch.setattr(bank_ops, "_reference_backward", no_reference)
    gen = torch.Generator().manual_seed(d * 7 + r)
    m, n, p, seed = 45, 4, 0.25, seed_of(98765)
    x = torch.randn(m, d, generator=gen, dtype=F64)
    ids = with_unadapted(m, n, gen)
    ids[ids == 2] = 1                                   # adapter 2: an empty group
    w = make_weights(n, d, r, F64, shared=shared, gen=gen)
    res = torch.randn(m, d, generator=gen, dtype=F64) if residual else None
    g = torch.randn(m, d, generator=gen, dtype=F64)
    got = run(backend, x.to(dtype), ids, {k: None if v is None else v.to(dtype)
                                          for k, v in w.items()}, p, seed,
              residual=None if res is None else res.to(dtype), g=g.to(dtype))
    monkeypatch.undo()
    want = run("reference", x, ids, w, p, seed, residual=res, g=g)
    compare(got, want, dtype, f"{backend} {dtype} d={d} r={r}")
    assert torch.equal(got[1]["down_weight"][2], torch.zeros_like(got[1]["down_weight"][2])), \
        "an adapter without rows gets exact zeros"
    if backend == "triton":
        assert allocated, "the triton launchers ran"


def test_cpu_backend_bfloat16():
    require_native()
    gen = torch.Generator().manual_seed(3)
    m, n, d, r, p, seed = 40, 3, 24, 8, 0.3, seed_of(5)
    x = torch.randn(m, d, generator=gen, dtype=F64)
    ids = with_unadapted(m, n, gen)
    w = make_weights(n, d, r, F64, gen=gen)
    g = torch.randn(m, d, generator=gen, dtype=F64)
    bf = torch.bfloat16
    w_bf = {k: None if v is None else v.to(bf) for k, v in w.items()}
    y, grads = run("cpu", x.to(bf), ids, w_bf, p, seed, g=g.to(bf))
    # the float64 truth of the bf16-rounded inputs, and eager bf16 as the 2x rule's yardstick
    y_ref, grads_ref = run("reference", x.to(bf).double(), ids,
                           {k: None if v is None else v.double() for k, v in w_bf.items()},
                           p, seed, g=g.to(bf).double())
    y_eager, grads_eager = run("reference", x.to(bf), ids, w_bf, p, seed, g=g.to(bf))
    assert_close_rel(y, y_ref, bf, "cpu bf16 y", baseline=y_eager)
    for k in grads_ref:
        assert_close_rel(grads[k], grads_ref[k], bf, f"cpu bf16 d{k}", baseline=grads_eager[k])


# ----------------------------------------------------------------------------------------------
# the mask, bit for bit, and the rows without an adapter
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_the_batch_mask_bit_for_bit(backend):
    """With identity activation, up = I (d = r), no up bias, scale 1 and a zero residual,
    y[m] = D[m] * (x[m] W_d^T + b_d): y is exactly zero where the mask drops, so the zeros of y
    are the mask itself (the pre-activations are never exactly zero)."""
    _ready(backend)
    gen = torch.Generator().manual_seed(17)
    m, n, r, p, seed = 53, 3, 19, 0.4, seed_of(424242)
    x = torch.randn(m, r, generator=gen)
    ids = with_unadapted(m, n, gen)
    down = torch.randn(n, r, r, generator=gen)
    down_b = torch.randn(n, r, generator=gen)
    up = torch.eye(r).expand(n, r, r).contiguous()
    residual = torch.zeros(m, r)
    with pyadapt.use_backend(backend):
        y = bank_ops.bank_bottleneck(x, ids, down, down_b, up, None, scale=torch.ones(n),
                                     residual=residual, activation="identity", dropout_p=p,
                                     seed=seed)
        single = pyadapt.ops.bottleneck(x, down[0], down_b[0], up[0], None,
                                        residual=residual, scale=1.0, activation="identity",
                                        dropout_p=p, seed=seed)
    batch_keep = reference.dropout_multiplier(seed, m, r, p, torch.float32, "cpu") != 0
    adapted = ids >= 0
    assert torch.equal(y[adapted] != 0, batch_keep[adapted]), \
        f"{backend}: the kept elements are those of the batch mask (row = batch row)"
    assert torch.equal(single != 0, batch_keep), f"{backend}: the single-adapter op's mask"
    assert torch.equal(y[~adapted], residual[~adapted]), "rows without an adapter: the residual"
    pre = torch.einsum("mk,mjk->mj", x, down[ids.clamp(min=0)]) + down_b[ids.clamp(min=0)]
    kept = batch_keep & adapted[:, None]
    assert_close_rel(y[kept], pre[kept] / (1 - p), torch.float32, "kept values scaled 1/(1-p)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_unadapted_rows_pass_through(backend, residual):
    _ready(backend)
    gen = torch.Generator().manual_seed(23)
    m, n, d, r = 31, 2, 21, 5
    x = torch.randn(m, d, generator=gen)
    ids = with_unadapted(m, n, gen)
    w = make_weights(n, d, r, torch.float32, gen=gen)
    res = torch.randn(m, d, generator=gen) if residual else None
    g = torch.randn(m, d, generator=gen)
    y, grads = run(backend, x, ids, w, 0.5, seed_of(77), residual=res, g=g)
    off = ids < 0
    assert torch.equal(y[off], (x if res is None else res)[off]), "y = residual on id -1 rows"
    want_dx = torch.zeros_like(g[off]) if residual else g[off]
    assert torch.equal(grads["x"][off], want_dx), "dx on id -1 rows: g (residual x) or 0"


# ----------------------------------------------------------------------------------------------
# one adapter for every row == the single-adapter op with the same seed
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_one_adapter_equals_single_op(backend):
    _ready(backend)
    gen = torch.Generator().manual_seed(29)
    m, n, d, r, p, seed = 50, 2, 27, 9, 0.3, seed_of(31337)
    x = torch.randn(m, d, generator=gen, dtype=F64)
    w = make_weights(n, d, r, F64, gen=gen)
    g = torch.randn(m, d, generator=gen, dtype=F64)
    ids = torch.ones(m, dtype=torch.int64)
    y, grads = run(backend, x, ids, w, p, seed, g=g)
    one = {k: v[1].detach().clone().requires_grad_() for k, v in w.items()}
    xs = x.clone().requires_grad_()
    with pyadapt.use_backend(backend):
        y1 = pyadapt.ops.bottleneck(xs, one["down_weight"], one["down_bias"], one["up_weight"],
                                    one["up_bias"], one["shared_weight"], one["shared_bias"],
                                    scale=one["scale"].reshape(()), dropout_p=p, seed=seed)
        names = list(one)
        got = torch.autograd.grad(y1, [xs] + [one[k] for k in names], g)
    assert_close_rel(y, y1, F64, f"{backend}: bank (all rows id 1) vs single op, y")
    assert_close_rel(grads["x"], got[0], F64, f"{backend}: dx")
    for k, grad in zip(names, got[1:]):
        assert_close_rel(grads[k][1], grad.reshape(grads[k][1].shape), F64, f"{backend}: d{k}")
        assert not grads[k][0].any(), f"{backend}: d{k} of the unused adapter 0 is zero"


# ----------------------------------------------------------------------------------------------
# M = 0 and bad arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    _ready(backend)
    w = make_weights(2, 11, 3, torch.float32)
    x = torch.randn(0, 11)
    y, grads = run(backend, x, torch.zeros(0, dtype=torch.int64), w, 0.2, seed_of(1),
                   g=torch.randn(0, 11))
    assert y.shape == (0, 11) and grads["x"].shape == (0, 11)
    for k in NAMES[1:]:
        assert torch.equal(grads[k], torch.zeros_like(w[k])), f"d{k}: a sum over no rows"


def test_bad_dropout_arguments():
    w = make_weights(2, 8, 3, torch.float32)
    x, ids = torch.randn(4, 8), torch.tensor([0, 1, -1, 0])

    def call(**kw):
        return bank_ops.bank_bottleneck(x, ids, w["down_weight"], w["down_bias"], w["up_weight"],
                                        w["up_bias"], scale=w["scale"], **kw)
    with pytest.raises(ValueError, match="dropout_p: expected a float in"):
        call(dropout_p=1.0)
    with pytest.raises(TypeError, match="dropout_p"):
        call(dropout_p="0.1")
    with pytest.raises(TypeError, match="seed: expected a single-element int64"):
        call(dropout_p=0.1, seed=torch.tensor(3.0))
    with pytest.raises(ValueError, match="seed: expected a value in"):
        call(dropout_p=0.1, seed=seed_of(-1))
    drawn = call(dropout_p=0.5)                      # no seed: drawn from torch's generator
    assert torch.isfinite(drawn).all() and not torch.equal(drawn, call())


def test_opcheck_with_dropout():
    gen = torch.Generator().manual_seed(5)
    w = make_weights(3, 12, 4, F64, gen=gen)
    w = {k: None if v is None else v.requires_grad_() for k, v in w.items()}
    x = torch.randn(10, 12, dtype=F64, generator=gen, requires_grad=True)
    ids = with_unadapted(10, 3, gen)
    args = (x, None, ids, w["down_weight"], w["down_bias"], w["shared_weight"], w["shared_bias"],
            w["up_weight"], w["up_bias"], w["scale"], "relu", False, 0.3, seed_of(9))
    torch.library.opcheck(torch.ops.pyadapt.bank_bottleneck_forward.default, args)


# ----------------------------------------------------------------------------------------------
# modules: AdapterBank and CPAdapterBank against their source modules
# ----------------------------------------------------------------------------------------------

def trained_fused(n, d, r, p, dtype=F64):
    adapters = []
    for i in range(n):
        a = pyadapt.FusedAdapter(d, r, "gelu", scale=0.5 + 0.25 * i, dropout=p, init="bert",
                                 shared=nn.Linear(r, r, dtype=dtype), learn_scale=True,
                                 dtype=dtype)
        with torch.no_grad():
            for t in a.parameters():
                t.add_(torch.randn_like(t) * 0.2)
        adapters.append(a)
    return adapters


def test_adapter_bank_training_equals_source_adapters():
    """Adapter a run on the whole batch with the bank's torch seed draws the bank's mask, so its
    rows of group a are the bank's rows; loss weights restricted to group a give its grads."""
    m, n, d, r, p = 36, 3, 17, 6, 0.35
    adapters = trained_fused(n, d, r, p)
    bank = AdapterBank.from_adapters(adapters).train()
    assert bank.dropout == p
    x = torch.randn(4, m // 4, d, dtype=F64)
    ids = torch.tensor([2, -1, 0, 2])                     # one id per sample
    gw = torch.randn(x.shape, dtype=F64)
    xb = x.clone().requires_grad_()
    torch.manual_seed(2024)
    y = bank(xb, ids)
    (y * gw).sum().backward()
    dx_want = torch.where((ids < 0)[:, None, None], gw, torch.zeros_like(gw))
    for a, adapter in enumerate(adapters):
        rows = ids == a
        xa = x.clone().requires_grad_()
        torch.manual_seed(2024)
        ya = adapter.train()(xa)
        if rows.any():
            assert_close_rel(y[rows], ya[rows], F64, f"bank rows of adapter {a}")
        (ya * gw * rows[:, None, None]).sum().backward()
        dx_want = dx_want + xa.grad * rows[:, None, None]
        named = {"down_weight": adapter.down.weight, "down_bias": adapter.down.bias,
                 "up_weight": adapter.up.weight, "up_bias": adapter.up.bias,
                 "shared_weight": adapter.shared.weight, "shared_bias": adapter.shared.bias,
                 "scale": adapter.scale}
        for k, t in named.items():
            assert_close_rel(getattr(bank, k).grad[a], t.grad.reshape(getattr(bank, k)[a].shape),
                             F64, f"bank d{k}[{a}] vs adapter {a}")
    assert_close_rel(xb.grad, dx_want, F64, "bank dx vs the adapters' dx on their rows")
    assert torch.equal(y[1], x[1]), "the id -1 sample passes through"
    with torch.no_grad():
        torch.manual_seed(1)
        y_again = bank(x, ids)
        assert rel_err(y_again, y) > 1e-3, "each training call draws a fresh mask"
        bank.eval()
        assert_close_rel(bank(x, ids)[0], adapters[2].eval()(x[0]), F64,
                         "eval: no dropout, the adapter's eval output")


@pytest.mark.parametrize("core,d_in,d_out,position", [
    ("tucker", 12, 18, "after_core"),     # n_in 2 < n_out 3: the dropout fold differs from eval's
    ("tucker", 18, 12, "before_core"),    # n_in 3 > n_out 2: likewise
    ("cp", 12, 18, "before_core"),
    ("cp", 18, 12, "after_core"),
])
def test_cp_bank_training_equals_source_sites(core, d_in, d_out, position):
    m, n, width, rank, p = 30, 2, 6, 3, 0.3
    base = nn.Linear(d_in, d_out, dtype=F64)
    sites = []
    for _ in range(n):
        cp = pyadapt.CPAdapter([base], rank=rank, core=core, dropout=p,
                               dropout_position=position, width=width)
        with torch.no_grad():
            for t in cp.parameters():
                if t.requires_grad:
                    t.add_(torch.randn_like(t) * 0.5)
        sites.append(cp[0])
    bank = CPAdapterBank.from_adapters(sites).train()
    assert (bank.dropout, bank.dropout_position) == (p, position)
    x = torch.randn(m, d_in, dtype=F64)
    ids = torch.randint(-1, n, (m,))
    ids[0], ids[1] = 0, 1
    gw = torch.randn(m, d_out, dtype=F64)
    torch.manual_seed(77)
    y = bank(x, ids)
    (y * gw).sum().backward()
    for a, site in enumerate(sites):
        rows = ids == a
        torch.manual_seed(77)
        ya = site.train()(x)
        assert_close_rel(y[rows], ya[rows], F64, f"CP bank rows of site {a} ({position})")
        (ya * gw * rows[:, None]).sum().backward()
        for k in ("U", "V", "C", "lam"):
            t = getattr(site, k)
            if t is not None:
                assert_close_rel(getattr(bank, k).grad[a], t.grad, F64,
                                 f"CP bank d{k}[{a}] vs site {a} ({position})")
    with torch.no_grad():
        bank.eval()
        y_eval = bank(x, ids)
        assert rel_err(y_eval, y) > 1e-3, "training applied dropout"
        rows = ids == 0
        assert_close_rel(y_eval[rows], sites[0].eval()(x)[rows], F64, "eval: no dropout")


def test_cp_bank_refuses_mixed_dropout_positions():
    base = nn.Linear(8, 8)
    a = pyadapt.CPAdapter([base], rank=2, dropout_position="after_core")
    b = pyadapt.CPAdapter([base], rank=2, dropout_position="before_core")
    with pytest.raises(ValueError, match=r"adapters\[1\]: expected dropout_position after_core"):
        CPAdapterBank.from_adapters([a, b])
    bank = CPAdapterBank.from_adapters([a, a[0]])
    with pytest.raises(ValueError, match="dropout_position: expected one of"):
        bank.lora_factors("middle")
