"""RAdapterBank (full-rank and low-rank R-Adapters of one frozen linear, with adapter dropping)
and LowRankAdapterBank dropout, against loops of the per-adapter modules they are built from.

    z = base(x);  y[m] = z[m] + c[a] * q_a(z[m])   (a = ids[m] >= 0),   y[m] = z[m]   (-1)
    q_a(z) = z W_f[a]^T (rank=None)  or  (z W_d[a]^T) W_u[a]^T (rank=r)
    c = s (training; times 1/(1-p) on kept rows, 0 on dropped ones), s * eval_scale (eval)

Dropping is checked exactly: the bank and each pyadapt.RAdapter draw their mask with the same
call on torch's default generator, so re-seeding before each gives both the same mask; every
adapter's module is run on the whole batch and its rows are compared. LoRA-bank dropout:
y = base(x) + scaling[a] * (dropout(x) A_a^T) B_a^T with the base reading x undropped.
Everything in float64; the op backends are checked in test_bank_linear.py / test_bank*.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyadapt
from pyadapt import reference
from pyadapt.bank import AdapterBank, LowRankAdapterBank, RAdapterBank

from conftest import REL_TOL, assert_close_rel, rel_err, require_native, require_triton

F64 = torch.float64


def radapters(base, n, rank=None, *, learn_scale=True, drop_prob=0.0, granularity="sample",
              batch_first=True):
    """n "trained" RAdapters of one base: random (non-zero) adapter weights, distinct scales."""
    out = []
    for i in range(n):
        a = pyadapt.RAdapter(base, rank, drop_prob, scale=0.1 * (i + 1), learn_scale=learn_scale,
                             eval_scale=0.5 + 0.1 * i, drop_granularity=granularity,
                             batch_first=batch_first)
        with torch.no_grad():
            for name, t in a.adapter_tensors():
                if name != "scale":
                    t.normal_(0, 0.3)
        out.append(a)
    return out


def sample_ids(ids: torch.Tensor, shape, batch_first: bool = True) -> torch.Tensor:
    """Per-row ids (shape[:-1]) of per-sample ids."""
    lead = tuple(shape[:-1])
    if not batch_first:
        return ids[None, :].expand(lead)
    return ids.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead)


def check_against_modules(bank, adapters, base, x, ids, *, seed=None, batch_first=True):
    """bank(x, ids) == adapter a's module on the rows of id a (base(x) on -1 rows), forward and
    every adapter gradient, in the bank's current mode. With `seed`, the default generator is
    re-seeded before the bank and before each module call (the same dropping mask)."""
    bank.zero_grad()
    for a in adapters:
        a.zero_grad()
    row_ids = ids if ids.dim() == x.dim() - 1 else sample_ids(ids, x.shape, batch_first)
    g = torch.randn(x.shape[:-1] + (base.out_features,), dtype=x.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    y = bank(x, ids)
    (y * g).sum().backward()
    expect = base(x).detach()
    for a, module in enumerate(adapters):
        if seed is not None:
            torch.manual_seed(seed)
        ya = module(x)
        mine = (row_ids == a).unsqueeze(-1)
        (ya * g * mine).sum().backward()
        expect = torch.where(mine, ya.detach(), expect)
    assert_close_rel(y.detach(), expect, F64, f"{'train' if bank.training else 'eval'} y")
    for a, module in enumerate(adapters):
        for name, t in module.adapter_tensors():
            grad = getattr(bank, name).grad
            want = t.grad if t.grad is not None else torch.zeros_like(t)
            assert_close_rel(grad[a], want, F64, f"d{name}[{a}]")
    assert base.weight.grad is None, "the base stays frozen"
    return y.detach()


# ----------------------------------------------------------------------------------------------
# The full-rank bank is the loop of full-rank RAdapters
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn_scale", [True, False])
def test_full_rank_bank_equals_each_adapter(learn_scale):
    base = nn.Linear(10, 14, dtype=F64)
    adapters = radapters(base, 4, learn_scale=learn_scale)
    bank = AdapterBank.from_adapters(adapters)
    assert isinstance(bank, RAdapterBank) and bank.rank is None
    assert bank.full_weight.shape == (4, 14, 14)
    x = torch.randn(5, 3, 10, dtype=F64)
    ids = torch.tensor([1, 2, -1, 0, 1])          # adapter 3: no sample
    for mode in (True, False):
        bank.train(mode)
        for a in adapters:
            a.train(mode)
        check_against_modules(bank, adapters, base, x, ids)
        assert torch.equal(bank.full_weight.grad[3], torch.zeros(14, 14, dtype=F64)), \
            "an adapter no row names gets zero gradient"


def test_full_rank_bank_per_row_ids_and_fresh_bank_is_identity():
    base = nn.Linear(6, 9, dtype=F64)
    adapters = radapters(base, 3)
    bank = RAdapterBank.from_adapters(adapters)
    x = torch.randn(4, 5, 6, dtype=F64)
    ids = torch.randint(-1, 3, (4, 5))
    check_against_modules(bank, adapters, base, x, ids)
    fresh = RAdapterBank(base, 3)                 # full_weight zero-init: y = base(x)
    assert torch.equal(fresh(x, ids), base(x)), "a fresh full-rank bank is the base layer"


# ----------------------------------------------------------------------------------------------
# Adapter dropping: both forms, every granularity, the same mask as RAdapter
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity,batch_first", [("sample", True), ("row", True),
                                                     ("position", True),
                                                     ("position", False)])
@pytest.mark.parametrize("rank", [None, 3])
def test_dropping_equals_each_adapter(rank, granularity, batch_first):
    base = nn.Linear(8, 12, dtype=F64)
    p = 0.4
    adapters = radapters(base, 3, rank, drop_prob=p, granularity=granularity,
                         batch_first=batch_first)
    bank = AdapterBank.from_adapters(adapters).train()
    assert (bank.drop_prob, bank.drop_granularity, bank.batch_first) == (p, granularity,
                                                                         batch_first)
    shape = (6, 7, 8) if batch_first else (7, 6, 8)
    x = torch.randn(shape, dtype=F64)
    ids = torch.tensor([0, 2, -1, 1, 2, 0])
    row_ids = sample_ids(ids, shape, batch_first)
    per_row = granularity == "row" or not batch_first
    check_against_modules(bank, adapters, base, x, row_ids if per_row else ids, seed=7,
                          batch_first=batch_first)
    # the mask dropped some adapted rows and kept others, or the test proves nothing
    torch.manual_seed(7)
    keep = reference.drop_multiplier(shape, granularity, p, batch_first=batch_first) > 0
    adapted = row_ids.reshape(-1) >= 0
    assert (keep & adapted).any() and (~keep & adapted).any(), "both kept and dropped rows"
    bank.eval()
    for a in adapters:
        a.eval()
    check_against_modules(bank, adapters, base, x, ids if batch_first else row_ids,
                          batch_first=batch_first)   # eval: no dropping


def test_dropped_rows_pass_through_and_scale_gradient_flows():
    base = nn.Linear(5, 5, dtype=F64)
    bank = RAdapterBank.from_adapters(radapters(base, 2, drop_prob=0.5, granularity="row"))
    x = torch.randn(40, 5, dtype=F64)
    ids = torch.randint(0, 2, (40,))
    torch.manual_seed(3)
    y = bank(x, ids)
    torch.manual_seed(3)
    keep = reference.drop_multiplier(x.shape, "row", 0.5) > 0
    assert (~keep).any() and keep.any()
    assert torch.equal(y[~keep], base(x)[~keep]), "dropped rows are the base output exactly"
    y.sum().backward()
    assert (bank.scale.grad != 0).all(), "d s flows through c / (1 - p)"


def test_dropping_on_triton_matches_reference():
    """The full-rank bank end to end on the triton backend (interpreter on CPU), training with
    dropping: forward and gradients equal the reference backend's."""
    require_triton()
    base = nn.Linear(12, 20, dtype=F64)
    bank = RAdapterBank.from_adapters(radapters(base, 3, drop_prob=0.3)).train()
    x = torch.randn(4, 6, 12, dtype=F64)
    ids = torch.tensor([2, -1, 0, 2])
    out = {}
    for backend in ("triton", "reference"):
        bank.zero_grad()
        torch.manual_seed(11)
        with pyadapt.use_backend(backend):
            y = bank(x, ids)
            y.square().sum().backward()
        out[backend] = (y.detach(), bank.full_weight.grad.clone(), bank.scale.grad.clone())
    for what, t, r in zip(("y", "dW_f", "ds"), out["triton"], out["reference"]):
        assert rel_err(t, r) <= REL_TOL[F64], what


