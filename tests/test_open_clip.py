"""open_clip placements against hand-written eager versions of each paper's placement.

On a tiny open_clip CLIP (2 blocks per tower, width 64), in float64:
- MMA: per adapted block (1-based index i), with a = ln_1(x):
      out = x + attn(a); out = out + mlp(ln_2(out)) + GSL(scale * A(GSL(a, scale)), 1/scale)
  A(z) = up(relu(shared_i(relu(down(z))))), shared_i one module for both towers, GSL the
  official gradient-scale layer (identity forward, gradient times c backward); index 0 adds
  scale * A to ln_pre's output (image) and to the token embeddings (text), without GSL.
- R-Adapter: z + c * m * (z W_f^T) on the output z of attention (after out_proj) and of the
  MLP's c_proj, c = s (train) or s * eval_scale (eval), m the per-sample DropPath factor.
- Bottleneck (OFA): f + scale * (relu(f W_d^T + b_d) W_u^T + b_u) on the MLP output f, before
  the block's residual add.
Same outputs and same adapter gradients; frozen backbone parameters get no gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close_rel, require_open_clip

open_clip = require_open_clip()
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

import pyadapt  # noqa: E402
from pyadapt import _placement  # noqa: E402
from pyadapt.integrations import open_clip as pa_clip  # noqa: E402


VOCAB = 100


def tiny_clip(dtype=torch.float64, layers=2) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(32, CLIPVisionCfg(image_size=32, layers=layers, width=64, patch_size=8,
                                   head_width=16),
                 CLIPTextCfg(context_length=16, width=64, heads=4, layers=layers,
                             vocab_size=VOCAB))
    return model.to(dtype)


def batch(dtype=torch.float64):
    images = torch.randn(3, 3, 32, 32, dtype=dtype)
    texts = torch.randint(0, VOCAB, (4, 16))
    return images, texts


def randomise_adapters(model: nn.Module) -> None:
    """Fresh non-zero adapter weights (several inits are zero, which would hide mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2 + (0.1 if p.dim() == 0 else 0.0))


def features(model, images, texts):
    return model.encode_image(images), model.encode_text(texts)


def objective(img, txt, weights):
    """A loss whose gradient is dense and random in the features."""
    return (img * weights[0]).sum() + (txt * weights[1]).sum()


def blocks(model):
    return [("vision", model.visual.transformer.resblocks), ("text", model.transformer.resblocks)]


def attention(block, a, mask):
    """The original nn.MultiheadAttention, out_proj included."""
    mask = None if mask is None else mask.to(a.dtype)
    return block.attn(a, a, a, need_weights=False, attn_mask=mask)[0]


# ---------------------------------------------------------------------------------------------
# Eager MMA, written from the paper / official code description
# ---------------------------------------------------------------------------------------------

class EagerBlock(nn.Module):
    """Base of the eager blocks: wraps an original block (open_clip asks it for its dtype)."""

    def get_weight_dtype(self):
        return self.block.get_weight_dtype()


class GradientScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


def mma_branch(t, layer, modality, scale):
    down_w, down_b, up_w, up_b = (t[f"{modality}.{layer}.{k}"] for k in
                                  ("down.weight", "down.bias", "up.weight", "up.bias"))
    shared_w, shared_b = t[f"shared.{layer}.weight"], t[f"shared.{layer}.bias"]
    return lambda z: scale * F.linear(
        F.relu(F.linear(F.relu(F.linear(z, down_w, down_b)), shared_w, shared_b)), up_w, up_b)


class EagerMMABlock(EagerBlock):
    def __init__(self, block, branch, scale):
        super().__init__()
        self.block, self.branch, self.scale = block, branch, scale

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        b = self.block
        a = b.ln_1(x)
        out = x + attention(b, a, attn_mask)
        out = out + b.mlp(b.ln_2(out))
        y = self.branch(GradientScale.apply(a, self.scale))
        return out + GradientScale.apply(y, 1.0 / self.scale)


