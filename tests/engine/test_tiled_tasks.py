"""superres, temporal and inpaint end to end on real GeoTIFFs with the tiny model (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.cli import main
from engine.errors import InvalidRequest
from engine.geo.masks import dilate
from engine.models.cache import ModelCache
from engine.tasks import parse_request, run_task

UTM = "EPSG:32633"
ORIGIN = (300000.0, 4650000.0)
FAST = {"model": "tiny", "steps": 1, "seed": 3}


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def write(path, array, *, crs=UTM, origin=ORIGIN, res=10.0, nodata=None, tags=None, descriptions=None):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    profile = dict(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                   dtype=str(array.dtype), crs=crs, transform=from_origin(origin[0], origin[1], res, res),
                   nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array)
        if tags:
            ds.update_tags(**tags)
        for i, d in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, d)
    return str(path)


def s2_dn(shape=(13, 48, 40), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 2500 + 800).astype("uint16")


def run(models, out, **fields):
    return run_task(parse_request({**FAST, **fields}), out, models=models)


# ------------------------------------------------------------------------------------------------
# super-resolution


def test_superres_grid_tags_and_nodata(tmp_path, models):
    dn = s2_dn()
    dn[:, :8, :8] = 0  # S2 no-data corner
    src = write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif", dn)
    result = run(models, tmp_path / "sr.tif", task="superres", input=src, factor=4)
    with rasterio.open(src) as a, rasterio.open(result.path) as b:
        assert b.crs == a.crs
        assert b.bounds == pytest.approx(a.bounds)
        assert b.res == pytest.approx((a.res[0] / 4, a.res[1] / 4))
        assert (b.width, b.height) == (a.width * 4, a.height * 4)
        assert b.count == 3 and b.nodata == 0
        tags = b.tags()
        out = b.read()
    assert tags["synthetic"] == "true" and tags["task"] == "superres" and tags["factor"] == "4"
    assert tags["output_gsd"] == "2.5"
    assert result.metadata["date"] == "2021-06-15"  # from the product name
    assert (out[:, :32, :32] == 0).all()  # nodata restored, 4x the 8 px corner
    assert (out[:, 40:, 40:] > 0).all()  # valid data never collides with nodata (1..255)


def test_superres_band_files_at_mixed_resolutions(tmp_path, models):
    folder = tmp_path / "bands"
    folder.mkdir()
    from engine.geo.sentinel2_bands import BANDS

    for name, band in BANDS.items():
        factor = int(band.gsd_m // 10)
        h, w = 48 // factor, 40 // factor
        write(folder / f"T33TTG_20210615T101031_{name}.tif", s2_dn((1, h, w), seed=len(name)), res=band.gsd_m)
    result = run(models, tmp_path / "sr.tif", task="superres", input=str(folder), factor=2)
    with rasterio.open(result.path) as ds:
        assert (ds.width, ds.height) == (80, 96) and ds.res == pytest.approx((5.0, 5.0))
        assert ds.crs.to_epsg() == 32633


def test_superres_bbox_subset(tmp_path, models):
    src = write(tmp_path / "s2.tif", s2_dn())
    bbox = (300100.0, 4649700.0, 300300.0, 4649900.0)  # 20 x 20 px inside
    result = run(models, tmp_path / "sr.tif", task="superres", input=src, factor=2, bbox=bbox, date="2021-06-15")
    with rasterio.open(result.path) as ds:
        assert ds.bounds == pytest.approx(bbox)
        assert (ds.width, ds.height) == (40, 40)


def test_superres_refuses_what_it_cannot_map(tmp_path, models):
    rgb = write(tmp_path / "rgb.tif", np.zeros((3, 16, 16), "uint8"))
    with pytest.raises(InvalidRequest, match="3 band.*B04"):
        run(models, tmp_path / "x.tif", task="superres", input=rgb)
    eleven = write(tmp_path / "eleven.tif", s2_dn((11, 16, 16)))
    with pytest.raises(InvalidRequest, match="--bands"):
        run(models, tmp_path / "x.tif", task="superres", input=eleven)
    names = "B02,B03,B04,B05,B06,B07,B08,B8A,B11,B12,B01"
    with pytest.raises(InvalidRequest, match="--factor"):
        run(models, tmp_path / "x.tif", task="superres", input=eleven, bands=names, factor=3)
    with pytest.raises(InvalidRequest, match="does not overlap"):
        run(models, tmp_path / "x.tif", task="superres", input=eleven, bands=names, bbox=(0, 0, 10, 10))
    assert not (tmp_path / "x.tif").exists()


# ------------------------------------------------------------------------------------------------
# temporal


@pytest.fixture()
def dated(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for year in (2019, 2020, 2021):
        paths.append(write(tmp_path / f"rome_{year}-06-01.tif", (rng.random((3, 40, 36)) * 255).astype("uint8")))
    return paths


def test_temporal_output_on_the_first_inputs_grid(tmp_path, models, dated):
    # one input in another CRS (same place): reprojected onto the first input's grid
    with rasterio.open(dated[0]) as ds:
        from rasterio.warp import transform_bounds

        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    lonlat = write(tmp_path / "ll_2018-05-01.tif", np.full((3, 40, 40), 120, "uint8"), crs="EPSG:4326",
                   origin=(west, north), res=(east - west) / 40)
    result = run(models, tmp_path / "t.tif", task="temporal", inputs=[*dated, lonlat], date="2022-07-01")
    with rasterio.open(dated[0]) as a, rasterio.open(result.path) as b:
        assert b.crs == a.crs and b.transform == a.transform and b.shape == a.shape and b.count == 3
        tags = b.tags()
    assert tags["metadata_date"] == "2022-07-01" and tags["task"] == "temporal"
    assert tags["input_dates"].split(";") == ["2018-05-01", "2019-06-01", "2020-06-01", "2021-06-01"]


def test_temporal_errors(tmp_path, models, dated):
    far = write(tmp_path / "far_2020-01-01.tif", np.zeros((3, 40, 36), "uint8"), origin=(500000.0, 4650000.0))
    with pytest.raises(InvalidRequest, match="same place"):
        run(models, tmp_path / "t.tif", task="temporal", inputs=[dated[0], far], date="2022-07-01")
    undated = write(tmp_path / "scene.tif", np.zeros((3, 40, 36), "uint8"))
    with pytest.raises(InvalidRequest, match="no acquisition date.*--input-date"):
        run(models, tmp_path / "t.tif", task="temporal", inputs=[dated[0], undated], date="2022-07-01")
    with pytest.raises(InvalidRequest, match="one date per"):
        run(models, tmp_path / "t.tif", task="temporal", inputs=dated, input_dates=["2020-01-01"], date="2022-07-01")
    assert not (tmp_path / "t.tif").exists()


# ------------------------------------------------------------------------------------------------
# in-painting


@pytest.fixture()
def scene(tmp_path):
    rng = np.random.default_rng(2)
    image = (rng.random((3, 80, 70)) * 255).astype("uint8")
    return write(tmp_path / "scene_2021-06-15.tif", image, descriptions=["red", "green", "blue"]), image


def check_inpainted(path, original, mask):
    with rasterio.open(path) as ds:
        out = ds.read()
    assert np.array_equal(out[:, ~mask], original[:, ~mask]), "unmasked pixels must be bit-identical"
    assert (out[:, mask] != original[:, mask]).mean() > 0.5
    return out


def test_inpaint_qa_bits_unmasked_pixels_identical(tmp_path, models, scene):
    src, image = scene
    qa = np.zeros((80, 70), "uint16")
    qa[20:40, 10:30] = 3 << 14  # bits 14-15 == 3
    qa[50:60, 40:50] = 1 << 14  # bits 14-15 == 1: not masked
    qa_path = write(tmp_path / "qa.tif", qa)
    result = run(models, tmp_path / "f.tif", task="inpaint", input=src, mask=qa_path, mask_rule="bits:14-15=3",
                 dilate=2)
    mask = dilate(qa >> 14 == 3, 2)
    check_inpainted(result.path, image, mask)
    with rasterio.open(result.path) as ds:
        assert ds.tags()["synthetic_pixels"] == "masked pixels only"
        assert ds.crs.to_epsg() == 32633 and ds.descriptions == ("red", "green", "blue")


def test_inpaint_vector_mask_in_another_crs(tmp_path, models, scene):
    pyogrio = pytest.importorskip("pyogrio")
    import shapely
    from pyproj import Transformer

    src, image = scene
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    x0, y0 = ORIGIN[0] + 200, ORIGIN[1] - 300  # pixel col 20, row 30
    ring = [to_ll.transform(x, y) for x, y in [(x0, y0), (x0 + 150, y0), (x0 + 150, y0 - 100), (x0, y0 - 100)]]
    polygon = shapely.Polygon(ring)
    gpkg = tmp_path / "clouds.gpkg"
    pyogrio.raw.write(str(gpkg), geometry=np.array([shapely.to_wkb(polygon)], dtype=object),
                      field_data=[], fields=[], crs="EPSG:4326", geometry_type="Polygon", driver="GPKG")
    result = run(models, tmp_path / "f.tif", task="inpaint", input=src, mask=str(gpkg), dilate=0)
    with rasterio.open(result.path) as ds:
        out = ds.read()
    changed = (out != image).any(axis=0)
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 100
    assert 28 <= rows.min() and rows.max() <= 41 and 18 <= cols.min() and cols.max() <= 36


def test_inpaint_nodata_uint16_and_non_overlapping_mask(tmp_path, models):
    rng = np.random.default_rng(4)
    image = (rng.random((3, 60, 60)) * 3000 + 100).astype("uint16")
    image[:, 10:20, 10:30] = 0
    src = write(tmp_path / "img.tif", image, nodata=0)
    result = run(models, tmp_path / "f.tif", task="inpaint", input=src, mask="nodata", dilate=0, date="2020-01-01")
    mask = (image == 0).any(axis=0)
    with rasterio.open(result.path) as ds:
        out = ds.read()
        assert ds.dtypes[0] == "uint16"
    assert np.array_equal(out[:, ~mask], image[:, ~mask])
    assert (out[:, mask] > 0).all()  # filled, no nodata left where it was asked to fill

    elsewhere = write(tmp_path / "m.tif", np.ones((10, 10), "uint8"), origin=(900000.0, 1000000.0))
    with pytest.raises(InvalidRequest, match="does not overlap"):
        run(models, tmp_path / "g.tif", task="inpaint", input=src, mask=elsewhere)
    assert not (tmp_path / "g.tif").exists()


def test_inpaint_with_temporal_references(tmp_path, models, scene):
    src, image = scene
    ref = write(tmp_path / "clear_2021-05-01.tif", np.roll(image, 3, axis=2))
    mask_arr = np.zeros((80, 70), "uint8")
    mask_arr[30:50, 20:40] = 1
    mask_path = write(tmp_path / "mask.tif", mask_arr)
    result = run(models, tmp_path / "f.tif", task="inpaint", input=src, mask=mask_path, references=[ref],
                 dilate=0, resample=1, scheduler="ddim", steps=2)
    check_inpainted(result.path, image, mask_arr > 0)
    with pytest.raises(InvalidRequest, match="scheduler ddim"):
        run(models, tmp_path / "g.tif", task="inpaint", input=src, mask=mask_path, resample=1, scheduler="dpm++")


# ------------------------------------------------------------------------------------------------
# CLI error discipline and multi-process split


@pytest.mark.parametrize("argv, message", [
    (["superres", "--input", "{rgb}"], "band"),
    (["superres", "--input", "{missing}"], "does not exist"),
    (["temporal", "--input", "{rgb}", "--input", "{far}", "--date", "2022-01-01"], "same place"),
    (["temporal", "--input", "{rgb}", "--date", "2022-13-01"], "date"),
    (["inpaint", "--input", "{rgb}", "--mask", "{far}"], "does not overlap"),
    (["inpaint", "--input", "{rgb}", "--mask", "{rgb}", "--mask-rule", "bits:99"], "rule"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    paths = {
        "rgb": write(tmp_path / "rgb_2020-01-01.tif", np.zeros((3, 16, 16), "uint8")),
        "far": write(tmp_path / "far_2021-01-01.tif", np.zeros((3, 16, 16), "uint8"), origin=(700000.0, 100000.0)),
        "missing": str(tmp_path / "missing.tif"),
    }
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [a.format(**paths) for a in argv]
    code = main([*argv, "--model", "tiny", "--steps", "1", "--quiet", "--out", str(out_dir / "x.tif")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err.lower()
    assert list(out_dir.iterdir()) == []


def test_split_over_two_processes_equals_one(tmp_path, models):
    """The same command under two ranks (as accelerate launch runs it) writes the same COG: each rank
    writes its own stripe of rows (600 rows: 0-256 and 256-600), rank 0 publishes, and every
    overview level and tag but the creation time is the single run's."""
    dn = s2_dn((13, 150, 30), seed=9)
    src = write(tmp_path / "s2.tif", dn)
    request = {**FAST, "task": "superres", "input": src, "factor": 4, "date": "2021-06-15", "overlap": 4}
    single = run_task(parse_request(request), tmp_path / "single.tif", models=models)
    assert single is not None
    split_out = tmp_path / "split.tif"
    # the context comes from the launcher's variables through RunContext.from_env, as the CLI does
    code = ("import json,sys; from engine.tasks import parse_request, run_task; "
            "from engine.parallel import RunContext; "
            f"r = run_task(parse_request(json.loads(sys.argv[1])), {str(split_out)!r}, "
            "context=RunContext.from_env('cpu')); "
            "print('REPORTS', r is not None)")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(request)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        reports.append(out.strip().splitlines()[-1])
    assert reports == ["REPORTS True", "REPORTS False"]  # only rank 0 reports the result
    with rasterio.open(tmp_path / "single.tif") as a, rasterio.open(split_out) as b:
        assert a.transform == b.transform and a.crs == b.crs and a.shape == (600, 120)
        assert np.array_equal(a.read(), b.read()) and a.overviews(1) == b.overviews(1) == [2, 4]
        assert {**a.tags(), "created": ""} == {**b.tags(), "created": ""} and a.descriptions == b.descriptions
    for level in (0, 1):
        with rasterio.open(tmp_path / "single.tif", overview_level=level) as a, \
                rasterio.open(split_out, overview_level=level) as b:
            assert np.array_equal(a.read(), b.read())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch cleaned up


