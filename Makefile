# The README's commands. Each does all the set-up on a fresh machine, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed

.PHONY: demo test bench build clean gpu-check fuzz

# Versions: constraints.txt (what CI tests); ranges: pyproject.toml. torch first, pinned: any other
# route to it would fetch a multi-GB CUDA build.
$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt pybind11 setuptools wheel
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[triton,flower,torchft,privacy,dev]"
	$(PY) -m pip install -q -c constraints.txt --no-deps byzfl
	touch $(STAMP)

# Compiles tapestry._C (and tapestry._cuda where nvcc exists) in place; incremental.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(VENV)/bin/tapestry simulate --task digits --compare mean,trimmed_mean,median,krum,bulyan --attack signflip --byzantine 0.2 --out out/demo

test: build
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: build
	$(VENV)/bin/tapestry bench

# Offline fuzzing, not in CI: a million mutated payloads through the decoders (tools/fuzz.py) and
# mutated messages through the secure-sum state machines (tools/fuzz_secure.py).
FUZZ_COUNT ?= 1000000
fuzz: build
	$(PY) tools/fuzz.py --count $(FUZZ_COUNT)
	PYTHONPATH=python $(PY) tools/fuzz_secure.py --messages $(FUZZ_COUNT) --rounds 1000

# On a GPU machine with its own torch, triton and nvcc and no internet: build in place with the
# Python found there, run the GPU tests and the CUDA benchmarks, write one report (tools/gpu_check.py).
gpu-check:
	python3 tools/gpu_check.py

clean:
	rm -rf build $(VENV) python/tapestry/*.so
