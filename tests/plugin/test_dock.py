"""The dock: drawing an extent, and each workflow end to end against the real engine (tiny model)."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsDateTimeRange,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
)
from qgis.PyQt.QtCore import QDate, QDateTime, QPoint, Qt, QTime, QTimer

from qgis_plugin.compat import MSG_CRITICAL, MSG_INFO, MSG_WARNING
from qgis_plugin.layers import GROUP_NAME, KEYWORD_VOCABULARY

from .conftest import require_task, wait_for_task
from .helpers import make_rgb_geotiff, make_s2_geotiff

UTM = QgsCoordinateReferenceSystem("EPSG:32633")
UTM_EXTENT = QgsRectangle(289000, 4639000, 294000, 4644600)
#: The bands the Sentinel-2 super-resolution model reads.
S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


def set_canvas(canvas, crs, extent) -> None:
    canvas.setDestinationCrs(crs)
    canvas.setExtent(extent)
    canvas.refresh()


def drag(qtbot, canvas, start: QPoint, end: QPoint) -> None:
    """A mouse drag on the map canvas, as a user would draw a rectangle."""
    viewport = canvas.viewport()
    qtbot.mousePress(viewport, Qt.MouseButton.LeftButton, pos=start)
    from qgis.PyQt.QtGui import QMouseEvent
    from qgis.PyQt.QtCore import QEvent, QPointF

    for frac in (0.25, 0.5, 0.75, 1.0):
        p = start + (end - start) * frac
        move = QMouseEvent(QEvent.Type.MouseMove, QPointF(p), Qt.MouseButton.NoButton,
                           Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
        QgsApplication.sendEvent(viewport, move)
    qtbot.mouseRelease(viewport, Qt.MouseButton.LeftButton, pos=end)


def test_draw_extent_with_the_map_tool_fills_the_dock(plugin, qgis_canvas, qtbot):
    qgis_canvas.resize(600, 600)
    # Offscreen, pytest-qgis's canvas viewport can stay 98 x 28 px whatever resize says: over the
    # 5 km UTM_EXTENT that is 200 m per canvas px, a drag of 300 px is 60 km, and the dock rightly
    # switches to Ground resolution. 500 m keeps the drawn extent small either way.
    set_canvas(qgis_canvas, UTM, QgsRectangle(289000, 4639000, 289500, 4639560))
    plugin.action_extent.trigger()
    assert qgis_canvas.mapTool() is plugin.extent_tool
    assert plugin.dock.generate.draw_button.isChecked()
    drag(qtbot, qgis_canvas, QPoint(100, 100), QPoint(400, 300))
    tab = plugin.dock.generate
    assert tab.extent is not None and not tab.extent.isEmpty()
    assert tab.extent_crs.authid() == "EPSG:32633"
    # The drawn rectangle is 300 x 200 px of a 600 px canvas: about half / a third of the extent.
    px = qgis_canvas.mapUnitsPerPixel()
    assert tab.extent.width() == pytest.approx(300 * px, rel=0.05)
    assert tab.extent.height() == pytest.approx(200 * px, rel=0.05)
    width, height = tab.target_size()
    assert (width, height) == (64, 40) or (width, height) == (64, 48)
    assert "m/px" in tab.info.text() and "EPSG:32633" in tab.info.text()
    # One rectangle per activation: the tool is switched off after drawing, the button unchecked.
    assert qgis_canvas.mapTool() is not plugin.extent_tool
    assert not plugin.dock.generate.draw_button.isChecked() and not plugin.action_extent.isChecked()
    # The drawn extent stays outlined on the map.
    outline = tab.outline
    assert outline is not None and outline.isVisible()
    box = outline.asGeometry().boundingBox()
    assert box.width() == pytest.approx(tab.extent.width(), rel=1e-6)
    assert box.height() == pytest.approx(tab.extent.height(), rel=1e-6)


def test_date_defaults_to_the_temporal_controller(plugin, qgis_canvas):
    from qgis_plugin.requests import date_from_canvas, default_date

    from qgis_plugin.checks import YEAR_RANGE, date_warning

    last = YEAR_RANGE[1]
    assert default_date(None, today=dt.date(last - 1, 7, 1)) == dt.date(last - 1, 7, 1)
    # Past the training years: the same day in the last one, so the first run asks nothing.
    assert default_date(None, today=dt.date(last + 2, 12, 1)) == dt.date(last, 12, 1)
    assert default_date(None, today=dt.date(2028, 2, 29)).month == 2
    assert date_warning(default_date(None)) is None
    begin = QDateTime(QDate(2019, 3, 4), QTime(0, 0))
    qgis_canvas.setTemporalRange(QgsDateTimeRange(begin, begin.addDays(1)))
    settings = qgis_canvas.mapSettings()
    settings.setIsTemporal(True)
    qgis_canvas.mapSettings().setIsTemporal(True)
    # The canvas only reports a range when temporal navigation is on.
    if qgis_canvas.mapSettings().isTemporal():
        assert date_from_canvas(qgis_canvas) == dt.date(2019, 3, 4)
    plugin.dock.generate.reset_date()


def run_and_wait(qtbot, tab, timeout_ms=120_000):
    task = tab.run()
    assert task is not None, "the job did not start"
    wait_for_task(qtbot, task, timeout_ms)
    if task.outcome is not None:  # every workflow asks the engine for its plan first
        assert task.preflight is not None and task.preflight.task == tab.task
        assert task.preflight.plan["width"] == task.outcome.result.get("width", task.preflight.plan["width"])
    return task


def test_generate_end_to_end_adds_a_dated_layer_on_the_drawn_extent(plugin, engine_env, qgis_iface, qtbot):
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    tab.date.setDate(QDate(2021, 6, 15))
    tab.cloud_known.setChecked(True)
    tab.cloud.setValue(5)
    tab.prompt.setText("a satellite image of a stadium")
    tab.seed.setValue(7)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    layer = plugin.last_layer
    assert isinstance(layer, QgsRasterLayer) and layer.isValid()
    assert layer.crs().authid() == "EPSG:32633"
    assert layer.bandCount() == 3
    assert (layer.width(), layer.height()) == tab.target_size()
    ext = layer.extent()
    for got, want in zip((ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()),
                         (289000, 4639000, 294000, 4644600)):
        assert got == pytest.approx(want, abs=1e-6)
    props = layer.temporalProperties()
    assert props.isActive()
    rng = props.fixedTemporalRange()
    assert rng.begin() == QDateTime(QDate(2021, 6, 15), QTime(0, 0))
    assert rng.end() == QDateTime(QDate(2021, 6, 16), QTime(0, 0))
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME)
    assert group is not None and group.findLayer(layer.id()) is not None
    md = layer.metadata()
    keywords = md.keywords().get(KEYWORD_VOCABULARY, [])
    assert "synthetic" in keywords and "seed:7" in keywords and "model:tiny" in keywords
    assert any(k.startswith("prompt:a satellite image of a stadium") for k in keywords)
    assert "AI-generated" in md.abstract()
    assert layer.renderer().type() == "multibandcolor"
    assert str(tmp_outputs(plugin)) in layer.source()
    messages = " ".join(qgis_iface.messageBar().get_messages(MSG_CRITICAL))
    assert not messages


def test_uncertainty_adds_the_spread_map_styled_under_its_image(plugin, engine_env, qgis_iface, qtbot):
    """Advanced → Uncertainty (off by default): N seeds, and their per-pixel spread comes back
    as a second layer under the image, with a colour ramp whose legend says what it means."""
    tab = plugin.dock.generate
    assert tab.spread.value() == 1 and tab.spread.text() == "off"  # off by default: no spread sent
    tab.set_extent(UTM_EXTENT, UTM)
    tab.size.setValue(64)
    tab.steps.setValue(2)
    tab.seed.setValue(3)
    assert "spread" not in tab.prepare().request
    tab.spread.setValue(3)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    image, spread = plugin.last_layer, plugin.last_spread_layer
    assert spread is not None and spread.isValid() and spread is not image
    assert spread.source().endswith(".spread.tif") and spread.bandCount() == 1
    assert (spread.width(), spread.height()) == (image.width(), image.height())
    assert spread.extent() == image.extent() and spread.crs() == image.crs()
    assert spread.renderer().type() == "singlebandpseudocolor"
    labels = [item.label for item in spread.renderer().shader().rasterShaderFunction().colorRampItemList()]
    assert "seeds agree" in labels[0] and "guessing" in labels[-1]
    assert "spread over 3 seeds" in spread.name() and spread.name().endswith("[synthetic]")
    group = QgsProject.instance().layerTreeRoot().findGroup(GROUP_NAME)
    ids = [child.layerId() for child in group.findLayers()]
    assert ids.index(spread.id()) == ids.index(image.id()) + 1  # right under its image
    assert spread.temporalProperties().isActive()
    tab.spread.setValue(1)


def test_a_large_extent_switches_the_dock_to_ground_resolution(plugin, engine_env, qtbot):
    """One image over a 60 km extent would be ~100 m/px: the dock switches Size to Ground
    resolution (within the training GSDs), and the request carries gsd, not size. A smaller extent
    in that mode is generated by the engine's joint denoising, on the grid the dock showed."""
    tab = plugin.dock.generate
    tab.size_mode.setCurrentIndex(0)
    tab.set_extent(UTM_EXTENT, UTM)  # 5 km: one image at ~11 m/px, no switch
    assert not tab.by_ground_resolution
    tab.set_extent(QgsRectangle(250000, 4600000, 310000, 4640000), UTM)
    assert tab.by_ground_resolution and tab.size.isHidden() and not tab.gsd.isHidden()
    assert tab.gsd.value() == 20.0  # 60 km / 2048 px = 29 m, kept at the training range's 20 m/px
    request = tab.prepare().request
    assert request["gsd"] == 20.0 and "size" not in request and "width" not in request
    assert tab.target_size() == (3000, 2000)
    assert "3000 × 2000 px" in tab.info.text()
    assert not [w for w in tab.range_warnings() if "ground sample distance" in w.problem]

    tab.set_extent(QgsRectangle(289000, 4639000, 292000, 4642000), UTM)  # 3 km at 8 m/px: 376 px, 2 x 2 windows
    tab.size_mode.setCurrentIndex(1)  # 3 km fits one image: the dock went back to Longest side by itself
    tab.gsd.setValue(8.0)
    tab.steps.setValue(1)
    tab.seed.setValue(5)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    layer = plugin.last_layer
    assert (layer.width(), layer.height()) == tab.target_size() == (376, 376)
    # the grid the dock showed: 8 m/px exactly, 3.01 km (3 km grown to 376 px), not 7.98 m/px over 3 km
    assert "376 × 376 px · 8 m/px · 3.01 km × 3.01 km" in tab.info.text(), tab.info.text()
    shown = tab.grid_extent()
    for got, want in ((layer.extent().xMinimum(), shown.xMinimum()), (layer.extent().yMinimum(), shown.yMinimum()),
                      (layer.extent().xMaximum(), shown.xMaximum()), (layer.extent().yMaximum(), shown.yMaximum())):
        assert got == pytest.approx(want, abs=0.5), (layer.extent().toString(), shown.toString())
    assert task.preflight is not None and task.preflight.plan.get("windows") == 4
    tab.size_mode.setCurrentIndex(0)


