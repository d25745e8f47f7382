"""Extend (outpaint) a layer, from the dock and from Processing, and Uncertainty (spread) for every task.

Real QGIS (offscreen), real GeoTIFFs, the real engine server with the tiny model. The end-to-end
tests skip, with the reason, on an engine that does not run ``extend`` or take ``spread`` for a
task yet."""

from __future__ import annotations

from pathlib import Path

import pytest
from osgeo import gdal
from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import QPoint

from qgis_plugin.layers import GROUP_NAME
from qgis_plugin.requests import RequestError

from .conftest import require_task
from .helpers import ORIGIN, make_rgb_geotiff, make_s2_geotiff
from .test_dock import S2_BANDS, add_layer, drag, run_and_wait, set_canvas

UTM = QgsCoordinateReferenceSystem("EPSG:32633")
#: make_rgb_geotiff's 64 px at 10 m: x 290000..290640, y 4641360..4642000
LAYER_EXTENT = QgsRectangle(ORIGIN[0], ORIGIN[1] - 640, ORIGIN[0] + 640, ORIGIN[1])
#: 16 px (160 m) more on the left, 8.5 px on the right (snapped outward: 9), 4 px above
GROWN = QgsRectangle(ORIGIN[0] - 160, ORIGIN[1] - 640, ORIGIN[0] + 640 + 85, ORIGIN[1] + 40)


def require_spread(server, task: str, request: dict) -> None:
    """Skip when the engine refuses ``spread`` on ``task`` (an engine from before it had it)."""
    status, body = server.post("/v1/plan", {**request, "spread": 2})
    detail = str(body.get("detail", ""))
    if status == 422 and "spread" in detail:
        pytest.skip(f"the engine does not take spread for {task} yet ({detail[:120]})")


def _pixels(path) -> list[bytes]:
    ds = gdal.Open(str(path))
    return [ds.GetRasterBand(b + 1).ReadRaster() for b in range(ds.RasterCount)]


def _window(path, xoff, yoff, w, h) -> list[bytes]:
    ds = gdal.Open(str(path))
    return [ds.GetRasterBand(b + 1).ReadRaster(xoff, yoff, w, h) for b in range(ds.RasterCount)]


# -- the request builders ---------------------------------------------------------------------------


def test_extend_tab_builds_the_request_on_the_layers_grid(plugin, tmp_path):
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif"), "scene")
    tab = plugin.dock.extend
    assert plugin.dock.tabs.indexOf(tab) >= 0 and tab.run_button.text() == "Extend layer"
    tab.layer.setLayer(layer)
    with pytest.raises(RequestError, match="draw the new extent"):
        tab.prepare()
    tab.set_extent(GROWN, UTM)
    grid = tab.grid()
    assert grid.margins == (16, 4, 9, 0)  # left, top, right, bottom: snapped outward to the 10 m pixels
    assert (grid.width, grid.height) == (64 + 16 + 9, 64 + 4)
    assert grid.extent.xMinimum() == pytest.approx(ORIGIN[0] - 160)
    assert grid.extent.xMaximum() == pytest.approx(ORIGIN[0] + 640 + 90)
    assert "64 × 64 px → 89 × 68 px" in tab.info.text() and "1,956 new pixels" in tab.info.text()
    assert tab.outline is not None and tab.outline.asGeometry().boundingBox().width() == pytest.approx(890)
    # outlined while the Extend tab is the current one only (Generate's extent has its own outline)
    plugin.dock.tabs.setCurrentWidget(tab)
    assert tab.outline.isVisible()
    plugin.dock.tabs.setCurrentWidget(plugin.dock.generate)
    assert not tab.outline.isVisible()
    plugin.dock.tabs.setCurrentWidget(tab)
    assert tab.outline.isVisible()
    tab.steps.setValue(3)
    tab.seed.setValue(7)
    tab.prompt.setText("  farmland ")
    job = tab.prepare()
    req = job.request
    assert job.task == "extend" and req["task"] == "extend"
    assert req["input"] == str(tmp_path / "scene.tif") and job.files == ("input",)
    assert req["bbox"] == pytest.approx([GROWN.xMinimum(), GROWN.yMinimum(), GROWN.xMaximum(), GROWN.yMaximum()])
    assert req["crs"] == "EPSG:32633" and req["model"] == "tiny"
    assert req["steps"] == 3 and req["seed"] == 7 and req["prompt"] == "farmland" and req["guidance"] == 7.5
    assert "spread" not in req and "date" not in req and "cloud_cover" not in req  # none given: engine's defaults
    tab.cloud_known.setChecked(True)
    tab.cloud.setValue(20)
    assert tab.prepare().request["cloud_cover"] == pytest.approx(0.2)
    # an extent inside the layer makes nothing new: refused with what to do
    tab.set_extent(QgsRectangle(ORIGIN[0] + 100, ORIGIN[1] - 300, ORIGIN[0] + 300, ORIGIN[1] - 100), UTM)
    assert "inside the layer" in tab.info.text()
    with pytest.raises(RequestError, match="inside scene"):
        tab.prepare()