def test_dry_run_plans_without_a_model_or_output(tmp_path, capsys):
    src = write(tmp_path / "s2.tif", s2_dn((13, 100, 90)))
    out = tmp_path / "sr.tif"
    code = main(["superres", "--input", src, "--factor", "4", "--date", "2021-06-15", "--model", "tiny",
                 "--dry-run", "--json", "--out", str(out)])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and not out.exists()
    # 100 x 90 px at 10 m, factor 4 -> 400 x 360 px at 2.5 m; input tiles of 256/4 = 64 px, overlap 8
    assert (plan["width"], plan["height"], plan["tiles"]) == (360, 400, 4)
    assert plan["gsd_m"] == pytest.approx(2.5, rel=0.01) and plan["unet_evaluations"] == 4 * 20
    code = main(["generate", "--bbox", "12.45,41.88,12.52,41.93", "--size", "512", "--model", "tiny", "--dry-run",
                 "--out", str(tmp_path / "g.tif")])
    text = capsys.readouterr().out
    # --size is the longest side: Rome's 5.8 x 5.6 km bbox is 512 x 488 px (square pixels on the ground)
    assert code == 0 and "512x488 px" in text and "40 UNet evaluations" in text and not (tmp_path / "g.tif").exists()


@pytest.mark.parametrize("task", ["superres", "inpaint"])
def test_cancel_mid_tiles_leaves_nothing(tmp_path, models, task):
    from engine.errors import Cancelled
    from engine.progress import CancelToken

    if task == "superres":
        fields = {"input": write(tmp_path / "s2.tif", s2_dn((13, 70, 70))), "factor": 4, "date": "2021-06-15"}
    else:
        image = np.full((3, 300, 300), 90, "uint8")
        fields = {"input": write(tmp_path / "img.tif", image), "mask": write(tmp_path / "m.tif", np.ones((300, 300), "uint8"))}
    token, seen = CancelToken(), []

    def progress(p):
        seen.append((p.tile, p.step))
        if p.tile >= 1:  # the second tile has started: stop
            token.cancel()

    request = parse_request({**FAST, "task": task, "steps": 2, **fields})
    with pytest.raises(Cancelled):
        run_task(request, tmp_path / "out.tif", models=models, progress=progress, cancel=token)
    assert max(t for t, _ in seen) >= 1 and seen[-1][0] < 4  # stopped early, not after every tile
    assert not (tmp_path / "out.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(v).name for v in fields.values()
                                                               if str(v).startswith(str(tmp_path)))
