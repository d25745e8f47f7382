"""``generate --gsd --spread N`` over windows: N joint runs, one after another, memory flat in the extent.

Sample ``k`` is the joint run of seed ``seed + k`` (its own canvas noise and scheduler noise), so
sample 0 is the output without ``--spread``, pixel for pixel. Each sample's canvas is denoised
(in files, as without ``--spread``) and decoded through the same tile loop; the decoded, blended
values of every flushed block go into a per-pixel Welford accumulation (running mean and M2 of
the brightness, the mean of R, G, B in 0..1) held in a float64 file the size of the output
(:class:`engine.geo.accumulate.Accumulator`: plain reads and writes, no memory map), never N
canvases in RAM. Sample 0 is also encoded into the output's COG, which stays unpublished until
the spread map (``std = sqrt(M2 / N)``, float32) is written beside it; a failure leaves neither.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rasterio.windows import Window

from ...atomic import disk_full, is_disk_full
from ...geo.accumulate import Accumulator, encode, encoding
from ...geo.cog import CogWriter
from ...geo.run_folders import run_folder
from ...progress import Progress, ProgressCallback
from ..common import spread_path, spread_tags, welford_step

#: Output rows per block when the spread map is written from the accumulation (RAM: rows x width x 16 B).
ROWS = 64


def sampled_progress(progress: Optional[ProgressCallback], sample: dict) -> Optional[ProgressCallback]:
    """``progress`` for sample ``sample["k"]`` of ``sample["n"]``: each sample's parts (its steps and
    its decode, ``tile`` of ``total_tiles``) one after another, so the job's fraction grows over
    the N runs; the messages (``denoising``: the run's step meter counts them) are unchanged."""
    if progress is None:
        return None

    def report(p: Progress) -> None:
        k, n = sample["k"], sample["n"]
        progress(replace(p, tile=k * p.total_tiles + p.tile, total_tiles=n * p.total_tiles))

    return report


class SampleSink:
    """A tiling writer for one sample's decoded blocks (float64, 3 bands, 0..1): each block's
    brightness goes into the Welford accumulation ``state`` as sample ``k``; with ``target`` (sample
    0) the block is also encoded as the output (uint8, the tiling's own encoding) into it."""

    def __init__(self, state: Accumulator, k: int, width: int, height: int, target: Any = None) -> None:
        self.state, self.k, self.target = state, k, target
        base = target.profile if target is not None else {"tiled": True, "blockxsize": 256, "blockysize": 256}
        self.profile = {**base, "width": width, "height": height, "count": 3, "dtype": "float64", "nodata": None}
        self.enc = encoding(target, None, 0.0) if target is not None else None

    def write(self, data: np.ndarray, window: Optional[Window] = None) -> None:
        values = np.array(data, dtype=np.float64)
        valid = np.isfinite(values).all(axis=0)
        values[:, ~valid] = 0.0  # as the tiling leaves pixels without a contribution
        brightness = values.mean(axis=0)
        y0, x0 = int(window.row_off), int(window.col_off)
        h, w = brightness.shape
        block = self.state.read(y0, x0, h, w)
        welford_step(block[..., 0], block[..., 1], brightness, self.k)  # views: the file starts at zeros
        self.state.write(y0, x0, block)
        if self.target is not None:
            self.target.write(encode(values, valid, self.enc), window)


def _denoise(pipe, layout, folder: Path, args: dict, k: int):
    """Sample ``k``'s denoised canvas (in files in ``folder`` for a streaming scheduler, else in RAM)."""
    from .canvas import streams
    from .joint import denoise_to_file, joint_denoise

    if k > 0:  # a fresh scheduler of the same class and config: no state left by the last sample
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)

    if streams(pipe.scheduler):
        folder.mkdir()
        return denoise_to_file(pipe, layout, folder, **args)
    return joint_denoise(pipe, layout, **args)


def generate_spread(pipe, layout, out: Path, tags: dict, args: dict, decode: dict, sample: dict) -> None:
    """Run the ``sample["n"]`` joint samples (``args``: :func:`~engine.tasks.extent.joint.joint_denoise`'s,
    seed = sample 0's; ``decode``: the decode's batch, progress and cancel), write the output (sample
    0) and its spread map; ``sample["k"]`` follows the sample running (for :func:`sampled_progress`)."""
    from .joint import decode_tiles, output_writer

    n, seed = sample["n"], args["seed"]
    width, height = layout.width, layout.height
    published = False
    try:
        with run_folder(out.parent) as scratch:
            state = Accumulator(scratch / "spread-welford.f64", width=width, bands=1, row0=0, nrows=height,
                                ring=False, create=True)
            try:
                with output_writer(layout, out, tags) as writer:
                    for k in range(n):
                        sample["k"] = k
                        folder = scratch / f"sample-{k}"
                        canvas = _denoise(pipe, layout, folder, {**args, "seed": seed + k}, k)
                        try:
                            sink = SampleSink(state, k, width, height, writer if k == 0 else None)
                            decode_tiles(pipe, canvas, layout, sink, scratch_dir=scratch, **decode)
                        finally:
                            if hasattr(canvas, "close"):  # a CanvasFile (a tensor: in RAM)
                                canvas.close()
                            del canvas
                            shutil.rmtree(folder, ignore_errors=True)
                    _write_spread(state, writer, spread_path(out), spread_tags(tags, seed, n), n)
                    published = True
            finally:
                state.close()
    except BaseException as err:
        if published:  # the spread map was published but the output was not: no orphan
            spread_path(out).unlink(missing_ok=True)
        if isinstance(err, OSError) and is_disk_full(err):
            raise disk_full(out.parent, width * height * 16, "the spread accumulation") from None
        raise


def _write_spread(state: Accumulator, writer: CogWriter, path: Path, tags: dict, n: int) -> None:
    """The spread map (std of brightness over the ``n`` samples) from the accumulation, ROWS rows at a time."""
    grid = writer.grid
    with CogWriter(path, width=grid.width, height=grid.height, count=1, dtype="float32", crs=grid.crs,
                   transform=grid.transform, tags=tags, band_descriptions=["spread"]) as out:
        for y in range(0, grid.height, ROWS):
            h = min(ROWS, grid.height - y)
            m2 = state.read(y, 0, h, grid.width)[..., 1]
            out.write(np.sqrt(np.maximum(m2, 0.0) / n).astype(np.float32)[None], Window(0, y, grid.width, h))


__all__ = ["SampleSink", "generate_spread", "sampled_progress"]
