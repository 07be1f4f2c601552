"""Fine-tune an open_clip model with pyadapt adapters (the backbone stays frozen).

    python examples/finetune_clip.py                          # tiny CLIP, MMA, synthetic data, CPU
    python examples/finetune_clip.py --method r-adapter --loss mpm-nce --steps 50
    python examples/finetune_clip.py --model ViT-B-16 --method lora --device cuda
    python examples/finetune_clip.py --model ViT-B-16 --pretrained ~/ckpt/vit_b16.pt --data ~/pets

--model tiny (default) is a 2-block CLIP small enough to train on a CPU in seconds; any open_clip
model name (ViT-B-16, ...) builds that architecture with random weights (nothing is downloaded:
pass --pretrained PATH to load a local open_clip checkpoint). --data DIR reads an image folder
(one sub-folder per class, the folder name is the class name); without it the data are
synthetic: each class is a fixed random image pattern plus noise, with prompts
"a photo of a class<k>.".

Losses: "ce" is CLIP-style classification, cross-entropy over the logits of the image against
every class prompt (the text tower encodes all prompts each step, as MMA trains); "mpm-nce" pairs
each image with its class prompt and applies R-Adapter's MPM-NCE loss with same-class pairs as
positives. Methods: mma (MMA in blocks --mma-start.., both towers), r-adapter (after every
attention out-projection and MLP c_proj), bottleneck (OFA, after every MLP), lora and cp
(Aurora's CP/Tucker) on the attention out-projection and both MLP linears.

Prints a progress bar and the loss of every step; R-Adapter / LoRA / CP adapters are folded into
the backbone (pyadapt.fold_) for the final evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Sequence

# No hub look-ups: a model is built from its config or loaded from a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pyadapt  # noqa: E402

METHODS = ("mma", "r-adapter", "bottleneck", "lora", "cp")
LOSSES = ("ce", "mpm-nce")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' or an open_clip model name")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local open_clip checkpoint to load (no downloads)")
    p.add_argument("--method", default="mma", choices=METHODS)
    p.add_argument("--backend", default="auto",
                   help=f"pyadapt backend, one of {['auto'] + pyadapt.available_backends()}")
    p.add_argument("--loss", default="ce", choices=LOSSES)
    p.add_argument("--data", default=None, metavar="DIR",
                   help="image folder (one sub-folder per class); synthetic data if omitted")
    p.add_argument("--classes", type=int, default=5, help="number of synthetic classes")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=None,
                   help="r-adapter: None = full rank; lora/cp: rank (default 8)")
    p.add_argument("--bottleneck", type=int, default=None,
                   help="mma: 32; bottleneck: 64 (defaults)")
    p.add_argument("--mma-start", type=int, default=None,
                   help="first adapted block (1-based); default 5, or 1 for models with fewer "
                        "than 5 blocks")
    p.add_argument("--scale", type=float, default=None,
                   help="adapter output scale: mma 0.001 (the paper's), bottleneck 1.0")
    p.add_argument("--dropout", type=float, default=None,
                   help="r-adapter drop_prob (default 0.2), cp/lora/bottleneck dropout "
                        "(default 0.1 for cp, else 0)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="AdapterEMA momentum (0 = off); evaluation then uses the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true",
                   help="autocast (bf16 on CPU, fp16 on CUDA) for the forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ---------------------------------------------------------------------------------------------

TINY_CONTEXT = 16


def build_model(args):
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if args.model == "tiny":
        model = CLIP(32, CLIPVisionCfg(image_size=32, layers=2, width=64, patch_size=8,
                                       head_width=16),
                     CLIPTextCfg(context_length=TINY_CONTEXT, width=64, heads=4, layers=2))

        def tokenize(texts):
            return open_clip.tokenize(texts, context_length=TINY_CONTEXT)
    else:
        model = open_clip.create_model(args.model, pretrained=None)
        tokenize = open_clip.get_tokenizer(args.model)
    if args.pretrained is not None:
        path = os.path.expanduser(args.pretrained)
        if not os.path.isfile(path):
            raise SystemExit(f"--pretrained: no such file: {path}")
        open_clip.load_checkpoint(model, path)
    return model, tokenize


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


class SyntheticData:
    """Class k: a fixed random image pattern plus noise; deterministic given the seed."""

    def __init__(self, classes: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(classes, 3, size, size, generator=g)
        self.classnames = [f"class{k}" for k in range(classes)]
        self.generator = torch.Generator().manual_seed(seed + 1)

    def batch(self, n: int):
        labels = torch.randint(0, len(self.classnames), (n,), generator=self.generator)
        noise = torch.randn(n, *self.patterns.shape[1:], generator=self.generator)
        return self.patterns[labels] + 0.5 * noise, labels


class FolderData:
    """torchvision ImageFolder with open_clip's training transform, drawn with replacement."""

    def __init__(self, root: str, size: int, seed: int):
        import open_clip
        from torchvision.datasets import ImageFolder

        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise SystemExit(f"--data: no such folder: {root}")
        self.dataset = ImageFolder(root, transform=open_clip.image_transform(size, is_train=True))
        if len(self.dataset) == 0:
            raise SystemExit(f"--data: no images found under {root}")
        self.classnames = [c.replace("_", " ") for c in self.dataset.classes]
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, n: int):
        idx = torch.randint(0, len(self.dataset), (n,), generator=self.generator).tolist()
        items = [self.dataset[i] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------

def add_adapters(model, args):
    from pyadapt.integrations import open_clip as pa_clip

    depth = min(len(model.visual.transformer.resblocks), len(model.transformer.resblocks))
    if args.method == "mma":
        start = args.mma_start if args.mma_start is not None else (5 if depth >= 5 else 1)
        return pa_clip.add_mma(model, start_layer=start, bottleneck=args.bottleneck or 32,
                               scale=0.001 if args.scale is None else args.scale)
    if args.method == "r-adapter":
        drop = 0.2 if args.dropout is None else args.dropout
        return pa_clip.add_r_adapter(model, rank=args.rank, drop_prob=drop)
    if args.method == "bottleneck":
        return pa_clip.add_bottleneck(model, bottleneck=args.bottleneck or 64,
                                      scale=1.0 if args.scale is None else args.scale,
                                      dropout=args.dropout or 0.0)
    rank = args.rank or 8
    if args.method == "lora":
        return pa_clip.add_lowrank(model, rank=rank, kind="lora", dropout=args.dropout or 0.0)
    drop = 0.1 if args.dropout is None else args.dropout
    return pa_clip.add_lowrank(model, rank=rank, kind="cp", dropout=drop)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def compute_loss(model, images, labels, prompts, args, mpm_nce):
    image_features = F.normalize(model.encode_image(images), dim=-1)
    if args.loss == "ce":
        text_features = F.normalize(model.encode_text(prompts), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        return F.cross_entropy(logits.float(), labels)
    text_features = F.normalize(model.encode_text(prompts[labels]), dim=-1)
    return mpm_nce(image_features.float(), text_features.float(), labels)


@torch.no_grad()
def accuracy(model, data, prompts, device, n: int = 64) -> float:
    images, labels = data.batch(n)
    img = F.normalize(model.encode_image(images.to(device)), dim=-1)
    txt = F.normalize(model.encode_text(prompts), dim=-1)
    return (img @ txt.T).argmax(-1).cpu().eq(labels).float().mean().item()


def progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=disable, file=sys.stderr, leave=False, unit="step")
    except ImportError:  # pragma: no cover - tqdm comes with open_clip
        return None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, tokenize = build_model(args)
    summary = add_adapters(model, args)
    model.to(device)
    print(summary)

    size = image_size(model)
    data = (FolderData(args.data, size, args.seed) if args.data is not None
            else SyntheticData(args.classes, size, args.seed))
    prompts = tokenize([f"a photo of a {c}." for c in data.classnames]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ema = pyadapt.AdapterEMA(model, momentum=args.ema) if args.ema > 0 else None
    mpm_nce = pyadapt.MPMNCELoss()
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    losses: List[float] = []
    bar = progress(args.steps, args.no_progress)
    start = time.perf_counter()
    with pyadapt.use_backend(args.backend):
        model.train()
        for step in range(1, args.steps + 1):
            images, labels = data.batch(args.batch_size)
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                loss = compute_loss(model, images, labels, prompts, args, mpm_nce)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update()
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"step {step}: loss is {value}; lower --lr")
            losses.append(value)
            line = f"step {step:4d}/{args.steps}  loss {value:.6f}"
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                bar.write(line, file=sys.stdout)
            else:
                print(line)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start

        model.eval()
        folded = []
        if args.method in ("r-adapter", "lora", "cp"):
            folded = pyadapt.fold_(model, use_ema=ema is not None)
        acc = accuracy(model, data, prompts, device)
    print(f"{args.steps} steps in {elapsed:.1f} s; final loss {losses[-1]:.4f}; "
          f"accuracy on fresh samples {100 * acc:.1f}%"
          + (f" (evaluated with {len(folded)} adapters folded)" if folded else ""))
    return {"losses": losses, "accuracy": acc, "summary": summary}


if __name__ == "__main__":
    main()
