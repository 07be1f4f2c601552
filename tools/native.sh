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
exec flock /tmp/pyadapt-native.lock env MAX_JOBS="${MAX_JOBS:-2}" \
  $PY -m pip install -q --no-build-isolation --no-deps -e .
