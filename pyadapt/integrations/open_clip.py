"""Adapters for open_clip models in one call: MMA, R-Adapter, OFA-style bottleneck, LoRA / CP.

    import open_clip, pyadapt
    from pyadapt.integrations import open_clip as pa_clip
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    print(pa_clip.add_mma(model))          # blocks 5..12 of both towers, backbone frozen
    # or pa_clip.add_r_adapter(model, drop_prob=0.2) / pa_clip.add_bottleneck(model, 64)

Supported: open_clip models whose towers are `open_clip.transformer.Transformer`s of
`ResidualAttentionBlock`s (CLIP with a ViT image tower; CustomTextCLIP's TextTransformer). Each
function freezes every parameter of the model except the pyadapt adapters' (adapters added by an
earlier call stay trainable), records its placement so `pyadapt.load_adapters` can rebuild the
adapters in a fresh model, and returns an `AdapterSummary`.

Placements (DESIGN.md section 7):
- MMA: with a the block's ln_1 of its input x, out = x + attn(a); out = out + mlp(ln_2(out)) +
  scale * A(a), in 1-based blocks start_layer..end_layer of both towers, one shared middle
  projection per block index, the gradient-scale convention on. ln_1(x) is computed once and
  fed to both attention and adapter. Index 0 is the embedding level (image: after ln_pre;
  text: on the token embeddings), without the gradient-scale convention, as in the official code.
- R-Adapter: z + c * drop(q) on the output of every attention out-projection and every MLP
  c_proj of both towers (attention is recomputed with scaled_dot_product_attention so the
  adapter sits inside it; nn.MultiheadAttention would read out_proj's weight directly).
- Bottleneck: f + scale * up(drop(act(down(f)))) on every block's MLP output f, before the
  block's residual add (OFA).
- add_lowrank: LoRA (LowRankAdapter) or Aurora's CP/Tucker (one CPAdapter per tower) on the
  attention out-projection and the MLP linears.

MMA lockstep (open_clip.model.CLIP only): `encode_both(model, image, text)` runs the two towers
block by block together, each MMA index's image and text adapters in one op (one launch on the
triton backend); `add_mma(..., lockstep=True)` or `enable_lockstep(model)` makes
`model(image, text)` use it. Same values and gradients as the sequential encoders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _placement
from .._module import AdapterModule
from ..adapters import FusedAdapter, MultiModalAdapter
from ..linear import RAdapter

try:
    from open_clip.model import CLIP
    from open_clip.transformer import (ResidualAttentionBlock, Transformer, VisionTransformer,
                                       text_global_pool)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("pyadapt.integrations.open_clip needs open_clip_torch: "
                      "pip install 'pyadapt[clip]' (or pip install open_clip_torch)") from exc

Tensor = torch.Tensor

__all__ = ["AdaptedMultiheadAttention", "AdaptedResidualAttentionBlock", "AdapterSummary",
           "LockstepCLIP", "MMAResidualAttentionBlock", "add_bottleneck", "add_lowrank",
           "add_mma", "add_r_adapter", "disable_lockstep", "enable_lockstep", "encode_both",
           "mma_of", "summary", "towers"]


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------

@dataclass
class AdapterSummary:
    """What an add_* call did: the adapter modules it added (qualified names), and the model's
    trainable / total parameter counts afterwards (each shared tensor counted once)."""
    method: str
    trainable: int
    total: int
    adapters: List[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"{self.method}: {len(self.adapters)} adapter modules, {self.trainable:,} "
                f"trainable parameters of {self.total:,} ({100 * self.share:.3f}%)")


def summary(model: nn.Module, method: str = "model",
            adapters: Iterable[str] = ()) -> AdapterSummary:
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return AdapterSummary(method, sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params), list(adapters))


def _freeze_backbone(model: nn.Module) -> None:
    """Everything frozen except the tensors of pyadapt adapters (this call's and earlier ones')."""
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, AdapterModule):
            for _, t in m.adapter_tensors():
                t.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Finding the towers
# ---------------------------------------------------------------------------------------------

def towers(model: nn.Module) -> List[Tuple[str, str, Transformer]]:
    """[(modality, qualified name, Transformer)] of the model's image and text towers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an open_clip model (nn.Module), got "
                        f"{type(model).__name__}")
    found = []
    visual = getattr(model, "visual", None)
    if visual is not None:
        t = getattr(visual, "transformer", None)
        if not isinstance(t, Transformer):
            raise TypeError(f"model.visual: expected an open_clip VisionTransformer (with a "
                            f"transformer of ResidualAttentionBlocks), got "
                            f"{type(visual).__name__}")
        found.append(("vision", "visual.transformer", t))
    for prefix, owner in (("", model), ("text.", getattr(model, "text", None))):
        t = getattr(owner, "transformer", None) if owner is not None else None
        if isinstance(t, Transformer):
            found.append(("text", prefix + "transformer", t))
            break
    else:
        if getattr(model, "text", None) is not None:
            raise TypeError(f"model.text: expected an open_clip TextTransformer, got "
                            f"{type(model.text).__name__}")
    if not found:
        raise TypeError(f"model: no open_clip image or text transformer found in "
                        f"{type(model).__name__} (expected model.visual.transformer and "
                        f"model.transformer or model.text.transformer)")
    for modality, name, t in found:
        for i, blk in enumerate(t.resblocks):
            if not isinstance(blk, ResidualAttentionBlock):
                raise TypeError(f"model.{name}.resblocks[{i}]: expected an open_clip "
                                f"ResidualAttentionBlock, got {type(blk).__name__} (custom "
                                f"blocks are not supported)")
    return found


