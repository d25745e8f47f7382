"""extend: a larger raster around an existing one, with the real tiny model on real GeoTIFFs.

The input's pixels come back bit for bit (every band, its dtype and nodata), the new ones are
generated, the grid is the input's grown to the bbox, there is no step at the border, windows
inside the input make no UNet call (and skipping them changes no pixel), and what cannot be done
is refused in one line (CLI exit 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.errors import InvalidRequest
from engine.tasks import ExtendRequest, plan, run_task

REPO = Path(__file__).resolve().parents[2]
UTM = "EPSG:32633"
X0, Y0, RES = 500000.0, 4600000.0, 10.0
#: 96 x 96 px at 10 m; the bbox below makes it 256 x 192 px, the input at column 80, row 32
BBOX = (X0 - 800.0, Y0 - 1600.0, X0 + 1760.0, Y0 + 320.0)


def make_input(path: Path, w: int = 96, h: int = 96, count: int = 3, dtype: str = "uint8", nodata=None,
               hole: bool = False) -> np.ndarray:
    """A smooth, textured RGB(+) raster at 10 m in UTM 33N; ``hole``: a nodata patch inside."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 9.0) + np.cos(yy / 13.0)) * 0.25 + 0.5
    data = np.stack([base * (0.6 + 0.2 * b) for b in range(count)]) + rng.normal(0, 0.02, (count, h, w))
    if dtype == "uint8":
        arr = np.clip(data * 255, 1, 255).astype(dtype)
    else:
        arr = np.clip(data * 3000 + 200, 1, 65535).astype(dtype)
    if hole:
        arr[:, 10:14, 20:30] = nodata
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=dtype, crs=UTM,
                       transform=from_origin(X0, Y0, RES, RES), nodata=nodata) as dst:
        dst.write(arr)
        dst.set_band_description(1, "red")
    return arr


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.cli", "extend", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """The CLI end to end once: a 96 x 96 uint8 RGB layer extended to 256 x 192 px (2 steps)."""
    tmp = tmp_path_factory.mktemp("extend")
    src = tmp / "layer.tif"
    image = make_input(src)
    out = tmp / "big.tif"
    done = cli("--input", str(src), "--bbox", ",".join(map(str, BBOX)), "--out", str(out), "--model", "tiny",
               "--steps", "2", "--seed", "7", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return src, image, out, result


def test_the_cli_extends_a_layer_keeping_its_pixels(rgb_run):
    src, image, out, result = rgb_run
    assert result["task"] == "extend" and (result["width"], result["height"]) == (256, 192)
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (256, 192, 3, "uint8")
        assert ds.crs.to_epsg() == 32633
        # the input's pixel size and pixel edges: the origin is a whole number of pixels away
        assert (ds.transform.a, ds.transform.e) == (RES, -RES) and ds.transform.b == ds.transform.d == 0
        assert ((X0 - ds.transform.c) / RES).is_integer() and ((Y0 - ds.transform.f) / RES).is_integer()
        assert tuple(ds.bounds) == pytest.approx(BBOX)  # the bbox lies on pixel edges here: exactly covered
        tags = ds.tags()
        data = ds.read()
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    col, row = int((X0 - BBOX[0]) / RES), int((BBOX[3] - Y0) / RES)
    assert (col, row) == (80, 32)
    assert np.array_equal(data[:, row:row + 96, col:col + 96], image)  # bit for bit
    new = np.ones(data.shape[1:], bool)
    new[row:row + 96, col:col + 96] = False
    generated = data[:, new].astype(np.float64)
    assert generated.std(axis=1).min() > 5  # generated, not a constant fill
    assert tags["task"] == "extend" and tags["synthetic"] == "true" and tags["scheduler"] == "ddim"
    assert [float(v) for v in tags["extended_from"].split(",")] == pytest.approx([X0, Y0 - 960, X0 + 960, Y0])
    assert tags["windows"] == "1" and "metadata_note" in tags
    assert "stateless sampler" in tags["sampler_note"] and tags["batch_size_rule"].startswith("extend's default")
    # the DDIM note is the plan's notice and a tag, not a warning on every job (the dock shows warnings)
    assert not any("DDIM" in w for w in result["warnings"]), result["warnings"]
    assert not list(out.parent.glob(".*"))  # no scratch left beside the output


def test_no_step_in_gradients_at_the_border(rgb_run):
    """The mean |difference| across each side of the input (and over the columns/rows next to it)
    lies within the spread of the new area's interior differences (fixed seed, deterministic):
    the new pixels continue the old ones. A hard cut against the tiny model's noise-like output
    (its decoder does not reproduce the input) is a step of twice the interior's."""
    _, _, out, _ = rgb_run
    with rasterio.open(out) as ds:
        b = ds.read().astype(np.float64)
    r0, r1, c0, c1 = 32, 128, 80, 176
    dx = np.abs(np.diff(b, axis=2)).mean(axis=0)  # dx[:, x - 1]: between columns x - 1 and x
    dy = np.abs(np.diff(b, axis=1)).mean(axis=0)
    interior_x = np.array([dx[r0:r1, x].mean() for x in [*range(2, c0 - 12), *range(c1 + 12, 250)]])
    interior_y = np.array([dy[y, c0:c1].mean() for y in [*range(r1 + 12, 186)]])
    for interior, across in ((interior_x, [dx[r0:r1, x].mean() for x in range(c0 - 12, c0 + 1)]),
                             (interior_x, [dx[r0:r1, x].mean() for x in range(c1 - 1, c1 + 12)]),
                             (interior_y, [dy[y, c0:c1].mean() for y in range(r1 - 1, r1 + 12)]),
                             (interior_y, [dy[y, c0:c1].mean() for y in range(r0 - 12, r0 + 1)])):
        assert max(across) <= interior.mean() + 4 * interior.std(), (across, interior.mean(), interior.std())


