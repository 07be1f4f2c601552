"""AdapterBank and the bank op (pyadapt/bank.py, pyadapt/ops/bank.py) against a naive loop.

    y[m] = residual[m] + scale[a] * up_a(act(shared_a?(act(down_a(x[m])))))   a = ids[m] >= 0
    y[m] = residual[m]                                                       ids[m] == -1

The naive loop below applies each row's adapter with plain torch in float64, one row at a time;
autograd through it gives every gradient (x, each stacked tensor, scale). The op (reference
backend, and `auto`, which is the reference on CPU) must match it within conftest.REL_TOL.
The Triton backend is checked in test_bank_triton.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyadapt
from pyadapt import reference
from pyadapt.bank import AdapterBank
from pyadapt.ops import bank as bank_ops

from conftest import assert_close_rel, require_native

# The native cpu backend runs the single-adapter C++ kernel per adapter group; like
# test_bottleneck_cpu.py, its tests FAIL when pyadapt._C is missing unless
# PYADAPT_ALLOW_NO_NATIVE=1 (a deliberately pure-Python install).
HOST_BACKENDS = ["reference", "cpu"]


def _backend_ready(backend: str) -> None:
    if backend == "cpu":
        require_native()

STACKED = ("down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight", "up_bias",
           "scale")
PATTERNS = ("one_id", "all_different", "with_unadapted", "unsorted", "empty_groups")


def make_ids(pattern: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter ids (M,) of a named pattern."""
    if pattern == "one_id":
        return torch.full((m,), n - 1, dtype=torch.int64)
    if pattern == "all_different":       # every row its own adapter (N >= M), shuffled
        return torch.randperm(n, generator=gen)[:m]
    if pattern == "with_unadapted":      # about a third of rows without an adapter
        return torch.randint(-1, n, (m,), generator=gen)
    if pattern == "unsorted":            # descending runs: nothing is sorted by id
        return (torch.arange(m) * 7 + 3) % n
    if pattern == "empty_groups":        # only ids 1 and n - 1 (and -1): the others get no row
        choice = torch.tensor([-1, 1, n - 1])
        return choice[torch.randint(0, 3, (m,), generator=gen)]
    raise ValueError(pattern)


