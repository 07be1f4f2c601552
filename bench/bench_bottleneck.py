"""Bottleneck / MMA adapter: pyadapt backends against the papers' eager PyTorch and
torch.compile of it, forward and forward + backward, side by side in one run.

    pytest bench/bench_bottleneck.py --benchmark-only --benchmark-group-by=param:shape,param:pass_

CPU presets run anywhere (2 cores: a few minutes); GPU presets need CUDA. Every benchmark first
checks its output and gradients against float64 eager math: a fast wrong kernel fails here,
untimed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyadapt

CPU_SHAPES = {"M4096-d768-r32": (4096, 768, 32)}
GPU_SHAPES = {"mma-image-M25216-d768-r32": (128 * 197, 768, 32),
              "mma-text-M38500-d512-r32": (500 * 77, 512, 32)}


class EagerMMA(nn.Module):
    """The official code's adapter as written there: Linear+ReLU, shared Linear+ReLU, Linear."""

    def __init__(self, fused: pyadapt.FusedAdapter):
        super().__init__()
        self.down, self.shared, self.up = (copy.deepcopy(fused.down), copy.deepcopy(fused.shared),
                                           copy.deepcopy(fused.up))
        self.scale = fused.scale

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.down(x))))
        return x + self.scale * self.up(h)


def _impls(device: str):
    impls = ["eager", "torch.compile"]
    impls += [f"pyadapt-{b}" for b in pyadapt.available_backends()
              if b in ("cpu", "triton", "cuda", "reference")
              and (device == "cuda" or b in ("cpu", "reference"))]
    return impls


def _cases():
    cases = [(name, shape, "cpu") for name, shape in CPU_SHAPES.items()]
    cases += [(name, shape, "cuda") for name, shape in GPU_SHAPES.items()]
    for name, shape, device in cases:
        for impl in _impls(device):
            for pass_ in ("forward", "forward+backward"):
                marks = [pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(),
                                            reason="GPU preset")]
                yield pytest.param(name, shape, device, impl, pass_, marks=marks,
                                   id=f"{name}-{impl}-{pass_}")


@pytest.mark.parametrize("shape_name,shape,device,impl,pass_", list(_cases()))
def test_bottleneck(benchmark, shape_name, shape, device, impl, pass_):
    m, d, r = shape
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    fused = pyadapt.FusedAdapter(d, r, shared=nn.Linear(r, r), init="kaiming").to(device, dtype)
    eager = EagerMMA(fused).to(device, dtype)
    x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, d, device=device, dtype=dtype)

    if impl == "eager":
        module, ctx = eager, None
    elif impl == "torch.compile":
        module, ctx = torch.compile(eager), None
    else:
        module, ctx = fused, impl.removeprefix("pyadapt-")

    def step():
        with pyadapt.use_backend(ctx or "auto"):
            y = module(x)
            if pass_ == "forward+backward":
                y.backward(g)
        return y

    # correctness first, against float64 eager math
    ref_mod = EagerMMA(fused).double()
    xr = x.detach().double().requires_grad_(True)
    y_ref = ref_mod(xr)
    y_ref.backward(g.double())
    y = step()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    assert err < tol, f"{impl}: output relative error {err:.2e}"
    if pass_ == "forward+backward":
        err = ((x.grad.double() - xr.grad).norm() / xr.grad.norm()).item()
        assert err < tol, f"{impl}: dx relative error {err:.2e}"

    def timed():
        x.grad = None
        module.zero_grad(set_to_none=True)
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"device": device, "dtype": str(dtype), "M": m, "d": d, "r": r})
    benchmark.pedantic(timed, rounds=15, iterations=1, warmup_rounds=3)
