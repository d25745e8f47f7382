"""Sentinel-2 readers: a multiband GeoTIFF, a ``.SAFE`` product, or loose per-band JP2/GeoTIFF files
read window by window onto one :class:`~engine.geo.grid.Grid`.

:func:`read_multiband` / :func:`read_band_files` read the bands (only the window asked for) onto
one grid, resampling 20 m and 60 m bands onto the 10 m grid, and record the product level
(L1C/L2A) and processing baseline found in the product (or stated by the user);
:func:`band_files_grid` gives the grid of a product without reading pixels. The band table, the
product level/baseline rules and the radiometry the model expects
(:func:`~engine.geo.sentinel2_bands.to_model_input`) are in :mod:`engine.geo.sentinel2_bands`.

Nodata convention: an :class:`S2Stack` holds nodata as NaN (whatever the file used: the dataset
nodata value, DN 0 -- Sentinel-2's own no-data value -- or NaN), and ``valid`` says which pixels
are usable. The caller restores nodata in the output from the ``valid`` mask that
:func:`~engine.geo.sentinel2_bands.to_model_input` returns.

Over 500 lines because the two readers share the stack, the band-file scan and the grid they
read onto; split, each half would import the other's private helpers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from ..errors import InvalidRequest, RasterError
from .grid import Grid
from .guard import open_raster
from .sentinel2_bands import (
    BANDS,
    BASELINE_04_OFFSET_DN,
    L1C_ORDER,
    L2A_ORDER,
    MODEL_BANDS,
    canonical_band_name,
    is_band_name,
    merge_info,
    parse_baseline,
    parse_level,
    product_info_from_mtd,
    product_info_from_name,
    product_info_from_tags,
    resolve_offset,
    scale_offset_dn,
)
from .windows import parse_window

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------


@dataclass
class S2Stack:
    """Sentinel-2 bands on one grid, as read from the product (no radiometric change yet).

    Attributes:
        array: float32 (bands, H, W), digital numbers as stored in the product (including the
            +1000 offset of baseline >= 04.00 when ``offset_applied``); NaN where nodata.
        bands: canonical band names of ``array``'s first axis, in order.
        grid: the pixel grid of ``array`` (CRS, transform, width, height); ``crs`` and
            ``transform`` read from it.
        valid: bool (H, W), True where every band in the stack holds data.
        level: ``"L1C"``, ``"L2A"`` or None when unknown.
        baseline: processing baseline ``"NN.NN"`` or None when unknown.
        offset_applied: True when the DNs include the baseline >= 04.00 offset, which
            :func:`~engine.geo.sentinel2_bands.to_model_input` removes.
        offset_dn: size of that offset, DN (1000 for every baseline so far).
        source: where the stack came from (for messages and provenance tags).
    """

    array: np.ndarray
    bands: tuple[str, ...]
    grid: Grid
    valid: np.ndarray
    level: Optional[str] = None
    baseline: Optional[str] = None
    offset_applied: bool = False
    offset_dn: float = BASELINE_04_OFFSET_DN
    source: str = ""

    def __post_init__(self) -> None:
        if self.array.ndim == 3 and self.array.shape[0] and self.array.shape[1:] != self.grid.shape:
            raise ValueError(f"the stack's array is {self.array.shape[1:]} px, its grid {self.grid.shape} px")

    @property
    def crs(self) -> Optional[CRS]:
        """Coordinate reference system of the grid."""
        return self.grid.crs

    @property
    def transform(self) -> Affine:
        """Affine transform of the grid (pixel corner -> CRS coordinates, CRS units)."""
        return self.grid.transform

    @property
    def height(self) -> int:
        """Rows, pixels."""
        return int(self.array.shape[1])

    @property
    def width(self) -> int:
        """Columns, pixels."""
        return int(self.array.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W), pixels."""
        return self.height, self.width

    def band(self, name: str) -> np.ndarray:
        """The (H, W) DN array of one band, by any accepted spelling of its name."""
        canon = canonical_band_name(name)
        if canon not in self.bands:
            raise InvalidRequest(
                f"band {canon} is not in this stack; it holds {', '.join(self.bands)}"
            )
        return self.array[self.bands.index(canon)]


