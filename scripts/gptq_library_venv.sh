#!/usr/bin/env bash
# A separate virtual environment holding field GPTQ implementations, for bench/gptq_vs_library.py
# (quantlens' GPTQ against the libraries' on the same weights and Hessians):
#   - llm-compressor (vLLM's): llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight
#   - AutoGPTQ 0.7.1: auto_gptq.quantization.gptq.GPTQ.fasterquant (the original IST-DASLab algorithm)
# It is kept apart from the project's .venv, whose pins (torch 2.13.0 CPU, transformers 5.24) must not
# change: llm-compressor brings its own older transformers (5.17) here. torch goes in first, pinned, so that
# nothing pulls a CUDA build (`pip install torch==2.13.0` is the CPU wheel on disk).
# AutoGPTQ goes in without its dependencies (peft, rouge, gekko, ... and a transformers 4 API): the bench
# imports only its quantization subpackage, which needs torch and transformers alone.
# GPTQModel is not installed: gptqmodel 7.7.0 requires torch>=2.14.1 (a CUDA download, no CPU wheel here).
# Idempotent: re-running it leaves an existing venv as it is, apart from re-checking the pins.
#   bash scripts/gptq_library_venv.sh            # venv at /tmp/gptq-lib-venv (or $GPTQ_LIB_VENV)
set -euo pipefail
VENV=${GPTQ_LIB_VENV:-/tmp/gptq-lib-venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0"
BUILD_CUDA_EXT=0 "$VENV/bin/python" -m pip install -q --no-deps "auto-gptq==0.7.1"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
print("gptq library venv ok:", " | ".join(f"{p} {md.version(p)}" for p in
      ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-gptq")), "| cuda:", torch.cuda.is_available())
EOF
