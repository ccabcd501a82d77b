"""``make gpu-check``: everything a GPU machine can tell us, in one call, with what is there.

For a machine with its own torch, triton and nvcc and no internet: nothing is installed. Pure-Python
packages it lacks (pybind11 for the build, pytest) are taken from this checkout's ``.venv`` when
that was carried along. Steps, each with its own time limit, all reported even when one fails:

1. build ``tapestry._C`` and ``tapestry._cuda`` in place with the Python found here;
2. ``pytest -m gpu`` (every GPU test: kernels, fused ops, ChaCha20, optimizers on CUDA);
3. ``tapestry bench --device cuda --json`` (every family with GPU cases, d = 2^26);
4. ``tapestry info``.

Writes ``OUT/gpu-report.md`` and ``OUT/gpu-report.json`` (``OUT``: ``$OUT`` or ``out/gpu``).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu")


def _env() -> dict:
    """PYTHONPATH: the checkout's sources first, then the carried venv's pure-Python packages."""
    paths = [os.path.join(ROOT, "python"), ROOT]
    extra = os.path.join(OUT, "site")
    os.makedirs(extra, exist_ok=True)
    for name in ("pybind11", "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "hypothesis", "attrs",
                 "sortedcontainers", "rich", "markdown_it", "mdurl", "pygments"):
        found = glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", name))
        try:
            __import__(name)
        except ImportError:
            if found and not os.path.exists(os.path.join(extra, name)):
                os.symlink(found[0], os.path.join(extra, name))
    paths.append(extra)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
               TAPESTRY_CUDA="1", PYTHONUNBUFFERED="1")
    return env


def step(name: str, cmd: list[str], env: dict, limit: int) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {limit} s)"
    result = {"step": name, "command": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1),
              "tail": out[-6000:]}
    print(f"[{name}] rc={rc} in {result['seconds']} s", flush=True)
    return result


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    env = _env()
    py = sys.executable
    bench_json = os.path.join(OUT, "bench-cuda.json")
    steps = [
        step("build", [py, "setup.py", "-q", "build_ext", "--inplace"], env, 240),
        step("info", [py, "-m", "tapestry", "info"], env, 60),
        step("pytest -m gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], env, 180),
        step("bench --device cuda", [py, "-m", "tapestry", "bench", "--device", "cuda", "--json", bench_json], env, 240),
    ]
    gpu = subprocess.run([py, "-c", "import torch; print(torch.cuda.get_device_name(0), torch.__version__, "
                          "torch.version.cuda)"], capture_output=True, text=True, env=env).stdout.strip()
    with open(os.path.join(OUT, "gpu-report.json"), "w") as fh:
        json.dump({"gpu": gpu, "python": sys.version, "steps": steps}, fh, indent=1)
    lines = [f"# make gpu-check: {gpu}", "", f"Python {sys.version.split()[0]}", "",
             "| step | rc | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    for s in steps:
        lines += ["", f"## {s['step']}", "", f"`{s['command']}`", "", "```", s["tail"][-3000:], "```"]
    with open(os.path.join(OUT, "gpu-report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}/gpu-report.md and gpu-report.json")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
