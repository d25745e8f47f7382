"""Cloud-Optimized GeoTIFF output, written atomically.

Every raster the engine produces goes through here: it is written to a temporary file beside the
destination and renamed over it only when complete, so an interrupted run (Ctrl-C, SIGTERM, a crash,
a cancelled job) leaves nothing at the destination and never a half-written file.

All scratch of one write (the temporary output, the tiled scratch GeoTIFF, the tiling
accumulator) lives in one hidden run folder beside the destination, ``.diffusionsat-run-<pid>-*``,
removed on every exit path; the process id in its name (and in its ``pid`` file) lets the next run
in the same folder remove the folders of runs that were killed (SIGKILL, power loss). A full disk
becomes :class:`~engine.errors.DiskFull`, naming the folder and the space needed, with nothing left
behind. The output gets the user's umask, as any GIS tool's does.

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
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from ..atomic import atomic_path as atomic_file
from ..atomic import disk_full, is_disk_full
from ..errors import RasterError
from .grid import Grid
from .overviews import cog_options, with_overviews, build_overviews, overview_factors

#: Hidden run folders beside outputs: ``.diffusionsat-run-<pid>-<random>``.
RUN_PREFIX = ".diffusionsat-run-"
_RUN_NAME = re.compile(r"^\.diffusionsat-run-(\d+)-")
_RUN_DIR: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("diffusionsat_run_dir", default=None)


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


def active_run_dir() -> Optional[Path]:
    """The run folder of the innermost write in progress in this thread, if any (tiling puts its
    accumulator there, so one folder holds all scratch of a run)."""
    return _RUN_DIR.get()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or unknown: keep its folder
    return True


def sweep_stale_runs(folder: str | os.PathLike) -> int:
    """Remove run folders in ``folder`` left by processes of this machine that are gone.

    The pid comes from the folder name (and the host from its ``pid`` file, so that a folder on a
    shared file system is only removed by the machine that made it). Returns how many were removed.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    host = socket.gethostname()
    for entry in entries:
        m = _RUN_NAME.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        try:
            owner = (Path(entry.path) / "pid").read_text().split()
        except (OSError, UnicodeDecodeError):
            owner = []
        if len(owner) >= 2 and owner[1] != host:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def run_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden run folder in ``folder`` (made after removing stale ones), removed on exit."""
    folder = Path(folder)
    sweep_stale_runs(folder)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(folder, None, "a scratch folder") from None
        raise RasterError(f"cannot create a scratch folder in {str(folder)!r} ({err.strerror}); choose "
                          "another --out") from None
    token = _RUN_DIR.set(path)
    try:
        try:
            (path / "pid").write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(folder, None, "a scratch folder") from None
            raise
        yield path
    finally:
        _RUN_DIR.reset(token)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tif") -> Iterator[Path]:
    """Yield a temporary path (in a hidden run folder in ``dest``'s folder); rename it onto
    ``dest`` if the block succeeds.

    The temporary path does not exist yet: whoever writes it creates it, with the user's umask.
    On any exception (including KeyboardInterrupt) the run folder is removed and ``dest`` is left
    as it was (absent, or the previous complete file).
    """
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise RasterError(
            f"output folder {str(folder)!r} does not exist; create it or choose another --out"
        )
    if not os.access(folder, os.W_OK):
        raise RasterError(f"output folder {str(folder)!r} is not writable; choose another --out")
    with run_folder(folder) as run, atomic_file(dest, suffix, tmp_dir=run) as tmp_path:
        yield tmp_path


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
    ) -> None:
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

    def __enter__(self) -> "CogWriter":
        import rasterio

        self._stack = contextlib.ExitStack()
        try:
            # rasterio's error handler for the whole write: GDAL's messages become log records
            # (the CLI keeps them quiet) and exceptions, instead of raw lines on stderr.
            self._stack.enter_context(rasterio.Env())
            quiet_libtiff()
            self._final_tmp = self._stack.enter_context(atomic_path(self.dest))
            self._scratch = self._final_tmp.parent / (self.dest.stem + ".scratch.tif")
            self._stack.callback(self._remove_scratch)
            try:
                self._ds = rasterio.open(self._scratch, "w", **self.profile)
            except _write_error_types() as err:
                self._raise_write_error(err)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    @property
    def scratch_dir(self) -> Optional[Path]:
        """The run folder holding this write's scratch (None outside the ``with`` block)."""
        return self._final_tmp.parent if self._stack is not None else None

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
        if self._scratch is not None:
            with contextlib.suppress(FileNotFoundError):
                self._scratch.unlink()

    def write(self, data: np.ndarray, window: Any = None) -> None:
        """Write ``data`` (bands, rows, cols) into ``window`` (a rasterio Window; None = all)."""
        if data.ndim == 2:
            data = data[None]
        try:
            self._ds.write(data.astype(self.profile["dtype"], copy=False), window=window)
        except _write_error_types() as err:
            self._raise_write_error(err)

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._stack is not None
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return bool(self._stack.__exit__(exc_type, exc, tb))

    def _finish(self) -> None:
        from rasterio.enums import ColorInterp
        from rasterio.shutil import copy as rio_copy

        ds = self._ds
        try:
            if self.tags:
                ds.update_tags(**self.tags)
            for i, desc in enumerate(self.band_descriptions, start=1):
                ds.set_band_description(i, desc)
            if self.colorinterp:
                ds.colorinterp = [ColorInterp[name] for name in self.colorinterp]
            ds.close()  # flushes the last blocks: a full disk can show here
            source = self._scratch_with_overviews() if self.overviews else self._scratch
            rio_copy(source, self._final_tmp, **cog_options(self.blocksize, self.overviews))
        except _write_error_types() as err:
            self._raise_write_error(err)

    def _scratch_with_overviews(self) -> Path:
        """Average the scratch's overviews (:func:`engine.geo.overviews.build_overviews`) and return a VRT of the
        scratch that declares them, for the COG driver to copy; the scratch itself if the raster
        fits in one block (no overviews)."""
        import rasterio
        from rasterio.shutil import copy as rio_copy

        p = self.profile
        factors = overview_factors(p["width"], p["height"], self.blocksize)
        if not factors:
            return self._scratch
        run = self._scratch.parent
        paths = [run / f"{self._scratch.stem}.ovr{f}.tif" for f in factors]
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(rasterio.open(self._scratch))
            levels = []
            for path, f in zip(paths, factors):
                profile = dict(p, width=math.ceil(p["width"] / f), height=math.ceil(p["height"] / f),
                               transform=p["transform"] * p["transform"].scale(f) if p["transform"] else None)
                levels.append(stack.enter_context(rasterio.open(path, "w", **profile)))
            build_overviews(src, levels, factors, p["nodata"])
        vrt = run / f"{self._scratch.stem}.vrt"
        rio_copy(self._scratch, vrt, driver="VRT")
        vrt.write_text(with_overviews(vrt.read_text(), paths))
        return vrt


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