def _linear_weight(linear: nn.Module) -> Tensor:
    """The weight of an nn.Linear, or of the base linear a pyadapt wrapper holds."""
    return getattr(linear, "base", linear).weight


def _text_owner(model: nn.Module) -> nn.Module:
    return model if isinstance(getattr(model, "transformer", None), Transformer) else model.text


# ---------------------------------------------------------------------------------------------
# MMA
# ---------------------------------------------------------------------------------------------

class AdaptedResidualAttentionBlock(ResidualAttentionBlock):
    """An open_clip ResidualAttentionBlock whose linears may be pyadapt wrappers: the same
    forward and submodules (same state-dict names), and a get_weight_dtype that looks through a
    wrapped mlp.c_fc (open_clip asks the first block for the tower's dtype)."""

    @classmethod
    def from_block(cls, block: ResidualAttentionBlock, **extra: nn.Module):
        if hasattr(block, "ln_1_kv"):
            raise TypeError("block: cross-attention blocks are not supported")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.training = block.training
        for name, child in block.named_children():
            new.add_module(name, child)
        for name, child in extra.items():
            new.add_module(name, child)
        return new

    def get_weight_dtype(self) -> torch.dtype:
        return _linear_weight(self.mlp.c_fc).dtype


class MMAResidualAttentionBlock(AdaptedResidualAttentionBlock):
    """An open_clip ResidualAttentionBlock with MMA's parallel adapter: ln_1(x) is computed once
    and read by both attention and the adapter, whose output joins after the MLP residual.
    Keeps the block's submodules (same state-dict names) and adds `adapter`."""

    adapter: FusedAdapter

    def forward(self, q_x: Tensor, k_x: Optional[Tensor] = None, v_x: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("k_x, v_x: MMA blocks are self-attention blocks; expected None")
        a, x = self.trunk(q_x, attn_mask)
        return self.adapter(a, residual=x)

    def trunk(self, q_x: Tensor, attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The block without its adapter: (a = ln_1(q_x), the block's backbone output). The
        lockstep forward (encode_both) feeds the two towers' pairs to one MMA op."""
        a = self.ln_1(q_x)
        x = q_x + self.ls_1(self.attention(q_x=a, attn_mask=attn_mask))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return a, x


class _ThenAdapter(nn.Module):
    """inner followed by a FusedAdapter with its own residual: MMA's embedding-level adapter."""

    def __init__(self, inner: nn.Module, adapter: FusedAdapter):
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.inner(x))


def add_mma(model: nn.Module, start_layer: int = 5, end_layer: Optional[int] = None,
            bottleneck: int = 32, scale: float = 0.001, *, activation: str = "relu",
            init: str = "kaiming", grad_scale_invariant: bool = True,
            lockstep: bool = False) -> AdapterSummary:
    """Multi-modal adapter (MMA) in blocks start_layer..end_layer (1-based, inclusive, as the
    official code numbers them; end_layer None = the last block of the shallower tower) of the
    image and text towers. Layer 0 is the embedding level. Adapters: down Linear(d, bottleneck) +
    ReLU, the block index's shared Linear(bottleneck, bottleneck) + ReLU, up Linear(bottleneck,
    d), times scale; Kaiming-normal (fan_out) init and zero biases as the official code.
    Freezes the backbone; returns an AdapterSummary. Block i's adapter is
    `<tower>.resblocks[i - 1].adapter`; `mma_of(model)` is the MultiModalAdapter holding them.
    lockstep=True also calls enable_lockstep(model): `model(image, text)` then advances both
    towers block by block, each adapted index's two adapters in one op (see encode_both)."""
    if not isinstance(lockstep, bool):
        raise TypeError(f"lockstep: expected a bool, got {type(lockstep).__name__}")
    if lockstep:
        _check_lockstep_model(model)
    found = towers(model)
    kinds = {m for m, _, _ in found}
    if kinds != {"vision", "text"}:
        raise TypeError(f"model: MMA needs both an image and a text tower, found {sorted(kinds)}")
    if _mma_adapter(model) is not None:
        raise ValueError("model: already has MMA adapters (add_mma was called before)")
    depth = min(len(t.resblocks) for _, _, t in found)
    if not isinstance(start_layer, int) or isinstance(start_layer, bool) or start_layer < 0:
        raise ValueError(f"start_layer: expected an int >= 0 (1-based block index, 0 = "
                         f"embeddings), got {start_layer!r}")
    end = depth if end_layer is None else end_layer
    if not isinstance(end, int) or isinstance(end, bool) or not start_layer <= end <= depth:
        raise ValueError(f"end_layer: expected an int in [start_layer={start_layer}, {depth}] "
                         f"(blocks of the shallower tower) or None, got {end_layer!r}")
    widths = {m: t.width for m, _, t in found}
    weight = _linear_weight(found[0][2].resblocks[0].mlp.c_fc)
    mma = MultiModalAdapter(widths["vision"], widths["text"], bottleneck,
                            layers=range(start_layer, end + 1), scale=scale,
                            activation=activation, grad_scale_invariant=grad_scale_invariant,
                            init=init, device=weight.device, dtype=weight.dtype)
    added = []
    for modality, name, t in found:
        for i in range(max(start_layer, 1), end + 1):
            adapter = mma.vision(i) if modality == "vision" else mma.text(i)
            t.resblocks[i - 1] = MMAResidualAttentionBlock.from_block(t.resblocks[i - 1],
                                                                     adapter=adapter)
            added.append(f"{name}.resblocks.{i - 1}.adapter")
    if start_layer == 0:
        # The official embedding-level adapters do not use the gradient-scale layers.
        for adapter in (mma.vision(0), mma.text(0)):
            adapter.grad_scale_invariant = False
        model.visual.ln_pre = _ThenAdapter(model.visual.ln_pre, mma.vision(0))
        owner = _text_owner(model)
        owner.token_embedding = _ThenAdapter(owner.token_embedding, mma.text(0))
        prefix = "" if owner is model else "text."
        added += ["visual.ln_pre.adapter", f"{prefix}token_embedding.adapter"]
    # Kept as a plain attribute (not a submodule) so parameters are registered once, in place.
    object.__setattr__(model, "_pyadapt_mma", mma)
    _freeze_backbone(model)
    _placement.record(model, "open_clip.add_mma", {
        "start_layer": start_layer, "end_layer": end_layer, "bottleneck": bottleneck,
        "scale": scale, "activation": activation, "init": init,
        "grad_scale_invariant": grad_scale_invariant, "lockstep": lockstep})
    if lockstep:
        enable_lockstep(model)
    return summary(model, "open_clip.add_mma", added)


def _mma_adapter(model: nn.Module) -> Optional[MultiModalAdapter]:
    return getattr(model, "_pyadapt_mma", None)


def mma_of(model: nn.Module) -> MultiModalAdapter:
    """The MultiModalAdapter add_mma put into `model` (mma.vision(i), mma.text(i), mma.shared)."""
    mma = _mma_adapter(model)
    if mma is None:
        raise ValueError("model: has no MMA adapters; call add_mma(model) first")
    return mma


# ---------------------------------------------------------------------------------------------
# MMA lockstep: both towers block by block, one op per adapted index
# ---------------------------------------------------------------------------------------------

class LockstepCLIP(CLIP):
    """An open_clip CLIP whose forward(image, text), given both inputs, runs encode_both: the
    two towers advance together and each MMA index's image and text adapters run in one op.
    Same parameters, buffers and state-dict names as CLIP; enable_lockstep(model) switches an
    MMA-adapted CLIP to this class in place, disable_lockstep(model) switches it back."""

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None):
        if image is None or text is None:  # one tower only: nothing to pair
            return super().forward(image, text)
        image_features, text_features = encode_both(self, image, text, normalize=True)
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features,
                   "logit_scale": self.logit_scale.exp()}
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
            return out
        if self.logit_bias is not None:
            return image_features, text_features, self.logit_scale.exp(), self.logit_bias
        return image_features, text_features, self.logit_scale.exp()


