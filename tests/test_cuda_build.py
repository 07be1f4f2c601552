"""The CUDA backend's build and registration, checked on any machine (no GPU needed).

When CMake configured the CUDA module (PYADAPT_BUILD_CUDA in the build's CMake cache, which
setup.py writes under build/cmake-<SOABI>), pyadapt._C_cuda must import even without a GPU, register
every op of torch.ops.pyadapt_cuda with its schema, and the `cuda` backend must appear in the
kernel table. When it was not configured (PYADAPT_CUDA=OFF, a CPU-only torch, no nvcc, or a pure
Python install), the documented fallback must hold instead: the module is absent, `error` says
why, and no op lists a `cuda` kernel. Either way, the glue runs the reference for CPU tensors.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

import pyadapt
from pyadapt import reference
from pyadapt.ops import _cuda_backend, _native_cuda, available_backends, kernel_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", "cmake-" + sysconfig.get_config_var("SOABI"), "CMakeCache.txt")

SCHEMAS = {
    "bottleneck_forward": "pyadapt_cuda::bottleneck_forward(Tensor x, Tensor? residual, Tensor "
    "down_weight, Tensor? down_bias, Tensor? shared_weight, Tensor? shared_bias, Tensor up_weight, "
    "Tensor? up_bias, Tensor? scale, float scale_value, Tensor? row_scale, Tensor? seed, str "
    "activation, float dropout_p) -> Tensor",
    "bottleneck_backward": "pyadapt_cuda::bottleneck_backward(Tensor grad_y, Tensor x, bool "
    "has_residual, Tensor down_weight, Tensor? down_bias, Tensor? shared_weight, Tensor? "
    "shared_bias, Tensor up_weight, Tensor? up_bias, Tensor? scale, float scale_value, Tensor? "
    "row_scale, Tensor? seed, str activation, float dropout_p, bool grad_scale_invariant, bool[] "
    "needs) -> Tensor[]",
    "lowrank_forward": "pyadapt_cuda::lowrank_forward(Tensor x, Tensor weight, Tensor? bias, "
    "Tensor down, Tensor? core, Tensor up, float scale, Tensor? seed, float dropout_p, bool "
    "dropout_after_core) -> Tensor",
    "lowrank_backward": "pyadapt_cuda::lowrank_backward(Tensor grad_y, Tensor x, Tensor weight, "
    "Tensor? bias, Tensor down, Tensor? core, Tensor up, float scale, Tensor? seed, float "
    "dropout_p, bool dropout_after_core, bool[] needs) -> Tensor[]",
    "radapter_forward": "pyadapt_cuda::radapter_forward(Tensor x, Tensor base_weight, Tensor? "
    "base_bias, Tensor? full_weight, Tensor? down_weight, Tensor? up_weight, Tensor? scale, float "
    "scale_value, Tensor? row_scale) -> Tensor",
    "radapter_backward": "pyadapt_cuda::radapter_backward(Tensor grad_y, Tensor x, Tensor "
    "base_weight, Tensor? base_bias, Tensor? full_weight, Tensor? down_weight, Tensor? up_weight, "
    "Tensor? scale, float scale_value, Tensor? row_scale, bool[] needs) -> Tensor[]",
    "fold_weights": "pyadapt_cuda::fold_weights(Tensor[] weights, Tensor[] lefts, Tensor[] rights, "
    "Tensor scales) -> Tensor[]",
}


def _cache_entries() -> dict:
    """NAME -> value of the build's CMake cache ({} for a pure-Python install)."""
    entries = {}
    if os.path.isfile(CACHE):
        with open(CACHE) as cache:
            for line in cache:
                if "=" in line and ":" in line.split("=", 1)[0] and not line.startswith("#"):
                    key, value = line.rstrip("\n").split("=", 1)
                    entries[key.split(":", 1)[0]] = value
    return entries


def _configured_with_cuda() -> bool:
    return _cache_entries().get("PYADAPT_BUILD_CUDA", "OFF").upper() in ("ON", "1", "TRUE")


def _nvcc():
    """The CUDA compiler CMake used, else the one on PATH (None: no CUDA compiler here)."""
    configured = _cache_entries().get("CMAKE_CUDA_COMPILER", "")
    if _configured_with_cuda() and os.path.isfile(configured):
        return configured
    return shutil.which("nvcc")


