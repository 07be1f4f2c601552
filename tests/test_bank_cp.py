"""CPAdapterBank: N CP / Tucker (Aurora) sites of one frozen linear, each row by its own adapter.

Ground truth: a float64 loop over rows that applies Aurora's definition block by block (x split
into width-sized blocks, h_i = U x_i, z_o = sum_i M_oi^T h_i, y_o += V z_o with
M_oi = C x_3 lambda_oi or diag(lambda_oi)), and autograd through that loop for the gradients of
x, U, V, C and lambda. The bank instead folds the core into one factor and runs the LoRA form of
the bank op, so agreement checks the fold as well as the op. Also checked: the bank against the
CPLinear sites it was built from, the triton backend (TRITON_INTERPRET=1 on CPU, small shapes,
NaN-poisoned buffers), round trips, and bad input. The @pytest.mark.gpu test (compiled kernels
at Aurora's ViT-B fc1/fc2 shapes) FAILS without CUDA; run it with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt.bank import AdapterBank, CPAdapterBank

from conftest import assert_close_rel, require_triton

PARAMS = ("U", "V", "C", "lam")


def make_ids(pattern: str, m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "one_id":
        return torch.full((m,), n - 1, dtype=torch.int64)
    if pattern == "all_different":
        assert m <= n
        return torch.randperm(n, generator=gen)[:m]
    if pattern == "with_unadapted":
        ids = torch.randint(-1, n, (m,), generator=gen)
        ids[0], ids[-1] = -1, 0
        return ids
    if pattern == "unsorted":
        return torch.randint(0, n, (m,), generator=gen).flip(0)
    if pattern == "empty_groups":      # only even ids: the odd adapters have no rows
        return 2 * torch.randint(0, (n + 1) // 2, (m,), generator=gen)
    raise AssertionError(pattern)


def make_bank(n, d_in, d_out, width, rank, core="tucker", dtype=torch.float64, *, gen=None,
              **kw) -> CPAdapterBank:
    """A bank with "trained" random parameters: V is not zero (its init), or every gradient but
    dV would be zero and the comparison could not fail."""
    base = nn.Linear(d_in, d_out, dtype=dtype)
    bank = CPAdapterBank(base, n, rank, core, width=width, **kw)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(bank, name)
            if p is not None:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen, dtype=torch.float64))
        base.bias.copy_(torch.randn(base.bias.shape, generator=gen, dtype=torch.float64))
    return bank


def loop_reference(bank: CPAdapterBank, x2: torch.Tensor, ids: torch.Tensor, g: torch.Tensor):
    """(y, {name: grad}) in float64 from a per-row loop over Aurora's block definition."""
    W = bank.base.weight.detach().double()
    b = bank.base.bias.detach().double()
    leaves = {k: getattr(bank, k).detach().double().requires_grad_()
              for k in PARAMS if getattr(bank, k) is not None}
    x = x2.detach().double().requires_grad_()
    w = bank.width
    out = []
    for m in range(x.shape[0]):
        y_m = W @ x[m] + b
        a = int(ids[m])
        if a >= 0:
            blocks = x[m].reshape(bank.n_in, w)                      # x_i
            h = blocks @ leaves["U"][a].T                            # h_i = U x_i   (n_in, R)
            lam = leaves["lam"][a]                                   # (n_out, n_in, R)
            if "C" in leaves:
                core = torch.einsum("abc,oic->oiab", leaves["C"][a], lam)
            else:
                core = torch.diag_embed(lam)
            z = torch.einsum("oiab,ia->ob", core, h)                 # z_o = sum_i M_oi^T h_i
            y_m = y_m + (z @ leaves["V"][a].T).reshape(-1)           # y_o += V z_o
        out.append(y_m)
    y = torch.stack(out) if out else x.new_zeros(0, W.shape[0])
    grads = torch.autograd.grad(y, [x] + list(leaves.values()), g.double(), allow_unused=True)
    names = ["x"] + list(leaves)
    return y.detach(), {k: (torch.zeros_like(t) if gr is None else gr)
                        for k, gr, t in zip(names, grads, [x] + list(leaves.values()))}


