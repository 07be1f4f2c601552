# Two commands, each self-contained on a fresh machine (Python 3.11, no torch):
#   make demo   builds adapters, runs forward + backward on every available backend
#   make test   runs the test suite
# Both install into ./.venv first. torch 2.14.1 + torchvision 0.29.1 are the pinned pair that
# installs from this machine's local wheel cache and keeps open_clip and CUDA builds working.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1 "numpy<2.4"

.PHONY: demo test install clean

# The second install also builds the native extension pyadapt._C (csrc/, CMake + ninja, ~30 s on
# 2 cores); without cmake or a compiler it installs pure Python and tests/test_bottleneck_cpu.py
# fails, saying why (PYADAPT_ALLOW_NO_NATIVE=1 skips it instead).
$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt \
		$(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test,bench,clip]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info pyadapt/_C*.so
