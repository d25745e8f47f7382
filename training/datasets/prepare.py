"""``diffusionsat prepare``: GeoTIFF crops -> webdataset shards that train faster and stream.

Each grid crop becomes one sample ``<file stem>_<row>_<col>``:

- ``input.npy``: (resolution, resolution, 3) uint8, the crop after the training resize (short
  side to ``resolution``, bilinear antialiased, centre crop) and the file's radiometric stretch;
- ``metadata.json``: ``lon``, ``lat`` (degrees, crop centre), ``gsd`` (metres per pixel of
  ``input.npy``), ``cloud_cover`` (**percent**, as fMoW stores it), ``timestamp`` (ISO date or
  null), ``caption`` (``{"source", "parts", "text"}`` before dropout), ``source`` (the file) and
  ``window`` (``[col_off, row_off, width, height]`` native pixels).

The image dataset reads these back like fMoW shards (same keys), so a prepared run and a run on
the GeoTIFFs see the same images and metadata (up to the 8-bit rounding of ``input.npy``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine.atomic import write_json_atomic
from engine.errors import InvalidRequest

from .geotiff import GeoTiffFolder, find_geotiffs
from .samples import _chw, resize_center_crop
from .shards import ShardWriter


@dataclass
class PrepareResult:
    shards: list[Path]
    samples: int
    seconds: float

    def as_dict(self) -> dict:
        return {"shards": [str(p) for p in self.shards], "samples": self.samples, "seconds": round(self.seconds, 3)}


def prepare_shards(
    data: Sequence[str],
    out: str | os.PathLike,
    resolution: int = 256,
    crop_size: Optional[int] = None,
    shard_size: int = 1000,
    rgb_bands: Optional[Sequence[int]] = None,
    quiet: bool = False,
) -> PrepareResult:
    """Write the grid crops of the GeoTIFFs in ``data`` as shards into ``out`` (see module doc).

    Args:
        resolution: stored image size in px (a multiple of 8).
        crop_size: crop edge in native px (default ``resolution``: no resize).
        shard_size: samples per shard.
    """
    if resolution < 8 or resolution % 8:
        raise InvalidRequest(f"--resolution {resolution} must be a positive multiple of 8")
    started = time.perf_counter()
    folder = GeoTiffFolder(find_geotiffs(data), crop_size or resolution, "grid", 1, rgb_bands)
    out = Path(out)
    if out.exists() and any(out.glob("*.tar")):
        raise InvalidRequest(f"{out} already holds shards; give an empty or new folder")
    with ShardWriter(out, maxcount=shard_size) as writer:
        for index in range(len(folder)):
            example = folder.load(index, None)
            h, w = example.image.shape[:2]
            pixels = resize_center_crop(_chw(example.image), resolution)
            image = np.clip(np.rint(pixels.numpy() * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            meta = example.metadata.rescaled_to(min(h, w), resolution)
            _, win = folder.window(index, None)
            record = {
                "lon": meta.lon_deg,
                "lat": meta.lat_deg,
                "gsd": meta.gsd_m,
                "cloud_cover": None if meta.cloud_cover is None else meta.cloud_cover * 100.0,
                "timestamp": None if meta.date is None else meta.date.isoformat(),
                "caption": {"source": example.caption.source, "parts": list(example.caption.parts),
                            "text": example.caption.text},
                "source": str(folder.rasters[folder.index[index][0]].path),
                "window": [int(win.col_off), int(win.row_off), int(win.width), int(win.height)],
            }
            writer.write(example.key, {"input.npy": image, "metadata.json": record})
            if not quiet and (index + 1) % 500 == 0:
                print(f"prepare: {index + 1}/{len(folder)} crops", file=sys.stderr)
        shards = writer.close()
    summary = {"samples": writer.count, "resolution": resolution, "crop_size": crop_size or resolution,
               "shards": [p.name for p in shards], "layout": "image (input.npy uint8, metadata.json)"}
    write_json_atomic(out / "prepare.json", summary)
    return PrepareResult(shards=shards, samples=writer.count, seconds=time.perf_counter() - started)
