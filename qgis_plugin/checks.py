"""Checks the dock makes before it starts a job, and the engine's warnings in the dock's words.

The training ranges mirror ``engine.metadata`` (``TRAINING_GSD_RANGE_M``, ``TRAINING_YEAR_RANGE``,
``MAX_TRAINING_CLOUD_COVER``); QGIS's Python never imports the engine, so a test compares the two
(``tests/plugin/test_usability.py``). Every warning carries advice the user can follow in the dock.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass
from typing import Optional

#: GSD (m/px) the released models saw, loosely (the engine warns outside it).
GSD_RANGE_M: tuple[float, float] = (0.2, 20.0)
#: Acquisition years of the training data.
YEAR_RANGE: tuple[int, int] = (2000, 2024)
#: Cloud cover fraction above which the training data is thin.
MAX_CLOUD_COVER = 0.5


@dataclass(frozen=True)
class RangeWarning:
    """One value outside the training range: what, and what to do about it in the dock."""

    problem: str
    advice: str

    def text(self) -> str:
        return f"{self.problem}. {self.advice}"


def _km(metres: float) -> str:
    return f"{metres / 1000:.3g} km" if metres >= 1000 else f"{metres:.0f} m"


def gsd_warning(gsd_m: Optional[float], *, longest_px: Optional[int] = None, ground_m: Optional[float] = None,
                max_px: int = 4096, factor: Optional[int] = None, input_gsd_m: Optional[float] = None,
                ) -> Optional[RangeWarning]:
    """A warning when ``gsd_m`` is outside :data:`GSD_RANGE_M`, with advice that is possible.

    For Generate (``longest_px`` and ``ground_m``, the longest side on the ground, given): a
    larger *Longest side* when that stays within ``max_px``, else a smaller extent. For
    Super-resolve (``factor`` and ``input_gsd_m``): a factor that lands in range, if any. For an
    input layer: resample it.
    """
    if gsd_m is None or not math.isfinite(gsd_m) or gsd_m <= 0:
        return None
    lo, hi = GSD_RANGE_M
    if lo <= gsd_m <= hi:
        return None
    problem = (f"the ground sample distance is {gsd_m:.3g} m/px, outside the {lo:g}–{hi:g} m/px of the "
               "model's training imagery: expect unrealistic output")
    if longest_px and ground_m:
        if gsd_m > hi:
            need = int(math.ceil(ground_m / hi / 8.0) * 8)
            if need <= max_px:
                return RangeWarning(problem, f"Raise Longest side to at least {need} px, or draw a smaller extent.")
            return RangeWarning(problem, f"Draw a smaller extent: at most {_km(hi * longest_px)} across for "
                                         f"{longest_px} px (or {_km(hi * max_px)} at {max_px} px).")
        need = int(max(8, math.floor(ground_m / lo / 8.0) * 8))
        return RangeWarning(problem, f"Lower Longest side to {need} px or less, or draw a larger extent.")
    if factor and input_gsd_m:
        good = [f for f in (1, 2, 4, 8, 16) if lo <= input_gsd_m / f <= hi]
        if good:
            return RangeWarning(problem, f"Use a Factor of {good[-1]} (or {', '.join(map(str, good))}).")
        return RangeWarning(problem, "No factor brings this layer into range; resample it first "
                                     "(Raster → Projections → Warp).")
    return RangeWarning(problem, f"Resample the layer to {lo:g}–{hi:g} m/px first (Raster → Projections → Warp), "
                                 "or accept the result as an extrapolation.")


def date_warning(date: Optional[_dt.date], field: str = "Date") -> Optional[RangeWarning]:
    """A warning when ``date`` is outside :data:`YEAR_RANGE`; an unknown date is fine."""
    if date is None:
        return None
    lo, hi = YEAR_RANGE
    if lo <= date.year <= hi:
        return None
    return RangeWarning(f"the date {date.isoformat()} is outside the training data's {lo}–{hi}: the model "
                        "extrapolates", f"Set {field} to a day in {lo}–{hi}, or leave it if that is intended.")


def cloud_warning(cloud: Optional[float]) -> Optional[RangeWarning]:
    if cloud is None or cloud <= MAX_CLOUD_COVER:
        return None
    return RangeWarning(f"cloud cover {cloud * 100:.0f} % is above {MAX_CLOUD_COVER * 100:.0f} %, which the "
                        "mostly clear training data barely covers", "Lower Cloud cover, or untick it.")


# -- the engine's warnings, in the dock's words -------------------------------------------------------

#: CLI flags the engine's messages name, and what the dock calls the same thing.
DOCK_WORDS: dict[str, dict[str, str]] = {
    "generate": {"--size": "Longest side", "--bbox": "the drawn extent", "--date": "Date",
                 "--steps": "Steps (Advanced)", "--cloud-cover": "Cloud cover", "--crs": "the map's CRS"},
    "inpaint": {"--date": "Date (Advanced)", "--rgb-bands": "RGB bands (Advanced)", "--bbox": "the layer's extent",
                "--crs": "the layer's CRS (Layer Properties → Source)", "--steps": "Steps (Advanced)",
                "--mask-rule": "Rule", "--mask": "Mask"},
    "superres": {"--date": "Date (Advanced)", "--bands": "Bands (or the band names in the table)",
                 "--level": "Product level (Advanced)", "--baseline": "Baseline (Advanced)",
                 "--bbox": "Extent", "--factor": "Factor", "--crs": "the layer's CRS (Layer Properties → Source)",
                 "--steps": "Steps (Advanced)"},
    "temporal": {"--input-date": "the dates in the layer table", "--input-dates": "the dates in the layer table",
                 "--date": "Target date", "--bbox": "the layers' extent",
                 "--crs": "the layers' CRS (Layer Properties → Source)", "--steps": "Steps (Advanced)"},
    "extend": {"--date": "Date (Advanced)", "--rgb-bands": "RGB bands (Advanced)", "--bbox": "the new extent",
               "--crs": "the layer's CRS (Layer Properties → Source)", "--steps": "Steps (Advanced)",
               "--guidance": "Guidance (Advanced)", "--cloud-cover": "Cloud cover (Advanced)",
               "--max-pixels": "the pixel limit the engine was started with"},
}
DOCK_WORDS["generate"].update({"--gsd": "Ground resolution (Size)", "--width": "Longest side",
                               "--height": "Longest side", "--guidance": "Guidance (Advanced)"})
for _task in ("superres", "inpaint", "temporal", "generate"):
    DOCK_WORDS[_task].setdefault("--spread", "Uncertainty (Advanced)")
for _task in DOCK_WORDS:  # what every tab has (the engine's messages name them too)
    DOCK_WORDS[_task].setdefault("--seed", "Seed (Advanced)")
    DOCK_WORDS[_task].setdefault("--model", "the Model (DiffusionSat settings)")
    DOCK_WORDS[_task].setdefault("--max-pixels", "the pixel limit the engine was started with")


def in_dock_words(message: str, task: str) -> str:
    """``message`` with each CLI flag it names (``--date``) replaced by the dock's field."""
    words = DOCK_WORDS.get(task, {})

    def swap(m: re.Match) -> str:
        flag = m.group(0)
        return words.get(flag, words.get(flag.rstrip("s"), flag))

    # the longest flags first: --input-dates before --input-date before --date
    said = re.sub(r"--[a-z][a-z0-9-]*", swap, str(message))
    # "a smaller --bbox" became "a smaller the new extent": drop the field's own article
    return re.sub(r"\b(an?|any|another) (smaller |larger |other )?(the|a|an) ", r"\1 \2", said)
