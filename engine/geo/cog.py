"""Cloud-Optimized GeoTIFF output, written atomically.

Every raster the engine produces goes through here: it is written to a temporary file beside the
destination and renamed over it only when complete, so an interrupted run (Ctrl-C, SIGTERM, a crash,
a cancelled job) leaves nothing at the destination and never a half-written file.

All scratch of one write lives in one hidden run folder beside the destination
(:mod:`engine.geo.run_folders`), removed on every exit path. A full disk becomes
:class:`~engine.errors.DiskFull`, naming the folder and the space needed, with nothing left behind.
The output gets the user's umask, as any GIS tool's does.

Large outputs are written window by window into a tiled scratch GeoTIFF (:class:`CogWriter`), then
published as a COG (internal tiles, overviews, DEFLATE) in one ``CreateCopy``. The publish is the
part of a run nobody waits for gladly, so it does the least work it can (benchmarks/tiling_memory.py):

* the overviews are averaged here, in one streaming pass over the uncompressed scratch
  (:func:`engine.geo.overviews.build_overviews`: exact means of 2^k x 2^k blocks, nodata ignored), into uncompressed
  scratch GeoTIFFs that a VRT declares as the scratch's overviews; GDAL's COG driver then copies
  them instead of computing its own (its AVERAGE pass, written to a temporary compressed file and
  read back, cost more than the compression of the full resolution);
* DEFLATE at level :data:`engine.geo.overviews.DEFLATE_LEVEL` (libdeflate's fastest: ~3.5x less CPU than the default
  level 6 for ~6 % more bytes), with the horizontal predictor, on every core.

A split run (:mod:`engine.parallel`) writes one output from several processes: each writes its own
band of rows, a :class:`~engine.geo.stripes.Stripe`, into its own files (``CogWriter(..., stripe=)``: the stripe's
uncompressed scratch and its overviews, averaged like the whole raster's because stripes start on
multiples of :func:`~engine.geo.stripes.stripe_alignment`), and rank 0 publishes the COG from all of them
(``CogWriter(..., stripes=)``: a VRT mosaic of the stripes and of their overviews, copied and
compressed by the COG driver). The normalising, encoding and averaging of the output is thus shared
by the processes; only the compression is rank 0's.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..atomic import disk_full, is_disk_full
from ..errors import RasterError
from .grid import Grid
from .overviews import build_overviews, cog_options, overview_factors, with_overviews
from .run_folders import atomic_path
from .stripes import Stripe, mosaic_vrt, stripe_alignment


def _write_error_types() -> tuple[type[BaseException], ...]:
    from rasterio._err import (
        CPLE_BaseError,  # GDAL errors raised as such are no RasterioError
    )
    from rasterio.errors import RasterioError

    return (RasterioError, CPLE_BaseError, OSError)


def quiet_libtiff() -> bool:
    """Stop libtiff printing its own lines on stderr (``_tiffWriteProc: No space left on device``).

    GDAL reports the same failures as exceptions, which the CLI turns into one line; libtiff's
    global handler would print them a second time, raw. Best effort (Linux, via the process's
    loaded libtiff); returns whether it was done.
    """
    global _LIBTIFF_QUIET
    if _LIBTIFF_QUIET is not None:
        return _LIBTIFF_QUIET
    _LIBTIFF_QUIET = False
    import ctypes

    import rasterio  # noqa: F401 - loads GDAL and its libtiff

    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            libs = {line.split()[-1] for line in fh
                    if "/" in line and Path(line.split()[-1]).name.startswith("libtiff") and ".so" in line}
    except OSError:
        return False
    done = False
    for lib in sorted(libs):
        try:
            tiff = ctypes.CDLL(lib)
            tiff.TIFFSetErrorHandler.restype = ctypes.c_void_p
            tiff.TIFFSetErrorHandler(None)
            done = True
        except (OSError, AttributeError):
            continue
    _LIBTIFF_QUIET = done
    return done


_LIBTIFF_QUIET: Optional[bool] = None


def _normalise_tags(tags: Optional[Mapping[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[str(key)] = str(value)
    return out


class CogWriter:
    """Write a raster window by window, then publish it as a COG at ``dest`` atomically.

    Use as a context manager::

        with CogWriter(dest, grid=grid, count=3, dtype="uint8", tags=tags) as out:
            out.write(block, window)          # any number of windows, in any order
        # dest now exists and is a complete COG; on an exception nothing is at dest

    The pixel grid is a :class:`~engine.geo.grid.Grid` (``grid=``), or its parts (``width=``,
    ``height=``, ``crs=``, ``transform=``); :attr:`grid` is the grid written either way.

    Peak memory is one block: pixels go to a tiled scratch GeoTIFF on disk, not into RAM.

    In a split run, ``stripe=`` makes a writer of that :class:`Stripe`'s rows only (windows in the
    output's coordinates, inside the stripe): it leaves the stripe's scratch and overviews in the
    stripe's folder and publishes nothing. ``stripes=`` makes the writer that publishes the COG from
    every stripe written before (it takes no ``write``): the COG holds this writer's tags, band
    descriptions and colour interpretation.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        grid: Optional[Grid] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        count: int,
        dtype: str,
        crs: Any = None,
        transform: Any = None,
        tags: Optional[Mapping[str, Any]] = None,
        band_descriptions: Optional[Sequence[str]] = None,
        nodata: Optional[float] = None,
        blocksize: int = 256,
        overviews: bool = True,
        colorinterp: Optional[Sequence[str]] = None,
        stripe: Optional[Stripe] = None,
        stripes: Sequence[Stripe] = (),
    ) -> None:
        if stripe is not None and stripes:
            raise TypeError("a CogWriter writes one stripe= or publishes stripes=, not both")
        self.dest = Path(dest)
        self.grid = _grid_of(grid, width, height, crs, transform)
        width, height, crs, transform = self.grid.width, self.grid.height, self.grid.crs, self.grid.transform
        self.profile = dict(
            driver="GTiff",
            width=int(width),
            height=int(height),
            count=int(count),
            dtype=dtype,
            crs=crs,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=blocksize,
            blockysize=blocksize,
            compress="NONE",
            bigtiff="IF_SAFER",
        )
        self.tags = _normalise_tags(tags)
        self.band_descriptions = list(band_descriptions or [])
        self.colorinterp = list(colorinterp or [])
        self.blocksize = blocksize
        self.overviews = overviews
        self._stack: Optional[contextlib.ExitStack] = None
        self._ds = None
        self._scratch: Optional[Path] = None
        self.stripe = stripe
        self.stripes = [s for s in stripes if s.height > 0]
        if stripes:
            rows = sorted((s.row0, s.row1) for s in self.stripes)
            covered = all(a[1] == b[0] for a, b in zip(rows, rows[1:])) and rows and rows[0][0] == 0
            if not covered or rows[-1][1] != self.profile["height"]:
                raise ValueError(f"the stripes {rows} do not cover rows 0..{self.profile['height']}")
        if stripe is not None:
            align = stripe_alignment(self.profile["width"], self.profile["height"], blocksize)
            if stripe.row0 % align or not 0 <= stripe.row0 <= stripe.row1 <= self.profile["height"]:
                raise ValueError(f"a stripe starts on a multiple of {align} rows inside the output, not "
                                 f"rows {stripe.row0}..{stripe.row1}")

    def __enter__(self) -> "CogWriter":
        import rasterio

        self._stack = contextlib.ExitStack()
        try:
            # rasterio's error handler for the whole write: GDAL's messages become log records
            # (the CLI keeps them quiet) and exceptions, instead of raw lines on stderr.
            self._stack.enter_context(rasterio.Env())
            quiet_libtiff()
            if self.stripe is not None:
                self._final_tmp = None
                if self.stripe.height == 0:
                    return self  # an empty stripe (a small output split many ways): no file, no write
                self._scratch = self.stripe.file(self.dest)
                self._stack.callback(self._remove_scratch)
            else:
                self._final_tmp = self._stack.enter_context(atomic_path(self.dest))
                if self.stripes:  # publishes what the stripes' writers left, then removes it
                    self._stack.callback(self._remove_stripes)
                    return self
                self._scratch = self._final_tmp.parent / (self.dest.stem + ".scratch.tif")
                self._stack.callback(self._remove_scratch)
            try:
                self._ds = rasterio.open(self._scratch, "w", **self._scratch_profile())
            except _write_error_types() as err:
                self._raise_write_error(err)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def _scratch_profile(self, factor: int = 1) -> dict:
        """The scratch's profile (the whole output's, or this writer's stripe's), at overview ``factor``."""
        p = self.profile
        row0, height = (0, p["height"]) if self.stripe is None else (self.stripe.row0, self.stripe.height)
        transform = p["transform"]
        if transform is not None:
            transform = transform * transform.translation(0, row0) * transform.scale(factor)
        return dict(p, width=math.ceil(p["width"] / factor), height=math.ceil(height / factor), transform=transform)

    @property
    def scratch_dir(self) -> Optional[Path]:
        """The folder holding this write's scratch (None outside the ``with`` block): the run folder,
        or the stripe's folder."""
        if self._stack is None:
            return None
        return Path(self.stripe.folder) if self.stripe is not None else self._final_tmp.parent

    def needed_bytes(self) -> int:
        """Space this write needs at most: the uncompressed scratch and its overviews (a third of
        it) plus a COG of the same size."""
        p = self.profile
        return 7 * int(p["width"]) * int(p["height"]) * int(p["count"]) * np.dtype(p["dtype"]).itemsize // 3

    def _raise_write_error(self, err: BaseException) -> None:
        folder = self.dest.parent if str(self.dest.parent) else Path(".")
        if is_disk_full(err, folder, self.needed_bytes()):
            raise disk_full(folder, self.needed_bytes(), repr(self.dest.name)) from None
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RasterError(f"could not write the COG {str(self.dest)!r}: {first}") from None

    def _remove_scratch(self) -> None:
        if self._ds is not None and not self._ds.closed:
            # On a full disk the close's flush fails again: the first error is the one to report.
            with contextlib.suppress(Exception):
                self._ds.close()
        if self._scratch is not None and (self.stripe is None or self._failed):
            with contextlib.suppress(FileNotFoundError):
                self._scratch.unlink()
            if self.stripe is not None:  # a failed stripe leaves none of its files
                for f in self._factors():
                    self.stripe.file(self.dest, f).unlink(missing_ok=True)

    _failed = True  #: a stripe's files stay only once its writer finished without an error

    def _remove_stripes(self) -> None:
        """Remove the stripes' files and the VRTs of the publish (whatever its outcome)."""
        folder = Path(self.stripes[0].folder)
        for path in folder.glob(f"{glob.escape(self.dest.name)}.stripe*"):
            path.unlink(missing_ok=True)

    def write(self, data: np.ndarray, window: Any = None) -> None:
        """Write ``data`` (bands, rows, cols) into ``window`` (a rasterio Window; None = all)."""
        if data.ndim == 2:
            data = data[None]
        if self.stripe is not None:
            window = self._in_stripe(data, window)
        if self._ds is None:
            raise TypeError("this CogWriter publishes stripes= written before; it takes no write()")
        try:
            self._ds.write(data.astype(self.profile["dtype"], copy=False), window=window)
        except _write_error_types() as err:
            self._raise_write_error(err)

    def _in_stripe(self, data: np.ndarray, window: Any) -> Any:
        """``window`` (output rows) in the stripe's scratch; a window outside the stripe is an error."""
        from rasterio.windows import Window

        if window is None:
            window = Window(0, 0, self.profile["width"], self.profile["height"])
        top, bottom = int(window.row_off), int(window.row_off) + int(window.height)
        if top < self.stripe.row0 or bottom > self.stripe.row1:
            raise ValueError(f"rows {top}..{bottom} are outside the stripe {self.stripe.row0}..{self.stripe.row1}")
        return Window(window.col_off, top - self.stripe.row0, window.width, window.height)

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._stack is not None
        try:
            if exc_type is None:
                if self.stripe is not None:
                    if self._ds is not None:
                        self._finish_stripe()
                elif self.stripes:
                    self._publish_stripes()
                else:
                    self._finish()
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return bool(self._stack.__exit__(exc_type, exc, tb))

    def _finish(self) -> None:
        """Publish the scratch: its overviews averaged beside it, then copied and compressed."""
        try:
            self._ds.close()  # flushes the last blocks: a full disk can show here
            run, stem = self._final_tmp.parent, self._scratch.stem
            levels = self._build_overviews(lambda f: run / f"{stem}.ovr{f}.tif")
            self._publish(run / f"{stem}.vrt", [(self._scratch, 0)], {f: [(path, 0)] for f, path in levels})
        except _write_error_types() as err:
            self._raise_write_error(err)

    def _finish_stripe(self) -> None:
        """Close the stripe's scratch and average its overviews beside it; both stay for the publish."""
        try:
            self._ds.close()
            self._build_overviews(lambda f: self.stripe.file(self.dest, f))
        except _write_error_types() as err:
            self._raise_write_error(err)
        self._failed = False

    def _publish_stripes(self) -> None:
        """Publish the COG from the stripes' scratches and overviews (written by their own writers)."""
        levels = {f: [(s.file(self.dest, f), s.row0 // f) for s in self.stripes] for f in self._factors()}
        try:
            self._publish(Path(self.stripes[0].folder) / f"{self.dest.name}.stripes.vrt",
                          [(s.file(self.dest), s.row0) for s in self.stripes], levels)
        except _write_error_types() as err:
            self._raise_write_error(err)

    def _factors(self) -> list[int]:
        """The overview factors of the output (none without overviews)."""
        p = self.profile
        return overview_factors(p["width"], p["height"], self.blocksize) if self.overviews else []

    def _build_overviews(self, path_of: Callable[[int], Path]) -> list[tuple[int, Path]]:
        """Average the scratch's overviews (:func:`engine.geo.overviews.build_overviews`) into
        ``path_of(factor)`` for every factor; (factor, path) of each level."""
        import rasterio

        factors = self._factors()
        if not factors:
            return []
        paths = [path_of(f) for f in factors]
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(rasterio.open(self._scratch))
            levels = [stack.enter_context(rasterio.open(path, "w", **self._scratch_profile(f)))
                      for path, f in zip(paths, factors)]
            build_overviews(src, levels, factors, self.profile["nodata"])
        return list(zip(factors, paths))

    def _publish(self, vrt: Path, parts: Sequence[tuple[Path, int]],
                 levels: Mapping[int, Sequence[tuple[Path, int]]]) -> None:
        """Copy the mosaic of ``parts`` ((scratch, first row)) as the COG, with this writer's tags,
        band descriptions and colours, declaring ``levels`` (factor: its parts) as its overviews
        (so GDAL's COG driver copies and compresses them instead of computing its own)."""
        from rasterio.shutil import copy as rio_copy

        def mosaic(path: Path, level_parts: Sequence[tuple[Path, int]], factor: int = 1) -> Path:
            level = self._scratch_profile(factor)  # the whole output's (this writer has no stripe=)
            mosaic_vrt(path, level_parts, level["width"], level["height"], level["transform"])
            return path

        mosaic(vrt, parts)
        self._describe(vrt)
        level_vrts = [mosaic(vrt.with_name(f"{vrt.stem}.ovr{f}.vrt"), level_parts, f)
                      for f, level_parts in levels.items()]
        if level_vrts:
            vrt.write_text(with_overviews(vrt.read_text(), level_vrts))
        interruptible(rio_copy, vrt, self._final_tmp, **cog_options(self.blocksize, self.overviews))

    def _describe(self, path: Path) -> None:
        """Give the raster at ``path`` (a VRT) this writer's tags, band descriptions and colours."""
        import rasterio
        from rasterio.enums import ColorInterp

        with rasterio.open(path, "r+") as ds:
            if self.tags:
                ds.update_tags(**self.tags)
            for i, desc in enumerate(self.band_descriptions, start=1):
                ds.set_band_description(i, desc)
            if self.colorinterp:
                ds.colorinterp = [ColorInterp[name] for name in self.colorinterp]


def interruptible(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread, this thread waiting in short slices: a signal
    (Ctrl-C, SIGTERM) interrupts the wait at once, where it would wait for the end of one long
    GDAL call (the COG copy of a large output takes minutes) before Python saw it. An interrupted
    call runs on to its end in the background, writing into the run folder that the interrupt's
    clean-up removes: nothing reaches the destination. ``fn``'s own error is raised here."""
    import threading

    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = err

    worker = threading.Thread(target=call, name="diffusionsat-cog-publish", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _grid_of(grid: Optional[Grid], width: Optional[int], height: Optional[int], crs: Any, transform: Any) -> Grid:
    """The grid given whole, or built from its parts; not both, not neither."""
    parts = (width, height, crs, transform)
    if grid is not None:
        if any(p is not None for p in parts):
            raise TypeError("give the output's grid= or its width/height/crs/transform, not both")
        return grid
    if width is None or height is None or transform is None:
        raise TypeError("give the output's grid= (or width=, height=, transform= and crs=)")
    return Grid(crs, transform, int(width), int(height))


def write_cog(
    dest: str | os.PathLike,
    array: np.ndarray,
    *,
    crs: Any = None,
    transform: Any = None,
    grid: Optional[Grid] = None,
    tags: Optional[Mapping[str, Any]] = None,
    band_descriptions: Optional[Sequence[str]] = None,
    nodata: Optional[float] = None,
    colorinterp: Optional[Sequence[str]] = None,
) -> Path:
    """Write a whole (bands, rows, cols) array as a COG at ``dest``, atomically, on ``grid`` (or
    on ``crs`` and ``transform``, the array giving the size)."""
    if array.ndim == 2:
        array = array[None]
    count, height, width = array.shape
    if grid is None:
        grid = _grid_of(None, width, height, crs, transform)
    elif crs is not None or transform is not None:
        raise TypeError("give the output's grid= or its crs/transform, not both")
    if grid.shape != (height, width):
        raise ValueError(f"the array is {height}x{width} px, the grid {grid.height}x{grid.width} px")
    blocksize = 256 if max(width, height) > 256 else 128
    with CogWriter(
        dest,
        grid=grid,
        count=count,
        dtype=str(array.dtype),
        tags=tags,
        band_descriptions=band_descriptions,
        nodata=nodata,
        blocksize=blocksize,
        colorinterp=colorinterp,
    ) as out:
        out.write(array)
    return Path(dest)