def test_cuda_module_matches_the_build_configuration():
    built_files = glob.glob(os.path.join(os.path.dirname(pyadapt.__file__), "_C_cuda*"))
    if _configured_with_cuda():
        assert _native_cuda.available, f"configured with CUDA but: {_native_cuda.error}"
        assert _native_cuda.error is None
        assert built_files, "configured with CUDA but no pyadapt/_C_cuda* was installed"
        for name, schema in SCHEMAS.items():
            assert str(getattr(torch.ops.pyadapt_cuda, name).default._schema) == schema
        table = kernel_table()
        for op in SCHEMAS:
            assert "cuda" in table[op], f"{op}: no cuda kernel registered ({table[op]})"
        # Selectable only with a GPU (CI compiles the module but has none).
        assert ("cuda" in available_backends()) == torch.cuda.is_available()
    else:
        # The documented fallback: no module, a reason, no cuda kernels, CPU backends unharmed.
        # Only three reasons are legitimate: CUDA not asked for, a CPU-only torch, no nvcc.
        entries = _cache_entries()
        requested = entries.get("PYADAPT_CUDA_REQUESTED", entries.get("PYADAPT_CUDA", "OFF"))
        requested = requested.upper()
        assert requested != "ON", ("PYADAPT_CUDA=ON was requested but the CUDA module was not "
                                   "configured: see the CMake error in the install log")
        assert requested == "OFF" or torch.version.cuda is None or shutil.which("nvcc") is None, (
            f"PYADAPT_CUDA={requested}, torch CUDA {torch.version.cuda} and nvcc at "
            f"{shutil.which('nvcc')}, yet CMake did not configure the CUDA module")
        assert not built_files, f"stale CUDA module left installed: {built_files}"
        assert not _native_cuda.available
        assert _native_cuda.error
        table = kernel_table()
        assert all("cuda" not in table[op] for op in SCHEMAS), table
        assert "cuda" not in available_backends()
        assert "reference" in available_backends()


def test_cuda_glue_runs_the_reference_for_cpu_tensors():
    """CPU tensors never reach the CUDA kernels, whether or not the module loaded."""
    x = torch.randn(5, 12, dtype=torch.float64)
    wd, wu = torch.randn(3, 12, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
    y = _cuda_backend.bottleneck_forward(x, None, wd, None, None, None, wu, None, None, 0.5, None,
                                         None, "gelu", 0.0)
    expected = reference.bottleneck_forward(x, wd, None, wu, None, scale=0.5,
                                            activation_name="gelu")
    assert torch.equal(y, expected)
    w, left, right = (torch.randn(6, 4), torch.randn(6, 2), torch.randn(2, 4))
    scales = torch.tensor([0.25], dtype=torch.float64)
    out = _cuda_backend.fold_weights([w], [left], [right], scales)
    assert torch.equal(out[0], reference.fold_weight(w, left, right,
                                                     torch.tensor(0.25, dtype=torch.float64)))


def test_cuda_backend_covers_every_op_of_the_triton_backend():
    """The glue implements each op that the Triton backend does (same op set, file for file)."""
    assert set(_cuda_backend.KERNELS) == set(SCHEMAS) == set(_native_cuda.OPS)


def test_device_helpers_match_the_reference(tmp_path):
    """The Philox dropout stream and the activations the kernels use (csrc/cuda/common.cuh),
    compiled for the host by nvcc, against pyadapt.reference: dropout bits must be identical
    (the kernels regenerate the reference's mask), activations and derivatives within rounding.
    Needs nvcc only; where there is none the CUDA module cannot be built either."""
    nvcc = _nvcc()
    if nvcc is None:
        assert not _configured_with_cuda()
        pytest.skip("no nvcc on this machine: the CUDA module is not built here either")
    exe = tmp_path / "host_check"
    subprocess.run([nvcc, "-std=c++17", "-O2", "-o", str(exe),
                    os.path.join(ROOT, "csrc", "cuda", "check", "host_check.cu")], check=True)
    gen = torch.Generator().manual_seed(5)
    seeds = torch.randint(0, reference.SEED_LIMIT, (64,), generator=gen).tolist() + [0, 2**31 - 1]
    offsets = torch.randint(0, 2**40, (len(seeds),), generator=gen).tolist()
    offsets[:4] = [0, 1, 2**32 - 1, 2**32]  # both counter words
    activations = ("relu", "gelu", "quick_gelu", "silu", "identity")
    hs = torch.linspace(-6.0, 6.0, 37, dtype=torch.float64).tolist() + [0.0, 1e-3, -1e-3]
    lines = [f"philox {s} {o}" for s, o in zip(seeds, offsets)]
    lines += [f"keep {s} {o} {p}" for s, o in zip(seeds, offsets) for p in (0.1, 0.5)]
    lines += [f"act {a} {h!r}" for a in activations for h in hs]
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True).stdout.split("\n")
    n = len(seeds)
    bits = torch.tensor([int(v) for v in out[:n]], dtype=torch.int64)
    for i, (s, o) in enumerate(zip(seeds, offsets)):
        expected = reference.philox_uniform(s, torch.tensor([o], dtype=torch.int64))
        assert bits[i].item() == expected.view(torch.int32).item() & 0xFFFFFFFF, (s, o)
    keeps = [float(v) for v in out[n:3 * n]]
    for i, ((s, o), p) in enumerate((so, p) for so in zip(seeds, offsets) for p in (0.1, 0.5)):
        u = reference.philox_uniform(s, torch.tensor([o], dtype=torch.int64))
        want = (1.0 / (1.0 - p)) if u.item() >= torch.tensor(p, dtype=torch.float32).item() else 0.0
        assert keeps[i] == want, (s, o, p)
    act_lines = out[3 * n:3 * n + len(activations) * len(hs)]
    rows = [list(map(float, line.split())) for line in act_lines]
    for k, (a, h) in enumerate((a, h) for a in activations for h in hs):
        f64, d64, f32, d32 = rows[k]
        t = torch.tensor(h, dtype=torch.float64)
        ref_f, ref_d = reference.activation(t, a).item(), reference.activation_grad(t, a).item()
        assert f64 == pytest.approx(ref_f, rel=1e-13, abs=1e-15), (a, h)
        assert d64 == pytest.approx(ref_d, rel=1e-13, abs=1e-15), (a, h)
        assert f32 == pytest.approx(ref_f, rel=1e-6, abs=1e-7), (a, h)
        assert d32 == pytest.approx(ref_d, rel=1e-6, abs=1e-7), (a, h)


