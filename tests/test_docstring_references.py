"""Docstrings' cross-references (``:func:`x```, ``:class:`~a.b.C```, ...) name things that exist.

After names move between modules, an unqualified ``:func:`run_tiled``` in a module that no longer
defines or imports ``run_tiled`` sends a reader looking in the wrong file. Read with ``ast`` (no
imports): a bare name must be defined or imported in its module (or be a method of one of its
classes, or a builtin); a dotted ``engine.``/``training.`` name must be defined in the module it
names; ``.name`` is a sibling module.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "training")
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`~?([A-Za-z_.][A-Za-z0-9_.]*)`")


def _module_file(dotted: str, root: Path) -> Path | None:
    path = root.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _names(path: Path) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """A module's own names (defined at its top level, or lazily through a ``_LAZY`` table), the
    names it imports, and each class's members (methods, class attributes, ``self.x`` attributes)."""
    tree = ast.parse(path.read_text())
    own: set[str] = set()
    imported: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        if isinstance(node, ast.ClassDef):
            found = members.setdefault(node.name, set())
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.add(sub.name)
                elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    found.add(sub.id)
                elif (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                      and isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                    found.add(sub.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    own.add(t.id)
                    if t.id == "_LAZY" and isinstance(node.value, ast.Dict):
                        own.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return own, imported, members


def _defined(path: Path, parts: list[str], *, imports_count: bool) -> bool:
    """``parts`` (a name, or Class.member) is defined in ``path`` (or, for a bare name in the
    module's own docstrings, imported there: the reader finds where it comes from)."""
    own, imported, members = _names(path)
    if not parts:
        return True
    if len(parts) == 1:
        return (parts[0] in own or (imports_count and parts[0] in imported) or parts[0] in dir(builtins)
                or any(parts[0] in m for m in members.values()))
    if parts[0] in members:
        return parts[1] in members[parts[0]]
    return imports_count and parts[0] in imported  # an attribute of an imported module: not followed


def _resolves(ref: str, path: Path, package: str, root: Path) -> bool:
    if ref.startswith("."):
        return _module_file(f"{package}{ref}", root) is not None
    parts = ref.split(".")
    if parts[0] not in PACKAGES:
        if len(parts) > 1 and parts[0] not in _names(path)[2]:
            return True  # another library's name (fastapi.APIRouter)
        return _defined(path, parts, imports_count=True)
    for i in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:i]), root)
        if module is not None:
            # a package's __init__ re-exports its public names; another module must define them
            return _defined(module, parts[i:], imports_count=module.name == "__init__.py")
    return False


def broken_references(root: Path = ROOT) -> list[str]:
    found = []
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            package = ".".join(rel.parent.parts)
            for line_no, line in enumerate(path.read_text().splitlines(), start=1):
                for ref in ROLE.findall(line):
                    if not _resolves(ref.rstrip("."), path, package, root):
                        found.append(f"{rel}:{line_no}: {ref}")
    return found


def test_docstring_references_resolve():
    assert broken_references() == []


def test_the_checker_finds_a_moved_name(tmp_path):
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (tmp_path / "training").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text('"""See :func:`helper` and :class:`~engine.b.Gone`."""\n'
                              'from .b import Kept\n\ndef own():\n    """:func:`own`, :class:`Kept`."""\n')
    (pkg / "b.py").write_text("class Kept:\n    def go(self):\n        pass\n")
    assert broken_references(tmp_path) == ["engine/a.py:1: helper", "engine/a.py:1: engine.b.Gone"]
