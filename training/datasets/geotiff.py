"""A folder (or list) of GeoTIFFs as a training set, with metadata derived from each file.

Each raster is cut into square crops of ``crop_size`` native pixels (a grid, or random windows
drawn anew each epoch). For every crop:

- centre lon/lat and GSD come from the crop's own bounds and the raster's CRS
  (:func:`engine.metadata.derive_from_bbox`): the footprint centroid, and the geodesic pixel size
  in metres. The transform later rescales the GSD to the model resolution, exactly as the
  reference did for its images (§2);
- the date comes from a sidecar ``<name>.json`` (``"date"``), else the raster's tags, else its
  file name (:func:`engine.geo.raster_metadata.date_from_raster`);
- cloud cover comes from the sidecar (``"cloud_cover"``, a fraction 0..1), else from a QA band
  when the raster has one (a band described as ``QA_PIXEL``, ``SCL``, ``QA60``, ``FMASK`` or
  ``CLOUD_MASK``: the fraction of the crop's valid pixels flagged cloud), else unknown;
- the caption comes from the sidecar (``"caption"`` text, or ``"class"`` and ``"country"`` for
  the template "a satellite image[ of a <class>][ in <country>]"), else "a satellite image".

Pixels: uint8 bands ÷255; uint16 and other types get a per-band 2-98 percentile stretch
computed once per file (from a decimated read, nodata excluded), so all crops of one scene share
one radiometry.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyproj

from engine.errors import InvalidMetadata, InvalidRequest, RasterError
from engine.geo.raster_metadata import date_from_raster
from engine.metadata import SatMetadata, derive_from_bbox, parse_date

from .captions import Caption, subject_caption
from .samples import Example

log = logging.getLogger(__name__)

__all__ = ["find_geotiffs", "GeoTiffFolder", "RasterInfo", "CLOUD_BANDS"]

GEOTIFF_SUFFIXES = (".tif", ".tiff")

#: QA band description -> (cloud rule, invalid-pixel rule) in engine.geo.mask_rules grammar.
CLOUD_BANDS: dict[str, tuple[str, Optional[str]]] = {
    # Landsat Collection 2: dilated cloud (1), cirrus (2), cloud (3); fill (0)
    "QA_PIXEL": ("bit:1|bit:2|bit:3", "bit:0"),
    # Sentinel-2 L2A scene classification: cloud medium/high probability (8, 9), thin cirrus (10);
    # no data (0)
    "SCL": ("values:8,9,10", "values:0"),
    # Sentinel-2 L1C QA60: opaque clouds (10), cirrus (11)
    "QA60": ("bit:10|bit:11", None),
    # Fmask 4: cloud (4); no observation (255)
    "FMASK": ("values:4", "values:255"),
    # a plain 0/1 cloud mask
    "CLOUD_MASK": ("nonzero", None),
    "CLOUD": ("nonzero", None),
}

_RGB_NAMES = (("red", "green", "blue"), ("b4", "b3", "b2"), ("b04", "b03", "b02"), ("r", "g", "b"))


def find_geotiffs(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """GeoTIFF paths from ``--data`` values: folders (searched recursively), .tif files, or .txt
    lists of paths (one per line, relative to the list's folder).

    Raises :class:`InvalidRequest` when a path does not exist or nothing is found.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InvalidRequest(f"--data {spec} does not exist; give a folder of GeoTIFFs, shards or a list file")
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in GEOTIFF_SUFFIXES and p.is_file())
        elif path.suffix.lower() in GEOTIFF_SUFFIXES:
            found.append(path)
        elif path.suffix.lower() == ".txt":
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    item = Path(line).expanduser()
                    found.append(item if item.is_absolute() else path.parent / item)
        else:
            raise InvalidRequest(f"--data {spec} is neither a folder, a GeoTIFF nor a .txt list")
    if not found:
        raise InvalidRequest(f"no GeoTIFFs (*.tif, *.tiff) found in {', '.join(map(str, specs))}")
    missing = [p for p in found if not p.is_file()]
    if missing:
        raise InvalidRequest(f"GeoTIFF {missing[0]} listed in --data does not exist")
    return found


