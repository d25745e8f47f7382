"""Extend (outpaint) and Uncertainty (SPREAD) through Processing: processing.run and the algorithm
dialog's path (tests/plugin/test_processing_dialog.py), against the real engine with the tiny model.
(Apart from the dock's tests: the module's provider fixture replaces the plugin's provider.)"""

from __future__ import annotations

from osgeo import gdal
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer

from qgis_plugin.layers import GROUP_NAME

from .conftest import require_task
from .helpers import make_rgb_geotiff
from .test_extend_and_spread import GROWN, _pixels, _window, require_spread
from .test_processing import provider  # noqa: F401 - the fixture
from .test_processing_dialog import layers_from, run_like_the_dialog


def test_processing_algorithms_have_extend_and_spread(provider):  # noqa: F811
    registry = QgsApplication.processingRegistry()
    ext = registry.algorithmById("diffusionsat:extend")
    assert ext is not None and ext.displayName() == "Extend (outpaint) a raster"
    names = {p.name() for p in ext.parameterDefinitions()}
    assert {"INPUT", "EXTENT", "STEPS", "GUIDANCE", "SEED", "OUTPUT", "DATE", "PROMPT", "CLOUD_COVER"} <= names
    assert ext.parameterDefinition("EXTENT").type() == "extent"
    assert ext.parameterDefinition("GUIDANCE").defaultValue() == 7.5
    for task in ("generate", "superres", "inpaint", "temporal"):
        alg = registry.algorithmById(f"diffusionsat:{task}")
        spread = alg.parameterDefinition("SPREAD")
        assert spread is not None and spread.flags() & spread.FlagOptional, task
        assert spread.maximum() == 16 and spread.minimum() == 2, task
        assert "SPREAD" in {o.name() for o in alg.outputDefinitions()}, task


def test_extend_with_processing_run_and_the_dialog(provider, engine_env, tmp_path, qgis_new_project, qtbot):  # noqa: F811
    import processing

    require_task(engine_env, "extend")
    src = make_rgb_geotiff(tmp_path / "scene.tif")
    extent = f"{GROWN.xMinimum()!r},{GROWN.xMaximum()!r},{GROWN.yMinimum()!r},{GROWN.yMaximum()!r} [EPSG:32633]"
    out = tmp_path / "extended.tif"
    result = processing.run("diffusionsat:extend", {"INPUT": str(src), "EXTENT": extent, "STEPS": 2, "SEED": 4,
                                                    "MODEL": "tiny", "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out) and result["SEED"] == 4
    ds = gdal.Open(str(out))
    assert (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) == (89, 68, 3)
    assert _window(out, 16, 4, 64, 64) == _pixels(src)
    # the algorithm dialog's path: the output is loaded, named after its input
    scene = QgsRasterLayer(str(src), "my scene")
    QgsProject.instance().addMapLayer(scene)
    out2 = tmp_path / "dialog_extended.tif"
    ok, results, loaded, feedback = run_like_the_dialog(qtbot, "diffusionsat:extend", {
        "INPUT": scene.id(), "EXTENT": extent, "STEPS": 2, "MODEL": "tiny", "OUTPUT": str(out2)})
    assert ok and loaded, feedback.textLog()
    (layer,) = layers_from(out2)
    assert layer.name().startswith("my scene · extended · "), layer.name()
    assert (layer.width(), layer.height()) == (89, 68)
    assert "Plan:" in feedback.textLog()


def test_inpaint_spread_with_the_processing_dialog_loads_the_spread_layer(provider, engine_env, tmp_path,  # noqa: F811
                                                                         qgis_new_project, qtbot):
    require_task(engine_env, "inpaint")
    src = make_rgb_geotiff(tmp_path / "rgb.tif", hole=True)
    require_spread(engine_env, "inpaint", {"task": "inpaint", "input": str(src), "mask": "nodata", "steps": 1,
                                           "model": "tiny"})
    scene = QgsRasterLayer(str(src), "holey")
    QgsProject.instance().addMapLayer(scene)
    out = tmp_path / "filled.tif"
    ok, results, loaded, feedback = run_like_the_dialog(qtbot, "diffusionsat:inpaint", {
        "INPUT": scene.id(), "MASK_KIND": 3, "MODEL": "tiny", "STEPS": 1, "SPREAD": 2, "OUTPUT": str(out)})
    assert ok and loaded, feedback.textLog()
    assert results["SPREAD"] == str(tmp_path / "filled.spread.tif")
    (spread,) = layers_from(tmp_path / "filled.spread.tif")
    assert spread.renderer().type() == "singlebandpseudocolor" and "spread over 2 seeds" in spread.name()
    node = QgsProject.instance().layerTreeRoot().findLayer(spread.id())
    assert node is not None and node.parent().name() == GROUP_NAME
    # without SPREAD: no spread map, no spread sent
    plain = tmp_path / "plain.tif"
    ok, results, _, feedback = run_like_the_dialog(qtbot, "diffusionsat:inpaint", {
        "INPUT": scene.id(), "MASK_KIND": 3, "MODEL": "tiny", "STEPS": 1, "OUTPUT": str(plain)})
    assert ok, feedback.textLog()
    assert not results.get("SPREAD") and not (tmp_path / "plain.spread.tif").exists()
    assert '"spread"' not in feedback.textLog()


def test_generate_at_a_ground_resolution_with_spread_loads_the_spread_map(provider, engine_env, tmp_path,  # noqa: F811
                                                                         qgis_new_project):
    """Uncertainty for a large-extent generate (windows denoised jointly, GSD): the spread map of
    the whole grid comes back and is loaded, styled, under the image."""
    import processing

    extent = "289000,291200,4639000,4641200 [EPSG:32633]"  # 2.2 km at 8 m/px: 280 px, 2 x 2 windows
    require_spread(engine_env, "generate", {"task": "generate", "bbox": [289000, 4639000, 291200, 4641200],
                                            "crs": "EPSG:32633", "gsd": 8.0, "steps": 1, "model": "tiny"})
    out = tmp_path / "large.tif"
    result = processing.runAndLoadResults("diffusionsat:generate", {
        "EXTENT": extent, "GSD": 8.0, "SPREAD": 2, "STEPS": 1, "SEED": 2, "MODEL": "tiny", "OUTPUT": str(out)})
    assert result["SPREAD"] == str(tmp_path / "large.spread.tif")
    image, spread = gdal.Open(str(out)), gdal.Open(result["SPREAD"])
    assert (spread.RasterXSize, spread.RasterYSize) == (image.RasterXSize, image.RasterYSize) == (280, 280)
    assert spread.GetGeoTransform() == image.GetGeoTransform() and spread.RasterCount == 1
    (layer,) = layers_from(tmp_path / "large.spread.tif")
    assert layer.renderer().type() == "singlebandpseudocolor" and "spread over 2 seeds" in layer.name()
    node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
    assert node is not None and node.parent().name() == GROUP_NAME