def bank_with_grads(bank, x, ids, g):
    x = x.detach().clone().requires_grad_()
    bank.zero_grad(set_to_none=True)
    y = bank(x, ids)
    y.backward(g)
    grads = {"x": x.grad}
    grads.update({k: getattr(bank, k).grad for k in PARAMS if getattr(bank, k) is not None})
    return y.detach(), grads


def check(bank, x, ids, dtype, what=""):
    """The bank's output and every gradient against the float64 loop reference."""
    g = torch.randn(*x.shape[:-1], bank.out_features, dtype=torch.float64).to(dtype)
    y, grads = bank_with_grads(bank, x, ids, g)
    x2, g2 = x.reshape(-1, bank.in_features), g.reshape(-1, bank.out_features)
    rows = ids if ids.numel() == x2.shape[0] else ids.repeat_interleave(
        x2.shape[0] // max(ids.numel(), 1))
    y_ref, grads_ref = loop_reference(bank, x2, rows.reshape(-1), g2)
    assert_close_rel(y.reshape(-1, bank.out_features), y_ref, dtype, f"{what} y")
    for k, ref in grads_ref.items():
        got = grads[k]
        assert got is not None, f"{what} d{k}: no gradient reached it"
        assert_close_rel(got.reshape(ref.shape), ref, dtype, f"{what} d{k}")
    return y, grads


# ----------------------------------------------------------------------------------------------
# against the float64 loop reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["one_id", "all_different", "with_unadapted", "unsorted",
                                     "empty_groups"])
@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_id_patterns_float64(pattern, core):
    gen = torch.Generator().manual_seed(3)
    n = 9 if pattern == "all_different" else 5
    m = 9 if pattern == "all_different" else 23
    bank = make_bank(n, 12, 18, 6, 3, core, gen=gen)     # n_in 2 <= n_out 3: core into up
    x = torch.randn(m, 12, generator=gen, dtype=torch.float64)
    ids = make_ids(pattern, m, n, gen)
    _, grads = check(bank, x, ids, torch.float64, pattern)
    if pattern == "empty_groups":
        for k in ("U", "V", "lam"):
            assert torch.count_nonzero(grads[k][1::2]) == 0, f"d{k} of adapters with no rows"
            assert torch.count_nonzero(grads[k][0::2]) > 0, f"d{k} of adapters with rows"


