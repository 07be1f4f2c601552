"""pyadapt.integrations.load_official: checkpoints of the official MMA and R-Adapter code.

State dicts are written by hand with the official names (REFERENCE-SEMANTICS.md 1.1, 2.1-2.4):
    MMA        {visual,text}_adapter.{i}.down.0.{weight,bias}, .up.{weight,bias};
               shared_adapter.{i}.0.{weight,bias}; buffers token_embedding, tokenized_prompts
               A(z) = up(relu(shared(relu(down(z))))),  out = z + scale * A(z)
    R-Adapter  <block>.adapter_{attn,mlp}[_cache].{f.weight | d.weight, u.weight, s}
               out = z + c * z W_f^T  (W_f = W_u W_d for the factor pair), c = s (train) or
               s * eval_scale (eval); z = the output of attn.out_proj / mlp.c_proj
After loading, the pyadapt model must compute the official formula with those tensors
(float64); unknown or missing names and wrong shapes raise and change nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyadapt
from pyadapt.integrations import load_official
from pyadapt.inject import inject
from conftest import assert_close_rel

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# MMA
# ----------------------------------------------------------------------------------------------

class MMAModel(nn.Module):
    def __init__(self, layers=(1, 2)):
        super().__init__()
        self.backbone = nn.Linear(4, 4, dtype=F64)
        self.mma = pyadapt.MultiModalAdapter(vision_dim=16, text_dim=12, bottleneck=4,
                                             layers=layers, scale=0.001, dtype=F64)


def official_mma(layers=(1, 2), prefix="", r=4, dv=16, dt=12):
    sd = {f"{prefix}token_embedding": torch.randn(3, 5, dt, dtype=F64),
          f"{prefix}tokenized_prompts": torch.randint(0, 100, (3, 5))}
    for i in layers:
        for tower, d in (("visual", dv), ("text", dt)):
            sd[f"{prefix}{tower}_adapter.{i}.down.0.weight"] = torch.randn(r, d, dtype=F64)
            sd[f"{prefix}{tower}_adapter.{i}.down.0.bias"] = torch.randn(r, dtype=F64)
            sd[f"{prefix}{tower}_adapter.{i}.up.weight"] = torch.randn(d, r, dtype=F64)
            sd[f"{prefix}{tower}_adapter.{i}.up.bias"] = torch.randn(d, dtype=F64)
        sd[f"{prefix}shared_adapter.{i}.0.weight"] = torch.randn(r, r, dtype=F64)
        sd[f"{prefix}shared_adapter.{i}.0.bias"] = torch.randn(r, dtype=F64)
    return sd


def official_mma_formula(sd, tower, i, z, scale=0.001, prefix=""):
    p = f"{prefix}{tower}_adapter.{i}"
    h = torch.relu(z @ sd[f"{p}.down.0.weight"].T + sd[f"{p}.down.0.bias"])
    h = torch.relu(h @ sd[f"{prefix}shared_adapter.{i}.0.weight"].T
                   + sd[f"{prefix}shared_adapter.{i}.0.bias"])
    return z + scale * (h @ sd[f"{p}.up.weight"].T + sd[f"{p}.up.bias"])


def adapter_values(model):
    return {k: v.clone() for k, v in pyadapt.adapter_state_dict(model).items()}


def assert_same_values(model, before):
    after = pyadapt.adapter_state_dict(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"


@pytest.mark.parametrize("prefix", ["", "module.adapter_learner."])
def test_mma_loads_and_computes_the_official_formula(prefix):
    model = MMAModel()
    sd = official_mma(prefix=prefix)
    result = load_official(model, sd, method="mma")
    assert sorted(result.ignored) == sorted([f"{prefix}token_embedding",
                                             f"{prefix}tokenized_prompts"])
    # named as pyadapt.adapter_state_dict names it (the shared projection under its first user)
    assert result.loaded[f"{prefix}shared_adapter.2.0.weight"] == \
        "mma.vision_adapters.2.shared.weight"
    assert len(result.loaded) == 2 * (8 + 2)
    for i in (1, 2):
        zv = torch.randn(3, 7, 16, dtype=F64)
        zt = torch.randn(5, 12, dtype=F64)
        assert_close_rel(model.mma.vision(i)(zv), official_mma_formula(sd, "visual", i, zv,
                                                                       prefix=prefix),
                         F64, f"vision adapter {i}")
        assert_close_rel(model.mma.text(i)(zt), official_mma_formula(sd, "text", i, zt,
                                                                     prefix=prefix),
                         F64, f"text adapter {i}")
    assert model.mma.vision(1).shared is model.mma.text(1).shared, "one shared projection"


def test_mma_unknown_missing_and_shape_errors_change_nothing():
    model = MMAModel()
    before = adapter_values(model)

    sd = official_mma()
    sd["visual_adapter.7.down.0.weight"] = torch.randn(4, 16, dtype=F64)   # layer 7 not adapted
    sd["visual_adapter.1.gate.weight"] = torch.randn(4, dtype=F64)          # no such part
    with pytest.raises(ValueError) as err:
        load_official(model, sd, method="mma")
    assert "visual_adapter.7.down.0.weight" in str(err.value)
    assert "visual_adapter.1.gate.weight" in str(err.value)
    assert_same_values(model, before)

    sd = official_mma()
    del sd["text_adapter.2.up.bias"]
    with pytest.raises(ValueError,
                       match=r"missing pyadapt tensors \['mma.text_adapters.2.up.bias'\]"):
        load_official(model, sd, method="mma")
    assert_same_values(model, before)
    # strict=False loads what is there and skips the rest
    result = load_official(model, sd, method="mma", strict=False)
    assert "text_adapter.2.up.bias" not in result.loaded
    model = MMAModel()
    before = adapter_values(model)

    sd = official_mma(r=5)
    with pytest.raises(ValueError) as err:
        load_official(model, sd, method="mma")
    assert "(5, 16)" in str(err.value) and "(4, 16)" in str(err.value)
    assert_same_values(model, before)


def test_mma_held_outside_the_module_tree():
    """As the open_clip add_mma keeps it: the adapters live in the blocks, the
    MultiModalAdapter is a plain attribute of the model."""
    class Block(nn.Module):
        def __init__(self, adapter):
            super().__init__()
            self.adapter = adapter

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            mma = pyadapt.MultiModalAdapter(16, 12, 4, layers=[1, 2], dtype=F64)
            self.visual = nn.ModuleList(Block(mma.vision(i)) for i in (1, 2))
            self.text = nn.ModuleList(Block(mma.text(i)) for i in (1, 2))
            object.__setattr__(self, "_pyadapt_mma", mma)

    model = Model()
    sd = official_mma()
    result = load_official(model, sd, method="mma")
    assert result.loaded["visual_adapter.2.up.weight"] == "visual.1.adapter.up.weight"
    z = torch.randn(4, 12, dtype=F64)
    assert_close_rel(model.text[0].adapter(z), official_mma_formula(sd, "text", 1, z), F64,
                     "text adapter of block 1")


def test_open_clip_placements():
    """The real open_clip path (the clip extra is part of the test install)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from pyadapt.integrations import open_clip as pa_clip

    def tiny():
        return CLIP(32, CLIPVisionCfg(image_size=32, layers=2, width=16, patch_size=8,
                                      head_width=8), CLIPTextCfg(context_length=8, width=12,
                                                                 heads=2, layers=2)).double()
    model = tiny()
    pa_clip.add_mma(model, start_layer=1, bottleneck=4)
    sd = official_mma()
    load_official(model, sd, method="mma")
    z = torch.randn(3, 16, dtype=F64)
    assert_close_rel(pa_clip.mma_of(model).vision(2)(z),
                     official_mma_formula(sd, "visual", 2, z), F64, "open_clip MMA block 2")

    model = tiny()
    pa_clip.add_r_adapter(model)
    sd = official_r_adapter(None)
    result = load_official(model, sd, method="r-adapter")
    assert len(result.loaded) == 16
    site = model.transformer.resblocks[1].attn.out_proj
    assert isinstance(site, pyadapt.RAdapter)
    assert torch.equal(site.full_weight, sd["transformer.resblocks.1.adapter_attn.f.weight"])


