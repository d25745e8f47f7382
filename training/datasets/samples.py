"""Training examples: what every dataset yields, and how it becomes model input.

Every source (webdataset shards in the reference layouts, GeoTIFF folders) produces
:class:`Example` objects: the target image in [0, 1], its :class:`~engine.metadata.SatMetadata`
*as stored* (native GSD), a :class:`~training.datasets.captions.Caption` before dropout, and for
ControlNet tasks the conditioning frames and their metadata. :class:`Transform` then does what
the reference's training did (reference page §2, §6, §8):

- resize the short side to the model resolution (bilinear, antialiased), centre crop, map to
  [-1, 1], no flips;
- rescale the GSD by ``min(h, w) / resolution`` (the GSD of the image *as fed to the model*);
- normalise the metadata and drop each field independently (set to 0) with probability 0.1;
- render the caption with its template dropout.

All randomness comes from the ``numpy.random.Generator`` passed in, which the stream derives from
(seed, epoch, position): the same run gives the same samples after a resume.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from engine.errors import InvalidMetadata, InvalidRequest
from engine.metadata import SatMetadata

from .captions import Caption, fmow_caption, subject_caption

log = logging.getLogger(__name__)

__all__ = [
    "Example",
    "Transform",
    "to_unit_float",
    "resize_center_crop",
    "metadata_from_record",
    "FmowCentroids",
    "parse_image_sample",
    "parse_temporal_sample",
    "parse_superres_sample",
    "parse_control_sample",
    "collate",
]

#: GSD of the Sentinel-2 conditioning as the reference fed it (metres; not rescaled, §6).
SENTINEL_COND_GSD_M = 10.0


@dataclass
class Example:
    """One training example before augmentation.

    Attributes:
        key: sample id (shard key or ``file:row:col``).
        image: target image, float32 (H, W, 3) in [0, 1].
        metadata: the target's metadata with the *native* GSD of ``image`` (metres per pixel).
        caption: the caption template, dropout not yet applied.
        cond: conditioning frames, each float32 (H, W, C) in [0, 1] (ControlNet tasks only).
        cond_metadata: metadata of each conditioning frame (native GSD unless ``cond_gsd_fixed``).
        cond_gsd_fixed: the conditioning GSD is a fixed convention (Sentinel-2: 10 m), not rescaled.
    """

    key: str
    image: np.ndarray
    metadata: SatMetadata
    caption: Caption = field(default_factory=Caption)
    cond: Optional[list[np.ndarray]] = None
    cond_metadata: Optional[list[SatMetadata]] = None
    cond_gsd_fixed: bool = False


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _hwc(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise InvalidRequest(f"an image array must be (H, W, C) or (H, W), got shape {array.shape}")
    # (C, H, W) arrays (few channels first, many pixels after) are accepted too
    if array.shape[0] <= 4 and array.shape[2] > 4:
        array = np.moveaxis(array, 0, -1)
    return array


def percentile_stretch(array: np.ndarray, lo_pct: float = 2.0, hi_pct: float = 98.0,
                       valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-channel linear stretch of (H, W, C) values so the lo..hi percentiles map to 0..1.

    ``valid`` (H, W) excludes nodata from the percentiles. A constant channel maps to 0.
    """
    out = np.zeros(array.shape, np.float32)
    for c in range(array.shape[2]):
        band = array[:, :, c].astype(np.float64)
        sel = band[valid] if valid is not None else band.ravel()
        sel = sel[np.isfinite(sel)]
        if sel.size == 0:
            continue
        lo, hi = np.percentile(sel, [lo_pct, hi_pct])
        if hi > lo:
            out[:, :, c] = np.clip((band - lo) / (hi - lo), 0.0, 1.0)
    return out


def to_unit_float(array: np.ndarray, channels: int = 3) -> np.ndarray:
    """An image array -> float32 (H, W, ``channels``) in [0, 1].

    uint8: ÷255. uint16 and other integers: per-channel 2-98 percentile stretch (as the reference
    did for SpaceNet). Floats already within [0, 1] are kept; other floats are stretched. A single
    band is repeated to RGB; extra bands beyond ``channels`` are dropped.
    """
    array = _hwc(array)
    if array.dtype == np.uint8:
        out = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.integer):
        out = percentile_stretch(array)
    else:
        finite = array[np.isfinite(array)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            out = np.nan_to_num(array.astype(np.float32), nan=0.0)
        else:
            out = percentile_stretch(array)
    if channels == 3 and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out[:, :, :channels], dtype=np.float32)


