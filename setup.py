"""Build script.

Builds the native extension `pyadapt._C` (csrc/, through CMakeLists.txt with CMake + ninja) when
torch, CMake and a C++ compiler are present; install with `pip install --no-build-isolation -e .`
after torch so the extension compiles against the torch that will import it. If anything is
missing or the build fails, the install still succeeds as pure Python (a warning says why) and
pyadapt runs on its reference (and Triton) backends. Set PYADAPT_NO_NATIVE=1 to skip the build;
MAX_JOBS limits parallel compile jobs. Triton kernels (kernels/) ship as `pyadapt.kernels`,
never as a top-level `kernels` module.
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


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING pyadapt: {msg}\n  Installing pure Python: the native `cpu` backend "
          f"(pyadapt._C) will be unavailable.\n{bar}\n", file=sys.stderr, flush=True)


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
        args = [cmake, "-S", HERE, "-B", build_temp, f"-DPython3_EXECUTABLE={sys.executable}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPYADAPT_CUDA={os.environ.get('PYADAPT_CUDA', 'OFF')}"]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", "2")
        start = time.time()
        try:
            try:
                subprocess.run(args, check=True)
            except subprocess.CalledProcessError:
                # A stale cache (the checkout moved, another generator): configure afresh once.
                shutil.rmtree(build_temp, ignore_errors=True)
                subprocess.run(args, check=True)
            subprocess.run([cmake, "--build", build_temp, "-j", jobs], check=True)
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


setup(packages=packages, package_dir=package_dir,
      ext_modules=[CMakeExtension("pyadapt._C")], cmdclass={"build_ext": CMakeBuild})
