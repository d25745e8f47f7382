"""QGIS state (extent, CRS, layers, dates) → engine request dicts.

The plugin sends the *target extent* (bbox in a CRS) with the longest side in px (``size``, or
exact ``width``/``height``) and the date; it never derives the grid, longitude/latitude or the
ground sample distance for the model: the engine does that in one place
(``engine.metadata.output_size``) for the CLI and the plugin alike. :func:`output_size` and
:func:`grid_info` estimate the grid only to *show* the size and GSD in the dock.

Every builder returns a plain dict that matches the engine's request models
(``engine/tasks/requests.py``); values the user left unset are left out, so the engine's documented
defaults apply.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsDistanceArea,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
)

from .checks import YEAR_RANGE
from .compat import WKT2_2019

#: Longest side of a generated image when nothing else is said (the models' native size).
DEFAULT_SIZE = 512


class RequestError(ValueError):
    """The QGIS state cannot make a valid request; the message says what to change."""


@dataclass
class PreparedJob:
    """Everything a task needs, captured on the main thread (no QGIS objects inside).

    ``files`` names the request fields that hold local file paths (``"input"``, ``"mask"``,
    ``"inputs"``) so they can be uploaded to a remote engine; ``rasterize`` asks the task to burn
    a vector file into a GeoTIFF mask first (see :mod:`.inputs`).
    """

    task: str
    request: dict[str, Any]
    output_path: str
    layer_name: str
    date: Optional[_dt.date] = None
    files: tuple[str, ...] = ()
    rasterize: Optional[dict[str, Any]] = None
    temp_files: list[str] = field(default_factory=list)
    title: str = ""

    def describe(self) -> str:
        return self.title or f"DiffusionSat {self.task}"


@dataclass(frozen=True)
class GridInfo:
    """A target grid measured on the ellipsoid, for display: metres and degrees."""

    width_px: int
    height_px: int
    width_m: float
    height_m: float
    centre_lon: float
    centre_lat: float

    @property
    def gsd_m(self) -> float:
        """Mean ground sample distance, metres per pixel."""
        return (self.width_m / self.width_px + self.height_m / self.height_px) / 2.0

    def summary(self) -> str:
        ns = "N" if self.centre_lat >= 0 else "S"
        ew = "E" if self.centre_lon >= 0 else "W"
        return (
            f"{self.width_px} × {self.height_px} px · {self.gsd_m:.3g} m/px · "
            f"{_km(self.width_m)} × {_km(self.height_m)} · centre "
            f"{abs(self.centre_lat):.4f}° {ns}, {abs(self.centre_lon):.4f}° {ew}"
        )


def _km(metres: float) -> str:
    return f"{metres / 1000:.3g} km" if metres >= 1000 else f"{metres:.0f} m"


# ------------------------------------------------------------------------------------------------
# CRS, extent, size
# ------------------------------------------------------------------------------------------------


def crs_ref(crs: QgsCoordinateReferenceSystem) -> str:
    """The CRS as the request states it: an EPSG/ESRI code when it has one, else WKT2."""
    if not crs.isValid():
        raise RequestError("the CRS is not valid; set the project or layer CRS first")
    authid = crs.authid()
    if authid and authid.split(":")[0].upper() in ("EPSG", "ESRI", "OGC"):
        return authid
    wkt = crs.toWkt(WKT2_2019)
    if not wkt:
        raise RequestError(f"the CRS {crs.description()} cannot be written as WKT")
    return wkt


def bbox_of(extent: QgsRectangle) -> list[float]:
    if extent is None or extent.isEmpty() or not all(
        math.isfinite(v) for v in (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
    ):
        raise RequestError("the extent is empty: draw a rectangle on the map or choose an extent")
    return [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]


def _distance_area(crs: QgsCoordinateReferenceSystem, project: Optional[QgsProject] = None) -> QgsDistanceArea:
    project = project or QgsProject.instance()
    da = QgsDistanceArea()
    da.setSourceCrs(crs, project.transformContext())
    ellipsoid = crs.ellipsoidAcronym() or "EPSG:7030"
    if not da.setEllipsoid(ellipsoid):
        da.setEllipsoid("EPSG:7030")  # WGS 84
    return da


def ground_size(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                project: Optional[QgsProject] = None) -> tuple[float, float]:
    """Width and height of ``extent`` on the ground (metres, ellipsoidal, through its centre)."""
    bbox_of(extent)
    da = _distance_area(crs, project)
    c = extent.center()
    width = da.measureLine(QgsPointXY(extent.xMinimum(), c.y()), QgsPointXY(extent.xMaximum(), c.y()))
    height = da.measureLine(QgsPointXY(c.x(), extent.yMinimum()), QgsPointXY(c.x(), extent.yMaximum()))
    width = da.convertLengthMeasurement(width, _metres())
    height = da.convertLengthMeasurement(height, _metres())
    return float(width), float(height)


def _metres():
    from qgis.core import QgsUnitTypes

    unit = getattr(QgsUnitTypes, "DistanceMeters", None)
    if unit is None:  # QGIS 4: Qgis.DistanceUnit
        from qgis.core import Qgis

        unit = Qgis.DistanceUnit.Meters
    return unit


def round8(value: float) -> int:
    """Nearest positive multiple of 8 (the model works on 8×8 latent cells)."""
    return max(8, int(round(value / 8.0)) * 8)


def output_size(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, longest: int = DEFAULT_SIZE,
                project: Optional[QgsProject] = None, max_side: Optional[int] = None) -> tuple[int, int]:
    """Width and height in px for ``extent`` with ``longest`` px on its longer side, so that
    pixels are square on the ground (also for degrees), both multiples of 8: the dock's
    estimate of the grid the engine makes from ``size`` (``engine.metadata.output_size``)."""
    if max_side is None:
        from .schema import current

        max_side = current().max_side
    longest = round8(min(max(longest, 8), max_side))
    width_m, height_m = ground_size(extent, crs, project)
    if width_m <= 0 or height_m <= 0:
        raise RequestError("the extent has no area on the ground")
    if width_m >= height_m:
        return longest, round8(longest * height_m / width_m)
    return round8(longest * width_m / height_m), longest


#: The dock's ground resolution before any extent chose one (m/px).
DEFAULT_GSD_M = 10.0
#: Longest side (px) the dock aims at when it picks a ground resolution for a large extent.
GSD_TARGET_PX = 2048


def gsd_for_extent(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, gsd_range: tuple[float, float],
                   project: Optional[QgsProject] = None) -> float:
    """A ground resolution for a large extent: about :data:`GSD_TARGET_PX` px on its longest side,
    kept inside ``gsd_range`` (the training imagery's), rounded to 0.5 m (0.1 m below 1 m)."""
    width_m, height_m = ground_size(extent, crs, project)
    lo, hi = gsd_range
    gsd = min(max(max(width_m, height_m) / GSD_TARGET_PX, lo), hi)
    step = 0.1 if gsd < 1 else 0.5
    return max(lo, min(hi, round(gsd / step) * step))


def gsd_size(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, gsd_m: float,
             project: Optional[QgsProject] = None) -> tuple[int, int]:
    """Width and height in px of ``extent`` at ``gsd_m`` metres per pixel, rounded up to multiples
    of 8 (the grid covers the extent): the dock's estimate of the grid the engine makes from ``gsd``."""
    if not gsd_m or gsd_m <= 0 or not math.isfinite(gsd_m):
        raise RequestError(f"the ground resolution must be a positive number of metres per pixel, got {gsd_m}")
    width_m, height_m = ground_size(extent, crs, project)
    if width_m <= 0 or height_m <= 0:
        raise RequestError("the extent has no area on the ground")
    return (max(8, 8 * math.ceil(width_m / gsd_m / 8 - 1e-9)), max(8, 8 * math.ceil(height_m / gsd_m / 8 - 1e-9)))


def grid_info(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, width: int, height: int,
              project: Optional[QgsProject] = None) -> GridInfo:
    """Size, GSD and centre of a target grid, for display only (the engine derives its own)."""
    project = project or QgsProject.instance()
    width_m, height_m = ground_size(extent, crs, project)
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    centre = extent.center()
    if crs != wgs84:
        centre = QgsCoordinateTransform(crs, wgs84, project.transformContext()).transform(centre)
    return GridInfo(int(width), int(height), width_m, height_m, centre.x(), centre.y())


# ------------------------------------------------------------------------------------------------
# Dates
# ------------------------------------------------------------------------------------------------


def date_from_canvas(canvas) -> Optional[_dt.date]:
    """The start of the temporal controller's current range, when temporal navigation is on."""
    if canvas is None:
        return None
    try:
        if not canvas.mapSettings().isTemporal():
            return None
        rng = canvas.temporalRange()
    except AttributeError:
        return None
    begin = rng.begin()
    if begin is None or not begin.isValid():
        return None
    d = begin.date()
    return _dt.date(d.year(), d.month(), d.day())


def default_date(canvas, today: Optional[_dt.date] = None) -> _dt.date:
    """The date the dock starts with: the temporal controller's, else today, or, when today is past
    the training data's years (:data:`checks.YEAR_RANGE`), today's day in the last training year
    (the same season, and no "outside the training data" question on the first run)."""
    found = date_from_canvas(canvas)
    if found is not None:
        return found
    today = today or _dt.date.today()
    last = YEAR_RANGE[1]
    if today.year <= last:
        return today
    if (today.month, today.day) == (2, 29):
        return _dt.date(last, 2, 28 if last % 4 or (last % 100 == 0 and last % 400) else 29)
    return today.replace(year=last)


# Tags that hold an *acquisition* date (metadata_date is the engine's). TIFFTAG_DATETIME is the
# file's creation time by the TIFF spec (for a processed product, the processing date): never used.
_DATE_TAGS = ("metadata_date", "ACQUISITION_DATE", "DATE_ACQUIRED", "SENSING_TIME", "PRODUCT_START_TIME",
              "DATATAKE_1_DATATAKE_SENSING_START", "datetime", "DATE")
# Product names whose date is the acquisition date: Sentinel-2 (``S2A_MSIL2A_20210615T101031_...``,
# ``T33TTG_20210615T101031_B04``) and Landsat Collection (``LC08_L1TP_191031_20210615_...``).
# Any other date in a name (a run timestamp, an export date) is not trusted.
_PRODUCT_NAME_RES = (
    re.compile(r"(?:^|_)(?:S2[ABCD]_MSI\w+?_|T\d{2}[A-Z]{3}_)((?:19|20)\d{6})T\d{6}(?=_|$|\.)"),
    re.compile(r"^L[COTEM]0\d_L[12]\w{2}_\d{6}_((?:19|20)\d{6})_"),
)
_ISO_RE = re.compile(r"(\d{4})[-:](\d{2})[-:](\d{2})")
_COMPACT_RE = re.compile(r"(?<!\d)(19[89]\d|20\d\d)(0[1-9]|1[0-2])([0-2]\d|3[01])(?!\d)")


def parse_date(text: Any) -> Optional[_dt.date]:
    """A date from ISO-like text (``2021-06-15``, ``2021:06:15 00:00:00``, ``20210615T...``)."""
    if isinstance(text, _dt.datetime):
        return text.date()
    if isinstance(text, _dt.date):
        return text
    if not text:
        return None
    text = str(text)
    for rx in (_ISO_RE, _COMPACT_RE):
        m = rx.search(text)
        if m:
            try:
                return _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            except ValueError:
                continue
    return None


def is_synthetic(tags: Mapping[str, Any]) -> bool:
    """Whether raster tags mark a DiffusionSat output (its names and times are not acquisitions)."""
    low = {str(k).lower(): str(v).lower() for k, v in tags.items()}
    return low.get("synthetic") in ("true", "1", "yes") or low.get("software", "").startswith("diffusionsat")


def product_name_date(name: str) -> Optional[_dt.date]:
    """The acquisition date in a Sentinel-2 or Landsat product/band file name, else None."""
    for rx in _PRODUCT_NAME_RES:
        m = rx.search(Path(name).name)
        if m:
            return parse_date(m.group(1))
    return None


def layer_date(layer) -> tuple[Optional[_dt.date], str]:
    """A raster layer's acquisition date and where it came from: its temporal properties first,
    then the file's acquisition-date tags, then a Sentinel-2/Landsat product name (never for a
    DiffusionSat output); ``(None, "")`` when unknown. Never a run or file-creation time: an
    undated layer stays undated (the model takes an unknown date)."""
    props = layer.temporalProperties() if hasattr(layer, "temporalProperties") else None
    if props is not None and props.isActive():
        try:
            rng = props.fixedTemporalRange()
            if rng.begin().isValid():
                d = rng.begin().date()
                return _dt.date(d.year(), d.month(), d.day()), "temporal properties"
        except AttributeError:
            pass
    path = layer_file(layer)
    tags: dict[str, str] = {}
    if path:
        try:
            from osgeo import gdal

            ds = gdal.Open(path)
            if ds is not None:
                tags = dict(ds.GetMetadata() or {})
        except (ImportError, RuntimeError):
            tags = {}
        by_upper = {k.upper(): v for k, v in tags.items()}
        for key in _DATE_TAGS:
            d = parse_date(by_upper.get(key.upper()))
            if d:
                return d, f"file metadata ({key})"
    if is_synthetic(tags):
        return None, ""
    for name, where in ((Path(path).name if path else "", "file name"), (layer.name(), "layer name")):
        d = product_name_date(name) if name else None
        if d:
            return d, where
    return None, ""


def iso(d: Optional[_dt.date]) -> Optional[str]:
    return d.isoformat() if d else None


# ------------------------------------------------------------------------------------------------
# Layers → files
# ------------------------------------------------------------------------------------------------


def layer_file(layer) -> Optional[str]:
    """The local file behind a GDAL raster (or OGR vector) layer, without provider options."""
    if layer is None or not layer.isValid():
        return None
    provider = layer.providerType()
    if provider not in ("gdal", "ogr"):
        return None
    source = layer.source().split("|")[0]
    if source.startswith(("/vsi", "http:", "https:")):
        return None
    path = Path(source)
    return str(path) if path.is_file() else None


def file_hints(layer, path: Optional[str]) -> dict[str, Any]:
    """What QGIS knows of ``layer`` that its file ``path`` does not say, as request fields:
    ``input_crs`` (a CRS assigned in Layer Properties → Source) and ``input_nodata`` (an
    additional no-data value set in Transparency). Empty when the file says it all, so that
    requests stay as they were for engines without these fields."""
    hints: dict[str, Any] = {}
    if layer is None or not path:
        return hints
    try:
        from osgeo import gdal

        ds = gdal.Open(str(path))
    except (ImportError, RuntimeError):
        ds = None
    if ds is None:
        return hints
    crs = layer.crs()
    if not (ds.GetProjection() or "").strip() and crs.isValid():
        hints["input_crs"] = crs_ref(crs)
    band = ds.GetRasterBand(1) if ds.RasterCount else None
    if band is not None and band.GetNoDataValue() is None:
        provider = layer.dataProvider()
        ranges = provider.userNoDataValues(1) if provider is not None else []
        if ranges and ranges[0].min() == ranges[0].max():
            hints["input_nodata"] = float(ranges[0].min())
    return hints


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def _common(model: Optional[str]) -> dict[str, Any]:
    return {"model": model} if model else {}


def generate_request(
    extent: QgsRectangle,
    crs: QgsCoordinateReferenceSystem,
    *,
    size: Optional[int] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    date: Optional[_dt.date] = None,
    cloud_cover: Optional[float] = None,
    prompt: str = "",
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    seed: Optional[int] = None,
    scheduler: Optional[str] = None,
    model: Optional[str] = None,
    gsd: Optional[float] = None,
) -> dict[str, Any]:
    """The ``generate`` request for ``extent`` in ``crs`` (the output lands exactly on it).

    Args:
        size: the longest side in px (rounded to a multiple of 8); the engine makes the other
            side follow the extent's shape on the ground. None = the model's native size.
        width, height: exact output sides in px (multiples of 8), overriding ``size``.
        cloud_cover: fraction 0..1, None = unknown.
        prompt: text prompt; empty = the engine's default prompt.
        scheduler: a sampler name; None = the engine's default (not sent).
        gsd: metres per pixel instead of a size: the extent at that ground resolution, of any size
            (larger than the model's window, the engine denoises overlapping windows jointly).
    """
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise RequestError(f"{name} {value} px: width and height must be positive multiples of 8")
    if cloud_cover is not None and not 0.0 <= cloud_cover <= 1.0:
        raise RequestError(f"cloud cover is a fraction 0..1, got {cloud_cover}")
    req: dict[str, Any] = {
        "task": "generate",
        "bbox": bbox_of(extent),
        "crs": crs_ref(crs),
        "date": iso(date),
        "cloud_cover": cloud_cover,
        **_common(model),
    }
    if scheduler and scheduler.strip():
        req["scheduler"] = scheduler.strip()
    if gsd is not None:
        if gsd <= 0 or not math.isfinite(gsd):
            raise RequestError(f"the ground resolution must be a positive number of metres per pixel, got {gsd}")
        if size is not None or width is not None or height is not None:
            raise RequestError("give either a ground resolution or a size, not both")
        req["gsd"] = float(gsd)
    if size is not None:
        req["size"] = round8(size)
    if width is not None:
        req["width"] = int(width)
    if height is not None:
        req["height"] = int(height)
    if prompt and prompt.strip():
        req["prompt"] = prompt.strip()
    if steps is not None:
        req["steps"] = int(steps)
    if guidance is not None:
        req["guidance"] = float(guidance)
    if seed is not None and seed >= 0:
        req["seed"] = int(seed)
    return req


def _window(extent: Optional[QgsRectangle], crs: Optional[QgsCoordinateReferenceSystem]) -> dict[str, Any]:
    if extent is None or extent.isNull() or extent.isEmpty():
        return {}
    if crs is None or not crs.isValid():
        raise RequestError("an extent needs a valid CRS")
    return {"bbox": bbox_of(extent), "crs": crs_ref(crs)}


def superres_request(
    input_ref: str,
    *,
    bands: Optional[Sequence[str]] = None,
    extent: Optional[QgsRectangle] = None,
    crs: Optional[QgsCoordinateReferenceSystem] = None,
    factor: Optional[int] = None,
    model: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``superres`` request for a Sentinel-2 raster (or a VRT stacking band files).

    Args:
        bands: the Sentinel-2 band name of each band of the file in order (``-`` skips a band);
            None lets the engine read the file's band descriptions.
        extent, crs: the window to super-resolve; None = the whole raster.
    """
    if not input_ref:
        raise RequestError("choose a Sentinel-2 layer to super-resolve")
    req: dict[str, Any] = {"task": "superres", "input": input_ref, **_common(model)}
    if bands:
        names = [b.strip() for b in bands]
        if any(not b for b in names):
            raise RequestError("every band needs a name (e.g. B04), or - to skip it")
        req["bands"] = ",".join(names)
    req.update(_window(extent, crs))
    if factor:
        req["factor"] = int(factor)
    req.update(options or {})
    return req


def inpaint_request(
    input_ref: str,
    mask_ref: str,
    *,
    mask_rule: Optional[str] = None,
    extent: Optional[QgsRectangle] = None,
    crs: Optional[QgsCoordinateReferenceSystem] = None,
    prompt: str = "",
    model: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``inpaint`` request: fill the pixels of ``input_ref`` that ``mask_ref`` (+ rule) marks.

    ``mask_ref`` is a raster or vector file, or ``"nodata"`` (the input's own nodata).
    ``mask_rule`` follows the engine's grammar (``bits:14-15=3``, ``values:3,8,9,10``,
    ``nodata``, ``nonzero`` or a preset such as ``s2-scl-cloud``).
    """
    if not input_ref:
        raise RequestError("choose the raster layer to in-paint")
    if not mask_ref:
        raise RequestError("choose a mask: a raster layer and rule, a polygon layer, or nodata")
    req: dict[str, Any] = {"task": "inpaint", "input": input_ref, "mask": mask_ref, **_common(model)}
    if mask_rule:
        req["mask_rule"] = mask_rule.strip()
    req.update(_window(extent, crs))
    if prompt and prompt.strip():
        req["prompt"] = prompt.strip()
    req.update(options or {})
    return req


def temporal_request(
    inputs: Sequence[str],
    input_dates: Sequence[Optional[_dt.date]],
    date: _dt.date,
    *,
    extent: Optional[QgsRectangle] = None,
    crs: Optional[QgsCoordinateReferenceSystem] = None,
    model: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``temporal`` request: from dated input rasters, an image for ``date``.

    ``input_dates`` has one date per input; all None leaves the dates to the engine (it reads
    them from the files).
    """
    if not inputs:
        raise RequestError("choose at least one input layer with a date")
    if len(inputs) != len(input_dates):
        raise RequestError(f"{len(inputs)} inputs but {len(input_dates)} dates")
    missing = [str(i + 1) for i, d in enumerate(input_dates) if d is None]
    if missing and len(missing) < len(input_dates):
        raise RequestError(f"input(s) {', '.join(missing)} have no date: set their temporal "
                           "properties or type the date (or leave all dates to the engine)")
    if date is None:
        raise RequestError("choose the target date")
    req: dict[str, Any] = {"task": "temporal", "inputs": list(inputs), "date": date.isoformat(),
                           **_common(model)}
    if not missing:
        req["input_dates"] = [d.isoformat() for d in input_dates]
    req.update(_window(extent, crs))
    req.update(options or {})
    return req


def extend_request(
    input_ref: str,
    extent: QgsRectangle,
    crs: QgsCoordinateReferenceSystem,
    *,
    date: Optional[_dt.date] = None,
    cloud_cover: Optional[float] = None,
    prompt: str = "",
    model: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``extend`` (outpaint) request: ``input_ref`` grown to cover ``extent`` (in ``crs``).

    The engine keeps the input's grid (CRS, pixel size, alignment), snaps the extent outward to it,
    covers the union of that and the input's own extent, keeps every input pixel and generates the
    new ones. ``options`` (steps, seed, guidance, rgb_bands, ...) go in as they are.
    """
    if not input_ref:
        raise RequestError("choose the raster layer to extend")
    if cloud_cover is not None and not 0.0 <= cloud_cover <= 1.0:
        raise RequestError(f"cloud cover is a fraction 0..1, got {cloud_cover}")
    if extent is None or extent.isNull() or extent.isEmpty():
        raise RequestError("draw the new extent on the map (Draw extent) or use the canvas extent")
    req: dict[str, Any] = {"task": "extend", "input": input_ref, "bbox": bbox_of(extent), "crs": crs_ref(crs),
                           **_common(model)}
    if date is not None:
        req["date"] = date.isoformat()
    if cloud_cover is not None:
        req["cloud_cover"] = float(cloud_cover)
    if prompt and prompt.strip():
        req["prompt"] = prompt.strip()
    req.update(options or {})
    return req


def parse_band_names(text: str) -> Optional[list[str]]:
    """``"B02, B03,B04"`` → ``["B02", "B03", "B04"]``; empty → None."""
    names = [t.strip() for t in re.split(r"[,\s]+", text or "") if t.strip()]
    return names or None


def guess_band_name(text: str) -> Optional[str]:
    """A Sentinel-2 band name in a layer or file name (``T33TTG_..._B8A_20m`` → ``B8A``)."""
    m = re.search(r"(?<![A-Za-z0-9])B(0?[1-9]|1[0-2]|8A)(?![0-9A-Za-z])", text or "", re.IGNORECASE)
    if not m:
        return None
    token = m.group(1).upper()
    return "B8A" if token == "8A" else f"B{int(token):02d}"