def _to_float_with_nan(
    data: np.ndarray, nodata: Optional[float], zero_is_nodata: bool
) -> np.ndarray:
    """Cast to float32 with every nodata pixel set to NaN (never a real value)."""
    out = data.astype(np.float32, copy=True)
    bad = ~np.isfinite(out)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        bad |= data == nodata
    if zero_is_nodata:
        bad |= data == 0
    out[bad] = np.nan
    return out


def _valid_from(array: np.ndarray) -> np.ndarray:
    return np.isfinite(array).all(axis=0)




def _check_window(window: Window, width: int, height: int) -> Window:
    if (window.col_off < 0 or window.row_off < 0 or window.width <= 0 or window.height <= 0
            or window.col_off + window.width > width or window.row_off + window.height > height):
        raise InvalidRequest(
            f"window {window} is outside the raster ({width} x {height} pixels)"
        )
    return window


# ---------------------------------------------------------------------------------------------
# Reader: one multiband file
# ---------------------------------------------------------------------------------------------


def _parse_band_list(bands: Union[str, Sequence[str], None]) -> Optional[list[Optional[str]]]:
    """Band names for the file's bands in order; ``-`` skips a band (e.g. an alpha band)."""
    if bands is None:
        return None
    items = bands.split(",") if isinstance(bands, str) else list(bands)
    out: list[Optional[str]] = []
    for item in items:
        item = str(item).strip()
        out.append(None if item in ("-", "_", "") else canonical_band_name(item))
    named = [b for b in out if b]
    dupes = sorted({b for b in named if named.count(b) > 1})
    if dupes:
        raise InvalidRequest(f"--bands names {', '.join(dupes)} more than once")
    return out


def read_multiband(
    path: PathLike,
    bands: Union[str, Sequence[str], None] = None,
    window: Any = None,
    *,
    bounds: Optional[Sequence[float]] = None,
    level: Optional[str] = None,
    baseline: Any = None,
    zero_is_nodata: bool = True,
) -> S2Stack:
    """Read a multiband Sentinel-2 raster (all bands already on one grid) into an :class:`S2Stack`.

    Args:
        path: the raster (GeoTIFF, VRT, anything GDAL reads).
        bands: the names of the file's bands in order (a list or ``"B01,B02,...,B12"``); ``-``
            skips a band. If None: the band descriptions when they are all band names, else the
            standard order when the file has 13 bands (L1C) or 12 bands (L2A without B10).
        window: only this window is read (rasterio ``Window`` or ``((r0, r1), (c0, c1))``,
            pixels).
        bounds: alternatively, only the whole pixels covering (left, bottom, right, top) in the
            raster's CRS units are read.
        level: ``"L1C"``/``"L2A"`` when known to the user; overrides what the file says.
        baseline: processing baseline (``"04.00"``, ``"N0400"``...) when known to the user;
            overrides what the file says and alone decides whether the +1000 offset is present.
        zero_is_nodata: DN 0 is Sentinel-2's no-data value; set False for data where 0 is a
            real value (e.g. products already converted by another tool).

    Raises:
        InvalidRequest: the band names cannot be determined, or do not match the band count.
        RasterError: the file cannot be read.
    """
    names = _parse_band_list(bands)
    try:
        src = open_raster(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"cannot open {str(path)!r}: {exc}") from exc
    with src:
        if names is None:
            names = _names_from_file(src)
        elif len(names) != src.count:
            raise InvalidRequest(
                f"{str(path)!r} has {src.count} bands but --bands names {len(names)}; give one "
                "name per band in file order (use - to skip a band)"
            )
        if bounds is not None:
            if window is not None:
                raise InvalidRequest("give either a window or bounds, not both")
            if src.transform.b != 0 or src.transform.d != 0:
                raise RasterError("rotated rasters are not supported; warp the input to a north-up grid")
            win = Grid.of(src).covering_window(bounds)
        else:
            win = parse_window(window)
        if win is not None:
            win = _check_window(win, src.width, src.height)
        indexes = [i + 1 for i, n in enumerate(names) if n is not None]
        planes = []
        for idx in indexes:
            data = src.read(idx, window=win)
            planes.append(_to_float_with_nan(data, src.nodatavals[idx - 1], zero_is_nodata))
        array = np.stack(planes) if planes else np.empty((0, 0, 0), np.float32)
        grid = Grid.of(src)
        grid = grid.subgrid(win) if win is not None else grid
        tag_info = product_info_from_tags({**src.tags(), **src.tags(1)})
        scale_dn = scale_offset_dn(src.scales, src.offsets)
        if scale_dn is not None:
            tag_info.setdefault("add_offset", scale_dn)
    mtd_info = _find_mtd_near(Path(path))
    info = merge_info(mtd_info, tag_info, product_info_from_name(str(Path(path).resolve())))
    return _make_stack(array, tuple(n for n in names if n), grid, info, level, baseline, str(path))


