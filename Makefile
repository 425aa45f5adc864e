# Two commands on a fresh machine:
#   make demo   - build into .venv and run the main job (sample the embedded default model)
#   make test   - build into .venv and run the test suite
# CUDA build check (CI): make cuda-check (a second venv with the CUDA build of torch).
PYTHON   ?= python3
VENV     ?= .venv
TORCH    ?= torch==2.13.0
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
PYTEST_ARGS ?=
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo test cuda-check clean

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

clean:
	rm -rf build *.egg-info fastdiff/_C*.so $(VENV)/.installed