def tmp_outputs(plugin):
    return plugin.settings().default_output_dir()


def test_cancel_from_the_task_manager_cancels_the_engine_job(plugin, engine_env, qgis_iface, qtbot):
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    tab.size.setValue(128)
    tab.steps.setValue(200)  # long enough to be cancelled while running
    before = set(QgsProject.instance().mapLayers())
    task = tab.run()
    assert task is not None
    manager = QgsApplication.taskManager()
    qtbot.waitUntil(lambda: task.progress() > 0 or task.status() == QgsTask.TaskStatus.Running, timeout=60_000)
    qtbot.waitUntil(lambda: task.status_text.startswith("step"), timeout=60_000)
    # What the task manager's cancel button does:
    manager.cancelAll() if False else task.cancel()
    wait_for_task(qtbot, task, 60_000)
    assert task.was_cancelled and task.outcome is None and task.error is None
    assert set(QgsProject.instance().mapLayers()) == before
    assert any("cancelled" in m for m in qgis_iface.messageBar().get_messages(MSG_INFO))
    # The engine stopped the job too.
    jobs = plugin.manager.client(task.spec).jobs()
    assert any(j.get("state") == "cancelled" for j in jobs)


def _responsive_while(qtbot, task) -> int:
    """Count timer ticks on the main thread while the task runs: QGIS stays responsive."""
    ticks = {"n": 0}
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.__setitem__("n", ticks["n"] + 1))
    timer.start(10)
    wait_for_task(qtbot, task, 60_000)
    timer.stop()
    return ticks["n"]


