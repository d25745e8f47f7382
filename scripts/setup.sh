#!/usr/bin/env bash
# Set up the engine environment in .venv (torch, diffusers, rasterio, the `diffusionsat` command,
# the server, training and test tools).
#
#   bash scripts/setup.sh            # engine + server + test tools
#
# Works on a fresh Debian/Ubuntu machine: installs python3-venv with apt when it is missing.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or requirements/ changed.
# GPU machines: if `nvidia-smi` works, torch comes from PyPI's default (CUDA) build instead of
# the CPU pin in requirements/cpu.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${DIFFUSIONSAT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "setup: please install: $* (no apt-get on this machine)" >&2; exit 1
    fi
    echo "setup: installing $* with apt-get" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v "$PY" >/dev/null || apt_install python3 python3-venv python3-pip
"$PY" - <<'PYCHECK' || { echo "setup: Python >= 3.10 is required ($("$PY" --version))" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        apt_install python3-venv
        "$PY" -m venv "$VENV"
    fi
fi

stamp="$VENV/.diffusionsat-setup"
want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the engine into $VENV (a minute or two the first time)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        torch_req=()
    else
        torch_req=(-r requirements/cpu.txt)
    fi
    "$VENV/bin/python" -m pip install -q "${torch_req[@]}" -e ".[server,train,dev]"
    echo "$want" > "$stamp"
fi
"$VENV/bin/diffusionsat" --version >&2
