# realign-pipeline developer tasks.
#
#   make install      create .venv (if missing) and install torch + this package with its dev extras
#   make test         run the test suite offline (no model weights are ever downloaded)
#   make wheel-check  build the wheel, install it non-editable and run the demo from it (.ci/wheel_check.py)
#   make demo         run the `realigndiff demo` command
#
# torch defaults to the CPU build pinned below. On a GPU machine pass your own spec, e.g.
#   make install TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
# (TORCH_SPEC is handed to pip unquoted, so it may carry pip options.)

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0

VENV_PY := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install test wheel-check demo

install: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# Re-run the install only when pyproject.toml changes (or the stamp is removed).
$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install --upgrade pip 'setuptools>=77'
	$(VENV_PY) -m pip install $(TORCH_SPEC)
	$(VENV_PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Two pytest workers (pytest-xdist), one torch thread each: the 2-core machine runs two test files at once.
# --dist loadfile keeps each file's tests, and its module-scoped tiny models, in one worker;
# --no-loadscope-reorder hands the files out in collection order, which tests/conftest.py starts with the
# slowest files (xdist's default order is by number of tests, which left a slow file of few tests for last).
test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV_PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests

# The tests import the editable install, which reads src/ directly: this catches what the wheel leaves out.
# It builds with the venv's setuptools (hence setuptools in `install`) and installs with --no-deps.
wheel-check: install
	OMP_NUM_THREADS=1 $(VENV_PY) .ci/wheel_check.py

demo: install
	$(VENV)/bin/realigndiff demo