def _check_lockstep_model(model: nn.Module, blocks: bool = True) -> None:
    """What encode_both reproduces: open_clip 3.x's CLIP with a ViT image tower."""
    if not isinstance(model, CLIP) or type(model) not in (CLIP, LockstepCLIP):
        raise TypeError(f"model: the lockstep forward needs an open_clip.model.CLIP (the class "
                        f"itself: CustomTextCLIP, CoCa and CLIP subclasses define their own "
                        f"towers), got {type(model).__name__}")
    visual = model.visual
    if not isinstance(visual, VisionTransformer) or not callable(getattr(visual, "_pool", None)):
        raise TypeError(f"model.visual: the lockstep forward needs an open_clip 3.x "
                        f"VisionTransformer, got {type(visual).__name__}")
    if visual.output_tokens:
        raise ValueError("model.visual.output_tokens: expected False (CLIP.encode_image cannot "
                         "normalise a (pooled, tokens) pair either)")
    if blocks:  # every block a plain ResidualAttentionBlock (or ours); not per forward
        towers(model)


def enable_lockstep(model: nn.Module) -> nn.Module:
    """Make `model(image, text)` of an MMA-adapted open_clip CLIP use encode_both (both towers
    block by block, one MMA op per adapted index); calls with only images or only texts are
    unchanged. Switches the model's class to LockstepCLIP in place (parameters untouched) and
    records the choice in the add_mma placement, so checkpoints rebuild it. Returns model."""
    _check_lockstep_model(model)
    mma_of(model)
    object.__setattr__(model, "__class__", LockstepCLIP)
    _mark_lockstep(model, True)
    return model


