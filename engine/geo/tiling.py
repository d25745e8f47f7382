"""Tiling: run a fixed-size model over a raster of any size, with no seams and flat memory.

The model sees windows of exactly ``tile_size`` pixels. Windows overlap by ``overlap`` pixels and
each one's output is multiplied by a blending window that ramps smoothly from ~0 at the tile's
inner borders to 1 in its centre (:func:`blend_weights`); the output is the weighted average of
every tile that covers a pixel. Two tiles that disagree (a colour shift between tiles) therefore
meet in a gradual cross-fade over the overlap instead of a step, and tiles that agree reproduce
their common answer exactly.

Memory does not grow with the raster: the weighted sums live in a file on disk (a ring of one tile
height of output rows for a single process, one band of rows per process when the work is split),
rows are normalised and written to the :class:`~engine.geo.cog.CogWriter` as soon as no later
tile can touch them, and every array in RAM is the size of a tile or of a fixed chunk.

Splitting over processes (``accelerate launch``, or plain processes): every rank takes a
contiguous block of tiles (:func:`tiles_for_rank`), accumulates it into its own partial file in a
shared folder (:func:`accumulate_partial`; no two processes ever write one file), then marks
itself done; rank 0 waits for the markers and merges the partials into one COG
(:func:`merge_partials`). :func:`run_tiled_distributed` does both steps for a rank.

Units: all windows and sizes are in pixels; input windows in input pixels, ``out_*`` windows in
output pixels (input pixels x ``factor``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from affine import Affine
from rasterio.windows import Window

from ..errors import Cancelled, InvalidRequest, RasterError
from ..progress import CancelToken, Progress, ProgressCallback, report

#: Accumulator precision. float64 rather than float32 because a split run sums the same
#: contributions in a different order than a single process; in float64 the two agree to far
#: below output precision, so split and single runs write identical pixels.
ACCUMULATOR_DTYPE = np.dtype(np.float64)

#: Output (rows, cols) normalised and written at once when the writer has no block grid; with
#: one, a chunk is one writer block (at least 256 px wide). Bounds RAM during flushes
#: independently of the raster width.
FLUSH_CHUNK = (256, 256)

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Tile:
    """One model window over the input raster and where its result goes in the output.

    ``window`` is what the model sees: always ``size`` x ``size`` input pixels. When the raster is
    smaller than a tile along an axis the window runs past the right/bottom edge; ``valid`` is
    the part inside the raster (the only part read from the raster and written to the output;
    the rest is reflect-padded for the model). ``out_window``/``out_valid`` are the same in
    output pixels (scaled by ``factor``). ``touches`` says which sides lie on the raster edge
    (top, bottom, left, right): those sides get full blending weight, as no neighbour shares them.
    """

    index: int  #: position in the plan, row-major
    row: int  #: tile row in the grid
    col: int  #: tile column in the grid
    window: Window  #: model input window, input px (may extend past the raster)
    valid: Window  #: the part of ``window`` inside the raster, input px
    out_window: Window  #: ``window`` scaled by ``factor``, output px
    out_valid: Window  #: ``valid`` scaled by ``factor``, output px
    factor: int  #: output px per input px along each axis (1, or the super-resolution factor)
    overlap: int  #: planned overlap between neighbours, input px
    touches: tuple[bool, bool, bool, bool]  #: (top, bottom, left, right) on the raster edge

    @property
    def size(self) -> int:
        """Model window side, input px."""
        return int(self.window.width)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) the model receives, input px."""
        return int(self.window.height), int(self.window.width)

    @property
    def out_shape(self) -> tuple[int, int]:
        """(rows, cols) the model must return, output px."""
        return int(self.out_window.height), int(self.out_window.width)

    @property
    def valid_slices(self) -> tuple[slice, slice]:
        """(rows, cols) of the valid part inside the model input array."""
        return _inner_slices(self.window, self.valid)

    @property
    def out_valid_slices(self) -> tuple[slice, slice]:
        """(rows, cols) of the valid part inside the model output array."""
        return _inner_slices(self.out_window, self.out_valid)

    def weights(self) -> np.ndarray:
        """Blending weights over the whole model output, (rows, cols) float32."""
        rows, cols = self.out_shape
        return blend_weights(rows, cols, self.overlap * self.factor, self.touches)


def _inner_slices(outer: Window, inner: Window) -> tuple[slice, slice]:
    r0 = int(inner.row_off - outer.row_off)
    c0 = int(inner.col_off - outer.col_off)
    return slice(r0, r0 + int(inner.height)), slice(c0, c0 + int(inner.width))


