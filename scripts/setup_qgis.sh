#!/usr/bin/env bash
# Set up the QGIS test environment for the plugin tests (tests/plugin).
#
#   bash scripts/setup_qgis.sh
#
# 1. QGIS itself: Debian's/Ubuntu's python3-qgis, qgis-providers, qgis (brings qgis_process) and
#    xvfb, installed with apt-get only when `/usr/bin/python3 -c "import qgis.core"` fails.
# 2. .venv-qgis: a venv over the system Python *with* its site-packages (so it sees qgis, PyQt5
#    and Debian's numpy 1.24) plus only the test tools (pytest, pytest-qt, pytest-qgis,
#    pytest-timeout). Never torch, rasterio or numpy 2: QGIS's Python stays clean (see
#    shared/environment.md, "Two Python environments").
#
# Idempotent: a stamp file in .venv-qgis records what was installed; re-runs do nothing.
# Works as root or through sudo. QGIS_VENV overrides the venv folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${QGIS_VENV:-$ROOT/.venv-qgis}
SYSPY=/usr/bin/python3
TOOLS=(pytest "pytest-qt==4.5.0" "pytest-qgis==5.0.2" pytest-timeout)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! "$SYSPY" -c "import qgis.core" >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null; then
        echo "setup_qgis: QGIS's Python bindings are missing and there is no apt-get;" \
             "install QGIS 3.22+ with python3-qgis by hand" >&2
        exit 1
    fi
    echo "setup_qgis: installing QGIS with apt-get (about a minute)" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        python3-qgis qgis-providers qgis xvfb python3-venv >/dev/null
fi
# Debian splits venv support out of python3 itself.
if ! "$SYSPY" -c "import ensurepip" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$SYSPY" -m venv --system-site-packages "$VENV"
fi

# pytest-qgis creates the QgsApplication before any conftest runs, so the headless platform must
# be chosen before Python starts: in this test venv only, default to Qt's offscreen platform when
# there is no display (an explicit QT_QPA_PLATFORM wins).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/diffusionsat_qgis_offscreen.pth" <<'PTH'
import os; (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
PTH

stamp="$VENV/.diffusionsat-qgis-setup"
want=$(printf '%s\n' "${TOOLS[@]}" "$(cat "$0" | sha256sum)" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    numpy_before=$("$VENV/bin/python" -c "import numpy; print(numpy.__version__)" 2>/dev/null || echo none)
    echo "setup_qgis: installing ${TOOLS[*]} into $VENV" >&2
    # A constraint pins numpy to the system's version so pip can never replace Debian's build.
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    if [ "$numpy_before" != none ]; then echo "numpy==$numpy_before" > "$constraints"; fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" "${TOOLS[@]}"
    numpy_after=$("$VENV/bin/python" -c "import numpy; print(numpy.__version__)" 2>/dev/null || echo none)
    if [ "$numpy_before" != "$numpy_after" ]; then
        echo "setup_qgis: numpy changed from $numpy_before to $numpy_after in $VENV;" \
             "QGIS needs the system's numpy" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import qgis.core, pytestqt, pytest_qgis" >/dev/null
    echo "$want" > "$stamp"
fi
"$VENV/bin/python" - <<'PYCHECK' >&2
from qgis.core import Qgis
import numpy
print(f"setup_qgis: QGIS {Qgis.QGIS_VERSION}, numpy {numpy.__version__}")
PYCHECK
