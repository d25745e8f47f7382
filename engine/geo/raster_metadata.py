"""The metadata of a georeferenced raster: its acquisition date (tags, then file name) and the 7
conditioning fields as the model would see it (:func:`derive_from_raster`).

The fields themselves, their validation and the derivation from a bbox are :mod:`engine.metadata`'s;
this module reads files (rasterio), which that one never does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyproj
from rasterio.errors import RasterioError

from ..errors import InvalidMetadata, InvalidRequest, RasterError
from ..metadata import (
    MAX_DATE,
    MIN_DATE,
    SatMetadata,
    as_size,
    derive_from_bbox,
    parse_date,
)
from .guard import open_raster

# Tag keys holding an *acquisition* date, most specific first (compared case-insensitively).
_DATE_TAG_KEYS = (
    "metadata_date",
    "ACQUISITION_DATE",
    "ACQUISITIONDATE",
    "DATE_ACQUIRED",
    "SENSING_TIME",
    "DATATAKE_SENSING_START",
    "DATATAKE_1_DATATAKE_SENSING_START",
    "PRODUCT_START_TIME",
    "ACQUISITION_START_TIME",
    "DATE",
)
# TIFFTAG_DATETIME is the file's creation time by the TIFF spec: for processed products that is
# the processing date, so it is trusted less than a date in a Sentinel-2/Landsat file name.
_WEAK_DATE_TAG_KEYS = ("TIFFTAG_DATETIME",)

# A date at the start of a tag value: 2021-06-15, 2021:06:15 (TIFF), 2021/06/15, 20210615.
_TAG_DATE = re.compile(r"^\s*(\d{4})([-:/.]?)(\d{2})\2(\d{2})(?!\d)")
# A date inside a file name, optionally followed by a time (Sentinel-2's 20210615T101031).
_NAME_DATE = re.compile(r"(?<!\d)(\d{4})([-_.]?)(\d{2})\2(\d{2})(?:T?\d{6})?(?!\d)")


def _plausible_date(year: str, month: str, day: str) -> dt.date | None:
    try:
        value = dt.date(int(year), int(month), int(day))
    except ValueError:
        return None
    return value if MIN_DATE <= value <= MAX_DATE else None


def _date_from_tag_value(text: str) -> dt.date | None:
    match = _TAG_DATE.match(str(text))
    if match is None:
        return None
    return _plausible_date(match.group(1), match.group(3), match.group(4))


def date_from_name(name: str) -> dt.date | None:
    """The first plausible date (1980..2100) in a file name, in reading order."""
    for match in _NAME_DATE.finditer(name):
        value = _plausible_date(match.group(1), match.group(3), match.group(4))
        if value is not None:
            return value
    return None


def _open(path: str | os.PathLike):
    if not Path(path).exists():
        raise RasterError(f"raster {str(path)!r} does not exist; check the path")
    try:
        return open_raster(path)
    except (RasterioError, OSError) as err:
        raise RasterError(
            f"cannot read raster {str(path)!r} ({err}); give a GeoTIFF or another GDAL-readable "
            "raster"
        ) from None


def _date_from_tags(tags: Mapping[str, str], keys: Iterable[str]) -> tuple[dt.date | None, str]:
    by_upper = {str(k).upper(): (k, v) for k, v in tags.items()}
    for key in keys:
        hit = by_upper.get(key.upper())
        if hit is None:
            continue
        value = _date_from_tag_value(hit[1])
        if value is not None:
            return value, f"tag {hit[0]}={hit[1]!r}"
    return None, ""


def date_from_raster(path: str | os.PathLike) -> tuple[dt.date | None, str]:
    """Acquisition date of a raster, and a short description of where it was found.

    Order: acquisition-date tags (``metadata_date``, ``ACQUISITION_DATE``, ``DATE_ACQUIRED``,
    ``SENSING_TIME``, ``DATATAKE_SENSING_START``, ``DATE``, ... case-insensitive), then the first
    plausible date (1980..2100) in the file name (``2021-06-15``, ``20210615``,
    ``20210615T101031``, Landsat ``..._20210615_...``), then ``TIFFTAG_DATETIME`` (a file
    creation time, so last). Returns ``(None, "no date ...")`` when nothing is found.
    """
    with _open(path) as src:
        tags = dict(src.tags())
    value, source = _date_from_tags(tags, _DATE_TAG_KEYS)
    if value is not None:
        return value, source
    name = Path(path).name
    # A DiffusionSat output's name and file time are not acquisitions (undated outputs stay undated).
    synthetic = str(tags.get("synthetic", "")).lower() == "true" or str(tags.get("software", "")).startswith("diffusionsat")
    value = None if synthetic else date_from_name(name)
    if value is not None:
        return value, f"file name {name!r}"
    value, source = _date_from_tags(tags, () if synthetic else _WEAK_DATE_TAG_KEYS)
    if value is not None:
        return value, source + " (file creation time)"
    return None, "no date in the raster's tags or file name"


def derive_from_raster(
    path: str | os.PathLike,
    date: dt.date | str | None = None,
    model_size_px: int | None = None,
    cloud_cover: float | None = None,
) -> SatMetadata:
    """Metadata of a georeferenced raster, as the model would see it.

    Centre and native GSD come from the raster's CRS and bounds exactly as in
    :func:`derive_from_bbox`. With ``model_size_px`` the GSD is rescaled by
    ``min(height, width) / model_size_px`` (the image will be resized to the model). ``date``
    wins over anything found in the raster; otherwise :func:`date_from_raster` decides.

    Raises :class:`RasterError` when the file cannot be read, has no CRS, or is not north-up.
    """
    with _open(path) as src:
        if src.crs is None:
            raise RasterError(
                f"raster {str(path)!r} has no CRS, so its location and pixel size are unknown; "
                "assign one (QGIS: Layer Properties > Source > Assigned CRS, then Export > Save "
                "As; or gdal_edit.py -a_srs EPSG:xxxx FILE)"
            )
        transform = src.transform
        if transform.b != 0.0 or transform.d != 0.0:
            raise RasterError(
                f"raster {str(path)!r} has a rotated geotransform; warp it to north-up first "
                "(QGIS: Raster > Projections > Warp, or gdalwarp)"
            )
        crs = pyproj.CRS.from_user_input(src.crs.to_wkt())
        left, bottom, right, top = src.bounds
        height, width = src.height, src.width
    bbox = (min(left, right), min(bottom, top), max(left, right), max(bottom, top))
    try:
        meta = derive_from_bbox(bbox, crs, width, height, cloud_cover=cloud_cover)
    except InvalidMetadata:
        raise
    except InvalidRequest as err:
        raise RasterError(f"raster {str(path)!r}: {err}") from None
    if model_size_px is not None:
        meta = meta.rescaled_to(min(height, width), as_size("model_size_px", model_size_px))
    when = parse_date(date) if date is not None else date_from_raster(path)[0]
    return dataclasses.replace(meta, date=when)
