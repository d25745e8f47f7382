"""The overlapped tile loop (engine.geo.accumulate.tile_loop): reader thread, model in the caller,
writer thread. Same bytes as the sequential loop; errors of any stage stop the others and come
back with their own type; nothing is left behind."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.errors import Cancelled, DiskFull, RasterError
from engine.geo.accumulate import QUEUE_DEPTH, batched, raster_reader, run_tiled
from engine.geo.cog import CogWriter
from engine.geo.tiles import plan_tiles
from engine.parallel import accumulate_partial
from engine.progress import CancelToken

CRS = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 4600000.0, 10.0, 10.0)
W, H = 300, 200


def source(path, nodata_block=True):
    """A real 3-band uint8 GeoTIFF with texture and a nodata hole."""
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, size=(3, H, W), dtype=np.uint8)
    if nodata_block:
        data[:, 0:130, 0:160] = 0  # whole tiles of nodata: some tiles are skipped
    with rasterio.open(path, "w", driver="GTiff", width=W, height=H, count=3, dtype="uint8", crs=CRS,
                       transform=TRANSFORM, nodata=0, compress="deflate") as ds:
        ds.write(data)
    return path


def writer(dest, **kw):
    return CogWriter(dest, width=W, height=H, count=3, dtype="uint8", crs=CRS, transform=TRANSFORM,
                     nodata=0, blocksize=64, overviews=False, **kw)


def model(tile, array):
    """A model whose output depends on the input and the tile (so tiles disagree, as real ones do)."""
    shift = np.float32(np.random.default_rng(tile.index).uniform(-0.1, 0.1))
    return np.clip(array[:3] * 0.8 + 0.1 + shift, 0, 1)


def workers():
    return [t for t in threading.enumerate() if t.name.startswith("diffusionsat-tile")]


def run(src, dest, process=model, *, scratch=None, **kw):
    with rasterio.open(src) as ds, writer(dest) as out:
        return run_tiled(raster_reader(ds, scale=1 / 255), process, out, plan_tiles(W, H, 64, 16),
                         scratch_dir=scratch, **kw)


def read(path):
    with rasterio.open(path) as ds:
        return ds.read()


def left_behind(tmp_path, *folders):
    return [p for f in folders for p in f.iterdir()]


# ---- same bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_overlapped_loop_writes_the_sequential_bytes(tmp_path, batch_size):
    src = source(tmp_path / "in.tif")
    calls = []

    @batched
    def many(tiles, arrays):
        calls.append(len(tiles))
        return [model(t, a) for t, a in zip(tiles, arrays)]

    seq = run(src, tmp_path / "seq.tif", overlap=False)
    ovl = run(src, tmp_path / "ovl.tif", many, batch_size=batch_size)
    assert (tmp_path / "seq.tif").read_bytes() == (tmp_path / "ovl.tif").read_bytes()
    assert (ovl.tiles, ovl.skipped_tiles, ovl.nodata_pixels) == (seq.tiles, seq.skipped_tiles, seq.nodata_pixels)
    assert seq.skipped_tiles >= 1 and max(calls) == batch_size
    assert workers() == []


def test_split_partial_is_the_same_with_and_without_overlap(tmp_path):
    src = source(tmp_path / "in.tif")
    tiles = plan_tiles(W, H, 64, 16)
    parts = []
    for overlap in (False, True):
        folder = tmp_path / f"o{overlap}"
        with rasterio.open(src) as ds:
            stats = accumulate_partial(raster_reader(ds, scale=1 / 255), model, tiles, bands=3, folder=folder,
                                       rank=1, world_size=2, run_id="r", overlap=overlap, batch_size=2)
        parts.append(((folder / "tiling-r-rank1.acc").read_bytes(), stats.tiles, stats.skipped_tiles))
    assert parts[0] == parts[1] and len(parts[0][0]) > 0


# ---- the stages and their threads ------------------------------------------------------------


def test_reader_runs_ahead_of_the_model_and_the_model_stays_in_the_caller(tmp_path):
    src = source(tmp_path / "in.tif", nodata_block=False)
    caller = threading.get_ident()
    seen = {"read": set(), "model": set(), "write": set()}
    third_read = threading.Event()
    waited = []
    with rasterio.open(src) as ds:
        base = raster_reader(ds, scale=1 / 255)

        def reader(tile):
            seen["read"].add(threading.get_ident())
            if tile.index == 2:
                third_read.set()
            return base(tile)

        def process(tile, array):
            seen["model"].add(threading.get_ident())
            if tile.index == 0:  # the sequential loop would never read tile 2 before this returns
                waited.append(third_read.wait(10))
            return model(tile, array)

        with writer(tmp_path / "o.tif") as out:
            write = out.write

            def spy(data, window=None):
                seen["write"].add(threading.get_ident())
                write(data, window)

            out.write = spy
            run_tiled(reader, process, out, plan_tiles(W, H, 64, 16))
    assert waited == [True]
    assert seen["model"] == {caller}
    # the rows finished during the loop are written behind the model (the last rows after it, here)
    assert caller not in seen["read"] and seen["write"] - {caller} and not seen["write"] & seen["read"]


def test_read_ahead_is_bounded_by_the_queue_not_the_raster(tmp_path):
    tiles = plan_tiles(1200, 200, 64, 16)  # 24 x 4 tiles
    reads, release = [], threading.Event()
    full = threading.Event()
    batch = 2
    bound = (QUEUE_DEPTH + 2) * batch  # queued + the one being prepared + the one in the model

    def reader(tile):
        reads.append(tile.index)
        if len(reads) >= bound:
            full.set()
        return np.zeros((1, *tile.shape), np.float32)

    @batched
    def process(ts, arrays):
        if ts[0].index == 0:
            assert full.wait(30)
            release.wait(0.3)  # the reader has had time to run further ahead if it could
            reads_then.append(len(reads))
        return [np.zeros((3, *t.out_shape), np.float32) for t in ts]

    reads_then = []
    with CogWriter(tmp_path / "o.tif", width=1200, height=200, count=3, dtype="uint8", crs=CRS,
                   transform=TRANSFORM, blocksize=64, overviews=False) as out:
        run_tiled(reader, process, out, tiles, batch_size=batch)
    assert reads_then == [bound] and len(reads) == len(tiles)


def test_read_and_write_never_run_at_once(tmp_path):
    """They may share a GDAL dataset (in-painting's composite writer reads the input)."""
    inside, most = [0], [0]
    lock = threading.Lock()

    def enter():
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])

    def leave():
        with lock:
            inside[0] -= 1

    def reader(tile):
        enter()
        try:
            threading.Event().wait(0.005)
            return np.full((1, *tile.shape), 0.5, np.float32)
        finally:
            leave()

    with writer(tmp_path / "o.tif") as out:
        write = out.write

        def slow_write(data, window=None):
            enter()
            try:
                threading.Event().wait(0.005)
                write(data, window)
            finally:
                leave()

        out.write = slow_write
        run_tiled(reader, lambda t, a: np.zeros((3, *t.out_shape), np.float32), out, plan_tiles(W, H, 32, 8))
    assert most == [1]


