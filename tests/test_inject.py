"""pyadapt.inject: adapters placed into any nn.Module by module name.

    "lora"        a matched nn.Linear W becomes  y = x W^T + b + (alpha / r) x A^T B^T
    "r-adapter"   y = z + c z W_f^T (full) or z + c (z W_d^T) W_u^T, z = x W^T + b,
                  c = s in training, s * eval_scale in eval
    "cp"          one CPAdapter over every matched linear: y = x W_k^T + b_k + x U^T M_k V^T,
                  M_k = C x_3 lambda_k, with U, V, C shared by all sites
    "bottleneck"  appended after a matched module: out = y + scale * up(relu(down(y))), y the
                  module's output (element 0 of a tuple output)

Each kind is checked against hand-written float64 eager maths on the original model (forward
hooks that add the adapter's formula to the original modules' outputs): the model output and the
gradient of every adapter tensor. The stand-in models copy the module naming of timm ViTs
(blocks.N.attn.qkv) and Hugging Face BERT (encoder.layer.N.attention.self.query).
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt import _placement
from pyadapt.inject import APPENDED, inject
from conftest import assert_close_rel

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# stand-ins with the module names of timm and Hugging Face models
# ----------------------------------------------------------------------------------------------

class TimmAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(att @ v)


class TimmMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = TimmAttention(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = TimmMlp(d, 2 * d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm VisionTransformer naming: blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2}."""

    def __init__(self, d=16, depth=2, dtype=F64):
        super().__init__()
        self.patch_embed = nn.Linear(12, d)
        self.blocks = nn.Sequential(*[TimmBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.patch_embed(x))))


class BertSelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h):
        q, k, v = self.query(h), self.key(h), self.value(h)
        return (torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v,)


class BertSelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self = BertSelfAttention(d)
        self.output = BertSelfOutput(d)

    def forward(self, h):
        return (self.output(self.self(h)[0], h),)


class BertIntermediate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, 2 * d)

    def forward(self, h):
        return torch.nn.functional.gelu(self.dense(h))


class BertLayer(nn.Module):
    """Returns a tuple, as Hugging Face layers do."""

    def __init__(self, d):
        super().__init__()
        self.attention = BertAttention(d)
        self.intermediate = BertIntermediate(d)
        self.output = BertSelfOutput(d)
        self.output.dense = nn.Linear(2 * d, d)

    def forward(self, h):
        a = self.attention(h)[0]
        return (self.output(self.intermediate(a), a), a)


class BertEncoder(nn.Module):
    def __init__(self, d, depth):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(d) for _ in range(depth))

    def forward(self, h):
        for layer in self.layer:
            h = layer(h)[0]
        return h


class TinyBert(nn.Module):
    """Hugging Face BERT naming: encoder.layer.N.attention.self.{query,key,value},
    attention.output.dense, intermediate.dense, output.dense."""

    def __init__(self, d=16, depth=2, dtype=F64):
        super().__init__()
        self.embeddings = nn.Linear(10, d)
        self.encoder = BertEncoder(d, depth)
        self.to(dtype)

    def forward(self, x):
        return self.encoder(self.embeddings(x))


def randomize_adapters(model: nn.Module, std: float = 0.3) -> None:
    """Adapters start at zero in places (up, V, W_f); give every adapter tensor fresh values."""
    with torch.no_grad():
        for t in pyadapt.adapter_state_dict(model).values():
            t.copy_(torch.randn_like(t) * std)


# ----------------------------------------------------------------------------------------------
# float64 eager maths of each kind, applied to the ORIGINAL modules through forward hooks
# ----------------------------------------------------------------------------------------------

def leaves(module: nn.Module, names) -> dict:
    """float64 leaf copies of a pyadapt module's tensors, for the eager reference's gradients."""
    return {n: getattr(module, n).detach().to(F64).clone().requires_grad_() for n in names}


def lora_delta(mod, t):
    return lambda x, y: y + mod.scaling * (x @ t["down_weight"].T) @ t["up_weight"].T


def radapter_delta(mod, t, training):
    s = t["scale"] if "scale" in t else mod.scale
    c = s if training else s * mod.eval_scale

    def f(x, z):
        if mod.rank is None:
            q = z @ t["full_weight"].T
        else:
            q = (z @ t["down_weight"].T) @ t["up_weight"].T
        return z + c * q
    return f


def cp_delta(shared, t):
    def f(x, y):
        m = torch.einsum("abc,c->ab", shared["C"], t["lam"][0, 0])
        return y + (x @ shared["U"].T) @ m @ shared["V"].T
    return f


