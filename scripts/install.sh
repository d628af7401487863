#!/usr/bin/env bash
# Installs quantlens and everything its tests need into ./.venv (or $QUANTLENS_VENV).
# torch goes in first, pinned, so that no dependency pulls a multi-GB CUDA build:
# on the dev/CI machines `pip install torch==2.13.0` resolves to the CPU wheel on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTLENS_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${QUANTLENS_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# Reference implementations the format tests compare against bit for bit (tests/reference_formats.py),
# kept off the environment's path: a folder the tests put on PYTHONPATH of a subprocess only.
REF=${QUANTLENS_REF_LIBS:-.ref-libs}
"$VENV/bin/python" -m pip install -q --no-deps --upgrade --target "$REF" "bitsandbytes>=0.46,<0.51" "torchao>=0.17,<0.19" \
  "auto-gptq==0.7.1" "autoawq==0.2.9"  # (their packers and dequantizers only: tests/reference_packing.py)
# System tools the tests use (no engine or daemon needed): docker-compose validates
# infra/docker-compose.yml; caddy (the TLS proxy of infra/Caddyfile) fronts the authenticated test servers.
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v caddy >/dev/null || missing+=(caddy)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } \
    || echo "warning: could not install ${missing[*]}; the tests that need them will fail in CI" >&2
fi
"$VENV/bin/python" -c "import torch, transformers, prefect, mlflow; print('quantlens env ok: torch', torch.__version__, '| transformers', transformers.__version__, '| prefect', prefect.__version__, '| mlflow', mlflow.__version__)"