def test_mma_needs_exactly_one_multimodal_adapter():
    with pytest.raises(ValueError, match="MultiModalAdapter"):
        load_official(nn.Linear(2, 2), official_mma(), method="mma")


# ----------------------------------------------------------------------------------------------
# R-Adapter
# ----------------------------------------------------------------------------------------------

class ClipAttention(nn.Module):
    """A CLIP attention with OpenAI/open_clip names (in_proj, out_proj), written out so that
    out_proj is called as a module."""

    def __init__(self, d):
        super().__init__()
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        return self.out_proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v)


class ClipMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 2 * d)
        self.c_proj = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


class ClipBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), ClipAttention(d)
        self.ln_2, self.mlp = nn.LayerNorm(d), ClipMlp(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, d, depth):
        super().__init__()
        self.resblocks = nn.Sequential(*[ClipBlock(d) for _ in range(depth)])

    def forward(self, x):
        return self.resblocks(x)


class Visual(nn.Module):
    def __init__(self, d, depth):
        super().__init__()
        self.transformer = Tower(d, depth)


class TinyClip(nn.Module):
    """visual.transformer.resblocks.N and transformer.resblocks.N, as in CLIP / open_clip."""

    def __init__(self, dv=16, dt=12, depth=2):
        super().__init__()
        self.visual = Visual(dv, depth)
        self.transformer = Tower(dt, depth)
        self.to(F64)

    def forward(self, image_tokens, text_tokens):
        return self.visual.transformer(image_tokens), self.transformer(text_tokens)


