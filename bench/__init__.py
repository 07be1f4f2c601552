"""Benchmarks of pyadapt: pytest-benchmark suites (`pytest bench --benchmark-only`), the GPU
roofline report (`python -m bench.report`), the measured backend choice of `auto`
(`python -m bench.choose_backends`) and the README results table (`python -m
bench.readme_table`)."""
