"""Satellite metadata: the 7 conditioning fields, their validation and the reference normalisation.

DiffusionSat conditions on ``[longitude, latitude, gsd, cloud_cover, year, month, day]`` of the
image *as fed to the model* (reference page §2). This module is the one place where physical
values (degrees, metres per pixel, a 0..1 fraction, a date) become that normalised vector, and
where they are derived from what users actually have: a bbox in some CRS plus a pixel size (a
georeferenced raster's own date and fields are :mod:`engine.geo.raster_metadata`'s).

Everything here is CPU-only and cheap (pyproj, numpy); nothing reads files or imports torch.

Over 500 lines on purpose: the design's rule is that lon/lat/GSD/date are derived in one place for
the CLI, the server and the plugin alike, so the field checks, the normalisation, bbox and CRS
parsing and validation, the footprint and ground-pixel-size maths and ``output_size`` sit
together (most of the length is the messages that say how to fix an input).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyproj
from pyproj.enums import TransformDirection
from pyproj.exceptions import CRSError

from .errors import InvalidMetadata, InvalidRequest

__all__ = [
    "FIELDS",
    "NORMALISED_ZERO",
    "NORMALISATION_SCALE",
    "TRAINING_GSD_RANGE_M",
    "TRAINING_YEAR_RANGE",
    "MAX_TRAINING_CLOUD_COVER",
    "SatMetadata",
    "parse_bbox",
    "parse_date",
    "parse_crs",
    "validate_bbox",
    "ground_pixel_size",
    "output_size",
    "footprint_centre",
    "derive_from_bbox",
    "grid_transform",
    "as_size",
]

#: Field order of the normalised vector, exactly as the checkpoints expect it.
FIELDS: tuple[str, ...] = ("longitude", "latitude", "gsd", "cloud_cover", "year", "month", "day")

#: The metadata of classifier-free guidance's unconditional branch (and of "everything unknown").
NORMALISED_ZERO: tuple[float, ...] = (0.0,) * len(FIELDS)

#: Every raw value is divided by its divisor and multiplied by this (reference: scale = 1000).
NORMALISATION_SCALE = 1000.0

# Divisors per field, in FIELDS order: lon+180 over 360, lat+90 over 180, gsd over 1 m,
# cloud over 1, (year-1980) over 120, month over 12, day over 31.
_DIVISORS: tuple[float, ...] = (360.0, 180.0, 1.0, 1.0, 120.0, 12.0, 31.0)
_LON_OFFSET = 180.0
_LAT_OFFSET = 90.0
_YEAR_OFFSET = 1980

#: Dates the model can be asked about at all; outside this a date is almost surely a typo.
MIN_DATE = dt.date(1980, 1, 1)
MAX_DATE = dt.date(2100, 12, 31)
#: Largest GSD accepted (m/px). Beyond this an "image" is bigger than a continent per pixel.
MAX_GSD_M = 100_000.0

#: GSD (m/px) and years beyond which we warn: far outside what the released models saw. The one
#: place this range is written; every message quotes it from here.
TRAINING_GSD_RANGE_M: tuple[float, float] = (0.2, 20.0)
#: What a user can do about an out-of-range GSD, per task (the GSD is set differently in each).
_GSD_ADVICE = {
    "generate": "change --size (or --width/--height) or the bbox so that the GSD falls within the range",
    "superres": "choose a --factor that puts the output GSD (input GSD / factor) within the range",
    "temporal": "the GSD is the first input's pixel size: resample the inputs (e.g. gdalwarp -tr) into the range "
                "for more realistic output",
    "inpaint": "the GSD is the input's pixel size, which in-painting keeps: expect the filled pixels to look "
               "less realistic",
    "extend": "the GSD is the input's pixel size, which extending keeps: expect the new pixels to look less "
              "realistic (or resample the input, e.g. gdalwarp -tr, into the range first)",
}
TRAINING_YEAR_RANGE: tuple[int, int] = (2000, 2024)
MAX_TRAINING_CLOUD_COVER = 0.5

_TAG_PREFIX = "metadata_"
_UNKNOWN_TAG = "unknown"


# --------------------------------------------------------------------------------------------
# SatMetadata
# --------------------------------------------------------------------------------------------


def _check_number(field: str, value: Any) -> float:
    """Coerce a real number to float; reject bools, strings, NaN and infinities with a message."""
    # bool is an int subclass; True as a longitude is certainly a bug upstream.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidMetadata(f"{field} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidMetadata(f"{field} must be a finite number, got {out!r}")
    return out


def _coerce_date(value: Any) -> dt.date:
    # datetime is a subclass of date, so test it first to drop the time of day.
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        # Accepting ISO strings lets SatMetadata(**meta.as_dict()) round-trip JSON.
        return parse_date(value)
    raise InvalidMetadata(
        f"date must be a datetime.date or an ISO string YYYY-MM-DD, got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class SatMetadata:
    """Metadata of one image, in physical units, as the model should see it.

    Attributes:
        lon_deg: longitude of the image centre in degrees, -180..180 (WGS84).
        lat_deg: latitude of the image centre in degrees, -90..90 (WGS84).
        gsd_m: ground sample distance in metres per pixel *of the image as fed to the model*
            (after any resize; see :meth:`rescaled_to`), 0 < gsd <= 100000.
        cloud_cover: cloud fraction 0..1 (not percent).
        date: acquisition date, 1980-01-01..2100-12-31 (a ``datetime`` is reduced to its date;
            an ISO string ``YYYY-MM-DD`` is parsed).

    ``None`` means unknown; it normalises to 0, which is exactly how training represented a
    dropped field (reference §2). Invalid values raise :class:`~engine.errors.InvalidMetadata`.
    """

    lon_deg: float | None = None
    lat_deg: float | None = None
    gsd_m: float | None = None
    cloud_cover: float | None = None
    date: dt.date | None = None

    def __post_init__(self) -> None:
        # The dataclass is frozen so that a validated instance stays valid; normalised copies of
        # the inputs are written back with object.__setattr__.
        if self.lon_deg is not None:
            lon = _check_number("longitude", self.lon_deg)
            if not -180.0 <= lon <= 180.0:
                raise InvalidMetadata(
                    f"longitude {lon:g} is outside -180..180 degrees; give WGS84 degrees east"
                )
            object.__setattr__(self, "lon_deg", lon)
        if self.lat_deg is not None:
            lat = _check_number("latitude", self.lat_deg)
            if not -90.0 <= lat <= 90.0:
                raise InvalidMetadata(
                    f"latitude {lat:g} is outside -90..90 degrees; give WGS84 degrees north"
                )
            object.__setattr__(self, "lat_deg", lat)
        if self.gsd_m is not None:
            gsd = _check_number("gsd", self.gsd_m)
            if not 0.0 < gsd <= MAX_GSD_M:
                raise InvalidMetadata(
                    f"gsd {gsd:g} m/px is outside the valid range (0, {MAX_GSD_M:g}]; give the "
                    "ground size of one pixel in metres, e.g. 10 for Sentinel-2"
                )
            object.__setattr__(self, "gsd_m", gsd)
        if self.cloud_cover is not None:
            cloud = _check_number("cloud cover", self.cloud_cover)
            if not 0.0 <= cloud <= 1.0:
                hint = (
                    f"; did you mean {cloud / 100:g}?"
                    if 1.0 < cloud <= 100.0
                    else "; give 0 for clear sky and 1 for fully cloudy"
                )
                raise InvalidMetadata(
                    f"cloud cover {cloud:g} is outside 0..1: cloud cover is a fraction 0..1{hint}"
                )
            object.__setattr__(self, "cloud_cover", cloud)
        if self.date is not None:
            day = _coerce_date(self.date)
            if not MIN_DATE <= day <= MAX_DATE:
                raise InvalidMetadata(
                    f"date {day.isoformat()} is outside {MIN_DATE.isoformat()}.."
                    f"{MAX_DATE.isoformat()}; give the acquisition date as YYYY-MM-DD"
                )
            object.__setattr__(self, "date", day)

    # ---- normalisation ---------------------------------------------------------------------

    def raw(self) -> list[float | None]:
        """The 7 raw values before scaling (lon+180, lat+90, gsd, cloud, year-1980, month, day).

        ``None`` where a field is unknown.
        """
        lon = None if self.lon_deg is None else self.lon_deg + _LON_OFFSET
        lat = None if self.lat_deg is None else self.lat_deg + _LAT_OFFSET
        if self.date is None:
            year = month = day = None
        else:
            year = float(self.date.year - _YEAR_OFFSET)
            month = float(self.date.month)
            day = float(self.date.day)
        return [lon, lat, self.gsd_m, self.cloud_cover, year, month, day]

    def normalised(self) -> list[float]:
        """The 7 floats the model is conditioned on, in :data:`FIELDS` order.

        Exactly the reference: lon+180 / 360, lat+90 / 180, gsd / 1 m, cloud / 1,
        (year-1980) / 120, month / 12, day / 31, each times 1000. Unknown fields are 0.0.
        """
        return [
            0.0 if value is None else value / divisor * NORMALISATION_SCALE
            for value, divisor in zip(self.raw(), _DIVISORS)
        ]

    @classmethod
    def from_normalised(cls, values: Sequence[float]) -> SatMetadata:
        """Invert :meth:`normalised`.

        A value of exactly 0 reads as unknown (``None``), because that is what 0 means to the
        model; so a known value that itself normalises to 0 (longitude -180, latitude -90,
        cloud cover 0) comes back as ``None``, which normalises to the same vector. The date is
        unknown when year, month and day are all 0; year 0 with a month and day is 1980. A date
        with only some parts zeroed (training could drop them independently) cannot be
        represented and raises :class:`InvalidMetadata`.
        """
        vals = list(values)
        if len(vals) != len(FIELDS):
            raise InvalidMetadata(
                f"normalised metadata needs {len(FIELDS)} values ({', '.join(FIELDS)}), "
                f"got {len(vals)}"
            )
        vals = [_check_number(f"normalised {name}", v) for name, v in zip(FIELDS, vals)]
        raw = [v / NORMALISATION_SCALE * d for v, d in zip(vals, _DIVISORS)]
        lon = None if vals[0] == 0.0 else raw[0] - _LON_OFFSET
        lat = None if vals[1] == 0.0 else raw[1] - _LAT_OFFSET
        gsd = None if vals[2] == 0.0 else raw[2]
        cloud = None if vals[3] == 0.0 else raw[3]
        date: dt.date | None
        if vals[4] == vals[5] == vals[6] == 0.0:
            date = None
        elif vals[5] == 0.0 or vals[6] == 0.0:
            raise InvalidMetadata(
                "normalised metadata has a partial date (month or day is 0 = unknown) that "
                "SatMetadata cannot represent; give year, month and day, or all three as 0"
            )
        else:
            # Round because the vector may have passed through fp16 (712.69 -> 712.5).
            y, m, d = (round(raw[i]) for i in (4, 5, 6))
            try:
                date = dt.date(y + _YEAR_OFFSET, m, d)
            except ValueError as err:
                raise InvalidMetadata(
                    f"normalised date fields decode to year {y + _YEAR_OFFSET}, month {m}, "
                    f"day {d}, which is not a calendar date"
                ) from err
        return cls(lon_deg=lon, lat_deg=lat, gsd_m=gsd, cloud_cover=cloud, date=date)

    # ---- derived copies --------------------------------------------------------------------

    def with_gsd(self, gsd_m: float | None) -> SatMetadata:
        """A copy with ``gsd_m`` (metres per pixel) replaced; validated like the constructor."""
        return dataclasses.replace(self, gsd_m=gsd_m)

    def rescaled_to(self, native_size_px: int, model_size_px: int) -> SatMetadata:
        """A copy whose GSD describes the image after resizing it to the model's resolution.

        Args:
            native_size_px: min(height, width) of the native image, in pixels.
            model_size_px: the model's input resolution (short side), in pixels.

        The reference multiplies the native GSD by ``native / model``: a 1024 px image fed to a
        512 px model has twice the native GSD. An unknown GSD stays unknown.
        """
        native = as_size("native_size_px", native_size_px)
        model = as_size("model_size_px", model_size_px)
        if self.gsd_m is None:
            return self
        return self.with_gsd(self.gsd_m * native / model)

    # ---- user-facing checks and serialisation ------------------------------------------------

    def out_of_range_warnings(self, task: str = "generate") -> list[str]:
        """Plain-text warnings for values far outside the released models' training data.

        Empty when everything looks in-distribution. The caller decides how to show them (CLI
        stderr, server response, QGIS message bar). ``task`` picks advice the user can follow
        (``generate``, ``superres``, ``temporal``, ``inpaint``).
        """
        warnings: list[str] = []
        lo, hi = TRAINING_GSD_RANGE_M
        if self.gsd_m is not None and not lo <= self.gsd_m <= hi:
            warnings.append(
                f"GSD {self.gsd_m:.3g} m/px is outside {lo:g}-{hi:g} m/px, the range of the released "
                f"models' training data; {_GSD_ADVICE.get(task, _GSD_ADVICE['generate'])}"
            )
        y_lo, y_hi = TRAINING_YEAR_RANGE
        if self.date is not None and not y_lo <= self.date.year <= y_hi:
            warnings.append(
                f"year {self.date.year} is outside the training data's {y_lo}-{y_hi}; the "
                "model has not seen imagery from then and will extrapolate"
            )
        if self.cloud_cover is not None and self.cloud_cover > MAX_TRAINING_CLOUD_COVER:
            warnings.append(
                f"cloud cover {self.cloud_cover:.2f} is above {MAX_TRAINING_CLOUD_COVER:g}; the "
                "training data was mostly clear, so very cloudy requests are poorly modelled"
            )
        return warnings

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the physical fields (date as ISO ``YYYY-MM-DD``, unknown None).

        ``SatMetadata(**meta.as_dict())`` reproduces ``meta``.
        """
        return {
            "lon_deg": self.lon_deg,
            "lat_deg": self.lat_deg,
            "gsd_m": self.gsd_m,
            "cloud_cover": self.cloud_cover,
            "date": None if self.date is None else self.date.isoformat(),
        }

    def to_tags(self) -> dict[str, str]:
        """Flat string tags for a GeoTIFF: ``metadata_<field>`` plus the normalised vector.

        Unknown fields are written as ``"unknown"``. Floats use ``repr`` so they read back
        exactly. ``metadata_normalised`` is the comma-separated vector in the order given by
        ``metadata_normalised_fields``.
        """
        tags = {
            _TAG_PREFIX + key: _UNKNOWN_TAG if value is None else str(value)
            for key, value in self.as_dict().items()
        }
        tags[_TAG_PREFIX + "normalised"] = ",".join(repr(v) for v in self.normalised())
        tags[_TAG_PREFIX + "normalised_fields"] = ",".join(FIELDS)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> SatMetadata:
        """Read what :meth:`to_tags` wrote (e.g. from a previous output's GeoTIFF tags).

        Falls back to ``metadata_normalised`` when the physical tags are absent.
        """
        keys = ("lon_deg", "lat_deg", "gsd_m", "cloud_cover", "date")
        if not any(_TAG_PREFIX + k in tags for k in keys):
            if _TAG_PREFIX + "normalised" in tags:
                text = tags[_TAG_PREFIX + "normalised"]
                try:
                    values = [float(v) for v in text.split(",")]
                except ValueError as err:
                    raise InvalidMetadata(
                        f"tag metadata_normalised {text!r} is not 7 comma-separated numbers"
                    ) from err
                return cls.from_normalised(values)
            return cls()
        fields: dict[str, Any] = {}
        for key in keys:
            text = str(tags.get(_TAG_PREFIX + key, "")).strip()
            if text in ("", _UNKNOWN_TAG, "None"):
                continue
            if key == "date":
                fields[key] = text
                continue
            try:
                fields[key] = float(text)
            except ValueError as err:
                raise InvalidMetadata(f"tag {_TAG_PREFIX + key} {text!r} is not a number") from err
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# Parsing (CLI and server inputs)
# --------------------------------------------------------------------------------------------