def test_a_uint16_four_band_layer_with_nodata(tmp_path):
    src = tmp_path / "ms.tif"
    image = make_input(src, count=4, dtype="uint16", nodata=0, hole=True)
    out = tmp_path / "ms-big.tif"
    request = ExtendRequest(input=str(src), bbox=BBOX, model="tiny", steps=1, seed=3)
    result = run_task(request, out)
    assert any("band 4" in w and "new pixels" in w for w in result.warnings)
    with rasterio.open(out) as ds:
        assert (ds.count, ds.dtypes, ds.nodata) == (4, ("uint16",) * 4, 0)
        assert ds.descriptions[0] == "red"
        data = ds.read()
        tags = ds.tags()
    known = data[:, 32:128, 80:176]
    assert np.array_equal(known, image)  # every band, the nodata hole included
    assert (known[:, 10:14, 20:30] == 0).all()
    new = np.ones(data.shape[1:], bool)
    new[32:128, 80:176] = False
    assert (data[:, new] != 0).all()  # no new pixel is nodata, band 4 (fitted on R,G,B) included
    assert data[:, new].astype(np.float64).std(axis=1).min() > 20
    assert tags["other_bands"] == "4" and tags["generated_bands"] == "1,2,3"


def test_a_bbox_in_another_crs_snaps_outward_to_the_input_grid(tmp_path):
    src = tmp_path / "layer.tif"
    make_input(src, w=64, h=64)
    from rasterio.warp import transform_bounds

    # a bbox in degrees around the layer's, off its pixel edges
    wgs = transform_bounds(UTM, "EPSG:4326", X0 - 333.0, Y0 - 640.0 - 217.0, X0 + 640.0 + 101.0, Y0 + 55.0)
    p = plan(ExtendRequest(input=str(src), bbox=wgs, crs="EPSG:4326", model="tiny", steps=2))
    back = transform_bounds("EPSG:4326", UTM, *wgs, densify_pts=21)
    minx, miny, maxx, maxy = p["bbox"]
    assert minx <= back[0] and miny <= back[1] and maxx >= back[2] and maxy >= back[3]  # covers the bbox
    assert back[0] - minx < RES and back[1] - miny < RES and maxx - back[2] < RES and maxy - back[3] < RES
    for v, origin in ((minx, X0), (maxx, X0), (miny, Y0), (maxy, Y0)):  # on the input's pixel edges
        assert abs((v - origin) / RES - round((v - origin) / RES)) < 1e-6
    assert p["width"] == round((maxx - minx) / RES) and p["height"] == round((maxy - miny) / RES)


