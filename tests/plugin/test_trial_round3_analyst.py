"""What a GIS analyst met trying Extend, Uncertainty and the five-tab dock in the real QGIS GUI
(issue 14, trial round 3), each pinned here with real QGIS (offscreen), real GeoTIFFs and the real
engine server with the tiny model."""

from __future__ import annotations

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

from .conftest import require_task
from .helpers import ORIGIN, make_rgb_geotiff
from .test_dock import add_layer, run_and_wait

UTM = QgsCoordinateReferenceSystem("EPSG:32633")


def test_an_extend_over_the_engines_pixel_limit_is_refused_in_plain_words(plugin, engine_env, qtbot, tmp_path):
    """An extent drawn far from the layer grows the grid past the engine's pixel limit: the engine
    refuses it, and the dock said "choose a smaller the new extent (or raise a smaller new extent)"."""
    require_task(engine_env, "extend")
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif"), "scene")
    tab = plugin.dock.extend
    tab.layer.setLayer(layer)
    # from the layer out to 100 km east and south: a 10,000 × 10,000 px grid at 10 m
    tab.set_extent(QgsRectangle(ORIGIN[0], ORIGIN[1] - 100_000, ORIGIN[0] + 100_000, ORIGIN[1]), UTM)
    tab.steps.setValue(1)
    task = run_and_wait(qtbot, tab, 120_000)
    assert task.outcome is None and task.error
    said = plugin.dock.plan_label.text()
    assert "over the limit" in said, said
    assert "a smaller new extent" in said and "a smaller the" not in said, said
    assert "raise a smaller" not in said and "--" not in said, said
    assert "pixel limit the engine was started with" in said, said


def _visible_task_titles(dock) -> list[str]:
    """The task names as the user sees them: the tab titles as drawn (elided to the tab's width) when
    the tab bar shows, else the task selector's entries."""
    from qgis.PyQt.QtCore import Qt

    bar = dock.tabs.tabBar()
    if bar.isVisible():
        metrics, icon_px = bar.fontMetrics(), bar.iconSize().width()
        return [metrics.elidedText(bar.tabText(i), Qt.TextElideMode.ElideRight,
                                   max(0, bar.tabRect(i).width() - icon_px - 28)) for i in range(bar.count())]
    selector = dock.task_selector
    assert selector.isVisible()
    return [selector.itemText(i) for i in range(selector.count())]


@pytest.mark.parametrize("width", [400, 300])
def test_every_task_title_is_readable_in_a_typical_dock(plugin, qtbot, width):
    """Seen under Xvfb: at QGIS's usual dock width (~400 px) the five tabs read "Ge…", "In…", "Supe…",
    "Te…", "Ex…". The dock now swaps the tab bar for a task selector when the titles do not fit."""
    from qgis.PyQt.QtWidgets import QApplication

    dock = plugin.dock
    dock.setFloating(True)
    dock.resize(width, 700)
    dock.show()
    qtbot.waitExposed(dock)
    QApplication.processEvents()
    try:
        assert _visible_task_titles(dock) == ["Generate", "In-paint", "Super-resolve", "Temporal", "Extend"]
        if not dock.tabs.tabBar().isVisible():  # the selector switches the pages, and follows them
            selector = dock.task_selector
            assert selector.width() >= selector.fontMetrics().horizontalAdvance("Super-resolve") + 16
            selector.setCurrentIndex(4)
            assert dock.tabs.currentWidget() is dock.extend
            dock.tabs.setCurrentIndex(2)
            assert selector.currentIndex() == 2 and selector.currentText() == "Super-resolve"
        # wide enough for the titles: the tabs come back
        dock.resize(900, 700)
        QApplication.processEvents()
        assert dock.tabs.tabBar().isVisible() and not dock.task_selector.isVisible()
        assert _visible_task_titles(dock) == ["Generate", "In-paint", "Super-resolve", "Temporal", "Extend"]
    finally:
        dock.hide()


def test_a_job_without_uncertainty_adds_no_spread_layer_and_forgets_the_last_one(plugin, engine_env, qtbot,
                                                                                tmp_path):
    """In-paint with Uncertainty 2 seeds adds a styled spread layer under the result; the next job with
    Uncertainty off adds none, and the plugin no longer reports the previous job's spread layer as its
    own (``last_spread_layer`` kept pointing at it)."""
    from qgis.core import QgsProject

    from qgis_plugin.layers import GROUP_NAME

    require_task(engine_env, "inpaint")
    layer = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif", hole=True), "rgb with hole")
    tab = plugin.dock.inpaint
    assert tab.spread.value() == 1 and tab.spread.specialValueText() == "off"  # off in a fresh profile
    tab.layer.setLayer(layer)
    tab.kind_nodata.setChecked(True)
    tab.steps.setValue(1)
    tab.spread.setValue(2)
    task = run_and_wait(qtbot, tab, 300_000)
    assert task.error is None, task.error
    first, spread = plugin.last_layer, plugin.last_spread_layer
    assert spread is not None and spread.renderer().type() == "singlebandpseudocolor"
    tab.spread.setValue(1)
    task = run_and_wait(qtbot, tab, 300_000)
    assert task.error is None, task.error
    assert plugin.last_layer is not first and plugin.last_spread_layer is None
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME)
    spreads = [n for n in group.findLayers() if n.layer().source().endswith(".spread.tif")]
    assert [n.layerId() for n in spreads] == [spread.id()]


def test_an_extent_drawn_away_from_the_layer_is_said_to_be_so(plugin, engine_env, qtbot, tmp_path):
    """Drawn beside the layer (not touching it), the Extend tab's text only said "+298 right, +199
    bottom": it now says so, and that Extend grows the layer outward (the engine refuses a gap)."""
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif"), "scene")
    tab = plugin.dock.extend
    tab.layer.setLayer(layer)
    # the layer: x 290000..290640, y 4641360..4642000; 2 km east of it, no overlap
    tab.set_extent(QgsRectangle(ORIGIN[0] + 2640, ORIGIN[1] - 640, ORIGIN[0] + 3000, ORIGIN[1]), UTM)
    assert "does not touch the layer" in tab.info.text() and "+236 right" in tab.info.text()
    assert "draw the new extent around the layer" in tab.info.text()  # the engine refuses a gap
    # around the layer (the usual case): no such note
    tab.set_extent(QgsRectangle(ORIGIN[0] - 100, ORIGIN[1] - 740, ORIGIN[0] + 740, ORIGIN[1] + 100), UTM)
    assert "does not touch" not in tab.info.text() and "+10 left" in tab.info.text()
    # run away from it: the engine refuses the gap, in the dock's words
    require_task(engine_env, "extend")
    tab.set_extent(QgsRectangle(ORIGIN[0] + 2640, ORIGIN[1] - 640, ORIGIN[0] + 3000, ORIGIN[1]), UTM)
    tab.steps.setValue(1)
    task = run_and_wait(qtbot, tab, 120_000)
    assert task.outcome is None and task.error
    said = plugin.dock.plan_label.text()
    assert "does not touch" in said and "--" not in said, said
