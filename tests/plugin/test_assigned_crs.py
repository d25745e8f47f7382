"""A CRS (and nodata) the user assigns in QGIS reaches the engine for a file that lacks it."""

from __future__ import annotations

import array

from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
    QgsRasterRange,
)

from .conftest import require_task
from .helpers import ORIGIN
from .test_processing import provider  # noqa: F401 - the fixture


def bare_rgb(path, size=48):
    """An RGB GeoTIFF with a geotransform but no CRS and no nodata; a 0 square in the middle."""
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((ORIGIN[0], 10.0, 0, ORIGIN[1], 0, -10.0))
    for b in range(3):
        values = array.array("B", [0 if 16 <= x < 32 and 16 <= y < 32 else 60 + 40 * b + (x + y) % 7
                                   for y in range(size) for x in range(size)])
        ds.GetRasterBand(b + 1).WriteRaster(0, 0, size, size, values.tobytes())
    ds = None
    return path


def test_request_carries_the_assigned_crs_and_nodata_only_when_the_file_lacks_them(tmp_path):
    from qgis_plugin.prepare import MASK_NODATA, prepare_inpaint

    layer = QgsRasterLayer(str(bare_rgb(tmp_path / "bare.tif")), "bare")
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:32633"))  # Layer Properties → Source → Assigned CRS
    layer.dataProvider().setUserNoDataValue(1, [QgsRasterRange(0, 0)])  # Transparency → no data value
    job = prepare_inpaint(layer, output_path=str(tmp_path / "o.tif"), mask_kind=MASK_NODATA)
    assert job.request["input_crs"] == "EPSG:32633" and job.request["input_nodata"] == 0.0

    from .helpers import make_rgb_geotiff

    full = QgsRasterLayer(str(make_rgb_geotiff(tmp_path / "full.tif", hole=True)), "full")
    job = prepare_inpaint(full, output_path=str(tmp_path / "p.tif"), mask_kind=MASK_NODATA)
    assert "input_crs" not in job.request and "input_nodata" not in job.request


def test_inpaint_a_file_without_crs_after_assigning_one_in_qgis(provider, engine_env, tmp_path, qgis_new_project):  # noqa: F811
    import processing

    require_task(engine_env, "inpaint")
    layer = QgsRasterLayer(str(bare_rgb(tmp_path / "bare.tif")), "bare")
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    layer.dataProvider().setUserNoDataValue(1, [QgsRasterRange(0, 0)])
    QgsProject.instance().addMapLayer(layer)
    out = tmp_path / "filled.tif"
    processing.run("diffusionsat:inpaint", {"INPUT": layer, "MASK_KIND": 3, "MODEL": "tiny",
                                            "OPTIONS": '{"steps": 2}', "OUTPUT": str(out)})
    result = QgsRasterLayer(str(out), "filled")
    assert result.isValid() and result.crs().authid() == "EPSG:32633"
    assert result.extent().toString(3) == layer.extent().toString(3)
    # The square QGIS called nodata was filled.
    block = result.dataProvider().block(1, result.extent(), result.width(), result.height())
    assert block.value(24, 24) > 0
    assert not gdal.Open(str(tmp_path / "bare.tif")).GetProjection()  # the input is untouched
