#!/usr/bin/env bash
# Runs the whole test suite offline (unit tests, trained-model tests, end-to-end flow tests).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTLENS_VENV:-.venv}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$VENV/bin/python" -m pytest -q "$@"
