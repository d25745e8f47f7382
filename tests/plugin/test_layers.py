"""The layer writer: output names, temporal range, temporal controller, style, provenance."""

from __future__ import annotations

import datetime as dt

from qgis.core import QgsDateTimeRange, QgsProject, QgsRasterLayer, QgsTemporalNavigationObject
from qgis.PyQt.QtCore import QDate, QDateTime, QTime

from qgis_plugin.layers import (
    GROUP_NAME,
    add_result_layer,
    day_range,
    extend_temporal_controller,
    output_folder,
    rgb_bands,
    unique_path,
)

from .helpers import make_rgb_geotiff


def test_unique_names_never_overwrite(tmp_path):
    first = unique_path(tmp_path, "generate_2021-06-15")
    second = unique_path(tmp_path, "generate_2021-06-15")
    assert first.name == "generate_2021-06-15.tif" and second.name == "generate_2021-06-15_2.tif"
    assert unique_path(tmp_path, "a/b:c").name == "a_b_c.tif"


def test_outputs_go_next_to_a_saved_project(tmp_path, qgis_new_project):
    project = QgsProject.instance()
    assert output_folder(project, tmp_path / "fallback") == tmp_path / "fallback"
    (tmp_path / "proj").mkdir()
    assert project.write(str(tmp_path / "proj" / "map.qgz"))
    assert output_folder(project, tmp_path / "fallback") == tmp_path / "proj" / "diffusionsat"
    project.clear()


def test_day_range_is_the_whole_day():
    rng = day_range(dt.date(2021, 6, 15))
    assert rng.begin() == QDateTime(QDate(2021, 6, 15), QTime(0, 0))
    assert rng.end() == QDateTime(QDate(2021, 6, 16), QTime(0, 0))
    assert rng.includeBeginning() and not rng.includeEnd()


def test_active_temporal_controller_is_widened_to_include_the_date(qgis_canvas, tmp_path, qgis_new_project):
    nav = QgsTemporalNavigationObject()
    qgis_canvas.setTemporalController(nav)
    begin = QDateTime(QDate(2021, 1, 1), QTime(0, 0))
    nav.setTemporalExtents(QgsDateTimeRange(begin, begin.addDays(30)))
    nav.setNavigationMode(QgsTemporalNavigationObject.NavigationMode.NavigationOff)
    assert not extend_temporal_controller(qgis_canvas, dt.date(2021, 6, 15))
    nav.setNavigationMode(QgsTemporalNavigationObject.NavigationMode.FixedRange)
    layer = add_result_layer(make_rgb_geotiff(tmp_path / "r.tif"), "r", date=dt.date(2021, 6, 15),
                             info={"task": "generate", "model": "tiny", "seed": 1}, canvas=qgis_canvas)
    ext = nav.temporalExtents()
    assert ext.begin() == begin and ext.end() == QDateTime(QDate(2021, 6, 16), QTime(0, 0))
    assert QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME).findLayer(layer.id())
    renderer = layer.renderer()
    assert (renderer.redBand(), renderer.greenBand(), renderer.blueBand()) == (1, 2, 3)
    ce = renderer.redContrastEnhancement()
    assert (ce.minimumValue(), ce.maximumValue()) == (0, 255)
    assert "seed:1" in layer.metadata().keywords()["DiffusionSat"]
    qgis_canvas.setTemporalController(None)


def test_rgb_bands_follow_band_descriptions():
    assert rgb_bands(["b02", "b03", "b04", "b08"], 4) == (3, 2, 1)
    assert rgb_bands(["red", "green", "blue"], 3) == (1, 2, 3)
    assert rgb_bands(["", "", "", ""], 4) == (1, 2, 3)
    assert rgb_bands([""], 1) == (1, 1, 1)


def test_layers_added_after_a_processing_result_go_to_the_top_not_into_the_group(tmp_path, qgis_new_project):
    """Seen in the GUI: after a Processing result was moved into the "DiffusionSat" group, every layer
    the user added next landed in that group too (QGIS's insertion point had followed the current
    item into it). The move puts the insertion point back at the top of the tree."""
    from qgis.core import QgsLayerTreeRegistryBridge

    from qgis_plugin.layers import move_to_result_group, result_group

    project = QgsProject.instance()
    root = project.layerTreeRoot()
    group = result_group(project)
    result = QgsRasterLayer(str(make_rgb_geotiff(tmp_path / "result.tif")), "result", "gdal")
    project.addMapLayer(result)  # at the top level, as Processing loads it
    # what QGIS's layer tree view does when the current item ends up inside the group
    project.layerTreeRegistryBridge().setLayerInsertionPoint(QgsLayerTreeRegistryBridge.InsertionPoint(group, 0))
    assert move_to_result_group(result, project)
    assert group.findLayer(result.id()) is not None
    later = QgsRasterLayer(str(make_rgb_geotiff(tmp_path / "later.tif")), "later", "gdal")
    project.addMapLayer(later)
    node = root.findLayer(later.id())
    assert node is not None and node.parent() is root, "the user's next layer went into the DiffusionSat group"
