"""Input files for the engine: exports made on the main thread, conversions made in tasks.

Main thread (reads QGIS layers): :func:`export_raster_window` for layers that are not plain files
(WMS, XYZ, memory, …), :func:`write_band_vrt` to stack single-band layers, and
:func:`write_mask_vector` to copy a polygon layer (its filter and selection applied) to a
GeoPackage in the raster's CRS.

Task thread (GDAL only, no QGIS layer): :func:`rasterize_mask` burns that GeoPackage onto the
input raster's grid, and :func:`as_geotiff` converts what the engine's upload endpoint would
refuse (VRT, JP2, …) into a GeoTIFF.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Optional, Sequence

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRasterFileWriter,
    QgsRasterPipe,
    QgsRectangle,
    QgsVectorFileWriter,
)

from .requests import RequestError


def scratch_dir() -> Path:
    """A folder for intermediate files of this QGIS session."""
    path = Path(tempfile.gettempdir()) / f"diffusionsat-qgis-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def scratch_path(stem: str, suffix: str) -> str:
    return str(scratch_dir() / f"{stem}-{uuid.uuid4().hex[:10]}{suffix}")


def export_raster_window(layer, extent: Optional[QgsRectangle] = None, dest: Optional[str] = None,
                         max_side: int = 8192) -> str:
    """Write a raster layer (any provider) as GeoTIFF, at its own resolution where it has one.

    Main thread only: it reads the layer's pixels.
    """
    provider = layer.dataProvider()
    extent = extent if extent is not None and not extent.isEmpty() else layer.extent()
    extent = extent.intersect(layer.extent()) if not layer.extent().isEmpty() else extent
    if extent.isEmpty():
        raise RequestError(f"the extent does not overlap the layer {layer.name()}")
    if provider.capabilities() & provider.Size and layer.rasterUnitsPerPixelX() > 0:
        width = int(round(extent.width() / layer.rasterUnitsPerPixelX()))
        height = int(round(extent.height() / layer.rasterUnitsPerPixelY()))
    else:  # a web layer: sample at the longest side given
        ratio = extent.height() / extent.width()
        width, height = (1024, int(1024 * ratio)) if ratio <= 1 else (int(1024 / ratio), 1024)
    if max(width, height) > max_side:
        raise RequestError(
            f"{layer.name()} would be exported at {width}×{height} px; choose a smaller extent")
    dest = dest or scratch_path("export", ".tif")
    writer = QgsRasterFileWriter(dest)
    writer.setOutputFormat("GTiff")
    pipe = QgsRasterPipe()
    if not pipe.set(provider.clone()):
        raise RequestError(f"cannot read the layer {layer.name()}")
    err = writer.writeRaster(pipe, max(width, 1), max(height, 1), extent, layer.crs())
    if err != 0 and err is not QgsRasterFileWriter.NoError:
        raise RequestError(f"exporting {layer.name()} failed (QgsRasterFileWriter error {int(err)})")
    return dest


def write_band_vrt(paths: Sequence[str], dest: Optional[str] = None) -> str:
    """A VRT with one band per single-band file, on the finest grid among them."""
    from osgeo import gdal

    if not paths:
        raise RequestError("add at least one band layer")
    dest = dest or scratch_path("bands", ".vrt")
    opts = gdal.BuildVRTOptions(separate=True, resolution="highest")
    ds = gdal.BuildVRT(dest, list(paths), options=opts)
    if ds is None:
        raise RequestError("the band layers could not be stacked (GDAL BuildVRT failed); are "
                           "they in one CRS?")
    if ds.RasterCount != len(paths):
        raise RequestError(f"stacking {len(paths)} band layers gave {ds.RasterCount} bands: use "
                           "single-band layers")
    ds = None  # flush
    return dest


def write_mask_vector(layer, target_crs: QgsCoordinateReferenceSystem, selected_only: bool = False,
                      dest: Optional[str] = None) -> str:
    """Copy a polygon layer (filter and, optionally, only its selection) to a GeoPackage in
    ``target_crs``. Main thread only."""
    if layer is None or not layer.isValid():
        raise RequestError("choose a polygon layer for the mask")
    if selected_only and layer.selectedFeatureCount() == 0:
        raise RequestError(f"no features of {layer.name()} are selected")
    dest = dest or scratch_path("mask", ".gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = "mask"
    options.onlySelectedFeatures = bool(selected_only)
    project = QgsProject.instance()
    if layer.crs() != target_crs and target_crs.isValid():
        options.ct = QgsCoordinateTransform(layer.crs(), target_crs, project.transformContext())
    result = QgsVectorFileWriter.writeAsVectorFormatV3(layer, dest, project.transformContext(), options)
    error, message = result[0], result[1]
    if error != QgsVectorFileWriter.NoError:
        raise RequestError(f"writing the mask polygons failed: {message}")
    return dest


def rasterize_mask(vector_path: str, like_raster: str, dest: Optional[str] = None) -> str:
    """Burn polygons (value 1 on 0) onto the grid of ``like_raster``; a GeoTIFF for the rule
    ``nonzero``. GDAL only, safe in a task."""
    from osgeo import gdal

    like = gdal.Open(like_raster)
    if like is None:
        raise RequestError(f"cannot open {like_raster}")
    dest = dest or scratch_path("mask", ".tif")
    driver = gdal.GetDriverByName("GTiff")
    out = driver.Create(dest, like.RasterXSize, like.RasterYSize, 1, gdal.GDT_Byte,
                        options=["COMPRESS=DEFLATE", "TILED=YES"])
    out.SetGeoTransform(like.GetGeoTransform())
    out.SetProjection(like.GetProjection())
    out.GetRasterBand(1).Fill(0)
    ok = gdal.Rasterize(out, vector_path, burnValues=[1], allTouched=True)  # 1 on success
    if not ok:
        raise RequestError("rasterizing the mask polygons failed")
    out.FlushCache()
    out = None
    like = None
    return dest


def is_geotiff(path: str) -> bool:
    from osgeo import gdal

    ds = gdal.Open(path)
    return ds is not None and ds.GetDriver().ShortName == "GTiff"


def as_geotiff(path: str) -> tuple[str, bool]:
    """``path`` itself when it is a GeoTIFF, else a GeoTIFF copy; returns (path, is_temporary)."""
    from osgeo import gdal

    if is_geotiff(path):
        return path, False
    dest = scratch_path(Path(path).stem, ".tif")
    ds = gdal.Translate(dest, path, options=gdal.TranslateOptions(format="GTiff",
                                                                  creationOptions=["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"]))
    if ds is None:
        raise RequestError(f"cannot convert {path} to GeoTIFF for upload")
    ds = None
    return dest, True


def remove_quietly(paths: Sequence[str]) -> None:
    """Delete intermediate files; a file already gone is fine."""
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            continue
        except OSError as err:  # still open on Windows, say: leave it for the temp cleaner
            from qgis.core import QgsMessageLog

            QgsMessageLog.logMessage(f"could not remove {p}: {err}", "DiffusionSat")
