"""Masks from QA bits, class rasters, vectors and nodata; dilation and feathering
(engine/geo/masks.py, engine/geo/mask_rules.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from engine.errors import InvalidRequest
from engine.geo import mask_rules as mr
from engine.geo import masks as mk
from engine.geo.grid import Grid

UTM = CRS.from_epsg(32633)
X0, Y0 = 500000.0, 4650000.0  # UTM 33N, about 15°E 42°N
GRID = Grid(UTM, Affine(10, 0, X0, 0, -10, Y0), 100, 100)  # 1 km, 10 m pixels


def write_raster(path: Path, data, crs, transform, nodata=None):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                       nodata=nodata) as dst:
        dst.write(data)
    return path


# ----------------------------------------------------------------------------- rules


def test_bit_field_rules():
    qa = np.array([
        3 << 14,            # bits 14-15 = 3
        1 << 14,            # bits 14-15 = 1
        1 << 3,             # bit 3
        2 << 8,             # bits 8-9 = 2
        3 << 8,             # bits 8-9 = 3
        1 << 8,             # bits 8-9 = 1
        0,
    ], np.uint16)
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bits:14-15=3"),
                                  [1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bit:3"), [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bits:8-9>=2"), [0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bits:8-9 < 2"), [1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bits:3=0"), [1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bit:3 | BITS:14-15=1"),
                                  [0, 1, 1, 0, 0, 0, 0])


def test_value_threshold_nodata_and_nonzero_rules():
    scl = np.array([0, 3, 4, 8, 9, 10, 11], np.uint8)
    np.testing.assert_array_equal(mr.mask_from_bits(scl, "values:3,8,9,10"),
                                  [0, 1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(scl, "s2-scl-cloud"), [0, 1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(scl, "nonzero"), [0, 1, 1, 1, 1, 1, 1])
    prob = np.array([0.1, 0.4, 0.41, 0.5, np.nan], np.float32)
    np.testing.assert_array_equal(mr.mask_from_bits(prob, "gt:0.4"), [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(prob, "ge:0.5"), [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(prob, "lt:0.4"), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(prob, "le:0.4"), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(prob, "nodata"), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(mr.mask_from_bits(prob, "gt:0.45|nodata"), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(mr.mask_from_bits(np.array([0, 255, 7]), "nodata", nodata=255),
                                  [0, 1, 0])


def test_presets():
    # Landsat C2 QA_PIXEL: 21824 is "clear, low confidence everything" (bits 6, 8, 10, 12, 14)
    clear = 21824
    assert bin(clear) == "0b101010101000000"
    qa = np.array([clear, clear | 1 << 1, clear | 1 << 2, clear | 1 << 3, clear | 1 << 4,
                   clear | 1 << 5, 1], np.uint16)
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "landsat-cloud"), [0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "landsat-fill"), [0, 0, 0, 0, 0, 0, 1])
    qa60 = np.array([0, 1 << 10, 1 << 11, 1 << 9], np.uint16)
    np.testing.assert_array_equal(mr.mask_from_bits(qa60, "s2-qa60-cloud"), [0, 1, 1, 0])
    fmask = np.array([0, 1, 2, 3, 4, 255], np.uint8)
    np.testing.assert_array_equal(mr.mask_from_bits(fmask, "fmask"), [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(mr.mask_from_bits(fmask, "fmask-cloud|values:255"),
                                  [0, 0, 1, 0, 1, 1])
    assert mr.parse_mask_rule("Landsat-Cloud").terms == mr.parse_mask_rule(
        "bit:1|bit:2|bit:3|bit:4").terms


@pytest.mark.parametrize("bad", [
    "", "bits:14-15", "bits:15-14=1", "bits:14-15=4", "bit:x", "values:", "values:a,b",
    "gt:", "gt:abc", "cloud", "bit:3||bit:4", "bit:3|", "bits:60-70=1",
])
def test_invalid_rules_show_the_grammar(bad):
    with pytest.raises(InvalidRequest) as err:
        mr.parse_mask_rule(bad)
    assert "bits:LO-HI" in str(err.value) and "landsat-cloud" in str(err.value)


def test_bit_rules_on_float_rasters():
    qa = np.array([8.0, 0.0, np.nan], np.float32)
    np.testing.assert_array_equal(mr.mask_from_bits(qa, "bit:3"), [1, 0, 0])
    with pytest.raises(InvalidRequest, match="whole numbers"):
        mr.mask_from_bits(np.array([0.5, 8.0]), "bit:3")


# ----------------------------------------------------------------------------- rasters


def test_mask_raster_on_the_same_crs_coarser_grid(tmp_path):
    qa = np.zeros((10, 10), np.uint16)  # 30 m QA over the target's corner
    qa[2, 3] = 1 << 3
    path = write_raster(tmp_path / "qa.tif", qa, UTM, Affine(30, 0, X0, 0, -30, Y0))
    m = mk.mask_from_raster(path, "landsat-cloud", GRID)
    assert m.shape == (100, 100) and m.dtype == bool
    expected = np.zeros((100, 100), bool)
    expected[6:9, 9:12] = True
    np.testing.assert_array_equal(m, expected)
    # a window of the target grid gives the same pixels
    part = mk.mask_from_raster(path, "bit:3", GRID, window=Window(5, 4, 20, 10))
    np.testing.assert_array_equal(part, expected[4:14, 5:25])


def test_mask_raster_in_another_crs_is_reprojected_correctly(tmp_path):
    # a class raster in EPSG:4326, ~2.6 m pixels, checkerboard of 8x8-pixel cloud blocks
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lon0, lat1 = to_ll.transform(X0 - 100, Y0 + 100)
    lon1, lat0 = to_ll.transform(X0 + 1100, Y0 - 1100)
    res = 0.00003
    w, h = int((lon1 - lon0) / res) + 1, int((lat1 - lat0) / res) + 1
    rr, cc = np.indices((h, w))
    scl = np.where(((rr // 8) + (cc // 8)) % 2 == 0, 9, 4).astype(np.uint8)
    ll_tf = Affine(res, 0, lon0, 0, -res, lat1)
    path = write_raster(tmp_path / "scl.tif", scl, "EPSG:4326", ll_tf)

    m = mk.mask_from_raster(path, "s2-scl-cloud", GRID)
    # nearest resampling = the class of the mask pixel under each target pixel centre
    rows, cols = np.indices(GRID.shape)
    xs, ys = GRID.transform * (cols + 0.5, rows + 0.5)
    lon, lat = to_ll.transform(xs, ys)
    c_src, r_src = ~ll_tf * (lon, lat)
    expected = scl[np.floor(r_src).astype(int), np.floor(c_src).astype(int)] == 9
    agree = (m == expected).mean()
    assert agree > 0.995, agree
    assert 0.3 < m.mean() < 0.7


def test_rule_is_evaluated_before_reprojection(tmp_path):
    # values 16 (bit 4: not cloud) and 8 (bit 3: cloud) side by side; a 20 m target over 10 m
    # QA with "max" would pick 16 on raw values and lose the cloud; evaluating first keeps it
    qa = np.tile(np.array([[16, 8]], np.uint16), (2, 1))
    path = write_raster(tmp_path / "qa.tif", qa, UTM, Affine(10, 0, X0, 0, -10, Y0))
    coarse = Grid(UTM, Affine(20, 0, X0, 0, -20, Y0), 1, 1)
    assert mk.mask_from_raster(path, "bit:3", coarse, resampling="max")[0, 0]


def test_mask_raster_nodata_rule_and_binary_default(tmp_path):
    data = np.zeros((100, 100), np.uint8)
    data[:, :10] = 255
    data[50, 50] = 1
    path = write_raster(tmp_path / "m.tif", data, UTM, GRID.transform, nodata=255)
    nd = mk.mask_from_raster(path, "nodata", GRID)
    assert nd[:, :10].all() and nd[:, 10:].sum() == 0
    binary = mk.mask_from_raster(path, None, GRID)  # None means "nonzero"
    assert binary[50, 50] and binary.sum() == 100 * 10 + 1


def test_mask_raster_that_does_not_overlap_is_refused(tmp_path):
    path = write_raster(tmp_path / "far.tif", np.ones((5, 5), np.uint8), UTM,
                        Affine(10, 0, X0 + 50000, 0, -10, Y0))
    with pytest.raises(InvalidRequest, match="does not overlap the input raster.*CRS/extent"):
        mk.mask_from_raster(path, "nonzero", GRID)


# ----------------------------------------------------------------------------- vectors

try:
    import pyogrio
except ImportError:  # vector masks need pyogrio; everything else runs without it
    pyogrio = None

needs_pyogrio = pytest.mark.skipif(pyogrio is None, reason="pyogrio is not installed")


def write_gpkg(path: Path, geoms, crs: str, layer: str = "clouds", kinds=None, append=False):
    import shapely

    wkb = np.array([shapely.to_wkb(g) for g in geoms], dtype=object)
    kinds = kinds or ["cloud"] * len(geoms)
    pyogrio.raw.write(path, wkb, [np.array(kinds, dtype=object)], ["kind"], layer=layer,
                      driver="GPKG", geometry_type="Unknown", crs=crs, append=append)
    return path


@needs_pyogrio
def test_polygon_in_wgs84_masks_the_right_utm_pixels(tmp_path):
    import shapely

    # a rectangle in UTM (x 207..603 m, y 297..693 m below the top) drawn in lon/lat
    to_ll = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    corners = [(X0 + 207, Y0 - 297), (X0 + 603, Y0 - 297), (X0 + 603, Y0 - 693),
               (X0 + 207, Y0 - 693)]
    poly = shapely.Polygon([to_ll.transform(x, y) for x, y in corners])
    point = shapely.Point(to_ll.transform(X0 + 855, Y0 - 155))  # inside pixel (15, 85)
    path = write_gpkg(tmp_path / "clouds.gpkg", [poly, point], "EPSG:4326")
    m = mk.mask_from_vector(path, GRID)
    expected = np.zeros((100, 100), bool)
    expected[29:70, 20:61] = True  # rows 29..69 (y 290..700), cols 20..60 (x 200..610)
    expected[15, 85] = True
    np.testing.assert_array_equal(m, expected)
    # centres only: the pixels whose centre is inside (x 215..595, y 305..685)
    centres = mk.mask_from_vector(path, GRID, all_touched=False)
    expected[:] = False
    expected[30:69, 21:60] = True
    np.testing.assert_array_equal(centres[:, :70], expected[:, :70])


@needs_pyogrio
def test_vector_layer_where_and_window(tmp_path):
    import shapely

    path = tmp_path / "multi.gpkg"
    a = shapely.box(X0 + 0, Y0 - 100, X0 + 100, Y0)          # pixels rows 0..9, cols 0..9
    b = shapely.box(X0 + 500, Y0 - 600, X0 + 600, Y0 - 500)  # rows 50..59, cols 50..59
    write_gpkg(path, [a, b], UTM.to_wkt(), layer="clouds", kinds=["cloud", "shadow"])
    write_gpkg(path, [shapely.box(X0 + 900, Y0 - 1000, X0 + 1000, Y0 - 900)], UTM.to_wkt(),
               layer="other", append=True)
    m = mk.mask_from_vector(path, GRID, layer="clouds", all_touched=False)
    assert m[0:10, 0:10].all() and m[50:60, 50:60].all() and m.sum() == 200
    only_shadow = mk.mask_from_vector(path, GRID, "clouds", where="kind = 'shadow'",
                                      all_touched=False)
    assert only_shadow.sum() == 100 and only_shadow[50:60, 50:60].all()
    other = mk.mask_from_vector(path, GRID, layer="other", all_touched=False)
    assert other[90:, 90:].all() and other.sum() == 100
    win = mk.mask_from_vector(path, GRID, "clouds", window=((45, 65), (45, 65)),
                              all_touched=False)
    np.testing.assert_array_equal(win, m[45:65, 45:65])


@needs_pyogrio
def test_vector_that_does_not_overlap_is_refused(tmp_path):
    import shapely

    path = write_gpkg(tmp_path / "far.gpkg", [shapely.box(2.0, 48.0, 2.1, 48.1)], "EPSG:4326")
    with pytest.raises(InvalidRequest, match="does not overlap the input raster.*CRS/extent"):
        mk.mask_from_vector(path, GRID)


# ----------------------------------------------------------------------------- nodata


def test_mask_from_nodata_arrays_and_files(tmp_path):
    a = np.array([[1.0, np.nan, 3.0], [0.0, 5.0, -9999.0]], np.float32)
    np.testing.assert_array_equal(mk.mask_from_nodata(a, -9999.0), [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(mk.mask_from_nodata(a), [[0, 1, 0], [0, 0, 0]])
    bands = np.stack([np.ones((2, 3)), np.array([[0, 1, 1], [1, 1, 1]])]).astype(np.uint16)
    np.testing.assert_array_equal(mk.mask_from_nodata(bands, 0), [[1, 0, 0], [0, 0, 0]])

    data = np.ones((2, 20, 30), np.int16)
    data[0, 5, 7] = -1
    data[1, 12, 20] = -1
    path = write_raster(tmp_path / "n.tif", data, UTM, GRID.transform, nodata=-1)
    full = mk.mask_from_nodata(path)
    assert full.shape == (20, 30) and full[5, 7] and full[12, 20] and full.sum() == 2
    part = mk.mask_from_nodata(path, window=Window(5, 4, 10, 10))
    np.testing.assert_array_equal(part, full[4:14, 5:15])
    assert mk.mask_from_nodata(path, nodata=1).all()


# ----------------------------------------------------------------------------- morphology


def brute_distance(mask: np.ndarray) -> np.ndarray:
    pts = np.argwhere(mask)
    rr, cc = np.indices(mask.shape)
    d2 = (rr[..., None] - pts[:, 0]) ** 2 + (cc[..., None] - pts[:, 1]) ** 2
    return np.sqrt(d2.min(-1))


def test_distance_transform_is_exact_up_to_the_cap():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) < 0.01
    mask[0, 0] = True
    d = mk.distance_to_mask(mask, 6)
    ref = brute_distance(mask)
    near = ref <= 6
    np.testing.assert_allclose(d[near], ref[near], rtol=0, atol=1e-5)
    assert (d[~near] >= 6).all()


def test_dilate_numbers():
    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    np.testing.assert_array_equal(mk.dilate(m, 0), m)
    one = mk.dilate(m, 1)
    assert one.sum() == 9 and one[3:6, 3:6].all()  # a 3x3 square
    two = mk.dilate(m, 2)
    assert two.sum() == 21 and two[2:7, 2:7].sum() == 21 and not two[2, 2]  # 5x5 minus corners
    three = mk.dilate(m, 3)
    disk = brute_distance(m) <= 3.5
    np.testing.assert_array_equal(three, disk)
    # a pixel at the border grows without wrapping around
    edge = np.zeros((5, 5), bool)
    edge[0, 0] = True
    np.testing.assert_array_equal(np.argwhere(mk.dilate(edge, 1)), [[0, 0], [0, 1], [1, 0],
                                                                    [1, 1]])
    with pytest.raises(InvalidRequest):
        mk.dilate(m, -1)


def test_feather_numbers():
    m = np.zeros((5, 21), bool)
    m[:, 10] = True
    w = mk.feather(m, 4)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w[2, 4:17], [0, 0, 0.2, 0.4, 0.6, 0.8, 1, 0.8, 0.6, 0.4, 0.2, 0,
                                            0], atol=1e-6)
    p = np.zeros((9, 9), bool)
    p[4, 4] = True
    wp = mk.feather(p, 4)
    assert wp[4, 4] == 1
    assert math.isclose(wp[3, 3], 1 - math.sqrt(2) / 5, rel_tol=1e-6)
    assert wp[0, 0] == 0  # sqrt(32) > 5
    np.testing.assert_array_equal(mk.feather(p, 0), p.astype(np.float32))


# ----------------------------------------------------------------------------- grids


def test_target_grid_from_objects_and_windows(tmp_path):
    path = write_raster(tmp_path / "g.tif", np.zeros((1, 30, 40), np.uint8), UTM, GRID.transform)
    g = Grid.from_raster(path)
    assert g.shape == (30, 40) and g.crs == UTM
    assert g.bounds == (X0, Y0 - 300, X0 + 400, Y0)
    sub = g.subgrid(((10, 20), (5, 15)))
    assert sub.shape == (10, 10) and sub.transform == Affine(10, 0, X0 + 50, 0, -10, Y0 - 100)
    with pytest.raises(InvalidRequest, match="outside"):
        g.subgrid(Window(35, 0, 10, 10))

    class Stack:  # anything with crs, transform and a (.., H, W) shape, e.g. an S2Stack
        crs = UTM
        transform = GRID.transform
        shape = (30, 40)

    assert Grid.of(Stack()) == g
    assert Grid.of(str(path), Window(0, 0, 5, 5)).shape == (5, 5)
