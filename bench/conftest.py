"""pytest configuration of the benchmark suites.

`pytest bench` collects bench_*.py (pytest's default pattern only knows test_*.py), records the
versions that make a result reproducible in the JSON's machine_info, and uses torch's own
thread count (the test suite pins one thread; a benchmark should use the machine)."""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; collect them only once.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    import pyadapt

    info = pyadapt.build_info()
    machine_info["pyadapt"] = {
        "version": info["pyadapt"], "torch": info["torch"], "triton": info["triton"],
        "backends": info["backends"], "native_extension": info["native_extension"],
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
