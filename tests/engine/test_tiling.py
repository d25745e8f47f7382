"""Tiling and blending: coverage, no seams, no colour jumps, nodata, cancel, split/merge.

The stand-in "denoisers" here have known answers: a smooth function of each pixel's absolute
coordinates (every tile agrees, so the blend must reproduce it exactly), and the same function
plus a per-tile constant (tiles disagree, as a colour shift between tiles would; the blend must
turn the step into a gentle ramp).
"""

from __future__ import annotations

import multiprocessing
import uuid

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from engine.errors import Cancelled, InvalidRequest, RasterError
from engine.geo.accumulate import raster_reader, run_tiled
from engine.geo.cog import CogWriter
from engine.geo.stripes import Stripe
from engine.geo.grid import Grid
from engine.geo.tiles import blend_weights, plan_tiles
from engine.parallel import (
    accumulate_partial,
    merge_partials,
    run_tiled_distributed,
    tiles_for_rank,
)
from engine.progress import CancelToken

CRS = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 4600000.0, 10.0, 10.0)


# ---- stand-ins ------------------------------------------------------------------------------


def smooth(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A smooth 3-band field in 0.1..0.9 over absolute output pixel coordinates."""
    return np.stack(
        [
            0.5 + 0.2 * np.sin(cols / 13.0) + 0.2 * np.cos(rows / 17.0),
            0.5 + 0.4 * np.sin((rows + cols) / 29.0),
            0.5 + 0.3 * np.cos(cols / 7.0) * np.sin(rows / 11.0),
        ]
    ).astype(np.float32)


def smooth_on(window) -> np.ndarray:
    rows, cols = np.mgrid[
        int(window.row_off) : int(window.row_off + window.height),
        int(window.col_off) : int(window.col_off + window.width),
    ]
    return smooth(rows.astype(np.float64), cols.astype(np.float64))


def global_denoiser(tile, array):
    """Answer known everywhere: the smooth field at the tile's output pixels."""
    return smooth_on(tile.out_window)


def tile_offset(index: int) -> float:
    return float(np.random.default_rng(index).uniform(-0.1, 0.1))


def shifted_denoiser(tile, array):
    """Like a model with a colour shift per tile: the field plus a per-tile constant."""
    return smooth_on(tile.out_window) + np.float32(tile_offset(tile.index))


def zeros_reader(tile):
    return np.zeros((1, *tile.shape), dtype=np.float32)


def writer(dest, width, height, *, count=3, dtype="uint8", nodata=None, transform=TRANSFORM, part=None,
           blocksize=128, overviews=False):
    """A CogWriter of the test's grid; ``part``: a split run's stripe to write, or all of them to publish."""
    layout = {} if part is None else {"stripe": part} if isinstance(part, Stripe) else {"stripes": part}
    return CogWriter(
        dest,
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs=CRS,
        transform=transform,
        nodata=nodata,
        blocksize=blocksize,
        overviews=overviews,
        **layout,
    )


def read(path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


# ---- planning -------------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(300, 200), (64, 64), (65, 300), (1000, 513)])
def test_plan_covers_every_pixel_with_fixed_size_windows(width, height):
    tiles = plan_tiles(width, height, 64, 16)
    seen = np.zeros((height, width), dtype=int)
    for t in tiles:
        assert (t.window.width, t.window.height) == (64, 64)
        seen[t.valid.toslices()] += 1
    assert seen.min() >= 1
    assert [t.index for t in tiles] == list(range(len(tiles)))
    # Last column/row end exactly on the raster edge (shifted back, not padded).
    assert max(t.window.col_off + t.window.width for t in tiles) == width
    assert max(t.window.row_off + t.window.height for t in tiles) == height
    assert all(t.valid == t.window for t in tiles)


def test_plan_stride_and_edges():
    tiles = plan_tiles(300, 200, 64, 16)
    cols = sorted({int(t.window.col_off) for t in tiles})
    assert cols == [0, 48, 96, 144, 192, 236]
    top_left, bottom_right = tiles[0], tiles[-1]
    assert top_left.touches == (True, False, True, False)
    assert bottom_right.touches == (False, True, False, True)


def test_plan_small_raster_is_padded_and_only_valid_part_is_written():
    (tile,) = plan_tiles(50, 30, 64, 16, factor=2)
    assert (tile.window.width, tile.window.height) == (64, 64)
    assert (tile.valid.width, tile.valid.height) == (50, 30)
    assert (tile.out_valid.width, tile.out_valid.height) == (100, 60)
    assert tile.out_valid_slices == (slice(0, 60), slice(0, 100))
    assert tile.touches == (True, True, True, True)


def test_plan_factor_scales_output_windows():
    for t1, t2 in zip(plan_tiles(300, 200, 64, 16), plan_tiles(300, 200, 64, 16, factor=2)):
        assert t2.window == t1.window
        assert t2.out_window.col_off == 2 * t1.window.col_off
        assert t2.out_window.row_off == 2 * t1.window.row_off
        assert t2.out_window.width == t2.out_window.height == 128


@pytest.mark.parametrize(
    "args", [(100, 100, 64, 32), (100, 100, 64, -1), (0, 100, 64, 8), (100, 100, 64, 8, 0), (100, 100, 64, 8, 1.5)]
)
def test_plan_rejects_bad_requests(args):
    with pytest.raises(InvalidRequest):
        plan_tiles(*args)


def test_tiles_for_rank_partitions_the_plan():
    tiles = plan_tiles(300, 200, 64, 16)
    shares = [tiles_for_rank(tiles, r, 3) for r in range(3)]
    assert sorted(t.index for s in shares for t in s) == list(range(len(tiles)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(InvalidRequest):
        tiles_for_rank(tiles, 3, 3)


# ---- blending -------------------------------------------------------------------------------


def test_blend_weights_shape_and_range():
    w = blend_weights(64, 64, 16)
    assert w.dtype == np.float32 and w.shape == (64, 64)
    assert w.min() > 0 and w[16:48, 16:48].min() == 1.0
    assert w[0, 32] < 0.01 and w[32, 63] < 0.01
    edge = blend_weights(64, 64, 16, (True, False, True, False))
    assert edge[0, 0] == 1.0 and edge[0, 32] == 1.0 and edge[63, 32] < 0.01


def test_blend_is_a_partition_of_unity():
    width, height = 300, 200
    tiles = plan_tiles(width, height, 64, 16)
    total = np.zeros((height, width))
    for t in tiles:
        total[t.valid.toslices()] += t.weights()
    assert total.min() > 0
    # Where neighbours overlap by exactly `overlap` (all but the shifted last row/column) the
    # weights already sum to 1, before any normalisation.
    assert np.allclose(total[:136, :236], 1.0, atol=1e-6)
    # With normalisation any set of agreeing tiles reproduces its value exactly.
    field = smooth_on(Window(0, 0, width, height))
    acc = np.zeros_like(field, dtype=np.float64)
    for t in tiles:
        acc[(slice(None), *t.valid.toslices())] += field[(slice(None), *t.valid.toslices())] * t.weights()
    assert np.allclose(acc / total, field, atol=1e-6)


# ---- the seam tests -------------------------------------------------------------------------


@pytest.mark.parametrize("width,height", [(300, 200), (50, 30)])
def test_no_seam_with_a_denoiser_whose_answer_is_known(tmp_path, width, height):
    tiles = plan_tiles(width, height, 64, 16)
    dest = tmp_path / "out.tif"
    with writer(dest, width, height) as out:
        stats = run_tiled(zeros_reader, global_denoiser, out, tiles, scratch_dir=tmp_path)
    assert stats.tiles == len(tiles) and stats.nodata_pixels == 0
    expected = np.rint(smooth_on(Window(0, 0, width, height)) * 255)
    got = read(dest).astype(float)
    assert np.abs(got - expected).max() <= 1  # uint8 rounding only


def test_float_output_reproduces_the_field_exactly(tmp_path):
    tiles = plan_tiles(300, 200, 64, 16)
    dest = tmp_path / "out.tif"
    with writer(dest, 300, 200, dtype="float32") as out:
        run_tiled(zeros_reader, global_denoiser, out, tiles)
    expected = smooth_on(Window(0, 0, 300, 200))
    assert np.abs(read(dest) - expected).max() < 1e-6


def _border_jumps(image: np.ndarray, tiles, overlap: int) -> tuple[float, float]:
    """Max |step| between neighbouring pixels across tile borders, and inside tile centres."""
    border = 0.0
    inside = 0.0
    for t in tiles:
        r0, c0 = int(t.window.row_off), int(t.window.col_off)
        r1, c1 = r0 + t.size, c0 + t.size
        rows, cols = slice(r0, r1), slice(c0, c1)
        for c in (c0, c1):  # vertical borders
            if 0 < c < image.shape[2]:
                border = max(border, np.abs(image[:, rows, c] - image[:, rows, c - 1]).max())
        for r in (r0, r1):  # horizontal borders
            if 0 < r < image.shape[1]:
                border = max(border, np.abs(image[:, r, cols] - image[:, r - 1, cols]).max())
        centre = image[:, r0 + overlap : r1 - overlap, c0 + overlap : c1 - overlap]
        inside = max(
            inside,
            np.abs(np.diff(centre, axis=1)).max(),
            np.abs(np.diff(centre, axis=2)).max(),
        )
    return float(border), float(inside)


def offset_only(tile, array):
    return np.full((3, *tile.out_shape), tile_offset(tile.index), dtype=np.float32)


def _max_step(image: np.ndarray) -> float:
    return float(max(np.abs(np.diff(image, axis=1)).max(), np.abs(np.diff(image, axis=2)).max()))


def test_per_tile_colour_shift_leaves_no_step_at_borders(tmp_path):
    width, height, overlap = 300, 200, 16
    tiles = plan_tiles(width, height, 64, overlap)
    offsets = [tile_offset(t.index) for t in tiles]
    spread = max(offsets) - min(offsets)
    # The raised-cosine ramp changes by at most pi/(2*overlap) per pixel, so tiles that differ by
    # up to `spread` can make neighbouring pixels differ by at most this much (a gentle ramp).
    ramp_bound = spread * np.pi / (2 * overlap)

    def run(tiles_, model, name):
        dest = tmp_path / name
        with writer(dest, width, height, dtype="float32") as out:
            run_tiled(zeros_reader, model, out, tiles_)
        return read(dest)

    # A real-looking image (smooth field + per-tile shift): steps across tile borders are no
    # larger than steps inside tiles plus the ramp bound.
    shifted = run(tiles, shifted_denoiser, "shifted.tif")
    border, inside = _border_jumps(shifted, tiles, overlap)
    assert border <= inside + ramp_bound, (border, inside, ramp_bound)

    # The shifts alone: no step at any tile border, and nowhere a step above the ramp bound.
    blended = run(tiles, offset_only, "blended.tif")
    border, _ = _border_jumps(blended, tiles, overlap)
    assert border <= ramp_bound / 10
    assert _max_step(blended) <= ramp_bound + 1e-6

    # The same model with hard cuts (no overlap ramps) shows the step the blend removes.
    hard_tiles = plan_tiles(width, height, 64, 0)
    hard_border, _ = _border_jumps(run(hard_tiles, offset_only, "hard.tif"), hard_tiles, 0)
    assert hard_border > spread / 2
    assert border < hard_border / 100


# ---- super-resolution grid ------------------------------------------------------------------


def test_superres_factor_2_grid_and_values(tmp_path):
    width, height = 120, 90
    src = tmp_path / "in.tif"
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, height, width), dtype=np.uint8)
    with rasterio.open(
        src, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
        crs=CRS, transform=TRANSFORM,
    ) as ds:
        ds.write(data)

    def nearest_x2(tile, array):
        return np.repeat(np.repeat(array, 2, axis=1), 2, axis=2)

    dest = tmp_path / "sr.tif"
    with rasterio.open(src) as ds:
        out_grid = Grid.of(ds).scaled(2)
        tiles = plan_tiles(ds.width, ds.height, 32, 8, factor=2)
        with writer(dest, out_grid.width, out_grid.height, transform=out_grid.transform) as out:
            run_tiled(raster_reader(ds, scale=1 / 255), nearest_x2, out, tiles)
        in_bounds, in_crs, in_res = ds.bounds, ds.crs, ds.res
    with rasterio.open(dest) as ds:
        assert ds.crs == in_crs
        assert ds.bounds == pytest.approx(in_bounds)
        assert ds.res == pytest.approx((in_res[0] / 2, in_res[1] / 2))
        assert (ds.width, ds.height) == (240, 180)
        got = ds.read()
    assert np.array_equal(got, np.repeat(np.repeat(data, 2, axis=1), 2, axis=2))


# ---- nodata ---------------------------------------------------------------------------------


def test_nodata_stays_nodata_and_does_not_spread(tmp_path):
    width, height = 200, 150
    field = smooth_on(Window(0, 0, width, height))
    valid = np.ones((height, width), dtype=bool)
    valid[40:70, 60:100] = False  # a hole across a tile border
    valid[120:150, 150:200] = False  # a corner
    nan_input = field.copy()
    nan_input[:, 10, 10] = np.nan  # a single NaN in the input must not blank its tile

    def reader(tile):
        sl = (slice(None), *tile.valid.toslices())
        return nan_input[sl], valid[tile.valid.toslices()]

    seen = []

    def identity(tile, array):
        seen.append(np.isfinite(array).all())
        out = array.copy()
        if tile.index == 1:
            out[:, 5, 5] = np.nan  # a model NaN in one tile: neighbours must still be fine
        return out

    tiles = plan_tiles(width, height, 64, 16)
    dest = tmp_path / "out.tif"
    with writer(dest, width, height, nodata=0) as out:
        stats = run_tiled(reader, identity, out, tiles)
    got = read(dest)
    expected = np.rint(field * 255)
    assert all(seen)  # the model never saw NaN / nodata
    invalid = ~valid
    invalid[10, 10] = True
    assert (got[:, invalid] == 0).all()
    assert stats.nodata_pixels == invalid.sum()
    ok = ~invalid
    assert (np.abs(got.astype(float) - expected)[:, ok]).max() <= 1
    # Pixels right next to the hole are exact, not mixed with nodata.
    assert np.abs(got[:, 39, 60:100].astype(float) - expected[:, 39, 60:100]).max() <= 1


def test_all_nodata_tile_is_skipped(tmp_path):
    tiles = plan_tiles(100, 100, 64, 16)
    calls = []

    def reader(tile):
        mask = np.ones(tile.shape, dtype=bool)
        if tile.index == 0:
            mask[:] = False
        return np.zeros((1, *tile.shape), np.float32), mask

    def model(tile, array):
        calls.append(tile.index)
        return global_denoiser(tile, array)

    dest = tmp_path / "out.tif"
    with writer(dest, 100, 100, nodata=0) as out:
        stats = run_tiled(reader, model, out, tiles)
    assert 0 not in calls and stats.skipped_tiles == 1
    assert (read(dest)[:, :36, :36] == 0).all()  # only tile 0 covers this corner


def test_valid_value_that_rounds_to_nodata_is_kept(tmp_path):
    tiles = plan_tiles(40, 40, 32, 8)
    dest = tmp_path / "out.tif"
    with writer(dest, 40, 40, nodata=0, count=1) as out:
        run_tiled(zeros_reader, lambda t, a: np.zeros((1, *t.out_shape), np.float32), out, tiles)
    assert (read(dest) == 1).all()


# ---- cancel ---------------------------------------------------------------------------------


def test_cancel_mid_run_leaves_nothing(tmp_path):
    outdir = tmp_path / "out"
    scratch = tmp_path / "scratch"
    outdir.mkdir()
    scratch.mkdir()
    token = CancelToken()
    fractions = []

    def progress(p):
        fractions.append(p.fraction)
        if p.tile == 3:
            token.cancel()

    tiles = plan_tiles(300, 200, 64, 16)
    dest = outdir / "out.tif"
    with pytest.raises(Cancelled):
        with writer(dest, 300, 200) as out:
            run_tiled(zeros_reader, global_denoiser, out, tiles, progress=progress, cancel=token, scratch_dir=scratch)
    assert not dest.exists()
    assert list(outdir.iterdir()) == [] and list(scratch.iterdir()) == []
    assert fractions == sorted(fractions) and len(fractions) == 3


def test_writer_size_must_match_the_tiles(tmp_path):
    with pytest.raises(InvalidRequest, match=r"Grid\.scaled"):
        with writer(tmp_path / "o.tif", 100, 100) as out:
            run_tiled(zeros_reader, global_denoiser, out, plan_tiles(100, 100, 64, 16, factor=2))


# ---- split over processes -------------------------------------------------------------------


def run_ranks(tiles, world, folder, run_id, dest, *, denoiser=None, width=None, height=None, progress_0=None,
              blocksize=128, overviews=False, open_writer_hook=None, **kw):
    """Every rank of a split run side by side (threads: each its own writers and files, as processes
    have); returns (each rank's outcome: its stats or the exception it raised, the writers' parts)."""
    import threading

    from engine.geo.stripes import stripe_alignment
    from engine.geo.tiles import output_size

    w, h = output_size(tiles) if width is None else (width, height)
    outcomes, parts = [None] * world, [[] for _ in range(world)]

    def rank_main(rank):
        def open_writer(part):
            parts[rank].append(part)
            out = writer(dest, w, h, dtype="float32", part=part, blocksize=blocksize, overviews=overviews)
            return open_writer_hook(rank, part, out) if open_writer_hook else out

        try:
            outcomes[rank] = run_tiled_distributed(
                zeros_reader, denoiser or global_denoiser, tiles, bands=3, folder=folder, rank=rank, world_size=world,
                run_id=run_id, open_writer=open_writer, timeout_s=30, align=stripe_alignment(w, h, blocksize),
                progress=progress_0 if rank == 0 else None, **kw)
        except BaseException as err:  # noqa: BLE001 - the test looks at it
            outcomes[rank] = err

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes, parts

SPLIT = dict(width=300, height=200, tile=64, overlap=16)


def _rank_main(rank: int, world_size: int, folder: str, run_id: str, dest: str) -> None:
    tiles = plan_tiles(SPLIT["width"], SPLIT["height"], SPLIT["tile"], SPLIT["overlap"])
    run_tiled_distributed(
        zeros_reader,
        shifted_denoiser,
        tiles,
        bands=3,
        folder=folder,
        rank=rank,
        world_size=world_size,
        run_id=run_id,
        open_writer=lambda part: writer(dest, SPLIT["width"], SPLIT["height"], dtype="float32", part=part),
        timeout_s=60,
    )


def test_two_processes_split_and_merge_like_one(tmp_path):
    tiles = plan_tiles(SPLIT["width"], SPLIT["height"], SPLIT["tile"], SPLIT["overlap"])
    single = tmp_path / "single.tif"
    with writer(single, SPLIT["width"], SPLIT["height"], dtype="float32") as out:
        run_tiled(zeros_reader, shifted_denoiser, out, tiles)

    folder = tmp_path / "shared"
    split = tmp_path / "split.tif"
    run_id = uuid.uuid4().hex[:12]
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, str(folder), run_id, str(split))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert np.array_equal(read(single), read(split))
    assert list(folder.iterdir()) == []  # partials cleaned up


def test_merge_reports_a_missing_rank(tmp_path):
    tiles = plan_tiles(100, 100, 64, 16)
    accumulate_partial(
        zeros_reader, global_denoiser, tiles, bands=3, folder=tmp_path, rank=0, world_size=2, run_id="r1"
    )
    dest = tmp_path / "o.tif"
    with pytest.raises(RasterError, match=r"rank\(s\) 1 of 2 did not finish"):
        with writer(dest, 100, 100) as out:
            merge_partials(tmp_path, 2, out, run_id="r1", timeout_s=0.3, poll_s=0.05)
    assert not dest.exists()


def test_merge_stops_at_once_when_a_rank_failed(tmp_path):
    tiles = plan_tiles(100, 100, 64, 16)

    def broken(tile, array):
        raise RuntimeError("out of GPU memory")

    with pytest.raises(RuntimeError):
        accumulate_partial(
            zeros_reader, broken, tiles, bands=3, folder=tmp_path, rank=1, world_size=2, run_id="r2"
        )
    with pytest.raises(RasterError, match="rank 1 failed.*out of GPU memory"):
        with writer(tmp_path / "o.tif", 100, 100) as out:
            merge_partials(tmp_path, 2, out, run_id="r2", timeout_s=30)


def test_ranks_without_tiles_still_merge(tmp_path):
    tiles = plan_tiles(50, 30, 64, 16)  # one tile, three ranks: two have nothing to do
    for rank in (2, 1, 0):
        accumulate_partial(
            zeros_reader, global_denoiser, tiles, bands=3, folder=tmp_path / "s", rank=rank,
            world_size=3, run_id="r3",
        )
    dest = tmp_path / "o.tif"
    with writer(dest, 50, 30, dtype="float32") as out:
        stats = merge_partials(tmp_path / "s", 3, out, run_id="r3", timeout_s=5)
    assert stats.tiles == 1
    assert np.abs(read(dest) - smooth_on(Window(0, 0, 50, 30))).max() < 1e-6


def test_rank_0_reports_the_wait_and_the_merge_without_going_back(tmp_path):
    """A split run's rank 0 said nothing while it waited for the other ranks and merged (the bar sat
    at its last tile, then the run ended); now it reports both, at the fraction its tiles reached."""
    tiles = plan_tiles(100, 100, 64, 16)
    seen = []
    run_ranks(tiles, 2, tmp_path / "s", "r4", tmp_path / "o.tif", progress_0=lambda p: seen.append((p.message, p.fraction)))
    messages = [m for m, _ in seen]
    order = ["waiting for the other ranks' tiles", "merging the ranks' tiles", "waiting for the other ranks' stripes",
             "publishing the COG"]
    assert [messages.index(m) for m in order] == sorted(messages.index(m) for m in order), messages
    fractions = [f for _, f in seen]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), seen