def disable_lockstep(model: nn.Module) -> nn.Module:
    """Undo enable_lockstep: the towers run one after the other again. Returns model."""
    if isinstance(model, LockstepCLIP):
        object.__setattr__(model, "__class__", CLIP)
        _mark_lockstep(model, False)
    return model


def _mark_lockstep(model: nn.Module, on: bool) -> None:
    for entry in getattr(model, _placement.ATTR, []):
        if entry.get("kind") == "open_clip.add_mma":
            entry.setdefault("config", {})["lockstep"] = on


def _split_then(module: nn.Module, adapter: Optional[FusedAdapter]):
    """(inner module, embedding-level adapter) of a _ThenAdapter that holds `adapter`."""
    if isinstance(module, _ThenAdapter) and adapter is not None and module.adapter is adapter:
        return module.inner, adapter
    return module, None


def _advance_together(mma: MultiModalAdapter, t_v: Transformer, x_v: Tensor, t_t: Transformer,
                      x_t: Tensor, mask_t: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Transformer.forward of both towers, interleaved block by block: at an index where both
    blocks are this MMA's, their trunks run and then one mma.both call adds both adapters."""
    for name, t in (("visual.transformer", t_v), ("transformer", t_t)):
        if t.grad_checkpointing:
            raise ValueError(f"model.{name}.grad_checkpointing: the lockstep forward does not "
                             f"support gradient checkpointing; disable it or call "
                             f"disable_lockstep(model)")
    if not t_v.batch_first:
        x_v = x_v.transpose(0, 1).contiguous()
    if not t_t.batch_first:
        x_t = x_t.transpose(0, 1).contiguous()
    blocks_v, blocks_t = list(t_v.resblocks), list(t_t.resblocks)
    paired = set(mma.layers)
    for i in range(1, max(len(blocks_v), len(blocks_t)) + 1):
        b_v = blocks_v[i - 1] if i <= len(blocks_v) else None
        b_t = blocks_t[i - 1] if i <= len(blocks_t) else None
        if (i in paired and isinstance(b_v, MMAResidualAttentionBlock) and
                isinstance(b_t, MMAResidualAttentionBlock) and b_v.adapter is mma.vision(i) and
                b_t.adapter is mma.text(i)):
            a_v, r_v = b_v.trunk(x_v, None)
            a_t, r_t = b_t.trunk(x_t, mask_t)
            x_v, x_t = mma.both(i, a_v, a_t, r_v, r_t)
            continue
        if b_v is not None:
            x_v = b_v(x_v, attn_mask=None)
        if b_t is not None:
            x_t = b_t(x_t, attn_mask=mask_t)
    if not t_v.batch_first:
        x_v = x_v.transpose(0, 1)
    if not t_t.batch_first:
        x_t = x_t.transpose(0, 1)
    return x_v, x_t


def encode_both(model: nn.Module, image: Tensor, text: Tensor,
                normalize: bool = False) -> Tuple[Tensor, Tensor]:
    """(model.encode_image(image, normalize), model.encode_text(text, normalize)) of an
    MMA-adapted open_clip CLIP, computed with the two towers in lockstep: embeddings as open_clip
    3.3 computes them, then block i of both transformers, then ln_post / pooling / proj and
    ln_final / text pooling / text_projection. At each MMA index the image and text adapters run
    through `mma_of(model).both(i, ...)`, one op (one launch on the triton backend) instead of
    two; with adapter dropout in training or EMA evaluation, both() runs them separately. Same
    values and gradients as the sequential encoders. Forward hooks registered on MMA blocks
    themselves are not called (their trunk and adapter are called directly)."""
    _check_lockstep_model(model, blocks=False)
    mma = mma_of(model)
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a Tensor (N, 3, H, W), got {type(image).__name__}")
    if not isinstance(text, Tensor):
        raise TypeError(f"text: expected a Tensor (N, context_length) of token ids, got "
                        f"{type(text).__name__}")
    visual = model.visual
    has_0 = 0 in mma.layers
    ln_pre, adapter_v0 = _split_then(visual.ln_pre, mma.vision(0) if has_0 else None)
    token_embedding, adapter_t0 = _split_then(model.token_embedding,
                                              mma.text(0) if has_0 else None)

    # Image embeddings: VisionTransformer._embeds, with ln_pre's MMA adapter held back.
    x_v = visual.conv1(image)
    x_v = x_v.reshape(x_v.shape[0], x_v.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x_v.shape[0], -1, -1)
    x_v = torch.cat([cls.to(x_v.dtype), x_v], dim=1)
    x_v = x_v + visual.positional_embedding.to(x_v.dtype)
    x_v = visual.patch_dropout(x_v)
    x_v = ln_pre(x_v)
    # Text embeddings: CLIP.encode_text, with the token embeddings' MMA adapter held back.
    cast_dtype = model.transformer.get_cast_dtype()
    e_t = token_embedding(text)
    if adapter_v0 is not None and adapter_t0 is not None:
        x_v, e_t = mma.both(0, x_v, e_t)
    else:
        x_v = x_v if adapter_v0 is None else adapter_v0(x_v)
        e_t = e_t if adapter_t0 is None else adapter_t0(e_t)
    x_t = e_t.to(cast_dtype) + model.positional_embedding.to(cast_dtype)

    x_v, x_t = _advance_together(mma, visual.transformer, x_v, model.transformer, x_t,
                                 model.attn_mask)

    # Image head: VisionTransformer.forward after its transformer.
    image_features, _ = visual._pool(x_v)
    if visual.proj is not None:
        image_features = image_features @ visual.proj
    # Text head: CLIP.encode_text after its transformer.
    x_t = model.ln_final(x_t)
    text_features = text_global_pool(x_t, text, model.text_pool_type,
                                     eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        if isinstance(model.text_projection, nn.Linear):
            text_features = model.text_projection(text_features)
        else:
            text_features = text_features @ model.text_projection
    if normalize:
        return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    return image_features, text_features


# ---------------------------------------------------------------------------------------------
# R-Adapter
# ---------------------------------------------------------------------------------------------

class AdaptedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention's computation (packed or separate in-projection, float or boolean
    attn_mask, key_padding_mask) with `out_proj` any module, e.g. an RAdapter around the original
    out-projection. nn.MultiheadAttention itself cannot host an adapter there: it reads
    out_proj.weight and out_proj.bias directly. Takes over the original's parameters (same
    names)."""

    def __init__(self, mha: nn.MultiheadAttention, out_proj: nn.Module):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha: expected an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise TypeError("mha: add_bias_kv and add_zero_attn are not supported")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        if mha._qkv_same_embed_dim:
            self.in_proj_weight = mha.in_proj_weight
        else:
            self.q_proj_weight = mha.q_proj_weight
            self.k_proj_weight = mha.k_proj_weight
            self.v_proj_weight = mha.v_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = out_proj

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, None]:
        if need_weights:
            raise ValueError("need_weights: adapted attention does not return attention "
                             "weights; expected False")
        unbatched = query.dim() == 2
        if unbatched or not self.batch_first:
            def to_batch_first(t: Tensor) -> Tensor:
                return t.unsqueeze(0) if unbatched else t.transpose(0, 1)
            # Keep self-attention inputs one object, so _project runs one packed GEMM.
            same = query is key and key is value
            query = to_batch_first(query)
            key, value = (query, query) if same else (to_batch_first(key), to_batch_first(value))
        n, lq, _ = query.shape
        ls = key.shape[1]
        q, k, v = self._project(query, key, value)
        h, hd = self.num_heads, self.head_dim
        q, k, v = (t.reshape(n, -1, h, hd).transpose(1, 2) for t in (q, k, v))
        mask = _merge_masks(attn_mask, key_padding_mask, n, h, lq, ls, q.dtype)
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        out = self.out_proj(ctx.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], n: int, h: int,
                 lq: int, ls: int, dtype: torch.dtype) -> Optional[Tensor]:
    """nn.MultiheadAttention's masks as one additive float mask for SDPA (True = masked out)."""
    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(1, 1, lq, ls) if mask.dim() == 2 else mask.view(n, h, lq, ls)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(n, 1, 1, ls)
        mask = kpm if mask is None else mask + kpm
    return mask


