"""Folding of a whole model's adapters into their frozen weights, W'_i = W_i + s_i L_i R_i for
every adapted linear in one call (pyadapt.fold_ does exactly this): pyadapt backends against the
eager per-weight fold (pyadapt.reference.fold_weight, what the official code does in a loop)
and torch.compile of it. Forward only: folding has no gradient.

    pytest bench/bench_fold.py --benchmark-only

Presets (bench/presets.py): R-Adapter full rank on every block of both ViT-B/16 towers
(L = W_f, R = W_o; biases folded as columns), and LoRA r 16 on q, k, v, out of both towers.
"""

from __future__ import annotations

import pytest
import torch

from pyadapt import ops, reference

from ._common import Case, Workload, cases, generator, linear_weight, run_benchmark
from .presets import Preset


def build(preset: Preset, dtype: torch.dtype, device: str, seed: int = 0) -> Workload:
    gen = generator(device, seed)
    weights, lefts, rights = [], [], []
    shapes = list(preset.dims["items"])
    if preset.dims.get("bias"):
        # each R-Adapter site also folds its bias: b' = b + s W_f b, a one-column weight
        shapes += [(out_f, 1, k) for out_f, _, k in preset.dims["items"]]
    for out_f, in_f, k in shapes:
        weights.append(linear_weight(out_f, in_f, dtype, device, gen))
        lefts.append(linear_weight(out_f, k, dtype, device, gen))
        rights.append(linear_weight(k, in_f, dtype, device, gen))
    n = len(weights)
    # R-Adapter's s' = s * eval_scale = 0.1 * 0.5; the check folds with 1 instead
    scales = [0.05] * n
    args = {"weights": weights, "lefts": lefts, "rights": rights, "scales": scales,
            "scales_t": torch.tensor(scales, device=device)}

    def eager(a):
        return [reference.fold_weight(w, left, right, a["scales_t"][i])
                for i, (w, left, right) in enumerate(zip(a["weights"], a["lefts"], a["rights"]))]

    def fused(a):
        return ops.fold(a["weights"], a["lefts"], a["rights"], a["scales"])

    return Workload("fold", preset, dtype, device, args, [], eager, fused,
                    check_overrides={"scales": [1.0] * n,
                                     "scales_t": torch.ones(n, device=device)})


@pytest.mark.parametrize("case", cases("fold", passes=("forward",)))
def test_fold(benchmark, case: Case):
    run_benchmark(benchmark, build, case)