def test_progress_comes_from_the_caller_in_order_with_skipped_tiles(tmp_path):
    src = source(tmp_path / "in.tif")
    caller = threading.get_ident()
    got = []
    stats = run(src, tmp_path / "o.tif", progress=lambda p: got.append((p.tile, p.total_tiles, threading.get_ident())))
    n = stats.tiles + stats.skipped_tiles
    assert [g[0] for g in got] == list(range(1, n + 1)) + [n]  # then "writing the last rows"
    assert {g[1] for g in got} == {n} and {g[2] for g in got} == {caller}


def test_accumulator_lands_in_the_run_folder(tmp_path):
    src = source(tmp_path / "in.tif")
    found = []
    (tmp_path / "out").mkdir()
    with rasterio.open(src) as ds, writer(tmp_path / "out" / "o.tif") as out:
        def process(tile, array):
            found.append((out.scratch_dir / "acc.bin").exists())
            return model(tile, array)

        (tmp_path / "scratch").mkdir()
        run_tiled(raster_reader(ds, scale=1 / 255), process, out, plan_tiles(W, H, 64, 16),
                  scratch_dir=tmp_path / "scratch")
    assert found and all(found) and list((tmp_path / "scratch").iterdir()) == []


# ---- errors in every stage --------------------------------------------------------------------


