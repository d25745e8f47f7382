"""input_crs / input_nodata / band_names: what QGIS knows is used where the file lacks it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio

from engine.errors import DiffusionSatError
from engine.models.cache import ModelCache
from engine.tasks import parse_request, plan, run_task

from .test_tiled_tasks import FAST, write


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def _scene(tmp_path, **kw):
    image = (np.random.default_rng(1).random((3, 48, 48)) * 200 + 20).astype("uint8")
    image[:, 10:20, 10:20] = 0
    return image, write(tmp_path / "T33TTG_20210615T101031_TCI.tif", image, **kw)


def test_a_file_without_crs_runs_with_the_crs_qgis_assigned(tmp_path, models):
    image, src = _scene(tmp_path, crs=None)
    before = os.stat(src).st_mtime_ns
    fields = {**FAST, "task": "inpaint", "input": src, "mask": "nodata", "dilate": 0}
    with pytest.raises(DiffusionSatError, match="no CRS"):
        plan(parse_request(fields))
    request = parse_request({**fields, "input_crs": "EPSG:32633", "input_nodata": 0,
                             "band_names": ["red", "green", "blue"]})
    assert plan(request)["crs"] == "EPSG:32633"
    result = run_task(request, tmp_path / "out.tif", models=models)
    with rasterio.open(result.path) as ds:
        assert ds.crs.to_epsg() == 32633
        out = ds.read()
        assert ds.tags().get("metadata_date") == "2021-06-15"  # the input's name still dates it
    hole = (image == 0).any(axis=0)
    assert np.array_equal(out[:, ~hole], image[:, ~hole])  # the nodata QGIS knew was filled, the rest kept
    assert (out[:, hole] > 0).all()
    assert os.stat(src).st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([os.path.basename(src), "out.tif"])


def test_the_file_wins_where_it_says(tmp_path):
    _, src = _scene(tmp_path, crs="EPSG:32633")
    request = parse_request({**FAST, "task": "inpaint", "input": src, "mask": "nodata",
                             "input_crs": "EPSG:4326"})
    assert plan(request)["crs"] == "EPSG:32633"
