"""The COG publish (the final copy with compression and overviews) runs on every core and still
writes exactly the pixels given (issue 13: with one thread it took as long as the tiling)."""

from __future__ import annotations

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from engine.geo.cog import CogWriter
from engine.geo.grid import Grid


def _write(path, data, monkeypatch=None, seen=None):
    if seen is not None:
        real = rasterio.shutil.copy

        def spy(src, dst, **options):
            seen.append(options)
            return real(src, dst, **options)

        monkeypatch.setattr(rasterio.shutil, "copy", spy)
    grid = Grid(CRS.from_epsg(32633), Affine(10, 0, 500000, 0, -10, 4600000), data.shape[2], data.shape[1])
    with CogWriter(path, grid=grid, count=data.shape[0], dtype="uint8", blocksize=256) as out:
        out.write(data, Window(0, 0, data.shape[2], data.shape[1]))


def test_the_publish_asks_gdal_for_every_core_and_keeps_the_pixels(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    data = (rng.integers(0, 40, (3, 1024, 768)) + np.arange(768)[None, None] % 200).astype("uint8")
    seen: list = []
    _write(tmp_path / "threads.tif", data, monkeypatch, seen)
    assert seen and str(seen[-1].get("num_threads", "")).upper() == "ALL_CPUS", seen
    with rasterio.open(tmp_path / "threads.tif") as a:
        assert a.profile["compress"].lower() == "deflate" and a.overviews(1)  # still a COG with overviews
        assert np.array_equal(a.read(), data)
        overview = a.read(1, out_shape=(512, 384)).astype(float)
    expected = data[0].reshape(512, 2, 384, 2).mean(axis=(1, 3))  # AVERAGE overview of 2x2 blocks
    assert np.abs(overview - expected).max() <= 1.0