SITES = r"(attn\.out_proj|mlp\.c_proj)$"
TOWERS = (("visual.transformer", 16), ("transformer", 12))


def official_r_adapter(rank=None, depth=2, prefix="", cache=True, dv=16):
    """A state dict as the official code saves it: backbone weights plus, per block, the
    StochasticAdapters (and their EMA caches)."""
    sd = {f"{prefix}logit_scale": torch.tensor(4.6, dtype=F64),
          f"{prefix}visual.transformer.resblocks.0.ln_1.weight": torch.ones(dv, dtype=F64)}
    for tower, d in ((TOWERS[0][0], dv), TOWERS[1]):
        for i in range(depth):
            for site in ("attn", "mlp"):
                for suffix in ("", "_cache") if cache else ("",):
                    p = f"{prefix}{tower}.resblocks.{i}.adapter_{site}{suffix}"
                    if rank is None:
                        sd[f"{p}.f.weight"] = torch.randn(d, d, dtype=F64) * 0.3
                    else:
                        sd[f"{p}.d.weight"] = torch.randn(rank, d, dtype=F64) * 0.3
                        sd[f"{p}.u.weight"] = torch.randn(d, rank, dtype=F64) * 0.3
                    sd[f"{p}.s"] = torch.rand(1, dtype=F64) + 0.05
    return sd


def hook_official(original, sd, training, eval_scale, use_cache=False, prefix=""):
    """The official forward: each block's adapter applied to out_proj / c_proj's output."""
    for tower, _ in TOWERS:
        for i, block in enumerate(original.get_submodule(tower).resblocks):
            for site, mod in (("attn", block.attn.out_proj), ("mlp", block.mlp.c_proj)):
                p = (f"{prefix}{tower}.resblocks.{i}.adapter_{site}"
                     + ("_cache" if use_cache else ""))
                wf = sd[f"{p}.f.weight"] if f"{p}.f.weight" in sd else \
                    sd[f"{p}.u.weight"] @ sd[f"{p}.d.weight"]
                c = sd[f"{p}.s"] * (1.0 if training else eval_scale)

                def hook(m, args, z, wf=wf, c=c):
                    return z + c * (z @ wf.T)
                mod.register_forward_hook(hook)


@pytest.mark.parametrize("official_rank, pyadapt_rank", [(None, None), (3, 3), (3, None)])
@pytest.mark.parametrize("training", [True, False])
def test_r_adapter_loads_and_computes_the_official_formula(official_rank, pyadapt_rank,
                                                           training):
    original = TinyClip()
    model = copy.deepcopy(original)
    inject(model, SITES, "r-adapter", rank=pyadapt_rank, eval_scale=0.5)
    sd = official_r_adapter(official_rank)
    result = load_official(model, sd, method="r-adapter")
    assert "logit_scale" in result.ignored
    assert result.ema_skipped, "no AdapterEMA: the caches are skipped"
    assert len(result.loaded) == 8 * (2 if official_rank is None else 3)
    hook_official(original, sd, training, 0.5)
    model.train(training)
    original.train(training)
    xi, xt = torch.randn(2, 5, 16, dtype=F64), torch.randn(3, 4, 12, dtype=F64)
    for got, want, tower in zip(model(xi, xt), original(xi, xt), ("image", "text")):
        assert_close_rel(got, want, F64, f"{tower} tower, official rank {official_rank} into "
                                         f"pyadapt rank {pyadapt_rank}")


