# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs flover, runs the main job
#   make test   creates .venv, installs flover with the test extras, runs the suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch would pull several GB of CUDA packages.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test,cuda,mpi]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/flover demo

test: $(VENV)/.installed-test
	NUMBA_ENABLE_CUDASIM=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(VENV)/.installed-test
	$(BIN)/ruff check reference flover numba_kernels mpi_tp tests benchmarks tools tutorials

clean:
	rm -rf $(VENV) out