def resize_center_crop(chw: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C, H, W) so the short side is ``size`` px (bilinear, antialiased), centre-crop square."""
    _, h, w = chw.shape
    scale = size / min(h, w)
    if (h, w) != (size, size) and min(h, w) != size:
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        chw = torch.nn.functional.interpolate(chw[None], size=(nh, nw), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    _, h, w = chw.shape
    top, left = (h - size) // 2, (w - size) // 2
    return chw[:, top:top + size, left:left + size]


def _chw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(hwc, -1, 0), dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Metadata from records
# --------------------------------------------------------------------------------------------


def _field(name: str, build: Callable[[], Any], key: str) -> Any:
    """Evaluate one metadata field; an unusable value becomes unknown (None), as training did."""
    try:
        return build()
    except (InvalidMetadata, TypeError, ValueError, KeyError) as err:
        log.debug("sample %s: %s unusable (%s); treated as unknown", key, name, err)
        return None


def _checked(**values: Any) -> dict[str, Any]:
    """Keep only the fields SatMetadata accepts (each validated alone)."""
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        try:
            SatMetadata(**{name: value})
        except InvalidMetadata:
            continue
        out[name] = value
    return out


def parse_timestamp(value: Any) -> Optional[dt.date]:
    """ISO timestamps (``2015-02-27T09:48:22Z``, ``2015-02-27``) -> date; None if unusable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):  # seconds since the epoch
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc).date()
    match = re.match(r"\s*(\d{4})-(\d{2})-(\d{2})", str(value))
    if not match:
        return None
    try:
        return dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None


def _lonlat(record: Mapping[str, Any]) -> tuple[Optional[float], Optional[float]]:
    if "lon" in record and "lat" in record:
        return float(record["lon"]), float(record["lat"])
    if "longitude" in record and "latitude" in record:
        return float(record["longitude"]), float(record["latitude"])
    centroid = record.get("centroid")
    if isinstance(centroid, Mapping):
        return float(centroid.get("lon", centroid.get("x"))), float(centroid.get("lat", centroid.get("y")))
    if isinstance(centroid, (list, tuple)) and len(centroid) == 2:
        return float(centroid[0]), float(centroid[1])
    if isinstance(centroid, str):
        match = re.search(r"(-?[\d.]+(?:e-?\d+)?)[ ,]+(-?[\d.]+(?:e-?\d+)?)", centroid)
        if match:
            return float(match.group(1)), float(match.group(2))
    return None, None


#: fMoW image file names: ``<category>_<location_id>_<image_id>_<kind>.<ext>``.
_FMOW_NAME = re.compile(r"^(?P<category>[a-z_-]+?)_(?P<location>\d+)_(?P<image>\d+)_(?:rgb|msrgb|ms)\b")


def fmow_name_parts(img_filename: Optional[str]) -> Optional[tuple[str, int, int]]:
    """(category, location_id, image_id) from an fMoW ``img_filename``; None if not fMoW-like."""
    if not img_filename:
        return None
    match = _FMOW_NAME.match(str(img_filename).rpartition("/")[2])
    if not match:
        return None
    return match.group("category"), int(match.group("location")), int(match.group("image"))


