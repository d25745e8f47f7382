"""Result layers the analyst can tell apart, and band layers matched to Sentinel-2 band names.

- :func:`result_name`: ``<input or Generated> · <what> · <date or undated> · seed N [synthetic]``,
  unique among the project's layers (`` (2)``, `` (3)``… when needed).
- :func:`copy_style`: the input layer's renderer on the result when their bands match.
- :func:`band_name_of`: the Sentinel-2 band of a layer from its name, file name or band description
  (``B04``, ``s2_B04``, ``T33TTG_20210615_B8A_20m``).
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Iterable, Mapping, Optional

from qgis.core import QgsProject, QgsRasterLayer

from .requests import guess_band_name

#: The marker in every result's name (and so in the legend).
SYNTHETIC_MARK = "[synthetic]"
#: Sentinel-2 band order (for sorting matched band layers).
S2_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")

_WHAT = {"generate": "generated", "inpaint": "in-painted", "superres": "super-resolved", "temporal": "for",
         "extend": "extended"}


def result_name(task: str, *, source: str = "", date: Optional[_dt.date] = None,
                result: Optional[Mapping[str, Any]] = None, detail: str = "",
                project: Optional[QgsProject] = None) -> str:
    """A descriptive layer name, unique in ``project``, ending with :data:`SYNTHETIC_MARK`."""
    result = result or {}
    parts = []
    if task == "generate":
        parts.append("Generated")
    elif task == "temporal":
        parts.append(source or "Temporal")
    else:
        parts.append(f"{source or 'layer'} · {_WHAT.get(task, task)}")
    if detail:
        parts.append(detail)
    day = date.isoformat() if date else "undated"
    parts.append(f"for {day}" if task == "temporal" else day)
    if result.get("seed") is not None:
        parts.append(f"seed {result['seed']}")
    base = " · ".join(parts) + f" {SYNTHETIC_MARK}"
    taken = {lyr.name() for lyr in (project or QgsProject.instance()).mapLayers().values()}
    name, n = base, 2
    while name in taken:
        name = f"{base} ({n})"
        n += 1
    return name


def spread_name(image_name: str, seeds=None) -> str:
    """The spread map's layer name: its image's, with what it shows before the synthetic marker."""
    what = f"spread over {seeds} seeds" if seeds else "spread"
    base = image_name.replace(f" {SYNTHETIC_MARK}", "")
    return f"{base} · {what} {SYNTHETIC_MARK}"


def copy_style(source: Optional[QgsRasterLayer], target: QgsRasterLayer) -> bool:
    """Give ``target`` the renderer of ``source`` when both have the same bands; True if copied."""
    if source is None or not source.isValid() or source.renderer() is None:
        return False
    if source.bandCount() != target.bandCount():
        return False
    target.setRenderer(source.renderer().clone())
    target.triggerRepaint()
    return True


def band_descriptions(layer: QgsRasterLayer) -> list[str]:
    """The GDAL band descriptions of ``layer`` ('' where none)."""
    try:
        from osgeo import gdal
    except ImportError:  # pragma: no cover - QGIS always has GDAL's bindings
        return []
    source = layer.source().split("|")[0]
    ds = gdal.Open(source) if os.path.exists(source) else None
    if ds is None:
        return ["" for _ in range(layer.bandCount())]
    return [ds.GetRasterBand(i + 1).GetDescription() or "" for i in range(ds.RasterCount)]


def band_name_of(layer: QgsRasterLayer) -> Optional[str]:
    """The Sentinel-2 band ``layer`` holds: from its layer name, file name, or band description."""
    candidates = [layer.name(), os.path.basename(layer.source().split("|")[0])]
    candidates += band_descriptions(layer)[:1]
    for text in candidates:
        name = guess_band_name(text)
        if name:
            return name
    return None


def band_names_of(layer: QgsRasterLayer) -> Optional[list[str]]:
    """Each band's Sentinel-2 name from the band descriptions (``s2_B04`` → ``B04``); None unless
    every band has one."""
    names = [guess_band_name(d) for d in band_descriptions(layer)]
    return names if names and all(names) else None  # type: ignore[return-value]


def sort_by_band(pairs: Iterable[tuple[Any, Optional[str]]]) -> list[tuple[Any, Optional[str]]]:
    """``(layer, band)`` pairs in Sentinel-2 band order, unnamed ones last."""
    def key(pair):
        band = pair[1]
        return S2_ORDER.index(band) if band in S2_ORDER else len(S2_ORDER)
    return sorted(pairs, key=key)
