"""Builds the optional native CPU kernels (csrc/ -> stable_diffusion._native) with CMake, against the
headers and CMake config of the mlx wheel in the build environment.

The build is optional: without a C++ compiler, CMake, nanobind or mlx's CMake files (or with
SD_NATIVE_BUILD=0) it is skipped with a warning, the package installs all the same, and
`stable_diffusion.ops.native_status()` reports that the pure-MLX paths are in use.
Everything else about the package is in pyproject.toml.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = Path(__file__).resolve().parent / "csrc"


class OptionalCMakeBuild(build_ext):
    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self._cmake(ext)
            except Exception as error:  # any failure leaves the package on its pure-MLX paths
                self.warn(f"{ext.name} not built ({error}); the package uses its pure-MLX CPU paths")
            else:
                built.append(ext)
        # Later steps (the in-place copy, the wheel's file list) then expect only what was built.
        self.extensions[:] = built

    def _cmake(self, ext):
        switch = os.environ.get("SD_NATIVE_BUILD", "")
        if switch.strip().lower() in ("0", "false", "off", "no"):  # as SD_NATIVE at run time
            raise RuntimeError(f"SD_NATIVE_BUILD={switch}")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("no cmake on PATH")
        import mlx  # the build environment's: its headers, libmlx and CMake config

        mlx_cmake = Path(mlx.__path__[0]) / "share" / "cmake" / "MLX"
        if not (mlx_cmake / "MLXConfig.cmake").exists():
            raise RuntimeError(f"no MLXConfig.cmake in {mlx_cmake} (on Linux it comes with mlx[cpu])")
        output = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build = Path(self.build_temp).resolve() / "native"
        configure = [
            cmake, "-S", str(SOURCE), "-B", str(build),
            f"-DMLX_DIR={mlx_cmake}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True)


setup(
    ext_modules=[Extension("stable_diffusion._native", sources=[])],
    cmdclass={"build_ext": OptionalCMakeBuild},
)
