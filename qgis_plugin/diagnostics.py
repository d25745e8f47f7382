"""Versions for bug reports: QGIS, Qt, Python, OS, the plugin and the engine, as Markdown."""

from __future__ import annotations

import platform
import sys
from typing import Optional

from qgis.core import Qgis
from qgis.PyQt.QtCore import QT_VERSION_STR

from .compat import plugin_metadata


def engine_lines(spec, manager=None, timeout: float = 3.0) -> list[str]:
    """What the engine says about itself, without starting one."""
    from .engine_client import EngineClient, EngineError

    if spec is None:
        return ["- engine: not configured"]
    lines = [f"- engine: {spec.describe()}"]
    url = spec.url if spec.mode == "remote" else (manager.local_url() if manager else None)
    if not url:
        return lines + ["- engine state: local engine not started yet"]
    token = spec.token
    if spec.mode != "remote" and manager is not None and manager._local is not None:  # noqa: SLF001
        token = manager._local.token  # noqa: SLF001
    client = EngineClient(url, token, timeout=timeout)
    try:
        health = client.health()
    except EngineError as err:
        return lines + [f"- engine state: unreachable ({err})"]
    lines.append(f"- engine version: {health.get('version')} ({health.get('status')})")
    gpu = f"{health.get('device')} / {health.get('dtype')}"
    if health.get("cuda"):
        gpu += f", CUDA, {health.get('free_vram_mb')} of {health.get('total_vram_mb')} MB free"
    lines.append(f"- engine device: {gpu}")
    try:
        models = client.models()
        names = ", ".join(f"{m.get('name')} ({'/'.join(m.get('tasks') or [])})" for m in models.get("models", []))
        lines.append(f"- engine models: {names or 'none'}")
    except EngineError as err:
        lines.append(f"- engine models: not listed ({err})")
    return lines


def report(spec=None, manager=None, error: Optional[str] = None) -> str:
    meta = plugin_metadata()
    lines = [
        "### DiffusionSat for QGIS — diagnostics",
        "",
        f"- plugin: {meta.get('version', '?')}",
        f"- QGIS: {Qgis.QGIS_VERSION} (Qt {QT_VERSION_STR})",
        f"- QGIS Python: {sys.version.split()[0]} ({sys.executable})",
        f"- OS: {platform.platform()} ({platform.machine()})",
    ]
    try:
        from osgeo import gdal

        lines.append(f"- GDAL (QGIS): {gdal.__version__}")
    except ImportError:
        lines.append("- GDAL (QGIS): not importable")
    if error:
        lines.append(f"- engine settings: {error}")
    else:
        lines.extend(engine_lines(spec, manager))
    return "\n".join(lines) + "\n"
