"""Mask rules: which values of a QA / classification / probability raster mean "masked".

A rule (:func:`parse_mask_rule`, grammar in :data:`MASK_RULE_GRAMMAR`) names bit fields (Landsat
QA_PIXEL, Sentinel-2 QA60), class values (Sentinel-2 SCL, Fmask) or thresholds (cloud
probability); :data:`MASK_PRESETS` holds the named rules whose product definitions we can cite.
Rules are pure functions of arrays; reading them from rasters onto a grid is
:mod:`engine.geo.masks`'s work.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ..errors import InvalidRequest

MASK_RULE_GRAMMAR = """\
A mask rule is one or more terms joined by '|' (a pixel is masked when any term matches):
  bits:LO-HI<op>N  unsigned field of bits LO..HI inclusive (bit 0 = least significant)
                   compared with N; <op> is one of = != >= <= > <   e.g. bits:14-15=3, bits:8-9>=2
  bits:B<op>N      the same for a single bit                          e.g. bits:3=0
  bit:B            bit B is set                                       e.g. bit:3|bit:5
  values:V,V,...   the pixel value is one of these (class values)     e.g. values:3,8,9,10
  gt:X ge:X lt:X le:X  threshold on the value (e.g. a probability)    e.g. gt:0.4
  nonzero          any value other than 0
  nodata           the raster's nodata value (or NaN)
  a preset name:   """

#: Named rules: name -> (rule, what it means). Only rules whose product definitions we can cite.
MASK_PRESETS: dict[str, tuple[str, str]] = {
    "landsat-cloud": (
        "bit:1|bit:2|bit:3|bit:4",
        "Landsat Collection 2 QA_PIXEL: dilated cloud (bit 1), cirrus (2), cloud (3), "
        "cloud shadow (4)",
    ),
    "landsat-fill": ("bit:0", "Landsat Collection 2 QA_PIXEL: fill (bit 0)"),
    "s2-scl-cloud": (
        "values:3,8,9,10",
        "Sentinel-2 L2A scene classification (SCL): cloud shadows (3), cloud medium "
        "probability (8), cloud high probability (9), thin cirrus (10)",
    ),
    "s2-scl-invalid": (
        "values:0,1",
        "Sentinel-2 L2A scene classification (SCL): no data (0), saturated or defective (1)",
    ),
    "s2-qa60-cloud": (
        "bit:10|bit:11",
        "Sentinel-2 L1C QA60 band: opaque clouds (bit 10), cirrus (bit 11)",
    ),
    "fmask-cloud": (
        "values:2,4",
        "Fmask 4 output classes: cloud shadow (2), cloud (4) "
        "(0 clear land, 1 clear water, 3 snow, 255 no observation)",
    ),
}
MASK_PRESETS["fmask"] = (MASK_PRESETS["fmask-cloud"][0], "same as fmask-cloud")


def _grammar() -> str:
    return MASK_RULE_GRAMMAR + ", ".join(sorted(MASK_PRESETS)) + "\n"


_OPS = {
    "=": np.equal, "==": np.equal, "!=": np.not_equal, ">=": np.greater_equal,
    "<=": np.less_equal, ">": np.greater, "<": np.less,
}
_BITS_RE = re.compile(r"^bits:(\d+)(?:-(\d+))?\s*(==|=|!=|>=|<=|>|<)\s*(\d+)$")
_BIT_RE = re.compile(r"^bit:(\d+)$")
_VALUES_RE = re.compile(r"^values:(.+)$")
_THRESH_RE = re.compile(r"^(gt|ge|lt|le):(.+)$")
_THRESH_OPS = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal}


def _number(text: str) -> float | int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        value = float(text)  # ValueError is turned into InvalidRequest by the caller
        if not math.isfinite(value):
            raise ValueError(text)
        return value


@dataclass(frozen=True)
class MaskTerm:
    """One term of a :class:`MaskRule` (see :data:`MASK_RULE_GRAMMAR`)."""

    kind: str  # "bits", "values", "threshold", "nonzero", "nodata"
    lo: int = 0
    hi: int = 0
    op: str = "="
    value: Any = None
    text: str = ""

    def evaluate(self, data: np.ndarray, nodata: Optional[float]) -> np.ndarray:
        finite = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, bool)
        if self.kind == "nodata":
            out = ~finite
            if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
                out |= data == nodata
            return out
        if self.kind == "nonzero":
            return finite & (data != 0)
        if self.kind == "values":
            return finite & np.isin(data, np.asarray(self.value))
        if self.kind == "threshold":
            with np.errstate(invalid="ignore"):
                return finite & _THRESH_OPS[self.op](data, self.value)
        # bit fields need integers; float rasters holding whole numbers (e.g. a QA band exported
        # as float) are accepted, NaN never matches
        ints = _as_integers(data, self.text, finite)
        width = self.hi - self.lo + 1
        field = (ints >> np.int64(self.lo)) & np.int64((1 << width) - 1)
        return finite & _OPS[self.op](field, self.value)


def _as_integers(data: np.ndarray, term: str, finite: np.ndarray) -> np.ndarray:
    if data.dtype.kind in "iub":
        return data.astype(np.int64)
    if data.dtype.kind == "f":
        values = data[finite]
        if np.all(values == np.round(values)):
            return np.where(finite, data, 0).astype(np.int64)
    raise InvalidRequest(
        f"the bit rule {term!r} needs a raster of whole numbers (a QA band); this one holds "
        f"{data.dtype} values with fractions. Use gt:/ge:/values: for such rasters"
    )


@dataclass(frozen=True)
class MaskRule:
    """A parsed mask rule: masked where any term matches. Build with :func:`parse_mask_rule`."""

    text: str
    terms: tuple[MaskTerm, ...]

    def __call__(self, data: np.ndarray, nodata: Optional[float] = None) -> np.ndarray:
        """Evaluate on an array (any shape); True = masked."""
        data = np.asarray(data)
        out = np.zeros(data.shape, bool)
        for term in self.terms:
            out |= term.evaluate(data, nodata)
        return out


def _parse_term(term: str, rule_text: str, depth: int = 0) -> list[MaskTerm]:
    def fail(why: str) -> InvalidRequest:
        return InvalidRequest(f"mask rule {rule_text!r}: {why}\n{_grammar()}")

    t = re.sub(r"\s+", "", term).lower()
    if not t:
        raise fail("empty term (two '|' in a row, or a '|' at an end)")
    if t in MASK_PRESETS:
        if depth > 2:
            raise fail(f"preset {t!r} refers to itself")
        out: list[MaskTerm] = []
        for sub in MASK_PRESETS[t][0].split("|"):
            out.extend(_parse_term(sub, rule_text, depth + 1))
        return out
    if t in ("nodata", "nonzero"):
        return [MaskTerm(kind=t, text=t)]
    m = _BITS_RE.match(t)
    if m:
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        value = int(m.group(4))
        if hi < lo:
            raise fail(f"in {term!r} the first bit must not exceed the last")
        if hi > 62:
            raise fail(f"in {term!r} bit {hi} is beyond the 63 bits a pixel can hold")
        if value >= 1 << (hi - lo + 1):
            raise fail(f"in {term!r} {value} does not fit in {hi - lo + 1} bit(s)")
        return [MaskTerm("bits", lo, hi, m.group(3), value, t)]
    m = _BIT_RE.match(t)
    if m:
        bit = int(m.group(1))
        if bit > 62:
            raise fail(f"in {term!r} bit {bit} is beyond the 63 bits a pixel can hold")
        return [MaskTerm("bits", bit, bit, "=", 1, t)]
    m = _VALUES_RE.match(t)
    if m:
        try:
            values = tuple(_number(v) for v in m.group(1).split(","))
        except ValueError:
            raise fail(f"{term!r} must list numbers separated by commas") from None
        return [MaskTerm("values", value=values, text=t)]
    m = _THRESH_RE.match(t)
    if m:
        try:
            value = _number(m.group(2))
        except ValueError:
            raise fail(f"{term!r} needs a number after the colon") from None
        return [MaskTerm("threshold", op=m.group(1), value=value, text=t)]
    raise fail(f"term {term.strip()!r} is not understood")


def parse_mask_rule(text: str) -> MaskRule:
    """Parse a mask rule (grammar in :data:`MASK_RULE_GRAMMAR`; presets in
    :data:`MASK_PRESETS`).

    Raises:
        InvalidRequest: the rule is malformed; the message shows the grammar.
    """
    if isinstance(text, MaskRule):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"mask rule {text!r} is empty\n{_grammar()}")
    terms: list[MaskTerm] = []
    for part in text.split("|"):
        terms.extend(_parse_term(part, text))
    return MaskRule(text.strip(), tuple(terms))


def mask_from_bits(qa_array: np.ndarray, rule: Union[str, MaskRule],
                   nodata: Optional[float] = None) -> np.ndarray:
    """Evaluate a mask rule on a QA / class / probability array (any shape).

    Args:
        qa_array: the raster values (e.g. Landsat QA_PIXEL, Sentinel-2 SCL, a 0..1 probability).
        rule: a rule string or :class:`MaskRule`.
        nodata: the value the ``nodata`` term matches (NaN always matches it).

    Returns:
        bool array of ``qa_array``'s shape, True = masked.
    """
    return parse_mask_rule(rule)(qa_array, nodata)


__all__ = [
    "MASK_PRESETS",
    "MASK_RULE_GRAMMAR",
    "MaskRule",
    "MaskTerm",
    "mask_from_bits",
    "parse_mask_rule",
]
