"""`auto` on CUDA follows a measured table: pyadapt/ops/auto_choice.json, written per device name
by `python -m bench.choose_backends`.

For a CUDA tensor on a device whose name has an entry, auto runs the recorded (fastest) backend
of the op, when that backend has the op's kernel and is available; a backward op (and a saving
forward) follows its forward's entry. Otherwise, and for devices without an entry, auto keeps
the fixed preference (triton, cuda, reference). use_backend > set_backend > PYADAPT_BACKEND still
override auto. The table ships empty: no GPU has measured it yet.

No GPU here: the device-name lookup and the availability of the cuda backend are replaced, and
the table is a made-up one (never written to the package)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyadapt
from bench import choose_backends, report
from bench.presets import Preset
from pyadapt import ops
from pyadapt.ops import _auto_choice, _registry

REPO = Path(__file__).resolve().parent.parent

FAKE_GPU = "Fake GPU 80GB (made-up numbers)"
OTHER_GPU = "Other GPU without an entry"
DATE = "2000-01-01"
# The fixed preference for these ops on CUDA is triton (registered first in the preference).
FIXED = "triton"


def fake_entry(choices: dict, torch_version: str = "0.0") -> dict:
    """A device entry recording backend `choices[op]` as the faster for each op: made-up times,
    through the producer's own record builder."""
    ops_ = {}
    for op, winner in choices.items():
        loser = "triton" if winner == "cuda" else "cuda"
        ops_[op] = choose_backends.op_record({"p1": {winner: 1.0, loser: 2.0},
                                              "p2": {winner: 3.0, loser: 4.0}},
                                             "bfloat16", "forward+backward", DATE)
    return {"date": DATE, "torch": torch_version, "triton": "0.0", "cuda": "0.0",
            "git_commit": None, "pyadapt": "0.0", "ops": ops_}


