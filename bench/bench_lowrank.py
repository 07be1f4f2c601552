"""Frozen linear + low-rank adapter, y = x W^T + b + scale * ((x A^T) K) B^T: LoRA (K = I,
scale = alpha / r) and Aurora's mode approximation (U, V and a Tucker core C shared by many
projections, K_k = C x_3 lambda_k per projection), pyadapt backends against the eager maths
and torch.compile of it, forward and forward + backward.

    pytest bench/bench_lowrank.py --benchmark-only

Presets (bench/presets.py): LoRA r 16 on a ViT-B/16 768 x 768 projection, and Aurora's video
setting, R 64 shared by the q, k, v projections of 12 blocks (36 sites, one call each; U, V, C
gather gradient from every site). No dropout (p = 0), so eager and fused draw no masks; base
weights frozen, x requires grad.
"""

from __future__ import annotations

import pytest
import torch

from pyadapt import ops, reference

from ._common import Case, Workload, cases, generator, linear_weight, randn, run_benchmark
from .presets import Preset


def build(preset: Preset, dtype: torch.dtype, device: str, seed: int = 0) -> Workload:
    dims = preset.dims
    m, d_in, d_out, rank, sites = dims["m"], dims["d_in"], dims["d_out"], dims["rank"], dims["sites"]
    gen = generator(device, seed)
    with_core = bool(dims.get("core", False))
    scale = 1.0 if with_core else float(dims["alpha"]) / rank
    args = {
        "x": [randn((m, d_in), dtype, device, gen) for _ in range(sites)],
        "weight": [linear_weight(d_out, d_in, dtype, device, gen) for _ in range(sites)],
        "bias": [linear_weight(1, d_out, dtype, device, gen)[0] for _ in range(sites)],
    }
    if with_core:
        # Aurora: U, V, C shared by every site, one lambda per site
        args["U"] = linear_weight(rank, d_in, dtype, device, gen)
        args["V"] = linear_weight(d_out, rank, dtype, device, gen)
        args["C"] = linear_weight(rank, rank * rank, dtype, device, gen).view(rank, rank, rank)
        args["lam"] = [randn((rank,), dtype, device, gen, std=0.3) for _ in range(sites)]
        grads = ["x", "U", "V", "C", "lam"]
    else:
        args["down"] = linear_weight(rank, d_in, dtype, device, gen)
        args["up"] = linear_weight(d_out, rank, dtype, device, gen)
        grads = ["x", "down", "up"]

    def factors(a, k):
        if with_core:
            return a["U"], reference.tucker_core(a["C"], a["lam"][k]), a["V"]
        return a["down"], None, a["up"]

    def eager(a):
        outs = []
        for k in range(sites):
            down, core, up = factors(a, k)
            outs.append(reference.lowrank_linear_forward(a["x"][k], a["weight"][k], a["bias"][k],
                                                         down, core, up, scale=scale))
        return outs

    def fused(a):
        outs = []
        for k in range(sites):
            down, core, up = factors(a, k)
            outs.append(ops.lowrank_linear(a["x"][k], a["weight"][k], a["bias"][k], down, core,
                                           up, scale=scale))
        return outs

    grad_out = [randn((m, d_out), dtype, device, gen) for _ in range(sites)]
    return Workload("lowrank", preset, dtype, device, args, grads, eager, fused, grad_out=grad_out)


@pytest.mark.parametrize("case", cases("lowrank"))
def test_lowrank(benchmark, case: Case):
    run_benchmark(benchmark, build, case)
