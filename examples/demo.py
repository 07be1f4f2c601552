"""Build one adapter of every kind, run forward and backward on every available backend, and
print the max error against the float64 reference and the time of a forward + backward.

    make demo        (or: python examples/demo.py)
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import pyadapt


def build(kind: str) -> tuple[nn.Module, torch.Tensor, str]:
    """A module with non-trivial (random) adapter weights and an input of realistic scale."""
    if kind == "FusedAdapter (MMA, shared)":
        m = pyadapt.FusedAdapter(768, 32, shared=nn.Linear(32, 32), init="kaiming",
                                 grad_scale_invariant=True)
        x = torch.randn(4, 197, 768)
    elif kind == "FusedAdapter (OFA, dropout)":
        m = pyadapt.FusedAdapter(768, 200, scale=1.0, dropout=0.1, init="bert")
        x = torch.randn(4, 64, 768)
    elif kind == "RAdapter (full rank)":
        m = pyadapt.RAdapter(nn.Linear(768, 768), drop_prob=0.2)
        x = torch.randn(4, 197, 768)
    elif kind == "LowRankAdapter (r=16)":
        m = pyadapt.LowRankAdapter(nn.Linear(768, 768), rank=16)
        x = torch.randn(4, 197, 768)
    else:
        m = pyadapt.CPAdapter([nn.Linear(768, 768), nn.Linear(768, 3072)], rank=32)[1]
        x = torch.randn(4, 197, 768)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and p.dim() >= 1 and not p.any():
                p.normal_(std=0.02)  # zero-initialised factors would make the check trivial
    return m, x, kind


def run(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(0)  # the same dropout draws in every run
    y = module(x)
    y.backward(torch.ones_like(y) / y.numel() ** 0.5)
    grads = [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]
    return y, grads


def main() -> None:
    torch.manual_seed(0)
    print(f"pyadapt {pyadapt.__version__}: {pyadapt.build_info()['backends']} "
          f"(torch {torch.__version__})")
    print(f"{'adapter':30s} {'backend':10s} {'max |y - ref|':>14s} {'max |grad - ref|':>17s} "
          f"{'fwd+bwd ms':>11s}")
    for kind in ("FusedAdapter (MMA, shared)", "FusedAdapter (OFA, dropout)",
                 "RAdapter (full rank)", "LowRankAdapter (r=16)", "CPAdapter site (fc1, 4 blocks)"):
        module, x, name = build(kind)
        ref_module = copy.deepcopy(module).double()
        with pyadapt.use_backend("reference"):
            y_ref, g_ref = run(ref_module, x.double())
        for backend in pyadapt.available_backends():
            with pyadapt.use_backend(backend):
                y, grads = run(module, x)
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    run(module, x)
                    times.append(time.perf_counter() - t0)
            err_y = (y.double() - y_ref).abs().max().item()
            err_g = max((g.double() - r).abs().max().item() for g, r in zip(grads, g_ref))
            print(f"{name:30s} {backend:10s} {err_y:14.2e} {err_g:17.2e} "
                  f"{1e3 * sorted(times)[2]:11.2f}")


if __name__ == "__main__":
    main()