def test_extend_extent_in_another_crs_is_sent_in_the_layers(plugin, tmp_path):
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif"), "scene")
    tab = plugin.dock.extend
    tab.layer.setLayer(layer)
    # about 290 m around the layer, drawn on a map in degrees
    from qgis.core import QgsCoordinateTransform

    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    to_deg = QgsCoordinateTransform(UTM, wgs84, QgsProject.instance())
    box = to_deg.transformBoundingBox(QgsRectangle(ORIGIN[0] - 300, ORIGIN[1] - 900, ORIGIN[0] + 900, ORIGIN[1] + 300))
    tab.set_extent(box, wgs84)
    req = tab.prepare().request
    assert req["crs"] == "EPSG:32633"
    xmin, ymin, xmax, ymax = req["bbox"]
    # the box in UTM around the drawn one (a bounding box of a box in degrees: a little larger)
    assert xmin <= ORIGIN[0] - 300 and ymax >= ORIGIN[1] + 300 and xmax >= ORIGIN[0] + 900
    assert xmin == pytest.approx(ORIGIN[0] - 300, abs=60) and ymax == pytest.approx(ORIGIN[1] + 300, abs=60)


def test_extend_a_layer_that_is_not_a_file_exports_it(plugin, tmp_path):
    # A layer QGIS reads from memory (/vsimem/): the engine cannot read it; the dock exports it.
    path = "/vsimem/diffusionsat_extend_test.tif"
    gdal.Translate(path, str(make_rgb_geotiff(tmp_path / "scene.tif")))
    try:
        layer = QgsRasterLayer(path, "in memory", "gdal")
        assert layer.isValid()
        QgsProject.instance().addMapLayer(layer)
        tab = plugin.dock.extend
        tab.layer.setLayer(layer)
        tab.set_extent(GROWN, UTM)
        job = tab.prepare()
        exported = job.request["input"]
        assert exported != path and Path(exported).is_file() and exported in job.temp_files
        assert _pixels(exported) == _pixels(path)  # the layer's own pixels, on its own grid
        assert gdal.Open(exported).GetGeoTransform() == gdal.Open(path).GetGeoTransform()
    finally:
        gdal.Unlink(path)


def test_extend_a_file_without_crs_sends_the_crs_qgis_assigned(plugin, tmp_path):
    src = make_rgb_geotiff(tmp_path / "scene.tif")
    bare = tmp_path / "no_crs.tif"
    mem = gdal.Translate("", str(src), format="MEM")
    mem.SetProjection("")
    gdal.GetDriverByName("GTiff").CreateCopy(str(bare), mem)
    mem = None
    assert not gdal.Open(str(bare)).GetProjection()
    layer = QgsRasterLayer(str(bare), "no crs", "gdal")
    layer.setCrs(UTM)  # Layer Properties → Source → Assigned CRS
    QgsProject.instance().addMapLayer(layer)
    tab = plugin.dock.extend
    tab.layer.setLayer(layer)
    tab.set_extent(GROWN, UTM)
    req = tab.prepare().request
    assert req["input"] == str(bare) and req["input_crs"] == "EPSG:32633" and req["crs"] == "EPSG:32633"


