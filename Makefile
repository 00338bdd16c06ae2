# make test / make train work on a fresh clone: they create (or reuse) .venv, install what is
# missing, then run. torch==2.13.0 (CPU) is installed only when no torch is importable, so CI never
# pulls a multi-GB CUDA build; users with their own torch keep it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mamlpp-installed
RUN_DIR ?= runs/train
# Tests and the main job read the shared data copy when it exists.
SHARED_DATA := $(wildcard ../shared/data)
export MAMLPP_DATA ?= $(if $(SHARED_DATA),$(abspath ../shared/data),)

.PHONY: install test train clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(VENV)/bin/mamlpp train sinusoid-maml --out $(RUN_DIR)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
