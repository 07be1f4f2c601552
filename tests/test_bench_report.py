"""The benchmark tooling's pure parts: byte/flop counting (bench.report.op_cost, checked against
torch's own FLOP counter on the eager maths), the report JSON schema, table rendering, plotting
from a synthetic report (temp dir only), the README section generator (bench.readme_table),
and the correctness gate every benchmark passes before timing (a wrong kernel must fail it).

No test here times anything or needs a GPU."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import _common, readme_table, report
from bench import bench_bottleneck, bench_lowrank, bench_radapter
from bench.presets import PRESETS, Preset

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# op_cost
# ----------------------------------------------------------------------------------------------

def _eager_flops(build, preset: Preset, with_backward: bool) -> int:
    """FLOPs torch counts for the eager maths of a workload (forward, or forward + backward)."""
    work = build(preset, torch.float32, "cpu")
    args = _common.fresh_args(work.args, work.grads)
    with FlopCounterMode(display=False) as counter:
        out = work.eager(args)
        if with_backward:
            _common.backward(out, work.grad_out)
    return counter.get_total_flops()


FLOP_CASES = [
    (bench_bottleneck.build, Preset("bottleneck", "t", "cpu",
                                    {"m": 37, "d": 24, "r": 5, "shared": True, "scale": 0.5})),
    (bench_bottleneck.build, Preset("bottleneck", "t", "cpu",
                                    {"m": 19, "d": 40, "r": 7, "shared": False, "scale": 1.0})),
    (bench_radapter.build, Preset("radapter", "t", "cpu",
                                  {"m": 30, "d_in": 24, "d_out": 16, "rank": None, "scale": 0.1,
                                   "tokens": 10, "drop_prob": 0.2})),
    (bench_radapter.build, Preset("radapter", "t", "cpu",
                                  {"m": 30, "d_in": 24, "d_out": 16, "rank": 3, "scale": 0.1,
                                   "tokens": 10, "drop_prob": 0.2})),
    (bench_lowrank.build, Preset("lowrank", "t", "cpu",
                                 {"m": 21, "d_in": 24, "d_out": 32, "rank": 4, "alpha": 8.0,
                                  "sites": 2})),
]


@pytest.mark.parametrize("build,preset", FLOP_CASES,
                         ids=["mma", "bottleneck", "radapter-full", "radapter-lowrank", "lora"])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_op_cost_flops_equal_torch_flop_counter_on_the_eager_maths(build, preset, pass_):
    counted = report.op_cost(preset.op, preset.dims, "float32", pass_)["flops"]
    assert counted == _eager_flops(build, preset, pass_ == "forward+backward"), (
        f"op_cost flops of {preset.op} {pass_} differ from FlopCounterMode on the eager maths")


def test_op_cost_core_adds_only_the_tucker_contraction_to_the_counter():
    # Aurora's K_k = C x_3 lambda_k (2 R^3 per site and pass direction) is parameter-side work
    # that op_cost leaves out on purpose; everything else must match the counter.
    dims = {"m": 9, "d_in": 16, "d_out": 16, "rank": 3, "sites": 2, "core": True}
    preset = Preset("lowrank", "t", "cpu", dims)
    r, sites = dims["rank"], dims["sites"]
    fwd = report.op_cost("lowrank", dims, "float32", "forward")["flops"]
    assert fwd + sites * 2 * r ** 3 == _eager_flops(bench_lowrank.build, preset, False)
    both = report.op_cost("lowrank", dims, "float32", "forward+backward")["flops"]
    # backward of the contraction: d C (2 R^3) and d lambda (2 R^3) per site
    assert both + sites * 6 * r ** 3 == _eager_flops(bench_lowrank.build, preset, True)


def test_op_cost_bytes_by_hand():
    m, d, r = 10, 8, 2
    dims = {"m": m, "d": d, "r": r, "shared": False}
    weights = 2 * d * r + r + d
    assert report.op_cost("bottleneck", dims, "bfloat16", "forward")["bytes"] == \
        2 * (2 * m * d + weights)
    assert report.op_cost("bottleneck", dims, "float32", "forward+backward")["bytes"] == \
        4 * (2 * m * d + weights) + 4 * (3 * m * d + 2 * weights)
    fold = {"items": [(4, 6, 3)], "bias": True}
    cost = report.op_cost("fold", fold, "float16", "forward")
    assert cost["bytes"] == 2 * ((2 * 4 * 6 + 4 * 3 + 3 * 6) + (2 * 4 * 1 + 4 * 3 + 3 * 1))
    assert cost["flops"] == 2 * 4 * 3 * 6 + 2 * 4 * 3 * 1
    loss = report.op_cost("mpm_nce", {"n": 5, "dim": 7}, "float32", "forward+backward")
    assert loss == {"bytes": 4 * 2 * 5 * 7 + 25 + 4 * 4 * 5 * 7 + 25,
                    "flops": 2 * 25 * 7 + 4 * 25 * 7}


def test_op_cost_covers_every_preset_and_rejects_bad_arguments():
    for p in PRESETS:
        for pass_ in (("forward",) if p.op == "fold" else _common.PASSES):
            cost = report.op_cost(p.op, p.dims, "bfloat16", pass_)
            assert cost["bytes"] > 0 and cost["flops"] > 0, f"{p.op}/{p.name}: empty cost"
    with pytest.raises(ValueError, match="op"):
        report.op_cost("conv", {}, "float32", "forward")
    with pytest.raises(ValueError, match="pass_"):
        report.op_cost("bottleneck", {"m": 1, "d": 1, "r": 1}, "float32", "backward")
    with pytest.raises(ValueError, match="fold"):
        report.op_cost("fold", {"items": [(1, 1, 1)]}, "float32", "forward+backward")


# ----------------------------------------------------------------------------------------------
# synthetic report: schema, derived numbers, table, plot
# ----------------------------------------------------------------------------------------------

def synthetic_report() -> dict:
    """A report with made-up numbers, flagged synthetic everywhere it is shown."""
    ceilings = {"copy_GBps": 1000.0, "bf16_matmul_TFLOPs": 100.0, "l2_bytes": 1 << 20}
    results = []
    for m in (1024, 4096):
        dims = {"m": m, "d": 64, "r": 8, "shared": True}
        for impl, ms in (("eager", 2.0), ("torch.compile", 1.5), ("pyadapt-triton", 0.5)):
            cost = report.op_cost("bottleneck", dims, "bfloat16", "forward")
            name = "syn" if m == 4096 else "syn@M1024"
            results.append({"op": "bottleneck", "preset": name, "source": "synthetic",
                            "dims": dims, "x": m, "x_label": "M (rows)", "dtype": "bfloat16",
                            "pass": "forward", "impl": impl, "ms": ms * m / 4096, **cost,
                            **report.derived(ms * m / 4096, cost, ceilings),
                            "max_rel_err": 1e-3})
    report.add_speedups(results)
    return {"schema": report.SCHEMA, "synthetic": True, "device": "SYNTHETIC GPU",
            "date": "2000-01-01", "datetime": "2000-01-01T00:00:00+00:00", "torch": "0.0",
            "triton": "0.0", "cuda": "0.0", "pyadapt": "0.0", "git_commit": None,
            "ceilings": ceilings, "results": results}


def test_derived_rates_and_speedups():
    cost = {"bytes": 2_000_000_000, "flops": 10 ** 12}
    d = report.derived(10.0, cost, {"copy_GBps": 1000.0, "bf16_matmul_TFLOPs": 200.0})
    assert d["GBps"] == pytest.approx(200.0)
    assert d["TFLOPs"] == pytest.approx(100.0)
    # bound = max(2 ms memory, 5 ms compute) = 5 ms of the 10 ms measured
    assert d["roofline_fraction"] == pytest.approx(0.5)
    rep = synthetic_report()
    triton = [r for r in rep["results"] if r["impl"] == "pyadapt-triton"]
    assert all(r["speedup_vs_eager"] == pytest.approx(4.0) for r in triton)
    assert all(r["speedup_vs_compile"] == pytest.approx(3.0) for r in triton)
    lonely = [{"op": "x", "preset": "p", "dtype": "d", "pass": "forward", "impl": "pyadapt-cuda",
               "ms": 1.0}]
    report.add_speedups(lonely)
    assert lonely[0]["speedup_vs_eager"] is None and lonely[0]["speedup_vs_compile"] is None


def test_validate_report_accepts_a_complete_report_and_names_bad_fields():
    rep = synthetic_report()
    report.validate_report(rep)
    json.loads(json.dumps(rep))  # JSON-serialisable as written
    for mutate, field in [
        (lambda r: r.pop("device"), "device"),
        (lambda r: r.update(schema="other/1"), "schema"),
        (lambda r: r["ceilings"].update(copy_GBps=0), "copy_GBps"),
        (lambda r: r["results"][0].pop("ms"), "ms"),
        (lambda r: r["results"][1].update(ms=-1.0), "ms"),
        (lambda r: r["results"][2].update(impl=3), "impl"),
        (lambda r: r.update(synthetic="yes"), "synthetic"),
    ]:
        bad = copy.deepcopy(rep)
        mutate(bad)
        with pytest.raises(ValueError, match=field):
            report.validate_report(bad)


def test_render_table_lists_every_result_and_marks_synthetic_data():
    rep = synthetic_report()
    table = report.render_table(rep)
    assert "SYNTHETIC DATA" in table
    assert "SYNTHETIC GPU, 2000-01-01, torch 0.0, triton 0.0" in table
    assert table.count("| syn") == len(rep["results"])
    assert "| 4.00x | 3.00x |" in table
    headline = report.render_table(rep, headline_only=True)
    assert "@M1024" not in headline and headline.count("| syn |") == 3


def test_plot_from_synthetic_report_goes_to_the_temp_dir(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs the [bench] extra's matplotlib")
    rep = synthetic_report()
    json_path, png_path = report.output_paths(rep, tmp_path)
    # only bottleneck was "measured": the file name says so (a day's per-op files get merged)
    assert json_path.name == "SYNTHETIC-synthetic-gpu-2000-01-01-bottleneck.json"
    assert png_path.parent == tmp_path
    out = report.plot_speedups(rep, png_path)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_device_slug():
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.device_slug("???") == "device"


def test_report_refuses_without_cuda_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert report.main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_plumbing_with_a_stub_timer(monkeypatch, tmp_path):
    # run_report end to end on the CPU with tiny presets: the timer and the ceilings are stubs
    # (nothing is timed); every implementation still passes the float64 gate first.
    testing = pytest.importorskip("triton.testing")
    timed = []

    def stub_do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        fn()
        fn()  # twice: the rotation over input copies wraps around
        timed.append(fn)
        return 1.0

    tiny = {"bottleneck": [SMALL_MMA],
            "fold": [Preset("fold", "tiny-fold", "cpu", {"items": [(6, 5, 3)] * 2,
                                                         "bias": True})]}
    monkeypatch.setattr(testing, "do_bench", stub_do_bench)
    monkeypatch.setattr(report, "measure_ceilings", lambda: {
        "copy_GBps": 100.0, "bf16_matmul_TFLOPs": 10.0, "l2_bytes": 1 << 16})
    monkeypatch.setattr(report, "sweep_presets", lambda op, headline_only: tiny[op])
    rep = report.run_report(("bottleneck", "fold"), dtypes=["float32"],
                            only_impls=["eager", "pyadapt-reference"], log=lambda s: None,
                            device="cpu")
    report.validate_report(rep)
    # bottleneck: 2 passes x 2 impls; fold: forward only x 2 impls
    assert len(rep["results"]) == len(timed) == 6
    assert {(r["op"], r["pass"], r["impl"]) for r in rep["results"]} == {
        ("bottleneck", "forward", "eager"), ("bottleneck", "forward+backward", "eager"),
        ("bottleneck", "forward", "pyadapt-reference"),
        ("bottleneck", "forward+backward", "pyadapt-reference"),
        ("fold", "forward", "eager"), ("fold", "forward", "pyadapt-reference")}
    assert all(r["speedup_vs_eager"] == 1.0 and r["speedup_vs_compile"] is None
               for r in rep["results"])
    assert all(r["max_rel_err"] < 1e-5 for r in rep["results"])
    rep["synthetic"] = True  # stub numbers: never mistaken for a measurement
    json_path, png_path = report.output_paths(rep, tmp_path)
    json_path.write_text(json.dumps(rep))
    assert readme_table.load_results(tmp_path)[0] is None


def test_report_main_writes_json_and_plot(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plotting needs the [bench] extra's matplotlib")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(report, "run_report", lambda *a, **k: synthetic_report())
    assert report.main(["--out-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["SYNTHETIC-synthetic-gpu-2000-01-01-bottleneck.json",
                     "SYNTHETIC-synthetic-gpu-2000-01-01-bottleneck.png"]
    report.validate_report(json.loads((tmp_path / names[0]).read_text()))
    assert "SYNTHETIC DATA" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# README section
# ----------------------------------------------------------------------------------------------

def _pytest_benchmark_json(when: str, medians: dict) -> dict:
    """A minimal pytest-benchmark file: {(impl, pass): median seconds} of one bottleneck preset."""
    benches = []
    for (impl, pass_), median in medians.items():
        benches.append({
            "name": f"test_bottleneck[p-float32-{impl}-{pass_}]",
            "fullname": f"bench/bench_bottleneck.py::test_bottleneck[p-{impl}-{pass_}]",
            "params": {}, "stats": {"median": median},
            "extra_info": {"op": "bottleneck", "preset": "p", "device": "cpu",
                           "dtype": "float32", "impl": impl, "pass": pass_}})
    return {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2},
                             "pyadapt": {"torch": "9.9", "torch_threads": 2}},
            "commit_info": {}, "benchmarks": benches, "datetime": when, "version": "5"}


def test_readme_section_without_gpu_results_says_not_measured(tmp_path):
    old = _pytest_benchmark_json("2026-01-01T00:00:00", {("eager", "forward"): 0.010,
                                                          ("pyadapt-cpu", "forward"): 0.008,
                                                          ("pyadapt-gone", "forward"): 0.001})
    new = _pytest_benchmark_json("2026-02-01T00:00:00", {("eager", "forward"): 0.010,
                                                          ("torch.compile", "forward"): 0.004,
                                                          ("pyadapt-cpu", "forward"): 0.005})
    (tmp_path / "a-old.json").write_text(json.dumps(old))
    (tmp_path / "b-new.json").write_text(json.dumps(new))
    # a synthetic GPU report is never taken for a measurement
    (tmp_path / "SYNTHETIC-x.json").write_text(json.dumps(synthetic_report()))
    section = readme_table.render_section(tmp_path)
    assert readme_table.GPU_NOT_MEASURED in section
    assert "**CPU**" in section and "Test CPU, 2 cores" in section and "torch 9.9" in section
    # the newer file supersedes the older for this op: 10 / 5 = 2x vs eager, 4 / 5 = 0.8x vs
    # compile, and nothing of the older file remains
    assert "gone" not in section and "a-old.json" not in section
    assert "| bottleneck | p | float32 | forward | 10.00 | 4.00 | cpu | 5.00 | 2.00x | 0.80x |" \
        in section


def test_readme_section_shows_the_newest_gpu_report_with_versions(tmp_path):
    older = synthetic_report()
    newer = synthetic_report()
    for rep, date in ((older, "2001-01-01"), (newer, "2002-02-02")):
        # flagged real only so that the picker takes it; the numbers are made up
        rep.update(synthetic=False, device="TEST DEVICE (made-up numbers)", date=date,
                   datetime=f"{date}T00:00:00+00:00", torch="7.7", triton="8.8", cuda="9.9")
        (tmp_path / f"test-{date}.json").write_text(json.dumps(rep))
    section = readme_table.render_section(tmp_path)
    assert readme_table.GPU_NOT_MEASURED not in section
    assert "TEST DEVICE (made-up numbers), 2002-02-02, torch 7.7, triton 8.8, CUDA 9.9" in section
    assert "2001-01-01" not in section
    assert "CPU: no pytest-benchmark results committed." in section


def test_readme_merges_the_reports_of_one_device_and_day(tmp_path):
    first, second = synthetic_report(), synthetic_report()
    second["results"] = [dict(r, op="radapter") for r in second["results"]]
    for i, rep in enumerate((first, second)):
        rep.update(synthetic=False, device="TEST DEVICE (made-up numbers)",
                   datetime=f"2000-01-01T0{i}:00:00+00:00")
        (tmp_path / f"test-{i}.json").write_text(json.dumps(rep))
    merged = readme_table.load_results(tmp_path)[0]
    assert sorted({r["op"] for r in merged["results"]}) == ["bottleneck", "radapter"]
    assert len(merged["results"]) == len(first["results"]) + len(second["results"])
    section = readme_table.render_section(tmp_path)
    assert "**bottleneck**" in section and "**radapter**" in section


def test_replace_section_keeps_the_rest_of_the_readme():
    readme = f"# T\nintro\n{readme_table.BEGIN}\nold stuff\n{readme_table.END}\ntail\n"
    once = readme_table.replace_section(readme, "new\n")
    assert once == f"# T\nintro\n{readme_table.BEGIN}\nnew\n{readme_table.END}\ntail\n"
    assert readme_table.replace_section(once, "new\n") == once
    with pytest.raises(ValueError, match="markers"):
        readme_table.replace_section("# no markers\n", "x")


def test_committed_cpu_results_parse():
    gpu, runs = readme_table.load_results(report.RESULTS_DIR)
    rows, _ = readme_table.latest_cpu_rows(runs)
    assert rows, "bench/results holds at least the first CPU bottleneck run"
    assert all(r["median"] > 0 and r["op"] and r["impl"] for r in rows)
    assert gpu is None or not gpu["synthetic"]


# ----------------------------------------------------------------------------------------------
# the correctness gate before timing
# ----------------------------------------------------------------------------------------------

SMALL_MMA = Preset("bottleneck", "small", "cpu",
                   {"m": 50, "d": 24, "r": 4, "shared": True, "scale": 0.001})


def test_gate_passes_the_real_implementations():
    work = bench_bottleneck.build(SMALL_MMA, torch.float32, "cpu")
    for impl in ("eager", "pyadapt-reference"):
        errors = _common.check(work, _common.runner(work, impl), impl)
        assert max(errors.values()) < 1e-5, f"{impl}: {errors}"
        assert {"out[0]", "dx[0]", "ddown_weight[0]", "dshared_weight[0]"} <= set(errors)


@pytest.mark.parametrize("wrong", ["forward", "backward"])
def test_gate_fails_a_wrong_kernel(wrong):
    work = bench_bottleneck.build(SMALL_MMA, torch.float32, "cpu")
    real = work.fused

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong_fused(a):
        y = real(a)
        if wrong == "forward":
            # an adapter branch 2% off: invisible at MMA's scale 0.001 unless the gate
            # checks with scale 1
            delta = y - a["x"]
            return a["x"] + 1.02 * delta
        return WrongGrad.apply(y)

    work.fused = wrong_fused
    with pytest.raises(AssertionError, match="relative error"):
        _common.check(work, _common.runner(work, "pyadapt-reference"), "pyadapt-reference")


def test_pytest_collects_every_bench_file():
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("bottleneck", "radapter", "lowrank", "fold", "mpm_nce", "e2e"):
        assert f"bench/bench_{name}.py::" in out.stdout, f"bench_{name}.py not collected"
