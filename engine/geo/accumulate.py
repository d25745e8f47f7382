"""The on-disk accumulator and the tile loop: blend a fixed-size model's tiles into one raster.

Memory does not grow with the raster: the weighted sums live in a file on disk (a ring of one
tile height of output rows for a single process, :func:`run_tiled`; one band of rows per process
when the work is split, :mod:`engine.parallel`), rows are normalised and written to the
:class:`~engine.geo.cog.CogWriter` as soon as no later tile can touch them, and every array in
RAM is the size of a tile or of a fixed chunk. Tiles and their blend weights come from
:mod:`engine.geo.tiles`.

:class:`Accumulator`, :func:`encoding`, :func:`flush`, :func:`tile_loop`, :func:`add_contribution` and
:func:`check_writer` are shared with :mod:`engine.parallel`, which accumulates the same way
into one partial file per process.

Units: all windows and sizes are in pixels; input windows in input pixels, ``out_*`` windows in
output pixels (input pixels x ``factor``).

Over 500 lines (about 800): the accumulator, the encoding and the tile loop are one mechanism (the ring of
rows, the flush alignment to writer blocks and the read-back all depend on each other, and the
overlapped loop must keep the order of adds and flushes that the ring relies on).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import rasterio.env
import rasterio.errors
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from ..atomic import disk_full, is_disk_full
from ..errors import InvalidRequest, RasterError
from ..progress import CancelToken, Progress, ProgressCallback, report
from .run_folders import active_run_dir
from .tiles import Tile, output_size, row_major

#: Accumulator precision. float64 rather than float32 because a split run sums the same
#: contributions in a different order than a single process; in float64 the two agree to far
#: below output precision, so split and single runs write identical pixels.
ACCUMULATOR_DTYPE = np.dtype(np.float64)

#: Output (rows, cols) normalised and written at once when the writer has no block grid; with
#: one, a chunk is one writer block (at least 256 px wide). Bounds RAM during flushes
#: independently of the raster width.
FLUSH_CHUNK = (256, 256)


# --------------------------------------------------------------------------------------------
# The on-disk accumulator

_PREADV = hasattr(os, "preadv")


class Accumulator:
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
        # pread/pwrite: one system call per span, not a seek and a read. Each call lets go of the
        # GIL, and in the overlapped tile loop getting it back can wait on the other stages.
        view = memoryview(part).cast("B")
        fd = self._f.fileno()
        done = 0
        while done < len(view):
            if write:
                n = os.pwrite(fd, view[done:], offset + done)
            elif _PREADV:
                n = os.preadv(fd, [view[done:]], offset + done)
            else:  # no preadv (macOS before 11)
                self._f.seek(offset + done)
                n = self._f.readinto(view[done:])
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
class Encoding:
    dtype: np.dtype
    nodata: Optional[float]
    scale: float
    offset: float


def encoding(writer: Any, scale: Optional[float], offset: float) -> Encoding:
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
    return Encoding(dtype, None if nodata is None else float(nodata), float(scale), float(offset))


def _encode(values: np.ndarray, valid: np.ndarray, enc: Encoding) -> np.ndarray:
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


#: (public name) what :func:`flush` does to normalised values before the writer: a writer that
#: takes the tiling's float values and writes some of the bands itself (e.g. the spread map beside
#: the output, engine.tasks.common) encodes them with the output's :class:`Encoding` through this
encode = _encode


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


def flush(
    sources: Sequence[Accumulator],
    y_from: int,
    y_to: int,
    width: int,
    bands: int,
    writer: Any,
    enc: Encoding,
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


def batched(process_fn: Callable) -> Callable:
    """Mark ``process_fn`` as a batch function: ``process_fn(tiles, arrays)`` gets lists of tiles
    and their model inputs and returns one output per tile, in order (one model call for several
    tiles). Unmarked process functions are called one tile at a time, ``process_fn(tile, array)``."""
    process_fn.batched = True
    return process_fn


def process_many(process_fn: Callable, tiles: Sequence[Tile], arrays: Sequence[np.ndarray]) -> list:
    """The outputs of ``process_fn`` for ``tiles``: one batched call (see :func:`batched`) or one call per tile."""
    if getattr(process_fn, "batched", False):
        outs = list(process_fn(list(tiles), list(arrays)))
        if len(outs) != len(tiles):
            raise RasterError(f"a batched process_fn returned {len(outs)} outputs for {len(tiles)} tiles")
        return outs
    return [process_fn(tile, array) for tile, array in zip(tiles, arrays)]


def _prepare(read_fn: ReadFn, tile: Tile, fill_nodata: bool) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(model input, valid input mask over the tile's valid part), or None for a tile with no valid pixel."""
    try:
        array, valid_in = _read_tile(read_fn, tile, fill_nodata)
    except rasterio.errors.RasterioIOError as err:  # e.g. an input truncated or replaced mid-run
        raise input_read_failed(tile, err) from err
    rs, cs = tile.valid_slices
    valid_in = valid_in[rs, cs]
    if not valid_in.any():
        return None
    return array, valid_in


