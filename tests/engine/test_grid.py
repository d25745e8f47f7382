"""One raster grid (engine/geo/grid.py): bounds -> whole pixels, sub-grids, scaling, ground pixel size,
and the grid every tile and COG carries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from engine.errors import InvalidRequest
from engine.geo.cog import CogWriter, write_cog
from engine.geo.grid import Grid
from engine.geo.tiles import plan_tiles

UTM = CRS.from_epsg(32633)
X0, Y0 = 500000.0, 4650000.0  # UTM 33N on the central meridian, about 15°E 42°N
GRID = Grid(UTM, Affine(10, 0, X0, 0, -10, Y0), 100, 80)  # 1 km x 800 m, 10 m pixels


# ---- covering_window -------------------------------------------------------------------------


def test_bounds_on_pixel_edges_take_no_sliver_pixel():
    # columns 2..5, rows 1..4 exactly; the sums below carry floating-point noise of ~1e-10 m
    noise = 0.1 + 0.2 - 0.3  # 5.5e-17, times the coordinates' magnitude below
    left, right = X0 + 20 + 3e-9, X0 + 60 - 3e-9
    bottom, top = Y0 - 50 + 3e-9 + noise, Y0 - 10 - 3e-9
    assert GRID.covering_window((left, bottom, right, top)) == Window(2, 1, 4, 4)
    # and the noise outwards, too
    assert GRID.covering_window((X0 + 20 - 3e-9, Y0 - 50 - 3e-9, X0 + 60 + 3e-9, Y0 - 10 + 3e-9)) == Window(2, 1, 4, 4)


def test_bounds_inside_pixels_take_every_pixel_they_touch():
    # 2.5 .. 5.5 columns, 1.2 .. 3.9 rows -> columns 2..5 (4), rows 1..3 (3)
    assert GRID.covering_window((X0 + 25, Y0 - 39, X0 + 55, Y0 - 12)) == Window(2, 1, 4, 3)


def test_bounds_partly_outside_are_clipped_to_the_grid():
    win = GRID.covering_window((X0 - 500, Y0 - 35, X0 + 35, Y0 + 500))
    assert win == Window(0, 0, 4, 4)
    win = GRID.covering_window((X0 + 985, Y0 - 2000, X0 + 5000, Y0 - 795))
    assert win == Window(98, 79, 2, 1)


def test_margin_grows_the_window_and_stays_on_the_grid():
    assert GRID.covering_window((X0 + 20, Y0 - 50, X0 + 60, Y0 - 10), margin=1) == Window(1, 0, 6, 6)
    assert GRID.covering_window((X0, Y0 - 10, X0 + 10, Y0), margin=2) == Window(0, 0, 3, 3)


def test_disjoint_bounds_are_refused_with_the_grid_bounds():
    with pytest.raises(InvalidRequest, match=r"do not overlap the raster \(its bounds are .*500000.*check the CRS"):
        GRID.covering_window((X0 + 2000, Y0 - 50, X0 + 3000, Y0))
    # touching the edge is no overlap either
    with pytest.raises(InvalidRequest, match="do not overlap"):
        GRID.covering_window((X0 + 1000, Y0 - 50, X0 + 1100, Y0))


def test_subset_refuses_with_the_cli_message():
    with pytest.raises(InvalidRequest, match=r"--bbox .* does not overlap the input raster .*--crs"):
        GRID.subset((X0 + 2000, Y0 - 50, X0 + 3000, Y0), None)
    with pytest.raises(InvalidRequest, match="lower-left corner first"):
        GRID.subset((X0 + 60, Y0 - 50, X0 + 20, Y0), None)
    whole, win = GRID.subset(None, None)
    assert whole == GRID and win == Window(0, 0, 100, 80)


def test_geographic_bbox_is_covered_minimally():
    to_utm = Transformer.from_crs("EPSG:4326", UTM.to_wkt(), always_xy=True)
    to_ll = Transformer.from_crs(UTM.to_wkt(), "EPSG:4326", always_xy=True)
    lon0, lat0 = to_ll.transform(X0 + 300, Y0 - 400)
    lon1, lat1 = to_ll.transform(X0 + 620, Y0 - 110)
    bbox = (lon0, lat0, lon1, lat1)
    win = GRID.covering_window(bbox, crs="EPSG:4326")
    sub, sub_win = GRID.subset(bbox, "EPSG:4326")
    assert sub_win == win and sub == GRID.subgrid(win)
    # every point of the lon/lat box's boundary lies in the window; one pixel less on any side
    # would miss one of them
    t = np.linspace(0, 1, 101)
    lons = np.concatenate([lon0 + (lon1 - lon0) * t, np.full_like(t, lon1), lon1 - (lon1 - lon0) * t, np.full_like(t, lon0)])
    lats = np.concatenate([np.full_like(t, lat0), lat0 + (lat1 - lat0) * t, np.full_like(t, lat1), lat1 - (lat1 - lat0) * t])
    cols, rows = ~GRID.transform * to_utm.transform(lons, lats)
    c0, r0, c1, r1 = win.col_off, win.row_off, win.col_off + win.width, win.row_off + win.height
    assert cols.min() >= c0 and cols.max() <= c1 and rows.min() >= r0 and rows.max() <= r1
    assert cols.min() < c0 + 1 and cols.max() > c1 - 1 and rows.min() < r0 + 1 and rows.max() > r1 - 1
    assert 30 <= win.width <= 34 and 28 <= win.height <= 31  # about 320 m x 290 m


# ---- derived grids ---------------------------------------------------------------------------


def test_subgrid_moves_the_origin_and_keeps_the_pixel_size():
    sub = GRID.subgrid(Window(5, 3, 10, 4))
    assert sub.transform == Affine(10, 0, X0 + 50, 0, -10, Y0 - 30)
    assert (sub.width, sub.height, sub.crs) == (10, 4, UTM)
    assert sub.bounds == (X0 + 50, Y0 - 70, X0 + 150, Y0 - 30)
    assert GRID.subgrid(((3, 7), (5, 15))) == sub
    assert GRID.window_bounds(Window(5, 3, 10, 4)) == sub.bounds
    with pytest.raises(InvalidRequest, match="outside the target raster"):
        GRID.subgrid(Window(95, 0, 10, 10))


def test_scaled_divides_the_pixel_size_and_keeps_the_extent():
    out = GRID.scaled(4)
    assert out.transform == Affine(2.5, 0, X0, 0, -2.5, Y0)
    assert (out.width, out.height) == (400, 320)
    assert out.bounds == GRID.bounds and out.crs == UTM
    assert GRID.scaled(1) == GRID
    for bad in (0, 2.0, -1):
        with pytest.raises(InvalidRequest, match="whole number >= 1"):
            GRID.scaled(bad)


def test_gsd_m_in_utm_is_the_ground_size_of_a_pixel():
    # On the central meridian UTM's scale factor is 0.9996: a 10 m pixel is 10.004 m on the ground.
    assert GRID.gsd_m() == pytest.approx(10 / 0.9996, rel=2e-4)


def test_gsd_m_in_degrees_is_metres_on_the_ground():
    deg = 1e-4
    grid = Grid(CRS.from_epsg(4326), Affine(deg, 0, 10.0, 0, -deg, 60.05), 1000, 1000)  # 0.1° at 60°N
    geod = Geod(ellps="WGS84")
    _, _, dx = geod.inv(10.0, 60.0, 10.1, 60.0)
    _, _, dy = geod.inv(10.05, 59.95, 10.05, 60.05)
    expected = math.sqrt(dx / 1000 * dy / 1000)  # ~5.6 m east-west x ~11.1 m north-south
    assert grid.gsd_m() == pytest.approx(expected, rel=1e-3)
    assert 7.5 < grid.gsd_m() < 8.2  # not degrees, and not the equator's 11.1 m


# ---- where grids come from and go -----------------------------------------------------------


def test_from_raster_and_of(tmp_path):
    path = tmp_path / "g.tif"
    with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8",
                       crs=UTM, transform=GRID.transform) as ds:
        ds.write(np.zeros((1, 30, 40), np.uint8))
    g = Grid.from_raster(path)
    assert g == Grid(UTM, GRID.transform, 40, 30)
    assert Grid.from_raster(path, Window(10, 5, 20, 10)) == g.subgrid(Window(10, 5, 20, 10))
    with rasterio.open(path) as ds:
        assert Grid.of(ds) == g

    class Carrier:  # anything with a .grid, like an S2Stack
        grid = g

    assert Grid.of(Carrier()) == g
    with pytest.raises(InvalidRequest, match="is not a target grid"):
        Grid.of(object())


def test_tiles_carry_their_grid():
    tiles = plan_tiles(100, 80, 32, 8, factor=2, grid=GRID)
    last = tiles[-1]
    # the last tile is shifted back to end on the raster edge: columns 68..99, rows 48..79
    assert last.grid == Grid(UTM, Affine(10, 0, X0 + 680, 0, -10, Y0 - 480), 32, 32)
    assert last.out_grid == Grid(UTM, Affine(5, 0, X0 + 680, 0, -5, Y0 - 480), 64, 64)
    assert last.out_grid.bounds == last.grid.bounds
    assert tiles[0].valid_grid.bounds == GRID.window_bounds(tiles[0].valid)
    with pytest.raises(InvalidRequest, match="the grid is 100x80 px"):
        plan_tiles(90, 80, 32, 8, grid=GRID)
    with pytest.raises(ValueError, match="planned on sizes only"):
        plan_tiles(100, 80, 32, 8)[0].grid


def test_cog_writer_takes_a_grid(tmp_path):
    grid = GRID.subgrid(Window(0, 0, 20, 10))
    with CogWriter(tmp_path / "a.tif", grid=grid, count=1, dtype="uint8") as out:
        assert out.grid == grid
        out.write(np.full((1, 10, 20), 7, np.uint8))
    write_cog(tmp_path / "b.tif", np.full((1, 10, 20), 9, np.uint8), grid=grid)
    for name in ("a.tif", "b.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert Grid.of(ds) == grid
    with pytest.raises(TypeError, match="not both"):
        CogWriter(tmp_path / "c.tif", grid=grid, width=20, count=1, dtype="uint8")
    with pytest.raises(ValueError, match="the grid 10x20"):
        write_cog(tmp_path / "d.tif", np.zeros((1, 5, 5), np.uint8), grid=grid)
