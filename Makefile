# make test / make train work on a fresh clone: they create (or reuse) .venv, install what is
# missing, then run. torch==2.13.0 (CPU) is installed only when no torch is importable, so CI never
# pulls a multi-GB CUDA build; users with their own torch keep it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mamlpp-installed
RUN_DIR ?= runs/train
# The main job: MAML++ on Omniglot 5-way 1-shot at a CPU-sized budget (a few minutes on 2 cores).
# The full paper schedule is `mamlpp train omniglot-5w1s-mamlpp --out DIR` (best on a GPU).
TRAIN_PRESET ?= omniglot-5w1s-mamlpp
TRAIN_ARGS ?= train.budget=0.05 train.iters_per_epoch=50 outer.meta_batch=8 train.eval_tasks=200
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
	$(PY) -m mypy
	$(PY) -m pytest -q

train: $(STAMP)
	$(VENV)/bin/mamlpp train $(TRAIN_PRESET) $(TRAIN_ARGS) --out $(RUN_DIR)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