def input_read_failed(tile: Tile, err: BaseException) -> RasterError:
    """The one-line RasterError of a tile whose input GDAL could not read (rasterio's own message,
    "Read failed. See previous exception for details.", names neither the file nor the fix)."""
    cause = " ".join(str(err.__cause__ or err).split()) or type(err).__name__
    return RasterError(f"reading the input failed at tile {tile.index + 1} ({cause[:300]}); was an input file "
                       "changed, truncated or removed while this ran? Check the input and run again")


def _contribution(tile: Tile, out: Any, valid_in: np.ndarray, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """(values (bands, h, w), weights (h, w)) of a model output over the tile's valid output part."""
    out = np.asarray(out)
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


def tile_contribution(
    read_fn: ReadFn, process_fn: ProcessFn, tile: Tile, bands: int, fill_nodata: bool
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(values (bands, h, w), weights (h, w)) over the tile's valid output part; None if empty."""
    return next(contributions(read_fn, process_fn, [tile], bands, fill_nodata))[1]


Contribution = Optional[tuple[np.ndarray, np.ndarray]]


def contributions(
    read_fn: ReadFn, process_fn: ProcessFn, tiles: Sequence[Tile], bands: int, fill_nodata: bool,
    batch_size: int = 1, cancel: Optional[CancelToken] = None,
) -> Iterator[tuple[Tile, Contribution]]:
    """(tile, its contribution or None when it had no valid input) for every tile, in order.

    Up to ``batch_size`` tiles are read, then the non-empty ones go to the model together
    (:func:`process_many`); empty tiles never reach the model. ``cancel`` is polled before each batch.
    """
    size = max(1, int(batch_size))
    for start in range(0, len(tiles), size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        chunk = tiles[start : start + size]
        prepared = [_prepare(read_fn, tile, fill_nodata) for tile in chunk]
        run = [(tile, p) for tile, p in zip(chunk, prepared) if p is not None]
        outs = iter(process_many(process_fn, [t for t, _ in run], [p[0] for _, p in run]))
        for tile, p in zip(chunk, prepared):
            yield tile, None if p is None else _contribution(tile, next(outs), p[1], bands)


def add_contribution(acc: "Accumulator", tile: Tile, contribution: Contribution) -> bool:
    """Add a tile's contribution to ``acc``; False for a tile that had none (skipped)."""
    if contribution is None:
        return False
    values, weights = contribution
    acc.add(int(tile.out_valid.row_off), int(tile.out_valid.col_off), values, weights)
    return True


def check_writer(writer: Any, width: int, height: int) -> int:
    prof = writer.profile
    if (int(prof["width"]), int(prof["height"])) != (width, height):
        raise InvalidRequest(
            f"the output is {prof['width']}x{prof['height']} px but the tiles cover "
            f"{width}x{height} px; size the output with Grid.scaled(factor)"
        )
    return int(prof["count"])


# --------------------------------------------------------------------------------------------
# The tile loop: read ahead, model, add and flush behind (one mechanism for single and split runs)

#: Batches waiting between two stages of the overlapped tile loop. RAM in flight is bounded by
#: about (2 x this + 3) batches of tiles, whatever the raster's size.
QUEUE_DEPTH = 2

#: How often (s) a stage blocked on a queue looks whether another stage failed.
_POLL_S = 0.05

Consume = Callable[[Tile, Contribution, Any], None]


class _Stopped(Exception):
    """Another stage of the tile loop failed or was cancelled: this one stops (never escapes)."""


class _StageToken:
    """What a stage polls: the user's cancel token and the loop's stop signal (another stage failed)."""

    def __init__(self, cancel: Optional[CancelToken]) -> None:
        self.cancel = cancel
        self.stop = threading.Event()

    def raise_if_cancelled(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        if self.stop.is_set():
            raise _Stopped()


class _LockedWriter:
    """``writer`` whose ``write`` holds the loop's I/O lock (see :func:`tile_loop`)."""

    def __init__(self, writer: Any, lock: threading.Lock) -> None:
        self._writer, self._lock = writer, lock
        self.profile = writer.profile

    def write(self, data: np.ndarray, window: Any = None) -> None:
        with self._lock:
            self._writer.write(data, window)


def tile_loop(
    read_fn: ReadFn,
    process_fn: ProcessFn,
    tiles: Sequence[Tile],
    consume: Consume,
    *,
    bands: int,
    fill_nodata: bool,
    batch_size: int = 1,
    cancel: Optional[CancelToken] = None,
    progress: Optional[ProgressCallback] = None,
    label: str = "",
    overlap: bool = True,
    io_lock: Optional[threading.Lock] = None,
) -> int:
    """Run ``tiles`` (row-major) through the model; ``consume(tile, contribution, token)`` each in order.

    With ``overlap`` (the default) three stages run at once, so the model (on a GPU, the costly
    part) never waits for I/O: a reader thread prepares the next batches (``read_fn``, padding,
    nodata fill), the calling thread runs ``process_fn`` (torch/CUDA state and the pipelines'
    cancel hooks belong to it), and a writer thread turns outputs into contributions and calls
    ``consume`` (the accumulator adds and row flushes: the same calls in the same order as
    without ``overlap``). Bounded queues (:data:`QUEUE_DEPTH` batches) keep RAM independent of
    the raster's size. ``read_fn`` runs holding ``io_lock``, and so does a writer's ``write``
    when ``consume`` writes through ``_LockedWriter(writer, io_lock)`` (as :func:`run_tiled`
    does): the two may share GDAL handles (in-painting's composite writer reads the input that
    ``read_fn`` reads), and a GDAL dataset must not be used by two threads at once.

    Progress (``Progress(0, 1, i + 1, n, label + "tile i+1/n")``) is reported from the calling
    thread after the model finished each tile (or found it empty), in order. ``cancel`` is
    polled by every stage; the first error of any stage (a ``Cancelled``, a ``read_fn`` or
    ``process_fn`` error, an ``OSError`` from a full disk...) stops the others, which are
    joined before it is re-raised here, with its own type. Worker threads are daemons, so a
    second Ctrl-C during that join still ends the process. Context variables (e.g. the run folder
    of :func:`~engine.geo.run_folders.active_run_dir`) are copied into the workers.

    Returns the number of tiles skipped (no valid input pixel; never sent to the model).
    """
    n = len(tiles)
    if not overlap or n == 0:
        skipped = 0
        for i, (tile, contribution) in enumerate(
            contributions(read_fn, process_fn, tiles, bands, fill_nodata, batch_size, cancel)
        ):
            consume(tile, contribution, cancel)
            skipped += contribution is None
            report(progress, Progress(0, 1, i + 1, n, f"{label}tile {i + 1}/{n}"))
        return skipped
    return _Overlapped(read_fn, process_fn, tiles, consume, bands, fill_nodata, batch_size, cancel,
                       io_lock or threading.Lock()).run(progress, label)


_END = object()


class _Overlapped:
    """The three stages of :func:`tile_loop` with ``overlap``: reader thread, caller, writer thread."""

    def __init__(self, read_fn, process_fn, tiles, consume, bands, fill_nodata, batch_size, cancel, lock) -> None:
        self.read_fn, self.process_fn, self.tiles, self.consume = read_fn, process_fn, tiles, consume
        self.bands, self.fill_nodata, self.size = bands, fill_nodata, max(1, int(batch_size))
        self.lock = lock
        self.token = _StageToken(cancel)
        self.read_q: "queue.Queue[Any]" = queue.Queue(QUEUE_DEPTH)
        self.write_q: "queue.Queue[Any]" = queue.Queue(QUEUE_DEPTH)
        self._error: Optional[BaseException] = None
        self._error_lock = threading.Lock()
        self._env = rasterio.env.getenv() if rasterio.env.hasenv() else {}

    # -- plumbing

    def fail(self, err: BaseException) -> None:
        """Record the first error of any stage and stop the others."""
        with self._error_lock:
            if self._error is None and not isinstance(err, _Stopped):
                self._error = err
        self.token.stop.set()

    def put(self, q: "queue.Queue[Any]", item: Any) -> None:
        while True:
            self.token.raise_if_cancelled()
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self, q: "queue.Queue[Any]") -> Any:
        while True:
            if self.token.stop.is_set():
                raise _Stopped()
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _thread(self, name: str, body: Callable[[], None]) -> threading.Thread:
        context = contextvars.copy_context()  # one per thread: a Context is entered by one thread at a time

        def main() -> None:
            try:
                # GDAL's messages become log records here too, with the caller's config options.
                with rasterio.Env(**self._env):
                    body()
            except BaseException as err:  # noqa: BLE001 -- handed to the calling thread
                self.fail(err)

        return threading.Thread(target=context.run, args=(main,), name=name, daemon=True)

    # -- the stages

    def _read(self, tile: Tile):
        with self.lock:
            return self.read_fn(tile)

    def reader(self) -> None:
        for start in range(0, len(self.tiles), self.size):
            self.token.raise_if_cancelled()
            chunk = self.tiles[start : start + self.size]
            prepared = []
            for tile in chunk:
                self.token.raise_if_cancelled()
                prepared.append(_prepare(self._read, tile, self.fill_nodata))
            self.put(self.read_q, (chunk, prepared))
        self.put(self.read_q, _END)

    def writer(self) -> None:
        while True:
            item = self.get(self.write_q)
            if item is _END:
                return
            for tile, valid_in, out in item:
                self.token.raise_if_cancelled()
                contribution = None if valid_in is None else _contribution(tile, out, valid_in, self.bands)
                self.consume(tile, contribution, self.token)

    def run(self, progress: Optional[ProgressCallback], label: str) -> int:
        n, done, skipped = len(self.tiles), 0, 0
        threads = [self._thread("diffusionsat-tile-reader", self.reader),
                   self._thread("diffusionsat-tile-writer", self.writer)]
        try:
            for t in threads:
                t.start()
            while True:
                item = self.get(self.read_q)
                if item is _END:
                    break
                self.token.raise_if_cancelled()
                chunk, prepared = item
                busy = [(t, p) for t, p in zip(chunk, prepared) if p is not None]
                # A failed reader or writer is noticed once this batch is through the model (the
                # pipelines poll the user's cancel token, not this loop's stop signal).
                outs = iter(process_many(self.process_fn, [t for t, _ in busy], [p[0] for _, p in busy]))
                # the model inputs stay behind: the writer needs only the valid masks
                batch = [(t, None, None) if p is None else (t, p[1], next(outs)) for t, p in zip(chunk, prepared)]
                del item, prepared, busy, outs
                self.put(self.write_q, batch)
                for _, valid_in, _ in batch:
                    done += 1
                    skipped += valid_in is None
                    report(progress, Progress(0, 1, done, n, f"{label}tile {done}/{n}"))
            self.put(self.write_q, _END)
            while threads[1].is_alive():  # the writer adds and flushes what is still queued
                threads[1].join(_POLL_S)
                self.token.raise_if_cancelled()
        except BaseException as err:
            self.fail(err)
        finally:
            self.token.stop.set()
            for t in threads:
                if t.ident is not None:
                    t.join()
        if self._error is not None:
            raise self._error
        return skipped


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
    batch_size: int = 1,
    overlap: bool = True,
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
            ``write(array, window)``) sized like the tiles' output (see :meth:`~engine.geo.grid.Grid.scaled`).
        tiles: from :func:`~engine.geo.tiles.plan_tiles`; processed row-major.
        scale, offset: output = value x scale + offset, rounded and clipped for integer
            outputs. ``scale`` defaults to 255 for uint8 (values 0..1) and 1 for floats.
        fill_nodata: fill invalid input pixels with the tile's band means before the model.
        scratch_dir: folder for the accumulator file (default: the system temp folder). While
            a :class:`~engine.geo.cog.CogWriter` is open in this thread its run folder is used
            instead, so one hidden folder holds all scratch of a run.
        progress: called after every tile with ``Progress(tile=done, total_tiles=n)``, from this
            thread (the one that runs ``process_fn``), once the model is done with the tile.
        cancel: polled before every batch of tiles and every written chunk.
        batch_size: tiles per ``process_fn`` call when it is :func:`batched` (the pixels do not
            depend on it as long as ``process_fn``'s outputs do not).
        overlap: read the next tiles and add/write the finished ones in two worker threads
            while ``process_fn`` runs in this thread (:func:`tile_loop`); the pixels are the
            same either way. False runs everything in this thread, one step after the other.

    Pixels with no valid contribution are written as the writer's nodata (NaN for float outputs
    without nodata, 0 for integer outputs without nodata; counted in the returned stats).

    Raises:
        Cancelled: ``cancel`` was set; the writer's context then leaves nothing at its
            destination.
        DiskFull: no space for the accumulator (nothing is left behind).
    """
    start = time.perf_counter()
    tiles = row_major(tiles)
    if not tiles:
        raise InvalidRequest("no tiles to run")
    width, height = output_size(tiles)
    bands = check_writer(writer, width, height)
    enc = encoding(writer, scale, offset)
    n = len(tiles)
    align = _chunking(writer)[0]
    # The ring holds one tile height of rows plus the rows kept back to finish a writer block.
    strip = max(t.out_shape[0] for t in tiles) + align

    skipped = nodata_px = 0
    io_lock = threading.Lock()
    with _scratch_folder(scratch_dir) as (tmp, shown):
        acc = Accumulator(
            Path(tmp) / "acc.bin", width=width, bands=bands, row0=0, nrows=strip, ring=True, create=True
        )
        try:
            flushed = 0
            locked = _LockedWriter(writer, io_lock)

            def consume(tile: Tile, contribution: Contribution, token: Any) -> None:
                nonlocal flushed, nodata_px
                # Rows above a new tile row are final. Flush only whole rows of writer blocks, so
                # each block is written once and complete (no read-back, little GDAL cache).
                ready = int(tile.out_window.row_off) // align * align
                if ready > flushed:
                    nodata_px += flush([acc], flushed, ready, width, bands, locked, enc, token, True)
                    acc.release(ready)
                    flushed = ready
                add_contribution(acc, tile, contribution)

            skipped = tile_loop(read_fn, process_fn, tiles, consume, bands=bands, fill_nodata=fill_nodata,
                                batch_size=batch_size, cancel=cancel, progress=progress, overlap=overlap,
                                io_lock=io_lock)
            report(progress, Progress(0, 1, n, n, "writing the last rows"))
            nodata_px += flush([acc], flushed, height, width, bands, writer, enc, cancel, False)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(shown, strip * acc.rowbytes, "the tiling accumulator") from None
            raise
        finally:
            acc.close()
            Path(tmp, "acc.bin").unlink(missing_ok=True)
    return TilingStats(n - skipped, skipped, nodata_px, time.perf_counter() - start)


@contextlib.contextmanager
def _scratch_folder(scratch_dir: Optional[Union[str, os.PathLike]]) -> Iterator[tuple[Path, Path]]:
    """(folder for the accumulator, folder to name in messages): the active run folder of the
    output being written when there is one, else a temporary folder in ``scratch_dir``."""
    run = active_run_dir()
    if run is not None:
        yield run, run.parent
        return
    with tempfile.TemporaryDirectory(prefix="diffusionsat-tiling-", dir=scratch_dir) as tmp:
        yield Path(tmp), Path(scratch_dir or tempfile.gettempdir())


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
    "Accumulator",
    "ProcessFn",
    "ReadFn",
    "TilingStats",
    "check_writer",
    "encode",
    "encoding",
    "flush",
    "raster_reader",
    "run_tiled",
    "add_contribution",
    "batched",
    "contributions",
    "process_many",
    "tile_contribution",
    "tile_loop",
]
