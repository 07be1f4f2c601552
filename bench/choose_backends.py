"""Measure which backend `auto` runs per op on this GPU: `python -m bench.choose_backends`.

1. For every op with GPU presets (bench/presets.py) and every backend among (triton, cuda) that
   has a kernel for it and is available here: checks it against float64 at each of the op's
   headline GPU presets (bench/_common.check, through bench.report.time_case; a backend that
   fails, or raises, is excluded from the op's choice and reported), then times one training
   step (forward + backward; fold: forward) with triton.testing.do_bench (median; inputs rotate
   over copies exceeding twice the L2, as bench.report does), in bfloat16 by default.
2. Per op, the backend with the lower total time over the op's presets wins.
3. Prints the table and merges it into pyadapt/ops/auto_choice.json under this device's name
   (torch.cuda.get_device_name()), keeping other devices' entries; `--dry-run` writes nothing.
   A run of some ops (`--ops`) keeps this device's other ops when torch, triton and CUDA
   versions are unchanged, and drops them otherwise (they were measured on another stack).

Without CUDA it refuses (exit status 2) and writes nothing. Exit status 1 when a backend was
excluded for failing (the table is still written, without it). The pure parts (the winner, the
merge, the schema in pyadapt/ops/_auto_choice.py) are tested in tests/test_auto_choice.py.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pyadapt.ops import _auto_choice

from .report import OPS

# The backends `auto` chooses between on a GPU, in the fixed preference's order (which also
# breaks an exact tie).
CANDIDATES = ("triton", "cuda")
DEFAULT_DTYPE = "bfloat16"


# ----------------------------------------------------------------------------------------------
# the pure parts: winner, record, merge, table
# ----------------------------------------------------------------------------------------------

def pick_backend(preset_ms: Dict[str, Dict[str, float]],
                 order: Sequence[str] = CANDIDATES) -> Tuple[str, Dict[str, float]]:
    """(winner, {backend: total ms}) from {preset: {backend: ms}}: the backend with the lowest
    sum over the presets, among those timed at every preset; an exact tie goes to the earlier
    backend in `order`."""
    if not preset_ms:
        raise ValueError("preset_ms: expected at least one preset")
    complete = set.intersection(*(set(per) for per in preset_ms.values()))
    if not complete:
        raise ValueError(f"preset_ms: no backend was timed at every preset "
                         f"({sorted(preset_ms)})")
    totals = {b: sum(per[b] for per in preset_ms.values()) for b in complete}
    rank = {b: i for i, b in enumerate(order)}
    winner = min(totals, key=lambda b: (totals[b], rank.get(b, len(order)), b))
    return winner, {b: totals[b] for b in sorted(totals, key=lambda b: rank.get(b, len(order)))}


def op_record(preset_ms: Dict[str, Dict[str, float]], dtype: str, pass_: str, date: str,
              excluded: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """One op's table entry: the winner, total and per-preset ms of the backends timed at every
    preset, what was measured, and why other backends were left out."""
    winner, totals = pick_backend(preset_ms)
    record = {"backend": winner, "ms": totals,
              "preset_ms": {p: {b: per[b] for b in totals} for p, per in preset_ms.items()},
              "presets": list(preset_ms), "dtype": dtype, "pass": pass_, "date": date}
    if excluded:
        record["excluded"] = dict(excluded)
    return record


def merge_choice(table: Dict[str, Any], device: str,
                 entry: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """(new table, ops dropped) with this run's `entry` for `device`; other devices' entries are
    kept as they are. The device's earlier ops that this run did not measure are kept when
    torch, triton and CUDA versions match, dropped otherwise. Neither argument is modified."""
    _auto_choice.validate_table(table)
    merged = copy.deepcopy(table)
    old = merged["devices"].get(device)
    kept, dropped = {}, []
    if old is not None:
        same_stack = all(old[k] == entry[k] for k in ("torch", "triton", "cuda"))
        for op, record in old["ops"].items():
            if op in entry["ops"]:
                continue
            if same_stack:
                kept[op] = record
            else:
                dropped.append(op)
    merged["devices"][device] = {**copy.deepcopy(entry), "ops": {**kept,
                                                                 **copy.deepcopy(entry["ops"])}}
    merged["devices"] = dict(sorted(merged["devices"].items()))
    _auto_choice.validate_table(merged)
    return merged, sorted(dropped)


def render_choice(device: str, entry: Dict[str, Any]) -> str:
    """Markdown: one row per op, the chosen backend, each candidate's total ms, the ratio of the
    slower to the chosen, and what was measured."""
    lines = [f"{device}, {entry['date']}, torch {entry['torch']}, triton {entry['triton']}, "
             f"CUDA {entry['cuda']}, commit {entry['git_commit']}", "",
             "| op | auto | " + " | ".join(f"{b} ms" for b in CANDIDATES)
             + " | slower / chosen | dtype | pass | presets |",
             "|---|---|" + "---:|" * len(CANDIDATES) + "---:|---|---|---|"]
    notes = []
    for op, r in sorted(entry["ops"].items()):
        times = [f"{r['ms'][b]:.3f}" if b in r["ms"] else "-" for b in CANDIDATES]
        others = [ms for b, ms in r["ms"].items() if b != r["backend"]]
        ratio = f"{max(others) / r['ms'][r['backend']]:.2f}x" if others else "-"
        lines.append(f"| {op} | {r['backend']} | " + " | ".join(times)
                     + f" | {ratio} | {r['dtype']} | {r['pass']} | {', '.join(r['presets'])} |")
        notes += [f"- {op}: {b} excluded, {why}"
                  for b, why in sorted(r.get("excluded", {}).items())]
    if not entry["ops"]:
        lines.append("| (no op measured) |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_table(table: Dict[str, Any], path: Path) -> None:
    """Validated, then written whole (a temporary file renamed over `path`)."""
    _auto_choice.validate_table(table)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# measuring (needs CUDA)
# ----------------------------------------------------------------------------------------------

def candidates(op: str, backends: Sequence[str] = CANDIDATES) -> Tuple[List[str], Dict[str, str]]:
    """(backends to time, {backend: why not}) for a bench op: those with a kernel for its forward
    op that are available here. A kernel that cannot run here is reported, not silently
    skipped; a backend without a kernel for the op is no candidate at all."""
    import pyadapt

    from ._common import FORWARD_OP

    implemented = set(pyadapt.ops.kernel_table()[FORWARD_OP[op]])
    usable = set(pyadapt.available_backends())
    chosen, excluded = [], {}
    for b in backends:
        if b not in implemented:
            continue
        if b in usable:
            chosen.append(b)
        else:
            why = "not available here"
            if b == "cuda" and pyadapt.ops._native_cuda.error:
                why += f" ({pyadapt.ops._native_cuda.error})"
            excluded[b] = why
    return chosen, excluded


def measure_device(ops: Sequence[str] = OPS, dtype: str = DEFAULT_DTYPE,
                   backends: Sequence[str] = CANDIDATES, log: Callable[[str], None] = print,
                   device: str = "cuda", l2_bytes: Optional[int] = None) -> Tuple[Dict, bool]:
    """(this device's table entry, whether any backend failed). `device` other than cuda exists
    for the plumbing test only, which replaces the timer."""
    import torch

    import pyadapt

    from ._common import FORWARD_OP, PASSES
    from .report import _builders, _git_commit, sweep_presets, time_case

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if l2_bytes is None:
        l2_bytes = int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                               "L2_cache_size", 0))
    date = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    builders = _builders()
    failed = False
    records = {}
    for op in ops:
        presets = sweep_presets(op, headline_only=True)
        timed, excluded = candidates(op, backends)
        if not presets or not timed:
            log(f"{op}: nothing to choose (GPU presets: {len(presets)}, candidates: {timed}, "
                f"excluded: {excluded}); auto keeps its fixed preference")
            continue
        pass_ = "forward" if op == "fold" else PASSES[-1]
        preset_ms: Dict[str, Dict[str, float]] = {p.name: {} for p in presets}
        for backend in timed:
            for preset in presets:
                try:
                    ms, err = time_case(builders[op], preset, dtype, f"pyadapt-{backend}", pass_,
                                        l2_bytes, device)
                except Exception as exc:  # a wrong or crashing kernel must not be chosen
                    excluded[backend] = f"failed at {preset.name}: {type(exc).__name__}: {exc}"
                    failed = True
                    log(f"{op} {preset.name} {backend}: EXCLUDED, {excluded[backend]}")
                    for per in preset_ms.values():
                        per.pop(backend, None)
                    break
                preset_ms[preset.name][backend] = ms
                log(f"{op} {preset.name} {dtype} {pass_} {backend}: {ms:.3f} ms "
                    f"(max rel err {err:.1e})")
        if not any(preset_ms.values()):
            log(f"{op}: every candidate was excluded; auto keeps its fixed preference")
            continue
        records[FORWARD_OP[op]] = op_record(preset_ms, dtype, pass_, date, excluded)
    entry = {"date": date, "torch": torch.__version__, "triton": triton_version,
             "cuda": torch.version.cuda, "git_commit": _git_commit(),
             "pyadapt": pyadapt.__version__, "ops": records}
    return entry, failed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.choose_backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default=DEFAULT_DTYPE)
    parser.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    parser.add_argument("--table", type=Path, default=_auto_choice.TABLE_PATH,
                        help="the table to merge into (default: the package's)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.choose_backends: no CUDA device here; choosing between GPU backends needs "
              "one (nothing written)", file=sys.stderr)
        return 2
    table = (_auto_choice.load_table(args.table) if args.table.exists()
             else _auto_choice.empty_table())
    device = torch.cuda.get_device_name()
    entry, failed = measure_device(args.ops, args.dtype)
    print(render_choice(device, entry))
    merged, dropped = merge_choice(table, device, entry)
    if dropped:
        print(f"dropped from {device!r}, measured under another torch / triton / CUDA: "
              f"{', '.join(dropped)}")
    if not entry["ops"]:
        print("no op measured: the table is left as it was")
    elif args.dry_run:
        print("--dry-run: nothing written")
    else:
        write_table(merged, args.table)
        print(f"wrote {args.table} ({device})")
    if failed:
        print("a backend failed its check or raised: see 'excluded' above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