def read_levels(path) -> list:
    """The full resolution and every overview level of the COG at ``path``."""
    with rasterio.open(path) as ds:
        levels, n = [ds.read()], len(ds.overviews(1))
    for i in range(n):
        with rasterio.open(path, overview_level=i) as ov:
            levels.append(ov.read())
    return levels


def test_each_rank_merges_and_writes_its_own_stripe_and_rank_0_publishes_them(tmp_path):
    """The serial tail of a split run: rank 0 merged every rank's partial and averaged the overviews
    alone after the last tile (minutes for a whole Sentinel-2 tile). Now every rank writes its stripe
    of rows, overviews included; rank 0 only publishes, and the COG is the single run's, every level."""
    tiles = plan_tiles(300, 600, 64, 16)
    single = tmp_path / "single.tif"
    with writer(single, 300, 600, dtype="float32", blocksize=16, overviews=True) as out:
        run_tiled(zeros_reader, shifted_denoiser, out, tiles)
    folder, dest = tmp_path / "shared", tmp_path / "split.tif"
    outcomes, parts = run_ranks(tiles, 3, folder, "s1", dest, denoiser=shifted_denoiser, blocksize=16,
                                overviews=True)
    assert outcomes[0].tiles == len(tiles) and outcomes[1:] == [None, None], outcomes
    stripes = parts[0][1]
    assert [p[0] for p in parts] == stripes and parts[1] == [stripes[1]] and parts[2] == [stripes[2]]
    assert [(s.row0, s.row1) for s in stripes] == [(0, 192), (192, 384), (384, 600)]  # 64-row multiples
    expected, got = read_levels(single), read_levels(dest)
    assert len(got) == len(expected) == 7  # 300 x 600 px in 16 px blocks: overviews 2 .. 64
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert list(folder.iterdir()) == []


