# Two commands on a fresh machine:
#   make demo   - build into .venv and run the main job (sample the embedded default model)
#   make test   - build into .venv and run the test suite
# CUDA build check (CI): make cuda-check (a second venv with the CUDA build of torch).
# On a GPU machine: make gpu-check [QUICK=1] (build, CUDA/Triton tests, GPU benchmarks);
# make gpu-wheels first, where PyPI is reachable, for what that machine's Python lacks.
PYTHON   ?= python3
VENV     ?= .venv
TORCH    ?= torch==2.13.0
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
PYTEST_ARGS ?=
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

QUICK ?= 0
GPU_WHEELS := diffusers==0.42.1 ninja setuptools wheel

.PHONY: install demo test cuda-check gpu-check gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel ninja pybind11
	# torch first (a CPU wheel on local disk), then the package without build isolation
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/fastdiff sample

test: install
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

cuda-check:
	bash .ci/cuda_check.sh $(CUDA_VENV) $(CUDA_TORCH)

gpu-check:
	QUICK=$(QUICK) bash .ci/gpu_check.sh

# Wheels for the GPU machine's Python 3.12 (no internet there); numpy and torch it has.
gpu-wheels:
	rm -rf .whl
	$(VENV)/bin/pip download -q -d .whl --only-binary=:all: --implementation cp --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  $(GPU_WHEELS)
	rm -f .whl/numpy-*.whl
	du -sh .whl

clean:
	rm -rf build *.egg-info fastdiff/_C*.so $(VENV)/.installed
