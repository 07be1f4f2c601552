#!/usr/bin/env bash
# Rebuild the native extension in place (incremental CMake + ninja in build/), serialised by a
# lock so parallel shells never run two builds of the same tree. Usage:
#   tools/native.sh            rebuild and copy pyadapt/_C*.so (and _C_cuda*.so when built)
#   tools/native.sh check F    syntax-check one C++ file with the extension's flags (no build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${1:-}" == "check" ]]; then
  tdir=$($PY -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  abi=$($PY -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
  exec g++ -x c++ -std=c++20 -fsyntax-only -O3 -fopenmp -march=native -Wall -Wno-unused-variable \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -isystem "$tdir/include" \
    -isystem "$tdir/include/torch/csrc/api/include" -Icsrc/cpu "$2"
fi
flock /tmp/pyadapt-native.lock env MAX_JOBS="${MAX_JOBS:-2}" \
  $PY -m pip install -q --no-build-isolation --no-deps -e .
# setup.py never fails an install (a failed native build installs pure Python, and pip -q hides
# the warning), and a module left from an earlier build would hide the failure: here, where the
# build is the point, a module older than its sources is an error.
stale() { [[ -n "$(find "${@:2}" -newer "$1" -print -quit)" ]]; }
for so in pyadapt/_C.*.so; do
  if [[ ! -e "$so" ]] || stale "$so" csrc/cpu csrc/module.cpp CMakeLists.txt; then
    echo "tools/native.sh: the CPU module was not rebuilt; see: $PY -m pip install -v --no-build-isolation --no-deps -e ." >&2
    exit 1
  fi
done
for so in pyadapt/_C_cuda.*.so; do
  if [[ -e "$so" ]] && stale "$so" csrc/cuda; then
    echo "tools/native.sh: the CUDA module ($so) is older than csrc/cuda: its build failed or was skipped" >&2
    exit 1
  fi
done