def test_a_rank_failing_in_its_stripe_fails_the_run_and_writes_nothing(tmp_path):
    tiles = plan_tiles(300, 200, 64, 16)
    folder, dest = tmp_path / "shared", tmp_path / "split.tif"

    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            raise OSError(5, "stripe storage went away")

        def __exit__(self, *exc):
            return False

    outcomes, _ = run_ranks(tiles, 2, folder, "s2", dest, width=300, height=200,
                            open_writer_hook=lambda rank, part, w: Broken(w) if rank == 1 else w)
    assert isinstance(outcomes[1], OSError)
    assert isinstance(outcomes[0], RasterError) and "rank 1 failed" in str(outcomes[0])
    assert "stripe storage went away" in str(outcomes[0])
    assert not dest.exists()
    # at most rank 0's own failure marker stays (had it failed first, another rank might wait to see it)
    assert {p.name for p in folder.iterdir()} <= {"tiling-s2-rank0.failed"}


def test_a_rerun_takes_none_of_a_failed_runs_markers(tmp_path):
    """A run that failed leaves markers under its id (a rerun of the same command has the same id):
    the rerun's ranks remove their own first, so the rerun neither fails on an old failure marker
    nor merges an old partial."""
    tiles = plan_tiles(300, 200, 64, 16)
    folder, dest = tmp_path / "shared", tmp_path / "split.tif"
    rank1 = {t.index for t in tiles_for_rank(tiles, 1, 2)}

    def fails_on_rank_1(tile, array):
        if tile.index in rank1:
            raise RuntimeError("out of GPU memory")
        return global_denoiser(tile, array)

    outcomes, _ = run_ranks(tiles, 2, folder, "s3", dest, denoiser=fails_on_rank_1)
    assert isinstance(outcomes[0], RasterError) and not dest.exists()
    assert (folder / "tiling-s3-rank0.failed").exists()
    outcomes, _ = run_ranks(tiles, 2, folder, "s3", dest, denoiser=shifted_denoiser)
    assert outcomes[0].tiles == len(tiles), outcomes
    single = tmp_path / "single.tif"
    with writer(single, 300, 200, dtype="float32") as out:
        run_tiled(zeros_reader, shifted_denoiser, out, tiles)
    assert np.array_equal(read(single), read(dest)) and list(folder.iterdir()) == []


