"""In-painting over rasters larger than one tile, with all their bands, and the metadata tags of every task.

Real GeoTIFFs, GeoPackage/GeoJSON layers and the tiny model (1 step, CPU); the tiny model's tiles are 256 px, so
a 400 x 300 px raster is 4 tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.cli import main
from engine.errors import InvalidRequest
from engine.metadata import SatMetadata
from engine.models.cache import ModelCache
from engine.tasks import parse_request, plan, run_task

UTM = "EPSG:32633"
ORIGIN = (300000.0, 4650000.0)
FAST = {"model": "tiny", "steps": 1, "seed": 5}


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def write(path, array, *, origin=ORIGIN, res=10.0, nodata=None, descriptions=None, tags=None, photometric=None):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    extra = {"photometric": photometric} if photometric else {}
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                       count=array.shape[0], dtype=str(array.dtype), crs=UTM, nodata=nodata,
                       transform=from_origin(origin[0], origin[1], res, res), **extra) as ds:
        ds.write(array)
        for i, d in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, d)
        if tags:
            ds.update_tags(**tags)
    return str(path)


@pytest.fixture()
def stack(tmp_path):
    """A 4-band uint16 R,G,B,NIR stack, 400 x 300 px, whose NIR is exactly 0.5 R + 0.25 G + 10."""
    rng = np.random.default_rng(8)
    rgb = (rng.random((3, 300, 400)) * 3000 + 100).astype("uint16")
    nir = np.rint(0.5 * rgb[0] + 0.25 * rgb[1] + 10).astype("uint16")
    image = np.concatenate([rgb, nir[None]])
    path = write(tmp_path / "stack_2021-06-15.tif", image, descriptions=["red", "green", "blue", "nir"])
    return path, image


# the polygon: pixel cols 20..35, rows 30..40, i.e. inside the first tile only
X0, Y0 = ORIGIN[0] + 200, ORIGIN[1] - 300
BOX = [(X0, Y0), (X0 + 150, Y0), (X0 + 150, Y0 - 100), (X0, Y0 - 100), (X0, Y0)]


def polygon_file(tmp_path, fmt, ring=BOX, name="clouds"):
    """A real GeoPackage or GeoJSON (EPSG:4326, as GeoJSON requires) holding one polygon."""
    pyogrio = pytest.importorskip("pyogrio")
    import shapely
    from pyproj import Transformer

    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    polygon = shapely.Polygon([to_ll.transform(x, y) for x, y in ring])
    path = tmp_path / f"{name}.{fmt}"
    pyogrio.raw.write(str(path), geometry=np.array([shapely.to_wkb(polygon)], dtype=object), field_data=[],
                      fields=[], crs="EPSG:4326", geometry_type="Polygon",
                      driver={"gpkg": "GPKG", "geojson": "GeoJSON"}[fmt])
    return str(path)


def run_counting_tiles(models, request, out):
    """Run the request; return the result and the tiles the model was called on."""
    denoised: set[int] = set()

    def progress(p):
        if p.message == "denoising":
            denoised.add(p.tile)

    return run_task(request, out, models=models, progress=progress), denoised


@pytest.mark.parametrize("kind", ["gpkg", "geojson", "raster"])
def test_mask_touching_one_tile_of_many(tmp_path, models, stack, kind):
    src, image = stack
    if kind == "raster":
        # a 0/1 mask raster covering only part of the input (not its first pixel): 60 x 50 px from col 10, row 20
        mask_arr = np.zeros((50, 60), "uint8")
        mask_arr[10:21, 10:26] = 1  # input cols 20..35, rows 30..40
        mask = write(tmp_path / "m.tif", mask_arr, origin=(ORIGIN[0] + 100, ORIGIN[1] - 200))
    else:
        mask = polygon_file(tmp_path, kind)
    request = parse_request({**FAST, "task": "inpaint", "input": src, "mask": mask, "dilate": 0})
    assert plan(request)["tiles"] == 4
    result, denoised = run_counting_tiles(models, request, tmp_path / "f.tif")
    assert len(denoised) == 1, "only the tile holding mask pixels is denoised; the others are copied"

    with rasterio.open(result.path) as ds:
        out = ds.read()
        assert ds.count == 4 and ds.dtypes == ("uint16",) * 4
        assert ds.descriptions == ("red", "green", "blue", "nir")
        tags = ds.tags()
    changed = (out != image).any(axis=0)
    rows, cols = np.nonzero(changed)
    assert changed.sum() > 100
    assert 28 <= rows.min() and rows.max() <= 42 and 18 <= cols.min() and cols.max() <= 37
    assert np.array_equal(out[:, ~changed], image[:, ~changed])  # every band of every other pixel, bit for bit
    # the band the model does not make (NIR) is filled by the documented rule: its linear fit on R,G,B, applied
    # to the generated R,G,B (here the fit is exact)
    expected = 0.5 * out[0, changed].astype(float) + 0.25 * out[1, changed] + 10
    assert np.abs(out[3, changed] - expected).max() <= 1.5
    assert tags["other_bands"] == "4" and tags["generated_bands"] == "1,2,3"
    assert any("band 4 (nir)" in w and "R² 1.00" in w for w in result.warnings)


@pytest.mark.parametrize("kind", ["gpkg", "raster"])
def test_mask_missing_the_whole_raster_fails_before_any_model_call(tmp_path, models, stack, kind):
    src, _ = stack
    far = [(x + 50_000, y) for x, y in BOX]
    mask = (polygon_file(tmp_path, "gpkg", far) if kind == "gpkg"
            else write(tmp_path / "m.tif", np.ones((10, 10), "uint8"), origin=(ORIGIN[0] + 50_000, ORIGIN[1])))
    request = parse_request({**FAST, "task": "inpaint", "input": src, "mask": mask})
    with pytest.raises(InvalidRequest, match="does not overlap") as err:
        plan(request)  # the dry-run's plan: no model is loaded
    # the message quotes the whole raster's extent, not a tile's
    assert "(300000.0, 4647000.0, 304000.0, 4650000.0)" in str(err.value)
    denoised: set[int] = set()
    with pytest.raises(InvalidRequest, match="does not overlap"):
        run_task(request, tmp_path / "g.tif", models=models, progress=lambda p: denoised.add(p.tile))
    assert not denoised and not (tmp_path / "g.tif").exists()


def test_five_bands_reordered_rgb_and_nodata_mask(tmp_path, models):
    """bands 3,2,1 as R,G,B of a 5-band uint8 stack with nodata: all 5 bands come back, none left with holes."""
    rng = np.random.default_rng(1)
    image = (rng.random((5, 40, 40)) * 200 + 20).astype("uint8")
    image[:, 10:20, 10:20] = 0
    src = write(tmp_path / "five.tif", image, nodata=0, photometric="minisblack")
    result = run_task(parse_request({**FAST, "task": "inpaint", "input": src, "mask": "nodata", "dilate": 0,
                                     "rgb_bands": "3,2,1", "date": "2020-05-01"}), tmp_path / "f.tif", models=models)
    with rasterio.open(result.path) as ds:
        out = ds.read()
        assert ds.count == 5 and ds.nodata == 0
    hole = (image == 0).any(axis=0)
    assert (out[:3, hole] > 0).all()  # R,G,B (bands 3,2,1) generated
    assert np.array_equal(out[:, ~hole], image[:, ~hole])
    # bands 4 and 5 have a fit (1,500 unmasked pixels): estimated, so no nodata is left
    assert (out[3:, hole] > 0).all()
    assert sum("band 4" in w or "band 5" in w for w in result.warnings) == 2


def test_other_bands_without_anything_to_fit_stay_nodata_and_the_user_is_told(tmp_path, models):
    rng = np.random.default_rng(2)
    image = (rng.random((4, 24, 24)) * 200 + 20).astype("uint16")
    mask = np.ones((24, 24), "uint8")
    mask[:3, :3] = 0  # 9 unmasked pixels: too few for a fit
    src = write(tmp_path / "four.tif", image, nodata=0)
    result = run_task(parse_request({**FAST, "task": "inpaint", "input": src, "dilate": 0,
                                     "mask": write(tmp_path / "m.tif", mask)}), tmp_path / "f.tif", models=models)
    with rasterio.open(result.path) as ds:
        out = ds.read()
    assert (out[3, mask > 0] == 0).all() and np.array_equal(out[:, mask == 0], image[:, mask == 0])
    assert (out[:3, mask > 0] > 0).all()
    assert any("band 4" in w and "left as nodata (0)" in w for w in result.warnings)


def test_grey_image_named_three_times(tmp_path, models):
    rng = np.random.default_rng(3)
    image = (rng.random((1, 40, 40)) * 200 + 20).astype("uint8")
    mask = np.zeros((40, 40), "uint8")
    mask[5:15, 5:15] = 1
    src = write(tmp_path / "grey.tif", image)
    result = run_task(parse_request({**FAST, "task": "inpaint", "input": src, "mask": write(tmp_path / "m.tif", mask),
                                     "dilate": 0, "rgb_bands": [1, 1, 1]}), tmp_path / "f.tif", models=models)
    with rasterio.open(result.path) as ds:
        out = ds.read()
        assert ds.count == 1
    assert np.array_equal(out[:, mask == 0], image[:, mask == 0]) and (out[:, mask > 0] != image[:, mask > 0]).any()


# ------------------------------------------------------------------------------------------------
# the 7 metadata values on every task's output


def check_metadata_tags(path, result):
    with rasterio.open(path) as ds:
        tags = ds.tags()
    assert tags["synthetic"] == "true"
    for key in ("model", "seed", "prompt", "steps", "guidance"):
        assert tags[key]
    assert len(tags["metadata_normalised"].split(",")) == 7
    assert tags["metadata_normalised_fields"] == "longitude,latitude,gsd,cloud_cover,year,month,day"
    back = SatMetadata.from_tags(tags)
    assert back.as_dict() == pytest.approx(result.metadata)
    return back, tags


def test_superres_temporal_inpaint_carry_the_metadata_tags(tmp_path, models, stack):
    rng = np.random.default_rng(0)
    s2 = write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif",
               (rng.random((13, 48, 40)) * 2500 + 800).astype("uint16"))
    sr = run_task(parse_request({**FAST, "task": "superres", "input": s2, "factor": 4, "cloud_cover": 0.1}),
                  tmp_path / "sr.tif", models=models)
    md, tags = check_metadata_tags(sr.path, sr)
    assert md.gsd_m == pytest.approx(2.5, rel=0.01) and str(md.date) == "2021-06-15" and md.cloud_cover == 0.1
    assert tags["TIFFTAG_DATETIME"] == "2021:06:15 00:00:00"

    frames = [write(tmp_path / f"f_{y}-06-01.tif", (rng.random((3, 40, 40)) * 255).astype("uint8"))
              for y in (2019, 2020)]
    tp = run_task(parse_request({**FAST, "task": "temporal", "inputs": frames, "date": "2022-07-01"}),
                  tmp_path / "t.tif", models=models)
    md, _ = check_metadata_tags(tp.path, tp)
    assert md.gsd_m == pytest.approx(10.0, rel=0.01) and str(md.date) == "2022-07-01"

    src, _ = stack
    ip = run_task(parse_request({**FAST, "task": "inpaint", "input": src, "mask": polygon_file(tmp_path, "gpkg")}),
                  tmp_path / "i.tif", models=models)
    md, _ = check_metadata_tags(ip.path, ip)
    assert md.gsd_m == pytest.approx(10.0, rel=0.01) and str(md.date) == "2021-06-15"  # from the file name


# ------------------------------------------------------------------------------------------------
# ordinary user errors: one line, exit 2


@pytest.mark.parametrize("args, message", [
    (["--rgb-bands", "0,1,2"], "band numbers start at 1"),
    (["--rgb-bands", "a,b,c"], "band numbers like 4,3,2"),
    (["--rgb-bands", "1,2,7"], "has 4 band(s)"),
    (["--out", "{folder}"], "is a folder"),
    (["--out", "{folder_tif}"], "is a folder"),
])
def test_cli_user_errors_exit_2(tmp_path, capsys, stack, args, message):
    src, _ = stack
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir.tif").mkdir()
    args = [a.format(folder=tmp_path / "outdir", folder_tif=tmp_path / "outdir.tif") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "outdir" / "x.tif")]
    code = main(["inpaint", "--input", src, "--mask", "nodata", "--model", "tiny", "--steps", "1", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "internal error" not in err
    assert list((tmp_path / "outdir").iterdir()) == [] and list((tmp_path / "outdir.tif").iterdir()) == []