class EagerThen(nn.Module):
    def __init__(self, inner, branch):
        super().__init__()
        self.inner, self.branch = inner, branch

    def forward(self, x):
        e = self.inner(x)
        return e + self.branch(e)


def eager_mma(backbone, tensors, start, end, scale):
    model = copy.deepcopy(backbone)
    for modality, resblocks in blocks(model):
        for i in range(max(start, 1), end + 1):
            resblocks[i - 1] = EagerMMABlock(resblocks[i - 1],
                                             mma_branch(tensors, i, modality, scale), scale)
    if start == 0:
        model.visual.ln_pre = EagerThen(model.visual.ln_pre,
                                        mma_branch(tensors, 0, "vision", scale))
        model.token_embedding = EagerThen(model.token_embedding,
                                          mma_branch(tensors, 0, "text", scale))
    return model


def mma_tensors(model):
    """{name: pyadapt's adapter parameter} in the naming of mma_branch."""
    mma = pa_clip.mma_of(model)
    out = {}
    for i in mma.layers:
        for modality in ("vision", "text"):
            ad = mma.vision(i) if modality == "vision" else mma.text(i)
            for k in ("down.weight", "down.bias", "up.weight", "up.bias"):
                out[f"{modality}.{i}.{k}"] = ad.get_parameter(k)
        out[f"shared.{i}.weight"] = mma.shared[str(i)].weight
        out[f"shared.{i}.bias"] = mma.shared[str(i)].bias
    return out


def leaf_copies(tensors):
    return {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}


def assert_backbone_has_no_grad(model):
    adapter_ids = {id(t) for m in model.modules() if isinstance(m, pyadapt._module.AdapterModule)
                   for _, t in m.adapter_tensors()}
    for name, p in model.named_parameters():
        if id(p) not in adapter_ids:
            assert not p.requires_grad, f"backbone parameter {name} is trainable"
            assert p.grad is None, f"backbone parameter {name} received a gradient"


