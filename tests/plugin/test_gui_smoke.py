"""GUI smoke test: the real dock driven by mouse and keyboard (offscreen) through the four
workflows against the real engine (tiny model), with a screenshot of map + dock at each step.

The screenshots go to ``<pytest tmp>/screenshots`` (the path is printed; ``pytest -s`` shows it);
with ``DIFFUSIONSAT_SCREENSHOTS=1`` they go to ``docs/`` for the user guide instead.
"""

from __future__ import annotations

import datetime as dt
import os

from qgis.core import QgsLayerTreeModel, QgsProject, QgsRectangle
from qgis.gui import QgsLayerTreeView
from qgis.PyQt.QtCore import QDate, QItemSelectionModel, QPoint, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter
from qgis.PyQt.QtWidgets import QApplication

from qgis_plugin.results import SYNTHETIC_MARK

from .conftest import REPO, require_task, wait_for_task
from .helpers import make_rgb_geotiff, make_s2_geotiff
from .test_dock import S2_BANDS, UTM, add_layer, drag, set_canvas
from .test_usability import KEEP_ALIVE


def shots_dir(tmp_path):
    if os.environ.get("DIFFUSIONSAT_SCREENSHOTS") == "1":
        return REPO / "docs"
    return tmp_path / "screenshots"


class Shooter:
    """Screenshots of the map canvas and the dock side by side."""

    def __init__(self, folder, canvas, dock) -> None:
        self.folder, self.canvas, self.dock = folder, canvas, dock
        self.folder.mkdir(parents=True, exist_ok=True)
        self.saved = []

    def __call__(self, name: str, qtbot) -> str:
        with qtbot.waitSignal(self.canvas.mapCanvasRefreshed, timeout=20_000):
            self.canvas.refreshAllLayers()
        QApplication.processEvents()
        left, right = self.canvas.grab().toImage(), self.dock.grab().toImage()
        image = QImage(left.width() + right.width() + 8, max(left.height(), right.height()),
                       QImage.Format.Format_RGB32)
        image.fill(QColor(200, 200, 200))
        painter = QPainter(image)
        painter.drawImage(0, 0, left)
        painter.drawImage(left.width() + 8, 0, right)
        painter.end()
        path = self.folder / f"plugin-{name}.png"
        assert image.save(str(path)), path
        self.saved.append(path)
        return str(path)


def _click_run(qtbot, plugin, tab):
    before = set(plugin._tasks)
    qtbot.mouseClick(tab.run_button, Qt.MouseButton.LeftButton)
    started = set(plugin._tasks) - before
    assert len(started) == 1, plugin.dock.plan_label.text()
    return started.pop()


