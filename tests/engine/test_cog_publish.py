"""The COG publish (issue 13: it took as long as the tiling): overviews averaged by the engine in
one streaming pass and handed to GDAL's COG driver ready-made, DEFLATE at the fast level, on
every core; and the result is still a valid COG with exactly the pixels, overviews, nodata, tags,
band descriptions and colour interpretation asked for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from engine.geo import cog
from engine.geo.cog import CogWriter
from engine.geo.run_folders import RUN_PREFIX
from engine.geo.overviews import DEFLATE_LEVEL, overview_factors
from engine.geo.grid import Grid


def _grid(width, height):
    return Grid(CRS.from_epsg(32633), Affine(10, 0, 500000, 0, -10, 4600000), width, height)


def _write(path, data, monkeypatch=None, seen=None, blocksize=256, nodata=None, **kw):
    if seen is not None:
        real = rasterio.shutil.copy

        def spy(src, dst, **options):
            with rasterio.open(src) as ds:  # what GDAL's COG driver is given to copy
                seen.append(dict(options, _source_overviews=ds.overviews(1)))
            return real(src, dst, **options)

        monkeypatch.setattr(rasterio.shutil, "copy", spy)
    grid = _grid(data.shape[2], data.shape[1])
    with CogWriter(path, grid=grid, count=data.shape[0], dtype=str(data.dtype), blocksize=blocksize,
                   nodata=nodata, **kw) as out:
        # row by row in block-high strips, as the tile loop writes
        for y in range(0, data.shape[1], blocksize):
            h = min(blocksize, data.shape[1] - y)
            out.write(data[:, y : y + h], Window(0, y, data.shape[2], h))


def _block_means(band, f, nodata):
    """Reference AVERAGE overview: mean of the valid px of each f x f block (rounded half up)."""
    h, w = band.shape
    oh, ow = math.ceil(h / f), math.ceil(w / f)
    out = np.empty((oh, ow), band.dtype)
    for i in range(oh):
        for j in range(ow):
            block = band[i * f : (i + 1) * f, j * f : (j + 1) * f]
            vals = block[block != nodata] if nodata is not None else block.ravel()
            out[i, j] = nodata if vals.size == 0 else math.floor(vals.astype(float).mean() + 0.5)
    return out


def _assert_cog(path):
    """GDAL's COG checks (validate_cloud_optimized_geotiff): tiled, overviews, COG layout, the data
    of the smallest overview first and the full resolution last."""
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.overviews(1)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        offsets = [int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))]
        n = len(ds.overviews(1))
    for i in range(n):
        with rasterio.open(path, overview_level=i) as ov:
            offsets.append(int(ov.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1)))
    assert offsets == sorted(offsets, reverse=True), offsets


def test_the_publish_asks_gdal_for_every_core_gives_it_the_overviews_and_keeps_the_pixels(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    data = (rng.integers(0, 40, (3, 1024, 768)) + np.arange(768)[None, None] % 200).astype("uint8")
    seen: list = []
    _write(tmp_path / "threads.tif", data, monkeypatch, seen)
    assert seen and str(seen[-1].get("num_threads", "")).upper() == "ALL_CPUS", seen
    assert seen[-1]["level"] == DEFLATE_LEVEL == 1
    # the COG driver copies ready overviews instead of averaging the full resolution itself
    assert seen[-1]["_source_overviews"] == [2, 4], seen
    _assert_cog(tmp_path / "threads.tif")
    with rasterio.open(tmp_path / "threads.tif") as a:
        assert a.profile["compress"].lower() == "deflate" and a.overviews(1) == [2, 4]
        assert np.array_equal(a.read(), data)
        overview = a.read(1, out_shape=(512, 384))
    assert np.array_equal(overview, _block_means(data[0], 2, None))


def test_odd_sizes_and_nodata_give_exact_overviews_at_every_level(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(1, 250, (2, 700, 1001)).astype("uint8")
    data[:, 100:300, 200:520] = 0  # whole overview pixels of nodata at every level
    data[:, rng.random((700, 1001)) < 0.1] = 0  # and scattered nodata
    path = tmp_path / "odd.tif"
    _write(path, data, blocksize=128, nodata=0)
    factors = overview_factors(1001, 700, 128)
    assert factors == [2, 4, 8]
    _assert_cog(path)
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == factors and ds.nodata == 0
        assert np.array_equal(ds.read(), data)
    for i, f in enumerate(factors):
        with rasterio.open(path, overview_level=i) as ov:
            assert ov.shape == (math.ceil(700 / f), math.ceil(1001 / f))
            for b in range(2):
                assert np.array_equal(ov.read(b + 1), _block_means(data[b], f, 0)), (f, b)


def test_float_overviews_ignore_nan_and_keep_the_mean(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.normal(0.3, 0.1, (1, 300, 520)).astype("float32")
    data[0, :40, :40] = np.nan
    _write(tmp_path / "f.tif", data, blocksize=128, nodata=float("nan"))
    with rasterio.open(tmp_path / "f.tif") as ds:
        assert np.array_equal(ds.read(), data, equal_nan=True)
    with rasterio.open(tmp_path / "f.tif", overview_level=0) as ov:
        got = ov.read(1)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):  # all-NaN blocks: NaN
        expected = np.nanmean(data[0].reshape(150, 2, 260, 2), axis=(1, 3))
    assert np.isnan(got[:20, :20]).all()
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


def test_tags_descriptions_colours_and_nodata_reach_the_cog(tmp_path):
    data = np.random.default_rng(1).integers(1, 255, (3, 600, 520)).astype("uint8")
    _write(tmp_path / "meta.tif", data, nodata=0, tags={"model": "tiny", "steps": 4, "seed": None},
           band_descriptions=["red", "green", "blue <&>"], colorinterp=["red", "green", "blue"])
    with rasterio.open(tmp_path / "meta.tif") as ds:
        assert ds.tags()["model"] == "tiny" and ds.tags()["steps"] == "4" and "seed" not in ds.tags()
        assert ds.descriptions == ("red", "green", "blue <&>")
        assert [c.name for c in ds.colorinterp] == ["red", "green", "blue"]
        assert ds.nodata == 0 and ds.crs == CRS.from_epsg(32633) and ds.transform == _grid(520, 600).transform
        assert ds.overviews(1) == [2, 4]
    with rasterio.open(tmp_path / "meta.tif", overview_level=0) as ov:
        assert ov.nodata == 0 and ov.transform.a == 20  # overviews keep the georeferencing


def test_a_raster_of_one_block_has_no_overviews(tmp_path):
    data = np.full((1, 200, 256), 7, np.uint8)
    _write(tmp_path / "small.tif", data)
    with rasterio.open(tmp_path / "small.tif") as ds:
        assert ds.overviews(1) == [] and np.array_equal(ds.read(), data)


def test_a_failure_while_averaging_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise rasterio.errors.RasterioIOError("disk went away")

    monkeypatch.setattr(cog, "build_overviews", broken)
    (tmp_path / "out.tif").write_bytes(b"previous result")
    with pytest.raises(Exception, match="disk went away"):
        _write(tmp_path / "out.tif", np.zeros((1, 600, 600), np.uint8))
    assert (tmp_path / "out.tif").read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(RUN_PREFIX)]


# ---- a split run's stripes: written by several writers, published by one ---------------------


def _stripes(folder, bounds):
    from engine.geo.stripes import Stripe

    folder.mkdir(exist_ok=True)
    return [Stripe(folder, i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _levels(path):
    with rasterio.open(path) as ds:
        out, n = [(ds.read(), ds.tags(), ds.descriptions, ds.colorinterp, ds.nodata, ds.transform)], len(ds.overviews(1))
    for i in range(n):
        with rasterio.open(path, overview_level=i) as ov:
            out.append((ov.read(), ov.transform))
    return out


def test_stripes_written_apart_publish_the_cog_one_writer_writes(tmp_path):
    """Each stripe's writer averages its own overviews (its rows start on a multiple of the coarsest
    factor), and the publisher's mosaic gives exactly the one-writer COG: every level, the tags,
    descriptions, colours and nodata (the publisher's own, not the stripes')."""
    from engine.geo.stripes import stripe_alignment

    rng = np.random.default_rng(11)
    data = rng.integers(1, 250, (3, 1000, 700)).astype("uint8")
    data[:, rng.random((1000, 700)) < 0.05] = 0
    meta = dict(nodata=0, tags={"model": "tiny", "created": "rank 0"}, band_descriptions=["r", "g", "b"],
                colorinterp=["red", "green", "blue"])
    _write(tmp_path / "one.tif", data, blocksize=64, **meta)
    align = stripe_alignment(700, 1000, 64)
    assert align == 64  # factors 2 .. 16 for 64 px blocks
    stripes = _stripes(tmp_path / "s", [0, 384, 384, 640, 1000])  # an empty stripe too
    grid = _grid(700, 1000)
    for s in stripes:  # each as its own rank would, with tags of its own
        with CogWriter(tmp_path / "two.tif", grid=grid, count=3, dtype="uint8", blocksize=64, nodata=0,
                       tags={"created": f"rank {s.index}"}, stripe=s) as out:
            for y in range(s.row0, s.row1, 100):
                h = min(100, s.row1 - y)
                out.write(data[:, y : y + h], Window(0, y, 700, h))
    assert not (tmp_path / "two.tif").exists()  # stripes publish nothing
    with CogWriter(tmp_path / "two.tif", grid=grid, count=3, dtype="uint8", blocksize=64, stripes=stripes, **meta):
        pass
    _assert_cog(tmp_path / "two.tif")
    one, two = _levels(tmp_path / "one.tif"), _levels(tmp_path / "two.tif")
    assert len(two) == len(one) == 5
    assert np.array_equal(one[0][0], two[0][0]) and one[0][1:] == two[0][1:]
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(one[1:], two[1:]))
    assert list((tmp_path / "s").iterdir()) == []  # the publish removes the stripes' files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(RUN_PREFIX)]


def test_stripe_writers_refuse_what_would_break_the_mosaic(tmp_path):
    from engine.geo.stripes import Stripe

    grid = _grid(300, 600)
    kw = dict(grid=grid, count=1, dtype="uint8", blocksize=16)
    (tmp_path / "s").mkdir()
    with pytest.raises(ValueError, match="multiple of 64 rows"):  # 600 rows in 16 px blocks: overviews to 64
        CogWriter(tmp_path / "o.tif", stripe=Stripe(tmp_path / "s", 1, 100, 600), **kw)
    with pytest.raises(ValueError, match="do not cover"):
        CogWriter(tmp_path / "o.tif", stripes=_stripes(tmp_path / "s", [0, 128, 500]), **kw)
    with pytest.raises(ValueError, match="outside the stripe"):
        with CogWriter(tmp_path / "o.tif", stripe=Stripe(tmp_path / "s", 0, 0, 128), **kw) as out:
            out.write(np.zeros((1, 64, 300), np.uint8), Window(0, 100, 300, 64))
    assert list((tmp_path / "s").iterdir()) == []  # a failed stripe leaves none of its files
    with pytest.raises(TypeError, match="no write"):
        with CogWriter(tmp_path / "o.tif", stripes=_stripes(tmp_path / "s", [0, 600]), **kw) as out:
            out.write(np.zeros((1, 16, 300), np.uint8), Window(0, 0, 300, 16))
    assert not (tmp_path / "o.tif").exists()


def test_ctrl_c_during_the_cog_copy_stops_the_write_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    """GDAL's COG copy is one long C call (minutes for a whole tile's output): a Ctrl-C or SIGTERM
    waited for its end before Python raised it. The copy now runs in a worker thread that the
    writer waits for in slices, so the interrupt stops the write while the copy still runs."""
    import _thread
    import threading

    copy_started, copy_may_end, interrupted = threading.Event(), threading.Event(), threading.Event()
    real = rasterio.shutil.copy

    def blocking_copy(src, dst, **options):  # the COG copy blocks (as in C: the interrupt flag unseen)
        if options.get("driver") != "COG":
            return real(src, dst, **options)  # the VRTs the publish makes first
        copy_started.set()
        copy_may_end.wait(60)
        return real(src, dst, **options)

    def interrupter():
        copy_started.wait(60)
        _thread.interrupt_main()  # what a Ctrl-C's handler does
        interrupted.wait(10)  # the writer should raise within its next slice; else end the copy
        copy_may_end.set()

    monkeypatch.setattr(rasterio.shutil, "copy", blocking_copy)
    threading.Thread(target=interrupter, daemon=True).start()
    (tmp_path / "out.tif").write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "out.tif", np.zeros((1, 600, 600), np.uint8))
    still_copying = not copy_may_end.is_set()
    interrupted.set()
    assert still_copying  # the interrupt came through while the copy still ran
    assert (tmp_path / "out.tif").read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(RUN_PREFIX)]