@pytest.mark.parametrize("d_in,d_out,width,rank", [
    (21, 35, 7, 1),      # n_in 3 < n_out 5: core folded into up, rank 1
    (35, 14, 7, 7),      # n_in 5 > n_out 2: core folded into down, rank = width
    (20, 20, 10, 4),     # n_in = n_out = 2 (square, block-split)
    (13, 13, 13, 5),     # one block, width not a power of two
    (9, 45, 9, 9),       # Aurora's fc1 shape: one block in, five out
])
@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_odd_sizes_float64(d_in, d_out, width, rank, core):
    gen = torch.Generator().manual_seed(d_in * 100 + d_out)
    bank = make_bank(4, d_in, d_out, width, rank, core, gen=gen)
    assert bank.folded_rank == rank * min(d_in // width, d_out // width)
    x = torch.randn(3, 5, d_in, generator=gen, dtype=torch.float64)     # per-sample ids
    check(bank, x, torch.tensor([2, -1, 0]), torch.float64, f"{d_in}->{d_out}")


def test_rank_up_to_128():
    gen = torch.Generator().manual_seed(5)
    bank = make_bank(2, 128, 128, 128, 128, "cp", gen=gen)
    x = torch.randn(6, 128, generator=gen, dtype=torch.float64)
    check(bank, x, torch.tensor([1, 0, -1, 1, 1, 0]), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    gen = torch.Generator().manual_seed(7)
    bank = make_bank(3, 16, 24, 8, 4, "tucker", gen=gen).to(dtype)
    x = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64).to(dtype)
    y, _ = check(bank, x, torch.tensor([[0, 1, 2, -1, 2, 2, 0], [1, 1, -1, 0, 2, 1, 0]]), dtype)
    assert y.dtype == dtype


def test_autocast_bfloat16():
    gen = torch.Generator().manual_seed(8)
    bank = make_bank(3, 16, 24, 8, 4, "tucker", gen=gen).float()
    x = torch.randn(10, 16, generator=gen)
    ids = torch.tensor([0, 1, 2, -1, 2, 2, 0, 1, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank(x, ids)
    assert y.dtype == torch.bfloat16
    y_ref, _ = loop_reference(bank, x, ids, torch.zeros(10, 24, dtype=torch.float64))
    assert_close_rel(y, y_ref, torch.bfloat16, "autocast y")


def test_empty_batch():
    bank = make_bank(3, 12, 18, 6, 3)
    x = torch.randn(0, 12, dtype=torch.float64, requires_grad=True)
    y = bank(x, torch.zeros(0, dtype=torch.int64))
    assert y.shape == (0, 18)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    for k in PARAMS:
        assert torch.count_nonzero(getattr(bank, k).grad) == 0, f"d{k} of an empty batch"


def test_unadapted_rows_are_the_base_output():
    bank = make_bank(2, 12, 18, 6, 3)
    x = torch.randn(5, 12, dtype=torch.float64)
    y = bank(x, torch.tensor([-1, 0, -1, 1, -1]))
    base = bank.base(x).detach()
    assert torch.equal(y[0::2], base[0::2])


def test_validate_flag():
    bank = make_bank(2, 12, 18, 6, 3)
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"adapter_ids: expected ids in \[-1, 2\)"):
        bank(x, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="adapter_ids"):
        bank(x, torch.tensor([0, -2, 1]))
    y = bank(x, torch.tensor([0, 7, -5]), validate=False)   # out of range: the base only
    assert torch.equal(y[1:], bank.base(x[1:]).detach())
    y_ok = bank(x, torch.tensor([0, -1, -1]))
    assert torch.equal(y[0], y_ok[0])


# ----------------------------------------------------------------------------------------------
# built from CPAdapter sites: the bank matches each site, and back
# ----------------------------------------------------------------------------------------------

def trained_tasks(n, base, other, core, rank=3, width=6):
    """n tasks, each a CPAdapter over (base, other) with random "trained" tensors."""
    tasks = []
    for _ in range(n):
        cp = pyadapt.CPAdapter([base, other], rank=rank, core=core, dropout=0.1, width=width)
        with torch.no_grad():
            cp.V.normal_(0, 0.4)
            for site in cp.sites:
                site.lam.normal_(0, 0.5)
        tasks.append(cp.eval())
    return tasks


@pytest.mark.parametrize("core", ["tucker", "cp"])
def test_bank_equals_each_site(core):
    base = nn.Linear(12, 24, dtype=torch.float64)
    other = nn.Linear(24, 12, dtype=torch.float64)
    tasks = trained_tasks(3, base, other, core)
    sites = [t[0] for t in tasks]
    bank = AdapterBank.from_adapters(sites)                  # dispatches on the kind
    assert isinstance(bank, CPAdapterBank)
    bank.eval()                                               # the sites had dropout 0.1
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0, 1])
    g = torch.randn(4, 5, 24, dtype=torch.float64)
    y = bank(x, ids)
    (y * g).sum().backward()
    for b in range(4):
        a = int(ids[b])
        expect = base(x[b]) if a < 0 else sites[a](x[b])
        assert_close_rel(y[b], expect.detach(), torch.float64, f"sample {b} (adapter {a})")
        if a >= 0:
            (sites[a](x[b]) * g[b]).sum().backward()
    for a, site in enumerate(sites):
        for k in PARAMS:
            if getattr(site, k) is not None:
                assert_close_rel(getattr(bank, k).grad[a], getattr(site, k).grad,
                                 torch.float64, f"d{k} of adapter {a}")
    assert base.weight.grad is None and base.bias.grad is None, "the base stays frozen"

    back = bank.to_adapters()
    for a, site in enumerate(back):
        assert isinstance(site, pyadapt.CPLinear) and site.base is base
        assert site.dropout == 0.1 and site.core_kind == core
        assert torch.equal(site.eval()(x[0]), sites[a](x[0])), f"to_adapters()[{a}]"
    again = CPAdapterBank.from_adapters(back).eval()
    assert torch.equal(again(x, ids), y.detach())


