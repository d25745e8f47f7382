"""The released DiffusionSat checkpoints, and the record an installed folder carries.

``engine/resources/releases.json`` is the one source of truth for what each release is: its Zenodo
record, the folder its zip unpacks to, its native and conditioning resolution, prediction type,
the UNet checkpoint a ControlNet was trained against, its tasks and training ranges. The configs
inside the releases cannot tell these: every release copies Stable Diffusion 2.1's UNet config
unchanged (``sample_size`` 96, i.e. 768 px), although none was trained at 768 px.

An installed folder says what it is in ``diffusionsat.json`` (:data:`RECORD_FILE`), written by
``diffusionsat download`` (``{"source": "download", "release": ...}``) and by our training runs
(``{"source": "training", "resolution": ...}``). A folder unzipped by hand has none and is
recognised by :func:`match_release` from its folder name (the zip's) or its layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..atomic import write_json_atomic

RECORD_FILE = "diffusionsat.json"


@dataclass(frozen=True)
class Release:
    name: str
    record: str
    what: str
    kind: str  #: "single-image", "controlnet-superres", "controlnet-temporal"
    resolution: int
    zip: str = ""
    folders: tuple[str, ...] = ()
    conditioning_resolution: Optional[int] = None
    prediction_type: str = "v_prediction"
    #: single-image releases: the checkpoint the notebooks sample with
    unet_checkpoint: Optional[str] = None
    #: ControlNets: {"release": ..., "checkpoint": ...} of the frozen UNet they were trained against
    pairs_with: Optional[dict] = None
    tasks: tuple[str, ...] = ()
    training: dict = field(default_factory=dict)

    @property
    def paired_unet(self) -> Optional[str]:
        """``"diffusionsat-512/checkpoint-100000"`` for a ControlNet, else None."""
        if not self.pairs_with:
            return None
        return f"{self.pairs_with['release']}/{self.pairs_with['checkpoint']}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "record": self.record, "zip": self.zip, "folders": list(self.folders),
            "kind": self.kind, "what": self.what, "resolution": self.resolution,
            "conditioning_resolution": self.conditioning_resolution, "prediction_type": self.prediction_type,
            "unet_checkpoint": self.unet_checkpoint, "pairs_with": self.pairs_with, "tasks": list(self.tasks),
            "training": self.training,
        }


@lru_cache(maxsize=1)
def _load() -> dict[str, Release]:
    path = Path(str(resources.files("engine") / "resources" / "releases.json"))
    data = json.loads(path.read_text())
    out = {}
    for entry in data["releases"]:
        entry = dict(entry)
        entry["folders"] = tuple(entry.get("folders") or ())
        entry["tasks"] = tuple(entry.get("tasks") or ())
        out[entry["name"]] = Release(**entry)
    return out


def releases() -> dict[str, Release]:
    """name -> :class:`Release`, in the manifest's order."""
    return dict(_load())


def release(name: str) -> Optional[Release]:
    return _load().get(name)


# --------------------------------------------------------------------------------------------
# The record next to the weights
# --------------------------------------------------------------------------------------------


def read_record(folder: Path) -> Optional[dict]:
    """``folder/diffusionsat.json`` as a dict, or None (absent or unreadable)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_record(folder: Path, levels: int = 2) -> tuple[Optional[dict], Optional[Path]]:
    """The nearest record in ``folder`` or up to ``levels`` folders above it (a UNet folder
    ``ROOT/checkpoint-N/unet`` finds ``ROOT/diffusionsat.json``), with the folder holding it."""
    folder = Path(folder)
    for candidate in [folder, *list(folder.parents)[:levels]]:
        record = read_record(candidate)
        if record is not None:
            return record, candidate
    return None, None


def write_record(folder: Path, record: dict) -> Path:
    """Write ``folder/diffusionsat.json`` atomically."""
    folder = Path(folder)
    return write_json_atomic(folder / RECORD_FILE, record, sort_keys=True)


def download_record(rel: Release) -> dict:
    """What ``diffusionsat download`` writes next to the weights it installed."""
    return {"source": "download", "release": rel.name, "record": rel.record, "kind": rel.kind,
            "resolution": rel.resolution, "conditioning_resolution": rel.conditioning_resolution,
            "prediction_type": rel.prediction_type, "tasks": list(rel.tasks),
            "paired_unet": rel.paired_unet}


def match_release(folder: Path, kind: Optional[str] = None) -> Optional[Release]:
    """The release a folder unzipped by hand is, from its name (the zip's folder, or the name
    ``download`` installs it under); ``kind`` (from the layout) must agree when given."""
    folder = Path(folder)
    names = {folder.name}
    if folder.name in ("unet", "controlnet"):
        names |= {p.name for p in list(folder.parents)[:2]}
    for rel in _load().values():
        if names & ({rel.name, *rel.folders}) and (kind is None or kind == rel.kind):
            return rel
    return None
