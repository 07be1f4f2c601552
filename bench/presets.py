"""Benchmark shapes, all in one place, each taken from a paper's shipped training configuration.

Sources (summarised in /work/shared/REFERENCE-SEMANTICS.md, section numbers below, and in
DESIGN.md section 7):
  MMA (ZjjConan/Multi-Modal-Adapter, configs + trainers/mmadapter.py; RS 1.6): ViT-B/16,
    image tower 197 tokens x 768, batch 16 (base-to-novel) or 128 (ImageNet); text tower
    77 tokens x 512 for every class prompt each step (500 ImageNet base classes, 1000 for the
    cross-dataset source run); adapter 32 wide with a shared 32 x 32 middle projection;
    blocks 5-12; AMP fp16.
  OFA bottleneck adapter (OFA-Sys/OFA, train_caption_stage1.sh + unify_transformer_layer.py;
    RS 4.1): ofa_base d = 768, r = 200 (the default --adapter-dim); batch 8 per GPU; encoder
    ~900 image patches + 80 text tokens, decoder <= 20 tokens (+BOS); 6 + 6 layers.
  R-Adapter (tjddus9597/R-Adapter-ECCV2024, docs/RUN.md, src/args.py; RS 2.8): ViT-B/16, 128
    images per GPU, adapters on the attention out-projection (768 -> 768) and the MLP's second
    linear (3072 -> 768) of every block, full-rank W_f as the shipped runs train it; text 77
    tokens x 512 at the same batch; MPM-NCE over the global batch N = 512, D = 512.
    ViT-L/14 (the paper's larger backbone): open_clip's ViT-L-14 architecture, 224 px / patch
    14 -> 257 tokens, width 1024, MLP 4096; the per-GPU batch is not in RS: 128 is ASSUMED
    (the ViT-B/16 configuration's).
  LoRA r = 16 (alpha 16) on the 768 x 768 attention projections of ViT-B/16 at the MMA ImageNet
    batch (128 x 197 tokens): the common LoRA setting, used as the LoRA-form workload.
  Aurora (WillDreamer/Aurora, RS 3.5): video retrieval uses R = 64 with a BLIP ViT-B of 197 tokens
    x 8 frames, batch 8; 36 projections = q, k, v of the 12 ViT blocks (768 x 768), one shared
    U, V and Tucker core, one lambda per projection.
  Folding: the whole model's adapted linears in one call: R-Adapter full rank on ViT-B/16
    (image 12 x (768 <- 768, 768 <- 3072), text 12 x (512 <- 512, 512 <- 2048), weights and
    biases), and LoRA r = 16 on q, k, v, out of both towers of ViT-B/16.

CPU presets are the same layers at small batches (2 shared cores; the whole CPU run stays
within a few minutes). GPU presets are the papers' per-GPU sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

VIT_B16_IMAGE_TOKENS = 197   # 224 px / patch 16 = 14 x 14 + CLS
VIT_L14_IMAGE_TOKENS = 257   # 224 px / patch 14 = 16 x 16 + CLS
CLIP_TEXT_TOKENS = 77


@dataclass(frozen=True)
class Preset:
    """One workload of one op. `dims` holds the op's sizes (see each op's builder in
    bench/_common.py); `m` is the number of rows (batch x tokens) where the op has rows."""
    op: str
    name: str
    device: str                      # "cpu" or "cuda"
    dims: Dict[str, object] = field(default_factory=dict)
    source: str = ""

    @property
    def m(self) -> int:
        return int(self.dims.get("m", 0))

    def with_m(self, m: int) -> "Preset":
        """The same layer at another row count (the GPU report's sweep over M)."""
        return replace(self, name=f"{self.name}@M{m}", dims={**self.dims, "m": m})


def _p(op, name, device, source, **dims) -> Preset:
    return Preset(op=op, name=name, device=device, dims=dims, source=source)


PRESETS: Tuple[Preset, ...] = (
    # --- bottleneck / MMA ------------------------------------------------------------------
    _p("bottleneck", "mma-image-b16", "cpu", "MMA base-to-novel: 16 images x 197 tokens, d 768",
       m=16 * VIT_B16_IMAGE_TOKENS, d=768, r=32, shared=True, scale=0.001),
    _p("bottleneck", "ofa-base-decoder-b8", "cpu", "OFA-base decoder: 8 x 21 tokens, d 768, r 200",
       m=8 * 21, d=768, r=200, shared=False, scale=1.0),
    _p("bottleneck", "m4096-d768-r32", "cpu", "issue 5's CPU target shape (plain bottleneck)",
       m=4096, d=768, r=32, shared=False, scale=0.001),
    _p("bottleneck", "mma-image-b128", "cuda", "MMA ImageNet: 128 images x 197 tokens, d 768",
       m=128 * VIT_B16_IMAGE_TOKENS, d=768, r=32, shared=True, scale=0.001),
    _p("bottleneck", "mma-image-b16", "cuda", "MMA base-to-novel: 16 images x 197 tokens",
       m=16 * VIT_B16_IMAGE_TOKENS, d=768, r=32, shared=True, scale=0.001),
    _p("bottleneck", "mma-text-n500", "cuda", "MMA ImageNet base: 500 prompts x 77 tokens, d 512",
       m=500 * CLIP_TEXT_TOKENS, d=512, r=32, shared=True, scale=0.001),
    _p("bottleneck", "mma-text-n1000", "cuda", "MMA cross-dataset: 1000 prompts x 77 tokens",
       m=1000 * CLIP_TEXT_TOKENS, d=512, r=32, shared=True, scale=0.001),
    _p("bottleneck", "ofa-base-encoder-b8", "cuda", "OFA-base encoder: 8 x (900 + 80) tokens",
       m=8 * 980, d=768, r=200, shared=False, scale=1.0),
    # --- R-Adapter ---------------------------------------------------------------------------
    _p("radapter", "vitb16-attn-out-b4", "cpu", "R-Adapter ViT-B/16 out-proj, 4 images",
       m=4 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=None, scale=0.1,
       tokens=VIT_B16_IMAGE_TOKENS, drop_prob=0.2),
    _p("radapter", "vitb16-attn-out-b128", "cuda", "R-Adapter ViT-B/16 out-proj, 128 images",
       m=128 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=None, scale=0.1,
       tokens=VIT_B16_IMAGE_TOKENS, drop_prob=0.2),
    _p("radapter", "vitb16-mlp-out-b128", "cuda", "R-Adapter ViT-B/16 c_proj 3072 -> 768",
       m=128 * VIT_B16_IMAGE_TOKENS, d_in=3072, d_out=768, rank=None, scale=0.1,
       tokens=VIT_B16_IMAGE_TOKENS, drop_prob=0.2),
    _p("radapter", "vitb16-text-attn-out-b128", "cuda", "R-Adapter text out-proj, 128 x 77",
       m=128 * CLIP_TEXT_TOKENS, d_in=512, d_out=512, rank=None, scale=0.1,
       tokens=CLIP_TEXT_TOKENS, drop_prob=0.2),
    _p("radapter", "vitl14-attn-out-b128", "cuda", "R-Adapter ViT-L/14 out-proj (batch assumed)",
       m=128 * VIT_L14_IMAGE_TOKENS, d_in=1024, d_out=1024, rank=None, scale=0.1,
       tokens=VIT_L14_IMAGE_TOKENS, drop_prob=0.2),
    _p("radapter", "vitl14-mlp-out-b128", "cuda", "R-Adapter ViT-L/14 c_proj 4096 -> 1024",
       m=128 * VIT_L14_IMAGE_TOKENS, d_in=4096, d_out=1024, rank=None, scale=0.1,
       tokens=VIT_L14_IMAGE_TOKENS, drop_prob=0.2),
    _p("radapter", "vitb16-attn-out-r128-b128", "cuda", "R-Adapter low rank (--adapter=128)",
       m=128 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=128, scale=0.1,
       tokens=VIT_B16_IMAGE_TOKENS, drop_prob=0.2),
    # --- LoRA / CP (lowrank op) ------------------------------------------------------------
    _p("lowrank", "lora-r16-vitb16-qkv-b4", "cpu", "LoRA r 16 on a 768 x 768 projection, 4 images",
       m=4 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=16, alpha=16.0, sites=1),
    _p("lowrank", "lora-r16-m4096", "cpu", "issue 5's CPU target shape: LoRA r 16, 768 x 768",
       m=4096, d_in=768, d_out=768, rank=16, alpha=16.0, sites=1),
    _p("lowrank", "lora-r32-m4096", "cpu", "issue 5's CPU target shape at the bottleneck's r 32",
       m=4096, d_in=768, d_out=768, rank=32, alpha=32.0, sites=1),
    _p("lowrank", "cp-R64-6proj-b1f2", "cpu", "Aurora Tucker R 64, 6 projections, 2 frames",
       m=2 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=64, sites=6, core=True),
    _p("lowrank", "lora-r16-vitb16-qkv-b128", "cuda", "LoRA r 16, 768 x 768, 128 x 197 tokens",
       m=128 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=16, alpha=16.0, sites=1),
    _p("lowrank", "cp-R64-36proj-video-b8", "cuda",
       "Aurora video: Tucker R 64 shared by 36 projections (q, k, v x 12), 8 x 8 x 197 tokens",
       m=8 * 8 * VIT_B16_IMAGE_TOKENS, d_in=768, d_out=768, rank=64, sites=36, core=True),
    # --- fold (whole models) -----------------------------------------------------------------
    _p("fold", "radapter-vitb16-image-2blocks", "cpu", "R-Adapter full rank, 2 image blocks",
       items=[(768, 768, 768)] * 2 + [(768, 3072, 768)] * 2, bias=True),
    _p("fold", "radapter-vitb16-both-towers", "cuda",
       "R-Adapter full rank, every block of both ViT-B/16 towers",
       items=([(768, 768, 768)] * 12 + [(768, 3072, 768)] * 12
              + [(512, 512, 512)] * 12 + [(512, 2048, 512)] * 12), bias=True),
    _p("fold", "lora-r16-vitb16-both-towers", "cuda", "LoRA r 16 on q, k, v, out of both towers",
       items=[(768, 768, 16)] * 48 + [(512, 512, 16)] * 48, bias=False),
    # --- MPM-NCE loss --------------------------------------------------------------------------
    _p("mpm_nce", "radapter-n128", "cpu", "MPM-NCE, one GPU's batch N 128, D 512",
       n=128, dim=512, classes=100),
    _p("mpm_nce", "radapter-imagenet-n512", "cuda", "MPM-NCE, global batch N 512, D 512",
       n=512, dim=512, classes=1000),
)


def presets(op: str, device: str | None = None) -> list[Preset]:
    """The presets of one op, optionally of one device kind."""
    return [p for p in PRESETS if p.op == op and (device is None or p.device == device)]


# Per device kind, the dtypes each op is timed in: the papers train in fp16 AMP (bf16 is today's
# default); the CPU backend computes fp32.
DTYPES = {"cpu": ("float32",), "cuda": ("bfloat16", "float16")}

# GPU report sweep of M (rows) around the headline presets, for the speed-up vs M plot.
M_SWEEP = (1024, 4096, 16384, 65536)

# End-to-end training step (bench_e2e.py).
E2E = {
    # open_clip ViT-B-16 from random init (no download) at 128 images (and 128 captions) per
    # step: MMA's ImageNet batch and R-Adapter's per-GPU batch.
    "cuda": {"model": "ViT-B-16", "batch": 128, "mma_start_layer": 5},
    # a small CLIP (6 blocks, width 128, 64 px images, 16 text tokens): the CPU run stays short.
    "cpu": {"model": "small", "batch": 8, "mma_start_layer": 3},
}
