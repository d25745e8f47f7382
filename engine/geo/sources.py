"""The rasters the tiled tasks read, window by window, onto their output grid.

:class:`RGBSource` (temporal frames, in-painting's input and references: any RGB-ish raster,
reprojected when needed, stretched to [0, 1]), :class:`S2Source` (a Sentinel-2 product, for
super-resolution) and :class:`MaskSource` (in-painting's mask: a raster rule, a vector file or the
input's nodata). Each is opened and checked once, before any model is loaded; ``read(window)``
then gives one window at a time, so memory does not grow with the raster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..errors import InvalidRequest, RasterError
from . import sentinel2 as s2
from .grid import Grid
from .guard import open_raster
from .mask_rules import parse_mask_rule
from .masks import (
    check_raster_overlap,
    dilate,
    mask_from_nodata,
    mask_from_raster,
    rasterize_geometries,
    vector_geometries,
    vector_no_overlap,
)
from .sentinel2_bands import MODEL_BANDS


def open_input(path: str):
    """An input raster opened for reading (through the input guard), with a one-line error if it cannot be."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RasterError(f"input {str(path)!r} does not exist")
    try:
        return open_raster(p)
    except rasterio.errors.RasterioIOError as err:
        raise RasterError(f"cannot read {str(path)!r} as a raster: {str(err).splitlines()[0]}") from err


def grid_of(path: str) -> Grid:
    """The pixel grid of a raster (which must have a CRS)."""
    with open_input(path) as src:
        if src.crs is None:
            raise RasterError(f"{path!r} has no CRS; assign one (gdal_edit.py -a_srs) and retry")
        return Grid(src.crs, src.transform, src.width, src.height)


def footprint_overlap(path: str, grid: Grid) -> float:
    """Fraction of ``grid``'s area that ``path``'s footprint covers (both in the grid's CRS)."""
    own = grid_of(path)
    west, south, east, north = transform_bounds(own.crs, grid.crs, *own.bounds, densify_pts=21)
    gw, gs, ge, gn = grid.bounds
    inter = max(0.0, min(east, ge) - max(west, gw)) * max(0.0, min(north, gn) - max(south, gs))
    area = (ge - gw) * (gn - gs)
    return inter / area if area > 0 else 0.0


def is_raster(path: Path) -> bool:
    """Whether ``path`` opens as a raster (vector formats are told by their suffix first)."""
    if path.suffix.lower() in (".gpkg", ".shp", ".geojson", ".json", ".kml", ".gml", ".fgb", ".sqlite"):
        return False
    try:
        with open_raster(path):
            return True
    except rasterio.errors.RasterioIOError:
        return False


# --------------------------------------------------------------------------------------------
# RGB inputs (temporal frames, in-painting)
# --------------------------------------------------------------------------------------------


