"""MPM-NCE loss (R-Adapter), 1/2 [mean_i sum_j q_ij (-log_softmax_j A_ij) + the same for B],
A = lambda I T^T + lambda delta (1 - P): pyadapt backends against the eager maths and
torch.compile of it, forward and forward + backward (d image, d text).

    pytest bench/bench_mpm_nce.py --benchmark-only

Presets (bench/presets.py): the ImageNet recipe (lambda 100, delta 0.05, eps 0.02) over the
global batch N 512, D 512 (GPU) and one GPU's 128 (CPU), class labels drawn from 1000 / 100
classes so that rows have several positives. Inputs are L2-normalised features.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyadapt import ops, reference

from ._common import Case, Workload, cases, generator, randn, run_benchmark
from .presets import Preset

LOGIT_SCALE, MARGIN, LABEL_SMOOTHING = 100.0, 0.05, 0.02


def build(preset: Preset, dtype: torch.dtype, device: str, seed: int = 0) -> Workload:
    n, dim, classes = preset.dims["n"], preset.dims["dim"], preset.dims["classes"]
    gen = generator(device, seed)
    labels = torch.randint(0, classes, (n,), generator=gen, device=device)
    args = {
        "image": F.normalize(randn((n, dim), torch.float32, device, gen), dim=-1).to(dtype),
        "text": F.normalize(randn((n, dim), torch.float32, device, gen), dim=-1).to(dtype),
        "positives": labels[:, None] == labels[None, :],
    }
    kwargs = {"logit_scale": LOGIT_SCALE, "margin": MARGIN, "label_smoothing": LABEL_SMOOTHING}

    def eager(a):
        return reference.mpm_nce_forward(a["image"], a["text"], a["positives"], **kwargs)

    def fused(a):
        return ops.mpm_nce(a["image"], a["text"], a["positives"], **kwargs)

    return Workload("mpm_nce", preset, dtype, device, args, ["image", "text"], eager, fused,
                    grad_out=torch.ones((), dtype=dtype, device=device))


@pytest.mark.parametrize("case", cases("mpm_nce"))
def test_mpm_nce(benchmark, case: Case):
    run_benchmark(benchmark, build, case)
