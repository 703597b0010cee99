# Two commands do everything on a fresh machine: `make test` and `make prune-and-bench`.
# PYTHON picks the interpreter, VENV its virtualenv (one per interpreter, e.g.
# `make test PYTHON=python3.13 VENV=.venv-3.13`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the sparse kernels' OpenVINO extension, built into the environment (kernels/build.sh says why not when
# it cannot be: the rest installs and runs without it)
KERNELS := $(VENV)/lib/vitsparse/.built
KERNEL_SOURCES := $(wildcard kernels/CMakeLists.txt kernels/build.sh kernels/*/*.cpp kernels/*/*.hpp)
PROFILE ?= default
ARGS   ?=

export NM_DISABLE_ANALYTICS := 1

.PHONY: install test prune-and-bench lint clean

install: $(STAMP) $(KERNELS)

# Re-installs only when the project's requirements change; the stamp makes it idempotent.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(KERNELS): $(STAMP) $(KERNEL_SOURCES)
	kernels/build.sh $(BIN)/python
	touch $(KERNELS)

# one pytest-xdist worker per core, at most four, a test file per worker (its module fixtures built
# once); `make test ARGS="-n 0"` runs in one process
test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile $(ARGS)

prune-and-bench: install
	$(BIN)/vitsparse prune-and-bench --profile $(PROFILE) $(ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
