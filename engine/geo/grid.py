"""One raster grid: CRS, transform, width and height, and the pixel maths every reader shares.

A :class:`Grid` is what every reader, mask, tiler and writer in :mod:`engine.geo` takes and
returns: the pixel grid of an input raster (or a window of it), of a mask, of a tile, of an
output. Like torchgeo's samples, the geo context travels with the data.

Units: ``transform`` maps pixel corners (col, row) to CRS coordinates (CRS units); ``width`` and
``height`` are pixels; bounds are ``(left, bottom, right, top)`` in CRS units; windows are
rasterio ``Window`` objects in pixels of the grid they belong to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as _window_bounds

from ..errors import InvalidRequest, RasterError
from ..metadata import ground_pixel_size, parse_crs, validate_bbox
from .guard import open_raster
from .windows import parse_window

#: Pixels of tolerance when bounds are turned into whole pixels: a bbox that sits on pixel edges
#: must not gain a sliver pixel from floating-point noise.
EDGE_EPS_PX = 1e-6


@dataclass(frozen=True)
class Grid:
    """A pixel grid.

    Attributes:
        crs: coordinate reference system (a rasterio ``CRS``; None for a raster without one).
        transform: affine transform, pixel corner -> CRS coordinates (CRS units).
        width, height: size in pixels.
    """

    crs: Any
    transform: Affine
    width: int
    height: int

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_raster(cls, path: Union[str, Path], window: Any = None) -> "Grid":
        """The grid of a raster file (or of a window of it, pixels), read through the input guard."""
        try:
            with open_raster(path) as src:
                grid = cls(src.crs, src.transform, src.width, src.height)
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"cannot open {str(path)!r}: {exc}") from exc
        return grid.subgrid(window) if window is not None else grid

    @classmethod
    def of(cls, obj: Any, window: Any = None) -> "Grid":
        """A grid from a Grid, a raster path, or anything with ``crs``, ``transform`` and
        ``width``/``height`` (or ``shape``), e.g. an open rasterio dataset or an S2Stack;
        ``window`` (pixels) takes a sub-grid of it."""
        if isinstance(obj, (str, Path)):
            return cls.from_raster(obj, window)
        if isinstance(obj, Grid):
            grid = obj
        elif isinstance(getattr(obj, "grid", None), Grid):
            grid = obj.grid
        else:
            try:
                if hasattr(obj, "width") and hasattr(obj, "height"):
                    width, height = obj.width, obj.height
                else:
                    height, width = obj.shape[-2:]
                crs = obj.crs if obj.crs is None or isinstance(obj.crs, CRS) else \
                    CRS.from_user_input(obj.crs)
                grid = cls(crs, obj.transform, int(width), int(height))
            except AttributeError:
                raise InvalidRequest(
                    f"{obj!r} is not a target grid; give a Grid, a raster path, or an "
                    "object with crs, transform, width and height"
                ) from None
        return grid.subgrid(window) if window is not None else grid

    # ---- geometry ----------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), pixels."""
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top), CRS units (the extent of all four corners)."""
        xs, ys = [], []
        for col, row in ((0, 0), (self.width, 0), (0, self.height), (self.width, self.height)):
            x, y = self.transform * (col, row)
            xs.append(x)
            ys.append(y)
        return min(xs), min(ys), max(xs), max(ys)

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a window of this grid, CRS units."""
        return _window_bounds(window, self.transform)

    def gsd_m(self) -> float:
        """Ground pixel size, metres: the geometric mean of the geodesic pixel width and height
        on the WGS84 ellipsoid (:func:`engine.metadata.ground_pixel_size`), so a geographic CRS
        (degrees) or Web Mercator gives metres on the ground too."""
        crs = self.crs.to_wkt() if hasattr(self.crs, "to_wkt") else self.crs
        gx, gy = ground_pixel_size(self.bounds, crs, self.width, self.height)
        return math.sqrt(gx * gy)

    # ---- derived grids -----------------------------------------------------------------------

    def subgrid(self, window: Any) -> "Grid":
        """The grid of a window (rasterio ``Window`` or ``((r0, r1), (c0, c1))``, pixels) inside
        this grid."""
        window = parse_window(window)
        col, row = int(window.col_off), int(window.row_off)
        width, height = int(window.width), int(window.height)
        if (col < 0 or row < 0 or width <= 0 or height <= 0 or col + width > self.width
                or row + height > self.height):
            raise InvalidRequest(
                f"window {window} is outside the target raster ({self.width} x {self.height})"
            )
        return Grid(self.crs, self.transform * Affine.translation(col, row), width, height)

    def scaled(self, factor: int) -> "Grid":
        """The same extent with pixels ``factor`` (a whole number >= 1) times smaller: same CRS,
        origin and bounds, pixel size (CRS units per px) divided by ``factor`` -- the output grid
        of a super-resolution by ``factor``."""
        if not isinstance(factor, (int, np.integer)) or factor < 1:
            raise InvalidRequest(f"factor must be a whole number >= 1, got {factor!r}")
        f = int(factor)
        return Grid(self.crs, self.transform * Affine.scale(1.0 / f), int(self.width) * f, int(self.height) * f)

    # ---- bounds -> pixels --------------------------------------------------------------------

    def _cover(self, bounds: Sequence[float], margin: int = 0) -> Optional[Window]:
        """Whole pixels covering ``bounds`` (this grid's CRS) plus ``margin`` px on every side,
        clipped to the grid; None if none."""
        left, bottom, right, top = map(float, bounds)
        inv = ~self.transform
        cols, rows = zip(*(inv * (x, y) for x, y in ((left, top), (right, top), (left, bottom), (right, bottom))))
        c0 = max(0, math.floor(min(cols) + EDGE_EPS_PX) - margin)
        r0 = max(0, math.floor(min(rows) + EDGE_EPS_PX) - margin)
        c1 = min(self.width, math.ceil(max(cols) - EDGE_EPS_PX) + margin)
        r1 = min(self.height, math.ceil(max(rows) - EDGE_EPS_PX) + margin)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0)

    def covering_window(self, bounds: Sequence[float], crs: Any = None, *, margin: int = 0) -> Window:
        """The smallest whole-pixel window covering ``bounds`` (left, bottom, right, top), clipped
        to the grid.

        ``crs`` is the CRS of ``bounds`` (default: this grid's); other CRSs are reprojected with a
        densified boundary. Bounds on pixel edges (within :data:`EDGE_EPS_PX`) take no sliver
        pixel beyond them. ``margin`` adds that many pixels on every side (still clipped), e.g. for
        a warper that samples beyond the bounds.

        Raises:
            InvalidRequest: the bounds do not overlap the grid.
        """
        if crs is not None and self.crs is not None and CRS.from_user_input(crs) != self.crs:
            bounds = transform_bounds(crs, self.crs, *bounds, densify_pts=21)
        win = self._cover(bounds, int(margin))
        if win is None:
            raise InvalidRequest(
                f"bounds {tuple(bounds)} do not overlap the raster (its bounds are "
                f"{self.bounds}); check the CRS of the bounds"
            )
        return win

    def subset(self, bbox: Optional[Sequence[float]], bbox_crs: Optional[str]) -> tuple["Grid", Window]:
        """The whole pixels of this grid covering ``bbox`` (in ``bbox_crs``, default the grid's
        CRS): ``(sub-grid, its window)``; the whole grid when ``bbox`` is None. The messages name
        the CLI's ``--bbox``/``--crs``."""
        if bbox is None:
            return self, Window(0, 0, self.width, self.height)
        if not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
            raise InvalidRequest(f"--bbox {tuple(bbox)} is not minx, miny, maxx, maxy with min < max; "
                                 "give the lower-left corner first")
        if bbox_crs:
            validate_bbox(bbox, parse_crs(bbox_crs))
            bbox = transform_bounds(bbox_crs, self.crs, *bbox, densify_pts=21)
        win = self._cover(bbox)
        if win is None:
            raise InvalidRequest(
                f"--bbox {tuple(round(v, 6) for v in bbox)} does not overlap the input raster "
                f"(bounds {tuple(round(v, 6) for v in self.bounds)} in its CRS); check the bbox and --crs"
            )
        return self.subgrid(win), win


__all__ = ["EDGE_EPS_PX", "Grid"]
