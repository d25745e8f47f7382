"""Sentinel-2 facts without pixels: the band table, product level and baseline, and the radiometry
the super-resolution model expects.

The fMoW-Sentinel super-resolution checkpoint was trained on 13-band Level-1C digital numbers
(DN) as fMoW-Sentinel stored them, i.e. *before* processing baseline 04.00 added a +1000 offset
to every band (reference page §6). :func:`to_model_input` turns an
:class:`~engine.geo.sentinel2.S2Stack` into exactly that: it removes the baseline offset, fills
nodata with the band mean (so one bad pixel never blanks a tile), applies the reference per-band
stretch (:func:`normalise_bands`) and selects/reorders the 10 model bands
``[B04, B03, B02, B05, B06, B07, B08, B8A, B11, B12]``.

The product level (L1C/L2A) and processing baseline are read from product names, GeoTIFF tags
and the product's MTD XML (:func:`product_info_from_name`, :func:`product_info_from_tags`,
:func:`product_info_from_mtd`) and decide whether the DNs carry the offset
(:func:`resolve_offset`). Reading the bands themselves is :mod:`engine.geo.sentinel2`'s.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ..errors import InputRefused, InvalidRequest
from .guard import inspect_file

if TYPE_CHECKING:
    from .sentinel2 import S2Stack

# ---------------------------------------------------------------------------------------------
# Band table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S2Band:
    """One Sentinel-2 MSI band.

    Attributes:
        name: canonical name, ``"B01"`` .. ``"B12"`` and ``"B8A"``.
        wavelength_nm: central wavelength of Sentinel-2A, nanometres.
        gsd_m: native ground sampling distance, metres (10, 20 or 60).
        mean: reference mean of the L1C digital numbers (fMoW-Sentinel, reference §6).
        std: reference standard deviation of the L1C digital numbers.
    """

    name: str
    wavelength_nm: float
    gsd_m: int
    mean: float
    std: float

    @property
    def lo(self) -> float:
        """Lower end of the reference stretch, DN: ``mean - 2 std``."""
        return self.mean - 2.0 * self.std

    @property
    def hi(self) -> float:
        """Upper end of the reference stretch, DN: ``mean + 2 std``."""
        return self.mean + 2.0 * self.std


# Means and stds are copied digit for digit from the reference (fMoW-Sentinel statistics); the
# stretch truncates to uint8, so rounding them would move pixels across integer boundaries.
_BAND_ROWS = (
    # name, wavelength (nm), GSD (m), mean (DN), std (DN)
    ("B01", 442.7, 60, 1370.19151926, 633.15169573),
    ("B02", 492.4, 10, 1184.3824625, 650.2842772),
    ("B03", 559.8, 10, 1120.77120066, 712.12507725),
    ("B04", 664.6, 10, 1136.26026392, 965.23119807),
    ("B05", 704.1, 20, 1263.73947144, 948.9819932),
    ("B06", 740.5, 20, 1645.40315151, 1108.06650639),
    ("B07", 782.8, 20, 1846.87040806, 1258.36394548),
    ("B08", 832.8, 10, 1762.59530783, 1233.1492281),
    ("B8A", 864.7, 20, 1972.62420416, 1364.38688993),
    ("B09", 945.1, 60, 582.72633433, 472.37967789),
    ("B10", 1373.5, 60, 14.77112979, 14.3114637),
    ("B11", 1613.7, 20, 1732.16362238, 1310.36996126),
    ("B12", 2202.4, 20, 1247.91870117, 1087.6020813),
)

#: The 13 bands keyed by canonical name, in the L1C product order.
BANDS: dict[str, S2Band] = {row[0]: S2Band(*row) for row in _BAND_ROWS}

#: Band order of a 13-band Level-1C stack (also the order of the reference statistics).
L1C_ORDER: tuple[str, ...] = tuple(BANDS)

#: Band order of a 12-band Level-2A stack (L2A has no cirrus band B10).
L2A_ORDER: tuple[str, ...] = tuple(b for b in L1C_ORDER if b != "B10")

#: The 10 bands the super-resolution model takes, in the model's channel order (reference §6:
#: B2/B4 swapped, B1, B9, B10 dropped).
MODEL_BANDS: tuple[str, ...] = ("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

#: Offset (DN) that processing baseline >= 04.00 adds to every band.
BASELINE_04_OFFSET_DN = 1000.0

_BAND_RE = re.compile(r"^B?0*(\d{1,2})(A?)$", re.IGNORECASE)


def canonical_band_name(name: str) -> str:
    """Return the canonical name of a Sentinel-2 band given any usual spelling.

    Accepts ``B1``/``B01``/``b01``/``1``, ``B8A``/``B8a``/``b8a``/``B08A``/``8A``.

    Raises:
        InvalidRequest: the name is not one of the 13 bands.
    """
    m = _BAND_RE.match(str(name).strip())
    if m:
        number, a_suffix = int(m.group(1)), bool(m.group(2))
        if a_suffix and number == 8:
            return "B8A"
        if not a_suffix and 1 <= number <= 12:
            return f"B{number:02d}"
    raise InvalidRequest(
        f"{name!r} is not a Sentinel-2 band; valid names are {', '.join(L1C_ORDER)} "
        "(B1 for B01, B8a for B8A and lowercase are accepted too)"
    )


def band_info(name: str) -> S2Band:
    """Look up a band in the table by any accepted spelling (see :func:`canonical_band_name`)."""
    return BANDS[canonical_band_name(name)]


def is_band_name(text: Optional[str]) -> bool:
    if not text:
        return False
    try:
        canonical_band_name(text)
    except InvalidRequest:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Product level and processing baseline
# ---------------------------------------------------------------------------------------------


def parse_baseline(value: Any) -> Optional[str]:
    """Normalise a processing baseline to ``"NN.NN"`` (e.g. ``"04.00"``).

    Accepts ``"04.00"``, ``"4.0"``, ``"N0400"``, ``"0400"``, ``4``, ``4.0``; ``None`` -> ``None``.

    Raises:
        InvalidRequest: the value is not a baseline.
    """
    if value is None:
        return None
    text = str(value).strip().upper()
    if text.startswith("N"):
        text = text[1:]
    if re.fullmatch(r"\d{4}", text):
        return f"{text[:2]}.{text[2:]}"
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isfinite(number) and 0 <= number < 100:
        return f"{number:05.2f}"
    raise InvalidRequest(
        f"processing baseline {value!r} is not understood; write it as in the product name "
        "(N0400) or metadata (04.00)"
    )


def parse_level(value: Any) -> Optional[str]:
    """Normalise a product level to ``"L1C"`` or ``"L2A"`` (accepts ``"1C"``, ``"Level-2A"``,
    ``"MSIL2A"``, ``"S2MSI1C"``, any case); ``None`` -> ``None``.

    Raises:
        InvalidRequest: the value is neither level.
    """
    if value is None:
        return None
    text = str(value).strip().upper()
    if text.endswith("1C"):
        return "L1C"
    if text.endswith("2A"):
        return "L2A"
    raise InvalidRequest(f"product level {value!r} is not understood; use L1C or L2A")


def _baseline_value(baseline: Optional[str]) -> Optional[float]:
    return None if baseline is None else float(baseline)


_LEVEL_RE = re.compile(r"MSI_?L(1C|2A)|S2MSI(1C|2A)|LEVEL-(1C|2A)", re.IGNORECASE)
# Current product names carry ``_N0400_``; granules of old (2015-2016) products end in ``_N02.01``.
_BASELINE_RE = re.compile(r"_N(\d{2})\.?(\d{2})(?=[_.]|$)", re.IGNORECASE)


def product_info_from_name(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {}
    m = _LEVEL_RE.search(text)
    if m:
        info["level"] = "L" + next(g for g in m.groups() if g).upper()
    m = _BASELINE_RE.search(text)
    if m:
        info["baseline"] = f"{m.group(1)}.{m.group(2)}"
    return info


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def product_info_from_mtd(xml_path: Path) -> dict[str, Any]:
    """Read level, baseline and ADD_OFFSET from a product MTD XML (MTD_MSIL1C.xml, ...)."""
    info: dict[str, Any] = {}
    try:
        root = ET.parse(inspect_file(xml_path, what="metadata")).getroot()
    except (ET.ParseError, OSError, InputRefused):  # outside a server's roots: not read, not used
        return info
    offsets: list[float] = []
    for elem in root.iter():
        name = _local_name(elem.tag)
        text = (elem.text or "").strip()
        if not text:
            continue
        if name == "PROCESSING_BASELINE" and "baseline" not in info:
            try:
                info["baseline"] = parse_baseline(text)
            except InvalidRequest:
                pass
        elif name in ("PROCESSING_LEVEL", "PRODUCT_TYPE") and "level" not in info:
            try:
                info["level"] = parse_level(text)
            except InvalidRequest:
                pass
        elif name in ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET"):
            try:
                offsets.append(float(text))
            except ValueError:
                pass
    if offsets:
        # The offset is the same (-1000) for every band in all baselines so far; keep the first.
        info["add_offset"] = offsets[0]
    return info


def product_info_from_tags(tags: Mapping[str, str]) -> dict[str, Any]:
    """Level, baseline and ADD_OFFSET from GeoTIFF tags (SENTINEL2 driver names, or any tag
    whose value is a product name)."""
    info: dict[str, Any] = {}
    for key, value in tags.items():
        k = key.upper()
        if "baseline" not in info and "PROCESSING_BASELINE" in k:
            try:
                info["baseline"] = parse_baseline(value)
            except InvalidRequest:
                pass
        elif "level" not in info and k in ("PRODUCT_TYPE", "PROCESSING_LEVEL", "LEVEL",
                                           "PRODUCT_LEVEL"):
            try:
                info["level"] = parse_level(value)
            except InvalidRequest:
                pass
        elif "add_offset" not in info and "ADD_OFFSET" in k:
            try:
                info["add_offset"] = float(value)
            except ValueError:
                pass
    for value in tags.values():
        for k, v in product_info_from_name(str(value)).items():
            info.setdefault(k, v)
    return info


def scale_offset_dn(scales: Sequence[float], offsets: Sequence[float]) -> Optional[float]:
    """DN offset implied by band scale/offset metadata (physical = DN*scale + offset).

    Only the Sentinel-2 +1000 DN offset is recognised (``offset/scale == -1000``, e.g. scale
    0.0001 with offset -0.1); any other scaling is not ours to interpret.
    """
    for scale, offset in zip(scales or (), offsets or ()):
        if scale and offset and abs(-offset / scale - BASELINE_04_OFFSET_DN) < 0.5:
            return -BASELINE_04_OFFSET_DN
    return None


def merge_info(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """First source that knows a field wins (sources in decreasing order of trust)."""
    out: dict[str, Any] = {}
    for src in sources:
        for k, v in src.items():
            if v is not None:
                out.setdefault(k, v)
    return out


def resolve_offset(user_baseline: Optional[str], info: Mapping[str, Any]) -> tuple[bool, float]:
    """Decide whether the DNs carry the baseline >= 04.00 offset, and its size (DN).

    A baseline stated by the user decides alone; otherwise a declared ADD_OFFSET wins over the
    baseline found in the product, because the offset is what the pixels actually carry.
    """
    if user_baseline is not None:
        return float(user_baseline) >= 4.0, BASELINE_04_OFFSET_DN
    add_offset = info.get("add_offset")
    if add_offset is not None:
        return add_offset != 0, abs(float(add_offset)) or BASELINE_04_OFFSET_DN
    baseline = _baseline_value(info.get("baseline"))
    if baseline is not None:
        return baseline >= 4.0, BASELINE_04_OFFSET_DN
    return False, BASELINE_04_OFFSET_DN


# ---------------------------------------------------------------------------------------------
# Radiometry
# ---------------------------------------------------------------------------------------------


def normalise_bands(dn: np.ndarray, band_names: Sequence[str]) -> np.ndarray:
    """The reference per-band stretch of fMoW-Sentinel L1C digital numbers to [0, 1].

    For each band b: ``x' = (x - lo) / (hi - lo) * 255`` with ``lo, hi = mean_b -/+ 2 std_b``,
    clipped to 0..255, truncated to an integer (as the reference's cast to uint8), then ÷255.
    Band order is kept (no selection or reordering; see :func:`model_bands`).

    Args:
        dn: (bands, H, W) or (bands,) digital numbers *without* the baseline >= 04.00 offset.
            Non-finite values are treated as the band mean (mid-grey) so they cannot spread.
        band_names: the band of each entry of ``dn``'s first axis.

    Returns:
        float32 array of ``dn``'s shape, values k/255 for integers k in 0..255.
    """
    dn = np.asarray(dn)
    names = [canonical_band_name(b) for b in band_names]
    if dn.shape[0] != len(names):
        raise InvalidRequest(
            f"{dn.shape[0]} bands given but {len(names)} band names ({', '.join(names)})"
        )
    out = np.empty(dn.shape, np.float32)
    for i, name in enumerate(names):
        info = BANDS[name]
        # float64 as in the reference (uint16 DN minus float64 statistics): float32 would move
        # values that sit near an integer across the truncation boundary.
        x = dn[i].astype(np.float64)
        x = np.where(np.isfinite(x), x, info.mean)
        scaled = np.clip((x - info.lo) / (info.hi - info.lo) * 255.0, 0.0, 255.0)
        out[i] = np.floor(scaled) / 255.0
    return out


def model_bands(dn: np.ndarray, band_names: Sequence[str]) -> np.ndarray:
    """Select and normalise the model's 10 bands from offset-free DNs (pure function).

    Equivalent to the reference's normalise-13, swap B2/B4, drop B1/B9/B10, since the stretch
    is per band. Returns float32 (10, H, W) in :data:`MODEL_BANDS` order.

    Raises:
        InvalidRequest: a model band is missing (the message names missing and found bands).
    """
    names = [canonical_band_name(b) for b in band_names]
    _require_model_bands(names)
    idx = [names.index(b) for b in MODEL_BANDS]
    return normalise_bands(np.asarray(dn)[idx], MODEL_BANDS)


def _require_model_bands(names: Sequence[str]) -> None:
    missing = [b for b in MODEL_BANDS if b not in names]
    if missing:
        raise InvalidRequest(
            "the Sentinel-2 super-resolution model needs bands "
            f"{', '.join(sorted(MODEL_BANDS, key=L1C_ORDER.index))}; missing: "
            f"{', '.join(sorted(missing, key=L1C_ORDER.index))}; found: "
            f"{', '.join(names) if names else 'none'}"
        )


class ModelInput(NamedTuple):
    """What :func:`to_model_input` returns (unpacks as ``array, valid, warnings``)."""

    #: float32 (10, H, W) in [0, 1], channels in :data:`MODEL_BANDS` order.
    array: np.ndarray
    #: bool (H, W): True where all 10 model bands hold data; elsewhere ``array`` is mid-grey
    #: filler and the caller must write nodata.
    valid: np.ndarray
    #: human-readable warnings (radiometry differs from training, unknown baseline, ...).
    warnings: list[str]


def to_model_input(stack: S2Stack) -> ModelInput:
    """Convert a stack into the fMoW-Sentinel super-resolution checkpoint's input (reference §6).

    Removes the baseline >= 04.00 offset when the stack carries it, fills nodata with the band's
    reference mean (so nodata never spreads; the pixels are reported in ``valid``), applies
    :func:`normalise_bands` and selects/reorders to :data:`MODEL_BANDS`.

    Raises:
        InvalidRequest: a model band is missing from the stack.
    """
    names = list(stack.bands)
    _require_model_bands(names)
    warnings: list[str] = []
    if stack.level == "L2A":
        warnings.append(
            "the input is Level-2A surface reflectance but the super-resolution checkpoint was "
            "trained on Level-1C top-of-atmosphere digital numbers; colours and contrast may "
            "differ from what the model expects (use the L1C product for best results)"
        )
    elif stack.level is None:
        warnings.append(
            "the product level is unknown; assuming Level-1C top-of-atmosphere digital numbers "
            "(give --level L2A if the input is surface reflectance)"
        )
    if stack.baseline is None and not stack.offset_applied:
        warnings.append(
            "the processing baseline is unknown; assuming digital numbers without the +1000 "
            "offset (baseline before 04.00, i.e. processed before 25 January 2022); give "
            "--baseline 04.00 if the product is newer, or the image will look too bright"
        )
    offset = stack.offset_dn if stack.offset_applied else 0.0
    idx = [names.index(b) for b in MODEL_BANDS]
    array = np.empty((len(MODEL_BANDS), stack.height, stack.width), np.float32)
    valid = np.ones(stack.shape, bool)
    for out_i, (name, src_i) in enumerate(zip(MODEL_BANDS, idx)):
        dn = stack.array[src_i]
        ok = np.isfinite(dn)
        valid &= ok
        # offset removed before the fill so that filled pixels land exactly on the band mean
        x = np.where(ok, dn.astype(np.float64) - offset, BANDS[name].mean)
        array[out_i] = normalise_bands(x[None], (name,))[0]
    n_bad = int((~valid).sum())
    if n_bad:
        warnings.append(
            f"{n_bad} of {valid.size} pixels are nodata in at least one band; they are filled "
            "for the model and written as nodata in the output"
        )
    return ModelInput(array, valid, warnings)


__all__ = [
    "BANDS",
    "BASELINE_04_OFFSET_DN",
    "L1C_ORDER",
    "L2A_ORDER",
    "MODEL_BANDS",
    "ModelInput",
    "S2Band",
    "band_info",
    "canonical_band_name",
    "is_band_name",
    "merge_info",
    "model_bands",
    "normalise_bands",
    "parse_baseline",
    "parse_level",
    "product_info_from_mtd",
    "product_info_from_name",
    "product_info_from_tags",
    "resolve_offset",
    "scale_offset_dn",
    "to_model_input",
]
