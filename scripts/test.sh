#!/usr/bin/env bash
# Set everything up and run the whole test suite:
#   1. the engine environment (.venv) and the engine, server and training tests (CPU, tiny models);
#   2. Debian's QGIS (headless) and its test environment (.venv-qgis), then the plugin tests,
#      end to end against the real engine server started from .venv.
#
#   bash scripts/test.sh [pytest args]     # extra args go to both pytest runs
#
# CUDA-only tests skip cleanly without a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup_qgis.sh
VENV=${DIFFUSIONSAT_VENV:-.venv}
status=0
# pytest's exit code 5 means "no test selected" (e.g. a -k filter matching one suite only)
run() { "$@" || { rc=$?; [ "$rc" -eq 5 ] || status=$rc; }; }
run "$VENV/bin/python" -m pytest -p no:cacheprovider --ignore=tests/plugin "$@"
run .venv-qgis/bin/python -m pytest -p no:cacheprovider tests/plugin "$@"
exit $status
