"""Results as map layers: where they are written, and how they are added.

Outputs go to ``<project folder>/diffusionsat/`` (or, for an unsaved project, the configured
folder, default ``~/DiffusionSat``) under names that never overwrite. A result layer is added to
the "DiffusionSat" group with:

- temporal properties active, fixed to the requested date (the whole day), and the temporal
  controller's range widened to include it when temporal navigation is on;
- provenance in its metadata (abstract and keywords: synthetic, task, model, seed, prompt);
- an RGB style (bands chosen by their descriptions, else 1/2/3; 0..255 for 8-bit data).

A spread map (``spread``: the per-pixel standard deviation of brightness over several seeds) is
added under its image with a colour ramp whose legend says what low and high values mean
(:func:`style_spread`).
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from qgis.core import (
    QgsColorRampShader,
    QgsContrastEnhancement,
    QgsDateTimeRange,
    QgsLayerMetadata,
    QgsLayerTreeRegistryBridge,
    QgsMultiBandColorRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRasterShader,
    QgsSingleBandPseudoColorRenderer,
    QgsStyle,
)
from qgis.PyQt.QtCore import QDate, QDateTime, QTime

from .compat import RAMP_INTERPOLATED, RASTER_FIXED_RANGE

GROUP_NAME = "DiffusionSat"
KEYWORD_VOCABULARY = "DiffusionSat"


def output_folder(project: Optional[QgsProject] = None, fallback: Optional[Path] = None) -> Path:
    """``<project dir>/diffusionsat`` for a saved project, else ``fallback`` (~/DiffusionSat)."""
    project = project or QgsProject.instance()
    home = project.absolutePath() if project.fileName() else ""
    folder = Path(home) / "diffusionsat" if home else (fallback or Path.home() / "DiffusionSat")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def unique_path(folder: Path, stem: str, suffix: str = ".tif") -> Path:
    """``folder/stem.tif``, or ``stem_2.tif``, ``stem_3.tif``… whichever does not exist yet."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "diffusionsat"
    candidate = folder / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{n}{suffix}"
        n += 1
    # Reserve the name so two jobs started at once cannot pick the same file.
    candidate.touch()
    return candidate


def output_stem(task: str, date: Optional[_dt.date] = None) -> str:
    """``diffusionsat_<task>`` (numbered by :func:`unique_path`). Neither the run time nor the
    requested date is put in the name: a date in a file name reads as an acquisition date (to
    QGIS users, to the engine, to other tools), and the output's date is in its tags and its
    temporal properties. ``date`` is accepted for the callers' convenience and not used."""
    return f"diffusionsat_{task}"


def day_range(date: _dt.date) -> QgsDateTimeRange:
    """The whole day ``date`` [00:00, next day 00:00)."""
    begin = QDateTime(QDate(date.year, date.month, date.day), QTime(0, 0, 0))
    return QgsDateTimeRange(begin, begin.addDays(1), True, False)


def set_temporal_range(layer: QgsRasterLayer, date: _dt.date) -> None:
    props = layer.temporalProperties()
    props.setMode(RASTER_FIXED_RANGE)
    props.setFixedTemporalRange(day_range(date))
    props.setIsActive(True)


def extend_temporal_controller(canvas, date: _dt.date, project: Optional[QgsProject] = None) -> bool:
    """Widen the temporal controller's (and project's) range to include ``date`` when temporal
    navigation is on; return whether it changed."""
    if canvas is None:
        return False
    controller = canvas.temporalController() if hasattr(canvas, "temporalController") else None
    if controller is None or not hasattr(controller, "temporalExtents"):
        return False
    mode = controller.navigationMode()
    # NavigationOff (3.22) and Qgis.TemporalNavigationMode.Disabled (3.36+) are both 0.
    if int(getattr(mode, "value", mode)) == 0:
        return False
    rng = day_range(date)
    current = controller.temporalExtents()
    begin, end = current.begin(), current.end()
    new_begin = rng.begin() if not begin.isValid() or rng.begin() < begin else begin
    new_end = rng.end() if not end.isValid() or rng.end() > end else end
    if new_begin == begin and new_end == end:
        return False
    widened = QgsDateTimeRange(new_begin, new_end)
    controller.setTemporalExtents(widened)
    project = project or QgsProject.instance()
    if hasattr(project, "timeSettings"):
        project.timeSettings().setTemporalRange(widened)
    return True


def file_tags(path: str) -> dict[str, str]:
    """The GDAL metadata tags of a raster (the engine writes its provenance there)."""
    try:
        from osgeo import gdal
    except ImportError:
        return {}
    ds = gdal.Open(str(path))
    return dict(ds.GetMetadata() or {}) if ds is not None else {}


