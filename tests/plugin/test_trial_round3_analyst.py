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
    # 100 km east and south of the layer: a 10,000 × 10,000 px grid at 10 m
    tab.set_extent(QgsRectangle(ORIGIN[0] + 99_000, ORIGIN[1] - 100_000, ORIGIN[0] + 100_000, ORIGIN[1] - 99_000),
                   UTM)
    tab.steps.setValue(1)
    task = run_and_wait(qtbot, tab, 120_000)
    assert task.outcome is None and task.error
    said = plugin.dock.plan_label.text()
    assert "over the limit" in said, said
    assert "a smaller new extent" in said and "a smaller the" not in said, said
    assert "raise a smaller" not in said and "--" not in said, said
    assert "pixel limit the engine was started with" in said, said
