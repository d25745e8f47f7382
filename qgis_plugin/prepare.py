"""From QGIS objects to a :class:`PreparedJob`: shared by the dock and the Processing algorithms.

Runs on the main thread (or in Processing's ``prepareAlgorithm``): it reads layer sources,
exports non-file layers, stacks band layers, copies mask polygons. What it returns holds only
plain values, so the task that runs it never touches a QGIS layer.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRectangle,
)

from . import inputs
from .requests import (
    PreparedJob,
    RequestError,
    extend_request,
    file_hints,
    generate_request,
    inpaint_request,
    layer_file,
    superres_request,
    temporal_request,
)

MASK_RASTER = "raster"
MASK_POLYGONS = "polygons"
MASK_NODATA = "nodata"


def raster_source(layer, extent: Optional[QgsRectangle] = None, temps: Optional[list] = None) -> str:
    """A file the engine can read for ``layer``: its own file, or a GeoTIFF export of it."""
    if layer is None or not layer.isValid():
        raise RequestError("choose a valid raster layer")
    path = layer_file(layer)
    if path:
        return path
    exported = inputs.export_raster_window(layer, extent)
    if temps is not None:
        temps.append(exported)
    return exported


def extent_in(extent: Optional[QgsRectangle], extent_crs: Optional[QgsCoordinateReferenceSystem],
              crs: QgsCoordinateReferenceSystem) -> Optional[QgsRectangle]:
    """``extent`` reprojected (bounding box) into ``crs``; None stays None."""
    if extent is None or extent.isNull() or extent.isEmpty():
        return None
    if extent_crs is None or not extent_crs.isValid() or extent_crs == crs:
        return QgsRectangle(extent)
    ct = QgsCoordinateTransform(extent_crs, crs, QgsProject.instance().transformContext())
    return ct.transformBoundingBox(extent)


def send_date(request: dict[str, Any], date: Optional[_dt.date]) -> None:
    """Send the date QGIS knows (the layer's temporal properties or the user's) so the engine
    uses it rather than guessing from the file; no date stays no date (an unknown date)."""
    if date is not None:
        request.setdefault("date", date.isoformat())


def add_hints(request: dict[str, Any], layer, path: str) -> None:
    """The layer's CRS/nodata where its file lacks them (fields given in OPTIONS win)."""
    for key, value in file_hints(layer, path).items():
        request.setdefault(key, value)


def prepare_generate(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, *, size: Optional[int] = None,
                     width: Optional[int] = None, height: Optional[int] = None, output_path: str, name: str = "", date: Optional[_dt.date] = None,
                     cloud_cover: Optional[float] = None, prompt: str = "", steps: Optional[int] = None,
                     guidance: Optional[float] = None, seed: Optional[int] = None,
                     scheduler: Optional[str] = None, model: Optional[str] = None,
                     spread: Optional[int] = None, gsd: Optional[float] = None) -> PreparedJob:
    request = generate_request(extent, crs, size=size, width=width, height=height, date=date,
                               cloud_cover=cloud_cover,
                               prompt=prompt, steps=steps, guidance=guidance, seed=seed,
                               scheduler=scheduler, model=model, gsd=gsd)
    if spread:
        request["spread"] = int(spread)  # N seeds; their per-pixel spread comes back beside the image
    label = name or (f"Generated {date.isoformat()}" if date else "Generated")
    return PreparedJob("generate", request, output_path, label, date=date,
                       title=f"DiffusionSat: generate {_size_text(request)}")


def _size_text(request: dict[str, Any]) -> str:
    if request.get("width") and request.get("height"):
        return f"{request['width']}×{request['height']} px"
    if request.get("size"):
        return f"{request['size']} px"
    if request.get("gsd"):
        return f"at {request['gsd']:g} m/px"
    return "at the model's size"


