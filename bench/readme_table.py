"""Regenerate the README's benchmark section from the committed results (no hand-typed numbers).

    python -m bench.readme_table            # print the section to stdout
    python -m bench.readme_table --write    # replace it in README.md, between
                                            # <!-- bench:begin --> and <!-- bench:end -->

Sources, all in bench/results/:
- GPU: the newest report JSON of `python -m bench.report` (schema pyadapt-bench-report/1; files
  marked synthetic are ignored), merged with the other reports of the same device and date (a
  GPU session may measure op by op), shown with device, date, torch, triton and CUDA versions.
  With none: "GPU: not yet measured."
- CPU: pytest-benchmark JSON files (`pytest bench --benchmark-only --benchmark-json=...`); for
  each op, the newest file that measured it. Shown separately, labelled CPU, as ratios against
  eager and torch.compile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .report import RESULTS_DIR, SCHEMA, add_speedups, device_slug, render_table

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"
GPU_NOT_MEASURED = "GPU: not yet measured."


def load_results(results_dir: Path) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """(newest real GPU report or None, pytest-benchmark runs oldest first) found in results_dir.
    Each run gets its file name under the key '_file'."""
    reports, runs = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if data.get("schema") == SCHEMA:
            if not data.get("synthetic") and not path.name.startswith("SYNTHETIC"):
                reports.append(data)
        elif "benchmarks" in data and "machine_info" in data:
            runs.append({**data, "_file": path.name})
    runs.sort(key=lambda r: (r.get("datetime", ""), r["_file"]))
    return merge_latest(reports), runs


def merge_latest(reports: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The newest report's device and date, with the results of every report of that device
    and date (a session may measure op by op); for a result measured twice the newer wins."""
    if not reports:
        return None
    newest = max(reports, key=lambda r: (r["datetime"], r["device"]))
    same = sorted((r for r in reports
                   if (r["device"], r["date"]) == (newest["device"], newest["date"])),
                  key=lambda r: r["datetime"])
    merged: Dict[tuple, Dict[str, Any]] = {}
    for rep in same:
        for r in rep["results"]:
            merged[(r["op"], r["preset"], r["dtype"], r["pass"], r["impl"])] = r
    results = [dict(r) for r in merged.values()]
    add_speedups(results)  # baselines may come from another file of the same day
    return {**newest, "results": results, "_files": len(same)}


def normalise(bench: Dict[str, Any]) -> Dict[str, Any]:
    """One pytest-benchmark entry as (op, preset, device, dtype, pass, impl, median s). Reads
    the extra_info written by bench/_common.py, or the parameters of the first bottleneck
    suite (shape_name, impl, pass_) for results saved before that."""
    extra, params = bench.get("extra_info", {}), bench.get("params") or {}
    op = extra.get("op")
    if op is None:
        module = bench.get("fullname", "").split("::")[0].rsplit("/", 1)[-1]
        op = module.removeprefix("bench_").removesuffix(".py")
    dtype = str(extra.get("dtype", "")).removeprefix("torch.")
    return {
        "op": op, "preset": extra.get("preset", params.get("shape_name", bench.get("name"))),
        "device": extra.get("device", params.get("device", "cpu")), "dtype": dtype,
        "pass": extra.get("pass", params.get("pass_", "")),
        "impl": extra.get("impl", params.get("impl", "")), "median": bench["stats"]["median"],
        "images_per_s": extra.get("images_per_s"),
    }


def latest_cpu_rows(runs: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict]]:
    """The CPU rows to show: for each op, every row of the newest run that measured it (a
    newer run supersedes an older one op by op, so renamed presets do not linger); and the
    runs used. `runs` are ordered oldest first."""
    newest: Dict[str, Dict[str, Any]] = {}
    for run in runs:
        for row in (normalise(b) for b in run["benchmarks"]):
            if row["device"] == "cpu":
                newest[row["op"]] = run
    rows = []
    for op, run in newest.items():
        rows += [{**row, "_file": run["_file"]} for row in map(normalise, run["benchmarks"])
                 if row["op"] == op and row["device"] == "cpu"]
    used = {r["_file"] for r in rows}
    return rows, [r for r in runs if r["_file"] in used]