def test_r_adapter_ema_caches_go_to_the_shadows():
    original = TinyClip()
    model = copy.deepcopy(original)
    inject(model, SITES, "r-adapter", eval_scale=0.5)
    pyadapt.AdapterEMA(model, use_in_eval=True)
    sd = official_r_adapter()
    result = load_official(model, sd, method="r-adapter")
    assert len(result.ema_loaded) == 16 and result.ema_skipped == []
    # Eval with EMA uses the caches, as the official eval does.
    hook_official(original, sd, training=False, eval_scale=0.5, use_cache=True)
    model.eval()
    original.eval()
    xi, xt = torch.randn(2, 5, 16, dtype=F64), torch.randn(3, 4, 12, dtype=F64)
    for got, want in zip(model(xi, xt), original(xi, xt)):
        assert_close_rel(got, want, F64, "eval with the EMA caches")


def test_r_adapter_timm_names_and_wrapper_prefix():
    from test_inject import TinyViT
    model = TinyViT()
    inject(model, r"(attn\.proj|mlp\.fc2)$", "r-adapter")
    sd = {}
    for i in range(2):
        for site in ("attn", "mlp"):
            sd[f"module.backbone.model.visual.trunk.blocks.{i}.adapter_{site}.f.weight"] = \
                torch.randn(16, 16, dtype=F64)
            sd[f"module.backbone.model.visual.trunk.blocks.{i}.adapter_{site}.s"] = \
                torch.full((1,), 0.2, dtype=F64)
    result = load_official(model, sd, method="r-adapter")
    key = "module.backbone.model.visual.trunk.blocks.1.adapter_mlp.f.weight"
    assert result.loaded[key] == "blocks.1.mlp.fc2.full_weight"
    assert torch.equal(model.blocks[1].mlp.fc2.full_weight, sd[key])
    scale = model.blocks[0].attn.proj.scale.detach()
    assert scale.shape == () and float(scale) == 0.2, "the official (1,) scale becomes 0-dim"


def test_r_adapter_errors_change_nothing():
    model = TinyClip()
    inject(model, SITES, "r-adapter", rank=2)
    before = adapter_values(model)
    with pytest.raises(ValueError, match="cannot be loaded into .* rank-2 RAdapter"):
        load_official(model, official_r_adapter(None), method="r-adapter")
    assert_same_values(model, before)

    sd = official_r_adapter(2)
    sd["visual.transformer.resblocks.5.adapter_attn.f.weight"] = torch.randn(16, 16, dtype=F64)
    sd["transformer.resblocks.0.adapter_ffn.f.weight"] = torch.randn(12, 12, dtype=F64)
    del sd["transformer.resblocks.1.adapter_mlp.s"]
    with pytest.raises(ValueError) as err:
        load_official(model, sd, method="r-adapter")
    msg = str(err.value)
    assert "visual.transformer.resblocks.5.adapter_attn.f.weight" in msg
    assert "transformer.resblocks.0.adapter_ffn.f.weight" in msg
    assert "transformer.resblocks.1.mlp.c_proj.scale" in msg, "the missing tensor is listed"
    assert_same_values(model, before)

    sd = official_r_adapter(3)
    with pytest.raises(ValueError, match=r"shape \(3, (12|16)\) does not fit "
                                         r".*down_weight of shape \(2, (12|16)\)"):
        load_official(model, sd, method="r-adapter")
    assert_same_values(model, before)

    # Only the text tower adapted: the image tower's keys must not land in it by dropping
    # their "visual." prefix.
    text_only = TinyClip(dv=12)
    inject(text_only, r"^transformer\..*" + SITES, "r-adapter")
    before = adapter_values(text_only)
    with pytest.raises(ValueError, match="different leading prefixes"):
        load_official(text_only, official_r_adapter(None, cache=False, dv=12),
                      method="r-adapter")
    assert_same_values(text_only, before)

    fixed = TinyClip()
    inject(fixed, SITES, "r-adapter", learn_scale=False)
    with pytest.raises(ValueError, match="fixed scale"):
        load_official(fixed, official_r_adapter(None), method="r-adapter")


@pytest.mark.parametrize("call, error, needle", [
    (lambda m: load_official("m", {}, "mma"), TypeError, "model"),
    (lambda m: load_official(m, [1], "mma"), TypeError, "state_dict"),
    (lambda m: load_official(m, {}, "lora"), ValueError, "method"),
    (lambda m: load_official(m, {"a.adapter_attn.s": 1.0}, "r-adapter"), TypeError, "state_dict"),
    (lambda m: load_official(nn.Linear(2, 2), {}, "r-adapter"), ValueError, "RAdapter"),
])
def test_bad_arguments(call, error, needle):
    with pytest.raises(error, match=needle):
        call(MMAModel())
