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

import fcntl
import os
import shutil
import subprocess
import sysconfig
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
    """Compiles each source to its own object, in parallel, skipping objects newer than their source
    and every header (so rebuilding after a one-file change compiles one file), then links.

    Concurrent builds in one checkout are serialised by a lock file, and the linked module replaces
    the old one atomically, so a running Python never loads a half-written extension.
    """

    def run(self):
        lock_dir = ROOT / "build"
        lock_dir.mkdir(exist_ok=True)
        with open(lock_dir / ".build-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            super().run()

    def build_extension(self, ext):
        out_dir = Path(self.build_temp) / ext.name
        out_dir.mkdir(parents=True, exist_ok=True)
        headers = [ROOT / h for h in ext.depends] + [ROOT / "setup.py"]  # flags live here too
        jobs = os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(lambda src: self._compile(ext, src, out_dir, headers), ext.sources))
        target = Path(self.get_ext_fullpath(ext.name))
        if target.exists() and all(Path(o).stat().st_mtime < target.stat().st_mtime for o in objects):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        cmd = [self._cxx(), "-shared", "-o", str(tmp), *objects, *ext.extra_link_args,
               *[f"-L{d}" for d in ext.library_dirs], *[f"-l{lib}" for lib in ext.libraries]]
        print("tapestry: link " + target.name)
        subprocess.run(cmd, check=True, cwd=ROOT)
        os.replace(tmp, target)

    def _cxx(self) -> str:
        return os.environ.get("CXX", "g++")

    def _compile(self, ext, src: str, out_dir: Path, headers: list[Path]) -> str:
        obj = out_dir / (src.replace("/", "_") + ".o")
        if obj.exists() and all(p.stat().st_mtime < obj.stat().st_mtime for p in [ROOT / src, *headers]):
            return str(obj)
        includes = [f"-I{d}" for d in [*ext.include_dirs, sysconfig.get_paths()["include"]]]
        if src.endswith(".cu"):
            archs = os.environ.get("TAPESTRY_CUDA_ARCH", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
            cmd = [str(ext.cuda_home / "bin" / "nvcc"), "-c", src, "-o", str(obj), *OPT, "-std=c++17",
                   "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-Xptxas", "-v", *gencode, *includes]
        else:
            cmd = [self._cxx(), "-c", src, "-o", str(obj), "-fPIC", *ext.extra_compile_args, *includes]
        print(f"tapestry: compile {src}")
        if not src.endswith(".cu"):
            subprocess.run(cmd, check=True, cwd=ROOT)
            return str(obj)
        # ptxas's register, spill and shared-memory report per kernel goes to build/ptxas/ (read by
        # tests/test_kernels_cuda.py); everything else nvcc says is shown as usual
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        ptxas = [line for line in res.stderr.splitlines() if line.startswith("ptxas info") or line.startswith("    ")]
        print(res.stdout, end="")
        print("\n".join(line for line in res.stderr.splitlines() if line not in ptxas))
        if res.returncode:
            raise subprocess.CalledProcessError(res.returncode, cmd)
        report = ROOT / "build" / "ptxas" / (Path(src).name + ".txt")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("\n".join(ptxas) + "\n")
        return str(obj)


# -ffp-contract=off: GCC fuses a*b+c into FMAs in C++ by default, which would make results depend on
# the SIMD path (or on a lane versus a scalar tail); kernels that want FMAs ask for them explicitly.
CXX_FLAGS = [*OPT, "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]

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
        depends=_sources("csrc/**/*.h", "csrc/**/*.cuh"),
        language="c++",
    )
    cuda_ext.cuda_home = cuda_home
    ext_modules.append(cuda_ext)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
