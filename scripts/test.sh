#!/usr/bin/env bash
# Set everything up and run the whole test suite (engine tests on the CPU with tiny models).
#
#   bash scripts/test.sh [pytest args]
#
# CUDA-only tests skip cleanly without a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
VENV=${DIFFUSIONSAT_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
