"""Form values remembered per project (QgsProject entries) and per user (QgsSettings).

A value is written to both places when a job starts; reading prefers the project's value (the
forms come back as they were in this project), then the user's last value, then the default.
Layer ids are meaningful in one project only and are kept in the project alone.
"""

from __future__ import annotations

from typing import Any, Optional

from qgis.core import QgsProject, QgsSettings

SCOPE = "DiffusionSat"
USER_PREFIX = "DiffusionSat/forms/"


def _project(project: Optional[QgsProject]) -> QgsProject:
    return project or QgsProject.instance()


def save(key: str, value: Any, *, project: Optional[QgsProject] = None, user: bool = True,
         qsettings: Optional[QgsSettings] = None) -> None:
    """Remember ``value`` (str, int, float or bool) under ``key`` (``generate/prompt``)."""
    text = _encode(value)
    _project(project).writeEntry(SCOPE, "forms/" + key, text)
    if user:
        (qsettings or QgsSettings()).setValue(USER_PREFIX + key, text)


def load(key: str, default: Any, *, project: Optional[QgsProject] = None, user: bool = True,
         qsettings: Optional[QgsSettings] = None) -> Any:
    """The remembered value of ``key`` converted to ``type(default)``; ``default`` if none."""
    text, ok = _project(project).readEntry(SCOPE, "forms/" + key, "")
    if not (ok and text != ""):
        text = (qsettings or QgsSettings()).value(USER_PREFIX + key, "") if user else ""
    if text in ("", None):
        return default
    return _decode(str(text), default)


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _decode(text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(float(text))
        if isinstance(default, float):
            return float(text)
    except ValueError:
        return default
    return text