def test_the_extend_tab_takes_the_drawn_extent_and_generate_keeps_its_own(plugin, qgis_canvas, qtbot, tmp_path):
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif"), "scene")
    plugin.dock.extend.layer.setLayer(layer)
    qgis_canvas.resize(600, 600)
    set_canvas(qgis_canvas, UTM, QgsRectangle(ORIGIN[0] - 500, ORIGIN[1] - 1000, ORIGIN[0] + 1000, ORIGIN[1] + 500))
    generate_before = plugin.dock.generate.extent
    plugin.dock.extend.draw_button.click()
    assert qgis_canvas.mapTool() is plugin.extent_tool
    assert plugin.dock.extend.draw_button.isChecked()
    assert not plugin.dock.generate.draw_button.isChecked() and not plugin.action_extent.isChecked()
    drag(qtbot, qgis_canvas, QPoint(5, 5), QPoint(90, 25))
    assert plugin.dock.extend.extent is not None and not plugin.dock.extend.extent.isEmpty()
    assert plugin.dock.generate.extent is generate_before  # the drawn extent went to Extend only
    assert qgis_canvas.mapTool() is not plugin.extent_tool and not plugin.dock.extend.draw_button.isChecked()
    # the toolbar's "Draw extent to generate" draws for Generate again
    plugin.action_extent.trigger()
    assert plugin.dock.generate.draw_button.isChecked() and not plugin.dock.extend.draw_button.isChecked()
    drag(qtbot, qgis_canvas, QPoint(10, 5), QPoint(60, 20))
    assert plugin.dock.generate.extent is not None and plugin.dock.generate.extent != plugin.dock.extend.extent


def test_uncertainty_is_offered_for_every_task_and_sent_only_when_set(plugin, tmp_path):
    rgb = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif", hole=True), "rgb")
    s2 = add_layer(make_s2_geotiff(tmp_path / "s2.tif", bands=S2_BANDS), "s2")
    dock = plugin.dock
    dock.inpaint.layer.setLayer(rgb)
    dock.inpaint.kind_nodata.setChecked(True)
    dock.superres.layer.setLayer(s2)
    dock.temporal.refresh_layers()
    dock.temporal.set_checked([rgb.id()])
    for tab in (dock.generate, dock.inpaint, dock.superres, dock.temporal):
        assert tab.spread.value() == 1 and tab.spread.text() == "off", tab.task  # off by default
        assert tab.spread.objectName() == f"spread_{tab.task}"
        assert tab.spread.maximum() == 16
    dock.generate.set_extent(QgsRectangle(289000, 4639000, 294000, 4644600), UTM)
    for tab in (dock.generate, dock.inpaint, dock.superres, dock.temporal):
        if tab is dock.temporal:
            for row in range(tab.table.rowCount()):
                tab.table.item(row, 1).setText("2021-06-15")
        assert "spread" not in tab.prepare().request, tab.task
        tab.spread.setValue(3)
        assert tab.prepare().request["spread"] == 3, tab.task
        tab.spread.setValue(1)
    assert not hasattr(dock.extend, "spread")  # the engine's extend takes no spread


# -- end to end against the engine --------------------------------------------------------------------


def test_extend_from_the_dock_end_to_end(plugin, engine_env, qtbot, tmp_path):
    require_task(engine_env, "extend")
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif"), "scene")
    tab = plugin.dock.extend
    tab.layer.setLayer(layer)
    tab.set_extent(GROWN, UTM)
    tab.steps.setValue(2)
    tab.seed.setValue(11)
    task = run_and_wait(qtbot, tab, 300_000)
    assert task.error is None, task.error
    out = plugin.last_layer
    assert out.crs() == layer.crs() and out.bandCount() == 3
    assert (out.width(), out.height()) == (89, 68)
    assert out.extent().toString(3) == tab.grid().extent.toString(3)
    assert out.name().startswith("scene · extended · ") and "seed 11" in out.name() and out.name().endswith(
        "[synthetic]")
    # the layer's own pixels kept bit for bit, at their place in the grown grid (16 px left, 4 px top)
    assert _window(out.source(), 16, 4, 64, 64) == _pixels(tmp_path / "scene.tif")
    # the pre-flight showed the engine's plan of it
    assert task.preflight is not None and task.preflight.task == "extend"
    assert "Plan: 89 × 68 px" in plugin.dock.plan_label.text() or "89 × 68 px" in task.preflight.summary()
    node = QgsProject.instance().layerTreeRoot().findLayer(out.id())
    assert node is not None and node.parent().name() == GROUP_NAME