def parse_bbox(text: str | Sequence[float]) -> tuple[float, float, float, float]:
    """Parse ``"minx,miny,maxx,maxy"`` (commas and/or spaces) into 4 finite floats.

    Values are in the units of the bbox's CRS; ordering is checked by :func:`validate_bbox`,
    which knows the CRS. A 4-number sequence is accepted as well.
    """
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,;\s]+", text.strip()) if p]
        shown = text
    else:
        try:
            parts = list(text)
        except TypeError:
            raise InvalidRequest(
                f"bbox {text!r} is not 'minx,miny,maxx,maxy'"
            ) from None
        shown = ",".join(str(p) for p in parts)
    if len(parts) != 4:
        raise InvalidRequest(
            f"bbox {shown!r} has {len(parts)} values; give 4 as 'minx,miny,maxx,maxy'"
        )
    values = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"bbox value {part!r} is not a number; give 'minx,miny,maxx,maxy', "
                "e.g. '12.45,41.88,12.52,41.92'"
            ) from None
        if not math.isfinite(value):
            raise InvalidRequest(f"bbox value {part!r} is not finite; give 4 finite numbers")
        values.append(value)
    return (values[0], values[1], values[2], values[3])


# YYYY-MM-DD, optionally followed by an ISO time and zone, which a date does not need.
_ISO_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
)
_COMPACT_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")