_BAND_TOKEN_RE = re.compile(r"^B(0?[1-9]|1[0-2]|0?8A)$", re.IGNORECASE)


def _band_from_label(label: Optional[str]) -> Optional[str]:
    """A band name from a band description or BANDNAME tag: ``"B04"``, ``"b8a"``, or the
    first B-prefixed token of a longer label (GDAL's SENTINEL2 driver writes
    ``"B4, central wavelength 665 nm"``)."""
    if not label:
        return None
    if is_band_name(label):
        return canonical_band_name(label)
    for token in re.split(r"[\s,;:()\[\]/]+", label):
        if _BAND_TOKEN_RE.match(token):
            return canonical_band_name(token)
    return None


def _names_from_file(src: Any) -> list[Optional[str]]:
    for labels in (list(src.descriptions or ()),
                   [src.tags(i).get("BANDNAME") for i in range(1, src.count + 1)]):
        names = [_band_from_label(d) for d in labels]
        if names and all(names) and len(set(names)) == len(names):
            return names
    if src.count == 13:
        return list(L1C_ORDER)
    if src.count == 12:
        return list(L2A_ORDER)
    # An example of the file's own band count: the 10 bands the model reads, in band order.
    example = ",".join(sorted(MODEL_BANDS, key=L1C_ORDER.index)) if src.count == 10 else "B02,B03,B04,B08"
    raise InvalidRequest(
        f"{src.name!r} has {src.count} bands and their descriptions are not band names, so the "
        "Sentinel-2 band of each cannot be known; pass --bands with one name per band in file "
        f"order, e.g. --bands {example} (use - to skip a band)"
    )


def _find_mtd_near(path: Path) -> dict[str, Any]:
    """Product MTD XML of the SAFE folder that contains ``path``, if any.

    Ancestors are searched only up to the SAFE root (a ``*.SAFE`` folder or one holding
    ``GRANULE``), so a loose file never picks up an unrelated product's metadata higher up.
    """
    start = path if path.is_dir() else path.parent
    dirs = [start, *start.resolve().parents][:6]
    safe_root = next((d for d in dirs
                      if d.suffix.upper() == ".SAFE" or (d / "GRANULE").is_dir()), None)
    for folder in [start] + ([safe_root] if safe_root is not None else []):
        for pattern in ("MTD_MSIL*.xml", "*MTD_SAFL*.xml"):
            for xml in sorted(folder.glob(pattern)):
                return product_info_from_mtd(xml)
    return {}