def test_windows_inside_the_input_make_no_unet_call_and_change_no_pixel(tmp_path, monkeypatch):
    """A 128 px layer grown by 8 px per side, 64 px windows: 3 x 3 windows over an 18 x 18 cell
    canvas; the middle one lies inside the input's fully known cells (past the soft edge) and is
    skipped. The result is the same pixels as running it (its prediction is replaced anyway)."""
    import engine.tasks.extend as ext

    src = tmp_path / "layer.tif"
    make_input(src, w=128, h=128)
    bbox = (X0 - 80.0, Y0 - 1280.0 - 80.0, X0 + 1280.0 + 80.0, Y0 + 80.0)
    request = ExtendRequest(input=str(src), bbox=bbox, model="tiny", steps=1, seed=2, resolution=64, guidance=1.0)
    p = plan(request)
    assert (p["width"], p["height"]) == (144, 144)
    assert (p["windows"], p["windows_skipped"], p["windows_run"], p["tiles"]) == (9, 1, 8, 8)
    assert p["unet_evaluations"] == 8 * 1 * 1 and p["new_pixels"] == 144 * 144 - 128 * 128
    assert p["latent_canvas"] == [18, 18] and p["input_offset_px"] == [8, 8]
    skipping = run_task(request, tmp_path / "a.tif")
    assert skipping.denoise_steps == 8  # window steps measured: the skipped window ran none
    real = ext.extend_layout

    def no_skip(req, model_px):
        return dataclasses.replace(real(req, model_px), skipped=frozenset())

    monkeypatch.setattr(ext, "extend_layout", no_skip)
    everything = run_task(request, tmp_path / "b.tif")
    assert everything.denoise_steps == 9
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_the_plan_grows_only_the_sides_the_bbox_reaches(tmp_path):
    """A bbox reaching past the right edge only: the other sides are no border, the input's
    cells there need no soft edge, so more windows are skipped than with all four sides open."""
    src = tmp_path / "layer.tif"
    make_input(src, w=256, h=256)
    right = plan(ExtendRequest(input=str(src), bbox=(X0, Y0 - 2560.0, X0 + 2560.0 + 160.0, Y0), model="tiny",
                               resolution=64, steps=3))
    around = plan(ExtendRequest(input=str(src), bbox=(X0 - 80.0, Y0 - 2640.0, X0 + 2640.0, Y0 + 80.0),
                                model="tiny", resolution=64, steps=3))
    assert (right["width"], right["height"], right["input_offset_px"]) == (272, 256, [0, 0])
    assert right["windows_skipped"] > around["windows_skipped"] > 0
    for p in (right, around):
        assert p["unet_evaluations"] == p["windows_run"] * 3 * 2  # guidance 7.5: two evaluations a step
        assert p["windows_run"] + p["windows_skipped"] == p["windows"]