def parse_date(text: str | dt.date) -> dt.date:
    """Parse an acquisition date: ``YYYY-MM-DD`` or ``YYYYMMDD`` (an ISO time part is ignored).

    A ``date``/``datetime`` passes through (as a date). The 1980..2100 range is checked by
    :class:`SatMetadata`, not here.
    """
    if isinstance(text, dt.datetime):
        return text.date()
    if isinstance(text, dt.date):
        return text
    if not isinstance(text, str):
        raise InvalidRequest(f"date {text!r} is not text; give it as YYYY-MM-DD, e.g. 2021-06-15")
    stripped = text.strip()
    match = _ISO_DATE.fullmatch(stripped) or _COMPACT_DATE.fullmatch(stripped)
    if match is None:
        raise InvalidRequest(
            f"date {text!r} is not in the expected format YYYY-MM-DD (or YYYYMMDD), "
            "e.g. 2021-06-15"
        )
    year, month, day = (int(g) for g in match.groups()[:3])
    try:
        return dt.date(year, month, day)
    except ValueError:
        raise InvalidRequest(
            f"date {text!r} is not a calendar date (month 1-12, day valid for the month); "
            "expected YYYY-MM-DD"
        ) from None


def parse_crs(text: Any) -> pyproj.CRS:
    """Parse a CRS given as ``EPSG:xxxx``, a bare EPSG number, WKT, a PROJ string or a CRS object.

    Raises :class:`InvalidRequest` naming the input when PROJ does not know it.
    """
    if isinstance(text, pyproj.CRS):
        return text
    if isinstance(text, bool) or text is None:
        raise InvalidRequest(
            f"CRS {text!r} is not a CRS; give an EPSG code such as EPSG:32633, a WKT or a "
            "PROJ string"
        )
    user_input: Any = text
    if isinstance(text, str):
        user_input = text.strip()
        # A bare number is what people type after reading "EPSG code"; PROJ wants the prefix.
        if user_input.isdigit():
            user_input = f"EPSG:{user_input}"
        if not user_input:
            raise InvalidRequest(
                "CRS is empty; give an EPSG code such as EPSG:32633, a WKT or a PROJ string"
            )
    elif isinstance(text, numbers.Integral):
        user_input = f"EPSG:{int(text)}"
    try:
        return pyproj.CRS.from_user_input(user_input)
    except (CRSError, TypeError, ValueError):
        shown = str(text)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise InvalidRequest(
            f"unknown CRS {shown!r}; give an EPSG code such as EPSG:32633, a WKT or a PROJ string"
        ) from None


