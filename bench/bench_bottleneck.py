"""Bottleneck / MMA adapter, y = x + scale * up(relu(shared?(relu(down(x))))): pyadapt backends
against the papers' eager PyTorch and torch.compile of it, forward and forward + backward.

    pytest bench/bench_bottleneck.py --benchmark-only

Presets (bench/presets.py): MMA image and text branches of ViT-B/16 (r 32, shared middle
projection, scale 0.001) and OFA-base (d 768, r 200). x requires grad (adapters of earlier
blocks need dx); no dropout. Every case is first checked against float64 eager maths.
"""

from __future__ import annotations

import pytest
import torch

from pyadapt import ops, reference

from ._common import Case, Workload, cases, generator, linear_weight, randn, run_benchmark
from .presets import Preset


def build(preset: Preset, dtype: torch.dtype, device: str, seed: int = 0) -> Workload:
    dims = preset.dims
    m, d, r = dims["m"], dims["d"], dims["r"]
    gen = generator(device, seed)
    args = {
        "x": randn((m, d), dtype, device, gen),
        "down_weight": linear_weight(r, d, dtype, device, gen),
        "down_bias": linear_weight(1, r, dtype, device, gen)[0],
        "up_weight": linear_weight(d, r, dtype, device, gen),
        "up_bias": linear_weight(1, d, dtype, device, gen)[0],
        "scale": float(dims["scale"]),
        # the eager maths takes the scale as a tensor, so torch.compile does not recompile
        # between the check (scale 1) and the timed run
        "scale_t": torch.tensor(float(dims["scale"]), device=device),
    }
    grads = ["x", "down_weight", "down_bias", "up_weight", "up_bias"]
    if dims["shared"]:
        args["shared_weight"] = linear_weight(r, r, dtype, device, gen)
        args["shared_bias"] = linear_weight(1, r, dtype, device, gen)[0]
        grads += ["shared_weight", "shared_bias"]

    def eager(a):
        return reference.bottleneck_forward(
            a["x"], a["down_weight"], a["down_bias"], a["up_weight"], a["up_bias"],
            a.get("shared_weight"), a.get("shared_bias"), scale=a["scale_t"])

    def fused(a):
        return ops.bottleneck(a["x"], a["down_weight"], a["down_bias"], a["up_weight"],
                              a["up_bias"], a.get("shared_weight"), a.get("shared_bias"),
                              scale=a["scale"])

    return Workload("bottleneck", preset, dtype, device, args, grads, eager, fused,
                    grad_out=randn((m, d), dtype, device, gen),
                    check_overrides={"scale": 1.0, "scale_t": torch.tensor(1.0, device=device)})


@pytest.mark.parametrize("case", cases("bottleneck"))
def test_bottleneck(benchmark, case: Case):
    run_benchmark(benchmark, build, case)