def bottleneck_delta(mod, t):
    def f(x, y):
        h = torch.relu(y @ t["down.weight"].T + t["down.bias"])
        return y + mod.scale * (h @ t["up.weight"].T + t["up.bias"])
    return f


def hook_reference(original: nn.Module, deltas: dict) -> None:
    """Make original's module `name` return deltas[name](input, output) (element 0 of tuples)."""
    for name, f in deltas.items():
        def hook(mod, args, out, f=f):
            if isinstance(out, tuple):
                return (f(args[0], out[0]),) + out[1:]
            return f(args[0], out)
        original.get_submodule(name).register_forward_hook(hook)


def check_against_reference(model, reference_model, ref_leaves: dict, x, what):
    """Outputs and every adapter tensor's gradient, pyadapt vs the hooked float64 eager model."""
    out = model(x)
    ref = reference_model(x)
    assert_close_rel(out, ref, F64, f"{what}: output")
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    named = pyadapt.adapter_state_dict(model)
    params = dict(model.named_parameters())
    assert set(ref_leaves) == set(named), f"{what}: adapter tensors {sorted(named)}"
    for name, leaf in ref_leaves.items():
        grad = params[name].grad
        assert grad is not None, f"{what}: {name} got no gradient"
        assert_close_rel(grad, leaf.grad, F64, f"{what}: d{name}")
    for name, p in model.named_parameters():
        if name not in named:
            assert p.grad is None, f"{what}: frozen backbone parameter {name} got a gradient"


# ----------------------------------------------------------------------------------------------
# each kind against its formula
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["string", "partial", "class"])
def test_lora_on_timm_qkv_matches_eager(spelling):
    original = TinyViT()
    model = copy.deepcopy(original)
    adapter = {"string": "lora", "partial": functools.partial(pyadapt.LowRankAdapter, rank=3,
                                                                 alpha=6.0),
               "class": pyadapt.LowRankAdapter}[spelling]
    kwargs = {"rank": 3, "alpha": 6.0} if spelling == "string" else {}
    summary = inject(model, r"attn\.qkv$", adapter, **kwargs)
    assert summary.sites == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert summary.kind == "lora" and summary.recorded
    randomize_adapters(model)
    ref_leaves, deltas = {}, {}
    for site in summary.sites:
        mod = model.get_submodule(site)
        assert isinstance(mod, pyadapt.LowRankAdapter)
        assert mod.base is original.get_submodule(site) or torch.equal(
            mod.base.weight, original.get_submodule(site).weight), "base weights kept"
        t = leaves(mod, ["down_weight", "up_weight"])
        ref_leaves.update({f"{site}.{k}": v for k, v in t.items()})
        deltas[site] = lora_delta(mod, t)
    hook_reference(original, deltas)
    check_against_reference(model, original, ref_leaves, torch.randn(2, 7, 12, dtype=F64),
                            f"lora ({spelling})")


@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("training", [True, False])
def test_radapter_on_bert_attention_output_matches_eager(rank, training):
    original = TinyBert()
    model = copy.deepcopy(original)
    summary = inject(model, r"attention\.output\.dense$", "r-adapter", rank=rank, eval_scale=0.7)
    assert summary.sites == ["encoder.layer.0.attention.output.dense",
                             "encoder.layer.1.attention.output.dense"]
    randomize_adapters(model)
    model.train(training)
    original.train(training)
    names = (["full_weight"] if rank is None else ["down_weight", "up_weight"]) + ["scale"]
    ref_leaves, deltas = {}, {}
    for site in summary.sites:
        mod = model.get_submodule(site)
        t = leaves(mod, names)
        ref_leaves.update({f"{site}.{k}": v for k, v in t.items()})
        deltas[site] = radapter_delta(mod, t, training)
    hook_reference(original, deltas)
    check_against_reference(model, original, ref_leaves, torch.randn(3, 5, 10, dtype=F64),
                            f"r-adapter rank={rank} training={training}")


