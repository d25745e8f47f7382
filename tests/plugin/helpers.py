"""Small fixture rasters written with QGIS's GDAL (no numpy)."""

from __future__ import annotations

import array
import random
from pathlib import Path

from osgeo import gdal, osr

#: A 10 m grid in UTM 33N (Rome).
ORIGIN = (290000.0, 4642000.0)


def _srs(epsg: int) -> str:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


def make_rgb_geotiff(path: Path, size: int = 64, gsd: float = 10.0, hole: bool = False, seed: int = 0,
                     epsg: int = 32633) -> Path:
    """An 8-bit RGB GeoTIFF with smooth fields; ``hole`` sets a nodata (0) square in the middle."""
    rng = random.Random(seed)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((ORIGIN[0], gsd, 0, ORIGIN[1], 0, -gsd))
    ds.SetProjection(_srs(epsg))
    base = [rng.randint(40, 200) for _ in range(3)]
    for b in range(3):
        values = array.array("B", [0] * (size * size))
        for y in range(size):
            for x in range(size):
                v = base[b] + ((x // 8 + y // 8) % 3) * 15 + rng.randint(0, 10)
                if hole and size // 3 <= x < 2 * size // 3 and size // 3 <= y < 2 * size // 3:
                    v = 0
                values[y * size + x] = max(1, min(255, v)) if v else 0
        band = ds.GetRasterBand(b + 1)
        band.WriteRaster(0, 0, size, size, values.tobytes())
        band.SetNoDataValue(0)
        band.SetDescription(("red", "green", "blue")[b])
    ds.FlushCache()
    ds = None
    return Path(path)


def make_s2_geotiff(path: Path, bands=("B02", "B03", "B04", "B08"), size: int = 16, gsd: float = 10.0,
                    seed: int = 0) -> Path:
    """A uint16 Sentinel-2 L2A-like GeoTIFF (reflectance × 10000), bands named in descriptions."""
    rng = random.Random(seed)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, len(bands), gdal.GDT_UInt16)
    ds.SetGeoTransform((ORIGIN[0], gsd, 0, ORIGIN[1], 0, -gsd))
    ds.SetProjection(_srs(32633))
    for i, name in enumerate(bands):
        values = array.array("H", [1000 + 300 * i + rng.randint(0, 800) for _ in range(size * size)])
        band = ds.GetRasterBand(i + 1)
        band.WriteRaster(0, 0, size, size, values.tobytes())
        band.SetDescription(name)
        band.SetNoDataValue(0)
    ds.SetMetadataItem("PROCESSING_LEVEL", "Level-2A")
    ds.SetMetadataItem("PROCESSING_BASELINE", "05.09")
    ds.SetMetadataItem("ACQUISITION_DATE", "2021-06-15")
    ds.FlushCache()
    ds = None
    return Path(path)
