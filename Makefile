# Frisket. `make run` renders on the default model; `make test` runs every test.
# Everything it needs (the torch venv, fixtures) is created on first use.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/frisket
VENV := $(shell FRISKET_CACHE=$(CACHE) scripts/venv.sh)
PY := $(VENV)/bin/python
FIXTURES ?= $(CURDIR)/target/fixtures
export FRISKET_FIXTURES := $(FIXTURES)
# tch builds against the venv's libtorch; build.rs bakes its path into the binaries (rpath).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
# One profile for build, tests and bench, so a fresh machine compiles the libtorch
# bindings once (dependencies are optimised in the dev profile, see Cargo.toml).
CARGO_FLAGS ?=
SERVER_BIN := target/debug/frisket-server
CLIENT_BIN := target/debug/frisket
OUT ?= $(CURDIR)/out

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

# Until the trained default model lands, `run` renders with the SD1-style fixture model.
run: build fixtures
	mkdir -p $(OUT)
	$(SERVER_BIN) render --model $(FIXTURES)/models/sd1 --prompt "a small yellow star at the top left" \
	  --seed 42 --steps 20 --scheduler dpm++ --width 64 --height 64 --out $(OUT)/render.png
	@echo "result: $(OUT)/render.png"

bench: build
	$(PY) bench/bench.py $(SERVER_BIN) $(CLIENT_BIN) $(CACHE)
