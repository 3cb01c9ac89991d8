# Two commands on a fresh clone: `make run` (the inbox daemon) and `make test` (the whole suite).
# Everything is installed into .venv; torch is pinned first because an unpinned request would pull
# a multi-GB CUDA build on these machines.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# The hand-off tests run axolotl (the axolotl extra, ~4 GB with TRL) and LLaMA-Factory's own
# dataset parser. LLaMA-Factory's pins (transformers<=5.6, peft<=0.18) clash with axolotl's, so
# only its code is installed, without dependencies, into a folder of its own.
HANDOFF       := $(VENV)/.installed-handoff
LLAMAFACTORY  := llamafactory==0.9.5
LF_DIR        := $(VENV)/llamafactory

.PHONY: run test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

$(HANDOFF): $(STAMP)
	$(PY) -m pip install --quiet -e ".[train,test,axolotl]"
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(LF_DIR) "$(LLAMAFACTORY)"
	touch $(HANDOFF)

run: $(STAMP)
	$(VENV)/bin/fine-tuner watch --root .

# Three workers on two cores: most of the suite waits on real processes, files and sockets; the
# modules that build a trained model once keep to one worker each (xdist_group).
test: $(STAMP) $(HANDOFF)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 \
		LLAMAFACTORY_PATH=$(abspath $(LF_DIR)) $(PY) -m pytest -n 3 --dist loadgroup
