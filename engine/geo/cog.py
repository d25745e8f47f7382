"""Cloud-Optimized GeoTIFF output, written atomically.

Every raster the engine produces goes through here: it is written to a temporary file beside the
destination and renamed over it only when complete, so an interrupted run (Ctrl-C, a crash, a
cancelled job) leaves nothing at the destination and never a half-written file.

Large outputs are written window by window into a tiled scratch GeoTIFF (:class:`CogWriter`), then
converted to a COG (internal tiles, overviews, DEFLATE) in one ``CreateCopy``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from ..errors import RasterError

@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tif") -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder; rename it onto ``dest`` if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``dest`` is
    left as it was (absent, or the previous complete file).
    """
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise RasterError(
            f"output folder {str(folder)!r} does not exist; create it or choose another --out"
        )
    if not os.access(folder, os.W_OK):
        raise RasterError(f"output folder {str(folder)!r} is not writable; choose another --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial" + suffix, dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _cog_options(blocksize: int, overviews: bool) -> dict[str, Any]:
    return {
        "driver": "COG",
        "compress": "DEFLATE",
        "predictor": "2",
        "blocksize": blocksize,
        "overviews": "AUTO" if overviews else "NONE",
        "overview_resampling": "AVERAGE",
        "bigtiff": "IF_SAFER",
    }


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

        with CogWriter(dest, width=w, height=h, count=3, dtype="uint8", crs=crs,
                       transform=transform, tags=tags) as out:
            out.write(block, window)          # any number of windows, in any order
        # dest now exists and is a complete COG; on an exception nothing is at dest

    Peak memory is one block: pixels go to a tiled scratch GeoTIFF on disk, not into RAM.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        width: int,
        height: int,
        count: int,
        dtype: str,
        crs: Any,
        transform: Any,
        tags: Optional[Mapping[str, Any]] = None,
        band_descriptions: Optional[Sequence[str]] = None,
        nodata: Optional[float] = None,
        blocksize: int = 256,
        overviews: bool = True,
        colorinterp: Optional[Sequence[str]] = None,
    ) -> None:
        self.dest = Path(dest)
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
            self._final_tmp = self._stack.enter_context(atomic_path(self.dest))
            fd, scratch = tempfile.mkstemp(
                prefix=f".{self.dest.name}.", suffix=".scratch.tif", dir=self._final_tmp.parent
            )
            os.close(fd)
            self._scratch = Path(scratch)
            self._stack.callback(self._remove_scratch)
            self._ds = rasterio.open(self._scratch, "w", **self.profile)
        except BaseException:
            self._stack.__exit__(None, None, None)
            raise
        return self

    def _remove_scratch(self) -> None:
        if self._ds is not None and not self._ds.closed:
            self._ds.close()
        if self._scratch is not None:
            with contextlib.suppress(FileNotFoundError):
                self._scratch.unlink()

    def write(self, data: np.ndarray, window: Any = None) -> None:
        """Write ``data`` (bands, rows, cols) into ``window`` (a rasterio Window; None = all)."""
        if data.ndim == 2:
            data = data[None]
        self._ds.write(data.astype(self.profile["dtype"], copy=False), window=window)

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
        import rasterio
        from rasterio.enums import ColorInterp
        from rasterio.shutil import copy as rio_copy

        ds = self._ds
        if self.tags:
            ds.update_tags(**self.tags)
        for i, desc in enumerate(self.band_descriptions, start=1):
            ds.set_band_description(i, desc)
        if self.colorinterp:
            ds.colorinterp = [ColorInterp[name] for name in self.colorinterp]
        ds.close()
        try:
            rio_copy(self._scratch, self._final_tmp, **_cog_options(self.blocksize, self.overviews))
        except rasterio.errors.RasterioError as err:
            raise RasterError(f"could not write the COG {str(self.dest)!r}: {err}") from err


def write_cog(
    dest: str | os.PathLike,
    array: np.ndarray,
    *,
    crs: Any,
    transform: Any,
    tags: Optional[Mapping[str, Any]] = None,
    band_descriptions: Optional[Sequence[str]] = None,
    nodata: Optional[float] = None,
    colorinterp: Optional[Sequence[str]] = None,
) -> Path:
    """Write a whole (bands, rows, cols) array as a COG at ``dest``, atomically."""
    if array.ndim == 2:
        array = array[None]
    count, height, width = array.shape
    blocksize = 256 if max(width, height) > 256 else 128
    with CogWriter(
        dest,
        width=width,
        height=height,
        count=count,
        dtype=str(array.dtype),
        crs=crs,
        transform=transform,
        tags=tags,
        band_descriptions=band_descriptions,
        nodata=nodata,
        blocksize=blocksize,
        colorinterp=colorinterp,
    ) as out:
        out.write(array)
    return Path(dest)
