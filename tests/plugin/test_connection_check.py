"""The settings dialog's "Test connection" tests what the first job will do."""

from __future__ import annotations

import sys

import pytest

from .conftest import engine_missing_reason, engine_python


def _dialog(plugin, python: str):
    from qgis_plugin.settings import MODE_LOCAL
    from qgis_plugin.ui.settings_dialog import EngineSettingsDialog

    settings = plugin.settings()
    settings.mode = MODE_LOCAL
    settings.python = python
    dialog = EngineSettingsDialog(settings, check=plugin.check_engine)
    return dialog


def test_an_interpreter_without_the_engine_is_not_ok(plugin, monkeypatch):
    monkeypatch.delenv("DIFFUSIONSAT_URL", raising=False)
    # QGIS's own Python (this one): it has no engine, which is the usual mistake.
    dialog = _dialog(plugin, sys.executable)
    dialog.test_connection()
    text = dialog.status.text()
    assert text.startswith("Not OK"), text
    assert "No module named" in text and "engine" in text and sys.executable in text


def test_the_engine_interpreter_reports_version_and_models(plugin, monkeypatch):
    reason = engine_missing_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.delenv("DIFFUSIONSAT_URL", raising=False)
    dialog = _dialog(plugin, str(engine_python()))
    dialog.test_connection()
    text = dialog.status.text()
    assert text.startswith("OK"), text
    assert "runs engine 0." in text and "tiny" in text
