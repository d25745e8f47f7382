"""Screenshots of the dock and of a generated layer, rendered headless.

Normal runs render into a temporary folder (so rendering is tested without touching tracked
files); with ``DIFFUSIONSAT_SCREENSHOTS=1`` they are written to docs/plugin-dock.png and
docs/plugin-generated-layer.png.
"""

from __future__ import annotations

import os

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFillSymbol,
    QgsGeometry,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QDate, QSize
from qgis.PyQt.QtGui import QColor

from .conftest import REPO
from .test_dock import UTM, run_and_wait


def shots_dir(tmp_path):
    if os.environ.get("DIFFUSIONSAT_SCREENSHOTS") == "1":
        return REPO / "docs"
    return tmp_path


def test_screenshots_of_the_dock_and_a_generated_layer(plugin, engine_env, qtbot, tmp_path, qgis_canvas):
    folder = shots_dir(tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    extent = QgsRectangle(289000, 4639000, 294000, 4644600)
    tab = plugin.dock.generate
    tab.set_extent(extent, UTM)
    tab.size.setValue(256)
    tab.date.setDate(QDate(2021, 6, 15))
    tab.cloud_known.setChecked(True)
    tab.cloud.setValue(5)
    tab.prompt.setText("a satellite image of a stadium in a city")
    tab.seed.setValue(42)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    layer = plugin.last_layer
    plugin.dock.refresh_engine_label()

    dock = plugin.dock
    dock.setFloating(True)
    dock.resize(560, 660)
    dock.show()
    qtbot.waitExposed(dock)
    dock_png = folder / "plugin-dock.png"
    assert dock.grab().save(str(dock_png))
    assert dock_png.stat().st_size > 5000

    # The generated layer on the map, with the drawn extent outlined.
    outline = QgsVectorLayer(f"Polygon?crs={UTM.authid()}", "drawn extent", "memory")
    feat = QgsFeature()
    feat.setGeometry(QgsGeometry.fromRect(extent))
    outline.dataProvider().addFeatures([feat])
    outline.setRenderer(outline.renderer().clone())
    outline.renderer().setSymbol(QgsFillSymbol.createSimple(
        {"color": "0,0,0,0", "outline_color": "230,160,20,255", "outline_width": "1.2"}))
    settings = QgsMapSettings()
    settings.setLayers([outline, layer])
    settings.setDestinationCrs(QgsCoordinateReferenceSystem(UTM))
    view = QgsRectangle(extent)
    view.grow(700)
    settings.setExtent(view)
    settings.setOutputSize(QSize(800, 640))
    settings.setBackgroundColor(QColor(236, 240, 243))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    map_png = folder / "plugin-generated-layer.png"
    assert image.save(str(map_png))
    # Something was drawn in the middle (the layer), not just background.
    centre = QColor(image.pixel(400, 320))
    assert (centre.red(), centre.green(), centre.blue()) != (236, 240, 243)