def test_superres_uncertainty_adds_the_spread_layer_from_the_dock(plugin, engine_env, qtbot, tmp_path):
    require_task(engine_env, "superres")
    src = make_s2_geotiff(tmp_path / "s2.tif", bands=S2_BANDS)
    require_spread(engine_env, "superres", {"task": "superres", "input": str(src), "factor": 2, "steps": 1,
                                            "model": "tiny"})
    layer = add_layer(src, "T33TTG bands")
    tab = plugin.dock.superres
    tab.layer.setLayer(layer)
    tab.factor.setValue(2)
    tab.steps.setValue(1)
    tab.spread.setValue(2)
    try:
        task = run_and_wait(qtbot, tab, 300_000)
    finally:
        tab.spread.setValue(1)
    assert task.error is None, task.error
    image, spread = plugin.last_layer, plugin.last_spread_layer
    assert spread is not None and spread.isValid() and spread is not image
    assert spread.source().endswith(".spread.tif") and spread.bandCount() == 1
    assert (spread.width(), spread.height()) == (image.width(), image.height())
    assert spread.renderer().type() == "singlebandpseudocolor"
    assert "spread over 2 seeds" in spread.name() and spread.name().startswith("T33TTG bands · super-resolved")
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME)
    ids = [child.layerId() for child in group.findLayers()]
    assert ids.index(spread.id()) == ids.index(image.id()) + 1




def test_the_preflight_names_the_windows_an_extend_skips():
    # The engine's plan of an extend over a large layer: windows wholly inside the layer cost nothing.
    from qgis_plugin.preflight import Preflight

    plan = {"task": "extend", "width": 1200, "height": 1000, "tiles": 4, "windows": 12, "windows_skipped": 8,
            "window_overlap_px": 64, "joint_denoising": True, "unet_evaluations": 160, "work_mpx": 10.5}
    text = Preflight(plan, 0.3, "default").summary()
    assert "12 windows denoised together (64 px overlap), 8 skipped (all known pixels)" in text
    assert "skipped" not in Preflight({**plan, "windows_skipped": 0}, 0.3, "default").summary()


def test_the_extend_preflight_shows_the_engines_windows_and_skipped_windows(plugin, engine_env, tmp_path):
    """A layer of several windows extended by a margin: the plan (POST /v1/plan, nothing runs) counts
    the windows wholly inside the layer as skipped, and the dock's pre-flight text says so."""
    require_task(engine_env, "extend")
    from qgis_plugin import preflight as pf
    from qgis_plugin.connection import resolve_spec, shared_manager
    from qgis_plugin.tasks import plan_job

    layer = add_layer(make_rgb_geotiff(tmp_path / "big.tif", size=640), "big")
    tab = plugin.dock.extend
    tab.layer.setLayer(layer)
    tab.set_extent(QgsRectangle(ORIGIN[0] - 160, ORIGIN[1] - 6400, ORIGIN[0] + 6400, ORIGIN[1]), UTM)
    tab.steps.setValue(2)
    job = tab.prepare()
    client = shared_manager().client(resolve_spec(plugin.settings()))
    _, plan = plan_job(client, job.request, job, upload=False, temps=[])
    assert plan["task"] == "extend" and (plan["width"], plan["height"]) == (656, 640)
    assert plan["windows_skipped"] > 0 and plan["windows"] > plan["windows_skipped"]
    text = pf.evaluate(client, job.request, plan, engine="test", max_megapixels=0, max_minutes=0).summary()
    assert f"{plan['windows']} windows denoised together" in text
    assert f"{plan['windows_skipped']} skipped (all known pixels)" in text
    assert "656 × 640 px" in text
