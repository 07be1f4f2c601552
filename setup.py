"""Build script.

Builds the native extension `pyadapt._C` (csrc/, through CMakeLists.txt with CMake + ninja) when
torch, CMake and a C++ compiler are present; install with `pip install --no-build-isolation -e .`
after torch so the extension compiles against the torch that will import it. If anything is
missing or the build fails, the install still succeeds as pure Python (a warning says why) and
pyadapt runs on its reference (and Triton) backends. Set PYADAPT_NO_NATIVE=1 to skip the build;
MAX_JOBS limits parallel compile jobs; PYADAPT_CPU_ARCH is the -march target of the CPU kernels
(default native, the CPU of the building machine; x86-64-v3 gives a portable AVX2 build).
Triton kernels (kernels/) ship as `pyadapt.kernels`, never
as a top-level `kernels` module.

CUDA kernels (csrc/cuda) build into a separate module, `pyadapt._C_cuda`, so a CUDA failure never
costs the CPU module. PYADAPT_CUDA=AUTO builds them when torch has CUDA and nvcc is found, ON
insists (a loud warning when impossible or failed; the CPU module still installs), OFF skips them
(and removes a stale pyadapt/_C_cuda*). PYADAPT_CUDA_ARCHS picks the GPU architectures (CMake
syntax, default "80;90"); CUDA_HOME (or CUDACXX) points at the CUDA toolkit, else
/usr/local/cuda, else nvcc on PATH.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

packages = ["pyadapt", "pyadapt.ops", "pyadapt.integrations"]
package_dir = {"pyadapt": "pyadapt"}
if os.path.isfile(os.path.join(HERE, "kernels", "__init__.py")):
    packages.append("pyadapt.kernels")
    package_dir["pyadapt.kernels"] = "kernels"


# Default of PYADAPT_CUDA when the environment does not set it.
CUDA_DEFAULT = "AUTO"


def _warn(msg: str, consequence: str = "Installing pure Python: the native `cpu` backend "
          "(pyadapt._C) will be unavailable.") -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING pyadapt: {msg}\n  {consequence}\n{bar}\n", file=sys.stderr,
          flush=True)


def _cuda_mode() -> str:
    mode = os.environ.get("PYADAPT_CUDA", CUDA_DEFAULT).strip().upper()
    aliases = {"1": "ON", "TRUE": "ON", "YES": "ON", "0": "OFF", "FALSE": "OFF", "NO": "OFF"}
    mode = aliases.get(mode, mode)
    if mode not in ("AUTO", "ON", "OFF"):
        _warn(f"PYADAPT_CUDA={mode!r} is not AUTO, ON or OFF", "Building without CUDA kernels.")
        return "OFF"
    return mode


def _cuda_args(mode: str) -> list:
    """CMake arguments of the CUDA part: mode, architectures and, if known, the toolkit."""
    args = [f"-DPYADAPT_CUDA={mode}",
            f"-DPYADAPT_CUDA_ARCHS={os.environ.get('PYADAPT_CUDA_ARCHS', '80;90')}",
            # What was asked for, kept in the cache even when ON fell back to OFF, so that
            # tests/test_cuda_build.py can tell a requested-but-failed CUDA build from a skipped
            # one.
            f"-DPYADAPT_CUDA_REQUESTED={_cuda_mode()}"]
    if mode == "OFF":
        return args
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    default_home = "/usr/local/cuda"
    if (not cuda_home and not os.environ.get("CUDACXX")
            and os.path.isfile(os.path.join(default_home, "bin", "nvcc"))):
        cuda_home = default_home
    if cuda_home:
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.isfile(nvcc):
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_home}"]
    return args


def _cache_flag(build_temp: str, name: str) -> bool:
    try:
        with open(os.path.join(build_temp, "CMakeCache.txt")) as cache:
            return any(line.strip() in (f"{name}:INTERNAL=ON", f"{name}:INTERNAL=1")
                       for line in cache)
    except OSError:
        return False


class CMakeExtension(Extension):
    def __init__(self, name: str):
        # optional: a missing build output is skipped, not an error, when copied in place.
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt; never fails the install."""

    def run(self):
        if os.environ.get("PYADAPT_NO_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
            print("pyadapt: PYADAPT_NO_NATIVE set; skipping the native extension", file=sys.stderr)
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure means: install pure Python
            _warn(f"building the native extension failed: {exc}")

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if ext.name == "pyadapt._C_cuda":
            return self._build_cuda(ext)
        try:
            import torch  # noqa: F401  (no build isolation: the torch that will import _C)
        except ImportError:
            _warn("torch is not importable at build time (install torch first, then "
                  "`pip install --no-build-isolation -e .`)")
            return
        cmake = shutil.which("cmake")
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cmake is None or cxx is None:
            _warn(f"no {'cmake' if cmake is None else 'C++ compiler'} found")
            return
        # A persistent build folder (not pip's temporary one) makes reinstalls incremental.
        build_temp = os.path.join(HERE, "build", "cmake-" + sysconfig.get_config_var("SOABI"))
        os.makedirs(build_temp, exist_ok=True)
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        base = [cmake, "-S", HERE, "-B", build_temp, f"-DPython3_EXECUTABLE={sys.executable}",
                "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja"):
            base += ["-G", "Ninja"]
        # -march of the CPU kernels (default native; e.g. x86-64-v3 for a portable AVX2 build)
        base += [f"-DPYADAPT_CPU_ARCH={os.environ.get('PYADAPT_CPU_ARCH', 'native')}"]
        mode = _cuda_mode()
        jobs = os.environ.get("MAX_JOBS", "2")
        start = time.time()
        try:
            try:
                self._configure(base + _cuda_args(mode), build_temp)
            except subprocess.CalledProcessError:
                if mode == "OFF":
                    raise
                # PYADAPT_CUDA=ON and CUDA impossible (or a CUDA configure error): keep the CPU
                # module.
                _warn(f"configuring the CUDA kernels failed (PYADAPT_CUDA={mode}, see the CMake "
                      "error above)", "Building the CPU module only: the `cuda` backend will be "
                      "unavailable.")
                mode = "OFF"
                self._configure(base + _cuda_args(mode), build_temp)
            subprocess.run([cmake, "--build", build_temp, "-j", jobs, "--target", "pyadapt_C"],
                           check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            _warn(f"CMake build failed ({exc})")
            return
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = os.path.join(build_temp, "_C" + suffix)
        if not os.path.isfile(built):
            _warn(f"CMake did not produce {built}")
            return
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(built, self.get_ext_fullpath(ext.name))
        print(f"pyadapt: built {ext.name} in {time.time() - start:.1f} s", file=sys.stderr)
        self._cmake_state = (cmake, build_temp, suffix, jobs, mode)

    @staticmethod
    def _configure(args, build_temp):
        try:
            subprocess.run(args, check=True)
        except subprocess.CalledProcessError:
            # A stale cache (the checkout moved, another generator): configure afresh once.
            shutil.rmtree(build_temp, ignore_errors=True)
            subprocess.run(args, check=True)

    def _build_cuda(self, ext):
        """Builds pyadapt._C_cuda (after pyadapt._C) when CMake configured it; failures warn."""
        state = getattr(self, "_cmake_state", None)
        if state is None:  # the CPU module failed or was skipped: it already said why
            return
        cmake, build_temp, suffix, jobs, mode = state
        target = self.get_ext_fullpath(ext.name)
        # A module left from an earlier build is stale once CUDA is off or its build fails.
        stale = {target, os.path.join(HERE, "pyadapt", "_C_cuda" + suffix)}
        if not _cache_flag(build_temp, "PYADAPT_BUILD_CUDA"):
            for path in stale:
                if os.path.exists(path):
                    os.remove(path)
            if mode == "ON":
                _warn("PYADAPT_CUDA=ON but the CUDA kernels were not configured",
                      "The `cuda` backend will be unavailable.")
            return
        start = time.time()
        try:
            subprocess.run([cmake, "--build", build_temp, "-j", jobs, "--target",
                            "pyadapt_C_cuda"], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            for path in stale:
                if os.path.exists(path):
                    os.remove(path)
            _warn(f"building the CUDA kernels failed ({exc})",
                  "The CPU module and pure Python are installed; the `cuda` backend will be "
                  "unavailable.")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(build_temp, "_C_cuda" + suffix), target)
        print(f"pyadapt: built {ext.name} in {time.time() - start:.1f} s", file=sys.stderr)


setup(packages=packages, package_dir=package_dir,
      # Built in this order: _C configures CMake for both, then _C_cuda (optional) is built.
      ext_modules=[CMakeExtension("pyadapt._C"), CMakeExtension("pyadapt._C_cuda")],
      cmdclass={"build_ext": CMakeBuild})
