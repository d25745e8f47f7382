"""Plugin lifecycle (classFactory, initGui, unload), the ZIP and the dev install."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import zipfile

import pytest
from qgis.core import QgsApplication
from qgis.PyQt.QtWidgets import QApplication

from .conftest import REPO

REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "tracker", "repository", "homepage", "tags", "icon", "experimental")


def test_init_gui_and_unload_leave_no_trace(qgis_iface, plugin_settings, qgis_new_project):
    import qgis_plugin

    registry = QgsApplication.processingRegistry()
    plugin = qgis_plugin.classFactory(qgis_iface)
    plugin.initGui()
    assert registry.providerById("diffusionsat") is plugin.provider
    assert plugin.dock is not None and plugin.toolbar is not None
    names = [a.text() for a in plugin.actions]
    assert names == ["DiffusionSat panel", "Draw extent to generate", "Engine settings…",
                     "Copy diagnostics (Markdown)", "User guide"]
    assert not plugin.actions[0].icon().isNull()
    plugin.action_dock.trigger()
    assert plugin.dock.isVisible() or plugin.action_dock.isChecked()
    assert [plugin.dock.tabs.tabText(i) for i in range(plugin.dock.tabs.count())] == [
        "Generate", "In-paint", "Super-resolve", "Temporal", "Extend"]
    plugin.unload()
    assert registry.providerById("diffusionsat") is None
    assert plugin.dock is None and plugin.toolbar is None and plugin.actions == []


def test_processing_only_start_without_a_gui():
    """What qgis_process does: classFactory(None) and initProcessing()."""
    import qgis_plugin

    plugin = qgis_plugin.classFactory(None)
    plugin.initProcessing()
    try:
        assert QgsApplication.processingRegistry().algorithmById("diffusionsat:generate") is not None
    finally:
        plugin.unload()


def test_diagnostics_are_copied_as_markdown(plugin, qgis_iface, engine_env):
    text = plugin.copy_diagnostics()
    assert QApplication.clipboard().text() == text
    assert text.startswith("### DiffusionSat for QGIS — diagnostics")
    for needle in ("- QGIS: 3.", "- QGIS Python: 3.", "- OS: ", "- engine version: 0.", "- engine device: cpu",
                   "- engine models: tiny"):
        assert needle in text


def test_settings_dialog_round_trip(plugin, tmp_path):
    from qgis_plugin.settings import MODE_REMOTE, PluginSettings
    from qgis_plugin.ui.settings_dialog import EngineSettingsDialog

    dialog = EngineSettingsDialog(plugin.settings(), check=plugin.check_engine)
    dialog.remote.setChecked(True)
    dialog.url.setText("http://127.0.0.1:9")
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    dialog.token_file.setFilePath(str(token))
    values = dialog.values()
    assert values.mode == MODE_REMOTE and values.token_file == str(token)
    dialog.test_connection()
    assert dialog.status.text().startswith("Not OK") and "127.0.0.1:9" in dialog.status.text()
    values.save()
    loaded = PluginSettings.load()
    assert (loaded.mode, loaded.url, loaded.token_file) == (MODE_REMOTE, "http://127.0.0.1:9", str(token))
    # The token itself is never a setting.
    from qgis.core import QgsSettings

    assert "secret-token" not in repr({k: QgsSettings().value(k) for k in QgsSettings().allKeys()})


def test_plugin_code_keeps_to_the_rules():
    """No numpy/torch at module level, Qt only through qgis.PyQt, no shell=True, no bare except."""
    for path in (REPO / "qgis_plugin").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^(import|from) (numpy|torch|rasterio)\b", text, re.M), path
        assert not re.search(r"^\s*(import|from) PyQt[56]", text, re.M), path
        assert "shell=True" not in text, path
        assert not re.search(r"except\s*:", text), path
    assert "torch" not in sys.modules and "rasterio" not in sys.modules


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "package_plugin.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return out / run.stdout.strip().split("/")[-1]


def test_zip_layout_and_metadata(plugin_zip):
    assert plugin_zip.name == "diffusionsat-0.1.0.zip"
    with zipfile.ZipFile(plugin_zip) as zf:
        names = zf.namelist()
        meta_text = zf.read("diffusionsat/metadata.txt").decode()
    assert all(n.startswith("diffusionsat/") for n in names)
    for needed in ("diffusionsat/__init__.py", "diffusionsat/plugin.py", "diffusionsat/engine_client.py",
                   "diffusionsat/processing/provider.py", "diffusionsat/ui/dock.py", "diffusionsat/LICENSE",
                   "diffusionsat/icons/diffusionsat.svg"):
        assert needed in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so", ".dll", ".exe"))]
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(meta_text)
    general = meta["general"]
    for key in REQUIRED_METADATA:
        assert general.get(key, "").strip(), key
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["hasProcessingProvider"] == "yes"
    assert f"diffusionsat/{general['icon']}" in names


def test_zip_installs_into_a_fresh_profile_and_loads(plugin_zip, tmp_path, qgis_iface, plugin_settings, monkeypatch):
    """Unpack like Plugins → Install from ZIP, then load through qgis.utils as QGIS does."""
    import qgis.utils

    plugins_dir = tmp_path / "profiles" / "fresh" / "python" / "plugins"
    plugins_dir.mkdir(parents=True)
    with zipfile.ZipFile(plugin_zip) as zf:
        zf.extractall(plugins_dir)
    monkeypatch.syspath_prepend(str(plugins_dir))
    monkeypatch.setattr(qgis.utils, "plugin_paths", [str(plugins_dir)])
    qgis.utils.updateAvailablePlugins()
    assert "diffusionsat" in qgis.utils.available_plugins
    assert qgis.utils.pluginMetadata("diffusionsat", "name") == "DiffusionSat"
    assert qgis.utils.loadPlugin("diffusionsat")
    try:
        assert qgis.utils.startPlugin("diffusionsat")
        plugin = qgis.utils.plugins["diffusionsat"]
        assert type(plugin).__module__ == "diffusionsat.plugin"
        assert QgsApplication.processingRegistry().algorithmById("diffusionsat:generate") is not None
        assert not plugin.actions[0].icon().isNull()  # icons/ inside the installed folder
    finally:
        assert qgis.utils.unloadPlugin("diffusionsat")
    assert QgsApplication.processingRegistry().providerById("diffusionsat") is None
    for name in [m for m in sys.modules if m == "diffusionsat" or m.startswith("diffusionsat.")]:
        del sys.modules[name]


def test_dev_install_links_the_checkout_into_a_profile(tmp_path):
    run = subprocess.run(["bash", str(REPO / "scripts" / "dev_install_plugin.sh"), "devprofile"],
                         env={"QGIS_PROFILES_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dest = tmp_path / "devprofile" / "python" / "plugins" / "diffusionsat"
    assert (dest / "__init__.py").resolve() == REPO / "qgis_plugin" / "__init__.py"
    assert (dest / "metadata.txt").is_file() and (dest / "icons" / "diffusionsat.svg").is_file()
