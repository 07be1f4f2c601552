"""Adapter bank: a batch of 128 images whose samples name 1, 8 or 64 different bottleneck
adapters, one bank call (pyadapt.AdapterBank's op) against the loop a server would otherwise
run: for each adapter, gather its samples, call the single-adapter op, scatter back.

    pytest bench/bench_bank.py --benchmark-only

Same total M for every adapter count, so the target of issue 8 reads off directly: on a GPU,
64 adapters should cost <= 1.3x one adapter. Shapes: GPU, ViT-B/16 image tokens (128 x 197,
d 768, r 32, shared middle projection); CPU, a small preset (128 x 4 tokens, d 256, r 16) so
that the suite stays short on shared machines. Every case is checked against the float64
reference loop before it is timed.
"""

from __future__ import annotations

import pytest
import torch

import pyadapt
from pyadapt.ops import bank as bank_ops

IMAGES = 128
ADAPTERS = (1, 8, 64)
SHAPES = {"cuda": {"tokens": 197, "d": 768, "r": 32}, "cpu": {"tokens": 4, "d": 256, "r": 16}}
PASSES = ("forward", "forward+backward")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(n_adapters: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    shape = SHAPES[device]
    t, d, r = shape["tokens"], shape["d"], shape["r"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, std):
        return (torch.randn(s, generator=gen) * std).to(dtype).to(device)

    # every adapter named by at least one image, the rest at random: 128 images over N adapters
    ids = torch.cat([torch.arange(n_adapters), torch.randint(0, n_adapters,
                                                             (IMAGES - n_adapters,),
                                                             generator=gen)])
    ids = ids[torch.randperm(IMAGES, generator=gen)].to(device)
    return {"x": rnd(IMAGES * t, d, std=1.0), "ids": ids.repeat_interleave(t),
            "down_weight": rnd(n_adapters, r, d, std=d ** -0.5),
            "down_bias": rnd(n_adapters, r, std=0.1),
            "shared_weight": rnd(n_adapters, r, r, std=r ** -0.5),
            "shared_bias": rnd(n_adapters, r, std=0.1),
            "up_weight": rnd(n_adapters, d, r, std=r ** -0.5),
            "up_bias": rnd(n_adapters, d, std=0.1),
            "scale": torch.full((n_adapters,), 0.5, dtype=torch.float64, device=device)}


def bank_call(a: dict) -> torch.Tensor:
    return bank_ops.bank_bottleneck(a["x"], a["ids"], a["down_weight"], a["down_bias"],
                                    a["up_weight"], a["up_bias"], a["shared_weight"],
                                    a["shared_bias"], scale=a["scale"])


def loop_call(a: dict) -> torch.Tensor:
    """What serving without a bank does: one single-adapter op per adapter."""
    y = a["x"].clone()
    for i in range(a["down_weight"].shape[0]):
        rows = (a["ids"] == i).nonzero().squeeze(1)
        y = y.index_copy(0, rows, pyadapt.ops.bottleneck(
            a["x"].index_select(0, rows), a["down_weight"][i], a["down_bias"][i],
            a["up_weight"][i], a["up_bias"][i], a["shared_weight"][i], a["shared_bias"][i],
            scale=float(a["scale"][i])))
    return y


IMPLS = {"bank": bank_call, "loop": loop_call}
TRAINED = ("x", "down_weight", "down_bias", "shared_weight", "shared_bias", "up_weight",
           "up_bias")


def _fresh(a: dict, with_grad: bool) -> dict:
    return {k: (v.detach().clone().requires_grad_(with_grad and k in TRAINED)
                if v.is_floating_point() else v) for k, v in a.items()}


def _check(impl, a: dict, dtype: torch.dtype) -> None:
    a64 = {k: v.double() if v.is_floating_point() else v for k, v in a.items()}
    with pyadapt.use_backend("reference"):
        ref = bank_call(a64)
    out = impl(a)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3
    assert err <= tol, f"relative error {err:.2e} against the float64 reference loop"


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("n_adapters", ADAPTERS)
def test_bank(benchmark, n_adapters: int, impl: str, pass_: str):
    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = build(n_adapters, dtype, device)
    fn = IMPLS[impl]
    _check(fn, a, dtype)
    with_grad = pass_ == "forward+backward"
    args = _fresh(a, with_grad)
    grad_out = torch.randn_like(a["x"])

    def step():
        y = fn(args)
        if with_grad:
            y.backward(grad_out)
            for k in TRAINED:
                args[k].grad = None
        _sync(device)

    benchmark.group = f"bank {pass_} {device} {dtype}".replace("torch.", "")
    benchmark.extra_info.update({"adapters": n_adapters, "images": IMAGES, **SHAPES[device],
                                 "device": device, "dtype": str(dtype),
                                 "backend": pyadapt.ops.backend_for("bank_bottleneck_forward",
                                                                   device)})
    # few CPU rounds: the machine is shared and the CPU bank runs the reference loop
    benchmark.pedantic(step, rounds=3 if device == "cpu" else 50, warmup_rounds=1)