def _make_stack(
    array: np.ndarray,
    names: tuple[str, ...],
    grid: Grid,
    info: Mapping[str, Any],
    level: Optional[str],
    baseline: Any,
    source: str,
) -> S2Stack:
    user_level = parse_level(level)
    user_baseline = parse_baseline(baseline)
    offset_applied, offset_dn = resolve_offset(user_baseline, info)
    return S2Stack(
        array=array,
        bands=names,
        grid=grid,
        valid=_valid_from(array),
        level=user_level or info.get("level"),
        baseline=user_baseline or info.get("baseline"),
        offset_applied=offset_applied,
        offset_dn=offset_dn,
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Reader: one file per band (SAFE products, loose JP2/GeoTIFF files)
# ---------------------------------------------------------------------------------------------

_RASTER_SUFFIXES = (".jp2", ".tif", ".tiff", ".vrt")
_TOKEN_SPLIT = re.compile(r"[_\-.\s]+")
_RES_TOKEN = re.compile(r"^(\d+)m$", re.IGNORECASE)


def band_from_filename(path: PathLike) -> Optional[str]:
    """The band a per-band file holds, from its name (``..._B04.jp2``, ``..._B8A_20m.jp2``,
    ``B04.tif``); None when the name names no band (``_TCI_``, ``_SCL_``, ...)."""
    tokens = _TOKEN_SPLIT.split(Path(path).stem)
    found = [t for t in tokens if re.fullmatch(r"B(0?[1-9]|1[0-2]|0?8A)", t, re.IGNORECASE)]
    return canonical_band_name(found[-1]) if found else None


def _list_band_files(paths_or_folder: Union[PathLike, Sequence[PathLike]]) -> tuple[
        list[Path], dict[str, Any]]:
    """Candidate band files and what the folder layout says about the product."""
    hints: dict[str, Any] = {}
    if isinstance(paths_or_folder, (str, Path)):
        root = Path(paths_or_folder)
        if not root.exists():
            raise RasterError(f"{str(root)!r} does not exist")
        if root.is_dir():
            granules = sorted(p for p in (root / "GRANULE").glob("*") if p.is_dir())
            if len(granules) > 1:
                raise InvalidRequest(
                    f"{str(root)!r} holds {len(granules)} granules "
                    f"({', '.join(g.name for g in granules)}); pass the folder of one of them"
                )
            if granules:
                search_root = granules[0] / "IMG_DATA"
            elif (root / "IMG_DATA").is_dir():
                search_root = root / "IMG_DATA"
            else:
                search_root = root
            # Only IMG_DATA is searched recursively: QI_DATA and AUX_DATA hold rasters
            # (masks, previews) that are not bands.
            recursive = search_root.name == "IMG_DATA"
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in search_root.glob(pattern)
                           if p.is_file() and p.suffix.lower() in _RASTER_SUFFIXES)
            if recursive and (search_root / "R10m").is_dir():
                hints["level"] = "L2A"  # only L2A splits IMG_DATA by resolution
        else:
            files = [root]
    else:
        files = [Path(p) for p in paths_or_folder]
        for p in files:
            if not p.is_file():
                raise RasterError(f"{str(p)!r} does not exist or is not a file")
    return files, hints


def _pick_native(band: str, candidates: list[tuple[Path, float]]) -> tuple[Path, float]:
    """L2A stores most bands at several resolutions; the native one has the true detail."""
    native = BANDS[band].gsd_m
    for path, res in candidates:
        if abs(res - native) < 1e-6 * native:
            return path, res
    return min(candidates, key=lambda pr: pr[1])