def test_one_site_cp_adapters_and_equal_bases_are_accepted():
    base = nn.Linear(8, 8)
    twin = nn.Linear(8, 8)
    with torch.no_grad():
        twin.load_state_dict(base.state_dict())
    bank = AdapterBank.from_adapters([pyadapt.CPAdapter([base], rank=2, core="cp"),
                                      pyadapt.CPAdapter([twin], rank=2, core="cp")[0]])
    assert isinstance(bank, CPAdapterBank) and bank.base is base and bank.C is None
    assert [k for k, _ in bank.adapter_tensors()] == ["U", "V", "lam"]


def test_training_dropout_rule_and_training_step():
    base = nn.Linear(12, 24, dtype=torch.float64)
    other = nn.Linear(24, 12, dtype=torch.float64)
    bank = CPAdapterBank.from_adapters([t[0] for t in trained_tasks(2, base, other, "tucker")])
    x = torch.randn(4, 12, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, -1])
    bank.train()                # the sites' dropout 0.1 applies (test_bank_dropout.py)
    with torch.no_grad():
        assert torch.equal(bank(x, ids)[3], bank.base(x)[3]), "id -1: the base output"
    bank.eval()
    y_eval = bank(x, ids)
    bank.train()
    bank.dropout = 0.0
    assert torch.equal(bank(x, ids), y_eval), "no dropout: training and eval agree"
    before = {k: getattr(bank, k).detach().clone() for k in PARAMS}
    opt = torch.optim.SGD(bank.parameters(), lr=0.1)
    bank(x, ids).square().sum().backward()
    opt.step()
    for k in PARAMS:
        assert not torch.equal(getattr(bank, k), before[k]), f"{k} was not trained"


# ----------------------------------------------------------------------------------------------
# triton backend (the grouped kernels of pyadapt.kernels.bank) under the interpreter
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("core,d_in,d_out,width", [("tucker", 12, 18, 6), ("cp", 21, 14, 7)])
def test_triton_backend(core, d_in, d_out, width, poison_allocations):
    require_triton()
    from pyadapt.kernels import bank as K
    allocated = poison_allocations(K)
    gen = torch.Generator().manual_seed(11)
    bank = make_bank(4, d_in, d_out, width, 3, core, gen=gen)
    x = torch.randn(37, d_in, generator=gen, dtype=torch.float64)
    ids = make_ids("with_unadapted", 37, 4, gen)
    ids[ids == 2] = 3                                   # adapter 2: an empty group
    with pyadapt.use_backend("triton"):
        check(bank, x, ids, torch.float64, "triton")
    assert allocated, "the triton launchers ran (and allocated through the poisoned hook)"


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_bad_input():
    bank = make_bank(2, 12, 18, 6, 3)
    x = torch.randn(3, 12, dtype=torch.float64)
    ids = torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match="x: .*12"):
        bank(torch.randn(3, 10, dtype=torch.float64), ids)
    with pytest.raises(TypeError, match="x: expected dtype torch.float64"):
        bank(x.float(), ids)
    with pytest.raises(TypeError, match="adapter_ids: expected an integer tensor"):
        bank(x, ids.double())
    with pytest.raises(TypeError, match="adapter_ids: expected an integer torch.Tensor"):
        bank(x, [0, 1, -1])
    with pytest.raises(ValueError, match=r"adapter_ids: expected shape"):
        bank(x, torch.tensor([0, 1]))


def test_bad_construction():
    base = nn.Linear(12, 18)
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        CPAdapterBank(nn.Conv1d(12, 18, 1), 2)
    with pytest.raises(ValueError, match="num_adapters"):
        CPAdapterBank(base, 0, 2, width=6)
    with pytest.raises(ValueError, match="width: expected a divisor"):
        CPAdapterBank(base, 2, 2, width=5)
    with pytest.raises(ValueError, match=r"rank: expected 1 <= rank <= 6"):
        CPAdapterBank(base, 2, 7, width=6)
    with pytest.raises(ValueError, match="core"):
        CPAdapterBank(base, 2, 2, "svd", width=6)