def _fails_cleanly(tmp_path, exc_type, match=None, *, reader=None, process=None, write=None, cancel=None,
                   progress=None, batch_size=1):
    outdir, scratch = tmp_path / "out", tmp_path / "scratch"
    outdir.mkdir()
    scratch.mkdir()
    dest = outdir / "o.tif"

    def zeros(tile):
        return np.full((1, *tile.shape), 0.5, np.float32)

    @batched
    def proc(ts, arrays):
        return [process(t, a) if process else np.full((3, *t.out_shape), 0.5, np.float32) for t, a in zip(ts, arrays)]

    with pytest.raises(exc_type, match=match):
        with writer(dest) as out:
            if write is not None:
                real = out.write
                out.write = lambda data, window=None: write(real, data, window)
            run_tiled(reader or zeros, proc, out, plan_tiles(W, H, 32, 8), scratch_dir=scratch, cancel=cancel,
                      progress=progress, batch_size=batch_size)
    assert not dest.exists()
    assert left_behind(tmp_path, outdir, scratch) == []
    assert workers() == []


def test_reader_error_comes_back_with_its_type(tmp_path):
    def reader(tile):
        if tile.index == 9:
            raise ValueError("unreadable block")
        return np.zeros((1, *tile.shape), np.float32)

    _fails_cleanly(tmp_path, ValueError, "unreadable block", reader=reader)


@pytest.mark.parametrize("err", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_model_error_or_ctrl_c_stops_the_other_stages(tmp_path, err):
    def process(tile, array):
        if tile.index == 20:
            raise err
        return np.full((3, *tile.out_shape), 0.5, np.float32)

    _fails_cleanly(tmp_path, type(err), process=process, batch_size=2)


def test_writer_error_comes_back_with_its_type(tmp_path):
    calls = []

    def write(real, data, window):
        calls.append(window)
        if len(calls) == 3:
            raise RuntimeError("the writer broke")
        real(data, window)

    _fails_cleanly(tmp_path, RuntimeError, "the writer broke", write=write)


def test_full_disk_while_flushing_is_disk_full(tmp_path):
    def write(real, data, window):
        raise OSError(errno.ENOSPC, "No space left on device")

    _fails_cleanly(tmp_path, DiskFull, "tiling accumulator", write=write)


@pytest.mark.parametrize("stage", ["read", "model", "write", "progress"])
def test_cancel_in_any_stage_leaves_nothing(tmp_path, stage):
    token = CancelToken()

    def reader(tile):
        if stage == "read" and tile.index == 12:
            token.cancel()
        return np.zeros((1, *tile.shape), np.float32)

    def process(tile, array):
        if stage == "model" and tile.index == 12:
            token.cancel()
        return np.full((3, *tile.out_shape), 0.5, np.float32)

    def write(real, data, window):
        if stage == "write":
            token.cancel()
        real(data, window)

    def progress(p):
        if stage == "progress" and p.tile == 5:
            token.cancel()

    _fails_cleanly(tmp_path, Cancelled, reader=reader, process=process, write=write, cancel=token,
                   progress=progress)


def test_split_run_reader_error_marks_the_rank_failed(tmp_path):
    def reader(tile):
        if tile.index == 3:
            raise ValueError("unreadable block")
        return np.zeros((3, *tile.shape), np.float32)

    with pytest.raises(ValueError, match="unreadable block"):
        accumulate_partial(reader, model, plan_tiles(W, H, 64, 16), bands=3, folder=tmp_path, rank=0,
                           world_size=1, run_id="e")
    assert (tmp_path / "tiling-e-rank0.failed").read_text().startswith("ValueError")
    assert workers() == []


@pytest.mark.parametrize("overlap", [True, False])
def test_input_truncated_mid_run_is_a_raster_error_naming_the_fix(tmp_path, overlap):
    """A real GeoTIFF cut short while the loop runs (another program rewriting it): GDAL's
    RasterioIOError ("Read failed. See previous exception") became a one-line RasterError
    (the CLI's exit 2, the server's 422), not an "internal error" with a traceback hint."""
    src = source(tmp_path / "in.tif", nodata_block=False)
    outdir, scratch = tmp_path / "out", tmp_path / "scratch"
    outdir.mkdir()
    scratch.mkdir()
    dest = outdir / "out.tif"

    def process(tile, array):
        if tile.index == 0:
            with open(src, "r+b") as f:
                f.truncate(2048)
        return model(tile, array)

    with pytest.raises(RasterError, match=r"reading the input failed at tile \d+ .*in\.tif.*run again"):
        run(src, dest, process, scratch=scratch, overlap=overlap)
    assert not dest.exists()
    assert left_behind(tmp_path, outdir, scratch) == []
    assert workers() == []
