"""The command line starts without the heavy libraries: an error in the arguments is answered
before diffusers, transformers or torch are imported, and the training commands come from the
``diffusionsat.commands`` entry point (the engine imports nothing of training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_argument_error_imports_no_model_library(tmp_path):
    out = _python(
        "import json, sys, contextlib, io\n"
        "from engine.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    rc = main(['generate', '--bbox', '1,2,3', '--out', {str(tmp_path / 'x.tif')!r}])\n"
        "print(json.dumps({'rc': rc, 'err': err.getvalue(),\n"
        "                  'loaded': [m for m in ('diffusers', 'transformers', 'torch') if m in sys.modules]}))\n")
    assert out["rc"] == 2 and "has 3 values" in out["err"]
    assert out["loaded"] == []


def test_the_libraries_are_quiet_once_a_command_imports_them():
    out = _python(
        "import json, logging\n"
        "from engine.cli import _quiet_libraries\n"
        "_quiet_libraries()\n"
        "import diffusers, transformers\n"
        "from diffusers.utils import logging as d\n"
        "from transformers.utils import logging as t\n"
        "from huggingface_hub.utils import are_progress_bars_disabled\n"
        "print(json.dumps({'levels': [d.get_verbosity(), t.get_verbosity()],\n"
        "                  'bars': [d.is_progress_bar_enabled(), t.is_progress_bar_enabled()],\n"
        "                  'hub_bars_off': are_progress_bars_disabled()}))\n")
    assert out == {"levels": [40, 40], "bars": [False, False], "hub_bars_off": True}


def test_training_commands_come_from_the_entry_point():
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["diffusionsat.commands"] == {"training": "training.cli:register"}
    out = _python(
        "import json\n"
        "from importlib.metadata import entry_points\n"
        "from engine.cli import COMMANDS_GROUP, build_parser\n"
        "names = {e.name: e.value for e in entry_points(group=COMMANDS_GROUP)}\n"
        "sub = next(a for a in build_parser()._actions if a.dest == 'command')\n"
        "print(json.dumps({'entry_points': names, 'commands': sorted(sub.choices),\n"
        "                  'help': {a.dest: a.help for a in sub._choices_actions}}))\n")
    assert out["entry_points"] == {"training": "training.cli:register"}, (
        "the installed metadata lacks the entry point: reinstall (bash scripts/setup.sh, or "
        "pip install -e . --no-deps)")
    assert {"train", "evaluate", "prepare"} <= set(out["commands"])
    assert out["help"]["train"] == "train a single-image model or a ControlNet (accelerate)"
    assert out["help"]["evaluate"] == "compare generated images with a validation set (SSIM, PSNR, FID, LPIPS)"
    assert out["help"]["prepare"] == "cut GeoTIFFs into training shards"