def test_autocast_bf16_eval():
    base = nn.Linear(16, 24)
    bank = RAdapterBank.from_adapters(radapters(base, 2)).eval()
    x, ids = torch.randn(3, 4, 16), torch.tensor([1, -1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank(x, ids)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y.float(), bank(x, ids).detach(), torch.bfloat16, "autocast bf16 vs fp32")


# ----------------------------------------------------------------------------------------------
# LoRA bank dropout "input" (PEFT's): on the adapter input, the base reads x undropped
# ----------------------------------------------------------------------------------------------

def test_lora_bank_dropout_equals_each_adapter_with_the_same_mask():
    base = nn.Linear(10, 7, dtype=F64)
    p = 0.3
    adapters = []
    for i in range(3):
        a = pyadapt.LowRankAdapter(base, rank=4, alpha=2.0 + i, dropout=p)
        with torch.no_grad():
            a.up_weight.normal_(0, 0.3)
        adapters.append(a)
    bank = LowRankAdapterBank.from_adapters(adapters, dropout_position="input").train()
    assert bank.dropout == p
    x = torch.randn(5, 4, 10, dtype=F64)
    ids = torch.tensor([2, -1, 0, 2, 1])
    g = torch.randn(5, 4, 7, dtype=F64)
    torch.manual_seed(5)
    y = bank(x, ids)
    (y * g).sum().backward()
    torch.manual_seed(5)                       # the bank's mask: F.dropout on the (M, in) rows
    x_drop = F.dropout(x.reshape(-1, 10), p, training=True).reshape(x.shape)
    assert (x_drop == 0).any(), "some inputs were dropped"
    expect = base(x).detach()
    for a, ad in enumerate(adapters):
        rows = ids == a
        down = ad.down_weight.detach().clone().requires_grad_()
        up = ad.up_weight.detach().clone().requires_grad_()
        delta = ad.scaling * F.linear(F.linear(x_drop[rows], down), up)
        (delta * g[rows]).sum().backward()
        expect[rows] = expect[rows] + delta.detach()
        assert_close_rel(bank.down_weight.grad[a], down.grad, F64, f"dA[{a}]")
        assert_close_rel(bank.up_weight.grad[a], up.grad, F64, f"dB[{a}]")
    assert_close_rel(y.detach(), expect, F64, "y")
    assert torch.equal(y[1], base(x[1])), "a -1 sample is the base of the undropped input"
    bank.eval()
    y_eval = bank(x, ids)
    for a, ad in enumerate(adapters):
        assert_close_rel(y_eval[ids == a], ad.eval()(x[ids == a]).detach(), F64,
                         f"eval: no dropout, adapter {a}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lora_bank_rank_dropout_equals_each_low_rank_adapter(backend):
    """dropout_position="rank": the bank drops in the rank space with the seed and batch-row
    mask LowRankAdapter draws, so each adapter's module on the whole batch, under the same
    generator state, gives the bank's rows and gradients."""
    if backend == "cpu":
        require_native()
    base = nn.Linear(10, 7, dtype=F64)
    adapters = []
    for i in range(3):
        a = pyadapt.LowRankAdapter(base, rank=4, alpha=2.0 + i, dropout=0.4)
        with torch.no_grad():
            a.up_weight.normal_(0, 0.3)
        adapters.append(a)
    bank = LowRankAdapterBank.from_adapters(adapters, dropout_position="rank").train()
    x = torch.randn(5, 4, 10, dtype=F64)
    ids = torch.tensor([2, -1, 0, 2, 1])
    with pyadapt.use_backend(backend):
        y = check_against_modules(bank, adapters, base, x, ids, seed=9)
    torch.manual_seed(9)
    with torch.no_grad():
        undropped = bank.eval()(x, ids)
    assert not torch.allclose(y, undropped), "the rank-space mask dropped something"


def test_lora_bank_rejects_mixed_dropout():
    base = nn.Linear(6, 6)
    a, b = pyadapt.LowRankAdapter(base, 2, dropout=0.1), pyadapt.LowRankAdapter(base, 2)
    with pytest.raises(ValueError, match=r"adapters\[1\]: expected dropout 0.1"):
        AdapterBank.from_adapters([a, b])


# ----------------------------------------------------------------------------------------------
# Building: from_adapters / to_adapters / from_state_dicts / checkpoints / EMA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [None, 4])
def test_round_trips(rank):
    base = nn.Linear(9, 11, dtype=F64)
    adapters = radapters(base, 3, rank, drop_prob=0.2, granularity="position")
    bank = RAdapterBank.from_adapters(adapters)
    x = torch.randn(2, 3, 9, dtype=F64)
    for a, back in enumerate(bank.to_adapters()):
        assert back.base is base and back.rank == rank
        assert (back.drop_prob, back.drop_granularity) == (0.2, "position")
        assert torch.equal(back.eval()(x), adapters[a].eval()(x)), f"to_adapters()[{a}]"
    # from saved adapters: adapter_state_dict of each, inside a model (a name prefix)
    sds = [pyadapt.adapter_state_dict(nn.Sequential(nn.Identity(), a)) for a in adapters]
    assert all(any(k.startswith("1.") for k in sd) for sd in sds)
    again = RAdapterBank.from_state_dicts(base, sds, eval_scale=[a.eval_scale for a in adapters],
                                          drop_prob=0.2, drop_granularity="position")
    ids = torch.tensor([2, 0])
    assert torch.equal(again.eval()(x, ids), bank.eval()(x, ids)), "from_state_dicts"
    for name, t in bank.adapter_tensors():
        assert torch.equal(getattr(again, name), t), name


def test_from_state_dicts_fixed_scale_and_errors():
    base = nn.Linear(4, 6, dtype=F64)
    adapters = radapters(base, 2, learn_scale=False)
    sds = [pyadapt.adapter_state_dict(a) for a in adapters]
    assert set(sds[0]) == {"full_weight"}
    bank = RAdapterBank.from_state_dicts(base, sds, scale=[0.1, 0.2], eval_scale=[0.5, 0.6])
    x, ids = torch.randn(3, 4, dtype=F64), torch.tensor([0, 1, -1])
    assert torch.equal(bank.eval()(x, ids), RAdapterBank.from_adapters(adapters).eval()(x, ids))
    bad = [({"full_weight": torch.zeros(5, 5, dtype=F64)}, ValueError,
            r"state_dicts\[0\]\['full_weight'\]: expected shape \(6, 6\)"),
           ({"a.full_weight": torch.zeros(6, 6), "b.full_weight": torch.zeros(6, 6)},
            ValueError, "exactly one"),
           ({"full_weight": torch.zeros(6, 6), "bias": torch.zeros(6)}, ValueError,
            "unexpected keys"),
           ({"down_weight": torch.zeros(2, 6)}, ValueError, "missing key 'up_weight'")]
    for sd, error, message in bad:
        with pytest.raises(error, match=message):
            RAdapterBank.from_state_dicts(base, [sd])
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        RAdapterBank.from_state_dicts(nn.Identity(), sds)
    with pytest.raises(ValueError, match="state_dicts: expected at least one"):
        RAdapterBank.from_state_dicts(base, [])


def test_from_adapters_errors():
    base = nn.Linear(6, 6)
    full, low = pyadapt.RAdapter(base), pyadapt.RAdapter(base, rank=2)
    with pytest.raises(ValueError, match=r"adapters\[1\]: is low-rank \(rank=2\).*cannot be "
                                         r"mixed"):
        AdapterBank.from_adapters([full, low])
    with pytest.raises(ValueError, match=r"adapters\[1\]: is full-rank"):
        RAdapterBank.from_adapters([low, full])
    with pytest.raises(ValueError, match="same frozen base"):
        RAdapterBank.from_adapters([full, pyadapt.RAdapter(nn.Linear(6, 6))])
    with pytest.raises(ValueError, match=r"adapters\[1\]: expected drop_prob 0.2"):
        RAdapterBank.from_adapters([pyadapt.RAdapter(base, drop_prob=0.2), full])
    with pytest.raises(ValueError, match="drop_granularity 'sample'"):
        RAdapterBank.from_adapters([pyadapt.RAdapter(base, drop_prob=0.2),
                                    pyadapt.RAdapter(base, drop_prob=0.2,
                                                     drop_granularity="row")])
    with pytest.raises(ValueError, match="fixed scale"):
        RAdapterBank.from_adapters([pyadapt.RAdapter(base, learn_scale=False), full])
    with pytest.raises(TypeError, match=r"adapters\[1\]: expected a pyadapt.RAdapter"):
        RAdapterBank.from_adapters([full, nn.Linear(6, 6)])
    with pytest.raises(ValueError, match="rank: expected 1 <= rank <= 6"):
        RAdapterBank(base, 2, rank=7)
    with pytest.raises(ValueError, match="drop_granularity"):
        RAdapterBank(base, 2, drop_granularity="token")
    bank = RAdapterBank(base, 2)
    with pytest.raises(ValueError, match="x: expected last dimension 6"):
        bank(torch.randn(3, 5), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids: expected ids in \[-1, 2\)"):
        bank(torch.randn(3, 6), torch.tensor([0, 2, 0]))


def test_checkpoint_and_ema(tmp_path):
    """adapter_state_dict / save_adapters / load_adapters carry the full-rank bank's tensors
    (full_weight, the learnable scale); the per-slot eval_scale and the rank are configuration,
    given to the bank that loads and checked against the header. AdapterEMA shadows drive
    eval."""
    base = nn.Linear(8, 8, dtype=F64)
    bank = RAdapterBank.from_adapters(radapters(base, 3))
    assert set(pyadapt.adapter_state_dict(bank)) == {"full_weight", "scale"}
    path = tmp_path / "bank.safetensors"
    pyadapt.save_adapters(bank, path)
    fresh = RAdapterBank(base, 3, eval_scale=bank.eval_scale.tolist())
    pyadapt.load_adapters(fresh, path)
    x, ids = torch.randn(4, 8, dtype=F64), torch.tensor([0, 2, -1, 1])
    assert torch.equal(fresh.eval()(x, ids), bank.eval()(x, ids)), "loaded bank"
    low = RAdapterBank(base, 3, rank=2, eval_scale=bank.eval_scale.tolist())
    with pytest.raises(ValueError, match="rank"):
        pyadapt.load_adapters(low, path)
    with pytest.raises(ValueError, match="eval_scale"):   # configuration is checked too
        pyadapt.load_adapters(RAdapterBank(base, 3), path)
    ema = pyadapt.AdapterEMA(bank, momentum=0.5)
    before = bank.eval()(x, ids).detach()
    with torch.no_grad():
        bank.full_weight.add_(1.0)
    assert torch.equal(bank(x, ids), before), "eval uses the (unchanged) EMA shadows"
    ema.update()
    assert not torch.equal(bank(x, ids), before), "the shadows moved half way"


def test_compiles_fullgraph_with_dropping():
    """torch.compile(fullgraph=True) traces the full-rank bank in training with dropping (the
    mask draw, the id rewrite and the op); aot_eager draws the same mask as eager."""
    base = nn.Linear(8, 8)
    bank = RAdapterBank.from_adapters(radapters(base, 2, drop_prob=0.3)).train()
    x, ids = torch.randn(4, 3, 8), torch.tensor([1, -1, 0, 1])
    compiled = torch.compile(bank, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    y = compiled(x, ids)
    torch.manual_seed(1)
    assert torch.equal(y, bank(x, ids)), "compiled == eager with the same generator state"
    y.sum().backward()
    assert bank.full_weight.grad.abs().sum() > 0, "gradients flow through the compiled bank"