def add_r_adapter(model: nn.Module, rank: Optional[int] = None, drop_prob: float = 0.0,
                  scale: float = 0.1, *, eval_scale: float = 0.5, learn_scale: bool = True,
                  drop_granularity: str = "sample", vision: bool = True,
                  text: bool = True) -> AdapterSummary:
    """R-Adapter on the output of every attention out-projection and every MLP c_proj of the
    image (vision=True) and text (text=True) towers: z + c * drop(q), q = z W_f^T (rank None,
    full, zero-init; what the official runs train) or (z W_d^T) W_u^T (rank r). c = s in
    training (s learnable, init `scale`) and s * eval_scale in eval. Dropping (drop_prob, 0.2 in
    the official runs) per sample, token row or sequence position (drop_granularity).
    Freezes the backbone; pyadapt.fold_(model) folds every adapter into its linear."""
    found = [f for f in towers(model) if (f[0] == "vision" and vision) or
             (f[0] == "text" and text)]
    if not found:
        raise ValueError("vision, text: expected at least one tower to adapt (both are False or "
                         "the model lacks the requested towers)")
    kwargs = dict(rank=rank, drop_prob=drop_prob, scale=scale, learn_scale=learn_scale,
                  eval_scale=eval_scale, drop_granularity=drop_granularity)
    plan = []
    for _, name, t in found:
        for i, blk in enumerate(t.resblocks):
            if isinstance(blk.attn, AdaptedMultiheadAttention) or \
                    isinstance(blk.mlp.c_proj, AdapterModule):
                raise ValueError(f"model.{name}.resblocks[{i}]: already has an adapter on its "
                                 f"out-projection or c_proj (add_r_adapter was called before)")
            plan.append((name, i, blk, t.batch_first))
    added = []
    # Validate the arguments on a throwaway linear (RAdapter freezes its base on construction),
    # then build every adapter before changing the model.
    RAdapter(nn.Linear(1, 1), **dict(kwargs, rank=None))
    if rank is not None:
        RAdapter(nn.Linear(rank, rank), **kwargs)
        for _, name, t in found:
            if rank > t.width:
                raise ValueError(f"rank: expected 1 <= rank <= {t.width} (width of model.{name}),"
                                 f" or None for the full-rank adapter; got {rank}")
    built = [(name, i, blk,
              RAdapter(blk.attn.out_proj, batch_first=bf, **kwargs),
              RAdapter(blk.mlp.c_proj, batch_first=bf, **kwargs)) for name, i, blk, bf in plan]
    for name, i, blk, attn_adapter, mlp_adapter in built:
        blk.attn = AdaptedMultiheadAttention(blk.attn, attn_adapter)
        blk.mlp.c_proj = mlp_adapter
        added += [f"{name}.resblocks.{i}.attn.out_proj", f"{name}.resblocks.{i}.mlp.c_proj"]
    _freeze_backbone(model)
    _placement.record(model, "open_clip.add_r_adapter", dict(kwargs, vision=vision, text=text))
    return summary(model, "open_clip.add_r_adapter", added)