# --------------------------------------------------------------------------------------------
# Grid geometry
# --------------------------------------------------------------------------------------------

#: Points per bbox edge when densifying (corners included).
_EDGE_POINTS = 21
#: Points along each mid-line used for the geodesic ground width/height.
_MIDLINE_POINTS = 101
#: How far (degrees of latitude, i.e. ~111 km on the ground) a bbox may spill over its CRS's
#: area of use: UTM/Sentinel-2 tiles legitimately overlap the zone edge a little.
_AREA_OF_USE_BUFFER_DEG = 1.0

_GEOD = pyproj.Geod(ellps="WGS84")
_WGS84 = pyproj.CRS.from_epsg(4326)


def _crs_label(crs: pyproj.CRS) -> str:
    auth = crs.to_authority()
    return f"{auth[0]}:{auth[1]} ({crs.name})" if auth else repr(crs.name)


def _horizontal(crs: pyproj.CRS) -> pyproj.CRS:
    # A compound CRS (e.g. UTM + height) georeferences x/y through its horizontal part.
    if crs.is_compound and crs.sub_crs_list:
        return crs.sub_crs_list[0]
    return crs


def _to_lonlat(crs: pyproj.CRS) -> pyproj.Transformer:
    # always_xy: bboxes are easting/northing or lon/lat whatever the CRS's declared axis order.
    return pyproj.Transformer.from_crs(crs, _WGS84, always_xy=True)