@pytest.mark.parametrize("bbox, crs, words", [
    ((X0 + 100, Y0 - 500, X0 + 500, Y0 - 100), None, "nothing to extend"),
    ((X0 - 1e5, Y0 - 1e5, X0 + 1e5, Y0 + 1e5), None, "smaller --bbox"),
    ((X0 - 100, Y0 - 1000, X0 + 1000, Y0 + 100), "EPSG:999999", "CRS"),
])
def test_refusals_are_one_line(tmp_path, bbox, crs, words):
    src = tmp_path / "layer.tif"
    make_input(src, w=64, h=64)
    request = ExtendRequest(input=str(src), bbox=bbox, crs=crs, model="tiny")
    with pytest.raises(InvalidRequest) as err:
        plan(request, tmp_path / "out.tif")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_refusals_exit_2_in_one_line(tmp_path, capsys):
    """The CLI's own main() (in this process; the end-to-end subprocess run is the fixture above)."""
    from engine.cli import main

    src = tmp_path / "layer.tif"
    make_input(src, w=64, h=64)
    inside = ",".join(map(str, (X0 + 100, Y0 - 500, X0 + 500, Y0 - 100)))
    outside = ",".join(map(str, (X0 - 100, Y0 - 1000, X0 + 1000, Y0 + 100)))
    cases = [("--bbox", inside, "--out", str(tmp_path / "o.tif")),  # nothing to extend
             ("--bbox", outside, "--out", str(src), "--overwrite"),  # the output is the input
             ("--bbox", outside, "--out", str(tmp_path / "o.tif"), "--scheduler", "dpm++")]
    for case in cases:
        code = main(["extend", "--input", str(src), "--model", "tiny", *case, "--dry-run"])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.splitlines() if not line.startswith("note:")]
        assert len(lines) == 1 and lines[0].startswith("diffusionsat extend: error:"), err
    assert not (tmp_path / "o.tif").exists()
    # the plan as JSON
    code = main(["extend", "--input", str(src), "--model", "tiny", "--bbox", outside, "--dry-run", "--json",
                 "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    p = json.loads(out)
    assert p["task"] == "extend" and (p["width"], p["height"]) == (110, 110) and p["unet_evaluations"] == 4


def test_an_input_without_crs_takes_input_crs(tmp_path):
    """What QGIS assigned (input_crs) is used where the file has no CRS (engine.geo.assign)."""
    src = tmp_path / "nocrs.tif"
    with rasterio.open(src, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                       transform=from_origin(X0, Y0, RES, RES)) as dst:
        dst.write(np.full((3, 64, 64), 100, np.uint8))
    bbox = (X0 - 100, Y0 - 1000, X0 + 1000, Y0 + 100)
    with pytest.raises(Exception, match="no CRS"):
        plan(ExtendRequest(input=str(src), bbox=bbox, model="tiny"))
    p = plan(ExtendRequest(input=str(src), bbox=bbox, crs=UTM, input_crs=UTM, model="tiny"))
    assert (p["width"], p["height"], p["crs"]) == (110, 110, UTM)


def test_a_bbox_apart_from_the_layer_is_refused_one_that_adjoins_it_is_not(tmp_path):
    """A bbox with a gap to the layer would make the hull of both (mostly far from any input
    pixel; often a bbox in the wrong place or CRS): one line naming both extents, in plain numbers."""
    src = tmp_path / "layer.tif"
    make_input(src, w=64, h=64)
    apart = (X0 + 2000.0, Y0 - 640.0, X0 + 2600.0, Y0)  # 1360 m east of the layer's right edge
    with pytest.raises(InvalidRequest) as err:
        plan(ExtendRequest(input=str(src), bbox=apart, model="tiny"))
    text = str(err.value)
    assert "does not touch" in text and "--bbox" in text and "\n" not in text
    assert "(500000,4599360,500640,4600000)" in text and "e+06" not in text  # the extent as written
    adjoining = (X0 + 640.0, Y0 - 640.0, X0 + 1280.0, Y0)  # shares the layer's right edge
    p = plan(ExtendRequest(input=str(src), bbox=adjoining, model="tiny", resolution=64))
    assert (p["width"], p["height"], p["input_offset_px"]) == (128, 64, [0, 0])


def test_extending_an_extend_output_keeps_every_pixel_and_the_real_extent(tmp_path):
    """Reprocessing a result: the second output keeps all the first's pixels, and its tags say
    that the pixels outside the *original* layer are synthetic (not only those outside
    extended_from, which now include the first run's new ring); a third run carries it on."""
    src = tmp_path / "layer.tif"
    image = make_input(src, w=64, h=64)
    fast = dict(model="tiny", steps=1, seed=4, resolution=64, guidance=1.0)
    first, second, third = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"
    run_task(ExtendRequest(input=str(src), bbox=(X0 - 80, Y0 - 720, X0 + 640, Y0), **fast), first)
    run_task(ExtendRequest(input=str(first), bbox=(X0 - 80, Y0 - 720, X0 + 720, Y0 + 80), **fast), second)
    run_task(ExtendRequest(input=str(second), bbox=(X0 - 160, Y0 - 720, X0 + 720, Y0 + 80), **fast), third)
    with rasterio.open(first) as a, rasterio.open(second) as b, rasterio.open(third) as c:
        assert (a.width, a.height, b.width, b.height, c.width, c.height) == (72, 72, 80, 80, 88, 80)
        one, two, three = a.read(), b.read(), c.read()
        tags_a, tags_b, tags_c = a.tags(), b.tags(), c.tags()
    assert np.array_equal(one[:, :64, 8:], image)
    assert np.array_equal(two[:, 8:, :72], one) and np.array_equal(three[:, :, 8:], two)
    layer = f"{X0!r},{Y0 - 640.0!r},{X0 + 640.0!r},{Y0!r}"
    assert tags_a["extended_from"] == layer and "input_synthetic" not in tags_a
    assert tags_b["extended_from"] != layer and tags_b["input_synthetic"] == "true"
    for tags in (tags_b, tags_c):
        assert tags["original_extent"] == layer and "original_extent" in tags["synthetic_pixels"]
        assert "original_extent" in tags["TIFFTAG_IMAGEDESCRIPTION"]
    assert tags_c["input_provenance"] == "extend by tiny, seed 4"


def test_an_ai_generated_input_makes_every_pixel_synthetic():
    from engine.tasks.extend import input_provenance

    assert input_provenance({"task": "superres"}, "tiny", 1) == {}  # no synthetic tag: a real layer
    tags = input_provenance({"synthetic": "true", "task": "generate", "model": "m", "seed": "3"}, "tiny", 1)
    assert tags["synthetic_pixels"].startswith("all") and "original_extent" not in tags
    assert tags["input_provenance"] == "generate by m, seed 3"