def test_cp_shares_u_v_core_across_every_site():
    original = TinyBert()
    model = copy.deepcopy(original)
    summary = inject(model, r"attention\.self\.(query|value)$", "cp", rank=4, dropout=0.0)
    assert len(summary.sites) == 4
    sites = [model.get_submodule(s) for s in summary.sites]
    assert all(isinstance(s, pyadapt.CPLinear) for s in sites)
    for s in sites[1:]:
        assert s.U is sites[0].U and s.V is sites[0].V and s.C is sites[0].C, "shared tensors"
    randomize_adapters(model)
    first = summary.sites[0]
    shared = leaves(sites[0], ["U", "V", "C"])
    ref_leaves = {f"{first}.{k}": v for k, v in shared.items()}
    deltas = {}
    for site, mod in zip(summary.sites, sites):
        t = leaves(mod, ["lam"])
        ref_leaves[f"{site}.lam"] = t["lam"]
        deltas[site] = cp_delta(shared, t)
    hook_reference(original, deltas)
    # U's gradient is the sum over all four sites: the comparison checks the accumulation.
    check_against_reference(model, original, ref_leaves, torch.randn(2, 6, 10, dtype=F64), "cp")


@pytest.mark.parametrize("which", ["timm", "bert"])
def test_bottleneck_appended_after_blocks_matches_eager(which):
    original = TinyViT() if which == "timm" else TinyBert()
    model = copy.deepcopy(original)
    pattern = r"^blocks\.\d+$" if which == "timm" else r"^encoder\.layer\.\d+$"
    summary = inject(model, pattern, "bottleneck", bottleneck=3, scale=0.5)
    assert len(summary.sites) == 2
    randomize_adapters(model)
    names = ["down.weight", "down.bias", "up.weight", "up.bias"]
    ref_leaves, deltas = {}, {}
    for site in summary.sites:
        block = model.get_submodule(site)
        adapter = block.get_submodule(APPENDED)
        assert isinstance(adapter, pyadapt.FusedAdapter) and adapter.in_features == 16
        t = {n: adapter.get_parameter(n).detach().clone().requires_grad_() for n in names}
        ref_leaves.update({f"{site}.{APPENDED}.{k}": v for k, v in t.items()})
        deltas[site] = bottleneck_delta(adapter, t)
    hook_reference(original, deltas)
    x = torch.randn(2, 4, 12 if which == "timm" else 10, dtype=F64)
    check_against_reference(model, original, ref_leaves, x, f"bottleneck after {which} blocks")
    # The backbone keeps its parameter names: its original state dict loads unchanged.
    model.load_state_dict(original.state_dict(), strict=False)
    assert set(original.state_dict()) <= set(model.state_dict())


def test_tuple_output_keeps_the_other_items():
    model = TinyBert()
    layer = model.encoder.layer[0]
    h = torch.randn(2, 3, 16, dtype=F64)
    before = layer(h)
    inject(model, r"^encoder\.layer\.0$", "bottleneck", bottleneck=2)
    randomize_adapters(model)
    after = layer(h)
    assert isinstance(after, tuple) and len(after) == 2
    assert torch.equal(after[1], before[1]), "items after the first pass through untouched"
    assert not torch.equal(after[0], before[0]), "the adapter changed element 0"


def test_opaque_callable_factory_and_target():
    model = TinyViT()
    summary = inject(model, lambda name, m: name.endswith("mlp.fc2"),
                     lambda lin: pyadapt.RAdapter(lin, rank=2))
    assert summary.sites == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert not summary.recorded and "not recorded" in summary.note
    assert _placement.placements(model) == []
    assert _placement.unreplayable_reasons(model)
    summary = inject(model, r"mlp\.fc1$", lambda lin: pyadapt.LowRankAdapter(lin, rank=2))
    assert not summary.recorded, "a lambda factory cannot be replayed"


# ----------------------------------------------------------------------------------------------
# freezing, summary, placement records
# ----------------------------------------------------------------------------------------------