def provenance(path: str, result: Optional[Mapping[str, Any]] = None,
               request: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Provenance of an output: the file's tags, completed by the engine's result and request."""
    info: dict[str, Any] = {}
    tags = file_tags(path)
    for key in ("synthetic", "task", "model", "seed", "prompt", "steps", "guidance", "scheduler",
                "software", "created", "device"):
        if key in tags:
            info[key] = tags[key]
    for source in (result or {}), (request or {}):
        for key in ("task", "model", "seed", "prompt", "date"):
            if key not in info and source.get(key) not in (None, ""):
                info[key] = source[key]
    info.setdefault("synthetic", "true")
    return info


def set_provenance(layer: QgsRasterLayer, info: Mapping[str, Any], warnings=()) -> None:
    """Write provenance into the layer's metadata (abstract + DiffusionSat keywords)."""
    md: QgsLayerMetadata = layer.metadata()
    task = info.get("task", "generate")
    md.setTitle(layer.name())
    lines = [
        "AI-generated (synthetic) image made with DiffusionSat; it is not an observation.",
        *(f"{k}: {v}" for k, v in info.items()),
    ]
    if warnings:
        lines.append("warnings: " + "; ".join(str(w) for w in warnings))
    md.setAbstract("\n".join(lines))
    keywords = ["synthetic", f"task:{task}"]
    for key in ("model", "seed", "prompt", "date"):
        if info.get(key) not in (None, ""):
            keywords.append(f"{key}:{info[key]}")
    md.addKeywords(KEYWORD_VOCABULARY, keywords)
    layer.setMetadata(md)


def band_descriptions(path: str) -> list[str]:
    try:
        from osgeo import gdal
    except ImportError:
        return []
    ds = gdal.Open(str(path))
    if ds is None:
        return []
    return [(ds.GetRasterBand(i + 1).GetDescription() or "").strip().lower() for i in range(ds.RasterCount)]


_RGB_NAMES = {
    "red": ("red", "b04", "b4", "r"),
    "green": ("green", "b03", "b3", "g"),
    "blue": ("blue", "b02", "b2", "b"),
}


def rgb_bands(descriptions: list[str], count: int) -> tuple[int, int, int]:
    """1-based (red, green, blue) band numbers from band descriptions, else 1/2/3."""
    picked = []
    for colour in ("red", "green", "blue"):
        names = _RGB_NAMES[colour]
        idx = next((i + 1 for i, d in enumerate(descriptions) if d in names), None)
        picked.append(idx)
    if all(picked) and len(set(picked)) == 3:
        return picked[0], picked[1], picked[2]
    if count >= 3:
        return 1, 2, 3
    return 1, 1, 1


def apply_rgb_style(layer: QgsRasterLayer) -> None:
    """An RGB renderer; 8-bit data is stretched 0..255, other types 2–98 % of their values."""
    provider = layer.dataProvider()
    count = layer.bandCount()
    r, g, b = rgb_bands(band_descriptions(layer.source()), count)
    renderer = QgsMultiBandColorRenderer(provider, r, g, b)
    from qgis.core import Qgis

    byte_types = {getattr(Qgis.DataType, "Byte", None), getattr(Qgis, "Byte", None)}
    for band, setter in ((r, renderer.setRedContrastEnhancement), (g, renderer.setGreenContrastEnhancement),
                         (b, renderer.setBlueContrastEnhancement)):
        data_type = provider.dataType(band)
        ce = QgsContrastEnhancement(data_type)
        ce.setContrastEnhancementAlgorithm(QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum)
        if data_type in byte_types:
            lo, hi = 0.0, 255.0
        else:
            lo, hi = provider.cumulativeCut(band, 0.02, 0.98, layer.extent(), 250000)
        ce.setMinimumValue(lo)
        ce.setMaximumValue(hi)
        setter(ce)
    layer.setRenderer(renderer)


#: The spread map's colour ramp (QGIS's default style has it) and the legend's stops.
SPREAD_RAMP = "Magma"
SPREAD_STOPS = 5


def style_spread(layer: QgsRasterLayer) -> list[tuple[float, str]]:
    """A colour ramp on a spread map, from 0 (the seeds agree) to its 98th percentile (the model
    guesses); the legend's labels say so. Returns the (value, label) stops."""
    provider = layer.dataProvider()
    _, hi = provider.cumulativeCut(1, 0.0, 0.98, layer.extent(), 250000)
    hi = float(hi) if hi and hi > 0 else 1.0
    ramp = QgsStyle.defaultStyle().colorRamp(SPREAD_RAMP)
    stops = []
    items = []
    for i in range(SPREAD_STOPS):
        value = hi * i / (SPREAD_STOPS - 1)
        label = f"{value:.3f}"
        if i == 0:
            label += " (the seeds agree)"
        elif i == SPREAD_STOPS - 1:
            label += " or more (the model is guessing)"
        stops.append((value, label))
        colour = ramp.color(i / (SPREAD_STOPS - 1)) if ramp is not None else None
        items.append(QgsColorRampShader.ColorRampItem(value, colour, label) if colour is not None else
                     QgsColorRampShader.ColorRampItem(value, _grey(i), label))
    shader_fn = QgsColorRampShader(0.0, hi)
    shader_fn.setColorRampType(RAMP_INTERPOLATED)
    shader_fn.setColorRampItemList(items)
    shader_fn.setClip(False)  # values above the top stop take its colour
    _label_continuous_legend(shader_fn, stops)
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_fn)
    renderer = QgsSingleBandPseudoColorRenderer(provider, 1, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(hi)
    layer.setRenderer(renderer)
    return stops


def _label_continuous_legend(shader_fn, stops: list[tuple[float, str]]) -> None:
    """QGIS (3.18+) draws an interpolated ramp's legend as one continuous bar labelled with the raw
    minimum and maximum (``0`` and ``0.172415``), not with the stops' labels: give the bar's two
    ends the stops' words."""
    try:
        from qgis.core import QgsColorRampLegendNodeSettings
    except ImportError:  # older QGIS: the legend lists the stops with their labels
        return
    settings = QgsColorRampLegendNodeSettings(shader_fn.legendSettings() or QgsColorRampLegendNodeSettings())
    settings.setMinimumLabel(stops[0][1])
    settings.setMaximumLabel(stops[-1][1])
    shader_fn.setLegendSettings(settings)


def _grey(i: int):
    from qgis.PyQt.QtGui import QColor

    level = int(255 * i / (SPREAD_STOPS - 1))
    return QColor(level, level, level)


def add_spread_layer(path: str, name: str, *, image: Optional[QgsRasterLayer] = None,
                     date: Optional[_dt.date] = None, info: Optional[Mapping[str, Any]] = None,
                     project: Optional[QgsProject] = None) -> QgsRasterLayer:
    """Add a spread map as a styled layer just under its image in the "DiffusionSat" group."""
    project = project or QgsProject.instance()
    layer = QgsRasterLayer(str(path), name, "gdal")
    if not layer.isValid():
        raise OSError(f"QGIS cannot open the spread map {path}")
    style_spread(layer)
    if date is not None:
        set_temporal_range(layer, date)
    set_provenance(layer, info or provenance(path))
    project.addMapLayer(layer, False)
    group = result_group(project)
    below = 0
    if image is not None:
        node = group.findLayer(image.id())
        if node is not None:
            below = group.children().index(node) + 1
    group.insertLayer(below, layer)
    return layer


def result_group(project: QgsProject, name: str = GROUP_NAME):
    root = project.layerTreeRoot()
    group = root.findGroup(name)
    return group if group is not None else root.insertGroup(0, name)


def move_to_result_group(layer, project: Optional[QgsProject] = None) -> bool:
    """Put ``layer``, loaded at the top level of the layer tree (as Processing loads its results),
    at the top of the "DiffusionSat" group, where the dock puts its results. A layer inside
    another group (Processing's own results group, when the user set one) stays there. False when
    the layer is not in the tree (yet)."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    node = root.findLayer(layer.id()) if layer is not None else None
    if node is None:
        return False
    if node.parent() is root:
        result_group(project).insertChildNode(0, node.clone())
        root.removeChildNode(node)
        # Processing made the result the current layer; removing its node moves QGIS's current
        # item, and with it the point where new layers go, into the group. Seen in the GUI: every
        # layer the user added afterwards landed in "DiffusionSat". New layers go to the top again.
        project.layerTreeRegistryBridge().setLayerInsertionPoint(
            QgsLayerTreeRegistryBridge.InsertionPoint(root, 0))
    return True


def style_result(layer: QgsRasterLayer, *, date: Optional[_dt.date] = None,
                 info: Optional[Mapping[str, Any]] = None, warnings=()) -> None:
    """Style, temporal range and provenance for an output layer (also used by Processing)."""
    if layer.bandCount() >= 3:
        apply_rgb_style(layer)
    if date is None:
        # The date the engine conditioned on (from the input's tags), written in the output's tags.
        from .requests import layer_date

        date = layer_date(layer)[0]
    if date is not None:
        set_temporal_range(layer, date)
    set_provenance(layer, info or provenance(layer.source()), warnings)


def add_result_layer(path: str, name: str, *, date: Optional[_dt.date] = None,
                     info: Optional[Mapping[str, Any]] = None, warnings=(),
                     project: Optional[QgsProject] = None, canvas=None) -> QgsRasterLayer:
    """Add ``path`` as a styled, dated layer at the top of the "DiffusionSat" group."""
    project = project or QgsProject.instance()
    layer = QgsRasterLayer(str(path), name, "gdal")
    if not layer.isValid():
        raise OSError(f"QGIS cannot open the result {path}")
    style_result(layer, date=date, info=info or provenance(path), warnings=warnings)
    project.addMapLayer(layer, False)
    result_group(project).insertLayer(0, layer)
    if date is not None:
        extend_temporal_controller(canvas, date, project)
    return layer
