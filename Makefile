# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_CACHE := $(abspath ../shared/tiktoken_cache)

# tiktoken downloads its encodings on first use; point it at the shared copy when there is one.
ifneq ($(wildcard $(SHARED_CACHE)),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_CACHE)
endif
# CrewAI and LiteLLM reach the network at import, kickoff and exit unless told not to.
export CREWAI_DISABLE_TELEMETRY := true
export OTEL_SDK_DISABLED := true
export CREWAI_DISABLE_VERSION_CHECK := true
export CREWAI_TRACING_ENABLED := false
export CREWAI_TESTING := true
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: demo test lint typecheck bench clean

$(VENV)/bin/uv:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv

$(VENV)/.core: pyproject.toml | $(VENV)/bin/uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[rich]"
	touch $@

$(VENV)/.all: pyproject.toml | $(VENV)/bin/uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e ".[all,dev]"
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(PY) examples/demo.py

test: $(VENV)/.all
	$(PY) -m pytest

lint: $(VENV)/.all
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.all
	$(PY) benchmarks/core_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