def fake_table() -> dict:
    return {"schema": _auto_choice.SCHEMA, "devices": {FAKE_GPU: fake_entry({
        "bottleneck_forward": "cuda",     # not the fixed preference: the table must win
        "lowrank_forward": "triton",
        "radapter_forward": "cuda",
        "bank_bottleneck_forward": "cuda",  # no cuda kernel for this op: fixed preference
    })}}


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.delenv("PYADAPT_BACKEND", raising=False)
    yield
    pyadapt.set_backend("auto")


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA device 0 is FAKE_GPU (in the table), device 1 OTHER_GPU (not); triton and cuda are
    available; the table is fake_table(). Returns the list of device-name lookups made."""
    lookups = []

    def device_name(index):
        lookups.append(index)
        return {0: FAKE_GPU, 1: OTHER_GPU}[index]

    monkeypatch.setattr(_registry, "_cuda_device_name", device_name)
    monkeypatch.setattr(_registry, "_current_cuda_index", lambda: 0)
    monkeypatch.setattr(_registry, "_table", [fake_table()])
    monkeypatch.setattr(_registry, "_recorded_by_index", {})
    monkeypatch.setitem(_registry._available, "cuda", True)
    monkeypatch.setitem(_registry._available, "triton", True)
    for op in ("bottleneck_forward", "bottleneck_backward", "lowrank_forward",
               "lowrank_backward", "radapter_forward", "radapter_backward", "fold_weights"):
        for backend in ("triton", "cuda"):
            if backend not in _registry._kernels[op]:  # a build without it: a stand-in kernel
                monkeypatch.setitem(_registry._kernels[op], backend, lambda *a: None)
    return lookups


# ----------------------------------------------------------------------------------------------
# the shipped table
# ----------------------------------------------------------------------------------------------

def test_shipped_table_validates_and_has_no_device_entries():
    table = _auto_choice.load_table()
    assert table["schema"] == "pyadapt-auto-choice/1", "shipped table has another schema"
    assert table["devices"] == {}, (
        "the shipped table must hold no devices until a GPU run of bench.choose_backends "
        f"measures one; found {sorted(table['devices'])}")


def test_shipped_table_lives_in_the_package_and_is_declared_package_data():
    assert _auto_choice.TABLE_PATH == REPO / "pyadapt" / "ops" / "auto_choice.json", (
        "the table must sit beside pyadapt/ops/_auto_choice.py")
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = pyproject["tool"]["setuptools"]["package-data"]["pyadapt.ops"]
    assert "auto_choice.json" in declared, "pyproject does not ship auto_choice.json"


def test_importing_pyadapt_asks_cuda_nothing_and_reads_no_table():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "torch.cuda.get_device_name = torch.cuda.current_device = boom\n"
        "import pyadapt\n"
        "from pyadapt.ops import _registry\n"
        "y = pyadapt.FusedAdapter(8, 2)(torch.randn(3, 8))\n"
        "assert _registry._table[0] is None, 'table read without a CUDA tensor'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------------------------
# auto follows the table
# ----------------------------------------------------------------------------------------------

def test_auto_runs_the_recorded_backend_on_a_measured_device(fake_gpu):
    assert ops.backend_for("bottleneck_forward", "cuda") == "cuda", (
        "auto ignored the table's cuda for bottleneck_forward")
    assert ops.backend_for("lowrank_forward", "cuda") == "triton", (
        "auto ignored the table's triton for lowrank_forward")
    assert ops.backend_for("radapter_forward", torch.device("cuda", 0)) == "cuda", (
        "auto ignored the table for an explicit device index")


def test_backward_ops_follow_their_forward_entry(fake_gpu):
    for forward, backward in (("bottleneck_forward", "bottleneck_backward"),
                              ("radapter_forward", "radapter_backward"),
                              ("lowrank_forward", "lowrank_backward")):
        assert ops.backend_for(backward, "cuda") == ops.backend_for(forward, "cuda"), (
            f"{backward} looked up alone runs elsewhere than {forward}")
    assert _auto_choice.table_op("bottleneck_forward_saving") == "bottleneck_forward", (
        "the saving forward must follow its forward's entry")
    assert _auto_choice.table_op("fold_weights") == "fold_weights", (
        "an op without a backward is its own entry")


def test_ops_missing_from_the_table_use_the_fixed_preference(fake_gpu):
    assert ops.backend_for("fold_weights", "cuda") == FIXED, (
        "fold_weights has no entry: expected the fixed preference")
    assert ops.backend_for("mpm_nce_forward", "cuda") == "reference", (
        "mpm_nce has only the reference kernel")


def test_a_recorded_backend_without_the_op_kernel_uses_the_fixed_preference(fake_gpu):
    assert "cuda" not in ops.kernel_table()["bank_bottleneck_forward"], "test premise"
    assert ops.backend_for("bank_bottleneck_forward", "cuda") == FIXED, (
        "the table's cuda has no bank kernel: expected the fixed preference")


def test_an_unavailable_recorded_backend_uses_the_fixed_preference(fake_gpu, monkeypatch):
    monkeypatch.setitem(_registry._available, "cuda", False)
    assert ops.backend_for("bottleneck_forward", "cuda") == FIXED, (
        "the table's cuda is unavailable: expected the fixed preference")
    assert ops.backend_for("bottleneck_backward", "cuda") == FIXED, (
        "backward must fall back exactly as its forward does")
    reason = ops.auto_choice("cuda")["bottleneck_forward"]["reason"]
    assert reason.startswith("fixed preference") and "not available" in reason, reason


def test_a_device_without_an_entry_uses_the_fixed_preference(fake_gpu):
    other = torch.device("cuda", 1)
    assert ops.backend_for("bottleneck_forward", other) == FIXED, (
        "device 1 has no entry: expected the fixed preference")
    assert ops.backend_for("bottleneck_forward", "cuda:1") == FIXED, (
        "'cuda:1' names device 1, which has no entry")
    assert ops.backend_for("bottleneck_forward", "cuda:0") == "cuda", (
        "'cuda:0' names the measured device")


def test_the_device_name_is_looked_up_once_per_device_index(fake_gpu):
    for _ in range(3):
        ops.backend_for("bottleneck_forward", torch.device("cuda", 0))
        ops.backend_for("bottleneck_backward", torch.device("cuda", 1))
    assert sorted(fake_gpu) == [0, 1], f"expected one lookup per index, got {fake_gpu}"


def test_cpu_tensors_never_consult_the_table(fake_gpu):
    assert ops.backend_for("bottleneck_forward", "cpu") in ("cpu", "reference"), (
        "a CPU tensor must keep the CPU preference")
    assert fake_gpu == [], "a CPU lookup asked for a CUDA device name"


@pytest.mark.parametrize("how", ["use_backend", "set_backend", "PYADAPT_BACKEND"])
def test_an_explicit_backend_overrides_the_table(fake_gpu, monkeypatch, how):
    if how == "use_backend":
        with pyadapt.use_backend("reference"):
            got = ops.backend_for("bottleneck_forward", "cuda")
    elif how == "set_backend":
        pyadapt.set_backend("reference")
        got = ops.backend_for("bottleneck_forward", "cuda")
    else:
        monkeypatch.setenv("PYADAPT_BACKEND", "reference")
        got = ops.backend_for("bottleneck_forward", "cuda")
    assert got == "reference", f"{how}('reference') lost to the table's cuda"
    pyadapt.set_backend("triton")
    assert ops.backend_for("bottleneck_backward", "cuda") == "triton", (
        "set_backend('triton') lost to the table's cuda for a backward op")


def test_a_malformed_table_warns_and_auto_keeps_the_fixed_preference(fake_gpu, monkeypatch,
                                                                     tmp_path):
    broken = tmp_path / "auto_choice.json"
    broken.write_text(json.dumps({"schema": "something-else/9", "devices": {}}))
    monkeypatch.setattr(_auto_choice, "TABLE_PATH", broken)
    monkeypatch.setattr(_registry, "_table", [None])
    with pytest.warns(RuntimeWarning, match="auto choice table"):
        got = ops.backend_for("bottleneck_forward", "cuda")
    assert got == FIXED, "a rejected table must leave the fixed preference"


# ----------------------------------------------------------------------------------------------
# auto_choice() and build_info()
# ----------------------------------------------------------------------------------------------

def test_auto_choice_says_what_auto_runs_and_why(fake_gpu):
    table = ops.auto_choice("cuda")
    assert set(table) == set(ops.kernel_table()), "auto_choice must list every registered op"
    measured = f"measured on {FAKE_GPU} {DATE}"
    assert table["bottleneck_forward"] == {"backend": "cuda", "reason": measured}
    assert table["bottleneck_backward"] == {"backend": "cuda", "reason": measured}
    assert table["fold_weights"] == {
        "backend": FIXED,
        "reason": f"fixed preference: fold_weights not measured on {FAKE_GPU}"}
    for op, choice in table.items():
        assert choice["backend"] == ops.backend_for(op, "cuda"), (
            f"auto_choice and backend_for disagree on {op}")
    other = ops.auto_choice("cuda:1")["bottleneck_forward"]
    assert other == {"backend": FIXED, "reason": "fixed preference: no measurement for this "
                     f"device ({OTHER_GPU})"}
    cpu = ops.auto_choice("cpu")["bottleneck_forward"]
    assert cpu["reason"].startswith("fixed preference") and "CUDA" in cpu["reason"], cpu


def test_auto_choice_ignores_an_explicit_backend(fake_gpu):
    with pyadapt.use_backend("reference"):
        assert ops.auto_choice("cuda")["bottleneck_forward"]["backend"] == "cuda", (
            "auto_choice reports auto's pick, not the override in force")


def test_build_info_reports_whether_the_current_device_was_measured(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pyadapt.build_info()["auto_choice"] == {"device": None, "measured": False,
                                                   "date": None}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pyadapt.build_info()["auto_choice"] == {"device": FAKE_GPU, "measured": True,
                                                   "date": DATE}
    monkeypatch.setattr(_registry, "_current_cuda_index", lambda: 1)
    assert pyadapt.build_info()["auto_choice"] == {"device": OTHER_GPU, "measured": False,
                                                   "date": None}


# ----------------------------------------------------------------------------------------------
# the schema
# ----------------------------------------------------------------------------------------------

def test_validate_table_accepts_a_complete_table_and_names_bad_fields():
    table = fake_table()
    _auto_choice.validate_table(table)
    json.loads(json.dumps(table))  # JSON-serialisable as written
    op = ("devices", FAKE_GPU, "ops", "bottleneck_forward")

    def at(t, path):
        for key in path:
            t = t[key]
        return t

    for mutate, field in [
        (lambda t: t.update(schema="pyadapt-auto-choice/0"), "schema"),
        (lambda t: t.update(devices=[]), "devices"),
        (lambda t: at(t, op[:2]).pop("date"), "date"),
        (lambda t: at(t, op[:2]).update(torch=2), "torch"),
        (lambda t: at(t, op[:3]).update(bottleneck_backward=at(t, op)), "bottleneck_backward"),
        (lambda t: at(t, op).update(backend="triton"), "fastest"),
        (lambda t: at(t, op).update(backend="tpu"), "backend"),
        (lambda t: at(t, op)["ms"].update(cuda=-1.0), "ms"),
        (lambda t: at(t, op)["ms"].update(cuda=True), "ms"),
        (lambda t: at(t, op)["ms"].update(cpu=9.0), "cpu"),
        (lambda t: at(t, op)["preset_ms"].pop("p2"), "preset_ms"),
        (lambda t: at(t, op).update(presets=[]), "presets"),
        (lambda t: at(t, op).update({"pass": "backward"}), "pass"),
        (lambda t: at(t, op).update(excluded={"cuda": 3}), "excluded"),
    ]:
        bad = copy.deepcopy(table)
        mutate(bad)
        with pytest.raises(ValueError, match=field):
            _auto_choice.validate_table(bad)


def test_load_table_names_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        _auto_choice.load_table(path)


# ----------------------------------------------------------------------------------------------
# bench.choose_backends: the winner, the record, the merge
# ----------------------------------------------------------------------------------------------

def test_pick_backend_takes_the_lower_total_over_presets():
    # triton wins the first preset, cuda the total (4.0 against 3.5)
    preset_ms = {"a": {"triton": 1.0, "cuda": 2.0}, "b": {"triton": 3.0, "cuda": 1.5}}
    assert choose_backends.pick_backend(preset_ms) == ("cuda", {"triton": 4.0, "cuda": 3.5})


def test_pick_backend_breaks_a_tie_by_the_fixed_preference_and_skips_incomplete_backends():
    assert choose_backends.pick_backend({"a": {"cuda": 2.0, "triton": 2.0}})[0] == "triton", (
        "an exact tie goes to the fixed preference's first")
    partial = {"a": {"triton": 1.0, "cuda": 0.1}, "b": {"triton": 1.0}}
    assert choose_backends.pick_backend(partial) == ("triton", {"triton": 2.0}), (
        "a backend missing at one preset cannot be compared on the total")
    with pytest.raises(ValueError, match="preset_ms"):
        choose_backends.pick_backend({})
    with pytest.raises(ValueError, match="preset_ms"):
        choose_backends.pick_backend({"a": {"triton": 1.0}, "b": {"cuda": 1.0}})


def test_op_record_keeps_only_the_compared_backends():
    record = choose_backends.op_record({"a": {"triton": 1.0, "cuda": 0.1}, "b": {"triton": 1.0}},
                                       "bfloat16", "forward+backward", DATE,
                                       excluded={"cuda": "failed at b: AssertionError"})
    assert record["backend"] == "triton" and record["ms"] == {"triton": 2.0}
    assert record["preset_ms"] == {"a": {"triton": 1.0}, "b": {"triton": 1.0}}
    assert record["presets"] == ["a", "b"] and record["excluded"] == {
        "cuda": "failed at b: AssertionError"}


def test_merge_keeps_other_devices_and_replaces_this_devices_measured_ops():
    table = fake_table()
    before = copy.deepcopy(table)
    run = fake_entry({"bottleneck_forward": "triton"})
    merged, dropped = choose_backends.merge_choice(table, FAKE_GPU, run)
    assert table == before, "merge_choice modified its input"
    device = merged["devices"][FAKE_GPU]
    assert device["ops"]["bottleneck_forward"]["backend"] == "triton", "new run not merged"
    assert device["ops"]["lowrank_forward"] == before["devices"][FAKE_GPU]["ops"][
        "lowrank_forward"], "an op this run did not measure was lost on the same stack"
    assert dropped == []
    merged, _ = choose_backends.merge_choice(merged, OTHER_GPU, run)
    assert sorted(merged["devices"]) == sorted([FAKE_GPU, OTHER_GPU]), "a device was lost"
    assert merged["devices"][FAKE_GPU] == device, "adding a device changed another one"


def test_merge_drops_ops_measured_under_another_software_stack():
    run = fake_entry({"bottleneck_forward": "triton"}, torch_version="9.9")
    merged, dropped = choose_backends.merge_choice(fake_table(), FAKE_GPU, run)
    assert sorted(merged["devices"][FAKE_GPU]["ops"]) == ["bottleneck_forward"], (
        "ops measured under torch 0.0 survived a run under torch 9.9")
    assert dropped == ["bank_bottleneck_forward", "lowrank_forward", "radapter_forward"]
    assert merged["devices"][FAKE_GPU]["torch"] == "9.9", "device metadata not updated"


def test_merge_into_the_shipped_empty_table_validates():
    merged, dropped = choose_backends.merge_choice(_auto_choice.empty_table(), FAKE_GPU,
                                                   fake_entry({"fold_weights": "cuda"}))
    _auto_choice.validate_table(merged)
    assert list(merged["devices"]) == [FAKE_GPU] and dropped == []


def test_render_choice_lists_every_op_with_both_times():
    text = choose_backends.render_choice(FAKE_GPU, fake_table()["devices"][FAKE_GPU])
    assert FAKE_GPU in text and "torch 0.0" in text
    # bottleneck: cuda 1 + 3 = 4 ms, triton 2 + 4 = 6 ms, so the slower takes 1.5x
    assert "| bottleneck_forward | cuda | 6.000 | 4.000 | 1.50x | bfloat16 |" in text, text


# ----------------------------------------------------------------------------------------------
# bench.choose_backends: measuring and main, without a GPU
# ----------------------------------------------------------------------------------------------

TINY = {"bottleneck": [Preset("bottleneck", "tiny-mma", "cpu",
                              {"m": 40, "d": 16, "r": 4, "shared": True, "scale": 0.001}),
                       Preset("bottleneck", "tiny-plain", "cpu",
                              {"m": 33, "d": 24, "r": 3, "shared": False, "scale": 1.0})],
        "fold": [Preset("fold", "tiny-fold", "cpu", {"items": [(6, 5, 3)] * 2, "bias": True})]}


def test_measure_plumbing_checks_then_times_each_preset(monkeypatch):
    # the real check and timing path on the CPU with tiny presets; the timer is a stub
    testing = pytest.importorskip("triton.testing")
    timed = []

    def stub_do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        fn()
        timed.append(fn)
        return 0.5

    monkeypatch.setattr(testing, "do_bench", stub_do_bench)
    monkeypatch.setattr(report, "sweep_presets", lambda op, headline_only: TINY[op])
    entry, failed = choose_backends.measure_device(
        ("bottleneck", "fold"), "float32", backends=("reference",), log=lambda s: None,
        device="cpu", l2_bytes=0)
    assert not failed, "the reference kernels failed their float64 check"
    assert len(timed) == 3, "expected one timing per preset (2 bottleneck + 1 fold)"
    assert sorted(entry["ops"]) == ["bottleneck_forward", "fold_weights"]
    bottleneck = entry["ops"]["bottleneck_forward"]
    assert bottleneck["backend"] == "reference" and bottleneck["ms"] == {"reference": 1.0}
    assert bottleneck["pass"] == "forward+backward" and bottleneck["dtype"] == "float32"
    assert entry["ops"]["fold_weights"]["pass"] == "forward", "fold has no backward to time"
    _auto_choice.validate_table({"schema": _auto_choice.SCHEMA, "devices": {"x": entry}})


def test_measure_excludes_a_backend_that_fails_its_check(monkeypatch):
    def stub_time_case(build, preset, dtype, impl, pass_, l2_bytes, device):
        if impl == "pyadapt-triton" and preset.name == "tiny-plain":
            raise AssertionError("pyadapt-triton: dx relative error 1e-1 > 2e-2")
        return {"pyadapt-triton": 0.1, "pyadapt-reference": 1.0}[impl], 0.0

    monkeypatch.setattr(report, "time_case", stub_time_case)
    monkeypatch.setattr(report, "sweep_presets", lambda op, headline_only: TINY[op])
    entry, failed = choose_backends.measure_device(
        ("bottleneck",), "float32", backends=("triton", "reference"), log=lambda s: None,
        device="cpu", l2_bytes=0)
    record = entry["ops"]["bottleneck_forward"]
    assert failed, "a failed check must make the run fail"
    assert record["backend"] == "reference", "a backend that failed its check was chosen"
    assert set(record["ms"]) == {"reference"}, "the failed backend's times were kept"
    assert "tiny-plain" in record["excluded"]["triton"], record["excluded"]


def test_main_refuses_without_cuda_and_writes_nothing(monkeypatch, tmp_path, capsys):
    table = tmp_path / "auto_choice.json"
    shipped = _auto_choice.TABLE_PATH.read_bytes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backends.main(["--table", str(table)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "wrote a table without CUDA"
    assert _auto_choice.TABLE_PATH.read_bytes() == shipped, "the shipped table changed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would measure")
def test_module_exits_2_on_a_machine_without_cuda():
    shipped = _auto_choice.TABLE_PATH.read_bytes()
    out = subprocess.run([sys.executable, "-m", "bench.choose_backends"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert _auto_choice.TABLE_PATH.read_bytes() == shipped, "the shipped table changed"


@pytest.mark.parametrize("dry_run", [False, True])
def test_main_merges_into_the_table_or_only_prints(monkeypatch, tmp_path, capsys, dry_run):
    path = tmp_path / "auto_choice.json"
    path.write_text(json.dumps(fake_table()))
    run = fake_entry({"bottleneck_forward": "triton"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: OTHER_GPU)
    monkeypatch.setattr(choose_backends, "measure_device", lambda *a, **k: (run, False))
    argv = ["--table", str(path)] + (["--dry-run"] if dry_run else [])
    assert choose_backends.main(argv) == 0
    written = json.loads(path.read_text())
    if dry_run:
        assert written == fake_table(), "--dry-run wrote the table"
        assert "nothing written" in capsys.readouterr().out
    else:
        assert sorted(written["devices"]) == sorted([FAKE_GPU, OTHER_GPU])
        assert written["devices"][OTHER_GPU] == run, "this device's run was not recorded"
        assert written["devices"][FAKE_GPU] == fake_table()["devices"][FAKE_GPU], (
            "another device's entry changed")
