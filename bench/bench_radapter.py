"""R-Adapter on a frozen linear, y = z + c * row_scale * q with z = x W_o^T + b_o and q = z W_f^T
(full rank, as the shipped runs train) or (z W_d^T) W_u^T (low rank): pyadapt backends against
the eager maths and torch.compile of it, forward and forward + backward.

    pytest bench/bench_radapter.py --benchmark-only

Presets (bench/presets.py): ViT-B/16 attention out-projection 768 -> 768 and MLP c_proj
3072 -> 768 at 128 images per GPU, the text tower's 512 -> 512, ViT-L/14's 1024 -> 1024 and
4096 -> 1024, and the low-rank form r 128. Training as shipped: the learnable scale s
(a 0-dim tensor with a gradient), per-sample adapter dropping p = 0.2 (row_scale in
{0, 1/(1 - p)}, one draw per image); W_o, b_o frozen, x requires grad.
"""

from __future__ import annotations

import pytest
import torch

from pyadapt import ops, reference

from ._common import Case, Workload, cases, generator, linear_weight, randn, run_benchmark
from .presets import Preset


def build(preset: Preset, dtype: torch.dtype, device: str, seed: int = 0) -> Workload:
    dims = preset.dims
    m, d_in, d_out, rank = dims["m"], dims["d_in"], dims["d_out"], dims["rank"]
    gen = generator(device, seed)
    tokens, p = dims["tokens"], dims["drop_prob"]
    samples = -(-m // tokens)
    keep = torch.rand(samples, generator=gen, device=device) >= p
    row_scale = (keep.to(torch.float32) / (1.0 - p)).repeat_interleave(tokens)[:m].to(dtype)
    args = {
        "x": randn((m, d_in), dtype, device, gen),
        "base_weight": linear_weight(d_out, d_in, dtype, device, gen),
        "base_bias": linear_weight(1, d_out, dtype, device, gen)[0],
        "scale": torch.tensor(float(dims["scale"]), dtype=dtype, device=device),
        "row_scale": row_scale,
    }
    if rank is None:
        args["full_weight"] = linear_weight(d_out, d_out, dtype, device, gen)
        grads = ["x", "full_weight", "scale"]
    else:
        args["down_weight"] = linear_weight(rank, d_out, dtype, device, gen)
        args["up_weight"] = linear_weight(d_out, rank, dtype, device, gen)
        grads = ["x", "down_weight", "up_weight", "scale"]

    def eager(a):
        return reference.radapter_forward(
            a["x"], a["base_weight"], a["base_bias"], a.get("full_weight"), a.get("down_weight"),
            a.get("up_weight"), scale=a["scale"], row_scale=a["row_scale"])

    def fused(a):
        return ops.radapter(a["x"], a["base_weight"], a["base_bias"],
                            full_weight=a.get("full_weight"), down_weight=a.get("down_weight"),
                            up_weight=a.get("up_weight"), scale=a["scale"],
                            row_scale=a["row_scale"])

    return Workload("radapter", preset, dtype, device, args, grads, eager, fused,
                    grad_out=randn((m, d_out), dtype, device, gen),
                    check_overrides={"scale": torch.tensor(1.0, dtype=dtype, device=device)})


@pytest.mark.parametrize("case", cases("radapter"))
def test_radapter(benchmark, case: Case):
    run_benchmark(benchmark, build, case)