def test_engine_down_gives_a_clear_message(plugin, monkeypatch, qgis_iface, qtbot, tmp_path):
    token = tmp_path / "token"
    token.write_text("not-used\n")
    monkeypatch.setenv("DIFFUSIONSAT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("DIFFUSIONSAT_TOKEN_FILE", str(token))
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    task = tab.run()
    assert task is not None
    assert _responsive_while(qtbot, task) > 0
    # A user-fixable problem: a warning that goes away by itself, not a sticky critical one.
    assert not qgis_iface.messageBar().get_messages(MSG_CRITICAL)
    errors = qgis_iface.messageBar().get_messages(MSG_WARNING)
    assert errors and "Cannot reach" in errors[-1] and "127.0.0.1:9" in errors[-1]
    assert "Traceback" not in errors[-1]
    assert plugin.last_layer is None


def test_wrong_token_gives_a_clear_message(plugin, engine_server, monkeypatch, qgis_iface, qtbot, tmp_path):
    token = tmp_path / "token"
    token.write_text("wrong-token\n")
    monkeypatch.setenv("DIFFUSIONSAT_URL", engine_server.url)
    monkeypatch.setenv("DIFFUSIONSAT_TOKEN_FILE", str(token))
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    task = tab.run()
    assert _responsive_while(qtbot, task) > 0
    errors = qgis_iface.messageBar().get_messages(MSG_WARNING)
    assert errors and "refused the token" in errors[-1]
    # Seen in the GUI: the advice came twice, the plugin's hint around the engine's own
    # ("… copy it again from the engine's token file (the token is not this engine's: copy it again …)").
    assert task.error.count("copy it again") == 1, task.error


def test_missing_extent_and_missing_engine_settings_are_explained(plugin, qgis_iface, monkeypatch):
    monkeypatch.delenv("DIFFUSIONSAT_URL", raising=False)
    assert plugin.dock.generate.run() is None
    assert "draw the extent" in qgis_iface.messageBar().get_messages(MSG_WARNING)[-1]
    assert "draw the extent" in plugin.dock.plan_label.text()  # the whole text, in the dock too
    from qgis_plugin.settings import MODE_REMOTE

    plugin.settings().mode = MODE_REMOTE
    plugin.settings().url = ""
    plugin.dock.generate.set_extent(UTM_EXTENT, UTM)
    assert plugin.dock.generate.run() is None
    assert "no engine URL" in qgis_iface.messageBar().get_messages(MSG_WARNING)[-1]
    assert not qgis_iface.messageBar().get_messages(MSG_CRITICAL)


# -- the conditional tasks -------------------------------------------------------------------------


def add_layer(path, name) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_inpaint_end_to_end_with_the_layers_nodata(plugin, engine_env, qtbot, tmp_path):
    require_task(engine_env, "inpaint")
    layer = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif", hole=True), "rgb with hole")
    tab = plugin.dock.inpaint
    tab.layer.setLayer(layer)
    tab.kind_nodata.setChecked(True)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    out = plugin.last_layer
    assert out.crs() == layer.crs() and out.bandCount() >= 3
    assert out.extent().toString(3) == layer.extent().toString(3)


def test_inpaint_end_to_end_with_a_polygon_mask(plugin, engine_env, qtbot, tmp_path):
    require_task(engine_env, "inpaint")
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    layer = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif"), "rgb")
    ext = layer.extent()
    polys = QgsVectorLayer(f"Polygon?crs={layer.crs().authid()}", "clouds", "memory")
    feat = QgsFeature()
    feat.setGeometry(QgsGeometry.fromRect(QgsRectangle(ext.xMinimum() + ext.width() / 4, ext.yMinimum() + ext.height() / 4,
                                                       ext.center().x(), ext.center().y())))
    polys.dataProvider().addFeatures([feat])
    QgsProject.instance().addMapLayer(polys)
    tab = plugin.dock.inpaint
    tab.layer.setLayer(layer)
    tab.kind_polygons.setChecked(True)
    tab.mask_polygons.setLayer(polys)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    assert plugin.last_layer.crs() == layer.crs()


def test_superres_end_to_end_multiband_and_band_layers(plugin, engine_env, qtbot, tmp_path):
    require_task(engine_env, "superres")
    path = make_s2_geotiff(tmp_path / "s2.tif", bands=S2_BANDS, size=16)
    layer = add_layer(path, "S2 20210615")
    tab = plugin.dock.superres
    tab.layer.setLayer(layer)
    tab.bands.setText(",".join(S2_BANDS))
    tab.factor.setValue(4)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    out = plugin.last_layer
    assert out.crs() == layer.crs()
    assert out.width() == 4 * layer.width() and out.height() == 4 * layer.height()
    assert out.extent().toString(2) == layer.extent().toString(2)
    assert out.temporalProperties().isActive()  # dated from the file name

    # The same from single-band layers mapped to band names.
    tab.mode_bands.setChecked(True)
    for name in S2_BANDS:
        single = add_layer(make_s2_geotiff(tmp_path / f"T33_{name}_10m.tif", bands=(name,), size=16), f"T33_{name}_10m")
        tab.add_band_row(single)
    assert [n for _, n in tab.band_rows()] == list(S2_BANDS)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    assert plugin.last_layer.width() == 64


def test_temporal_end_to_end_from_dated_layers(plugin, engine_env, qtbot, tmp_path):
    require_task(engine_env, "temporal")
    from qgis_plugin.layers import set_temporal_range

    ids = []
    for i, day in enumerate((dt.date(2020, 5, 1), dt.date(2020, 7, 1))):
        layer = add_layer(make_rgb_geotiff(tmp_path / f"t{i}.tif", seed=i), f"t{i}")
        set_temporal_range(layer, day)
        ids.append(layer.id())
    tab = plugin.dock.temporal
    tab.refresh_layers()
    tab.set_checked(ids)
    tab.date.setDate(QDate(2020, 6, 1))
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    out = plugin.last_layer
    rng = out.temporalProperties().fixedTemporalRange()
    assert rng.begin().date() == QDate(2020, 6, 1)
    assert out.crs() == QgsProject.instance().mapLayer(ids[0]).crs()


def test_start_a_local_engine_from_the_settings(plugin, monkeypatch, qtbot, engine_server):
    """The default mode: the plugin starts the engine from the configured interpreter, in the task."""
    from .conftest import engine_python

    monkeypatch.delenv("DIFFUSIONSAT_URL", raising=False)
    settings = plugin.settings()
    settings.mode = "local"
    settings.python = str(engine_python())
    assert "starts with the first job" in plugin.engine_summary()
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    assert plugin.manager.local_url() and plugin.manager.local_url().startswith("http://127.0.0.1:")
    assert "running at http://127.0.0.1:" in plugin.engine_summary()
    assert plugin.last_layer.crs().authid() == "EPSG:32633"
    # Switching to "use an existing engine" stops the local one now, not when QGIS exits.
    from dataclasses import replace

    local = plugin.manager._local
    plugin.apply_settings(replace(settings, mode="remote", url=engine_server.url,
                                  token_file=str(engine_server.token_file)))
    assert plugin.manager.local_url() is None
    assert local is not None and not local.running()
    assert plugin.settings().mode == "remote" and "Engine: http://127.0.0.1:" in plugin.engine_summary()


def test_inputs_are_uploaded_to_a_remote_engine(plugin, engine_env, qtbot, tmp_path):
    """With uploads (a remote engine), band layers are stacked, flattened to GeoTIFF and uploaded."""
    require_task(engine_env, "superres")
    plugin.settings().upload = "always"
    tab = plugin.dock.superres
    tab.mode_bands.setChecked(True)
    for name in S2_BANDS:
        tab.add_band_row(add_layer(make_s2_geotiff(tmp_path / f"T33_{name}_10m.tif", bands=(name,), size=16),
                                   f"T33_{name}_10m"))
    tab.factor.setValue(2)
    prepared = tab.prepare()
    assert prepared.request["input"].endswith(".vrt") and prepared.files == ("input",)
    task = plugin.start(prepared)
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    assert plugin.last_layer.width() == 32
    uploads = list((engine_env.workdir / "work" / "uploads").glob("*.tif"))
    assert uploads, "the engine received no upload"