# ---------------------------------------------------------------------------------------------
# Bottleneck (OFA placement)
# ---------------------------------------------------------------------------------------------

def add_bottleneck(model: nn.Module, bottleneck: int = 64, scale: float = 1.0, *,
                   dropout: float = 0.0, activation: str = "relu", init: str = "lora",
                   learn_scale: bool = False, vision: bool = True,
                   text: bool = True) -> AdapterSummary:
    """A bottleneck adapter on every block's MLP output f (OFA): f + scale * up(drop(act(down(
    f)))), before the block's residual add; appended to the block's `mlp` Sequential as
    `mlp.adapter`. init "lora" starts as the identity (up zero), "bert" is OFA's normal(0.02).
    Freezes the backbone; returns an AdapterSummary."""
    found = [f for f in towers(model) if (f[0] == "vision" and vision) or
             (f[0] == "text" and text)]
    if not found:
        raise ValueError("vision, text: expected at least one tower to adapt (both are False or "
                         "the model lacks the requested towers)")
    built = []
    for _, name, t in found:
        for i, blk in enumerate(t.resblocks):
            if not isinstance(blk.mlp, nn.Sequential):
                raise TypeError(f"model.{name}.resblocks[{i}].mlp: expected an nn.Sequential, "
                                f"got {type(blk.mlp).__name__}")
            if hasattr(blk.mlp, "adapter"):
                raise ValueError(f"model.{name}.resblocks[{i}].mlp: already has an adapter "
                                 f"(add_bottleneck was called before)")
            w = _linear_weight(blk.mlp.c_fc)
            built.append((name, i, blk, FusedAdapter(
                t.width, bottleneck, activation, True, scale, dropout, init,
                learn_scale=learn_scale, device=w.device, dtype=w.dtype)))
    added = []
    for name, i, blk, adapter in built:
        blk.mlp.add_module("adapter", adapter)
        added.append(f"{name}.resblocks.{i}.mlp.adapter")
    _freeze_backbone(model)
    _placement.record(model, "open_clip.add_bottleneck", {
        "bottleneck": bottleneck, "scale": scale, "dropout": dropout, "activation": activation,
        "init": init, "learn_scale": learn_scale, "vision": vision, "text": text})
    return summary(model, "open_clip.add_bottleneck", added)


