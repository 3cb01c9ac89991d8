# Two commands on a fresh clone: `make run` (the inbox daemon) and `make test` (the whole suite).
# Everything is installed into .venv; torch is pinned first because an unpinned request would pull
# a multi-GB CUDA build on these machines.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
EXTRAS := train,test
# The hand-off tests run axolotl (the axolotl extra, ~4 GB with TRL) and LLaMA-Factory's own
# dataset parser. LLaMA-Factory's pins (transformers<=5.6, peft<=0.18) clash with axolotl's, so
# only its code is installed, without dependencies, into a folder of its own.
HANDOFF       := $(VENV)/.installed-handoff
LLAMAFACTORY  := llamafactory==0.9.5
LF_DIR        := $(VENV)/llamafactory
TEST_EXTRAS   := $(EXTRAS),axolotl

# llama.cpp, pinned (daemon/llamacpp.py): its source (the adapter converter every fine-tune runs) is
# fetched once into ~/.cache/fine-tuner (or $FINE_TUNER_CACHE_DIR), outside the clone, and reused;
# `python -m daemon.llamacpp source` does nothing when it is already there
LLAMA_SRC = $(PY) -m daemon.llamacpp source >/dev/null

.PHONY: run test test-fast lint docs llama-cpp chromium

# venv, pip, the torch pin, then the project with the given extras (one resolution for all of them)
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(1)]"
endef

$(STAMP): pyproject.toml
	$(call install,$(EXTRAS))
	touch $(STAMP)

$(HANDOFF): pyproject.toml
	$(call install,$(TEST_EXTRAS))
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(LF_DIR) "$(LLAMAFACTORY)"
	touch $(STAMP) $(HANDOFF)

# llama.cpp's server (llama-server), built once into the same cache (about 15 min on two cores);
# later runs and clones find it there and do nothing
llama-cpp: $(STAMP)
	$(PY) -m daemon.llamacpp build >/dev/null

# Debian's Chromium, for the test that renders `fine-tuner report`'s HTML page in a real browser;
# installed once (as root), skipped when it is already there
chromium:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

run: $(STAMP)
	$(LLAMA_SRC)
	$(VENV)/bin/fine-tuner watch --root .

# Three workers on two cores: most of the suite waits on real processes, files and sockets; the
# modules that build a trained model once keep to one worker each (xdist_group). One OpenMP thread
# per process: with three workers on two cores, more threads only spin-wait for each other. The
# suite serves real models with llama-server, so it is built first (once per machine), and renders
# one page in Chromium (installed when missing).
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 OMP_NUM_THREADS=1 \
	LLAMAFACTORY_PATH=$(abspath $(LF_DIR))

test: lint llama-cpp chromium
	$(TEST_ENV) $(PY) -m pytest -n 3 --dist loadgroup --durations=15

# The edit loop: the linter, then every test that does not train, load or serve a model (the `slow`
# marker, set in tests/conftest.py); a few minutes instead of the whole suite's ten
test-fast: lint
	$(TEST_ENV) $(PY) -m pytest -n 3 --dist loadgroup -m "not slow" --durations=10

# the docs/ pages as a site in site/ (MkDocs with the Material theme; strict: a broken link, a
# missing anchor or a page left out of the navigation fails; tests/test_docs.py builds it in `make test`)
docs: $(HANDOFF)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# ruff, with the rules in pyproject.toml ([tool.ruff])
lint: $(HANDOFF)
	$(VENV)/bin/ruff check daemon tests bench scripts
