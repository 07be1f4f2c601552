"""GPU roofline report: `python -m bench.report` on a machine with CUDA.

1. Measures the device's ceilings: copy bandwidth (a 1 GiB device-to-device copy, read + write
   bytes) and the bf16 matmul rate (8192^3), with triton.testing.do_bench (median).
2. For every op's GPU presets (bench/presets.py), each dtype, each pass, and a sweep of M around
   the headline preset: checks every implementation against float64 (bench/_common.check; a wrong
   kernel aborts the report), then times it with do_bench (median of many runs; inputs rotate
   over enough copies to exceed twice the L2 cache, so no run reads the previous run's data
   from L2).
3. Prints a table per op: time, achieved GB/s and TFLOP/s (bytes and flops from `op_cost`),
   fraction of the roofline bound, speed-up vs eager and vs torch.compile.
4. Writes bench/results/<device>-<date>.json and bench/results/<device>-<date>.png (speed-up
   against M per op).

Without CUDA it refuses (exit status 2) and writes nothing. The pure parts (op_cost, the JSON
schema, table rendering, plotting) are tested in tests/test_bench_report.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

SCHEMA = "pyadapt-bench-report/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
OPS = ("bottleneck", "radapter", "lowrank", "fold", "mpm_nce")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

RESULT_FIELDS = {
    "op": str, "preset": str, "source": str, "dims": dict, "x": (int, float), "x_label": str,
    "dtype": str, "pass": str, "impl": str, "ms": (int, float), "bytes": int, "flops": int,
    "GBps": (int, float), "TFLOPs": (int, float), "roofline_fraction": (int, float),
    "speedup_vs_eager": (int, float, type(None)), "speedup_vs_compile": (int, float, type(None)),
    "max_rel_err": (int, float),
}
TOP_FIELDS = {
    "schema": str, "synthetic": bool, "device": str, "date": str, "datetime": str, "torch": str,
    "triton": (str, type(None)), "cuda": (str, type(None)), "pyadapt": str,
    "git_commit": (str, type(None)), "ceilings": dict, "results": list,
}


# ----------------------------------------------------------------------------------------------
# bytes and flops
# ----------------------------------------------------------------------------------------------

def op_cost(op: str, dims: Dict[str, Any], dtype: str, pass_: str) -> Dict[str, int]:
    """Compulsory bytes and useful flops of one call of `op` (forward, or forward + backward).

    bytes: every input read once and every output written once, in the storage dtype (bool
      masks 1 byte): the minimum any implementation must move. L2 re-reads, saved activations
      and workspaces are not counted, so achieved GB/s understates real traffic.
    flops: 2 x the multiply-adds of the matrix products of the eager algorithm; elementwise work
      and anything a fused kernel recomputes (e.g. x W_d^T again in the backward) are not
      counted, so a kernel that recomputes does not look faster for it.
    "forward+backward" = forward + backward; the backward reads the inputs again with grad_out
      and writes the gradients of the trainable leaves (x and the adapter tensors; frozen base
      weights get none).
    Per op (M rows; d / d_in / d_out widths; r ranks):
      bottleneck  fwd 4 M d r (+2 M r^2 shared); bwd 8 M d r (+4 M r^2)
      radapter    fwd 2 M d_in d_out + adapter (2 M d_out^2 full, 4 M d_out r low rank);
                  bwd 2 M d_in d_out (dx) + 4 M d_out^2 (full) or 8 M d_out r
      lowrank     per site fwd 2 M d_in d_out + 2 M r (d_in + d_out) (+2 M r^2 core);
                  bwd 2 M d_out d_in + 4 M r d_in + 4 M r d_out (+4 M r^2 core)
      fold        per weight 2 out k in; reads W, L, R and writes W'
      mpm_nce     fwd one N x N x D similarity GEMM, 2 N^2 D (B's logits are A's transpose);
                  bwd 4 N^2 D (d image, d text)
    """
    e = DTYPE_BYTES[dtype]
    if pass_ not in ("forward", "forward+backward"):
        raise ValueError(f"pass_: expected 'forward' or 'forward+backward', got {pass_!r}")
    with_bwd = pass_ == "forward+backward"
    if op == "bottleneck":
        m, d, r, shared = dims["m"], dims["d"], dims["r"], bool(dims.get("shared"))
        weights = 2 * d * r + r + d + (r * r + r if shared else 0)
        nbytes = e * (2 * m * d + weights)
        flops = 4 * m * d * r + (2 * m * r * r if shared else 0)
        if with_bwd:
            nbytes += e * (3 * m * d + 2 * weights)
            flops += 8 * m * d * r + (4 * m * r * r if shared else 0)
    elif op == "radapter":
        m, d_in, d_out, rank = dims["m"], dims["d_in"], dims["d_out"], dims.get("rank")
        adapter = d_out * d_out if rank is None else 2 * d_out * rank
        frozen = d_out * d_in + d_out
        nbytes = e * (m * d_in + m * d_out + frozen + adapter + m)
        flops = 2 * m * d_in * d_out + (2 * m * d_out * d_out if rank is None
                                        else 4 * m * d_out * rank)
        if with_bwd:
            nbytes += e * (2 * m * d_in + m * d_out + frozen + 2 * adapter + m)
            flops += 2 * m * d_in * d_out + (4 * m * d_out * d_out if rank is None
                                             else 8 * m * d_out * rank)
    elif op == "lowrank":
        m, d_in, d_out, r = dims["m"], dims["d_in"], dims["d_out"], dims["rank"]
        sites, core = int(dims.get("sites", 1)), bool(dims.get("core", False))
        factors = r * d_in + d_out * r + (r * r if core else 0)
        frozen = d_out * d_in + d_out
        nbytes = sites * e * (m * d_in + m * d_out + frozen + factors)
        flops = sites * (2 * m * d_in * d_out + 2 * m * r * (d_in + d_out)
                         + (2 * m * r * r if core else 0))
        if with_bwd:
            nbytes += sites * e * (2 * m * d_in + m * d_out + frozen + 2 * factors)
            flops += sites * (2 * m * d_out * d_in + 4 * m * r * d_in + 4 * m * r * d_out
                              + (4 * m * r * r if core else 0))
    elif op == "fold":
        items = [tuple(i) for i in dims["items"]]
        if dims.get("bias"):
            items += [(out_f, 1, k) for out_f, _, k in dims["items"]]
        nbytes = e * sum(2 * o * i + o * k + k * i for o, i, k in items)
        flops = sum(2 * o * k * i for o, i, k in items)
        if with_bwd:
            raise ValueError("op fold: has no backward (pass_ must be 'forward')")
    elif op == "mpm_nce":
        n, dim = dims["n"], dims["dim"]
        nbytes = e * 2 * n * dim + n * n
        flops = 2 * n * n * dim
        if with_bwd:
            nbytes += e * 4 * n * dim + n * n
            flops += 4 * n * n * dim
    else:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return {"bytes": int(nbytes), "flops": int(flops)}


def sweep_coordinate(op: str, dims: Dict[str, Any]) -> tuple:
    """(x, label) a result is plotted at: rows M, the loss's batch N, or weights folded."""
    if op == "mpm_nce":
        return dims["n"], "N (batch)"
    if op == "fold":
        items = dims["items"]
        n = items if isinstance(items, int) else len(items)
        return n * (2 if dims.get("bias") else 1), "weights folded"
    return dims["m"], "M (rows)"


