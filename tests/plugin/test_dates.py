"""Dates: from temporal properties, acquisition tags, product names or the user; never invented."""

from __future__ import annotations

import datetime as dt
import re

from osgeo import gdal
from qgis.core import QgsProject, QgsRasterLayer

from .conftest import require_task
from .helpers import make_rgb_geotiff
from .test_processing import provider  # noqa: F401 - the fixture


def tagged(path, **tags):
    make_rgb_geotiff(path, hole=True)
    ds = gdal.Open(str(path), gdal.GA_Update)
    for k, v in tags.items():
        ds.SetMetadataItem(k, v)
    ds = None
    return path


#: What an earlier plugin version wrote: an undated in-paint named after the run's time.
OLD_OUTPUT = {"synthetic": "True", "software": "diffusionsat 0.1", "TIFFTAG_DATETIME": "2026:12:01 07:45:40"}


def test_a_run_timestamp_in_a_name_is_no_date(tmp_path):
    from qgis_plugin.requests import layer_date

    old = QgsRasterLayer(str(tagged(tmp_path / "inpaint_20261201-074540.tif", **OLD_OUTPUT)), "inpaint_20261201-074540")
    assert layer_date(old) == (None, "")
    # Not a satellite product name either: a date anywhere in a name is not an acquisition date.
    export = QgsRasterLayer(str(tagged(tmp_path / "export_20230405.tif")), "export_20230405")
    assert layer_date(export) == (None, "")
    # TIFFTAG_DATETIME is the file's creation time.
    created = QgsRasterLayer(str(tagged(tmp_path / "c.tif", TIFFTAG_DATETIME="2024:01:01 00:00:00")), "c")
    assert layer_date(created) == (None, "")


def test_dates_that_are_acquisitions(tmp_path):
    from qgis_plugin.layers import set_temporal_range
    from qgis_plugin.requests import layer_date

    s2 = QgsRasterLayer(str(tagged(tmp_path / "T33TTG_20210615T101031_TCI_10m.tif")), "tci")
    assert layer_date(s2) == (dt.date(2021, 6, 15), "file name")
    landsat = QgsRasterLayer(str(tagged(tmp_path / "LC08_L1TP_191031_20200704_20200913_02_T1.tif")), "ls")
    assert layer_date(landsat)[0] == dt.date(2020, 7, 4)
    tag = QgsRasterLayer(str(tagged(tmp_path / "t.tif", ACQUISITION_DATE="2019-03-02")), "t")
    assert layer_date(tag) == (dt.date(2019, 3, 2), "file metadata (ACQUISITION_DATE)")
    ours = QgsRasterLayer(str(tagged(tmp_path / "o.tif", metadata_date="2018-05-06", **OLD_OUTPUT)), "o")
    assert layer_date(ours)[0] == dt.date(2018, 5, 6)
    # The user's temporal properties win over everything.
    set_temporal_range(tag, dt.date(2001, 1, 1))
    assert layer_date(tag) == (dt.date(2001, 1, 1), "temporal properties")


def test_output_names_hold_no_date(tmp_path):
    from qgis_plugin.layers import output_stem, unique_path
    from qgis_plugin.requests import parse_date

    names = [unique_path(tmp_path, output_stem(task, dt.date(2021, 6, 15))).name
             for task in ("generate", "inpaint", "generate")]
    assert names == ["diffusionsat_generate.tif", "diffusionsat_inpaint.tif", "diffusionsat_generate_2.tif"]
    assert all(parse_date(n) is None and not re.search(r"\d{4}", n) for n in names)


def _tags(path):
    return gdal.Open(str(path)).GetMetadata() or {}


def test_reprocessing_an_undated_output_keeps_it_undated(provider, engine_env, tmp_path, qgis_new_project):  # noqa: F811
    import processing

    require_task(engine_env, "inpaint")
    src = tagged(tmp_path / "inpaint_20261201-074540.tif", **OLD_OUTPUT)
    out = tmp_path / "again.tif"
    result = processing.runAndLoadResults("diffusionsat:inpaint", {
        "INPUT": str(src), "MASK_KIND": 3, "MODEL": "tiny", "OPTIONS": '{"steps": 2}', "OUTPUT": str(out)})
    assert out.exists() and result["OUTPUT"]
    assert _tags(out).get("metadata_date", "unknown") == "unknown", "the engine conditioned on a date from the file name"
    layer = next(lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.source() == str(out))
    assert not layer.temporalProperties().isActive()

    # A date the user gives is what the model gets, and what the layer shows.
    dated = tmp_path / "dated.tif"
    processing.runAndLoadResults("diffusionsat:inpaint", {
        "INPUT": str(src), "MASK_KIND": 3, "DATE": "2021-06-15", "MODEL": "tiny", "OPTIONS": '{"steps": 2}',
        "OUTPUT": str(dated)})
    assert _tags(dated).get("metadata_date") == "2021-06-15"
    layer = next(lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.source() == str(dated))
    assert layer.temporalProperties().isActive()
    assert layer.temporalProperties().fixedTemporalRange().begin().date().toPyDate() == dt.date(2021, 6, 15)