def test_freeze_and_summary_counts():
    model = TinyViT()
    total = sum(p.numel() for p in model.parameters())
    summary = inject(model, r"attn\.proj$", "lora", rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(pyadapt.adapter_state_dict(model))
    adapter_count = sum(t.numel() for t in pyadapt.adapter_state_dict(model).values())
    assert summary.trainable_parameters == adapter_count
    assert summary.total_parameters == total + adapter_count
    assert 0 < summary.trainable_fraction < 1 and "lora" in str(summary)

    unfrozen = TinyViT()
    inject(unfrozen, r"attn\.proj$", "lora", rank=2, freeze=False)
    assert unfrozen.head.weight.requires_grad, "freeze=False leaves the backbone trainable"
    assert not unfrozen.blocks[0].attn.proj.base.weight.requires_grad, "the wrapped base is frozen"


def test_placement_replay_rebuilds_the_same_adapters():
    model = TinyViT()
    inject(model, r"attn\.qkv$", "lora", rank=3)
    inject(model, re.compile(r"MLP\.FC2$", re.IGNORECASE), "r-adapter", rank=2, eval_scale=0.3)
    inject(model, r"^blocks\.1$", "bottleneck", bottleneck=2)
    inject(model, r"attn\.proj$", functools.partial(pyadapt.CPAdapter, rank=2, core="cp"))
    entries = _placement.placements(model)
    assert [e["config"]["adapter"] for e in entries] == ["lora", "r-adapter", "bottleneck", "cp"]
    fresh = TinyViT()
    _placement.replay(fresh, entries)
    want = {k: v.shape for k, v in pyadapt.adapter_state_dict(model).items()}
    got = {k: v.shape for k, v in pyadapt.adapter_state_dict(fresh).items()}
    assert got == want
    assert fresh.blocks[0].mlp.fc2.eval_scale == 0.3
    assert _placement.placements(fresh) == entries


def test_adapters_follow_the_model_dtype():
    model = TinyViT(dtype=torch.bfloat16)
    inject(model, r"^blocks\.\d+$", "bottleneck", bottleneck=4)
    inject(model, r"attn\.qkv$", "lora", rank=2)
    for name, t in pyadapt.adapter_state_dict(model).items():
        assert t.dtype == torch.bfloat16, f"{name}: {t.dtype}"
    out = model(torch.randn(2, 3, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_modules_inside_adapters_are_never_targets():
    model = TinyViT()
    inject(model, r"attn\.qkv$", "lora", rank=2)
    # "qkv.base" and the appended adapters' down/up are pyadapt internals.
    with pytest.raises(ValueError, match="matched none"):
        inject(model, r"qkv", "lora", rank=2)
    inject(model, r"^blocks\.0$", "bottleneck", bottleneck=2)
    with pytest.raises(ValueError, match="matched none"):
        inject(model, r"pyadapt_adapter\.(down|up)$", "r-adapter")


# ----------------------------------------------------------------------------------------------
# errors: raised before anything changes
# ----------------------------------------------------------------------------------------------

def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0], "module tree changed"
    assert params.keys() == before[1].keys()
    for n, (flag, value) in params.items():
        assert flag == before[1][n][0], f"{n}: requires_grad changed"
        assert torch.equal(value, before[1][n][1]), f"{n}: value changed"


def test_no_match_lists_close_names():
    model = TinyBert()
    with pytest.raises(ValueError) as err:
        inject(model, r"attention\.self\.qeury$", "lora")
    msg = str(err.value)
    assert "target" in msg and "qeury" in msg, "names the argument and the pattern"
    assert "encoder.layer.0.attention.self.query" in msg, "lists the near-miss names"
    with pytest.raises(ValueError, match="the target callable"):
        inject(model, lambda n, m: False, "lora")


def test_failing_factory_changes_nothing():
    model = TinyViT()
    before = snapshot(model)
    with pytest.raises(ValueError, match="rank"):
        inject(model, r"attn\.(qkv|proj)$", "lora", rank=40)   # 40 > 16 for attn.proj
    assert_unchanged(model, before)

    def bad_factory(lin):
        pyadapt.RAdapter(lin)   # freezes lin as a side effect, then fails
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        inject(model, r"mlp\.fc1$", bad_factory)
    assert_unchanged(model, before)


@pytest.mark.parametrize("call, error, needle", [
    (lambda m: inject(object(), "x", "lora"), TypeError, "model"),
    (lambda m: inject(m, r"qkv$", "dora"), ValueError, "adapter"),
    (lambda m: inject(m, r"qkv$", 3), TypeError, "adapter"),
    (lambda m: inject(m, r"qkv(", "lora"), ValueError, "target"),
    (lambda m: inject(m, 7, "lora"), TypeError, "target"),
    (lambda m: inject(m, r"qkv$", pyadapt.RAdapter, rank=2), TypeError, "keyword"),
    (lambda m: inject(m, r"qkv$", "lora", ranks=2), TypeError, "LowRankAdapter"),
    (lambda m: inject(m, r"^norm$", "bottleneck"), ValueError, "width"),
])
def test_bad_arguments(call, error, needle):
    model = TinyViT()
    before = snapshot(model)
    with pytest.raises(error, match=needle):
        call(model)
    assert_unchanged(model, before)


def test_multihead_attention_out_proj_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    model = Block()
    with pytest.raises(ValueError, match="MultiheadAttention"):
        inject(model, r"out_proj$", "r-adapter")
    assert isinstance(model.attn.out_proj, nn.Linear)