def prepare_superres(*, output_path: str, layer=None, band_layers: Sequence = (),
                     band_names: Optional[Sequence[str]] = None, extent: Optional[QgsRectangle] = None,
                     extent_crs: Optional[QgsCoordinateReferenceSystem] = None, factor: Optional[int] = None,
                     model: Optional[str] = None, options: Optional[dict[str, Any]] = None,
                     name: str = "", date: Optional[_dt.date] = None) -> PreparedJob:
    """Super-resolve one multiband layer, or several single-band layers (stacked in a VRT)
    whose band names are given in ``band_names`` (one per layer)."""
    temps: list[str] = []
    if layer is not None and band_layers:
        raise RequestError("give either one multiband layer or single-band layers, not both")
    if layer is not None:
        crs = layer.crs()
        window = extent_in(extent, extent_crs, crs)
        source = raster_source(layer, window, temps)
        base = layer.name()
    elif band_layers:
        if band_names is None or len(band_names) != len(band_layers):
            raise RequestError("name the Sentinel-2 band of every band layer (e.g. B04)")
        crs = band_layers[0].crs()
        if any(lyr.crs() != crs for lyr in band_layers):
            raise RequestError("the band layers are in different CRSs; reproject them to one first")
        window = extent_in(extent, extent_crs, crs)
        files = [raster_source(lyr, window, temps) for lyr in band_layers]
        source = inputs.write_band_vrt(files)
        temps.append(source)
        base = band_layers[0].name()
    else:
        raise RequestError("choose a Sentinel-2 layer (or band layers) to super-resolve")
    request = superres_request(source, bands=band_names, extent=window, crs=crs if window else None,
                               factor=factor, model=model, options=options)
    send_date(request, date)
    add_hints(request, layer if layer is not None else band_layers[0], source)
    job = PreparedJob("superres", request, output_path, name or f"{base} (super-resolved)", date=date,
                      files=("input",), temp_files=temps, title=f"DiffusionSat: super-resolve {base}")
    # A VRT names other files: for a remote engine, run_job uploads a flattened GeoTIFF of it.
    return job


def prepare_inpaint(layer, *, output_path: str, mask_kind: str, mask_layer=None, mask_rule: Optional[str] = None,
                    selected_only: bool = False, extent: Optional[QgsRectangle] = None,
                    extent_crs: Optional[QgsCoordinateReferenceSystem] = None, prompt: str = "",
                    model: Optional[str] = None, options: Optional[dict[str, Any]] = None,
                    name: str = "", date: Optional[_dt.date] = None) -> PreparedJob:
    """In-paint ``layer`` where the mask says: ``raster`` (a layer + rule), ``polygons``
    (a polygon layer, burnt onto the input grid) or ``nodata`` (the input's own nodata)."""
    temps: list[str] = []
    if layer is None or not layer.isValid():
        raise RequestError("choose the raster layer to in-paint")
    crs = layer.crs()
    window = extent_in(extent, extent_crs, crs)
    source = raster_source(layer, window, temps)
    rasterize = None
    if mask_kind == MASK_RASTER:
        if mask_layer is None:
            raise RequestError("choose the mask raster layer (e.g. a QA or SCL band)")
        mask = raster_source(mask_layer, extent_in(extent, extent_crs, mask_layer.crs()), temps)
        rule = (mask_rule or "").strip() or "nonzero"
    elif mask_kind == MASK_POLYGONS:
        vector = inputs.write_mask_vector(mask_layer, crs, selected_only)
        temps.append(vector)
        mask, rule = vector, "nonzero"
        rasterize = {"field": "mask", "vector": vector, "like": source}
    elif mask_kind == MASK_NODATA:
        mask, rule = "nodata", None  # the engine's keyword: the input's own nodata / alpha / mask
    else:
        raise RequestError(f"unknown mask kind {mask_kind!r}")
    request = inpaint_request(source, mask, mask_rule=rule, extent=window, crs=crs if window else None,
                              prompt=prompt, model=model, options=options)
    send_date(request, date)
    add_hints(request, layer, source)
    return PreparedJob("inpaint", request, output_path, name or f"{layer.name()} (in-painted)", date=date,
                       files=("input", "mask") if mask != "nodata" else ("input",),
                       rasterize=rasterize, temp_files=temps,
                       title=f"DiffusionSat: in-paint {layer.name()}")


def prepare_temporal(layers: Sequence, dates: Sequence[Optional[_dt.date]], date: _dt.date, *,
                     output_path: str, extent: Optional[QgsRectangle] = None,
                     extent_crs: Optional[QgsCoordinateReferenceSystem] = None,
                     model: Optional[str] = None, options: Optional[dict[str, Any]] = None,
                     name: str = "") -> PreparedJob:
    temps: list[str] = []
    if not layers:
        raise RequestError("choose at least one input layer")
    crs = layers[0].crs()
    window = extent_in(extent, extent_crs, crs)
    files = [raster_source(lyr, extent_in(extent, extent_crs, lyr.crs()), temps) for lyr in layers]
    request = temporal_request(files, list(dates), date, extent=window, crs=crs if window else None,
                               model=model, options=options)
    add_hints(request, layers[0], files[0])
    return PreparedJob("temporal", request, output_path, name or f"Temporal {date.isoformat()}", date=date,
                       files=("inputs",), temp_files=temps,
                       title=f"DiffusionSat: image for {date.isoformat()} from {len(layers)} layer(s)")


