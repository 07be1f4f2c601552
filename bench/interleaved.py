"""Side-by-side timing with the implementations interleaved round by round.

pytest-benchmark times one implementation's rounds, then the next one's: on a shared machine
whose speed drifts over seconds (the 2-core CI VM), the drift lands in the ratio. Here every
round runs each implementation once, in turn, so they see the same conditions; the ratio of
medians is the figure to quote, and the spread of per-round ratios says how steady it was.

    python -m bench.interleaved bottleneck m4096-d768-r32 --rounds 40
    python -m bench.interleaved lowrank lora-r16-m4096 --impls eager pyadapt-cpu torch.compile

Every implementation is first checked against float64 eager maths (bench/_common.check), as in
the pytest-benchmark suites; --json writes the measurements.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch

from . import _common
from .presets import PRESETS


def measure(op: str, preset_name: str, impls: list[str], passes: list[str], rounds: int,
            warmup: int = 3) -> dict:
    preset = next((p for p in PRESETS if p.op == op and p.name == preset_name), None)
    if preset is None:
        names = sorted(p.name for p in PRESETS if p.op == op)
        raise SystemExit(f"preset: no {op} preset {preset_name!r}; known: {names}")
    build = importlib.import_module(f"bench.bench_{op}").build
    dtype = _common.dtype_of(_common.DTYPES[preset.device][0])
    work = build(preset, dtype, preset.device)
    runs = {impl: _common.runner(work, impl) for impl in impls}
    errors = {impl: max(_common.check(work, run, impl).values()) for impl, run in runs.items()}
    out = {"op": op, "preset": preset_name, "device": preset.device, "dtype": str(dtype),
           "rounds": rounds, "threads": torch.get_num_threads(), "passes": {}}
    if not work.has_backward:  # e.g. fold: nothing to back-propagate
        passes = [p for p in passes if p != "forward+backward"]
    for pass_ in passes:
        with_backward = pass_ == "forward+backward"
        args = _common.fresh_args(work.args, work.grads)
        times = {impl: [] for impl in impls}
        for i in range(warmup + rounds):
            for impl, run in runs.items():
                _common.clear_grads(args, work.grads)
                start = time.perf_counter()
                run(args, with_backward)
                _common.sync(preset.device)
                if i >= warmup:
                    times[impl].append(time.perf_counter() - start)
        medians = {impl: statistics.median(t) for impl, t in times.items()}
        base = impls[0]
        per_round = {impl: sorted(b / t for b, t in zip(times[base], times[impl]))
                     for impl in impls[1:]}
        out["passes"][pass_] = {
            "median_ms": {impl: m * 1e3 for impl, m in medians.items()},
            "min_ms": {impl: min(t) * 1e3 for impl, t in times.items()},
            f"speedup_vs_{base}": {impl: medians[base] / medians[impl] for impl in impls[1:]},
            "per_round_ratio_quartiles": {
                impl: [r[len(r) // 4], r[len(r) // 2], r[(3 * len(r)) // 4]]
                for impl, r in per_round.items()},
        }
    out["max_rel_err_vs_float64"] = errors
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op")
    parser.add_argument("preset")
    parser.add_argument("--impls", nargs="+", default=["eager", "pyadapt-cpu"],
                        help="the first is the baseline of the ratios")
    parser.add_argument("--passes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", help="write the measurements here")
    a = parser.parse_args()
    result = measure(a.op, a.preset, a.impls, a.passes, a.rounds)
    for pass_, r in result["passes"].items():
        med = ", ".join(f"{k} {v:.2f} ms" for k, v in r["median_ms"].items())
        ratio = ", ".join(f"{k} {v:.2f}x (per-round quartiles "
                          f"{'/'.join(f'{q:.2f}' for q in r['per_round_ratio_quartiles'][k])})"
                          for k, v in r[f"speedup_vs_{a.impls[0]}"].items())
        print(f"{a.op} {a.preset} {pass_}: medians {med}; vs {a.impls[0]}: {ratio}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