@pytest.mark.parametrize("start,end", [(1, 2), (2, 2), (0, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mma_matches_eager_official_placement(start, end, dtype):
    backbone = tiny_clip(torch.float64)
    model = copy.deepcopy(backbone).to(dtype)
    pa_clip.add_mma(model, start_layer=start, end_layer=end, bottleneck=8, scale=0.01)
    randomise_adapters(model)
    mine = mma_tensors(model)
    ref_t = {k: v.detach().double().clone().requires_grad_(True) for k, v in mine.items()}
    ref_model = eager_mma(backbone, ref_t, start, end, 0.01)
    images, texts = batch(torch.float64)
    weights = [torch.randn(3, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)]

    img_ref, txt_ref = features(ref_model, images, texts)
    objective(img_ref, txt_ref, weights).backward()
    img, txt = features(model, images.to(dtype), texts)
    objective(img, txt, [w.to(dtype) for w in weights]).backward()

    assert_close_rel(img, img_ref, dtype, "image features vs eager MMA")
    assert_close_rel(txt, txt_ref, dtype, "text features vs eager MMA")
    assert set(mine) == set(ref_t)
    for k in mine:
        assert mine[k].grad is not None, f"{k}: no gradient"
        if dtype == torch.float64:
            assert_close_rel(mine[k].grad, ref_t[k].grad, dtype, f"gradient of {k} vs eager MMA")
        else:  # float32 through the whole tiny CLIP: a looser, still tight, relative bound
            _assert_rel(mine[k].grad, ref_t[k].grad, 1e-4, k)
    assert_backbone_has_no_grad(model)
    # eval without autograd: nn.MultiheadAttention may take its fused fast path
    model.eval()
    ref_model.eval()
    with torch.no_grad():
        for a, b, what in zip(features(model, images.to(dtype), texts),
                              features(ref_model, images, texts), ("image", "text")):
            assert_close_rel(a, b, dtype, f"{what} features vs eager MMA, eval / no_grad")


def _assert_rel(out, ref, tol, what):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= tol, f"gradient of {what}: relative error {err:.2e} > {tol:.0e}"


def test_mma_layer_index_is_one_based_like_the_official_code():
    model = tiny_clip(layers=3)
    s = pa_clip.add_mma(model, start_layer=2, end_layer=3, bottleneck=4)
    for _, resblocks in blocks(model):
        kinds = [isinstance(b, pa_clip.MMAResidualAttentionBlock) for b in resblocks]
        assert kinds == [False, True, True], f"blocks 2..3 (1-based) should be adapted: {kinds}"
    assert pa_clip.mma_of(model).layers == [2, 3]
    assert s.adapters == ["visual.transformer.resblocks.1.adapter",
                          "visual.transformer.resblocks.2.adapter",
                          "transformer.resblocks.1.adapter", "transformer.resblocks.2.adapter"]
    # one shared middle projection per index, the same object in both towers
    v, t = model.visual.transformer.resblocks[1].adapter, model.transformer.resblocks[1].adapter
    assert v.shared is t.shared
    assert model.visual.transformer.resblocks[2].adapter.shared is not v.shared


def test_mma_computes_ln_1_once_per_block():
    model = tiny_clip()
    pa_clip.add_mma(model, start_layer=1, bottleneck=4)
    calls = []
    for _, resblocks in blocks(model):
        for b in resblocks:
            b.ln_1.register_forward_hook(lambda *args: calls.append(1))
    features(model, *batch())
    assert len(calls) == 4, f"ln_1 ran {len(calls)} times for 4 adapted blocks"


def test_mma_parameter_count_and_summary():
    model = tiny_clip()
    total_before = sum(p.numel() for p in model.parameters())
    s = pa_clip.add_mma(model, start_layer=1, bottleneck=8)
    # per layer: vision/text down (64*8+8) and up (8*64+64) each, one shared (8*8+8)
    per_layer = 2 * ((64 * 8 + 8) + (8 * 64 + 64)) + (8 * 8 + 8)
    assert s.trainable == 2 * per_layer
    assert s.total == total_before + 2 * per_layer
    assert abs(s.share - s.trainable / s.total) < 1e-15
    text = str(s)
    assert "open_clip.add_mma" in text and f"{s.trainable:,}" in text and "%" in text


def test_vit_b_16_parameter_counts_match_the_official_code():
    """REFERENCE-SEMANTICS 1.1 / 2.9: MMA on blocks 5..12 of ViT-B/16 trains 674,560 parameters;
    the full-rank R-Adapter 24 x (768^2 + 1) + 24 x (512^2 + 1). Built on the meta device (no
    memory, no weights)."""
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
        mma = pa_clip.add_mma(model)
        assert mma.trainable == 674_560, str(mma)
        assert len(mma.adapters) == 16
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
        r = pa_clip.add_r_adapter(model)
        assert r.trainable == 24 * (768 ** 2 + 1) + 24 * (512 ** 2 + 1), str(r)


# ---------------------------------------------------------------------------------------------
# Eager R-Adapter
# ---------------------------------------------------------------------------------------------

class EagerRAdapterBlock(EagerBlock):
    def __init__(self, block, w_attn, s_attn, w_mlp, s_mlp, eval_scale, masks):
        super().__init__()
        self.block, self.eval_scale, self.masks = block, eval_scale, masks
        self.w_attn, self.s_attn, self.w_mlp, self.s_mlp = w_attn, s_attn, w_mlp, s_mlp

    def adapt(self, z, w, s):
        c = s if self.training else s * self.eval_scale
        q = F.linear(z, w)
        if self.training and self.masks is not None:
            keep = self.masks.pop(0)  # DropPath: one factor per sample, broadcast over tokens
            q = q * keep.view(-1, 1, 1)
        return z + c * q

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        b = self.block
        x = x + self.adapt(attention(b, b.ln_1(x), attn_mask), self.w_attn, self.s_attn)
        f = b.mlp(b.ln_2(x))  # the unmodified MLP: c_proj output, bias included
        return x + self.adapt(f, self.w_mlp, self.s_mlp)


def r_tensors(model):
    out = {}
    for modality, resblocks in blocks(model):
        for i, b in enumerate(resblocks):
            for site, ad in (("attn", b.attn.out_proj), ("mlp", b.mlp.c_proj)):
                out[f"{modality}.{i}.{site}.w"] = ad.full_weight
                out[f"{modality}.{i}.{site}.s"] = ad.scale
    return out


def eager_r_adapter(backbone, t, eval_scale, masks):
    model = copy.deepcopy(backbone)
    for modality, resblocks in blocks(model):
        for i in range(len(resblocks)):
            p = f"{modality}.{i}."
            resblocks[i] = EagerRAdapterBlock(resblocks[i], t[p + "attn.w"], t[p + "attn.s"],
                                              t[p + "mlp.w"], t[p + "mlp.s"], eval_scale, masks)
    return model


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_r_adapter_matches_eager_official_placement(train, drop_prob, monkeypatch):
    backbone = tiny_clip()
    model = copy.deepcopy(backbone)
    pa_clip.add_r_adapter(model, drop_prob=drop_prob, eval_scale=0.7)
    randomise_adapters(model)
    mine = r_tensors(model)
    ref_t = leaf_copies(mine)
    recorded = []
    real = pyadapt.reference.drop_multiplier

    def recording(shape, *args, **kwargs):
        m = real(shape, *args, **kwargs)
        lead = tuple(shape[:-1])
        per_sample = m.view(lead)[:, :1]
        assert torch.equal(m.view(lead), per_sample.expand(lead)), "mask not per sample"
        recorded.append(per_sample.reshape(-1).clone())
        return m

    monkeypatch.setattr(pyadapt.reference, "drop_multiplier", recording)
    model.train(train)
    images, texts = batch()
    weights = [torch.randn(3, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)]
    img, txt = features(model, images, texts)
    objective(img, txt, weights).backward()
    if train and drop_prob > 0:
        assert len(recorded) == 8, "one mask per adapter site and step"
        assert any((m == 0).any() for m in recorded), "p = 0.5 dropped no sample at all"
    masks = list(recorded) if drop_prob > 0 else None
    ref_model = eager_r_adapter(backbone, ref_t, 0.7, masks).train(train)
    img_ref, txt_ref = features(ref_model, images, texts)
    objective(img_ref, txt_ref, weights).backward()

    assert_close_rel(img, img_ref, torch.float64, "image features vs eager R-Adapter")
    assert_close_rel(txt, txt_ref, torch.float64, "text features vs eager R-Adapter")
    for k in mine:
        assert_close_rel(mine[k].grad, ref_t[k].grad, torch.float64, f"gradient of {k}")
    assert_backbone_has_no_grad(model)


def test_r_adapter_low_rank_and_fold_give_the_same_eval_outputs():
    model = tiny_clip()
    pa_clip.add_r_adapter(model, rank=5, drop_prob=0.2)
    randomise_adapters(model)
    model.eval()
    images, texts = batch()
    with torch.no_grad():
        before = features(model, images, texts)
        names = pyadapt.fold_(model)
        assert len(names) == 8, f"expected 8 folded sites, got {names}"
        folded = features(model, images, texts)
        pyadapt.unfold_(model)
        after = features(model, images, texts)
    for a, b, what in zip(folded, before, ("image", "text")):
        assert_close_rel(a, b, torch.float64, f"{what} features folded vs adapters")
    for a, b in zip(after, before):
        assert torch.equal(a, b), "unfold_ did not restore the model exactly"


def test_fold_with_ema_of_full_rank_r_adapter():
    model = tiny_clip()
    pa_clip.add_r_adapter(model)
    randomise_adapters(model)
    ema = pyadapt.AdapterEMA(model, momentum=0.5)
    randomise_adapters(model)
    ema.update()
    model.eval()
    images, texts = batch()
    with torch.no_grad():
        with_ema = features(model, images, texts)  # eval computes with the shadows
        pyadapt.fold_(model, use_ema=True)
        folded = features(model, images, texts)
    for a, b, what in zip(folded, with_ema, ("image", "text")):
        assert_close_rel(a, b, torch.float64, f"{what} features, EMA fold vs EMA adapters")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "float", "bool", "padding"])
def test_adapted_attention_equals_multihead_attention(batch_first, mask_kind):
    mha = nn.MultiheadAttention(24, 4, batch_first=batch_first, dtype=torch.float64)
    mine = pa_clip.AdaptedMultiheadAttention(mha, mha.out_proj)
    n, L = 3, 7
    x = torch.randn((n, L, 24) if batch_first else (L, n, 24), dtype=torch.float64)
    kwargs = {}
    if mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(L, L, dtype=torch.float64)
    elif mask_kind == "bool":
        kwargs["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    elif mask_kind == "padding":
        kwargs["key_padding_mask"] = torch.arange(L).expand(n, L) >= torch.tensor([[7], [5], [3]])
    ref = mha(x, x, x, need_weights=False, **kwargs)[0]
    got = mine(x, x, x, need_weights=False, **kwargs)[0]
    assert_close_rel(got, ref, torch.float64, f"attention ({mask_kind} mask)")
    assert mine.in_proj_weight is mha.in_proj_weight, "parameters must be taken over, not copied"


# ---------------------------------------------------------------------------------------------
# Eager bottleneck (OFA)
# ---------------------------------------------------------------------------------------------

class EagerBottleneckBlock(EagerBlock):
    def __init__(self, block, t, scale):
        super().__init__()
        self.block, self.t, self.scale = block, t, scale

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        b, t = self.block, self.t
        x = x + attention(b, b.ln_1(x), attn_mask)
        f = b.mlp(b.ln_2(x))
        f = f + self.scale * F.linear(F.relu(F.linear(f, t["down.weight"], t["down.bias"])),
                                      t["up.weight"], t["up.bias"])
        return x + f


def test_bottleneck_matches_eager_ofa_placement():
    backbone = tiny_clip()
    model = copy.deepcopy(backbone)
    pa_clip.add_bottleneck(model, bottleneck=6, scale=0.5)
    randomise_adapters(model)
    ref_model = copy.deepcopy(backbone)
    pairs = []
    for (_, mine_blocks), (_, ref_blocks) in zip(blocks(model), blocks(ref_model)):
        for i, b in enumerate(mine_blocks):
            mine = dict(b.mlp.adapter.named_parameters())
            ref_t = leaf_copies(mine)
            ref_blocks[i] = EagerBottleneckBlock(ref_blocks[i], ref_t, 0.5)
            pairs.append((mine, ref_t))
    images, texts = batch()
    weights = [torch.randn(3, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)]
    img, txt = features(model, images, texts)
    objective(img, txt, weights).backward()
    img_ref, txt_ref = features(ref_model, images, texts)
    objective(img_ref, txt_ref, weights).backward()
    assert_close_rel(img, img_ref, torch.float64, "image features vs eager bottleneck")
    assert_close_rel(txt, txt_ref, torch.float64, "text features vs eager bottleneck")
    for mine, ref_t in pairs:
        for k in mine:
            assert_close_rel(mine[k].grad, ref_t[k].grad, torch.float64, f"gradient of {k}")
    assert_backbone_has_no_grad(model)


# ---------------------------------------------------------------------------------------------
# Combined, replay, errors, compile
# ---------------------------------------------------------------------------------------------

def all_placements(model):
    pa_clip.add_mma(model, start_layer=1, bottleneck=4, scale=0.01)
    pa_clip.add_r_adapter(model, rank=3)
    pa_clip.add_bottleneck(model, bottleneck=4)
    pa_clip.add_lowrank(model, rank=2, sites=["mlp.c_fc"])
    randomise_adapters(model)
    return model


def test_placements_replay_into_a_fresh_model():
    model = all_placements(tiny_clip())
    entries = _placement.placements(model)
    assert [e["kind"] for e in entries] == ["open_clip.add_mma", "open_clip.add_r_adapter",
                                            "open_clip.add_bottleneck",
                                            "open_clip.add_lowrank"]
    fresh = tiny_clip()
    _placement.replay(fresh, entries)
    pyadapt.load_adapter_state_dict(fresh, pyadapt.adapter_state_dict(model))
    images, texts = batch()
    for a, b in zip(features(fresh, images, texts), features(model, images, texts)):
        assert torch.equal(a, b), "replayed model computes differently"
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_saved_adapters_rebuild_in_a_fresh_model(tmp_path):
    from pyadapt.checkpoint import load_adapters, save_adapters

    model = all_placements(tiny_clip())
    save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = tiny_clip()
    load_adapters(fresh, tmp_path / "adapters.safetensors")
    images, texts = batch()
    for a, b in zip(features(fresh, images, texts), features(model, images, texts)):
        assert torch.equal(a, b), "model rebuilt from the checkpoint computes differently"


def test_bad_arguments_are_clear_errors_and_change_nothing():
    model = tiny_clip()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="end_layer"):
        pa_clip.add_mma(model, start_layer=1, end_layer=3)
    with pytest.raises(ValueError, match="end_layer"):
        pa_clip.add_mma(model)  # default start 5 > 2 blocks
    with pytest.raises(ValueError, match="start_layer"):
        pa_clip.add_mma(model, start_layer=-1)
    with pytest.raises(ValueError, match="drop_prob"):
        pa_clip.add_r_adapter(model, drop_prob=1.5)
    with pytest.raises(ValueError, match="rank"):
        pa_clip.add_r_adapter(model, rank=65)
    with pytest.raises(ValueError, match="bottleneck"):
        pa_clip.add_bottleneck(model, bottleneck=0)
    with pytest.raises(TypeError, match="model"):
        pa_clip.add_mma(nn.Linear(3, 3))
    assert all(p.requires_grad for p in model.parameters()), "a failed call froze parameters"
    assert not _placement.placements(model), "a failed call recorded a placement"
    assert all(not isinstance(m, pyadapt._module.AdapterModule) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    pa_clip.add_r_adapter(model)
    with pytest.raises(ValueError, match="already"):
        pa_clip.add_r_adapter(model)


def test_fullgraph_compile_of_the_adapted_model_forward_and_backward():
    """Every placement in one model: torch.compile(fullgraph=True) raises on any graph
    break, and the compiled forward and backward equal eager."""
    torch._dynamo.reset()
    model = all_placements(tiny_clip(torch.float32, layers=1)).train()
    images, texts = batch(torch.float32)
    weights = [torch.randn(3, 32), torch.randn(4, 32)]

    def step(fn):
        model.zero_grad(set_to_none=True)
        img, txt = fn(images, texts)
        objective(img, txt, weights).backward()
        return [img.detach(), txt.detach()] + [p.grad.clone() for p in model.parameters()
                                               if p.requires_grad]

    compiled = torch.compile(lambda i, t: features(model, i, t), fullgraph=True)
    eager = step(lambda i, t: features(model, i, t))
    got = step(compiled)
    assert len(got) == len(eager)
    for i, (a, b) in enumerate(zip(got, eager)):
        assert a is not None
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"compiled output/gradient {i}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# LoRA / CP on the attention and MLP linears
# ---------------------------------------------------------------------------------------------

def lora(x, base, t, scaling):
    return F.linear(x, base.weight, base.bias) + scaling * F.linear(F.linear(x, t[0]), t[1])


class EagerLoRABlock(EagerBlock):
    """LoRA beside the attention out-projection and both MLP linears; attention context from
    torch's own multi_head_attention_forward (identity out-projection), independent of pyadapt."""

    def __init__(self, block, t, scaling):
        super().__init__()
        self.block, self.t, self.scaling = block, t, scaling

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        b, t, s = self.block, self.t, self.scaling
        a = b.ln_1(x).transpose(0, 1)  # (L, N, d), what the functional form expects
        d = a.shape[-1]
        eye = torch.eye(d, dtype=a.dtype)
        ctx = F.multi_head_attention_forward(
            a, a, a, d, b.attn.num_heads, b.attn.in_proj_weight, b.attn.in_proj_bias, None, None,
            False, 0.0, eye, torch.zeros(d, dtype=a.dtype), need_weights=False,
            attn_mask=None if attn_mask is None else attn_mask.to(a.dtype))[0].transpose(0, 1)
        x = x + lora(ctx, b.attn.out_proj, t["attn.out_proj"], s)
        h = b.mlp.gelu(lora(b.ln_2(x), b.mlp.c_fc, t["mlp.c_fc"], s))
        return x + lora(h, b.mlp.c_proj, t["mlp.c_proj"], s)


def test_lora_matches_eager_placement():
    backbone = tiny_clip()
    model = copy.deepcopy(backbone)
    pa_clip.add_lowrank(model, rank=3, kind="lora", alpha=6.0)
    randomise_adapters(model)
    ref_model = copy.deepcopy(backbone)
    pairs = []
    for (_, mine_blocks), (_, ref_blocks) in zip(blocks(model), blocks(ref_model)):
        for i, b in enumerate(mine_blocks):
            t = {}
            for site, ad in (("attn.out_proj", b.attn.out_proj), ("mlp.c_fc", b.mlp.c_fc),
                             ("mlp.c_proj", b.mlp.c_proj)):
                mine = [ad.down_weight, ad.up_weight]
                t[site] = [w.detach().clone().requires_grad_(True) for w in mine]
                pairs.append((f"{i}.{site}", mine, t[site]))
            ref_blocks[i] = EagerLoRABlock(ref_blocks[i], t, 2.0)
    images, texts = batch()
    weights = [torch.randn(3, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)]
    img, txt = features(model, images, texts)
    objective(img, txt, weights).backward()
    img_ref, txt_ref = features(ref_model, images, texts)
    objective(img_ref, txt_ref, weights).backward()
    assert_close_rel(img, img_ref, torch.float64, "image features vs eager LoRA")
    assert_close_rel(txt, txt_ref, torch.float64, "text features vs eager LoRA")
    for what, mine, ref in pairs:
        for m, r in zip(mine, ref):
            assert_close_rel(m.grad, r.grad, torch.float64, f"LoRA gradient at {what}")
    assert_backbone_has_no_grad(model)


def test_cp_shares_factors_per_tower_and_folds():
    model = tiny_clip()
    s = pa_clip.add_lowrank(model, rank=4, kind="cp", dropout=0.1)
    assert len(s.adapters) == 12
    for _, resblocks in blocks(model):
        sites = [m for b in resblocks for m in (b.attn.out_proj, b.mlp.c_fc, b.mlp.c_proj)]
        assert all(m.U is sites[0].U and m.V is sites[0].V and m.C is sites[0].C for m in sites)
    assert model.visual.transformer.resblocks[0].mlp.c_fc.U is not \
        model.transformer.resblocks[0].mlp.c_fc.U, "each tower has its own factors"
    randomise_adapters(model)
    images, texts = batch()
    model.train()
    img, txt = features(model, images, texts)
    (img.sum() + txt.sum()).backward()
    assert_backbone_has_no_grad(model)
    model.eval()
    with torch.no_grad():
        before = features(model, images, texts)
        pyadapt.fold_(model)
        folded = features(model, images, texts)
    for a, b in zip(folded, before):
        assert_close_rel(a, b, torch.float64, "CP-adapted features folded vs unfolded")
