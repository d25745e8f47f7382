"""Training data: webdataset shards in the reference layouts and GeoTIFF folders.

:func:`open_source` turns ``--data`` values into a source for a task:

- shards (``shards/{000..099}.tar``, a .tar file, a folder of .tar files, http(s) URLs) in the
  layout of the task (``image``: fMoW ``input.npy`` + ``metadata.json`` [+ ``output.cls``];
  ``superres``: ``multispectral.npy`` + ``rgb.npy`` + ``metadata.json``; ``temporal``:
  ``input-<i>.npy`` + ``metadata-<i>.json``; ``control``: ``input.npy`` + ``cond.npy`` +
  ``metadata.json``);
- GeoTIFFs (a folder searched recursively, .tif files, or a .txt list) for single-image
  training, cut into crops with metadata derived from the georeferencing.

Layouts and sidecars are documented in ``docs/training.md``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Sequence

from engine.errors import InvalidRequest

from .captions import Caption
from .samples import (
    Example,
    FmowCentroids,
    Transform,
    parse_control_sample,
    parse_image_sample,
    parse_superres_sample,
    parse_temporal_sample,
)
from .stream import MapSource, ShardSource, TrainingStream, first_examples, sample_rng

__all__ = [
    "Caption",
    "Example",
    "Transform",
    "TrainingStream",
    "MapSource",
    "ShardSource",
    "open_source",
    "first_examples",
    "sample_rng",
    "data_kind",
]

TASKS = ("image", "superres", "temporal", "control")


def data_kind(specs: Sequence[str]) -> str:
    """``"shards"`` or ``"geotiff"``: what ``--data`` points at."""
    if not specs:
        raise InvalidRequest("--data is required: a folder of GeoTIFFs, shards (.tar), or a list file")
    kinds = set()
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if text.startswith(("http://", "https://")) or "{" in text or path.suffix.lower() == ".tar":
            kinds.add("shards")
        elif path.is_dir():
            has_tar = any(path.glob("*.tar"))
            kinds.add("shards" if has_tar else "geotiff")
        elif path.suffix.lower() in (".tif", ".tiff"):
            kinds.add("geotiff")
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            kinds.add("shards" if lines and all(ln.endswith(".tar") or "://" in ln for ln in lines) else "geotiff")
        elif not path.exists():
            raise InvalidRequest(f"--data {text} does not exist; give a folder of GeoTIFFs or shards, "
                                 "a .tar pattern like shards/{000..099}.tar, or a .txt list")
        else:
            raise InvalidRequest(f"--data {text} is neither a folder, a GeoTIFF, a .tar shard nor a .txt list")
    if len(kinds) > 1:
        raise InvalidRequest("--data mixes shards and GeoTIFFs; prepare the GeoTIFFs into shards first "
                             "(diffusionsat prepare) or train on one kind")
    return kinds.pop()


def _shard_specs(specs: Sequence[str]) -> list[str]:
    out: list[str] = []
    for spec in specs:
        path = Path(str(spec)).expanduser()
        if path.suffix.lower() == ".txt" and path.is_file():
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                # relative paths are relative to the list, as for GeoTIFF lists
                local = not line.startswith(("http://", "https://")) and not Path(line).expanduser().is_absolute()
                out.append(str(path.parent / line) if local else line)
        else:
            out.append(str(spec))
    return out


def open_source(
    specs: Sequence[str],
    task: str = "image",
    *,
    crop_size: int = 512,
    crop: str = "grid",
    crops_per_image: int = 1,
    rgb_bands: Optional[Sequence[int]] = None,
    frames: int = 3,
    fmow_csv: Optional[str] = None,
    shuffle_buffer: int = 1000,
) -> Any:
    """A :class:`MapSource` (GeoTIFFs) or :class:`ShardSource` for ``task``.

    Raises :class:`InvalidRequest` for missing paths, empty folders, or a layout the task cannot
    use (ControlNet tasks need shards).
    """
    from .geotiff import GeoTiffFolder, find_geotiffs
    from .shards import shard_list

    if task not in TASKS:
        raise InvalidRequest(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    kind = data_kind(specs)
    if kind == "geotiff":
        if task != "image":
            raise InvalidRequest(f"{task} ControlNet training reads shards (layout in docs/training.md), "
                                 "not GeoTIFF folders")
        return MapSource(GeoTiffFolder(find_geotiffs(specs), crop_size, crop, crops_per_image, rgb_bands))
    centroids = FmowCentroids(fmow_csv) if fmow_csv else None
    parse: Any
    if task == "image":
        parse = functools.partial(parse_image_sample, centroids=centroids)
    elif task == "superres":
        parse = functools.partial(parse_superres_sample, centroids=centroids)
    elif task == "temporal":
        parse = functools.partial(parse_temporal_sample, frames=frames, centroids=centroids)
    else:
        parse = functools.partial(parse_control_sample, centroids=centroids)
    return ShardSource(shard_list(_shard_specs(specs)), parse, shuffle_buffer)
