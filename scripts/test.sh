#!/usr/bin/env bash
# Runs the whole test suite offline (unit tests, trained-model tests, end-to-end flow tests).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTLENS_VENV:-.venv}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# Two workers, one test file each at a time (--dist loadfile: a file's module fixtures — a sweep, a
# server — stay in one process); much of the suite waits on subprocesses and servers, not the CPU.
# QUANTLENS_TEST_WORKERS=0 runs it in one process.
exec "$VENV/bin/python" -m pytest -q -n "${QUANTLENS_TEST_WORKERS:-2}" --dist loadfile "$@"