def _ratio(base: Optional[float], value: float) -> str:
    return "-" if base is None else f"{base / value:.2f}x"


def render_cpu(runs: List[Dict[str, Any]]) -> str:
    rows, used = latest_cpu_rows(runs)
    if not rows:
        return "CPU: no pytest-benchmark results committed.\n"
    lines = []
    for run in used:
        mi = run["machine_info"]
        cpu = mi.get("cpu", {})
        versions = mi.get("pyadapt", {})
        lines.append(f"- `{run['_file']}`: {cpu.get('brand_raw', mi.get('processor', '?'))}, "
                     f"{cpu.get('count', '?')} cores, {run.get('datetime', '?')[:10]}, "
                     f"torch {versions.get('torch', 'not recorded')}, "
                     f"{versions.get('torch_threads', '?')} threads")
    lines = ["**CPU** (pytest-benchmark medians; ratios > 1 mean pyadapt is faster; shared "
             "CPU machines are noisy):", ""] + lines
    groups: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["preset"], r["dtype"], r["pass"]), {})[r["impl"]] = r
    ops_rows = [(k, g) for k, g in sorted(groups.items()) if k[0] != "e2e"]
    if ops_rows:
        lines += ["", "| op | preset | dtype | pass | eager ms | compile ms | pyadapt backend | ms "
                  "| vs eager | vs compile |",
                  "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
        for (op, preset, dtype, pass_), g in ops_rows:
            eager = g.get("eager", {}).get("median")
            comp = g.get("torch.compile", {}).get("median")
            for impl in sorted(i for i in g if i.startswith("pyadapt-")):
                t = g[impl]["median"]
                lines.append(
                    f"| {op} | {preset} | {dtype} | {pass_} | "
                    f"{'-' if eager is None else f'{eager * 1e3:.2f}'} | "
                    f"{'-' if comp is None else f'{comp * 1e3:.2f}'} | {impl.removeprefix('pyadapt-')} "
                    f"| {t * 1e3:.2f} | {_ratio(eager, t)} | {_ratio(comp, t)} |")
    e2e = [r for r in rows if r["op"] == "e2e"]
    if e2e:
        lines += ["", "| end-to-end training step | backend | step ms | images/s |",
                  "|---|---|---:|---:|"]
        for r in sorted(e2e, key=lambda r: (r["preset"], r["impl"])):
            ips = r["images_per_s"]
            lines.append(f"| {r['preset']} | {r['impl'].removeprefix('pyadapt-')} | "
                         f"{r['median'] * 1e3:.1f} | {'-' if ips is None else f'{ips:.1f}'} |")
    return "\n".join(lines) + "\n"


def render_section(results_dir: Path = RESULTS_DIR) -> str:
    """The text that goes between the markers (markers excluded)."""
    gpu, runs = load_results(results_dir)
    parts = ["<!-- generated by `python -m bench.readme_table --write`; do not edit by hand -->",
             ""]
    if gpu is None:
        parts.append(GPU_NOT_MEASURED)
    else:
        parts.append("**GPU** (`python -m bench.report`, do_bench medians):")
        parts.append("")
        parts.append(render_table(gpu, headline_only=True).rstrip())
        for png in sorted(Path(results_dir).glob(
                f"{device_slug(gpu['device'])}-{gpu['date']}*.png")):
            parts += ["", f"![speed-up against M](bench/results/{png.name})"]
    parts += ["", render_cpu(runs).rstrip()]
    return "\n".join(parts) + "\n"


def replace_section(readme: str, section: str) -> str:
    """readme with everything between the markers replaced by `section`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README: expected the markers {BEGIN} and {END} (in that order)")
    return readme[:start + len(BEGIN)] + "\n" + section + readme[end:]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="edit the README in place")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    section = render_section(args.results)
    if not args.write:
        sys.stdout.write(section)
        return 0
    text = args.readme.read_text()
    args.readme.write_text(replace_section(text, section))
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