def test_a_rank_stops_waiting_when_rank_0_abandoned_the_run(tmp_path):
    """Rank 0 removes the run's folder when it fails; a rank waiting in it stops at once, not after
    the hour-long timeout."""
    with pytest.raises(RasterError, match="abandoned"):
        with writer(tmp_path / "o.tif", 100, 100) as out:
            merge_partials(tmp_path / "gone", 2, out, run_id="s4", timeout_s=3600)
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("height, world", [(200, 2), (600, 3), (5000, 7), (100, 4), (3000, 1)])
def test_the_stripes_cover_the_output_on_aligned_rows_near_each_ranks_tiles(tmp_path, height, world):
    from engine.parallel import plan_stripes

    tiles = plan_tiles(400, height, 64, 16)
    stripes = plan_stripes(tiles, world, tmp_path, align=128)
    assert [s.index for s in stripes] == list(range(world)) and stripes[0].row0 == 0
    assert all(a.row1 == b.row0 for a, b in zip(stripes, stripes[1:])) and stripes[-1].row1 == height
    assert all(s.row0 % 128 == 0 and s.row0 <= s.row1 for s in stripes)
    for s in stripes[1:]:
        first = min((t.out_valid.row_off for t in tiles_for_rank(tiles, s.index, world)), default=height)
        assert abs(s.row0 - min(first, height)) <= 64 or s.row0 == height

