# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast launcher-matrix clean

setup: $(VENV)/.installed

# torch is installed first and pinned: a loose requirement would pull a multi-GB CUDA build.
# DS_BUILD_OPS=0: DeepSpeed installs without compiling its C++/CUDA ops.
$(VENV)/.installed: pyproject.toml setup.py iomm_scale/data/_native.c
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/iomm-train --config configs/tiny.yaml

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not dist"

# every layout x data source x optimizer, 2 steps each under torchrun (~8 min; not in `test`)
launcher-matrix: setup
	PYTHON=$(PY) bash tests/parallel/launcher_matrix.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