def read_sidecar(path: Path) -> dict[str, Any]:
    """``<stem>.json`` beside a raster: ``date``, ``cloud_cover`` (0..1), ``caption``, ``class``,
    ``country`` (all optional). A broken sidecar is an error: it would silently change labels."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except ValueError as err:
        raise InvalidRequest(f"sidecar {sidecar} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"sidecar {sidecar} must hold a JSON object")
    return data


@dataclass
class RasterInfo:
    """What is needed of one raster to cut and label its crops."""

    path: Path
    crs: pyproj.CRS
    transform: Any  # affine.Affine
    width: int
    height: int
    rgb_bands: list[int]  # 1-based
    qa_band: Optional[int]  # 1-based
    qa_rules: Optional[tuple[str, Optional[str]]]
    stretch: Optional[np.ndarray]  # (3, 2) lo/hi per RGB band, None for uint8
    nodata: Optional[float]
    date: Any
    cloud_cover: Optional[float]
    caption: Caption


def _band_roles(src: Any, rgb_override: Optional[Sequence[int]]) -> tuple[list[int], Optional[int], Any]:
    descriptions = [(d or "").strip() for d in src.descriptions]
    qa_band, qa_rules = None, None
    for i, desc in enumerate(descriptions, start=1):
        rules = CLOUD_BANDS.get(desc.upper())
        if rules is not None:
            qa_band, qa_rules = i, rules
            break
    if rgb_override:
        bad = [b for b in rgb_override if not 1 <= b <= src.count]
        if bad:
            raise InvalidRequest(f"--rgb-bands {bad[0]} is not a band of {src.name} (1..{src.count})")
        return list(rgb_override), qa_band, qa_rules
    data_bands = [i for i in range(1, src.count + 1) if i != qa_band]
    interp = [c.name.lower() for c in src.colorinterp]
    by_interp = {name: i + 1 for i, name in enumerate(interp) if i + 1 in data_bands}
    if all(c in by_interp for c in ("red", "green", "blue")):
        return [by_interp["red"], by_interp["green"], by_interp["blue"]], qa_band, qa_rules
    lowered = {d.lower(): i for i, d in enumerate(descriptions, start=1) if d}
    for names in _RGB_NAMES:
        if all(n in lowered for n in names):
            return [lowered[n] for n in names], qa_band, qa_rules
    if not data_bands:
        raise RasterError(f"{src.name} has no image bands (only a QA band)")
    if len(data_bands) < 3:
        return [data_bands[0]] * 3, qa_band, qa_rules
    return data_bands[:3], qa_band, qa_rules


def _file_stretch(src: Any, bands: list[int], nodata: Optional[float]) -> Optional[np.ndarray]:
    """Per-band 2-98 percentiles of a decimated read (at most ~1024 px on the long side)."""
    if src.dtypes[bands[0] - 1] == "uint8":
        return None
    factor = max(1, int(np.ceil(max(src.width, src.height) / 1024)))
    shape = (max(1, src.height // factor), max(1, src.width // factor))
    out = np.zeros((3, 2), np.float64)
    for j, band in enumerate(bands):
        data = src.read(band, out_shape=shape).astype(np.float64)
        valid = np.isfinite(data)
        if nodata is not None:
            valid &= data != nodata
        values = data[valid]
        if values.size:
            out[j] = np.percentile(values, [2.0, 98.0])
    return out


def inspect_raster(path: Path, rgb_bands: Optional[Sequence[int]] = None) -> RasterInfo:
    """Open a raster once: grid, CRS, band roles, stretch, date, sidecar."""
    import rasterio
    from rasterio.errors import RasterioError

    sidecar = read_sidecar(path)
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise RasterError(f"{path} has no CRS: its location and GSD are unknown; assign one "
                                  "(gdal_edit.py -a_srs EPSG:xxxx) or leave it out of --data")
            if src.transform.b != 0.0 or src.transform.d != 0.0:
                raise RasterError(f"{path} has a rotated geotransform; warp it to north-up first (gdalwarp)")
            bands, qa_band, qa_rules = _band_roles(src, rgb_bands)
            crs = pyproj.CRS.from_user_input(src.crs.to_wkt())
            stretch = _file_stretch(src, bands, src.nodata)
            info = dict(crs=crs, transform=src.transform, width=src.width, height=src.height,
                        nodata=src.nodata)
    except RasterioError as err:
        raise RasterError(f"cannot read {path} ({err})") from None
    date = None
    if sidecar.get("date") or sidecar.get("timestamp"):
        try:
            date = parse_date(str(sidecar.get("date") or sidecar.get("timestamp"))[:10])
        except InvalidRequest as err:
            raise InvalidRequest(f"sidecar of {path}: {err}") from None
    else:
        date = date_from_raster(path)[0]
    cloud = sidecar.get("cloud_cover")
    if cloud is not None:
        try:
            SatMetadata(cloud_cover=cloud)
        except InvalidMetadata as err:
            raise InvalidRequest(f"sidecar of {path}: {err}") from None
    if sidecar.get("caption"):
        caption = Caption(text=str(sidecar["caption"]))
    else:
        caption = subject_caption(sidecar.get("class"), sidecar.get("country"))
    return RasterInfo(path=path, rgb_bands=bands, qa_band=qa_band, qa_rules=qa_rules, stretch=stretch,
                      date=date, cloud_cover=cloud, caption=caption, **info)


class GeoTiffFolder:
    """Map-style source of crops over a set of GeoTIFFs (see the module docstring).

    Args:
        paths: the rasters (:func:`find_geotiffs`).
        crop_size: crop edge in native pixels; a raster smaller than that gives one crop of its
            whole extent (the transform resizes it).
        crop: ``"grid"`` (non-overlapping windows, partial edges dropped) or ``"random"``
            (``crops_per_image`` windows per raster, positions drawn from the sample's RNG).
        rgb_bands: 1-based band numbers used as R, G, B (default: from colour interpretation or
            band descriptions, else the first three non-QA bands).
    """

    def __init__(self, paths: Sequence[Path], crop_size: int, crop: str = "grid", crops_per_image: int = 1,
                 rgb_bands: Optional[Sequence[int]] = None):
        if crop not in ("grid", "random"):
            raise InvalidRequest(f"--crop must be grid or random, got {crop!r}")
        if crop_size < 8:
            raise InvalidRequest(f"--crop-size must be at least 8 px, got {crop_size}")
        self.crop_size = int(crop_size)
        self.crop = crop
        self.rasters = [inspect_raster(Path(p), rgb_bands) for p in paths]
        self.index: list[tuple[int, int, int]] = []  # (raster, row_off, col_off); -1 = random
        for r, info in enumerate(self.rasters):
            if crop == "random":
                self.index += [(r, -1, -1)] * max(1, int(crops_per_image))
                continue
            rows = max(1, info.height // self.crop_size)
            cols = max(1, info.width // self.crop_size)
            self.index += [(r, i * self.crop_size, j * self.crop_size) for i in range(rows) for j in range(cols)]

    def __len__(self) -> int:
        return len(self.index)

    def window(self, index: int, rng: Optional[np.random.Generator]) -> tuple[RasterInfo, Any]:
        from rasterio.windows import Window

        r, row, col = self.index[index]
        info = self.rasters[r]
        h = min(self.crop_size, info.height)
        w = min(self.crop_size, info.width)
        if row < 0:
            gen = rng if rng is not None else np.random.default_rng(index)
            row = int(gen.integers(0, info.height - h + 1))
            col = int(gen.integers(0, info.width - w + 1))
        return info, Window(col, row, w, h)

    def load(self, index: int, rng: Optional[np.random.Generator] = None) -> Example:
        """The crop ``index`` as an :class:`Example` (native-GSD metadata)."""
        import rasterio
        from rasterio.windows import bounds as window_bounds

        info, win = self.window(index, rng)
        with rasterio.open(info.path) as src:
            data = src.read(info.rgb_bands, window=win).astype(np.float64)
            qa = src.read(info.qa_band, window=win) if info.qa_band and info.cloud_cover is None else None
        valid = np.all(np.isfinite(data), axis=0)
        if info.nodata is not None:
            valid &= ~np.all(data == info.nodata, axis=0)
        if info.stretch is None:
            image = data / 255.0
        else:
            lo, hi = info.stretch[:, 0, None, None], info.stretch[:, 1, None, None]
            image = np.clip((data - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
        image = np.where(valid[None], np.nan_to_num(image), 0.0)  # nodata -> black, never NaN
        cloud = info.cloud_cover if info.cloud_cover is not None else self._cloud_fraction(info, qa)
        bbox = window_bounds(win, info.transform)
        bbox = (min(bbox[0], bbox[2]), min(bbox[1], bbox[3]), max(bbox[0], bbox[2]), max(bbox[1], bbox[3]))
        try:
            meta = derive_from_bbox(bbox, info.crs, int(win.width), int(win.height), date=info.date,
                                    cloud_cover=cloud)
        except InvalidRequest as err:
            raise RasterError(f"{info.path}: {err}") from None
        key = f"{info.path.stem}_{int(win.row_off)}_{int(win.col_off)}"
        return Example(key=key.replace(".", "-"), image=np.moveaxis(image, 0, -1).astype(np.float32),
                       metadata=meta, caption=info.caption)

    @staticmethod
    def _cloud_fraction(info: RasterInfo, qa: Optional[np.ndarray]) -> Optional[float]:
        if qa is None or info.qa_rules is None:
            return None
        from engine.geo.mask_rules import mask_from_bits

        cloud_rule, invalid_rule = info.qa_rules
        cloudy = mask_from_bits(qa, cloud_rule)
        valid = np.ones(qa.shape, bool) if invalid_rule is None else ~mask_from_bits(qa, invalid_rule)
        if not valid.any():
            return None
        return float((cloudy & valid).sum() / valid.sum())