def percentile_stretch(src, bands: Sequence[int], path: str) -> tuple[float, float]:
    """The 2nd and 98th percentiles of ``bands`` over the whole raster, measured on a decimated
    read (at most ~1024 px a side), so every window is stretched alike: no seams."""
    step = max(1, max(src.width, src.height) // 1024)
    data = src.read(list(bands), out_shape=(len(bands), max(1, src.height // step), max(1, src.width // step)),
                    masked=True)
    values = data.compressed() if np.ma.is_masked(data) else np.asarray(data).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InvalidRequest(f"{path!r} holds no valid pixels")
    lo, hi = np.percentile(values, [2, 98])
    return float(lo), float(hi if hi > lo else lo + 1)


class RGBSource:
    """An RGB(-ish) raster read onto a target grid (reprojected when needed), scaled to [0, 1].

    8-bit data is divided by 255; other types are stretched between the 2nd and 98th percentiles
    of the whole raster (:func:`percentile_stretch`, so every tile uses the same stretch).
    """

    def __init__(self, path: str, grid: Grid, bands: Sequence[int] = (1, 2, 3)) -> None:
        self.path = path
        self.src = open_input(path)
        if self.src.crs is None:
            raise RasterError(f"{path!r} has no CRS; assign one (gdal_edit.py -a_srs) and retry")
        if self.src.count < max(bands) or min(bands) < 1:
            raise InvalidRequest(
                f"{path!r} has {self.src.count} band(s); an RGB image (bands {', '.join(map(str, bands))}) is needed"
            )
        self.bands = list(bands)
        same = (self.src.crs == grid.crs and self.src.transform == grid.transform
                and self.src.width == grid.width and self.src.height == grid.height)
        self.ds = self.src if same else WarpedVRT(self.src, crs=grid.crs, transform=grid.transform,
                                                  width=grid.width, height=grid.height,
                                                  resampling=Resampling.bilinear)
        self.dtype = self.src.dtypes[self.bands[0] - 1]
        if self.dtype == "uint8":
            self.lo, self.hi = 0.0, 255.0
        else:
            self.lo, self.hi = percentile_stretch(self.src, self.bands, path)

    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        """(3, h, w) float32 in [0, 1] and a (h, w) validity mask."""
        data = self.ds.read(self.bands, window=window, out_dtype="float32", boundless=False)
        valid = (self.ds.read_masks(self.bands, window=window) > 0).all(axis=0) & np.isfinite(data).all(axis=0)
        return np.clip((data - self.lo) / (self.hi - self.lo), 0, 1), valid

    def close(self) -> None:
        if self.ds is not self.src:
            self.ds.close()
        self.src.close()


# --------------------------------------------------------------------------------------------
# Sentinel-2 products (super-resolution)
# --------------------------------------------------------------------------------------------


class S2Source:
    """A Sentinel-2 product (one multiband file, or band files / a SAFE folder) read by window."""

    def __init__(self, request) -> None:
        self.path = request.input
        self.request = request
        p = Path(request.input).expanduser()
        if not p.exists():
            raise RasterError(f"input {request.input!r} does not exist")
        self.is_folder = p.is_dir()
        if self.is_folder:
            g = s2.band_files_grid(p, 10, bands=MODEL_BANDS)
            crs, transform, width, height = g.crs, g.transform, g.width, g.height
        else:
            with open_input(request.input) as src:
                crs, transform, width, height = src.crs, src.transform, src.width, src.height
                if src.count < 10 and request.bands is None:
                    raise InvalidRequest(
                        f"{request.input!r} has {src.count} band(s); super-resolution needs the Sentinel-2 bands "
                        f"{', '.join(MODEL_BANDS)} (a 12/13-band file, or name the file's bands with --bands)"
                    )
        if crs is None:
            raise RasterError(f"{request.input!r} has no CRS; assign one (gdal_edit.py -a_srs) and retry")
        self.grid = Grid(crs, transform, width, height)

    def read(self, window):
        if self.is_folder:
            return s2.read_band_files(self.path, 10, bands=MODEL_BANDS, window=window,
                                      level=self.request.level, baseline=self.request.baseline)
        return s2.read_multiband(self.path, self.request.bands, window=window, level=self.request.level,
                                 baseline=self.request.baseline)


# --------------------------------------------------------------------------------------------
# In-painting masks
# --------------------------------------------------------------------------------------------


class MaskSource:
    """The in-painting mask of any window of the input grid: raster rule, vector, or nodata.

    Whether the mask meets the input at all is checked once, here, for the whole raster (before
    any model is loaded); windows the mask does not reach are simply unmasked.
    """

    def __init__(self, request, grid: Grid) -> None:
        self.request = request
        self.grid = Grid(grid.crs, grid.transform, grid.width, grid.height)
        self.kind = "nodata" if request.mask == "nodata" else None
        self.geoms = None
        if self.kind is None:
            path = Path(request.mask).expanduser()
            if not path.exists():
                raise InvalidRequest(f"mask {request.mask!r} does not exist; give a raster, a vector file or 'nodata'")
            self.kind = "raster" if is_raster(path) else "vector"
            if self.kind == "raster":
                self.rule = parse_mask_rule(request.mask_rule or "nonzero")
                check_raster_overlap(path, self.grid)
            else:
                if request.mask_rule:
                    raise InvalidRequest("--mask-rule applies to raster masks; a vector mask masks its polygons")
                # read once, in the input's CRS; every window is rasterized from these
                self.geoms = vector_geometries(path, self.grid)
                if not len(self.geoms):
                    raise vector_no_overlap(path, self.grid)
        self.pad = request.dilate

    def on(self, target) -> np.ndarray:
        """Bool mask on any target grid (e.g. a decimated view of the input), without dilation."""
        if self.kind == "nodata":
            if target.shape == self.grid.shape:
                return mask_from_nodata(self.request.input)
            return np.zeros(target.shape, bool)  # callers read nodata themselves on other grids
        if self.kind == "raster":
            return mask_from_raster(self.request.mask, self.rule, target, outside_ok=True)
        return rasterize_geometries(self.geoms, target)

    def read(self, window) -> np.ndarray:
        """Bool (h, w): True = in-paint. Dilation looks ``dilate`` px beyond the window."""
        p = self.pad
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        gr0, gc0 = max(0, r0 - p), max(0, c0 - p)
        gr1, gc1 = min(self.grid.height, r0 + h + p), min(self.grid.width, c0 + w + p)
        grown = Window(gc0, gr0, gc1 - gc0, gr1 - gr0)
        if self.kind == "nodata":
            m = mask_from_nodata(self.request.input, window=grown)
        elif self.kind == "raster":
            m = mask_from_raster(self.request.mask, self.rule, self.grid, window=grown, outside_ok=True)
        else:
            m = rasterize_geometries(self.geoms, self.grid, window=grown)
        if p:
            m = dilate(m, p)
        return m[r0 - gr0:r0 - gr0 + h, c0 - gc0:c0 - gc0 + w]