def _as_bbox(bbox: Any) -> tuple[float, float, float, float]:
    return parse_bbox(bbox)


def as_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise InvalidRequest(f"{name} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def _densified_ring(bbox: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The bbox boundary, counter-clockwise, _EDGE_POINTS per edge, without repeating corners."""
    minx, miny, maxx, maxy = bbox
    t = np.linspace(0.0, 1.0, _EDGE_POINTS)[:-1]
    xs = np.concatenate([minx + (maxx - minx) * t, np.full_like(t, maxx),
                         maxx - (maxx - minx) * t, np.full_like(t, minx)])
    ys = np.concatenate([np.full_like(t, miny), miny + (maxy - miny) * t,
                         np.full_like(t, maxy), maxy - (maxy - miny) * t])
    return xs, ys


def _area_of_use(crs: pyproj.CRS):
    """The CRS's area of use, looked up by its authority code when the definition lacks one.

    WKT1 as written by GDAL/rasterio carries ``AUTHORITY["EPSG","32633"]`` but no area of use.
    """
    if crs.area_of_use is not None:
        return crs.area_of_use
    try:
        auth = crs.to_authority()
        return pyproj.CRS.from_authority(*auth).area_of_use if auth else None
    except CRSError:
        return None


def _lon_within(lon: float, west: float, east: float, buffer: float) -> bool:
    """Whether ``lon`` lies in [west, east] widened by ``buffer`` degrees, modulo 360.

    Measured around the circle because both the area (west > east when it crosses the
    antimeridian) and the bbox (a UTM zone 60 box reaching -179.9) may wrap.
    """
    span = east - west if east >= west else east - west + 360.0
    if span + 2.0 * buffer >= 360.0:
        return True
    offset = (lon - west) % 360.0
    return offset <= span + buffer or offset >= 360.0 - buffer


def validate_bbox(bbox: Any, crs: Any) -> tuple[float, float, float, float]:
    """Check that ``bbox`` (minx, miny, maxx, maxy in ``crs`` units) is usable in ``crs``.

    x is always easting or longitude, y northing or latitude, whatever axis order the CRS
    declares.

    - min < max on both axes ("inverted" or "empty" otherwise);
    - geographic CRS: longitudes in -180..180 and latitudes in -90..90;
    - projected CRS: the boundary transforms to finite lon/lat lying within the CRS's area of
      use (when it declares one), buffered by about 1 degree (~111 km on the ground).

    Returns the bbox as 4 floats. Raises :class:`InvalidRequest`.
    """
    box = _as_bbox(bbox)
    crs = _horizontal(parse_crs(crs))
    minx, miny, maxx, maxy = box
    for axis, lo, hi in (("x", minx, maxx), ("y", miny, maxy)):
        if hi < lo:
            hint = ""
            if axis == "x" and crs.is_geographic:
                hint = ("; a bbox crossing the antimeridian is not supported in a geographic CRS, "
                        "use a projected one (e.g. the UTM zone)")
            raise InvalidRequest(
                f"bbox is inverted: max{axis} ({hi:g}) < min{axis} ({lo:g}); give "
                f"'minx,miny,maxx,maxy' with min < max{hint}"
            )
        if hi == lo:
            raise InvalidRequest(
                f"bbox is empty: min{axis} == max{axis} ({lo:g}); give an extent with min < max"
            )
    label = _crs_label(crs)
    if crs.is_geographic:
        if minx < -180.0 or maxx > 180.0 or miny < -90.0 or maxy > 90.0:
            raise InvalidRequest(
                f"bbox {minx:g},{miny:g},{maxx:g},{maxy:g} is outside -180..180 x -90..90 for "
                f"geographic CRS {label}; give longitude/latitude in degrees, or name the "
                "projected CRS the values are in"
            )
        return box
    if not crs.is_projected:
        raise InvalidRequest(
            f"CRS {label} is neither geographic nor projected; give the bbox in a projected "
            "CRS (e.g. EPSG:32633) or in longitude/latitude (EPSG:4326)"
        )
    xs, ys = _densified_ring(box)
    lons, lats = _to_lonlat(crs).transform(xs, ys)
    lons, lats = np.asarray(lons), np.asarray(lats)
    looks_like_degrees = all(abs(v) <= 180.0 for v in box)
    degrees_hint = (
        "; the values look like degrees: use EPSG:4326 for longitude/latitude"
        if looks_like_degrees else ""
    )
    if not (np.all(np.isfinite(lons)) and np.all(np.isfinite(lats))):
        raise InvalidRequest(
            f"bbox {minx:g},{miny:g},{maxx:g},{maxy:g} does not transform from {label} to "
            f"longitude/latitude; check that the bbox is in this CRS's units{degrees_hint}"
        )
    area = _area_of_use(crs)
    if area is not None:
        buf = _AREA_OF_USE_BUFFER_DEG
        for lon, lat in zip(lons, lats):
            # The buffer is ~111 km on the ground in both directions, hence 1/cos(lat) in lon.
            coslat = math.cos(math.radians(min(abs(lat), 90.0)))
            lon_buf = buf / coslat if coslat > buf / 180.0 else 180.0
            if not (area.south - buf <= lat <= area.north + buf
                    and _lon_within(lon, area.west, area.east, lon_buf)):
                raise InvalidRequest(
                    f"bbox {minx:g},{miny:g},{maxx:g},{maxy:g} is outside the area of use of "
                    f"{label} (lon {area.west:g}..{area.east:g}, lat {area.south:g}.."
                    f"{area.north:g}): it reaches lon {lon:.3f}, lat {lat:.3f}; check the CRS "
                    f"(e.g. the UTM zone) and that the bbox is in its units{degrees_hint}"
                )
    return box


def _normalise_lon(lon: float) -> float:
    lon = (lon + 180.0) % 360.0 - 180.0
    return 180.0 if lon == -180.0 else lon


def footprint_centre(bbox: Any, crs: Any) -> tuple[float, float]:
    """Centre (lon, lat) in WGS84 degrees of the bbox footprint: the area centroid.

    The bbox boundary is densified, transformed to lon/lat, projected into a Lambert azimuthal
    equal-area projection centred on the approximate centre (so that areas, and hence the
    centroid, are not distorted by the CRS), and the polygon centroid is transformed back. This
    gives the same centre for the same ground extent in any CRS. The bbox is validated first.
    """
    box = validate_bbox(bbox, crs)
    crs = _horizontal(parse_crs(crs))
    to_ll = _to_lonlat(crs)
    minx, miny, maxx, maxy = box
    lon0, lat0 = to_ll.transform((minx + maxx) / 2.0, (miny + maxy) / 2.0)
    xs, ys = _densified_ring(box)
    lons, lats = to_ll.transform(xs, ys)
    laea = pyproj.CRS.from_proj4(
        f"+proj=laea +lat_0={lat0!r} +lon_0={lon0!r} +datum=WGS84 +units=m +no_defs"
    )
    fwd = pyproj.Transformer.from_crs(_WGS84, laea, always_xy=True)
    px, py = (np.asarray(a, dtype=np.float64) for a in fwd.transform(lons, lats))
    if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
        # Only a bbox reaching the antipode of its own centre (near-global) gets here; the
        # projected centre point is the best we can say.
        return _normalise_lon(float(lon0)), float(lat0)
    # Shoelace centroid of the closed ring.
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    cross = px * qy - qx * py
    area2 = cross.sum()
    if area2 == 0.0:
        return _normalise_lon(float(lon0)), float(lat0)
    cx = float(((px + qx) * cross).sum() / (3.0 * area2))
    cy = float(((py + qy) * cross).sum() / (3.0 * area2))
    lon, lat = fwd.transform(cx, cy, direction=TransformDirection.INVERSE)
    if abs(lat) > 90.0 - 1e-9:
        # Longitude is undefined at a pole and the inverse returns noise; the projected centre's
        # longitude at least is stable.
        lon = lon0
    return _normalise_lon(float(lon)), float(lat)


def ground_pixel_size(bbox: Any, crs: Any, width: int, height: int) -> tuple[float, float]:
    """Geodesic size of one pixel on the WGS84 ellipsoid: ``(gsd_x, gsd_y)`` in metres.

    The ground width is the geodesic length of the bbox's horizontal mid-line (left-middle to
    right-middle, densified along the CRS's straight line so it follows the grid), divided by
    ``width`` pixels; likewise the vertical mid-line over ``height``. Unlike CRS units this does
    not inflate with Web Mercator's 1/cos(latitude) scale.
    """
    box = validate_bbox(bbox, crs)
    width = as_size("width", width)
    height = as_size("height", height)
    crs = _horizontal(parse_crs(crs))
    to_ll = _to_lonlat(crs)
    minx, miny, maxx, maxy = box
    t = np.linspace(0.0, 1.0, _MIDLINE_POINTS)
    cx, cy = (minx + maxx) / 2.0, (miny + maxy) / 2.0
    lons, lats = to_ll.transform(minx + (maxx - minx) * t, np.full_like(t, cy))
    width_m = _GEOD.line_length(lons, lats)
    lons, lats = to_ll.transform(np.full_like(t, cx), miny + (maxy - miny) * t)
    height_m = _GEOD.line_length(lons, lats)
    return width_m / width, height_m / height


def output_size(
    bbox: Any,
    crs: Any,
    size: int | None = None,
    width: int | None = None,
    height: int | None = None,
    default: int = 512,
) -> tuple[int, int]:
    """Width and height in px of an image generated over ``bbox`` in ``crs``: the one rule of
    the CLI, the server and the QGIS plugin (which sends ``size`` and lets the engine decide).

    ``size`` (``default`` when None) is the longer side; the other side follows the bbox's shape
    on the ground (the geodesic mid-lines of :func:`ground_pixel_size`), so that pixels are
    square on the ground, also for degrees; it is rounded to a multiple of 8, at least 8.
    ``width`` and ``height`` override: both given, they are the size; one given, it is that side
    and the other follows the shape.
    """
    if width and height:
        return int(width), int(height)
    ground_w, ground_h = ground_pixel_size(bbox, crs, 1, 1)
    if not (ground_w > 0 and ground_h > 0):
        raise InvalidRequest("the bbox has no extent on the ground; give a larger bbox")

    def other(side: int, ratio: float) -> int:
        return max(8, int(round(side * ratio / 8.0)) * 8)

    if width:
        return int(width), other(int(width), ground_h / ground_w)
    if height:
        return other(int(height), ground_w / ground_h), int(height)
    longest = as_size("size", size if size else default)
    if ground_w >= ground_h:
        return longest, other(longest, ground_h / ground_w)
    return other(longest, ground_w / ground_h), longest


def derive_from_bbox(
    bbox: Any,
    crs: Any,
    width: int,
    height: int,
    date: dt.date | str | None = None,
    cloud_cover: float | None = None,
) -> SatMetadata:
    """Metadata of a ``width`` x ``height`` pixel image covering ``bbox`` in ``crs``.

    Centre = footprint centroid (:func:`footprint_centre`); GSD = geometric mean of the geodesic
    pixel sizes (:func:`ground_pixel_size`), in metres per pixel of the image as generated.
    """
    lon, lat = footprint_centre(bbox, crs)
    gsd_x, gsd_y = ground_pixel_size(bbox, crs, width, height)
    return SatMetadata(
        lon_deg=lon,
        lat_deg=lat,
        gsd_m=math.sqrt(gsd_x * gsd_y),
        cloud_cover=cloud_cover,
        date=None if date is None else parse_date(date),
    )


def grid_transform(bbox: Any, width: int, height: int):
    """The affine transform (rasterio ``Affine``) putting the pixel *edges* exactly on ``bbox``.

    Pixel (0, 0)'s top-left corner is (minx, maxy); pixel (width-1, height-1)'s bottom-right
    corner is (maxx, miny). Units are those of the bbox's CRS.
    """
    from rasterio.transform import from_bounds

    minx, miny, maxx, maxy = _as_bbox(bbox)
    if not (minx < maxx and miny < maxy):
        raise InvalidRequest(
            f"bbox {minx:g},{miny:g},{maxx:g},{maxy:g} is inverted or empty; give min < max"
        )
    return from_bounds(minx, miny, maxx, maxy, as_size("width", width), as_size("height", height))