@dataclass(frozen=True)
class ExtendedGrid:
    """The grid an ``extend`` job writes, estimated for display (the engine computes its own):
    the layer's grid grown to cover the extent, in the layer's CRS."""

    extent: QgsRectangle
    width: int
    height: int
    input_width: int
    input_height: int
    #: pixels added on each side: left, top, right, bottom
    margins: tuple[int, int, int, int]

    @property
    def new_pixels(self) -> int:
        return self.width * self.height - self.input_width * self.input_height

    def summary(self) -> str:
        left, top, right, bottom = self.margins
        return (f"{self.input_width} × {self.input_height} px → {self.width} × {self.height} px "
                f"(+{left} left, +{right} right, +{top} top, +{bottom} bottom; "
                f"{self.new_pixels:,} new pixels)")


def _outward(edge: float, origin: float, step: float, down: bool) -> tuple[float, int]:
    """``edge`` moved outward from ``origin`` to a whole number of ``step``; (edge, steps added)."""
    n = (origin - edge) / step if down else (edge - origin) / step
    k = max(0, math.ceil(n - 1e-6))
    return (origin - k * step if down else origin + k * step), k


def extended_grid(layer, extent: Optional[QgsRectangle],
                  extent_crs: Optional[QgsCoordinateReferenceSystem]) -> ExtendedGrid:
    """The layer's grid (its CRS, pixel size and alignment) grown to cover ``extent``: the union of
    the extent snapped outward to the layer's pixels and the layer's own extent (as the engine's
    extend task makes it)."""
    if layer is None or not layer.isValid():
        raise RequestError("choose the raster layer to extend")
    if not layer.crs().isValid():
        raise RequestError(f"the layer {layer.name()} has no CRS: set it in Layer Properties → Source first")
    box = extent_in(extent, extent_crs, layer.crs())
    if box is None:
        raise RequestError("draw the new extent on the map (Draw extent) or use the canvas extent")
    own = layer.extent()
    px, py = layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY()
    if not (px > 0 and py > 0) or not layer.width():
        raise RequestError(f"the layer {layer.name()} has no pixel grid (a web layer?): export it first")
    xmin, left = _outward(box.xMinimum(), own.xMinimum(), px, True)
    xmax, right = _outward(box.xMaximum(), own.xMaximum(), px, False)
    ymin, bottom = _outward(box.yMinimum(), own.yMinimum(), py, True)
    ymax, top = _outward(box.yMaximum(), own.yMaximum(), py, False)
    return ExtendedGrid(QgsRectangle(xmin, ymin, xmax, ymax), layer.width() + left + right,
                        layer.height() + top + bottom, layer.width(), layer.height(), (left, top, right, bottom))


def prepare_extend(layer, *, output_path: str, extent: Optional[QgsRectangle],
                   extent_crs: Optional[QgsCoordinateReferenceSystem], date: Optional[_dt.date] = None,
                   cloud_cover: Optional[float] = None, prompt: str = "", model: Optional[str] = None,
                   options: Optional[dict[str, Any]] = None, name: str = "") -> PreparedJob:
    """Extend (outpaint) ``layer`` to cover ``extent``: the layer's pixels stay as they are, the
    new ones are generated. The extent is sent in the layer's CRS (a CRS QGIS assigned to a file
    without one goes as ``input_crs``); a layer that is not a plain file is exported first."""
    temps: list[str] = []
    grid = extended_grid(layer, extent, extent_crs)
    if grid.new_pixels <= 0:
        raise RequestError(f"the extent lies inside {layer.name()}: draw an extent larger than the layer "
                           "(beyond at least one of its edges)")
    crs = layer.crs()
    source = raster_source(layer, None, temps)
    request = extend_request(source, extent_in(extent, extent_crs, crs), crs, date=date,
                             cloud_cover=cloud_cover, prompt=prompt, model=model, options=options)
    add_hints(request, layer, source)
    return PreparedJob("extend", request, output_path, name or f"{layer.name()} (extended)", date=date,
                       files=("input",), temp_files=temps,
                       title=f"DiffusionSat: extend {layer.name()} to {grid.width}×{grid.height} px")