def make_weights(n: int, d: int, r: int, dtype, *, bias=True, shared=True, shared_bias=True,
                 gen=None, d_out=None) -> dict:
    """Random stacked weights (never zeros), scaled like trained adapters; d_out (the LoRA
    form's out_features) defaults to d."""
    d_out = d if d_out is None else d_out

    def rnd(*shape, std=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    w = {"down_weight": rnd(n, r, d, std=d ** -0.5), "up_weight": rnd(n, d_out, r, std=r ** -0.5),
         "down_bias": rnd(n, r, std=0.1) if bias else None,
         "up_bias": rnd(n, d_out, std=0.1) if bias else None,
         "shared_weight": rnd(n, r, r, std=r ** -0.5) if shared else None,
         "shared_bias": rnd(n, r, std=0.1) if shared and shared_bias else None,
         "scale": (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(dtype)}
    return w


def naive_loop(x, ids, w, *, residual=None, activation="relu"):
    """Row by row, in whatever dtype the inputs have (the tests pass float64)."""
    out = []
    for m in range(x.shape[0]):
        a = int(ids[m])
        base = x[m] if residual is None else residual[m]
        if a < 0:
            out.append(base)
            continue
        h = reference.activation(F.linear(x[m], w["down_weight"][a],
                                          None if w["down_bias"] is None else w["down_bias"][a]),
                                 activation)
        if w["shared_weight"] is not None:
            sb = None if w["shared_bias"] is None else w["shared_bias"][a]
            h = reference.activation(F.linear(h, w["shared_weight"][a], sb), activation)
        u = F.linear(h, w["up_weight"][a], None if w["up_bias"] is None else w["up_bias"][a])
        out.append(base + w["scale"][a] * u)
    return torch.stack(out) if out else x.clone()


def grads_of(fn, x, w, residual, g, scale_grad=True):
    """(y, {name: grad}) of fn with every tensor a leaf needing grad (the scale when
    scale_grad: a fixed scale is a buffer); absent tensors give None."""
    x = x.detach().clone().requires_grad_()
    leaves = {k: (None if v is None else
                  v.detach().clone().requires_grad_(k != "scale" or scale_grad))
              for k, v in w.items()}
    res = None if residual is None else residual.detach().clone().requires_grad_()
    y = fn(x, leaves, res)
    present = [k for k in STACKED if leaves[k] is not None and leaves[k].requires_grad]
    names = ["x"] + present + (["residual"] if res is not None else [])
    tensors = [x] + [leaves[k] for k in present] + ([res] if res is not None else [])
    grads = torch.autograd.grad(y, tensors, g, allow_unused=True)
    return y.detach(), dict(zip(names, grads))


def op_call(ids, activation, invariant):
    def fn(x, w, res):
        return bank_ops.bank_bottleneck(
            x, ids, w["down_weight"], w["down_bias"], w["up_weight"], w["up_bias"],
            w["shared_weight"], w["shared_bias"], scale=w["scale"], residual=res,
            activation=activation, grad_scale_invariant=invariant)
    return fn


def check_against_naive(x, ids, w, dtype, *, residual=None, activation="relu", backend="reference",
                        invariant=False, scale_grad=True):
    gen = torch.Generator().manual_seed(7)
    g = torch.randn((x.shape[0], w["up_weight"].shape[1]), generator=gen, dtype=torch.float64)
    w64 = {k: None if v is None else v.double() for k, v in w.items()}
    res64 = None if residual is None else residual.double()
    y_ref, grads_ref = grads_of(lambda x_, w_, r_: naive_loop(x_, ids, w_, residual=r_,
                                                             activation=activation),
                                x.double(), w64, res64, g, scale_grad)
    if invariant:   # MMA's gradient-scale layers: parameter gradients as if scale were 1
        for k in STACKED:
            if k in grads_ref and grads_ref[k] is not None:
                per = w64["scale"].reshape((-1,) + (1,) * (grads_ref[k].dim() - 1))
                grads_ref[k] = grads_ref[k] / per
    with pyadapt.use_backend(backend):
        y, grads = grads_of(op_call(ids, activation, invariant), x, w, residual,
                            g.to(x.dtype if residual is None else
                                 torch.promote_types(x.dtype, residual.dtype)), scale_grad)
    assert_close_rel(y, y_ref, dtype, f"{backend} y vs naive loop")
    for name, ref in grads_ref.items():
        got = grads[name]
        if ref is None:
            continue
        if got is None:     # allow_unused: an input the op did not differentiate
            got = torch.zeros_like(ref)
        assert_close_rel(got, ref, dtype, f"{backend} d{name} vs naive loop")
    return y, grads


# ----------------------------------------------------------------------------------------------
# The op (reference backend) against the naive per-row loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_naive_loop(pattern, dtype, backend):
    _backend_ready(backend)
    gen = torch.Generator().manual_seed(1)
    m, d, r, n = 13, 24, 5, 16
    x = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    ids = make_ids(pattern, m, n, gen)
    check_against_naive(x, ids, make_weights(n, d, r, dtype, gen=gen), dtype, activation="gelu",
                        backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("layout", ["plain", "no_bias", "no_shared", "shared_no_bias",
                                    "residual", "invariant", "learnable_scale"])
def test_op_layouts(layout, backend):
    _backend_ready(backend)
    gen = torch.Generator().manual_seed(2)
    m, d, r, n = 11, 10, 3, 4
    dtype = torch.float64
    x = torch.randn(m, d, generator=gen, dtype=dtype)
    ids = make_ids("with_unadapted", m, n, gen)
    w = make_weights(n, d, r, dtype, bias=layout != "no_bias", shared=layout != "no_shared",
                     shared_bias=layout != "shared_no_bias", gen=gen)
    residual = torch.randn(m, d, generator=gen, dtype=dtype) if layout == "residual" else None
    check_against_naive(x, ids, w, dtype, residual=residual, activation="silu",
                        invariant=layout == "invariant", backend=backend,
                        scale_grad=layout in ("learnable_scale", "invariant"))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_op_lora_form(backend):
    """d_out != d: identity activation, no bias, no shared layer, residual = base output."""
    _backend_ready(backend)
    gen = torch.Generator().manual_seed(8)
    m, d, d_out, r, n = 15, 12, 20, 3, 4
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    w = make_weights(n, d, r, torch.float64, bias=False, shared=False, gen=gen, d_out=d_out)
    base_out = torch.randn(m, d_out, generator=gen, dtype=torch.float64)
    check_against_naive(x, make_ids("with_unadapted", m, n, gen), w, torch.float64,
                        residual=base_out, activation="identity", backend=backend)
    with pytest.raises(ValueError, match="residual: required"):
        op_call(torch.zeros(m, dtype=torch.int64), "identity", False)(x, w, None)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_op_bfloat16(backend):
    _backend_ready(backend)
    gen = torch.Generator().manual_seed(3)
    m, d, r, n = 40, 32, 8, 3
    x = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    ids = make_ids("with_unadapted", m, n, gen)
    check_against_naive(x, ids, make_weights(n, d, r, torch.bfloat16, gen=gen), torch.bfloat16,
                        backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_op_empty_batch(backend):
    _backend_ready(backend)
    w = make_weights(3, 8, 2, torch.float64)
    x = torch.randn(0, 8, dtype=torch.float64)
    y, grads = check_against_naive(x, torch.zeros(0, dtype=torch.int64), w, torch.float64,
                                   backend=backend)
    assert y.shape == (0, 8)
    assert all(grads[k].abs().sum() == 0 for k in ("down_weight", "up_weight")), \
        "a sum over no rows is zero"


def test_unadapted_rows_are_exact_copies():
    """id -1 rows come back bit for bit (x, or the residual when one is given)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 16, generator=gen)
    residual = torch.randn(9, 16, generator=gen)
    ids = torch.tensor([-1, 0, -1, 1, 1, -1, 0, -1, -1])
    w = make_weights(2, 16, 4, torch.float32, gen=gen)
    for res in (None, residual):
        y = op_call(ids, "relu", False)(x, w, res)
        expect = x if res is None else res
        assert torch.equal(y[ids < 0], expect[ids < 0]), "unadapted rows changed"
        assert not torch.equal(y[ids >= 0], expect[ids >= 0]), "adapted rows unchanged"


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    w = make_weights(3, 12, 4, torch.float64, gen=gen)
    w = {k: None if v is None else v.requires_grad_() for k, v in w.items()}
    x = torch.randn(10, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = make_ids("with_unadapted", 10, 3, gen)
    args = (x, None, ids, w["down_weight"], w["down_bias"], w["shared_weight"], w["shared_bias"],
            w["up_weight"], w["up_bias"], w["scale"], "relu", False)
    torch.library.opcheck(torch.ops.pyadapt.bank_bottleneck_forward.default, args)


# ----------------------------------------------------------------------------------------------
# AdapterBank, the module
# ----------------------------------------------------------------------------------------------

def trained_adapters(n, d=16, r=4, *, shared=True, learn_scale=False, dtype=torch.float32):
    adapters = []
    for i in range(n):
        sh = nn.Linear(r, r, dtype=dtype) if shared else None
        a = pyadapt.FusedAdapter(d, r, "gelu", scale=0.1 * (i + 1), init="bert", shared=sh,
                                 learn_scale=learn_scale, dtype=dtype)
        with torch.no_grad():    # "trained": nothing is zero
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        adapters.append(a)
    return adapters


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("learn_scale", [True, False])
def test_bank_equals_each_adapter_per_sample(shared, learn_scale):
    """x (B, T, d) with one id per sample: each sample equals its own FusedAdapter's output,
    and gradients of every stacked tensor equal the per-adapter module gradients."""
    adapters = trained_adapters(3, shared=shared, learn_scale=learn_scale, dtype=torch.float64)
    bank = AdapterBank.from_adapters(adapters)
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 2, 1])
    g = torch.randn(5, 3, 16, dtype=torch.float64)
    y = bank(x, ids)
    (y * g).sum().backward()
    for b in range(5):
        a = int(ids[b])
        expect = x[b] if a < 0 else adapters[a](x[b])
        assert_close_rel(y[b], expect.detach(), torch.float64, f"sample {b} (adapter {a})")
        if a >= 0:
            (adapters[a](x[b]) * g[b]).sum().backward()
    for a, ad in enumerate(adapters):
        pairs = [(bank.down_weight, ad.down.weight), (bank.up_weight, ad.up.weight),
                 (bank.down_bias, ad.down.bias), (bank.up_bias, ad.up.bias)]
        if shared:
            pairs += [(bank.shared_weight, ad.shared.weight), (bank.shared_bias, ad.shared.bias)]
        if learn_scale:
            pairs.append((bank.scale, ad.scale))
        for stacked, own in pairs:
            assert_close_rel(stacked.grad[a], own.grad, torch.float64,
                             f"bank gradient of adapter {a} vs its module")


def test_bank_ids_per_row_and_unused_adapter_gets_zero_grad():
    adapters = trained_adapters(4, dtype=torch.float64)
    bank = AdapterBank.from_adapters(adapters)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    ids = torch.tensor([[0, 1, -1], [1, 0, 0]])         # per row, shape x.shape[:-1]
    y = bank(x, ids)
    for i in range(2):
        for t in range(3):
            a = int(ids[i, t])
            expect = x[i, t] if a < 0 else adapters[a](x[i, t])
            assert_close_rel(y[i, t], expect.detach(), torch.float64, f"row {(i, t)}")
    y.sum().backward()
    assert torch.count_nonzero(bank.down_weight.grad[2:]) == 0, "adapters 2, 3 name no row"
    assert torch.count_nonzero(bank.down_weight.grad[:2]) > 0


def test_bank_validate():
    bank = AdapterBank.from_adapters(trained_adapters(3))
    x = torch.randn(4, 16)
    for bad in (torch.tensor([0, 3, 1, 1]), torch.tensor([0, -2, 1, 1])):
        with pytest.raises(ValueError, match="adapter_ids"):
            bank(x, bad)
    # validate=False: no host sync, and an out-of-range id passes its row through like -1
    y = bank(x, torch.tensor([0, 3, -5, 1]), validate=False)
    assert torch.equal(y[1:3], x[1:3])
    assert_close_rel(y[0], bank(x[:1], torch.tensor([0]))[0].detach(), torch.float32, "row 0")


def test_bank_bad_input():
    bank = AdapterBank.from_adapters(trained_adapters(2))
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="x: expected last dimension 16"):
        bank(torch.randn(3, 8), torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="adapter_ids"):
        bank(x, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="adapter_ids: expected shape"):
        bank(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="x: expected dtype"):
        bank(x.double(), torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        bank(torch.ones(3, 16, dtype=torch.int64), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="residual"):
        bank(x, torch.tensor([0, 1, 0]), residual=torch.randn(3, 15))
    with pytest.raises(ValueError, match="scale: expected shape"):
        bank_ops.bank_bottleneck(x, torch.tensor([0, 1, 0]), bank.down_weight, bank.down_bias,
                                 bank.up_weight, bank.up_bias, scale=torch.ones(3))


def test_from_adapters_rejects_mixed_kinds():
    a, _ = trained_adapters(2)
    c = pyadapt.FusedAdapter(16, 8)
    with pytest.raises(ValueError, match=r"adapters\[1\]: expected bottleneck 4"):
        AdapterBank.from_adapters([a, c])
    d = pyadapt.FusedAdapter(16, 4, activation="relu", shared=nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"adapters\[1\]: expected activation gelu"):
        AdapterBank.from_adapters([a, d])
    with pytest.raises(TypeError, match=r"adapters\[1\]: expected a pyadapt.FusedAdapter"):
        AdapterBank.from_adapters([a, nn.Linear(16, 16)])
    with pytest.raises(ValueError, match="at least one"):
        AdapterBank.from_adapters([])


@pytest.mark.parametrize("learn_scale", [True, False])
def test_round_trips(learn_scale):
    """to_adapters gives the modules back; from_state_dicts rebuilds the same bank from
    pyadapt.adapter_state_dict of each adapter (also under a model prefix)."""
    adapters = trained_adapters(3, learn_scale=learn_scale)
    bank = AdapterBank.from_adapters(adapters)
    x = torch.randn(6, 16)
    for a, back in enumerate(bank.to_adapters()):
        assert torch.equal(back(x), adapters[a](x)), f"to_adapters()[{a}] differs"
    holder = nn.Module()
    holder.adapter = adapters[1]
    sds = [pyadapt.adapter_state_dict(adapters[0]), pyadapt.adapter_state_dict(holder),
           pyadapt.adapter_state_dict(adapters[2])]
    assert any(k.startswith("adapter.") for k in sds[1])
    rebuilt = AdapterBank.from_state_dicts(sds, activation="gelu",
                                           scale=[a.scale if not learn_scale else 0.0
                                                  for a in adapters])
    ids = torch.tensor([0, 1, 2, -1, 2, 1])
    assert torch.equal(rebuilt(x, ids), bank(x, ids))
    with pytest.raises(ValueError, match=r"state_dicts\[0\]\['up.weight'\]: expected shape"):
        AdapterBank.from_state_dicts([{**sds[0], "up.weight": torch.zeros(3, 3)}])
    with pytest.raises(ValueError, match="unexpected keys"):
        AdapterBank.from_state_dicts([{**sds[0], "other": torch.zeros(3)}])


def test_bank_trains_several_tasks():
    """Multi-task training: one optimiser step on a mixed batch moves exactly the adapters it
    names."""
    bank = AdapterBank.from_adapters(trained_adapters(3))
    before = bank.up_weight.detach().clone()
    opt = torch.optim.SGD(bank.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    bank(x, torch.tensor([0, 2, 0, 2, -1, 2, 0, 0])).square().sum().backward()
    opt.step()
    moved = (bank.up_weight.detach() - before).flatten(1).abs().sum(1) > 0
    assert moved.tolist() == [True, False, True]


def test_bank_dropout_and_autocast():
    adapters = trained_adapters(2)
    adapters[0].dropout = 0.1
    with pytest.raises(ValueError, match=r"adapters\[1\]: expected dropout 0.1"):
        AdapterBank.from_adapters(adapters)   # one p per bank: differing ones are refused
    adapters[1].dropout = 0.1
    bank = AdapterBank.from_adapters(adapters)
    assert bank.dropout == 0.1                # applied in training (test_bank_dropout.py)
    bank.eval()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank(x, torch.tensor([0, 1, -1, 0]))
    assert y.dtype == torch.bfloat16
    assert_close_rel(y.float(), bank(x, torch.tensor([0, 1, -1, 0])).detach(), torch.bfloat16,
                     "autocast bf16 vs fp32")


def test_bank_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the bank (the op is opaque; the id range check is
    skipped while compiling, out-of-range ids then pass through as with validate=False)."""
    bank = AdapterBank.from_adapters(trained_adapters(2))
    x = torch.randn(3, 2, 16)
    ids = torch.tensor([1, -1, 0])
    compiled = torch.compile(bank, fullgraph=True, backend="aot_eager")
    assert_close_rel(compiled(x, ids), bank(x, ids).detach(), torch.float32, "compiled bank")


def test_bank_is_an_adapter_module_for_checkpoints_and_ema():
    """adapter_state_dict holds the stacked tensors; AdapterEMA shadows drive eval."""
    bank = AdapterBank.from_adapters(trained_adapters(2, learn_scale=True))
    sd = pyadapt.adapter_state_dict(bank)
    assert set(sd) == {"down_weight", "down_bias", "up_weight", "up_bias", "shared_weight",
                       "shared_bias", "scale"}
    ema = pyadapt.AdapterEMA(bank, momentum=0.5)
    x, ids = torch.randn(4, 16), torch.tensor([0, 1, 1, -1])
    before = bank.eval()(x, ids).detach()
    with torch.no_grad():
        bank.up_weight.add_(1.0)
    assert torch.equal(bank(x, ids), before), "eval uses the (unchanged) EMA shadows"
    ema.update()
    assert not torch.equal(bank(x, ids), before), "the shadows moved half way"
    assert not torch.equal(bank.train()(x, ids), bank.eval()(x, ids)), "training: live weights"


# ----------------------------------------------------------------------------------------------
# LowRankAdapterBank: LoRA adapters of one frozen linear
# ----------------------------------------------------------------------------------------------

def lora_adapters(n, base):
    adapters = []
    for i in range(n):
        a = pyadapt.LowRankAdapter(base, rank=3, alpha=2.0 + i)
        with torch.no_grad():
            a.up_weight.normal_(0, 0.2)     # "trained": B is not zero
        adapters.append(a)
    return adapters


def test_lora_bank_equals_each_adapter():
    from pyadapt.bank import LowRankAdapterBank
    base = nn.Linear(12, 20, dtype=torch.float64)
    adapters = lora_adapters(3, base)
    bank = AdapterBank.from_adapters(adapters)
    assert isinstance(bank, LowRankAdapterBank)
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 1])
    g = torch.randn(4, 5, 20, dtype=torch.float64)
    y = bank(x, ids)
    (y * g).sum().backward()
    for b in range(4):
        a = int(ids[b])
        expect = base(x[b]) if a < 0 else adapters[a](x[b])
        assert_close_rel(y[b], expect.detach(), torch.float64, f"sample {b} (adapter {a})")
        if a >= 0:
            (adapters[a](x[b]) * g[b]).sum().backward()
    for a, ad in enumerate(adapters):
        assert_close_rel(bank.down_weight.grad[a], ad.down_weight.grad, torch.float64, f"dA {a}")
        assert_close_rel(bank.up_weight.grad[a], ad.up_weight.grad, torch.float64, f"dB {a}")
    assert base.weight.grad is None, "the base stays frozen"
    for a, back in enumerate(bank.to_adapters()):
        assert torch.equal(back(x[0]), adapters[a](x[0])), f"to_adapters()[{a}]"


def test_lora_bank_rejects_other_bases_and_ranks():
    base = nn.Linear(8, 8)
    a = pyadapt.LowRankAdapter(base, rank=2)
    other = pyadapt.LowRankAdapter(nn.Linear(8, 8), rank=2)
    with pytest.raises(ValueError, match="same frozen base"):
        AdapterBank.from_adapters([a, other])
    with pytest.raises(ValueError, match="expected rank 2"):
        AdapterBank.from_adapters([a, pyadapt.LowRankAdapter(base, rank=4)])


# ----------------------------------------------------------------------------------------------
# RAdapterBank: low-rank R-Adapters of one frozen linear
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn_scale", [True, False])
def test_radapter_bank_equals_each_adapter(learn_scale):
    from pyadapt.bank import RAdapterBank
    base = nn.Linear(10, 14, dtype=torch.float64)
    adapters = []
    for i in range(3):
        a = pyadapt.RAdapter(base, rank=4, scale=0.1 * (i + 1), learn_scale=learn_scale,
                             eval_scale=0.5 + 0.1 * i)
        with torch.no_grad():
            a.up_weight.normal_(0, 0.3)
        adapters.append(a)
    bank = AdapterBank.from_adapters(adapters)
    assert isinstance(bank, RAdapterBank)
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    ids = torch.tensor([1, 2, -1, 0])
    for mode in ("train", "eval"):
        bank.train(mode == "train")
        for a in adapters:
            a.train(mode == "train")
        bank.zero_grad()
        for a in adapters:
            a.zero_grad()
        y = bank(x, ids)
        y.square().sum().backward()
        for b in range(4):
            a = int(ids[b])
            expect = base(x[b]) if a < 0 else adapters[a](x[b])
            assert_close_rel(y[b], expect.detach(), torch.float64, f"{mode} sample {b}")
            if a >= 0:
                adapters[a](x[b]).square().sum().backward()
        for a, ad in enumerate(adapters):
            assert_close_rel(bank.up_weight.grad[a], ad.up_weight.grad, torch.float64,
                             f"{mode} dW_u {a}")
            assert_close_rel(bank.down_weight.grad[a], ad.down_weight.grad, torch.float64,
                             f"{mode} dW_d {a}")
            if learn_scale:
                assert_close_rel(bank.scale.grad[a], ad.scale.grad, torch.float64,
                                 f"{mode} ds {a}")
    for a, back in enumerate(bank.to_adapters()):
        assert torch.equal(back.eval()(x[0]), adapters[a].eval()(x[0])), f"to_adapters()[{a}]"


def test_radapter_bank_rejects_mixed_forms():
    base = nn.Linear(6, 6)
    with pytest.raises(ValueError, match="cannot be mixed"):
        AdapterBank.from_adapters([pyadapt.RAdapter(base), pyadapt.RAdapter(base, rank=2)])
