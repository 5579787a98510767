# Frisket. `make run` runs the main job on the shipped tiny model; `make test` runs every test.
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

# diffusers' LoRA loading needs peft, the evaluation parity tests clean-fid and pytorch-fid
# (scripts/eval-requirements.txt); venvs made before they were listed get them here.
PEFT_VERSION := 0.21.2
fixtures: $(FIXTURES)/.complete
# The parity references include diffusers renders of the shipped model (models/shapes).
$(FIXTURES)/.complete: tests/fixtures/*.py scripts/venv.sh scripts/eval-requirements.txt $(wildcard models/shapes/*/*.safetensors)
	rm -rf $(FIXTURES)
	@$(PY) -c "import peft" 2>/dev/null || $(VENV)/bin/pip install -q "peft==$(PEFT_VERSION)"
	@$(PY) -c "import cleanfid, pytorch_fid, torchmetrics, torch_fidelity, lpips" 2>/dev/null || $(VENV)/bin/pip install -q -r scripts/eval-requirements.txt \
	    "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(PY) tests/fixtures/make_models.py $(FIXTURES)/models $(CACHE)/downloads
	for script in tests/fixtures/ref_*.py; do $(PY) $$script $(FIXTURES) || exit 1; done
	touch $@

test: fixtures lint deps-promtool
	cargo test $(CARGO_FLAGS) --workspace
	$(MAKE) test-plugins

# promtool (Debian's prometheus package), which tests/tests/metrics.rs runs on the
# server's /metrics text. Root or sudo.
.PHONY: deps-promtool
deps-promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends prometheus; }

# Formatting and lints: rustfmt (rustfmt.toml), clippy with warnings as errors, and ruff
# over the Python (ruff.toml).
.PHONY: lint lint-rust lint-python
lint: lint-rust lint-python
lint-rust:
	cargo fmt --all -- --check
	cargo clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

RUFF_VERSION := 0.17.6
lint-python:
	@$(VENV)/bin/ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || $(VENV)/bin/pip install -q "ruff==$(RUFF_VERSION)"
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# The main job on the shipped tiny model (models/shapes): a server on loopback, the client
# changes examples/reference.png to follow a prompt with examples/protect.png kept
# bit-exact, streaming previews, heatmaps and masks into $(OUT)/demo.
run: build
	scripts/demo.sh $(SERVER_BIN) $(CLIENT_BIN) $(OUT)

# Retrains models/shapes from nothing: tokenizer, VAE, text encoder pre-training, UNet + text
# encoder with attention grounding, the focus phase, export, the object-weighted polish, eval
# with the judge, model card (sized for 2 h on 2 CPU cores; the card records each run's
# times and hardware, trainer/README.md the recipe).
# Stages resume from $(TRAIN_WORK); delete it to start over.
TRAIN_WORK ?= $(CURDIR)/target/train-tiny
.PHONY: train-tiny
train-tiny:
	cargo build $(CARGO_FLAGS) -p frisket-trainer --bins
	target/debug/train_tiny --out models/shapes --work $(TRAIN_WORK)
	target/debug/eval_tiny --model models/shapes
	target/debug/model_card models/shapes

# Trains models/shapes-clip, the shapes contrastive image-text model (issue 24): train_clip
# (a transformers CLIPModel through frisket-eval's CLIP forward), then eval_clip (held-out
# caption retrieval and agreement with the judge; eval.json, README.md). About 32 minutes on
# 2 CPU cores; the shipped model is this target's run.
.PHONY: train-clip
train-clip:
	cargo build $(CARGO_FLAGS) -p frisket-trainer --bin train_clip --bin eval_clip
	target/debug/train_clip --out models/shapes-clip
	target/debug/eval_clip --model models/shapes-clip

bench: build
	cargo build $(CARGO_FLAGS) -p frisket-engine --example conv_bench
	$(PY) bench/bench.py $(SERVER_BIN) $(CLIENT_BIN) target/debug/examples/conv_bench $(CACHE)

# Fuzzing, not part of `make test`: cargo-fuzz (libFuzzer, nightly) runs each target in
# fuzz/ for $(FUZZ_SECONDS) seconds from the seeds in fuzz/seeds/; crashes land in
# fuzz/artifacts/, the grown corpus in fuzz/corpus/. Release builds (-O) with ASan.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request image
.PHONY: fuzz
fuzz:
	@cargo +nightly --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
	@cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	cd fuzz && for target in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$target && \
	  cargo +nightly fuzz run -O $$target corpus/$$target seeds/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -print_final_stats=1 || exit 1; \
	done

# Needs a CUDA GPU: full-size random-weight SD 1.5 (512²) and SDXL (1024²) in fp16, Frisket
# against diffusers in one run (s/step, peak GPU memory, image difference), then SD 1.5 at
# 1, 2, 4 and 8 concurrent jobs stepped together (images/s, s/step); JSON in $(OUT).
.PHONY: gpu-check
gpu-check: build
	mkdir -p $(OUT)
	$(PY) bench/gpu_check.py $(SERVER_BIN) target/debug/frisket-load $(CACHE) $(OUT)/gpu-check.json