def test_gui_smoke_all_workflows_with_screenshots(plugin, engine_env, qgis_canvas, qgis_iface, qtbot, tmp_path,
                                                  monkeypatch):
    for task in ("inpaint", "superres", "temporal"):
        require_task(engine_env, task)
    folder = shots_dir(tmp_path)
    print(f"\nGUI smoke test screenshots: {folder}")
    dock = plugin.dock
    dock.setFloating(True)
    dock.resize(380, 760)
    dock.show()
    window = qgis_canvas.window()  # pytest-qgis puts the canvas in a parent widget: show that
    window.resize(640, 760)
    qgis_canvas.resize(640, 760)
    window.show()
    qgis_canvas.show()
    qtbot.waitExposed(dock)
    qtbot.waitExposed(qgis_canvas)
    qtbot.waitUntil(lambda: qgis_canvas.viewport().width() > 500, timeout=5000)
    shoot = Shooter(folder, qgis_canvas, dock)

    # A base layer on the map.
    base = add_layer(make_rgb_geotiff(tmp_path / "base.tif", size=96, gsd=60.0, seed=3), "base map")
    view_extent = QgsRectangle(base.extent())
    qgis_canvas.setLayers([base])
    set_canvas(qgis_canvas, UTM, view_extent)

    # -- Generate: draw with the mouse, type, click ---------------------------------------------------
    tab = dock.generate
    dock.tabs.setCurrentWidget(tab)
    with qtbot.waitSignal(qgis_canvas.mapCanvasRefreshed, timeout=20_000):
        qgis_canvas.refreshAllLayers()
    qtbot.mouseClick(tab.draw_button, Qt.MouseButton.LeftButton)
    assert qgis_canvas.mapTool() is plugin.extent_tool
    drag(qtbot, qgis_canvas, QPoint(160, 200), QPoint(480, 520))
    assert tab.extent is not None and qgis_canvas.mapTool() is not plugin.extent_tool
    # The rectangle drawn is inside the view (half its width), and outlined.
    view = qgis_canvas.extent()
    assert view.contains(tab.extent) and 0.4 < tab.extent.width() / view.width() < 0.6
    assert tab.outline is not None and tab.outline.isVisible()
    tab.prompt.clear()
    qtbot.keyClicks(tab.prompt, "a satellite image of farmland")
    tab.date.setDate(QDate(2021, 6, 15))
    tab.seed.setValue(42)
    shoot("generate-drawn", qtbot)
    task = _click_run(qtbot, plugin, tab)
    qtbot.waitUntil(lambda: "step" in dock.progress.text() or task.outcome is not None or task.error is not None,
                    timeout=120_000)
    shoot("generate-running", qtbot)
    # (the job may have finished while the screenshot was taken: the plugin drops it when done)
    qtbot.waitUntil(lambda: task not in plugin._tasks, timeout=120_000)
    assert task.error is None, task.error
    generated = plugin.last_layer
    assert generated.name().startswith("Generated · 2021-06-15 · seed 42") and SYNTHETIC_MARK in generated.name()
    qgis_canvas.setLayers([generated, base])
    shoot("generate", qtbot)

    # -- In-paint: the layer's nodata ------------------------------------------------------------------
    holed = add_layer(make_rgb_geotiff(tmp_path / "holed.tif", size=64, hole=True, seed=5), "scene with gap")
    tab = dock.inpaint
    dock.tabs.setCurrentWidget(tab)
    tab.layer.setLayer(holed)
    qtbot.mouseClick(tab.kind_nodata, Qt.MouseButton.LeftButton)
    assert tab.kind_nodata.isChecked()
    qgis_canvas.setLayers([holed])
    set_canvas(qgis_canvas, UTM, holed.extent())
    task = _click_run(qtbot, plugin, tab)
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    filled = plugin.last_layer
    assert filled.name().startswith("scene with gap · in-painted")
    qgis_canvas.setLayers([filled, holed])
    shoot("inpaint", qtbot)

    # -- Super-resolve: select the band layers, "Use the selected layers" --------------------------------
    bands = [add_layer(make_s2_geotiff(tmp_path / f"T33TTG_20210615_{b}_20m.tif", bands=(b,), size=16, seed=i),
                       f"T33TTG_20210615_{b}_20m") for i, b in enumerate(S2_BANDS)]
    view = QgsLayerTreeView()
    model = QgsLayerTreeModel(QgsProject.instance().layerTreeRoot(), view)  # kept alive by the view
    view.setModel(model)
    KEEP_ALIVE.append(view)  # deleting a view with pending events crashes Qt; keep it for the session
    for layer in reversed(bands):
        view.selectionModel().select(view.node2index(QgsProject.instance().layerTreeRoot().findLayer(layer.id())),
                                     QItemSelectionModel.SelectionFlag.Select)
    monkeypatch.setattr(qgis_iface, "layerTreeView", lambda: view)
    tab = dock.superres
    dock.tabs.setCurrentWidget(tab)
    qtbot.mouseClick(tab.use_selected, Qt.MouseButton.LeftButton)
    assert [n for _, n in tab.band_rows()] == list(S2_BANDS)
    tab.factor.setValue(2)
    task = _click_run(qtbot, plugin, tab)
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    sharp = plugin.last_layer
    assert sharp.width() == 32 and "super-resolved · ×2 · 2021-06-15" in sharp.name()
    qgis_canvas.setLayers([sharp])
    set_canvas(qgis_canvas, UTM, sharp.extent())
    shoot("superres", qtbot)

    # -- Temporal: tick dated layers, choose the date ------------------------------------------------------
    from qgis_plugin.layers import set_temporal_range

    ids = []
    for i, day in enumerate((dt.date(2020, 5, 1), dt.date(2020, 7, 1))):
        layer = add_layer(make_rgb_geotiff(tmp_path / f"place_{i}.tif", seed=10 + i), f"place {day.isoformat()}")
        set_temporal_range(layer, day)
        ids.append(layer.id())
    tab = dock.temporal
    dock.tabs.setCurrentWidget(tab)
    tab.refresh_layers()
    tab.set_checked(ids)
    tab.date.setDate(QDate(2020, 6, 1))
    task = _click_run(qtbot, plugin, tab)
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    later = plugin.last_layer
    assert "for 2020-06-01" in later.name() and SYNTHETIC_MARK in later.name()
    qgis_canvas.setLayers([later])
    set_canvas(qgis_canvas, UTM, later.extent())
    shoot("temporal", qtbot)

    # -- Engine settings with the engine's model list -----------------------------------------------------
    from qgis_plugin.settings import MODE_REMOTE
    from qgis_plugin.ui.settings_dialog import EngineSettingsDialog

    settings = plugin.settings()
    settings.mode, settings.url, settings.token_file = MODE_REMOTE, engine_env.url, str(engine_env.token_file)
    dialog = EngineSettingsDialog(settings, None, models=plugin.engine_models)
    qtbot.mouseClick(dialog.load_models_button, Qt.MouseButton.LeftButton)
    assert dialog.model.count() >= 2
    dialog.show()
    qtbot.waitExposed(dialog)
    settings_png = folder / "plugin-settings.png"
    assert dialog.grab().save(str(settings_png))
    dialog.close()

    for path in shoot.saved + [settings_png]:
        image = QImage(str(path))
        assert not image.isNull() and image.width() > 300
        colours = {image.pixel(x, y) for x in range(0, image.width(), 23) for y in range(0, image.height(), 23)}
        assert len(colours) > 20, f"{path} looks blank"
    dock.hide()