class FmowCentroids:
    """Centre lon/lat of fMoW images from the dataset's metadata CSV (``--fmow-csv``).

    The CSV has (at least) the columns ``category``, ``location_id``, ``image_id`` and ``polygon``
    (WKT in lon/lat degrees); the centre is the polygon's centroid, looked up by the
    (category, location_id, image_id) parsed from ``img_filename`` -- what the official pipeline
    did. The whole CSV is read once (fMoW's is ~1 M rows, a few hundred MB of RAM).
    """

    def __init__(self, path: str):
        import csv

        from shapely import wkt

        self.path = path
        self._table: dict[tuple[str, int, int], tuple[float, float]] = {}
        try:
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                needed = {"category", "location_id", "image_id", "polygon"}
                if not needed <= set(reader.fieldnames or ()):
                    raise InvalidRequest(f"--fmow-csv {path} needs the columns {', '.join(sorted(needed))}; "
                                         f"it has {', '.join(reader.fieldnames or ())}")
                for row in reader:
                    try:
                        centroid = wkt.loads(row["polygon"]).centroid
                        key = (row["category"], int(row["location_id"]), int(row["image_id"]))
                    except Exception:  # noqa: BLE001 - one broken row must not stop training
                        continue
                    self._table[key] = (float(centroid.x), float(centroid.y))
        except OSError as err:
            raise InvalidRequest(f"cannot read --fmow-csv {path}: {err}") from None

    def lookup(self, img_filename: Optional[str]) -> tuple[Optional[float], Optional[float]]:
        parts = fmow_name_parts(img_filename)
        if parts is None:
            return None, None
        return self._table.get(parts, (None, None))

    def __len__(self) -> int:
        return len(self._table)


def metadata_from_record(record: Optional[Mapping[str, Any]], key: str = "",
                         centroids: Optional[FmowCentroids] = None) -> SatMetadata:
    """SatMetadata from an fMoW-style ``metadata.json`` (our prepared shards use the same keys).

    ``lon``/``lat`` (or ``centroid``) in degrees, else the ``--fmow-csv`` centroid of
    ``img_filename``; ``gsd`` in metres per pixel of the stored image; ``cloud_cover`` in
    **percent** (fMoW's convention; divided by 100); ``timestamp`` ISO. Unusable fields are
    unknown. Values are those of the image as stored (the transform rescales the GSD).
    """
    record = record or {}
    lon, lat = _field("lon/lat", lambda: _lonlat(record), key) or (None, None)
    if (lon is None or lat is None) and centroids is not None:
        lon, lat = centroids.lookup(record.get("img_filename"))
    gsd = _field("gsd", lambda: float(record["gsd"]) if record.get("gsd") is not None else None, key)
    cloud = _field("cloud_cover", lambda: float(record["cloud_cover"]) / 100.0
                   if record.get("cloud_cover") is not None else None, key)
    date = _field("timestamp", lambda: parse_timestamp(record.get("timestamp", record.get("date"))), key)
    return SatMetadata(**_checked(lon_deg=lon, lat_deg=lat, gsd_m=gsd, cloud_cover=cloud, date=date))


def caption_from_record(record: Optional[Mapping[str, Any]], label: Any = None) -> Caption:
    """The caption of a shard sample.

    ``caption`` (text, or the ``{"source", "parts", "text"}`` object our ``prepare`` writes) wins;
    otherwise the fMoW template from the category (``img_filename`` or the ``output.cls`` index)
    and ``country_code``.
    """
    record = record or {}
    spec = record.get("caption")
    if isinstance(spec, Mapping):
        return Caption(source=spec.get("source"), parts=tuple(spec.get("parts") or ()), text=spec.get("text"))
    if isinstance(spec, str) and spec:
        return Caption(text=spec)
    parts = fmow_name_parts(record.get("img_filename"))
    category = parts[0] if parts else label
    if category is None and record.get("class") is not None:
        return subject_caption(record.get("class"), record.get("country"))
    if category is None and not record.get("country_code"):
        return Caption()
    return fmow_caption(category, record.get("country_code"))


# --------------------------------------------------------------------------------------------
# Shard samples -> Example (the layouts are documented in docs/training.md)
# --------------------------------------------------------------------------------------------


def _decoded(sample: Mapping[str, Any], name: str) -> Any:
    from .shards import decode_field

    return decode_field(name, sample[name])


def _image_field(sample: Mapping[str, Any], names: Sequence[str]) -> Optional[np.ndarray]:
    for name in names:
        if name in sample:
            return _decoded(sample, name)
    for ext in ("png", "jpg", "jpeg", "webp", "tif", "tiff"):
        for prefix in names:
            stem = prefix.rpartition(".")[0]
            if f"{stem}.{ext}" in sample:
                return decode_image_bytes(sample[f"{stem}.{ext}"])
    return None


