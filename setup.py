"""Build script.

The package is pure Python today. The native extension `pyadapt._C` (csrc/, built by
CMakeLists.txt through CMake + ninja) is added by the native-extension work; until then a plain
`pip install --no-build-isolation -e .` installs pyadapt with the reference backend, on any
machine, with or without a compiler. Triton kernels (kernels/) ship as `pyadapt.kernels`, never
as a top-level `kernels` module.
"""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

packages = ["pyadapt", "pyadapt.ops"]
package_dir = {"pyadapt": "pyadapt"}
if os.path.isfile(os.path.join(HERE, "kernels", "__init__.py")):
    packages.append("pyadapt.kernels")
    package_dir["pyadapt.kernels"] = "kernels"

setup(packages=packages, package_dir=package_dir)