def test_from_adapters_rejects_mismatches():
    base = nn.Linear(12, 24)
    other = nn.Linear(24, 12)
    cp = pyadapt.CPAdapter([base, other], rank=2, width=6)
    with pytest.raises(ValueError, match="expected at least one adapter"):
        CPAdapterBank.from_adapters([])
    with pytest.raises(ValueError, match=r"adapters\[0\]: a CPAdapter with 2 sites"):
        AdapterBank.from_adapters([cp])
    with pytest.raises(TypeError, match=r"adapters\[1\]: expected a pyadapt.CPLinear"):
        AdapterBank.from_adapters([cp[0], pyadapt.LowRankAdapter(base, rank=2)])
    for bad, what in [(pyadapt.CPAdapter([base], rank=3, width=6)[0], "expected rank 2"),
                      (pyadapt.CPAdapter([base], rank=2, core="cp", width=6)[0],
                       "expected core tucker"),
                      (pyadapt.CPAdapter([base], rank=2, width=12)[0], "expected width 6"),
                      (pyadapt.CPAdapter([nn.Linear(12, 24)], rank=2, width=6)[0],
                       "same frozen base")]:
        with pytest.raises(ValueError, match=what):
            AdapterBank.from_adapters([cp[0], bad])
    merged = pyadapt.CPAdapter([base], rank=2, width=6)[0]
    merged.merged = True            # as pyadapt.fold_ leaves it, without touching the base
    with pytest.raises(ValueError, match=r"adapters\[1\]: is folded into its base"):
        AdapterBank.from_adapters([cp[0], merged])



def test_checkpoints_and_ema_see_the_stacked_tensors():
    bank = make_bank(2, 12, 18, 6, 3).eval()
    sd = pyadapt.adapter_state_dict(bank)
    assert set(sd) == {"U", "V", "C", "lam"}, "the frozen base and the unit scale are not saved"
    ema = pyadapt.AdapterEMA(bank, momentum=0.5)
    x, ids = torch.randn(4, 12, dtype=torch.float64), torch.tensor([0, 1, 1, -1])
    before = bank(x, ids).detach()
    with torch.no_grad():
        bank.V.add_(1.0)
    assert torch.equal(bank(x, ids), before), "eval uses the (unchanged) EMA shadows"
    ema.update()
    assert not torch.equal(bank(x, ids), before), "the shadows moved half way"


def test_compiles_fullgraph():
    bank = make_bank(3, 12, 18, 6, 3).eval()
    x, ids = torch.randn(5, 12, dtype=torch.float64), torch.tensor([0, 2, -1, 1, 0])
    compiled = torch.compile(bank, fullgraph=True, backend="aot_eager")
    assert_close_rel(compiled(x, ids), bank(x, ids).detach(), torch.float64, "compiled bank")


@pytest.mark.gpu
@pytest.mark.parametrize("d_in,d_out", [(768, 3072), (3072, 768)])
def test_gpu_aurora_shapes_float32(d_in, d_out):
    """Aurora's fc1 / fc2 (width 768, rank 64), 8 tasks, 4096 rows: the compiled triton kernels
    in float32 against the bank in float64 on the reference backend, forward and gradients."""
    if not torch.cuda.is_available():
        pytest.fail("CUDA is required for @pytest.mark.gpu tests")
    gen = torch.Generator().manual_seed(d_in)
    bank = make_bank(8, d_in, d_out, 768, 64, "tucker", torch.float32, gen=gen).cuda()
    x = torch.randn(4096, d_in, generator=gen).cuda()
    ids = torch.randint(-1, 8, (4096,), generator=gen).cuda()
    g = torch.randn(4096, d_out, generator=gen).cuda()
    with pyadapt.use_backend("triton"):
        y, grads = bank_with_grads(bank, x, ids, g)
    bank64 = copy.deepcopy(bank).double()
    with pyadapt.use_backend("reference"):
        y_ref, grads_ref = bank_with_grads(bank64, x.double(), ids, g.double())
    assert_close_rel(y, y_ref, torch.float32, "y")
    for k, ref in grads_ref.items():
        assert_close_rel(grads[k], ref, torch.float32, f"d{k}")
