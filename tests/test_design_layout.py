"""docs/design.md's layout names every module of the engine and of training, in its own package.

A newcomer reads the layout to find where a thing lives; a module missing from it (or described
under another package) sends them grepping. The other direction (every name in the layout exists)
is tests/engine/test_docs_and_wording.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the packages whose modules the layout lists one by one
PACKAGES = ("engine", "engine/tasks", "engine/models", "engine/pipelines", "engine/geo", "engine/server",
            "training")


def layout_block(text: str) -> list[str]:
    section = text.split("## Layout", 1)[1]
    return section.split("```", 2)[1].splitlines()


def sections(lines: list[str]) -> dict[str, str]:
    """Package folder -> the layout's text about it (its line and the lines indented under it);
    ``engine`` gets its entries that are modules (``cli.py ...``), not its sub-packages."""
    found: dict[str, list[str]] = {}
    top = sub = None
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        if indent == 0:
            top, sub = first.rstrip("/"), None
            found.setdefault(top, []).append(line)
        elif indent == 2 and top is not None:
            sub = f"{top}/{first.rstrip('/')}" if first.endswith("/") else None
            found.setdefault(sub or top, []).append(line)
        elif top is not None:
            found.setdefault(sub or top, []).append(line)
    return {k: "\n".join(v) for k, v in found.items()}


def missing_modules(root: Path = ROOT) -> list[str]:
    parts = sections(layout_block((root / "docs" / "design.md").read_text()))
    missing = []
    for package in PACKAGES:
        text = parts.get(package, "")
        for module in sorted((root / package).glob("*.py")):
            if module.name != "__init__.py" and not re.search(rf"(?<![\w/]){re.escape(module.name)}\b", text):
                missing.append(f"{package}/{module.name}")
    return missing


def test_design_layout_lists_every_module():
    assert missing_modules() == []


def test_the_layout_parser_reads_sections_by_indentation():
    lines = ["engine/            the engine", "  cli.py             the CLI; atomic.py the writes",
             "  tasks/             run.py (runs), and", "                     checks.py (checks)",
             "  errors.py          errors", "training/          config.py (TrainConfig)"]
    got = sections(lines)
    assert "checks.py" in got["engine/tasks"] and "run.py" in got["engine/tasks"]
    assert "cli.py" in got["engine"] and "errors.py" in got["engine"] and "checks.py" not in got["engine"]
    assert "config.py" in got["training"]


def packages_missing_modules(root: Path = ROOT) -> list[str]:
    """Each package's docstring names its modules (:mod:`.name` or :mod:`engine.pkg.name`)."""
    import ast

    missing = []
    for init in sorted((root / "engine").rglob("__init__.py")):
        package = init.parent
        dotted = ".".join(package.relative_to(root).parts)
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in sorted(package.glob("*.py")) + sorted(p.parent for p in package.glob("*/__init__.py")):
            name = module.stem if module.suffix == ".py" else module.name
            if name == "__init__":
                continue
            if not re.search(rf":mod:`~?(?:\.|{re.escape(dotted)}\.){re.escape(name)}`", doc):
                missing.append(f"{dotted}: {name}")
    return [m for m in missing if not m.startswith("engine: ")]  # engine/'s modules: docs/design.md


def test_each_package_docstring_names_its_modules():
    assert packages_missing_modules() == []


def long_modules_without_a_reason(root: Path = ROOT, limit: int = 500) -> list[str]:
    """issue 16: no module in engine/ over ~500 lines without a reason stated at its top."""
    import ast

    found = []
    for path in sorted((root / "engine").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > limit and not re.search(r"over 500 lines|a little over 500 lines", doc, flags=re.I):
            found.append(f"{path.relative_to(root)} ({lines} lines)")
    return found


def test_long_modules_say_why_at_their_top():
    assert long_modules_without_a_reason() == []