def decode_image_bytes(data: bytes) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (H, W, C) uint8 array (PIL)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _record(sample: Mapping[str, Any], name: str = "metadata.json") -> dict:
    return _decoded(sample, name) if name in sample else {}


def parse_image_sample(sample: Mapping[str, Any], rng: np.random.Generator,
                       centroids: Optional[FmowCentroids] = None) -> Example:
    """fMoW layout: ``input.npy`` (H, W, C), ``metadata.json``, optional ``output.cls``."""
    key = sample["__key__"]
    array = _image_field(sample, ("input.npy", "rgb.npy", "image.npy"))
    if array is None:
        raise InvalidRequest(f"shard sample {key} in {sample.get('__shard__')} has no input.npy "
                             f"(fields: {', '.join(k for k in sample if not k.startswith('__'))})")
    record = _record(sample)
    label = _decoded(sample, "output.cls") if "output.cls" in sample else None
    return Example(key=key, image=to_unit_float(array), metadata=metadata_from_record(record, key, centroids),
                   caption=caption_from_record(record, label))


_FRAME = re.compile(r"^input-(\d+)\.npy$")


def parse_temporal_sample(sample: Mapping[str, Any], rng: np.random.Generator, frames: int = 3,
                          centroids: Optional[FmowCentroids] = None) -> Example:
    """Temporal layout: ``input-<i>.npy`` + ``metadata-<i>.json`` per image of one place.

    As the reference's fMoW temporal training (§7): with at least ``frames + 1`` images, that
    many are drawn at random (random order), the first is the target and the others the
    conditioning; with fewer, the list is padded with copies of the first image, which is also the
    target. The caption comes from the target's metadata.
    """
    key = sample["__key__"]
    indices = sorted(int(m.group(1)) for name in sample if (m := _FRAME.match(name)))
    if not indices:
        raise InvalidRequest(f"temporal sample {key} has no input-<i>.npy frames")
    need = frames + 1
    if len(indices) >= need:
        chosen = [indices[i] for i in rng.permutation(len(indices))[:need]]
    else:
        chosen = indices + [indices[0]] * (need - len(indices))
    images, metas, captions = [], [], []
    for i in chosen:
        record = _record(sample, f"metadata-{i}.json")
        images.append(to_unit_float(_decoded(sample, f"input-{i}.npy")))
        metas.append(metadata_from_record(record, key, centroids))
        captions.append(caption_from_record(record))
    return Example(key=key, image=images[0], metadata=metas[0], caption=captions[0],
                   cond=images[1:], cond_metadata=metas[1:])


def parse_superres_sample(sample: Mapping[str, Any], rng: np.random.Generator,
                          centroids: Optional[FmowCentroids] = None) -> Example:
    """Sentinel-2 -> RGB layout (§6): ``multispectral.npy`` (H, W, 13 L1C DN), ``rgb.npy``,
    ``metadata.json`` (of the RGB target).

    The conditioning gets the reference radiometry: per-band mean ± 2 std stretch truncated to
    8 bit, bands [B4, B3, B2, B5, B6, B7, B8, B8A, B11, B12]; its metadata is the target's with the
    GSD set to 10 m (not rescaled).
    """
    from engine.geo.sentinel2_bands import L1C_ORDER, model_bands

    key = sample["__key__"]
    if "multispectral.npy" not in sample or "rgb.npy" not in sample:
        raise InvalidRequest(f"super-resolution sample {key} needs multispectral.npy and rgb.npy")
    ms = _hwc(_decoded(sample, "multispectral.npy"))
    if ms.shape[2] != len(L1C_ORDER):
        raise InvalidRequest(f"multispectral.npy of {key} has {ms.shape[2]} bands; the reference layout has "
                             f"the 13 L1C bands {', '.join(L1C_ORDER)}")
    cond = np.moveaxis(model_bands(np.moveaxis(ms, -1, 0), L1C_ORDER), 0, -1)
    record = _record(sample)
    meta = metadata_from_record(record, key, centroids)
    return Example(key=key, image=to_unit_float(_decoded(sample, "rgb.npy")), metadata=meta,
                   caption=caption_from_record(record), cond=[cond],
                   cond_metadata=[meta.with_gsd(SENTINEL_COND_GSD_M)], cond_gsd_fixed=True)


