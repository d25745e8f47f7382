"""Tile planning and blend weights: pure functions of sizes, no I/O.

The model sees windows of exactly ``tile_size`` pixels (:func:`plan_tiles`). Windows overlap by
``overlap`` pixels and each one's output is multiplied by a blending window that ramps smoothly
from ~0 at the tile's inner borders to 1 in its centre (:func:`blend_weights`); the output is the
weighted average of every tile that covers a pixel. Two tiles that disagree (a colour shift
between tiles) therefore meet in a gradual cross-fade over the overlap instead of a step, and
tiles that agree reproduce their common answer exactly.

The accumulation of the blended tiles on disk and the tile loop live in
:mod:`engine.geo.accumulate`; splitting a run over processes in :mod:`engine.parallel`.

Units: all windows and sizes are in pixels; input windows in input pixels, ``out_*`` windows in
output pixels (input pixels x ``factor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import numpy as np
from affine import Affine
from rasterio.windows import Window

from ..errors import InvalidRequest
from ..progress import Progress, ProgressCallback
from .grid import Grid

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

    A tile planned over a :class:`~engine.geo.grid.Grid` (``plan_tiles(..., grid=)``) carries it
    in ``source`` and knows its own footprint: :attr:`grid` (the model window on the input grid)
    and :attr:`out_grid` (the output window on the output grid).
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
    source: Optional[Grid] = None  #: the input grid the plan covers (None: planned on sizes only)

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

    def _planned_grid(self) -> Grid:
        if self.source is None:
            raise ValueError("this tile was planned on sizes only; give plan_tiles(..., grid=) for its grid")
        return self.source

    @property
    def grid(self) -> Grid:
        """The model window's grid on the input grid, input px (may extend past the raster)."""
        src = self._planned_grid()
        w = self.window
        return Grid(src.crs, src.transform * Affine.translation(w.col_off, w.row_off), int(w.width), int(w.height))

    @property
    def out_grid(self) -> Grid:
        """The model output's grid on the output grid (input grid scaled by ``factor``), output px."""
        src = self._planned_grid().scaled(self.factor)
        w = self.out_window
        return Grid(src.crs, src.transform * Affine.translation(w.col_off, w.row_off), int(w.width), int(w.height))

    @property
    def valid_grid(self) -> Grid:
        """The part of :attr:`grid` inside the raster, input px."""
        return self._planned_grid().subgrid(self.valid)

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
    width: int, height: int, tile_size: int, overlap: int, factor: int = 1, *, grid: Optional[Grid] = None
) -> list[Tile]:
    """Cover a ``width`` x ``height`` px raster with ``tile_size`` px windows, row-major.

    Neighbouring windows overlap by at least ``overlap`` px (stride ``tile_size - overlap``); the
    last row and column are shifted back to end on the raster edge. A raster smaller than one tile
    along an axis gets one window on that axis, padded past its end. ``factor`` (an integer >= 1)
    scales output windows for super-resolution. ``grid`` (the ``width`` x ``height`` input
    grid) makes every tile carry it (:attr:`Tile.grid`, :attr:`Tile.out_grid`).

    Raises:
        InvalidRequest: non-positive sizes, ``overlap`` not in ``[0, tile_size / 2)``, a
            non-integer ``factor``, or a ``grid`` of another size.
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
    if grid is not None and (int(grid.width), int(grid.height)) != (width, height):
        raise InvalidRequest(f"the grid is {grid.width}x{grid.height} px, the plan {width}x{height} px")

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
                    source=grid,
                )
            )
    return tiles


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
# Order and extent of a plan


def output_size(tiles: Sequence[Tile]) -> tuple[int, int]:
    """(width, height) of the output the tiles cover, output px."""
    width = max(int(t.out_valid.col_off + t.out_valid.width) for t in tiles)
    height = max(int(t.out_valid.row_off + t.out_valid.height) for t in tiles)
    return width, height


def row_major(tiles: Sequence[Tile]) -> list[Tile]:
    """The tiles in the order the accumulator needs: by output row, then column."""
    return sorted(tiles, key=lambda t: (int(t.out_window.row_off), int(t.out_window.col_off)))


def tile_progress(
    progress: Optional[ProgressCallback], tile: Union[Tile, Sequence[Tile]], total_tiles: int
) -> Optional[ProgressCallback]:
    """Wrap ``progress`` so a per-step callback inside ``process_fn`` reports job-wide progress.

    ``tile`` may be a batch of tiles denoised together: step ``s`` of ``total_steps`` then stands
    for ``s x len(batch)`` tile-steps, reported as that many per-tile steps, as if the batch's
    tiles ran one after another (tile ``j`` of the batch is at step ``s x b - j x total_steps``):
    the fraction done grows as with one tile at a time, and a counter of "denoising" steps
    (engine.tasks.run's) counts steps x tiles.
    """
    if progress is None:
        return None
    batch = [tile] if isinstance(tile, Tile) else list(tile)

    def inner(p: Progress) -> None:
        if len(batch) == 1 or p.step == 0 or not p.total_steps:
            progress(Progress(p.step, p.total_steps, batch[0].index, total_tiles, p.message))
            return
        for j in range(len(batch)):  # the tile-steps this step did: (step-1)*b+1 .. step*b
            done = (p.step - 1) * len(batch) + j + 1
            k = (done - 1) // p.total_steps
            progress(Progress(done - k * p.total_steps, p.total_steps, batch[k].index, total_tiles, p.message))

    return inner


__all__ = ["Tile", "blend_weights", "output_size", "plan_tiles", "row_major", "tile_progress"]