# ---------------------------------------------------------------------------------------------
# LoRA / Aurora CP on the attention and MLP linears
# ---------------------------------------------------------------------------------------------

LOWRANK_SITES = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def add_lowrank(model: nn.Module, rank: int = 8, *, kind: str = "lora",
                alpha: Optional[float] = None, dropout: float = 0.0, core: str = "tucker",
                sites: Iterable[str] = LOWRANK_SITES, vision: bool = True,
                text: bool = True) -> AdapterSummary:
    """Low-rank adapters on the block linears named in `sites` (any of attn.out_proj, mlp.c_fc,
    mlp.c_proj) of the chosen towers. kind "lora": a LowRankAdapter per linear (alpha defaults
    to rank, i.e. scaling 1); kind "cp": Aurora's mode approximation, one CPAdapter per tower
    (U, V and the core shared by all its sites, a lambda per site; core "tucker" or "cp").
    The attention out-projection is reached through AdaptedMultiheadAttention (pyadapt.inject
    refuses it: nn.MultiheadAttention would bypass a wrapper). Freezes the backbone; foldable
    with pyadapt.fold_."""
    from ..linear import CPAdapter, LowRankAdapter

    if kind not in ("lora", "cp"):
        raise ValueError(f"kind: expected 'lora' or 'cp', got {kind!r}")
    sites = list(sites)
    unknown = [x for x in sites if x not in LOWRANK_SITES]
    if unknown or not sites:
        raise ValueError(f"sites: expected a non-empty subset of {list(LOWRANK_SITES)}, got "
                         f"{sites}")
    found = [f for f in towers(model) if (f[0] == "vision" and vision) or
             (f[0] == "text" and text)]
    if not found:
        raise ValueError("vision, text: expected at least one tower to adapt (both are False or "
                         "the model lacks the requested towers)")
    targets = []  # (tower name, block index, block, site, base linear)
    for _, name, t in found:
        for i, blk in enumerate(t.resblocks):
            for site in sites:
                owner, attr = (blk.attn, "out_proj") if site == "attn.out_proj" else \
                    (blk.mlp, site.split(".")[1])
                base = getattr(owner, attr)
                if isinstance(base, AdapterModule) or isinstance(owner, AdaptedMultiheadAttention):
                    raise ValueError(f"model.{name}.resblocks[{i}].{site}: already has an "
                                     f"adapter")
                if not isinstance(base, nn.Linear):
                    raise TypeError(f"model.{name}.resblocks[{i}].{site}: expected an "
                                    f"nn.Linear, got {type(base).__name__}")
                targets.append((name, i, blk, site, base))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:  # build every adapter first (their constructors freeze the bases)
        if kind == "lora":
            a = float(rank) if alpha is None else alpha
            wrapped = [LowRankAdapter(base, rank, a, dropout) for *_, base in targets]
        else:
            wrapped = []
            for _, name, t in found:
                bases = [base for tname, *_, base in targets if tname == name]
                group = CPAdapter(bases, rank, core, dropout, width=t.width)
                wrapped += list(group.sites)
    except Exception:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        raise
    added = []
    for (name, i, blk, site, _), new in zip(targets, wrapped):
        if site == "attn.out_proj":
            blk.attn = AdaptedMultiheadAttention(blk.attn, new)
        else:
            setattr(blk.mlp, site.split(".")[1], new)
        added.append(f"{name}.resblocks.{i}.{site}")
    for _, name, t in found:
        for i, blk in enumerate(t.resblocks):
            if not isinstance(blk, AdaptedResidualAttentionBlock):
                t.resblocks[i] = AdaptedResidualAttentionBlock.from_block(blk)
    _freeze_backbone(model)
    _placement.record(model, "open_clip.add_lowrank", {
        "rank": rank, "kind": kind, "alpha": alpha, "dropout": dropout, "core": core,
        "sites": sites, "vision": vision, "text": text})
    return summary(model, f"open_clip.add_lowrank[{kind}]", added)


_placement.register("open_clip.add_mma", add_mma)
_placement.register("open_clip.add_r_adapter", add_r_adapter)
_placement.register("open_clip.add_bottleneck", add_bottleneck)
_placement.register("open_clip.add_lowrank", add_lowrank)
