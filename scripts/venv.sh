#!/usr/bin/env bash
# Creates (once) and prints the path of the Python venv that provides libtorch for tch
# and diffusers/transformers for the parity fixtures. It lives outside the clone and is
# keyed by the pinned versions, so clones and CI runs on the same machine share it.
set -euo pipefail
TORCH_VERSION=2.13.0
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.24.0}
# peft: diffusers loads LoRAs through it (tests/fixtures/ref_lora.py).
PEFT_VERSION=0.21.2
PY=${PYTHON:-python3}
pyver=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key="torch${TORCH_VERSION}-diffusers${DIFFUSERS_VERSION}-transformers${TRANSFORMERS_VERSION}-py${pyver}"
root=${FRISKET_CACHE:-$HOME/.cache/frisket}
venv="$root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "creating $venv (torch $TORCH_VERSION, about 3 minutes, once)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  $PY -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q "torch==$TORCH_VERSION" >&2
  "$venv/bin/pip" install -q "diffusers==$DIFFUSERS_VERSION" "transformers==$TRANSFORMERS_VERSION" \
      safetensors numpy pillow scipy grpcio-tools==1.* grpcio==1.* "peft==$PEFT_VERSION" >&2
  # frisket-eval's reference implementations, torch held at its version.
  "$venv/bin/pip" install -q -r "$(dirname "$0")/eval-requirements.txt" "torch==$TORCH_VERSION" >&2
  touch "$venv/.complete"
fi
echo "$venv"