def derived(ms: float, cost: Dict[str, int], ceilings: Dict[str, float]) -> Dict[str, float]:
    """Achieved rates and the fraction of the roofline bound max(bytes / BW, flops / peak)."""
    seconds = ms * 1e-3
    bound = max(cost["bytes"] / (ceilings["copy_GBps"] * 1e9),
                cost["flops"] / (ceilings["bf16_matmul_TFLOPs"] * 1e12))
    return {"GBps": cost["bytes"] / seconds / 1e9, "TFLOPs": cost["flops"] / seconds / 1e12,
            "roofline_fraction": bound / seconds}


def add_speedups(results: List[Dict[str, Any]]) -> None:
    """speedup_vs_eager / _vs_compile = that implementation's ms / this one's, per
    (op, preset, dtype, pass); None when the baseline was not measured."""
    def key(r):
        return r["op"], r["preset"], r["dtype"], r["pass"]
    base = {(key(r), r["impl"]): r["ms"] for r in results}
    for r in results:
        eager, comp = base.get((key(r), "eager")), base.get((key(r), "torch.compile"))
        r["speedup_vs_eager"] = eager / r["ms"] if eager else None
        r["speedup_vs_compile"] = comp / r["ms"] if comp else None


# ----------------------------------------------------------------------------------------------
# JSON schema, file names
# ----------------------------------------------------------------------------------------------