FUSED_KERNELS = ("bottleneck_fused_forward_kernel", "bottleneck_fused_backward_kernel")


def _cuobjdump():
    """cuobjdump beside the CUDA compiler, on PATH, or the copy triton ships (None: none)."""
    candidates = []
    nvcc = _nvcc()
    if nvcc is not None:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        candidates.append(os.path.join(triton.submodule_search_locations[0], "backends", "nvidia",
                                       "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _sass_functions(sass: str) -> dict:
    """Mangled function name -> its SASS, from `cuobjdump -sass` output."""
    functions = {}
    for block in sass.split("Function : ")[1:]:
        name, _, body = block.partition("\n")
        functions[name.strip()] = body
    return functions


def test_fused_bottleneck_kernels_use_tensor_cores():
    """Every instance of the fused bottleneck kernels (csrc/cuda/bottleneck_fused.cu) in the built
    module computes on tensor cores: its SASS has HMMA instructions, for each configured
    architecture from sm_80 on (sm_90 in CI; the kernels need sm_80's bf16 MMA and cp.async)."""
    if not _configured_with_cuda():
        pytest.skip("the CUDA module is not configured here (see "
                    "test_cuda_module_matches_the_build_configuration)")
    tool = _cuobjdump()
    assert tool is not None, ("no cuobjdump beside nvcc, on PATH or in triton's CUDA tools: "
                              "cannot read the module's SASS")
    built = glob.glob(os.path.join(os.path.dirname(pyadapt.__file__), "_C_cuda*"))
    assert len(built) == 1, built
    archs = []
    for entry in _cache_entries().get("PYADAPT_CUDA_ARCHS", "").split(";"):
        match = re.match(r"\d+", entry.strip())
        if match and int(match.group()) >= 80:
            archs.append(match.group())
    if not archs:
        pytest.skip("no architecture from sm_80 on is configured: the fused kernels are not used")
    for arch in archs:
        sass = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", built[0]],
                              capture_output=True, text=True, check=True).stdout
        functions = _sass_functions(sass)
        for kernel in FUSED_KERNELS:
            instances = {name: body for name, body in functions.items() if kernel in name}
            # bfloat16 and float16, r padded to 32, 64 and 128
            assert len(instances) == 6, f"sm_{arch}: {kernel} instances {sorted(instances)}"
            for name, body in instances.items():
                assert "HMMA" in body, f"sm_{arch}: no tensor-core instruction in {name}"


def test_fused_switch_reads_the_environment(monkeypatch):
    """PYADAPT_CUDA_FUSED=0 turns the fused bottleneck kernels off; unset or 1, on. The module
    reads it once; the fused_from_env op re-reads it (no GPU needed)."""
    if not _configured_with_cuda():
        pytest.skip("the CUDA module is not configured here")
    assert _native_cuda.available, _native_cuda.error
    fused_from_env = _native_cuda.ops().fused_from_env
    try:
        monkeypatch.setenv("PYADAPT_CUDA_FUSED", "0")
        assert fused_from_env() is False
        monkeypatch.setenv("PYADAPT_CUDA_FUSED", "1")
        assert fused_from_env() is True
        monkeypatch.delenv("PYADAPT_CUDA_FUSED")
        assert fused_from_env() is True
    finally:
        monkeypatch.undo()
        fused_from_env()