def _axis_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]  # one window, padded past the end
    # Regular stride while a window still ends inside the raster, then one window shifted back so
    # it ends exactly on the edge: shifting costs a larger overlap, padding would cost quality.
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def plan_tiles(
    width: int, height: int, tile_size: int, overlap: int, factor: int = 1
) -> list[Tile]:
    """Cover a ``width`` x ``height`` px raster with ``tile_size`` px windows, row-major.

    Neighbouring windows overlap by at least ``overlap`` px (stride ``tile_size - overlap``); the
    last row and column are shifted back to end on the raster edge. A raster smaller than one tile
    along an axis gets one window on that axis, padded past its end. ``factor`` (an integer >= 1)
    scales output windows for super-resolution.

    Raises:
        InvalidRequest: non-positive sizes, ``overlap`` not in ``[0, tile_size / 2)``, or a
            non-integer ``factor``.
    """
    for name, value in (("width", width), ("height", height), ("tile_size", tile_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidRequest(f"{name} must be a positive whole number of pixels, got {value!r}")
    if not isinstance(overlap, (int, np.integer)) or overlap < 0 or 2 * overlap >= tile_size:
        raise InvalidRequest(
            f"overlap must be a whole number of pixels in [0, tile_size/2) = [0, {tile_size / 2:g}), "
            f"got {overlap!r}; use e.g. overlap={tile_size // 8}"
        )
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise InvalidRequest(f"factor must be a whole number >= 1, got {factor!r}")
    width, height, tile_size, overlap, factor = map(int, (width, height, tile_size, overlap, factor))

    stride = tile_size - overlap
    ys = _axis_starts(height, tile_size, stride)
    xs = _axis_starts(width, tile_size, stride)
    tiles: list[Tile] = []
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            vh, vw = min(tile_size, height - y), min(tile_size, width - x)
            tiles.append(
                Tile(
                    index=len(tiles),
                    row=r,
                    col=c,
                    window=Window(x, y, tile_size, tile_size),
                    valid=Window(x, y, vw, vh),
                    out_window=Window(x * factor, y * factor, tile_size * factor, tile_size * factor),
                    out_valid=Window(x * factor, y * factor, vw * factor, vh * factor),
                    factor=factor,
                    overlap=overlap,
                    touches=(y == 0, y + tile_size >= height, x == 0, x + tile_size >= width),
                )
            )
    return tiles


def output_grid(transform: Affine, width: int, height: int, factor: int = 1) -> tuple[Affine, int, int]:
    """The output raster's (transform, width, height) for an input grid and an integer ``factor``.

    Same origin and bounds, pixel size (GSD, CRS units per px) divided by ``factor``; the CRS is
    unchanged.
    """
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise InvalidRequest(f"factor must be a whole number >= 1, got {factor!r}")
    return transform * Affine.scale(1.0 / factor), int(width) * factor, int(height) * factor


# --------------------------------------------------------------------------------------------
# Blending


def _ramp(n: int, overlap: int, full_start: bool, full_end: bool) -> np.ndarray:
    w = np.ones(n, dtype=np.float64)
    if overlap == 0:
        return w
    # Raised cosine sampled at pixel centres: never exactly 0 (a lone pixel at a border still
    # gets weight), and two ramps offset by exactly `overlap` sum to 1 (sin^2 + cos^2).
    ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
    if not full_start:
        w[:overlap] = ramp
    if not full_end:
        w[n - overlap :] = np.minimum(w[n - overlap :], ramp[::-1])
    return w


@lru_cache(maxsize=256)
def _ramp_cached(n: int, overlap: int, full_start: bool, full_end: bool) -> np.ndarray:
    # Only the 1-D ramps are cached: a cache of 2-D windows (one per edge combination, up to
    # 16 MiB each for a 4x super-resolution tile) would cost more RAM than the outer product
    # costs time.
    ramp = _ramp(n, overlap, full_start, full_end).astype(np.float32)
    ramp.setflags(write=False)
    return ramp


def blend_weights(
    tile_h: int,
    tile_w: int,
    overlap: int,
    touches: Sequence[bool] = (False, False, False, False),
) -> np.ndarray:
    """Blending window for one tile: (tile_h, tile_w) float32 in (0, 1].

    A separable raised cosine: 1 in the centre, falling to ~0 over the ``overlap`` px next to
    each border (never exactly 0). Sides listed in ``touches`` (top, bottom, left, right) lie on
    the raster edge, where no neighbour takes over, and keep weight 1 up to the border. Outputs
    are divided by the summed weights, so any set of tiles that agree on a pixel reproduces that
    value exactly; for neighbours overlapping by exactly ``overlap`` the weights already sum to 1.
    """
    if overlap < 0 or 2 * overlap > min(tile_h, tile_w):
        raise InvalidRequest(
            f"overlap {overlap} px does not fit twice in a {tile_h}x{tile_w} px tile"
        )
    top, bottom, left, right = (bool(t) for t in touches)
    rows = _ramp_cached(int(tile_h), int(overlap), top, bottom)
    cols = _ramp_cached(int(tile_w), int(overlap), left, right)
    return np.outer(rows, cols)


# --------------------------------------------------------------------------------------------
# The on-disk accumulator


class _Accumulator:
    """Weighted sums and weight sums for a band of output rows, in a file, not in RAM.

    Layout: pixel-interleaved rows of ``width`` x (``bands`` + 1) values (the last channel is
    the weight sum), so one tile row is one contiguous read. In ring mode the file holds only
    ``nrows`` rows and output row ``y`` lives at file row ``y mod nrows``; rows must be released
    (:meth:`release`, after they were flushed and zeroed) before they are reused.

    Plain reads and writes rather than ``np.memmap``: pages of a mapped file count as the
    process's resident memory, which would grow with the raster; pages written through the page
    cache do not.
    """

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        bands: int,
        row0: int,
        nrows: int,
        ring: bool,
        create: bool,
    ) -> None:
        self.path = path
        self.width = width
        self.bands = bands
        self.channels = bands + 1
        self.row0 = row0  # first output row held (ring: lowest row not yet released)
        self.nrows = max(0, nrows)
        self.ring = ring
        self.itemsize = ACCUMULATOR_DTYPE.itemsize
        self.rowbytes = width * self.channels * self.itemsize
        self._f = open(path, "w+b" if create else "rb", buffering=0)
        if create:
            self._f.truncate(self.nrows * self.rowbytes)  # sparse: reads as zeros

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def sync(self) -> None:
        os.fsync(self._f.fileno())

    def _check_rows(self, y0: int, h: int) -> None:
        if y0 < self.row0 or y0 + h > self.row0 + self.nrows:
            raise RuntimeError(
                f"rows {y0}..{y0 + h} are outside the accumulator's rows "
                f"{self.row0}..{self.row0 + self.nrows}; tiles must be processed row-major"
            )

    def _runs(self, y0: int, h: int) -> Iterable[tuple[int, int, int]]:
        """(file row, first block row, row count) runs that are contiguous in the file."""
        if not self.ring:
            yield y0 - self.row0, 0, h
            return
        i = 0
        while i < h:
            frow = (y0 + i) % self.nrows
            count = min(h - i, self.nrows - frow)
            yield frow, i, count
            i += count

    def _io(self, y0: int, x0: int, block: np.ndarray, write: bool) -> None:
        h, w = block.shape[:2]
        self._check_rows(y0, h)
        col = x0 * self.channels * self.itemsize
        full_rows = x0 == 0 and w == self.width
        for frow, i, count in self._runs(y0, h):
            rows = range(i, i + count)
            if full_rows:  # the whole run is one contiguous span of the file
                self._span(frow * self.rowbytes, block[i : i + count], write)
            else:
                for k, r in enumerate(rows):
                    self._span((frow + k) * self.rowbytes + col, block[r], write)

    def _span(self, offset: int, part: np.ndarray, write: bool) -> None:
        view = memoryview(part).cast("B")
        self._f.seek(offset)
        done = 0
        while done < len(view):
            n = self._f.write(view[done:]) if write else self._f.readinto(view[done:])
            if not n:
                raise RasterError(f"short {'write to' if write else 'read from'} {self.path}; disk full?")
            done += n

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Rows ``y0..y0+h``, cols ``x0..x0+w`` as an (h, w, bands + 1) array."""
        block = np.empty((h, w, self.channels), dtype=ACCUMULATOR_DTYPE)
        self._io(y0, x0, block, write=False)
        return block

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        self._io(y0, x0, np.ascontiguousarray(block, dtype=ACCUMULATOR_DTYPE), write=True)

    def add(self, y0: int, x0: int, values: np.ndarray, weights: np.ndarray) -> None:
        """Add ``values`` (bands, h, w) x ``weights`` (h, w) and ``weights`` at (y0, x0)."""
        h, w = weights.shape
        block = self.read(y0, x0, h, w)
        block[..., : self.bands] += np.moveaxis(values, 0, -1) * weights[..., None]
        block[..., self.bands] += weights
        self.write(y0, x0, block)

    def zero(self, y0: int, x0: int, h: int, w: int) -> None:
        """Reset rows ``y0..y0+h``, cols ``x0..x0+w`` to 0 (ring rows about to be reused)."""
        row = np.zeros((1, w, self.channels), dtype=ACCUMULATOR_DTYPE)
        for y in range(y0, y0 + h):
            self._io(y, x0, row, write=True)

    def release(self, y_to: int) -> None:
        """Rows below ``y_to`` were flushed and zeroed; their file rows may hold later rows."""
        self.row0 = max(self.row0, y_to)


# --------------------------------------------------------------------------------------------
# Encoding and flushing


@dataclass(frozen=True)
class _Encoding:
    dtype: np.dtype
    nodata: Optional[float]
    scale: float
    offset: float


def _encoding(writer: Any, scale: Optional[float], offset: float) -> _Encoding:
    dtype = np.dtype(writer.profile["dtype"])
    if scale is None:
        if dtype == np.uint8:
            scale = 255.0  # model outputs are 0..1
        elif dtype.kind == "f":
            scale = 1.0
        else:
            raise InvalidRequest(
                f"say how model values map to {dtype.name} output: pass scale= (and offset=)"
            )
    nodata = writer.profile.get("nodata")
    return _Encoding(dtype, None if nodata is None else float(nodata), float(scale), float(offset))


def _encode(values: np.ndarray, valid: np.ndarray, enc: _Encoding) -> np.ndarray:
    """(bands, h, w) normalised float64 values -> output dtype; invalid pixels become nodata.

    Works in place on ``values`` (a chunk-sized temporary) to keep the flush's RAM small.
    """
    x = values
    if enc.scale != 1.0:
        x *= enc.scale
    if enc.offset != 0.0:
        x += enc.offset
    if enc.dtype.kind in "iu":
        info = np.iinfo(enc.dtype)
        np.rint(x, out=x)
        np.clip(x, info.min, info.max, out=x)
        if enc.nodata is not None and info.min <= enc.nodata <= info.max:
            # A real pixel that rounds onto the nodata value would vanish from the map; move it
            # one step into the range instead.
            bump = 1 if enc.nodata < info.max else -1
            x[(x == enc.nodata) & valid[None]] += bump
    out = x.astype(enc.dtype, order="C")
    if not valid.all():
        if enc.nodata is not None:
            fill = enc.nodata
        else:
            fill = np.nan if enc.dtype.kind == "f" else 0
        out[:, ~valid] = fill
    return out


def _chunking(writer: Any) -> tuple[int, int]:
    """(rows, cols) of a flush chunk: the writer's block, so every block is written once, whole."""
    prof = writer.profile
    by, bx = prof.get("blockysize"), prof.get("blockxsize")
    if not (prof.get("tiled") and by and bx):
        return FLUSH_CHUNK
    return int(by), int(bx) * max(1, 256 // int(bx))


def _steps(start: int, stop: int, step: int) -> Iterable[tuple[int, int]]:
    """(offset, length) pieces of ``start..stop`` cut on multiples of ``step``."""
    y = start
    while y < stop:
        end = min(stop, (y // step + 1) * step)
        yield y, end - y
        y = end


def _flush(
    sources: Sequence[_Accumulator],
    y_from: int,
    y_to: int,
    width: int,
    bands: int,
    writer: Any,
    enc: _Encoding,
    cancel: Optional[CancelToken],
    zero_after: bool,
) -> int:
    """Normalise rows ``y_from..y_to`` (summed over ``sources``) and write them; returns nodata px."""
    nodata_px = 0
    ch, cw = _chunking(writer)
    for y, h in _steps(y_from, y_to, ch):
        for x, w in _steps(0, width, cw):
            if cancel is not None:
                cancel.raise_if_cancelled()
            total: Optional[np.ndarray] = None
            for src in sources:
                lo, hi = max(y, src.row0), min(y + h, src.row0 + src.nrows)
                if lo >= hi:
                    continue
                block = src.read(lo, x, hi - lo, w)
                if zero_after:
                    src.zero(lo, x, hi - lo, w)
                if total is None and (lo, hi) == (y, y + h):
                    total = block  # the common single-source case: no extra chunk in RAM
                else:
                    if total is None:
                        total = np.zeros((h, w, bands + 1), dtype=ACCUMULATOR_DTYPE)
                    total[lo - y : hi - y] += block
            if total is None:
                total = np.zeros((h, w, bands + 1), dtype=ACCUMULATOR_DTYPE)
            wsum = total[..., bands]
            # Weight sums are exactly 0 only where every contribution was masked (nodata):
            # blending weights themselves are never 0.
            valid = wsum > 0
            values = np.moveaxis(total[..., :bands], -1, 0)
            values /= np.where(valid, wsum, 1.0)[None]
            nodata_px += int(valid.size - np.count_nonzero(valid))
            writer.write(_encode(values, valid, enc), Window(x, y, w, h))
    return nodata_px


# --------------------------------------------------------------------------------------------
# Per-tile work shared by the single and split runs

ReadFn = Callable[[Tile], Union[np.ndarray, "tuple[np.ndarray, Optional[np.ndarray]]"]]
ProcessFn = Callable[[Tile, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TilingStats:
    """What a tiled run did."""

    tiles: int  #: tiles run through the model
    skipped_tiles: int  #: tiles with no valid input pixel (not run; written as nodata)
    nodata_pixels: int  #: output px written as nodata (0 for partial runs: rank 0 counts)
    seconds: float  #: wall time of this call, s


def _pad(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    h, w = array.shape[-2:]
    if (h, w) == (rows, cols):
        return array
    pad = [(0, 0)] * (array.ndim - 2) + [(0, rows - h), (0, cols - w)]
    # Reflection keeps texture statistics at the edge, so the model does not react to a flat or
    # black border that is not in the data.
    return np.pad(array, pad, mode="reflect")


def _read_tile(read_fn: ReadFn, tile: Tile, fill_nodata: bool) -> tuple[np.ndarray, np.ndarray]:
    """Model input (C, size, size) and the valid mask (size, size) for ``tile``."""
    got = read_fn(tile)
    array, mask = got if isinstance(got, tuple) else (got, None)
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    rows, cols = tile.shape
    vh, vw = int(tile.valid.height), int(tile.valid.width)
    if array.shape[-2:] not in ((rows, cols), (vh, vw)):
        raise RasterError(
            f"read_fn returned {array.shape[-2:]} px for tile {tile.index}; expected the tile "
            f"({rows}x{cols}) or its valid part ({vh}x{vw})"
        )
    valid = np.ones(array.shape[-2:], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if valid.shape != array.shape[-2:]:
        raise RasterError(f"read_fn's mask is {valid.shape}, its array {array.shape[-2:]}")
    if array.dtype.kind == "f":
        valid = valid & np.isfinite(array).all(axis=0)
    array, valid = _pad(array, rows, cols), _pad(valid, rows, cols)
    if fill_nodata and not valid.all() and valid.any():
        # The model must not see nodata values (or NaN, which would blank the whole tile): fill
        # with each band's mean over the tile's valid pixels; the mask restores nodata later.
        array = array.astype(np.float32, copy=True)
        means = array[:, valid].mean(axis=1)
        array[:, ~valid] = means[:, None]
    return array, valid


def _tile_contribution(
    read_fn: ReadFn, process_fn: ProcessFn, tile: Tile, bands: int, fill_nodata: bool
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(values (bands, h, w), weights (h, w)) over the tile's valid output part; None if empty."""
    array, valid_in = _read_tile(read_fn, tile, fill_nodata)
    rs, cs = tile.valid_slices
    valid_in = valid_in[rs, cs]
    if not valid_in.any():
        return None
    out = np.asarray(process_fn(tile, array))
    if out.ndim == 2:
        out = out[None]
    if out.shape != (bands, *tile.out_shape):
        raise RasterError(
            f"process_fn returned {out.shape} for tile {tile.index}; expected "
            f"({bands}, {tile.out_shape[0]}, {tile.out_shape[1]}) = (bands, rows*factor, cols*factor)"
        )
    ors, ocs = tile.out_valid_slices
    values = out[:, ors, ocs].astype(ACCUMULATOR_DTYPE)
    f = tile.factor
    ok = np.repeat(np.repeat(valid_in, f, axis=0), f, axis=1) if f > 1 else valid_in
    ok = ok & np.isfinite(values).all(axis=0)
    weights = np.where(ok, tile.weights()[ors, ocs], 0.0).astype(ACCUMULATOR_DTYPE)
    # Zero the masked values too: NaN x 0 is NaN, and it would spread into the neighbours' sums.
    values[:, ~ok] = 0.0
    return values, weights


def _output_size(tiles: Sequence[Tile]) -> tuple[int, int]:
    width = max(int(t.out_valid.col_off + t.out_valid.width) for t in tiles)
    height = max(int(t.out_valid.row_off + t.out_valid.height) for t in tiles)
    return width, height


def _check_writer(writer: Any, width: int, height: int) -> int:
    prof = writer.profile
    if (int(prof["width"]), int(prof["height"])) != (width, height):
        raise InvalidRequest(
            f"the output is {prof['width']}x{prof['height']} px but the tiles cover "
            f"{width}x{height} px; size the output with output_grid()"
        )
    return int(prof["count"])


def _row_major(tiles: Sequence[Tile]) -> list[Tile]:
    return sorted(tiles, key=lambda t: (int(t.out_window.row_off), int(t.out_window.col_off)))


def tile_progress(
    progress: Optional[ProgressCallback], tile: Tile, total_tiles: int
) -> Optional[ProgressCallback]:
    """Wrap ``progress`` so a per-step callback inside ``process_fn`` reports job-wide progress."""
    if progress is None:
        return None

    def inner(p: Progress) -> None:
        progress(Progress(p.step, p.total_steps, tile.index, total_tiles, p.message))

    return inner


# --------------------------------------------------------------------------------------------
# Single process


def run_tiled(
    read_fn: ReadFn,
    process_fn: ProcessFn,
    writer: Any,
    tiles: Sequence[Tile],
    *,
    scale: Optional[float] = None,
    offset: float = 0.0,
    fill_nodata: bool = True,
    scratch_dir: Optional[Union[str, os.PathLike]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> TilingStats:
    """Run ``process_fn`` over every tile and write the blended result into ``writer``.

    Args:
        read_fn: ``read_fn(tile)`` returns the model input for ``tile.valid`` or the whole
            (padded) ``tile.window``: an array (bands, rows, cols), or ``(array, valid)`` with a
            boolean (rows, cols) mask of valid pixels. Missing padding is added by reflection.
            Non-finite input pixels count as invalid.
        process_fn: ``process_fn(tile, array)`` returns (bands_out, rows*factor, cols*factor)
            floats. Invalid input pixels were filled (see ``fill_nodata``); non-finite output
            pixels count as invalid.
        writer: an open :class:`~engine.geo.cog.CogWriter` (or anything with ``profile`` and
            ``write(array, window)``) sized like the tiles' output (see :func:`output_grid`).
        tiles: from :func:`plan_tiles`; processed row-major.
        scale, offset: output = value x scale + offset, rounded and clipped for integer
            outputs. ``scale`` defaults to 255 for uint8 (values 0..1) and 1 for floats.
        fill_nodata: fill invalid input pixels with the tile's band means before the model.
        scratch_dir: folder for the accumulator file (default: the system temp folder). While
            a :class:`~engine.geo.cog.CogWriter` is open in this thread its run folder is used
            instead, so one hidden folder holds all scratch of a run.
        progress: called after every tile with ``Progress(tile=done, total_tiles=n)``.
        cancel: polled before every tile and every written chunk.

    Pixels with no valid contribution are written as the writer's nodata (NaN for float outputs
    without nodata, 0 for integer outputs without nodata; counted in the returned stats).

    Raises:
        Cancelled: ``cancel`` was set; the writer's context then leaves nothing at its
            destination.
        DiskFull: no space for the accumulator (nothing is left behind).
    """
    start = time.perf_counter()
    tiles = _row_major(tiles)
    if not tiles:
        raise InvalidRequest("no tiles to run")
    width, height = _output_size(tiles)
    bands = _check_writer(writer, width, height)
    enc = _encoding(writer, scale, offset)
    n = len(tiles)
    align = _chunking(writer)[0]
    # The ring holds one tile height of rows plus the rows kept back to finish a writer block.
    strip = max(t.out_shape[0] for t in tiles) + align

    done = skipped = nodata_px = 0
    with _scratch_folder(scratch_dir) as (tmp, shown):
        acc = _Accumulator(
            Path(tmp) / "acc.bin", width=width, bands=bands, row0=0, nrows=strip, ring=True, create=True
        )
        try:
            flushed = 0
            for i, tile in enumerate(tiles):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                # Rows above a new tile row are final. Flush only whole rows of writer blocks, so
                # each block is written once and complete (no read-back, little GDAL cache).
                ready = int(tile.out_window.row_off) // align * align
                if ready > flushed:
                    nodata_px += _flush([acc], flushed, ready, width, bands, writer, enc, cancel, True)
                    acc.release(ready)
                    flushed = ready
                contribution = _tile_contribution(read_fn, process_fn, tile, bands, fill_nodata)
                if contribution is None:
                    skipped += 1
                else:
                    values, weights = contribution
                    acc.add(int(tile.out_valid.row_off), int(tile.out_valid.col_off), values, weights)
                    done += 1
                report(progress, Progress(0, 1, i + 1, n, f"tile {i + 1}/{n}"))
            report(progress, Progress(0, 1, n, n, "writing the last rows"))
            nodata_px += _flush([acc], flushed, height, width, bands, writer, enc, cancel, False)
        except OSError as err:
            from .cog import disk_full, is_disk_full

            if is_disk_full(err):
                raise disk_full(shown, strip * acc.rowbytes, "the tiling accumulator") from None
            raise
        finally:
            acc.close()
            Path(tmp, "acc.bin").unlink(missing_ok=True)
    return TilingStats(done, skipped, nodata_px, time.perf_counter() - start)


@contextlib.contextmanager
def _scratch_folder(scratch_dir: Optional[Union[str, os.PathLike]]) -> Iterator[tuple[Path, Path]]:
    """(folder for the accumulator, folder to name in messages): the active run folder of the
    output being written when there is one, else a temporary folder in ``scratch_dir``."""
    from .cog import active_run_dir

    run = active_run_dir()
    if run is not None:
        yield run, run.parent
        return
    with tempfile.TemporaryDirectory(prefix="diffusionsat-tiling-", dir=scratch_dir) as tmp:
        yield Path(tmp), Path(scratch_dir or tempfile.gettempdir())


# --------------------------------------------------------------------------------------------
# Split over processes


def tiles_for_rank(tiles: Sequence[Tile], rank: int, world_size: int) -> list[Tile]:
    """Rank ``rank``'s share of ``tiles``: a contiguous row-major block, sizes differing by <= 1.

    Contiguous blocks (not round-robin) keep each rank's partial accumulator to a band of rows.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidRequest(f"rank {rank} is not in 0..{world_size - 1}")
    ordered = _row_major(tiles)
    n = len(ordered)
    return ordered[rank * n // world_size : (rank + 1) * n // world_size]


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InvalidRequest(f"run_id must be 1-64 letters, digits, '-' or '_', got {run_id!r}")
    return run_id


def _part(folder: Path, run_id: str, rank: int, suffix: str) -> Path:
    return folder / f"tiling-{run_id}-rank{rank}.{suffix}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_run_id() -> str:
    """A run id every rank agrees on.

    Under ``torch.distributed`` (``accelerate launch``) rank 0's random id is broadcast to all
    ranks, so stale files from an earlier run in the same folder are never mistaken for this
    run's; every rank must call it (it is a collective operation there). Otherwise a fresh
    random id: a launcher of plain processes passes it to each of them.
    """
    run_id = uuid.uuid4().hex[:16]
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency, but keep this usable without
        return run_id
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


def accumulate_partial(
    read_fn: ReadFn,
    process_fn: ProcessFn,
    tiles: Sequence[Tile],
    *,
    bands: int,
    folder: Union[str, os.PathLike],
    rank: int,
    world_size: int,
    run_id: str,
    fill_nodata: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> TilingStats:
    """Accumulate this rank's share of ``tiles`` (the whole plan) into its own partial files.

    Writes ``tiling-<run_id>-rank<rank>.acc`` (weighted sums over this rank's band of output
    rows) into ``folder``, which every rank can reach, then the marker ``...rank<rank>.done``
    (a JSON header). On failure it writes ``...rank<rank>.failed`` with the message, so rank 0
    stops waiting at once, and re-raises. ``bands`` is the number of bands ``process_fn``
    returns. See :func:`run_tiled` for the other arguments.
    """
    start = time.perf_counter()
    _check_run_id(run_id)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not tiles:
        raise InvalidRequest("no tiles to run")
    width, height = _output_size(tiles)
    mine = tiles_for_rank(tiles, rank, world_size)
    row0 = min((int(t.out_valid.row_off) for t in mine), default=0)
    row1 = max((int(t.out_valid.row_off + t.out_valid.height) for t in mine), default=0)
    acc_path = _part(folder, run_id, rank, "acc")
    done = skipped = 0
    try:
        acc = _Accumulator(
            acc_path, width=width, bands=bands, row0=row0, nrows=row1 - row0, ring=False, create=True
        )
        try:
            for i, tile in enumerate(mine):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                contribution = _tile_contribution(read_fn, process_fn, tile, bands, fill_nodata)
                if contribution is None:
                    skipped += 1
                else:
                    values, weights = contribution
                    acc.add(int(tile.out_valid.row_off), int(tile.out_valid.col_off), values, weights)
                    done += 1
                report(progress, Progress(0, 1, i + 1, len(mine), f"rank {rank}: tile {i + 1}/{len(mine)}"))
            acc.sync()  # the data must be on disk before the marker says so (shared file systems)
        finally:
            acc.close()
        header = dict(
            format=1,
            run_id=run_id,
            rank=rank,
            world_size=world_size,
            width=width,
            height=height,
            bands=bands,
            row0=row0,
            nrows=row1 - row0,
            dtype=ACCUMULATOR_DTYPE.name,
            tiles=done,
            skipped_tiles=skipped,
        )
        _write_atomically(_part(folder, run_id, rank, "done"), json.dumps(header))
    except BaseException as err:
        with contextlib.suppress(OSError):  # on a full disk even the marker may not fit
            _write_atomically(_part(folder, run_id, rank, "failed"), f"{type(err).__name__}: {err}")
        if isinstance(err, OSError):
            from .cog import disk_full, is_disk_full

            if is_disk_full(err):
                _part(folder, run_id, rank, "acc").unlink(missing_ok=True)
                raise disk_full(folder, (row1 - row0) * width * (bands + 1) * ACCUMULATOR_DTYPE.itemsize,
                                f"rank {rank}'s partial result") from None
        raise
    return TilingStats(done, skipped, 0, time.perf_counter() - start)


def _wait_for_ranks(
    folder: Path, run_id: str, world_size: int, timeout_s: float, poll_s: float, cancel: Optional[CancelToken]
) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        if cancel is not None:
            cancel.raise_if_cancelled()
        for r in range(world_size):
            failed = _part(folder, run_id, r, "failed")
            if failed.exists():
                message = failed.read_text()
                if message.startswith("Cancelled"):
                    raise Cancelled(f"rank {r} was cancelled; nothing was written")
                raise RasterError(f"rank {r} failed while tiling ({message}); nothing was written")
        missing = [r for r in range(world_size) if not _part(folder, run_id, r, "done").exists()]
        if not missing:
            return [json.loads(_part(folder, run_id, r, "done").read_text()) for r in range(world_size)]
        if time.monotonic() >= deadline:
            raise RasterError(
                f"rank(s) {', '.join(map(str, missing))} of {world_size} did not finish their tiles "
                f"within {timeout_s:g} s (no marker in {str(folder)!r}, run {run_id}); check those "
                "processes' logs, or give merge_partials a longer timeout_s"
            )
        time.sleep(poll_s)


def merge_partials(
    folder: Union[str, os.PathLike],
    world_size: int,
    writer: Any,
    *,
    run_id: str,
    scale: Optional[float] = None,
    offset: float = 0.0,
    timeout_s: float = 3600.0,
    poll_s: float = 0.2,
    cleanup: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> TilingStats:
    """On rank 0: wait for every rank's marker, sum the partials, normalise and write ``writer``.

    Waits up to ``timeout_s`` seconds (polling every ``poll_s``) for the ``.done`` markers of
    ranks ``0..world_size-1``; a ``.failed`` marker stops the wait at once. ``cleanup`` removes
    this run's partial files afterwards, whatever the outcome. ``scale``/``offset`` as in
    :func:`run_tiled`.

    Raises:
        RasterError: a rank failed, did not finish in time, or the partials disagree in size.
        Cancelled: ``cancel`` was set, or a rank was cancelled.
    """
    start = time.perf_counter()
    _check_run_id(run_id)
    folder = Path(folder)
    sources: list[_Accumulator] = []
    try:
        headers = _wait_for_ranks(folder, run_id, world_size, timeout_s, poll_s, cancel)
        shapes = {(h["width"], h["height"], h["bands"], h["dtype"]) for h in headers}
        if len(shapes) != 1:
            raise RasterError(f"the ranks' partial results disagree in size: {sorted(shapes)}")
        width, height, bands, dtype = shapes.pop()
        if dtype != ACCUMULATOR_DTYPE.name:
            raise RasterError(f"partials hold {dtype}, this engine reads {ACCUMULATOR_DTYPE.name}")
        if _check_writer(writer, width, height) != bands:
            raise InvalidRequest(f"the output has {writer.profile['count']} bands, the partials {bands}")
        enc = _encoding(writer, scale, offset)
        for h in headers:
            if h["nrows"] > 0:
                sources.append(
                    _Accumulator(
                        _part(folder, run_id, h["rank"], "acc"),
                        width=width,
                        bands=bands,
                        row0=h["row0"],
                        nrows=h["nrows"],
                        ring=False,
                        create=False,
                    )
                )
        report(progress, Progress(0, 1, 0, 1, "merging the ranks' tiles"))
        nodata_px = _flush(sources, 0, height, width, bands, writer, enc, cancel, False)
        report(progress, Progress(0, 1, 1, 1, "merged"))
        return TilingStats(
            sum(h["tiles"] for h in headers),
            sum(h["skipped_tiles"] for h in headers),
            nodata_px,
            time.perf_counter() - start,
        )
    finally:
        for src in sources:
            src.close()
        if cleanup:
            for r in range(world_size):
                for suffix in ("acc", "done", "failed"):
                    _part(folder, run_id, r, suffix).unlink(missing_ok=True)


def run_tiled_distributed(
    read_fn: ReadFn,
    process_fn: ProcessFn,
    tiles: Sequence[Tile],
    *,
    bands: int,
    folder: Union[str, os.PathLike],
    rank: int,
    world_size: int,
    run_id: str,
    open_writer: Callable[[], Any],
    scale: Optional[float] = None,
    offset: float = 0.0,
    fill_nodata: bool = True,
    timeout_s: float = 3600.0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Optional[TilingStats]:
    """One rank's part of a split run: accumulate its tiles; rank 0 then merges and writes.

    ``open_writer()`` is called on rank 0 only and must return a not-yet-entered
    :class:`~engine.geo.cog.CogWriter`; the COG appears at its destination when the merge
    succeeds, and nothing does otherwise. Returns the merge's stats on rank 0, None elsewhere.
    With ``world_size == 1`` this is :func:`run_tiled` through one partial file.
    """
    mine = accumulate_partial(
        read_fn,
        process_fn,
        tiles,
        bands=bands,
        folder=folder,
        rank=rank,
        world_size=world_size,
        run_id=run_id,
        fill_nodata=fill_nodata,
        progress=progress,
        cancel=cancel,
    )
    if rank != 0:
        return None
    with open_writer() as writer:
        stats = merge_partials(
            folder,
            world_size,
            writer,
            run_id=run_id,
            scale=scale,
            offset=offset,
            timeout_s=timeout_s,
            cancel=cancel,
        )
    return TilingStats(stats.tiles, stats.skipped_tiles, stats.nodata_pixels, stats.seconds + mine.seconds)


# --------------------------------------------------------------------------------------------
# Reading from rasterio


def raster_reader(
    dataset: Any,
    *,
    indexes: Optional[Sequence[int]] = None,
    scale: float = 1.0,
    offset: float = 0.0,
) -> ReadFn:
    """A ``read_fn`` over an open rasterio dataset: the tile's valid window as float32.

    Values are ``raw x scale + offset`` (e.g. ``scale=1/255`` for 8-bit imagery into 0..1). A
    pixel is valid where every band's mask is valid (nodata, internal masks, alpha) and finite.
    """
    from rasterio.enums import MaskFlags

    bands = list(indexes) if indexes is not None else list(range(1, dataset.count + 1))
    masked = any(MaskFlags.all_valid not in dataset.mask_flag_enums[b - 1] for b in bands)

    def read(tile: Tile) -> tuple[np.ndarray, Optional[np.ndarray]]:
        array = dataset.read(bands, window=tile.valid, out_dtype="float32")
        if scale != 1.0 or offset != 0.0:
            array = array * np.float32(scale) + np.float32(offset)
        valid = None
        if masked:
            valid = (dataset.read_masks(bands, window=tile.valid) > 0).all(axis=0)
        return array, valid

    return read


__all__ = [
    "ACCUMULATOR_DTYPE",
    "Tile",
    "TilingStats",
    "accumulate_partial",
    "blend_weights",
    "merge_partials",
    "new_run_id",
    "output_grid",
    "plan_tiles",
    "raster_reader",
    "run_tiled",
    "run_tiled_distributed",
    "tile_progress",
    "tiles_for_rank",
]