def read_band_files(
    paths_or_folder: Union[PathLike, Sequence[PathLike]],
    target_gsd: float = 10,
    bounds: Optional[Sequence[float]] = None,
    *,
    bands: Optional[Sequence[str]] = None,
    window: Any = None,
    level: Optional[str] = None,
    baseline: Any = None,
    resampling: str = "bilinear",
    zero_is_nodata: bool = True,
) -> S2Stack:
    """Read per-band Sentinel-2 files onto one grid at ``target_gsd``.

    The grid is that of the finest band found (the 10 m bands of a product), at ``target_gsd``
    CRS units (metres for UTM) per pixel with the same origin; coarser bands (20 m, 60 m) are
    resampled onto it with ``resampling`` so that pixel centres line up on the ground. Bands
    already on the grid are read as stored, without resampling.

    Args:
        paths_or_folder: a ``.SAFE`` folder (L1C: ``GRANULE/*/IMG_DATA/*_B??.jp2``; L2A:
            ``IMG_DATA/R10m|R20m|R60m``, each band taken at its native resolution), a granule or
            ``IMG_DATA`` folder, a folder of loose files whose names contain the band name
            (``T33TTG_20210615T101031_B8A_20m.jp2``, ``B04.tif``), or a list of such files.
        target_gsd: output pixel size, CRS units (metres).
        bounds: only the whole output pixels covering (left, bottom, right, top), in the CRS of
            the finest band, are read.
        bands: read only these bands (e.g. :data:`MODEL_BANDS`); default every band found.
        window: alternatively, a window (pixels) of the output grid.
        level, baseline: stated by the user; override what the product says.
        resampling: rasterio resampling name for bands not on the grid (bilinear suits
            reflectance).
        zero_is_nodata: DN 0 is Sentinel-2's no-data value.

    Raises:
        InvalidRequest: no band files found, a requested band is missing, bounds/window outside.
        RasterError: a file cannot be read.
    """
    hints, candidates, grid_of = _scan_band_files(paths_or_folder)
    chosen = {b: _pick_native(b, c) for b, c in candidates.items()}
    wanted = [canonical_band_name(b) for b in bands] if bands is not None else [
        b for b in L1C_ORDER if b in chosen]
    missing = [b for b in wanted if b not in chosen]
    if missing:
        raise InvalidRequest(
            f"band(s) {', '.join(missing)} not found in {paths_or_folder!s}; found "
            f"{', '.join(b for b in L1C_ORDER if b in chosen)}"
        )

    grid = _band_grid(chosen, wanted, grid_of, target_gsd)
    if bounds is not None:
        if window is not None:
            raise InvalidRequest("give either a window or bounds, not both")
        win = grid.covering_window(bounds)
    else:
        win = parse_window(window)
    if win is not None:
        grid = grid.subgrid(_check_window(win, grid.width, grid.height))

    try:
        method = Resampling[resampling]
    except KeyError:
        raise InvalidRequest(
            f"resampling {resampling!r} is not known; use e.g. bilinear, cubic, nearest, average"
        ) from None

    planes = []
    tag_info: dict[str, Any] = {}
    for band in wanted:
        path = chosen[band][0]
        with open_raster(path) as src:
            planes.append(_read_on_grid(src, grid, method, zero_is_nodata))
            for k, v in product_info_from_tags(src.tags()).items():
                tag_info.setdefault(k, v)
    array = np.stack(planes)

    first = chosen[wanted[0]][0]
    mtd_info = _find_mtd_near(Path(paths_or_folder) if isinstance(paths_or_folder, (str, Path))
                              else first)
    name_info = product_info_from_name(str(first.resolve()))
    info = merge_info(mtd_info, tag_info, name_info, hints)
    return _make_stack(array, tuple(wanted), grid, info, level, baseline, str(paths_or_folder))


def _band_grid(chosen, wanted, grid_of, target_gsd: float) -> Grid:
    """The output grid: the finest band's footprint at ``target_gsd``, same origin."""
    ref_path = min((chosen[b] for b in wanted), key=lambda pr: pr[1])[0]
    ref = grid_of[ref_path]
    if ref.transform.b != 0 or ref.transform.d != 0:
        raise RasterError("rotated rasters are not supported; warp the input to a north-up grid")
    left, bottom, right, top = ref.bounds
    gsd = float(target_gsd)
    if not gsd > 0:
        raise InvalidRequest(f"target_gsd must be a positive pixel size in metres, got {target_gsd}")
    return Grid(ref.crs, Affine(gsd, 0.0, left, 0.0, -gsd, top),
                max(1, int(round((right - left) / gsd))), max(1, int(round((top - bottom) / gsd))))


