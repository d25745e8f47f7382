"""Masks: which pixels of an input raster to in-paint (or treat as invalid).

Every function returns a bool array on a target :class:`~engine.geo.grid.Grid` (the input
raster's CRS, transform and size, or a window of it) with True = masked (to in-paint / invalid).
Sources:

- a QA / classification / probability raster and a rule (:func:`engine.geo.mask_rules.parse_mask_rule`):
  bit fields (Landsat QA_PIXEL, Sentinel-2 QA60), class values (Sentinel-2 SCL, Fmask),
  thresholds (cloud probability). The rule is evaluated on the mask raster's own grid and only
  the boolean result is reprojected (nearest), so bit fields and class values are never
  interpolated.
- a vector layer (any OGR format, read with pyogrio), reprojected and rasterized.
- nodata of a raster or array.

:func:`dilate` grows a mask by a disk; :func:`feather` turns it into 0..1 blending weights with a
soft edge outside the mask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from ..errors import InvalidRequest, RasterError
from .grid import Grid
from .guard import inspect_vector, open_raster
from .mask_rules import MaskRule, parse_mask_rule
from .windows import parse_window

PathLike = Union[str, Path]

# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _no_overlap(what: str, path: PathLike, src_bounds: Sequence[float], src_crs: Any,
                grid: Grid) -> InvalidRequest:
    return InvalidRequest(
        f"the mask does not overlap the input raster: {what} {str(path)!r} covers "
        f"{tuple(round(v, 6) for v in src_bounds)} in {_crs_name(src_crs)}, the input raster "
        f"covers {tuple(round(v, 6) for v in grid.bounds)} in {_crs_name(grid.crs)}; "
        "check its CRS/extent"
    )


def _crs_name(crs: Any) -> str:
    if crs is None:
        return "no CRS"
    try:
        text = CRS.from_user_input(crs).to_string()
    except Exception:  # noqa: BLE001 -- only used for a message
        text = str(crs)
    return text if len(text) < 80 else text[:77] + "..."


def _intersect(a: Sequence[float], b: Sequence[float]) -> Optional[tuple[float, ...]]:
    left, bottom = max(a[0], b[0]), max(a[1], b[1])
    right, top = min(a[2], b[2]), min(a[3], b[3])
    if right <= left or top <= bottom:
        return None
    return left, bottom, right, top


def mask_from_raster(
    path: PathLike,
    rule: Union[str, MaskRule, None],
    target_grid: Any,
    *,
    band: int = 1,
    window: Any = None,
    resampling: str = "nearest",
    outside_ok: bool = False,
) -> np.ndarray:
    """A mask from a raster (QA bits, classes, probabilities, a 0/1 mask) in any CRS.

    The rule is evaluated on the mask raster's own pixels (only the part that covers the target),
    and the boolean result is reprojected onto the target grid, so bit fields and class values are
    never interpolated. Target pixels beyond the mask raster are not masked.

    Args:
        path: the mask raster.
        rule: see :func:`parse_mask_rule`; None means ``nonzero`` (a 0/1 mask raster).
        target_grid: the grid to produce the mask on (see :meth:`Grid.of <engine.geo.grid.Grid.of>`).
        band: band of the mask raster to read (1-based).
        window: only this window of the target grid (pixels).
        resampling: ``nearest`` (default), or ``max`` for a target coarser than the mask, which
            masks any target pixel that a masked mask pixel falls into.
        outside_ok: a target (window) the mask raster does not reach is all False instead of an
            error (for reading a mask window by window once :func:`check_raster_overlap` has
            checked the whole target).

    Returns:
        bool (height, width) on the target grid, True = masked.

    Raises:
        InvalidRequest: bad rule, or the mask raster does not overlap the target.
        RasterError: the file cannot be read.
    """
    mask_rule = parse_mask_rule(rule if rule is not None else "nonzero")
    grid = Grid.of(target_grid, window)
    if resampling not in ("nearest", "max"):
        raise InvalidRequest(f"resampling for masks must be nearest or max, not {resampling!r}")
    try:
        src = open_raster(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"cannot open mask raster {str(path)!r}: {exc}") from exc
    with src:
        if not 1 <= band <= src.count:
            raise InvalidRequest(f"{str(path)!r} has {src.count} band(s); band {band} asked")
        # A mask without a CRS is taken to be on the target's CRS (e.g. derived from it).
        src_crs = src.crs or grid.crs
        src_bounds = tuple(src.bounds)
        target_in_src = transform_bounds(grid.crs, src_crs, *grid.bounds, densify_pts=21)
        overlap = _intersect(src_bounds, target_in_src)
        if overlap is None:
            if outside_ok:
                return np.zeros(grid.shape, bool)
            raise _no_overlap("mask raster", path, src_bounds, src_crs, grid)
        tf = src.transform
        if tf.b == 0 and tf.d == 0:
            # read only what covers the target, plus a pixel of margin for the warper
            read_win = Grid(src_crs, tf, src.width, src.height).covering_window(overlap, margin=1)
        else:
            read_win = Window(0, 0, src.width, src.height)
        data = src.read(band, window=read_win)
        nodata = src.nodatavals[band - 1]
        src_tf = src.window_transform(read_win)
    masked = mask_rule(data, nodata).astype(np.uint8)
    out = np.zeros(grid.shape, np.uint8)
    reproject(
        source=masked,
        destination=out,
        src_transform=src_tf,
        src_crs=src_crs,
        dst_transform=grid.transform,
        dst_crs=grid.crs,
        resampling=Resampling[resampling],
    )
    return out.astype(bool)


def check_raster_overlap(path: PathLike, target_grid: Any) -> None:
    """Raise the "does not overlap" error unless the mask raster's extent meets the target's.

    Reads only the raster's header: the check for a whole target before it is masked window by
    window (``mask_from_raster(..., outside_ok=True)``).
    """
    grid = Grid.of(target_grid)
    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"cannot open mask raster {str(path)!r}: {exc}") from exc
    with src:
        src_crs = src.crs or grid.crs
        src_bounds = tuple(src.bounds)
    target_in_src = transform_bounds(grid.crs, src_crs, *grid.bounds, densify_pts=21)
    if _intersect(src_bounds, target_in_src) is None:
        raise _no_overlap("mask raster", path, src_bounds, src_crs, grid)


def _import_pyogrio() -> Any:
    try:
        import pyogrio  # noqa: PLC0415 -- optional dependency, needed only for vector masks
    except ImportError:
        raise RasterError(
            "reading vector masks needs the pyogrio package; install it with "
            "'pip install pyogrio'"
        ) from None
    return pyogrio


def vector_geometries(
    path: PathLike,
    target_grid: Any,
    layer: Union[str, int, None] = None,
    *,
    where: Optional[str] = None,
) -> np.ndarray:
    """The geometries of a vector layer that meet the target, in the target's CRS.

    Geometries are clipped to the target's extent (with a margin), densified (so that straight
    edges follow the curvature of the reprojection) and reprojected onto the target CRS. A layer
    without a CRS is taken to be in the target's CRS. Read once, they can be rasterized on any
    window of the target with :func:`rasterize_geometries`.

    Returns:
        a numpy array of shapely geometries (empty when none meets the target).

    Raises:
        InvalidRequest: the layer has no features.
        RasterError: the file cannot be read, or pyogrio is not installed.
    """
    import shapely  # noqa: PLC0415 -- keeps `import engine.geo.masks` light
    from pyproj import CRS as ProjCRS  # noqa: PLC0415
    from pyproj import Transformer  # noqa: PLC0415

    pyogrio = _import_pyogrio()
    grid = Grid.of(target_grid)
    info = _vector_info(path, layer)
    layer_crs = info.get("crs")
    src_crs = CRS.from_user_input(layer_crs) if layer_crs else grid.crs
    # The target's extent in the layer's CRS, with a margin so that reprojection curvature
    # never cuts off a geometry at the edge.
    tb = transform_bounds(grid.crs, src_crs, *grid.bounds, densify_pts=21)
    mx, my = 0.05 * (tb[2] - tb[0]), 0.05 * (tb[3] - tb[1])
    clip_box = (tb[0] - mx, tb[1] - my, tb[2] + mx, tb[3] + my)
    try:
        _, _, wkb, _ = pyogrio.raw.read(path, layer=layer, where=where, bbox=clip_box,
                                        columns=[], force_2d=True)
    except Exception as exc:
        raise RasterError(f"cannot read vector {str(path)!r}: {exc}") from exc
    geoms = shapely.from_wkb(wkb) if wkb is not None else np.array([], object)
    geoms = geoms[~(shapely.is_missing(geoms) | shapely.is_empty(geoms))]
    if len(geoms):
        geoms = shapely.clip_by_rect(geoms, *clip_box)
        geoms = geoms[~shapely.is_empty(geoms)]
    if not len(geoms):
        return geoms
    if CRS.from_user_input(src_crs) != grid.crs:
        # ~2 target pixels per segment, in layer units, so edges bend as they should
        px_src = (clip_box[2] - clip_box[0]) / max(grid.width, grid.height)
        geoms = shapely.segmentize(geoms, max(2 * px_src, 1e-12))
        transformer = Transformer.from_crs(ProjCRS.from_user_input(src_crs.to_wkt()),
                                           ProjCRS.from_user_input(grid.crs.to_wkt()),
                                           always_xy=True)

        def to_target(coords: np.ndarray) -> np.ndarray:
            x, y = transformer.transform(coords[:, 0], coords[:, 1])
            return np.column_stack([x, y])

        geoms = shapely.transform(geoms, to_target)
    return geoms[shapely.intersects(geoms, shapely.box(*grid.bounds))]


def _vector_info(path: PathLike, layer: Union[str, int, None]) -> dict:
    pyogrio = _import_pyogrio()
    path = inspect_vector(path)  # under a server's input policy: only plain vector formats inside its roots
    try:
        info = pyogrio.read_info(path, layer=layer, force_total_bounds=True)
    except Exception as exc:  # pyogrio raises its own DataSourceError/DataLayerError types
        raise RasterError(f"cannot read vector {str(path)!r}: {exc}") from exc
    if not info.get("features"):
        raise InvalidRequest(f"the vector layer {str(path)!r} has no features to mask with")
    return info


def vector_no_overlap(path: PathLike, target_grid: Any,
                      layer: Union[str, int, None] = None) -> InvalidRequest:
    """The "does not overlap" error for a vector layer and a target (to raise)."""
    grid = Grid.of(target_grid)
    info = _vector_info(path, layer)
    layer_crs = info.get("crs")
    total = info.get("total_bounds")
    bounds = tuple(total) if total is not None else ("?",) * 4
    return _no_overlap("vector layer", path, bounds,
                       CRS.from_user_input(layer_crs) if layer_crs else grid.crs, grid)


def rasterize_geometries(geoms: np.ndarray, target_grid: Any, *, window: Any = None,
                         all_touched: bool = True) -> np.ndarray:
    """Rasterize geometries (in the target's CRS) on the target grid or a window of it.

    Returns:
        bool (height, width), True where a geometry covers (or, with ``all_touched``, touches)
        the pixel; all False when none meets the window.
    """
    import shapely  # noqa: PLC0415
    from rasterio.features import rasterize  # noqa: PLC0415

    grid = Grid.of(target_grid, window)
    if len(geoms):
        geoms = geoms[shapely.intersects(geoms, shapely.box(*grid.bounds))]
    if not len(geoms):
        return np.zeros(grid.shape, bool)
    out = rasterize(((g, 1) for g in geoms), out_shape=grid.shape, transform=grid.transform,
                    fill=0, all_touched=all_touched, dtype="uint8")
    return out.astype(bool)


def mask_from_vector(
    path: PathLike,
    target_grid: Any,
    layer: Union[str, int, None] = None,
    *,
    where: Optional[str] = None,
    window: Any = None,
    all_touched: bool = True,
) -> np.ndarray:
    """A mask from vector geometries (any OGR format: GeoPackage, Shapefile, GeoJSON, ...).

    Geometries are clipped to the target's extent, densified, reprojected onto the target CRS
    (:func:`vector_geometries`) and rasterized (:func:`rasterize_geometries`); with
    ``all_touched`` every pixel a geometry touches is masked (erring towards in-painting more).
    A layer without a CRS is taken to be in the target's CRS. To mask a large raster window by
    window, read the geometries once with :func:`vector_geometries` and rasterize each window.

    Args:
        path: the vector file.
        target_grid: the grid to produce the mask on (see :meth:`Grid.of <engine.geo.grid.Grid.of>`).
        layer: layer name or index (default: the first layer).
        where: an attribute filter in the format's SQL dialect (e.g. ``"class = 'cloud'"``).
        window: only this window of the target grid (pixels).
        all_touched: mask every pixel touched (True) or only those whose centre is inside.

    Returns:
        bool (height, width) on the target grid, True = masked.

    Raises:
        InvalidRequest: the layer has no features, or none overlaps the target (window).
        RasterError: the file cannot be read, or pyogrio is not installed.
    """
    grid = Grid.of(target_grid, window)
    geoms = vector_geometries(path, grid, layer, where=where)
    if not len(geoms):
        raise vector_no_overlap(path, grid, layer)
    return rasterize_geometries(geoms, grid, all_touched=all_touched)


def mask_from_nodata(
    path_or_array: Union[PathLike, np.ndarray],
    nodata: Optional[float] = None,
    *,
    window: Any = None,
) -> np.ndarray:
    """Mask the pixels where any band is nodata.

    Args:
        path_or_array: a raster path, or an array (H, W) or (bands, H, W).
        nodata: the nodata value; for a file, None uses the file's own nodata value, alpha band
            or internal mask. NaN always counts as nodata.
        window: for a file, only this window (rasterio ``Window`` or ``((r0, r1), (c0, c1))``).

    Returns:
        bool (H, W), True = nodata in at least one band.
    """
    if isinstance(path_or_array, (str, Path)):
        try:
            src = open_raster(path_or_array)
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"cannot open {str(path_or_array)!r}: {exc}") from exc
        with src:
            win = None
            if window is not None:
                win = parse_window(window)
                Grid(src.crs, src.transform, src.width, src.height).subgrid(win)  # refuses a window outside
            data = src.read(window=win)
            out = np.zeros(data.shape[1:], bool)
            if nodata is None:
                # GDAL's per-band masks cover the nodata value, alpha bands and internal masks
                for i in range(src.count):
                    out |= src.read_masks(i + 1, window=win) == 0
    else:
        data = np.asarray(path_or_array)
        if data.ndim not in (2, 3):
            raise InvalidRequest(f"a nodata mask needs an (H, W) or (bands, H, W) array, "
                                 f"not shape {data.shape}")
        if data.ndim == 2:
            data = data[None]
        out = np.zeros(data.shape[1:], bool)
    if data.dtype.kind == "f":
        out |= ~np.isfinite(data).all(axis=0)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        out |= (data == nodata).any(axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Morphology
# ---------------------------------------------------------------------------------------------


def distance_to_mask(mask: np.ndarray, max_distance: float) -> np.ndarray:
    """Euclidean distance (pixels, centre to centre) from each pixel to the nearest True pixel.

    Exact up to ``max_distance``; farther pixels get ``ceil(max_distance) + 1``. Pure numpy,
    O(H * W * max_distance) work: a column pass for vertical distances, then a pass over
    horizontal offsets up to the cap (the separable exact distance transform, truncated).

    Returns:
        float32 array of ``mask``'s shape; 0 on the mask.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise InvalidRequest(f"a mask must be 2-D (H, W), not shape {mask.shape}")
    h, w = mask.shape
    cap = int(math.ceil(max(0.0, float(max_distance)))) + 1
    # vertical distance to the nearest True in the same column, capped
    vert = np.empty((h, w), np.int32)
    run = np.full(w, cap, np.int32)
    for r in range(h):
        run = np.where(mask[r], 0, np.minimum(run + 1, cap))
        vert[r] = run
    run = np.full(w, cap, np.int32)
    for r in range(h - 1, -1, -1):
        run = np.where(mask[r], 0, np.minimum(run + 1, cap))
        np.minimum(vert[r], run, out=vert[r])
    g2 = vert.astype(np.float32) ** 2
    d2 = g2.copy()
    # d²(r, c) = min over c' of (c - c')² + vert(r, c')²; offsets beyond the cap cannot give a
    # distance under the cap, so the loop stops there
    for dx in range(1, min(cap, w)):
        dx2 = np.float32(dx * dx)
        np.minimum(d2[:, dx:], g2[:, :-dx] + dx2, out=d2[:, dx:])
        np.minimum(d2[:, :-dx], g2[:, dx:] + dx2, out=d2[:, :-dx])
    return np.sqrt(np.minimum(d2, np.float32(cap * cap)))


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a mask by a disk of ``pixels`` pixels.

    A pixel joins the mask when its centre lies within ``pixels + 0.5`` pixel of a masked pixel's
    centre: 1 grows by a 3×3 square, 2 by a 5×5 square without its corners, and so on (a digital
    disk that reaches ``pixels`` whole pixels out in every direction).

    Returns:
        bool array of ``mask``'s shape.
    """
    mask = np.asarray(mask, bool)
    if pixels < 0:
        raise InvalidRequest(f"dilation must be 0 or more pixels, not {pixels}")
    if pixels == 0:
        return mask.copy()
    return distance_to_mask(mask, pixels + 0.5) <= pixels + 0.5


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Blending weights with a soft edge *outside* the mask.

    Weight 1 on the mask (those pixels are fully replaced), falling linearly with the distance d
    (pixels) from the mask as ``1 - d / (pixels + 1)``, to 0 from ``pixels + 1`` away: with 4,
    the neighbours at 1, 2, 3, 4 pixels get 0.8, 0.6, 0.4, 0.2.

    Returns:
        float32 array of ``mask``'s shape in 0..1.
    """
    mask = np.asarray(mask, bool)
    if pixels < 0:
        raise InvalidRequest(f"feathering must be 0 or more pixels, not {pixels}")
    if pixels == 0:
        return mask.astype(np.float32)
    d = distance_to_mask(mask, pixels + 1)
    return np.clip(1.0 - d / np.float32(pixels + 1), 0.0, 1.0).astype(np.float32)


__all__ = [
    "check_raster_overlap",
    "dilate",
    "distance_to_mask",
    "feather",
    "mask_from_nodata",
    "mask_from_raster",
    "mask_from_vector",
    "rasterize_geometries",
    "vector_geometries",
    "vector_no_overlap",
]