# ---- batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [2, 3, 64])
def test_batched_process_writes_what_one_tile_at_a_time_writes(tmp_path, batch_size):
    """A batched process function gets several tiles per call (never an empty tile) and the
    output is byte-identical to one tile per call."""
    from engine.geo.accumulate import batched

    tiles = plan_tiles(300, 200, 64, 16)
    calls = []

    def reader(tile):
        mask = np.ones(tile.shape, dtype=bool)
        if tile.index == 1:
            mask[:] = False  # an empty tile inside a batch
        return np.zeros((1, *tile.shape), np.float32), mask

    @batched
    def model(batch, arrays):
        calls.append([t.index for t in batch])
        return [shifted_denoiser(t, a) for t, a in zip(batch, arrays)]

    one, many = tmp_path / "one.tif", tmp_path / "many.tif"
    with writer(one, 300, 200, nodata=0) as out:
        run_tiled(reader, shifted_denoiser, out, tiles)
    with writer(many, 300, 200, nodata=0) as out:
        stats = run_tiled(reader, model, out, tiles, batch_size=batch_size)
    assert np.array_equal(read(one), read(many))
    assert stats.skipped_tiles == 1 and 1 not in sum(calls, [])
    assert max(map(len, calls)) == min(batch_size, len(tiles) - 1) and len(calls) > 0
