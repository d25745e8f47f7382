"""Who may import whom (docs/design.md): the rules, read from the source with ``ast``.

Every import counts: at the top of a module, inside functions (the lazy ones), relative ones, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.

* the engine imports nothing of ``training`` (training registers its commands through an entry
  point, see ``engine.cli.COMMANDS_GROUP``);
* the QGIS plugin imports nothing of the engine or training, nor torch and the other libraries
  QGIS's Python does not have, nor what only NumPy 2 has (QGIS ships NumPy 1 on many systems);
* the models and pipelines know no rasters, no server and no command line: they import nothing of
  ``engine.geo``, ``engine.server`` or ``engine.cli``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Libraries QGIS's own Python does not ship (or that only the engine's environment has).
NOT_IN_QGIS = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors",
               "huggingface_hub", "tokenizers", "torchmetrics", "pydantic", "fastapi", "uvicorn", "rasterio",
               "pyproj", "shapely", "pyogrio")
#: Modules only NumPy 2 has.
NUMPY2_ONLY = ("numpy._core", "numpy.exceptions", "numpy.dtypes")


@dataclass(frozen=True)
class Rule:
    name: str
    files: str  #: a folder (relative to the root) whose .py files the rule is about
    forbidden: tuple[str, ...]  #: module names (and everything under them) those files may not import


RULES = (
    Rule("engine imports nothing of training", "engine", ("training",)),
    Rule("the plugin imports nothing of the engine, training, torch or NumPy 2", "qgis_plugin",
         ("engine", "training") + NOT_IN_QGIS + NUMPY2_ONLY),
    Rule("models know no geo, server or CLI", "engine/models", ("engine.geo", "engine.server", "engine.cli")),
    Rule("pipelines know no geo, server or CLI", "engine/pipelines",
         ("engine.geo", "engine.server", "engine.cli")),
)


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """The dotted module name of ``path`` under ``root``, and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imports(root: Path, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``path`` imports, as absolute dotted names, with its line."""
    module, is_package = module_name(root, path)
    package = module.split(".") if is_package else module.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base, node.lineno
            for alias in node.names:  # `from engine import geo` imports engine.geo
                if alias.name != "*":
                    yield f"{base}.{alias.name}", node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield first.value, node.lineno


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path, rule: Rule) -> list[str]:
    folder = root / rule.files
    found = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(root)
        for name, line in imports(root, path):
            if any(_under(name, bad) for bad in rule.forbidden):
                found.append(f"{rel}:{line} imports {name}")
    return sorted(set(found))


# ---- the rules on this repository ---------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=[r.files for r in RULES])
def test_import_rules(rule):
    assert (ROOT / rule.files).is_dir(), rule.files
    assert violations(ROOT, rule) == [], rule.name


# ---- the checker itself can fail ----------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in tmp_path.rglob("*.py")}:
        while folder != tmp_path and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
            folder = folder.parent
    return tmp_path


def test_the_checker_finds_each_kind_of_import(tmp_path):
    root = _tree(tmp_path, {
        "engine/cli.py": "def f():\n    from training.cli import register\n",
        "engine/a.py": "import training\n",
        "engine/b.py": "import importlib\nimportlib.import_module('training.trainer')\n",
        "engine/models/loading.py": "def f():\n    from ..geo import grid\n",
        "engine/models/sub/deep.py": "from ...server.errors import ApiError\nfrom engine import cli\n",
        "engine/pipelines/__init__.py": "from ..geo.grid import Grid\n",
        "qgis_plugin/dock.py": "from engine.errors import DiffusionSatError\nimport numpy._core as c\n",
        "qgis_plugin/task.py": "def run():\n    import torch\n",
    })
    by_rule = {rule.files: violations(root, rule) for rule in RULES}
    assert by_rule["engine"] == [
        "engine/a.py:1 imports training",
        "engine/b.py:2 imports training.trainer",
        "engine/cli.py:2 imports training.cli",
        "engine/cli.py:2 imports training.cli.register",
    ]
    assert by_rule["engine/models"] == [
        "engine/models/loading.py:2 imports engine.geo",
        "engine/models/loading.py:2 imports engine.geo.grid",
        "engine/models/sub/deep.py:1 imports engine.server.errors",
        "engine/models/sub/deep.py:1 imports engine.server.errors.ApiError",
        "engine/models/sub/deep.py:2 imports engine.cli",
    ]
    assert by_rule["engine/pipelines"] == [
        "engine/pipelines/__init__.py:1 imports engine.geo.grid",
        "engine/pipelines/__init__.py:1 imports engine.geo.grid.Grid",
    ]
    assert by_rule["qgis_plugin"] == [
        "qgis_plugin/dock.py:1 imports engine.errors",
        "qgis_plugin/dock.py:1 imports engine.errors.DiffusionSatError",
        "qgis_plugin/dock.py:2 imports numpy._core",
        "qgis_plugin/task.py:2 imports torch",
    ]


def test_the_checker_passes_what_is_allowed(tmp_path):
    root = _tree(tmp_path, {
        "engine/cli.py": "from importlib.metadata import entry_points\nfrom .errors import X\n",
        "engine/geo/cog.py": "from ..atomic import atomic_path\nfrom ..models import weights\n",
        "engine/models/loading.py": "from ..errors import ModelNotFound\nfrom .unet import SatUNet\n"
                                    "import engine.geography_facts\n",
        "engine/pipelines/base.py": "from ..models.loading import load_model\n",
        "training/cli.py": "from engine.cli import main\n",
        "qgis_plugin/dock.py": "import numpy as np\nfrom qgis.core import QgsProject\nfrom .client import Client\n",
    })
    assert {rule.files: violations(root, rule) for rule in RULES} == {rule.files: [] for rule in RULES}