def parse_control_sample(sample: Mapping[str, Any], rng: np.random.Generator,
                         centroids: Optional[FmowCentroids] = None) -> Example:
    """2D RGB control layout (xBD-like): ``input.npy`` target, ``cond.npy`` conditioning RGB,
    ``metadata.json`` and optional ``cond_metadata.json`` (default: the target's)."""
    key = sample["__key__"]
    target = _image_field(sample, ("input.npy",))
    cond = _image_field(sample, ("cond.npy",))
    if target is None or cond is None:
        raise InvalidRequest(f"control sample {key} needs input.npy and cond.npy")
    record = _record(sample)
    meta = metadata_from_record(record, key, centroids)
    cond_meta = metadata_from_record(_record(sample, "cond_metadata.json"), key, centroids) \
        if "cond_metadata.json" in sample else meta
    return Example(key=key, image=to_unit_float(target), metadata=meta, caption=caption_from_record(record),
                   cond=[to_unit_float(cond)], cond_metadata=[cond_meta])


# --------------------------------------------------------------------------------------------
# Example -> model input
# --------------------------------------------------------------------------------------------


@dataclass
class Transform:
    """Turn an :class:`Example` into tensors the way the reference's training did.

    Attributes:
        resolution: model resolution in px (short-side resize + centre crop).
        conditioning_resolution: size of 2D conditioning images (super-resolution: resolution // 2
            for the released checkpoint); temporal frames are always at ``resolution``.
        metadata_dropout: probability (0..1) to zero each normalised field, independently.
        caption_dropout: probability (0..1) to drop each optional caption part.
        temporal: stack conditioning frames as (C, T, H, W) for ControlNet3D.
    """

    resolution: int
    conditioning_resolution: Optional[int] = None
    metadata_dropout: float = 0.1
    caption_dropout: float = 0.1
    temporal: bool = False

    def metadata_vector(self, meta: SatMetadata, native_px: Optional[int], rng: Optional[np.random.Generator],
                        rescale: bool = True) -> np.ndarray:
        """Normalised (7,) float32 of ``meta`` as fed to the model, fields dropped at random."""
        if rescale and native_px:
            meta = meta.rescaled_to(native_px, self.resolution)
        values = np.asarray(meta.normalised(), dtype=np.float32)
        if rng is not None and self.metadata_dropout > 0:
            values[rng.random(values.shape[0]) < self.metadata_dropout] = 0.0
        return values

    def __call__(self, example: Example, rng: Optional[np.random.Generator]) -> dict[str, Any]:
        """``rng=None`` disables every dropout (validation, evaluation)."""
        h, w = example.image.shape[:2]
        pixels = resize_center_crop(_chw(example.image), self.resolution) * 2.0 - 1.0
        out: dict[str, Any] = {
            "key": example.key,
            "pixel_values": pixels.contiguous(),
            "metadata": torch.from_numpy(self.metadata_vector(example.metadata, min(h, w), rng)),
            "caption": example.caption.render(rng, self.caption_dropout if rng is not None else 0.0),
        }
        if example.cond is not None:
            size = self.resolution if self.temporal else (self.conditioning_resolution or self.resolution)
            frames = [resize_center_crop(_chw(f), size) for f in example.cond]
            metas = [
                self.metadata_vector(m, min(f.shape[:2]), rng, rescale=not example.cond_gsd_fixed)
                for m, f in zip(example.cond_metadata or [SatMetadata()] * len(example.cond), example.cond)
            ]
            if self.temporal:
                out["conditioning"] = torch.stack(frames, dim=1).contiguous()  # (C, T, H, W)
                out["cond_metadata"] = torch.from_numpy(np.stack(metas, axis=1))  # (7, T)
            else:
                out["conditioning"] = frames[0].contiguous()
                out["cond_metadata"] = torch.from_numpy(metas[0])
        return out


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; lists for strings."""
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        batch[name] = torch.stack(values) if torch.is_tensor(values[0]) else list(values)
    return batch
