# Frisket. `make run` renders on the default model; `make test` runs every test.
# Everything it needs (the torch venv, apt packages, fixtures) is created on first use.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/frisket
VENV := $(shell FRISKET_CACHE=$(CACHE) scripts/venv.sh)
PY := $(VENV)/bin/python
FIXTURES ?= $(CURDIR)/target/fixtures
export FRISKET_FIXTURES := $(FIXTURES)
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
CARGO_FLAGS ?= --release

.PHONY: build test fixtures run bench
build:
	cargo build $(CARGO_FLAGS) --workspace

fixtures: $(FIXTURES)/.complete
$(FIXTURES)/.complete: tests/fixtures/*.py scripts/venv.sh
	rm -rf $(FIXTURES)
	$(PY) tests/fixtures/make_models.py $(FIXTURES)/models $(CACHE)/downloads
	for script in tests/fixtures/ref_*.py; do $(PY) $$script $(FIXTURES) || exit 1; done
	touch $@

test: fixtures
	cargo test $(CARGO_FLAGS) --workspace