def _scan_band_files(paths_or_folder):
    """(hints, band -> [(path, pixel size)], path -> its Grid) of band files."""
    files, hints = _list_band_files(paths_or_folder)
    candidates: dict[str, list[tuple[Path, float]]] = {}
    grid_of: dict[Path, Grid] = {}
    for path in files:
        band = band_from_filename(path)
        if band is None:
            continue
        try:
            with open_raster(path) as src:
                grid_of[path] = Grid.of(src)
                candidates.setdefault(band, []).append((path, abs(src.transform.a)))
        except rasterio.errors.RasterioIOError as exc:
            raise RasterError(f"cannot open {str(path)!r}: {exc}") from exc
    if not candidates:
        raise InvalidRequest(
            f"no Sentinel-2 band files found in {paths_or_folder!s}; file names must contain the "
            "band name (e.g. T33TTG_20210615T101031_B04.jp2, B8A.tif)"
        )
    return hints, candidates, grid_of


def band_files_grid(
    paths_or_folder: Union[PathLike, Sequence[PathLike]],
    target_gsd: float = 10,
    *,
    bands: Optional[Sequence[str]] = None,
) -> Grid:
    """The grid :func:`read_band_files` reads onto, without reading pixels: lets a caller plan
    tiles over a whole product and read it window by window."""
    _, candidates, grid_of = _scan_band_files(paths_or_folder)
    chosen = {b: _pick_native(b, c) for b, c in candidates.items()}
    wanted = [canonical_band_name(b) for b in bands if canonical_band_name(b) in chosen] if bands else list(chosen)
    return _band_grid(chosen, wanted or list(chosen), grid_of, target_gsd)


def _read_on_grid(src: Any, grid: Grid, method: Resampling, zero_is_nodata: bool) -> np.ndarray:
    """One band of ``src`` on the output grid, float32 with NaN for nodata.

    A band already on the grid (same CRS, pixel size and pixel-aligned origin) is read through a
    window, bit for bit; any other band is warped, GDAL reading only the source blocks the output
    window needs.
    """
    crs, transform, width, height = grid.crs, grid.transform, grid.width, grid.height
    nodata = src.nodata
    stf = src.transform
    same_grid = (
        src.crs == crs
        and math.isclose(stf.a, transform.a, rel_tol=1e-9)
        and math.isclose(stf.e, transform.e, rel_tol=1e-9)
        and stf.b == 0 and stf.d == 0
    )
    if same_grid:
        col = (transform.c - stf.c) / stf.a
        row = (transform.f - stf.f) / stf.e
        same_grid = abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6
    if same_grid:
        win = Window(int(round(col)), int(round(row)), width, height)
        # boundless reading fills pixels beyond the file with the fill value, marked nodata below
        fill = nodata if nodata is not None else 0
        data = src.read(1, window=win, boundless=True, fill_value=fill)
        out = _to_float_with_nan(data, nodata, zero_is_nodata)
        if nodata is None and not zero_is_nodata:
            # without any nodata value, mark the pixels beyond the file explicitly
            inside = np.zeros((height, width), bool)
            r0, c0 = max(0, -win.row_off), max(0, -win.col_off)
            r1 = min(height, src.height - win.row_off)
            c1 = min(width, src.width - win.col_off)
            if r1 > r0 and c1 > c0:
                inside[r0:r1, c0:c1] = True
            out[~inside] = np.nan
        return out

    src_nodata = nodata if nodata is not None else (0 if zero_is_nodata else None)
    out = np.full((height, width), np.nan, np.float32)
    reproject(
        source=rasterio.band(src, 1),
        destination=out,
        src_transform=stf,
        src_crs=src.crs,
        src_nodata=src_nodata,
        dst_transform=transform,
        dst_crs=crs,
        dst_nodata=np.nan,
        resampling=method,
    )
    return out


__all__ = [
    "S2Stack",
    "band_files_grid",
    "band_from_filename",
    "read_band_files",
    "read_multiband",
]
