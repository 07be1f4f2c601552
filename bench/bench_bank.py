"""Adapter bank: a batch of 128 images whose samples name 1, 8 or 64 different bottleneck
adapters, one bank call (pyadapt.AdapterBank's op) against the loop a server would otherwise
run: for each adapter, gather its samples, call the single-adapter op, scatter back.

    pytest bench/bench_bank.py --benchmark-only

Same total M for every adapter count, so the target of issue 8 reads off directly: on a GPU,
64 adapters should cost <= 1.3x one adapter. Shapes: GPU, ViT-B/16 image tokens (128 x 197,
d 768, r 32, shared middle projection); CPU, a small preset (128 x 4 tokens, d 256, r 16) so
that the suite stays short on shared machines. Every case is checked against the float64
reference loop before it is timed.

The full-rank R-Adapter bank (pyadapt.RAdapterBank with rank=None: the frozen linear, then the
grouped-linear op pyadapt.ops.bank_linear) is measured the same way against a loop of
per-adapter R-Adapter ops, at d 768 over 128 x 197 image tokens on a GPU (`-k radapter`).
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


def _check(impl, a: dict, dtype: torch.dtype, reference_call) -> None:
    a64 = {k: v.double() if v.is_floating_point() else v for k, v in a.items()}
    with pyadapt.use_backend("reference"):
        ref = reference_call(a64)
    out = impl(a)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3
    assert err <= tol, f"relative error {err:.2e} against the float64 reference loop"


def _time(benchmark, fn, a: dict, dtype: torch.dtype, device: str, pass_: str,
          trained: tuple, reference_call, group: str, info: dict) -> None:
    """Check `fn` against float64 `reference_call`, then time it (forward, or forward and
    backward into the `trained` tensors)."""
    _check(fn, a, dtype, reference_call)
    with_grad = pass_ == "forward+backward"
    args = {k: (v.detach().clone().requires_grad_(with_grad and k in trained)
                if v.is_floating_point() else v) for k, v in a.items()}
    grad_out = torch.randn_like(a["x"])

    def step():
        y = fn(args)
        if with_grad:
            y.backward(grad_out)
            for k in trained:
                args[k].grad = None
        _sync(device)

    benchmark.group = f"{group} {pass_} {device} {dtype}".replace("torch.", "")
    benchmark.extra_info.update({**info, "device": device, "dtype": str(dtype)})
    # few CPU rounds: the machine is shared
    benchmark.pedantic(step, rounds=3 if device == "cpu" else 50, warmup_rounds=1)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("n_adapters", ADAPTERS)
def test_bank(benchmark, n_adapters: int, impl: str, pass_: str):
    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = build(n_adapters, dtype, device)
    _time(benchmark, IMPLS[impl], a, dtype, device, pass_, TRAINED, bank_call, "bank",
          {"adapters": n_adapters, "images": IMAGES, **SHAPES[device],
           "backend": pyadapt.ops.backend_for("bank_bottleneck_forward", device)})


# ---------------------------------------------------------------------------------------------
# Full-rank R-Adapter bank (pyadapt.RAdapterBank, rank=None): the frozen linear once for the
# batch, then the grouped-linear op z + c[a] z W_f[a]^T, against the loop a server would run
# with per-adapter R-Adapters (one radapter op, base included, per adapter's rows). GPU: the
# shipped R-Adapter shape, an attention out-projection at d 768 over 128 x 197 image tokens;
# CPU: the small preset above (128 x 4 tokens, d 256).
# ---------------------------------------------------------------------------------------------

from pyadapt.ops.bank_linear import bank_linear  # noqa: E402

RADAPTER_TRAINED = ("x", "full_weight", "scale")


def build_radapter(n_adapters: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    shape = SHAPES[device]
    t, d = shape["tokens"], shape["d"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, std):
        return (torch.randn(s, generator=gen) * std).to(dtype).to(device)

    ids = torch.cat([torch.arange(n_adapters), torch.randint(0, n_adapters,
                                                             (IMAGES - n_adapters,),
                                                             generator=gen)])
    ids = ids[torch.randperm(IMAGES, generator=gen)].to(device)
    return {"x": rnd(IMAGES * t, d, std=1.0), "ids": ids.repeat_interleave(t),
            "base_weight": rnd(d, d, std=d ** -0.5), "base_bias": rnd(d, std=0.1),
            "full_weight": rnd(n_adapters, d, d, std=0.2 * d ** -0.5),
            "scale": torch.full((n_adapters,), 0.1, dtype=dtype, device=device)}


def radapter_bank_call(a: dict) -> torch.Tensor:
    z = torch.nn.functional.linear(a["x"], a["base_weight"], a["base_bias"])
    return bank_linear(z, a["ids"], a["full_weight"], a["scale"])


def radapter_loop_call(a: dict) -> torch.Tensor:
    """Without a bank: one R-Adapter op (frozen linear + full-rank adapter) per adapter."""
    y = a["x"].new_empty(a["x"].shape[0], a["base_weight"].shape[0])
    for i in range(a["full_weight"].shape[0]):
        rows = (a["ids"] == i).nonzero().squeeze(1)
        y = y.index_copy(0, rows, pyadapt.ops.radapter(
            a["x"].index_select(0, rows), a["base_weight"], a["base_bias"],
            full_weight=a["full_weight"][i], scale=a["scale"][i]))
    return y


RADAPTER_IMPLS = {"bank": radapter_bank_call, "loop": radapter_loop_call}


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", sorted(RADAPTER_IMPLS))
@pytest.mark.parametrize("n_adapters", ADAPTERS)
def test_radapter_bank(benchmark, n_adapters: int, impl: str, pass_: str):
    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = build_radapter(n_adapters, dtype, device)
    _time(benchmark, RADAPTER_IMPLS[impl], a, dtype, device, pass_, RADAPTER_TRAINED,
          radapter_bank_call, "radapter bank",
          {"adapters": n_adapters, "images": IMAGES, "tokens": SHAPES[device]["tokens"],
           "d": SHAPES[device]["d"], "rank": "full",
           "backend": pyadapt.ops.backend_for("bank_linear_forward", device)})
