"""End to end: one training step (forward, backward, SGD step) of an open_clip model carrying
MMA, R-Adapter or bottleneck adapters, for each pyadapt backend. Records step time (the
benchmark), images/s and, on a GPU, peak memory in the benchmark's extra_info.

    HF_HUB_OFFLINE=1 pytest bench/bench_e2e.py --benchmark-only

GPU: open_clip ViT-B-16 from random init (no download), batch of images and captions from
bench/presets.py E2E, bf16 autocast (the papers use fp16 autocast + GradScaler; bf16 needs no
scaler). CPU: a small CLIP (6 blocks, width 128) in fp32. Placements are
pyadapt.integrations.open_clip's add_mma (blocks mma_start_layer..end), add_r_adapter (every
out-projection and c_proj, drop_prob 0.2 per sample) and add_bottleneck (every MLP output,
bottleneck 64). The loss is pyadapt.MPMNCELoss over the batch with random class labels; SGD
lr 0.0015, momentum 0.9 (MMA's optimiser) over the adapter parameters only.

Before timing, each backend's loss and adapter gradients on a small batch are compared with the
same model in float64 on the reference backend; the error may be at most max(the dtype's
tolerance, 2x the error of the reference backend in the same precision).
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List

import pytest
import torch

import pyadapt

from ._common import DEVICE_BACKENDS, backend, rel_err, sync
from .presets import E2E

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METHODS = ("mma", "r_adapter", "bottleneck")
CHECK_BATCH = 4
# floor of the allowed relative error against float64 (fp32 on CPU, bf16 autocast on GPU)
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-2}
ROUNDS = {"cpu": 5, "cuda": 20}


def _open_clip():
    open_clip = pytest.importorskip("open_clip", reason="needs open_clip_torch (extra [clip])")
    integration = pytest.importorskip("pyadapt.integrations.open_clip")
    return open_clip, integration


def make_model(device: str, method: str) -> torch.nn.Module:
    open_clip, integration = _open_clip()
    cfg = E2E[device]
    torch.manual_seed(0)
    if cfg["model"] == "small":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        model = CLIP(64, CLIPVisionCfg(image_size=64, layers=6, width=128, patch_size=16,
                                       head_width=32),
                     CLIPTextCfg(context_length=16, width=128, heads=4, layers=6))
    else:
        model = open_clip.create_model(cfg["model"], pretrained=None)
    model = model.to(device)
    if method == "mma":
        integration.add_mma(model, start_layer=cfg["mma_start_layer"])
    elif method == "r_adapter":
        integration.add_r_adapter(model, drop_prob=0.2)
    else:
        integration.add_bottleneck(model, bottleneck=64, init="bert")
    with torch.no_grad():
        # Zero-initialised adapter weights (R-Adapter's W_f) would leave parts of the gradient
        # identically zero and the check blind to them: give every adapter tensor a value.
        for p in _trainable(model):
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def _trainable(model) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(model, device: str, batch: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn((batch, 3, size, size), generator=gen, device=device).to(dtype)
    ctx, vocab = model.context_length, model.vocab_size
    texts = torch.randint(1, vocab, (batch, ctx), generator=gen, device=device)
    labels = torch.randint(0, max(batch // 2, 1), (batch,), generator=gen, device=device)
    return images, texts, labels


def loss_fn(model, images, texts, labels, autocast: bool):
    device = images.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(texts, normalize=True)
    return pyadapt.MPMNCELoss()(img.float(), txt.float(), labels)


def forward_backward(model, batch, autocast: bool, seed: int = 1):
    """Loss and adapter gradients of one step (adapter dropping reseeded: same masks each time)."""
    torch.manual_seed(seed)
    for p in _trainable(model):
        p.grad = None
    loss = loss_fn(model, *batch, autocast=autocast)
    loss.backward()
    return loss.detach(), [p.grad for p in _trainable(model)]


def check(model, device: str, impl_backend: str) -> Dict[str, float]:
    """Loss and every adapter gradient of `impl_backend` against float64 on the reference."""
    autocast = device == "cuda"
    small = make_batch(model, device, CHECK_BATCH)

    def errors(m, b) -> List[float]:
        with backend(b):
            loss, grads = forward_backward(m, small, autocast)
        return [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]

    ref_model = copy.deepcopy(model).double()
    with backend("reference"):
        ref_loss, ref_grads = forward_backward(
            ref_model, (small[0].double(), small[1], small[2]), autocast=False)
    del ref_model
    got = errors(model, impl_backend)
    baseline = errors(model, "reference")
    limit = max(TOLERANCE[device], 2 * max(baseline))
    assert max(got) <= limit, (f"pyadapt-{impl_backend}: worst relative error {max(got):.3e} "
                               f"(loss {got[0]:.3e}) > {limit:.3e} against float64")
    return {"max_rel_err_vs_float64": max(got), "reference_backend_err": max(baseline)}


def _cases():
    params = []
    usable = set(pyadapt.available_backends())
    for device in ("cpu", "cuda"):
        skip = pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(),
                                  reason="GPU preset: needs CUDA")
        for method in METHODS:
            for b in DEVICE_BACKENDS[device]:
                if b in usable:
                    params.append(pytest.param(device, method, b, marks=[skip],
                                               id=f"{device}-{E2E[device]['model']}-{method}-"
                                                  f"pyadapt-{b}"))
    return params


@pytest.mark.parametrize("device,method,impl_backend", _cases())
def test_train_step(benchmark, device, method, impl_backend):
    model = make_model(device, method)
    errors = check(model, device, impl_backend)
    batch_size = E2E[device]["batch"]
    batch = make_batch(model, device, batch_size, seed=2)
    opt = torch.optim.SGD(_trainable(model), lr=0.0015, momentum=0.9)
    autocast = device == "cuda"

    def step():
        with backend(impl_backend):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, *batch, autocast=autocast).backward()
            opt.step()
        sync(device)

    peak = None
    if device == "cuda":
        step()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    benchmark.group = f"e2e {E2E[device]['model']} {method}"
    benchmark.extra_info.update({
        "op": "e2e", "preset": f"{E2E[device]['model']}-{method}-b{batch_size}", "device": device,
        "dtype": "bf16-autocast" if autocast else "float32", "impl": f"pyadapt-{impl_backend}",
        "pass": "train-step", "batch": batch_size, "peak_memory_bytes": peak, **errors})
    benchmark.pedantic(step, rounds=ROUNDS[device], iterations=1, warmup_rounds=2)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = batch_size / benchmark.stats.stats.median
