#!/usr/bin/env python3
"""Build the installable QGIS plugin ZIP: dist/diffusionsat-<version>.zip.

    python3 scripts/package_plugin.py [--out DIR]

The ZIP holds one folder, ``diffusionsat/``: the contents of ``qgis_plugin/`` (Python and nothing
else: no __pycache__, no compiled files, no binaries), ``metadata.txt``, ``LICENSE`` and
``icons/`` (from ``resources/icons``). Install it in QGIS with Plugins → Manage and Install
Plugins → Install from ZIP. Standard library only; prints the ZIP's path.
"""

from __future__ import annotations

import argparse
import configparser
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FOLDER = "diffusionsat"
#: Files copied from qgis_plugin/ (plugins.qgis.org refuses binaries; QGIS needs no more).
CODE_SUFFIXES = {".py", ".svg", ".png", ".ui", ".qml", ".json", ".txt", ".md"}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def plugin_version(metadata: Path) -> str:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(metadata, encoding="utf-8")
    try:
        return parser["general"]["version"].strip()
    except KeyError:
        sys.exit(f"package_plugin: {metadata} has no [general] version")


def plugin_files(root: Path = ROOT) -> list[tuple[Path, str]]:
    """(source file, path inside the ZIP) for every file of the plugin, sorted."""
    files: list[tuple[Path, str]] = []
    code = root / "qgis_plugin"
    for path in sorted(code.rglob("*")):
        rel = path.relative_to(code)
        if path.is_dir() or any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() not in CODE_SUFFIXES:
            continue
        files.append((path, f"{PLUGIN_FOLDER}/{rel.as_posix()}"))
    for icon in sorted((root / "resources" / "icons").glob("*.svg")):
        files.append((icon, f"{PLUGIN_FOLDER}/icons/{icon.name}"))
    for name in ("metadata.txt", "LICENSE"):
        path = root / name
        if not path.is_file():
            sys.exit(f"package_plugin: {path} is missing")
        files.append((path, f"{PLUGIN_FOLDER}/{name}"))
    return files


def build(out_dir: Path, root: Path = ROOT) -> Path:
    version = plugin_version(root / "metadata.txt")
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{PLUGIN_FOLDER}-{version}.zip"
    tmp = dest.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for src, arcname in plugin_files(root):
            # A fixed timestamp makes the ZIP reproducible from the same sources.
            info = zipfile.ZipInfo(arcname, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, src.read_bytes())
    tmp.replace(dest)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
