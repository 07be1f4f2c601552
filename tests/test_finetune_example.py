"""examples/finetune_clip.py trains the same way on every backend: 20 steps on the tiny CLIP with
synthetic data, float32, the per-step losses of a fused backend agree with the reference
backend's to 1e-4 (relative to max(1, |loss|)), and training moves the loss."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from conftest import require_open_clip

require_open_clip()

import pyadapt  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune_clip.py"
STEPS = 20


def _example():
    spec = importlib.util.spec_from_file_location("finetune_clip_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(method, backend, loss, extra=(), steps=STEPS):
    argv = ["--method", method, "--backend", backend, "--loss", loss, "--steps", str(steps),
            "--batch-size", "6", "--lr", "3e-3", "--no-progress", *extra]
    return _example().main(argv)["losses"]


def _assert_same_losses(got, ref, what, steps=STEPS):
    assert len(got) == len(ref) == steps
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (
            f"{what}: step {step} loss {a:.7f} vs reference {b:.7f}")


# (method, loss, extra arguments): R-Adapter with adapter dropping (module-level RNG, the same
# draws on every backend); CP without dropout (backends may draw their masks differently).
CASES = [("mma", "ce", ()), ("r-adapter", "mpm-nce", ("--rank", "8")),
         ("bottleneck", "ce", ()), ("lora", "mpm-nce", ()), ("cp", "ce", ("--dropout", "0"))]


@pytest.mark.parametrize("method,loss,extra", CASES, ids=[c[0] for c in CASES])
def test_fused_cpu_backend_trains_like_the_reference(method, loss, extra, capsys):
    if "cpu" not in pyadapt.available_backends():
        if os.environ.get("PYADAPT_ALLOW_NO_NATIVE") == "1":
            pytest.skip("no native extension (PYADAPT_ALLOW_NO_NATIVE=1)")
        pytest.fail("the cpu backend (native extension) is not available: build it "
                    "(pip install --no-build-isolation -e .)")
    ref = _run(method, "reference", loss, extra)
    got = _run(method, "cpu", loss, extra)
    _assert_same_losses(got, ref, f"{method} cpu backend")
    assert len(set(ref)) > 1, "the loss never changed"
    out = capsys.readouterr().out
    assert f"step   {STEPS}/{STEPS}  loss" in out, "per-step losses are not printed"
    assert "trainable parameters" in out, "the adapter summary is not printed"


# The Triton interpreter costs ~3 s per training step of the tiny model: 4 steps, one method.
TRITON_STEPS = 4


def test_triton_backend_trains_like_the_reference():
    if "triton" not in pyadapt.available_backends():
        pytest.skip("triton backend not available (no triton, or no GPU and no TRITON_INTERPRET)")
    ref = _run("mma", "reference", "ce", steps=TRITON_STEPS)
    got = _run("mma", "triton", "ce", steps=TRITON_STEPS)
    _assert_same_losses(got, ref, "mma triton backend", steps=TRITON_STEPS)