def validate_report(report: Dict[str, Any]) -> None:
    """Raise ValueError naming the first field that is missing or of the wrong type."""
    if not isinstance(report, dict):
        raise ValueError(f"report: expected a JSON object, got {type(report).__name__}")
    for name, types in TOP_FIELDS.items():
        if name not in report:
            raise ValueError(f"report: missing field {name!r}")
        if not isinstance(report[name], types):
            raise ValueError(f"report.{name}: expected {types}, got {type(report[name]).__name__}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report.schema: expected {SCHEMA!r}, got {report['schema']!r}")
    for name in ("copy_GBps", "bf16_matmul_TFLOPs"):
        value = report["ceilings"].get(name)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"report.ceilings.{name}: expected a positive number, got {value!r}")
    for i, r in enumerate(report["results"]):
        for name, types in RESULT_FIELDS.items():
            if name not in r:
                raise ValueError(f"report.results[{i}]: missing field {name!r}")
            if isinstance(r[name], bool) or not isinstance(r[name], types):
                raise ValueError(f"report.results[{i}].{name}: expected {types}, got "
                                 f"{type(r[name]).__name__}")
        if not r["ms"] > 0:
            raise ValueError(f"report.results[{i}].ms: expected > 0, got {r['ms']}")


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def output_paths(report: Dict[str, Any], results_dir: Path = RESULTS_DIR) -> tuple:
    """(json, png) paths: <device>-<date>, plus the ops measured when not all of them (a GPU
    session may have to measure op by op; bench.readme_table merges a day's files)."""
    stem = f"{device_slug(report['device'])}-{report['date']}"
    ops = sorted({r["op"] for r in report["results"]})
    if ops and set(ops) != set(OPS):
        stem += "-" + "-".join(ops)
    if report.get("synthetic"):
        stem = f"SYNTHETIC-{stem}"
    return results_dir / f"{stem}.json", results_dir / f"{stem}.png"


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(report: Dict[str, Any], headline_only: bool = False) -> str:
    """Markdown tables, one per op: time, achieved rates, roofline fraction, speed-ups.
    headline_only drops the M-sweep rows (presets named '<preset>@M<m>')."""
    c = report["ceilings"]
    lines = []
    if report.get("synthetic"):
        lines.append("**SYNTHETIC DATA: not a measurement.**\n")
    lines.append(f"{report['device']}, {report['date']}, torch {report['torch']}, triton "
                 f"{report['triton']}, CUDA {report['cuda']}; measured ceilings: copy "
                 f"{c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s.")
    for op in OPS + tuple(sorted({r["op"] for r in report["results"]} - set(OPS))):
        rows = [r for r in report["results"] if r["op"] == op
                and not (headline_only and "@M" in r["preset"])]
        if not rows:
            continue
        lines += ["", f"**{op}**", "",
                  "| preset | dtype | pass | impl | ms | GB/s | TFLOP/s | roofline | vs eager "
                  "| vs compile |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["x"], r["preset"], r["dtype"], r["pass"])):
            lines.append(
                f"| {r['preset']} | {r['dtype']} | {r['pass']} | {r['impl']} | {r['ms']:.3f} | "
                f"{r['GBps']:.0f} | {r['TFLOPs']:.1f} | {100 * r['roofline_fraction']:.0f}% | "
                f"{_fmt(r['speedup_vs_eager'], '.2f', 'x')} | "
                f"{_fmt(r['speedup_vs_compile'], '.2f', 'x')} |")
    return "\n".join(lines) + "\n"


def plot_speedups(report: Dict[str, Any], path: Path) -> Path:
    """One panel per op: speed-up vs eager against the sweep coordinate (log x), one line per
    (pyadapt implementation, dtype, pass). A synthetic report says so in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(r["op"] == op for r in report["results"])]
    panels = max(len(ops), 1)
    fig, axes = plt.subplots(1, panels, figsize=(max(7.0, 4.2 * panels), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in report["results"] if r["op"] == op and r["impl"] != "eager"
                and r["speedup_vs_eager"] is not None]
        lines: Dict[tuple, list] = {}
        for r in rows:
            lines.setdefault((r["impl"], r["dtype"], r["pass"]), []).append(
                (r["x"], r["speedup_vs_eager"]))
        for (impl, dtype, pass_), pts in sorted(lines.items()):
            best = {}
            for x, s in pts:  # several presets at one x: keep each x once (the best)
                best[x] = max(s, best.get(x, 0.0))
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], marker="o",
                    linestyle="-" if pass_ == "forward" else "--",
                    label=f"{impl} {dtype} {'fwd' if pass_ == 'forward' else 'fwd+bwd'}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel(rows[0]["x_label"] if rows else "")
        ax.set_ylabel("speed-up vs eager")
        ax.legend(fontsize=6)
    title = f"{report['device']} {report['date']}"
    if report.get("synthetic"):
        title = "SYNTHETIC DATA (not a measurement) - " + title
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# measuring (needs CUDA)
# ----------------------------------------------------------------------------------------------

def _builders() -> Dict[str, Callable]:
    from . import bench_bottleneck, bench_fold, bench_lowrank, bench_mpm_nce, bench_radapter
    return {"bottleneck": bench_bottleneck.build, "radapter": bench_radapter.build,
            "lowrank": bench_lowrank.build, "fold": bench_fold.build,
            "mpm_nce": bench_mpm_nce.build}


def measure_ceilings() -> Dict[str, float]:
    import torch
    from triton.testing import do_bench

    n = 1 << 28  # 256 Mi fp32 elements = 1 GiB each way: far beyond any L2
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_gbps = 2 * src.nbytes / (ms * 1e-3) / 1e9
    k = 8192
    a = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return {"copy_GBps": copy_gbps, "bf16_matmul_TFLOPs": 2 * k ** 3 / (ms * 1e-3) / 1e12,
            "l2_bytes": int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0))}


def sweep_presets(op: str, headline_only: bool) -> List:
    from .presets import M_SWEEP, presets

    gpu = presets(op, "cuda")
    if headline_only or not gpu or op == "fold":
        return gpu
    head = gpu[0]
    if op == "mpm_nce":
        extra = [replace(head, name=f"{head.name}@N{n}", dims={**head.dims, "n": n})
                 for n in (128, 256, 1024, 2048) if n != head.dims["n"]]
    else:
        extra = [head.with_m(m) for m in M_SWEEP if m != head.m]
    return gpu + extra


def time_case(build: Callable, preset, dtype_name: str, impl: str, pass_: str,
              l2_bytes: int, device: str = "cuda") -> tuple:
    """(median ms, max relative error) of one implementation, checked first."""
    import torch
    from triton.testing import do_bench

    from ._common import check, clear_grads, dtype_of, fresh_args, runner

    dtype = dtype_of(dtype_name)
    work = build(preset, dtype, device)
    run = runner(work, impl)
    errors = check(work, run, impl)
    per_copy = sum(t.nbytes for v in work.args.values()
                   for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor))
    copies = [fresh_args(work.args, work.grads)]
    n_copies = min(8, max(1, math.ceil(2 * l2_bytes / max(per_copy, 1))))
    for seed in range(1, n_copies):
        other = build(preset, dtype, device, seed=seed)
        copies.append(fresh_args(other.args, other.grads))
    rotation = itertools.cycle(copies)
    with_backward = pass_ == "forward+backward"

    def step():
        args = next(rotation)
        clear_grads(args, work.grads)
        run(args, with_backward)

    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    return ms, max(errors.values())


def run_report(ops: Iterable[str] = OPS, headline_only: bool = False,
               dtypes: Optional[Iterable[str]] = None, only_impls: Optional[Iterable[str]] = None,
               log: Callable[[str], None] = print, device: str = "cuda") -> Dict[str, Any]:
    """Measure and return the report (validated). `device` other than cuda exists for the
    plumbing test only, which replaces the timer and the ceilings."""
    import torch

    import pyadapt

    from ._common import PASSES, _jsonable, impls
    from .presets import DTYPES

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    now = _dt.datetime.now(_dt.timezone.utc)
    ceilings = measure_ceilings()
    log(f"ceilings: {ceilings}")
    builders = _builders()
    results = []
    for op in ops:
        passes = ("forward",) if op == "fold" else PASSES
        for preset in sweep_presets(op, headline_only):
            for dtype in (dtypes or DTYPES["cuda"]):
                for pass_ in passes:
                    for impl in impls(op, device):
                        if only_impls is not None and impl not in only_impls:
                            continue
                        ms, err = time_case(builders[op], preset, dtype, impl, pass_,
                                            ceilings["l2_bytes"], device)
                        cost = op_cost(op, preset.dims, dtype, pass_)
                        x, label = sweep_coordinate(op, preset.dims)
                        results.append({
                            "op": op, "preset": preset.name, "source": preset.source,
                            "dims": _jsonable(preset.dims), "x": x, "x_label": label,
                            "dtype": dtype, "pass": pass_, "impl": impl, "ms": ms, **cost,
                            **derived(ms, cost, ceilings), "max_rel_err": err})
                        log(f"{op} {preset.name} {dtype} {pass_} {impl}: {ms:.3f} ms")
    add_speedups(results)
    report = {
        "schema": SCHEMA, "synthetic": False,
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "date": now.date().isoformat(), "datetime": now.isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "pyadapt": pyadapt.__version__, "git_commit": _git_commit(), "ceilings": ceilings,
        "results": results,
    }
    validate_report(report)
    return report


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--headline-only", action="store_true",
                        help="the presets only, without the sweep over M")
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16", "float32"),
                        default=None, help="default: bench/presets.py DTYPES['cuda']")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="only these implementations (eager, torch.compile, pyadapt-triton, "
                             "...); speed-ups need eager / torch.compile in the same report")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.report: no CUDA device here; this report measures GPU kernels and refuses "
              "to run without one (nothing written). On CPU use: pytest bench --benchmark-only",
              file=sys.stderr)
        return 2
    report = run_report(args.ops, args.headline_only, args.dtypes, args.impls)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output_paths(report, args.out_dir)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot_speedups(report, png_path)
    print(render_table(report))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
