"""Build Tapestry's native extensions without torch at build time.

* ``tapestry._C``: always. C++17 + OpenMP via pybind11, from csrc/cpu/*.cpp and csrc/bindings/cpu*.cpp.
  The kernels pick AVX-512 / AVX2 / portable code at run time, so the wheel runs on any x86-64.
* ``tapestry._cuda``: when nvcc is found (``$CUDA_HOME/bin/nvcc``, /usr/local/cuda, or PATH), from
  csrc/cuda/*.cu and csrc/bindings/cuda*.cpp, linked against the static CUDA runtime so that it
  imports on machines without a GPU driver. ``TAPESTRY_CUDA=0`` skips it, ``TAPESTRY_CUDA=1``
  makes a missing nvcc an error. ``TAPESTRY_CUDA_ARCH`` (default "80;90") lists the SM targets.

Build flags come from the environment only (``TAPESTRY_NATIVE_DEBUG=1`` builds -O0 -g).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEBUG = os.environ.get("TAPESTRY_NATIVE_DEBUG") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]


def _sources(*patterns: str) -> list[str]:
    return [str(p.relative_to(ROOT)) for pat in patterns for p in sorted(ROOT.glob(pat))]


def _cuda_home() -> Path | None:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def _want_cuda() -> Path | None:
    flag = os.environ.get("TAPESTRY_CUDA", "").strip()
    if flag == "0":
        print("tapestry: TAPESTRY_CUDA=0, skipping tapestry._cuda")
        return None
    home = _cuda_home()
    if home is None or not (home / "bin" / "nvcc").exists():
        if flag == "1":
            raise RuntimeError("TAPESTRY_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        print("tapestry: nvcc not found, skipping tapestry._cuda (set CUDA_HOME to build it)")
        return None
    return home


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc (in parallel) and C++ sources with the host compiler."""

    def initialize_options(self):
        super().initialize_options()
        self.parallel = os.cpu_count() or 1

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + self._nvcc(ext, cu)
        super().build_extension(ext)

    def _nvcc(self, ext, sources: list[str]) -> list[str]:
        home = ext.cuda_home
        archs = os.environ.get("TAPESTRY_CUDA_ARCH", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)

        headers = [ROOT / h for h in _sources("csrc/**/*.h", "csrc/**/*.cuh")]

        def compile_one(src: str) -> str:
            obj = str(out_dir / (Path(src).stem + ".o"))
            if Path(obj).exists() and all(p.stat().st_mtime < Path(obj).stat().st_mtime
                                          for p in [ROOT / src, *headers]):
                return obj  # up to date
            cmd = [str(home / "bin" / "nvcc"), "-c", src, "-o", obj, *OPT, "-std=c++17",
                   "-Xcompiler", "-fPIC", "-Icsrc", "--expt-relaxed-constexpr", *gencode]
            print("tapestry: " + " ".join(cmd))
            subprocess.run(cmd, check=True, cwd=ROOT)
            return obj

        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            return list(pool.map(compile_one, sources))


CXX_FLAGS = [*OPT, "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]

ext_modules = [
    Extension(
        "tapestry._C",
        sources=_sources("csrc/cpu/*.cpp", "csrc/bindings/cpu*.cpp"),
        include_dirs=[pybind11.get_include(), "csrc"],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-fopenmp"],
        depends=_sources("csrc/**/*.h"),
        language="c++",
    )
]

cuda_home = _want_cuda()
if cuda_home is not None:
    libdir = next((p for p in (cuda_home / "lib64", cuda_home / "lib") if (p / "libcudart_static.a").exists()),
                  cuda_home / "lib64")
    cuda_ext = Extension(
        "tapestry._cuda",
        sources=_sources("csrc/cuda/*.cu", "csrc/bindings/cuda*.cpp"),
        include_dirs=[pybind11.get_include(), "csrc", str(cuda_home / "include")],
        library_dirs=[str(libdir)],
        libraries=["cudart_static", "rt", "pthread", "dl"],
        extra_compile_args=[*OPT, "-std=c++17", "-fvisibility=hidden"],
        depends=_sources("csrc/**/*.h", "csrc/**/*.cuh", "csrc/cuda/*.cu"),
        language="c++",
    )
    cuda_ext.cuda_home = cuda_home
    ext_modules.append(cuda_ext)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