# The A/B report (issue 24; not part of `make test`): 200 held-out shapes protect cases
# (seeds 900_000..) under sd-0.9, sd-tuned, paper, paper-all-layers, blended and protect-only
# through a server on models/shapes, sd-tuned's strength chosen first on the tuning split
# (`ab`'s default grid and tuning cases); the CLIP columns with models/shapes-clip when it is
# there; report.json and report.html in $(OUT)/eval/.
AB_CASES ?= 200
.PHONY: eval
eval: build
	target/debug/frisket-eval ab --model models/shapes --cases $(AB_CASES) \
	  $(if $(wildcard models/shapes-clip/config.json),--clip models/shapes-clip) --out $(OUT)/eval

# Editor plugins (plugins/): the Krita and GIMP adapters over the `frisket` client's JSON
# lines. `make plugin-krita` builds the zip for Krita's Tools > Scripts > Import Python
# Plugin from File; `make test-plugins` (part of `make test`) runs tests/plugins/, with a
# real Krita (kritarunner, offscreen) and a real frisket-server on loopback.
PLUGINS_OUT := $(CURDIR)/target/plugins
.PHONY: plugin-krita plugin-gimp plugins deps-krita test-plugins plugin-screenshot
plugin-krita:
	$(PY) plugins/package.py krita $(PLUGINS_OUT)/frisket-krita.zip

plugin-gimp:
	$(PY) plugins/package.py gimp $(PLUGINS_OUT)/frisket-gimp.zip

plugins: plugin-krita plugin-gimp

# Krita 5 (Debian's package: kritarunner, and PyQt5 for its Python plugins). Root or sudo.
deps-krita:
	@command -v kritarunner >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y krita python3-pyqt5 python3-sip; }

test-plugins: build fixtures deps-krita plugins
	$(PY) -m unittest discover -s tests/plugins -p 'test_*.py' -v

# The docker screenshot in plugins/README.md, from a real Krita under Xvfb.
plugin-screenshot: build fixtures deps-krita plugin-krita
	@command -v xvfb-run >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y xvfb xauth; }
	$(PY) tests/krita/screenshot.py $(PLUGINS_OUT)/frisket-krita.zip plugins/krita/docker.png

# What one client can do to everyone else, measured on this machine (not part of `make
# test`): cancel inside a step of the largest exact-attribution job the limits admit (a
# random full-size SD 1.5, built into $(CACHE) on first use), SIGTERM with a long step
# running ×10, and well-behaved clients beside hostile ones; JSON in $(OUT).
.PHONY: hostile
hostile: build
	$(PY) bench/hostile.py $(SERVER_BIN) $(CLIENT_BIN) $(CACHE) $(OUT)/hostile.json

# Concurrent clients over loopback against a real server with the shipped model (not part
# of `make test`): c = 1, 2, 4, 8 clients, each sending LOAD_JOBS 20-step jobs with a
# preview every step, against one job at a time and against step-level batching, in one
# run; jobs/s, time to first preview and job time (p50/95/99), codes, step batch sizes
# (from the worker's debug lines), and the goals as ratios of this run (the settings
# alternate over two or three rounds, which the ratios pool). The clients start
# spread over one lone job's time (`--stagger`); then c = 4 started all at once, whose
# jobs arrive in bursts of 4. Then c = 4 on the mid-size bench model (bench/bench.py's),
# whose steps are compute-bound: batching must not cost throughput there. The machine is
# printed first; JSON in $(OUT).
LOAD_JOBS ?= 4
.PHONY: load
load: build
	@mkdir -p $(OUT)
	@$(PY) -c "import sys; sys.path.insert(0, 'bench'); import machine; machine.describe()"
	cargo build $(CARGO_FLAGS) -p frisket-e2e --bin frisket-load
	FRISKET_SERVER_BIN=$(SERVER_BIN) FRISKET_TEST_RUST_LOG="info,frisket_server::service::worker=debug" \
	  target/debug/frisket-load --models models --concurrency 1,2,4,8 --jobs $(LOAD_JOBS) --stagger --rounds 2 \
	  --setting "batch-1=--max-batch 1 --queue-capacity 16" --setting "batch-8=--max-batch 8 --queue-capacity 16" \
	  --out $(OUT)/load.json
	FRISKET_SERVER_BIN=$(SERVER_BIN) FRISKET_TEST_RUST_LOG="info,frisket_server::service::worker=debug" \
	  target/debug/frisket-load --models models --concurrency 1,4 --jobs $(LOAD_JOBS) --rounds 2 \
	  --setting "batch-8-burst=--max-batch 8 --queue-capacity 16" --out $(OUT)/load-burst.json
	$(PY) -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import bench; \
	  bench.build_model(Path('$(CACHE)/load-models/bench'), Path('$(CACHE)'))"
	FRISKET_SERVER_BIN=$(SERVER_BIN) FRISKET_TEST_RUST_LOG="info,frisket_server::service::worker=debug" \
	  target/debug/frisket-load --models $(CACHE)/load-models --model bench --prompt "a lighthouse at dusk" \
	  --steps 6 --size 256 --concurrency 4 --jobs 2 --rounds 3 \
	  --setting "batch-1=--max-batch 1 --queue-capacity 16" --setting "batch-8=--max-batch 8 --queue-capacity 16" \
	  --out $(OUT)/load-bench.json
