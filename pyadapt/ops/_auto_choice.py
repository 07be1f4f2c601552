"""The measured table behind `auto` on CUDA devices: pyadapt/ops/auto_choice.json.

`python -m bench.choose_backends`, run on a GPU, times every backend with a kernel (triton,
cuda) for each op at the op's headline GPU presets and records, under the device's name, the
faster one; `auto` then runs that backend on that device (pyadapt.ops._registry). The file ships
inside the package. A device without an entry (every device, until a GPU run fills the file)
keeps the fixed preference.

Schema "pyadapt-auto-choice/1":

    {"schema": "pyadapt-auto-choice/1",
     "devices": {
       "<torch.cuda.get_device_name()>": {
         "date": "YYYY-MM-DD", "torch": str, "triton": str | null, "cuda": str | null,
         "git_commit": str | null, "pyadapt": str,
         "ops": {
           "<forward op, e.g. bottleneck_forward>": {
             "backend": "triton" | "cuda",        the fastest of "ms"
             "ms": {backend: ms},                  summed over "presets", one training step each
             "preset_ms": {preset: {backend: ms}}, the same, per preset
             "presets": [preset names], "dtype": "bfloat16", "pass": "forward+backward",
             "date": "YYYY-MM-DD",                 when this op was measured
             "excluded": {backend: why}}}}}}       optional: not timed, or failed the float64 check

Only forward ops are recorded: a backward (`<name>_backward`) and the training forward
(`<name>_forward_saving`) follow `<name>_forward`, so the two directions of one op never run on
different backends.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

SCHEMA = "pyadapt-auto-choice/1"
TABLE_PATH = Path(__file__).resolve().with_name("auto_choice.json")

# Backends a table may record: the ones that run CUDA tensors.
GPU_BACKENDS = ("triton", "cuda", "reference")

DEVICE_FIELDS = {"date": str, "torch": str, "triton": (str, type(None)),
                 "cuda": (str, type(None)), "git_commit": (str, type(None)), "pyadapt": str,
                 "ops": dict}
OP_FIELDS = {"backend": str, "ms": dict, "preset_ms": dict, "presets": list, "dtype": str,
             "pass": str, "date": str}
PASSES = ("forward", "forward+backward")


def table_op(op: str) -> str:
    """The op whose entry decides `op`: its forward for a backward or a saving forward."""
    if op.endswith("_backward"):
        return op[: -len("_backward")] + "_forward"
    if op.endswith("_forward_saving"):
        return op[: -len("_saving")]
    return op


def empty_table() -> Dict[str, Any]:
    return {"schema": SCHEMA, "devices": {}}


def load_table(path: Optional[Path] = None) -> Dict[str, Any]:
    """The table at `path` (default TABLE_PATH), validated: ValueError naming the bad field,
    OSError if unreadable."""
    path = TABLE_PATH if path is None else path
    try:
        table = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    validate_table(table)
    return table


def _ms_map(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: expected a non-empty object {{backend: ms}}, got {value!r}")
    for backend, ms in value.items():
        if backend not in GPU_BACKENDS:
            raise ValueError(f"{where}: backend {backend!r} is not one of {GPU_BACKENDS}")
        if (isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms)
                or ms <= 0):
            raise ValueError(f"{where}.{backend}: expected a positive number of ms, got {ms!r}")


def _typed(record: Dict[str, Any], fields: Dict[str, Any], where: str) -> None:
    for name, types in fields.items():
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], types):
            raise ValueError(f"{where}.{name}: expected {types}, got "
                             f"{type(record[name]).__name__}")


def validate_table(table: Any) -> None:
    """Raise ValueError naming the first field that is missing, mistyped or inconsistent."""
    if not isinstance(table, dict):
        raise ValueError(f"table: expected a JSON object, got {type(table).__name__}")
    if table.get("schema") != SCHEMA:
        raise ValueError(f"table.schema: expected {SCHEMA!r}, got {table.get('schema')!r}")
    devices = table.get("devices")
    if not isinstance(devices, dict):
        raise ValueError(f"table.devices: expected an object {{device name: entry}}, got "
                         f"{type(devices).__name__}")
    for device, entry in devices.items():
        where = f"table.devices[{device!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        _typed(entry, DEVICE_FIELDS, where)
        for op, record in entry["ops"].items():
            at = f"{where}.ops[{op!r}]"
            if table_op(op) != op:
                raise ValueError(f"{at}: record the forward op {table_op(op)!r}; its backward "
                                 f"and saving forward follow it")
            if not isinstance(record, dict):
                raise ValueError(f"{at}: expected an object, got {type(record).__name__}")
            _typed(record, OP_FIELDS, at)
            _ms_map(record["ms"], f"{at}.ms")
            if record["pass"] not in PASSES:
                raise ValueError(f"{at}.pass: expected one of {PASSES}, got {record['pass']!r}")
            if not record["presets"] or not all(isinstance(p, str) for p in record["presets"]):
                raise ValueError(f"{at}.presets: expected a non-empty list of preset names")
            if set(record["preset_ms"]) != set(record["presets"]):
                raise ValueError(f"{at}.preset_ms: expected one entry per preset "
                                 f"{record['presets']}, got {sorted(record['preset_ms'])}")
            for preset, per_backend in record["preset_ms"].items():
                _ms_map(per_backend, f"{at}.preset_ms[{preset!r}]")
                if set(per_backend) != set(record["ms"]):
                    raise ValueError(f"{at}.preset_ms[{preset!r}]: expected the backends of "
                                     f"ms {sorted(record['ms'])}, got {sorted(per_backend)}")
            backend = record["backend"]
            if backend not in record["ms"]:
                raise ValueError(f"{at}.backend: {backend!r} has no time in ms")
            fastest = min(record["ms"], key=record["ms"].get)
            if record["ms"][backend] > record["ms"][fastest]:
                raise ValueError(f"{at}.backend: {backend!r} is not the fastest recorded "
                                 f"({fastest!r})")
            excluded = record.get("excluded", {})
            if not isinstance(excluded, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in excluded.items()):
                raise ValueError(f"{at}.excluded: expected an object {{backend: reason}}")


def device_entry(table: Dict[str, Any], device_name: Optional[str]) -> Optional[Dict[str, Any]]:
    """The table's entry for a device name, or None (also for no name: no CUDA device)."""
    if device_name is None:
        return None
    return table["devices"].get(device_name)
