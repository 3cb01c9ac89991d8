# Two commands on a fresh clone: `make run` (the inbox daemon) and `make test` (the whole suite).
# Everything is installed into .venv; torch is pinned first because an unpinned request would pull
# a multi-GB CUDA build on these machines.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fine-tuner watch --root .

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest
