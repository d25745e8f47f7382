"""A model's native resolution and where it comes from: the ``diffusionsat.json`` record beside the
weights, else the manifest of releases (:mod:`engine.models.releases`, by folder name or layout),
else the config's ``sample_size`` (SD 2.1's 96 is never taken as 768). :func:`request_resolution`
gives the run and the ``--dry-run`` plan the same tile size."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import releases

TINY_RESOLUTION = 256  # the built-in tiny model: its UNet sample_size 32 x the VAE factor 8


@dataclass(frozen=True)
class Resolution:
    """A model's native resolution (px) and where the engine got it from."""

    px: int
    #: "manifest", "recorded by training", "config", "built-in", "--resolution" or "default"
    source: str
    conditioning_px: Optional[int] = None
    #: set when the value is a guess the user should know about (one line)
    warning: Optional[str] = None

    def as_dict(self) -> dict:
        return {"px": self.px, "source": self.source, "conditioning_px": self.conditioning_px}


#: SD 2.1's UNet sample_size (768 px), copied unchanged into every released DiffusionSat config.
SD21_SAMPLE_SIZE = 96
#: What a DiffusionSat folder with SD 2.1's sample_size most likely is (the 512 release).
SD21_DERIVED_DEFAULT_PX = 512


def _vae_factor_near(folder: Path) -> int:
    """The VAE downsampling factor from the nearest ``vae/config.json`` (8 when there is none)."""
    for candidate in [folder, *list(folder.parents)[:2]]:
        cfg = candidate / "vae" / "config.json"
        if cfg.is_file():
            try:
                return 2 ** (len(json.loads(cfg.read_text()).get("block_out_channels", [0] * 4)) - 1)
            except (OSError, ValueError):
                break
    return 8


def _record_resolution(record: dict, kind: str) -> Optional[Resolution]:
    """The resolution a ``diffusionsat.json`` states for a model of ``kind``, if it applies."""
    rec_kind = str(record.get("kind") or "")
    if (kind == "single-image") == rec_kind.startswith("controlnet"):
        return None  # a ControlNet run's record says nothing about its frozen UNet, and vice versa
    if record.get("source") == "download" and releases.release(str(record.get("release"))):
        rel = releases.release(str(record["release"]))
        return Resolution(rel.resolution, "manifest", rel.conditioning_resolution)
    if isinstance(record.get("resolution"), int) and record["resolution"] > 0:
        cond = record.get("conditioning_resolution")
        return Resolution(int(record["resolution"]), "recorded by training", cond if isinstance(cond, int) else None)
    return None


def _layout_release(config: dict, kind: str) -> Optional[releases.Release]:
    """A ControlNet folder unzipped by hand under another name: recognised by its layout (the
    only release of its kind, with SD 2.1's text width and the release's conditioning bands)."""
    if not kind.startswith("controlnet") or config.get("cross_attention_dim") != 1024:
        return None
    channels = {"controlnet-superres": 10, "controlnet-temporal": 3}.get(kind)
    if config.get("conditioning_in_channels", 3) != channels:
        return None
    matches = [r for r in releases.releases().values() if r.kind == kind]
    return matches[0] if len(matches) == 1 else None


def folder_resolution(folder: Path, config: dict, kind: str) -> tuple[Resolution, Optional[releases.Release]]:
    """The native resolution of the model in ``folder`` (a UNet or ControlNet folder with
    ``config``): the record next to the weights, else the manifest (folder name or layout), else
    the config's ``sample_size`` (with a warning for SD 2.1's 96, which is never taken as 768)."""
    record, _ = releases.find_record(folder)
    if record is not None:
        found = _record_resolution(record, kind)
        if found is not None:
            return found, releases.release(str(record.get("release"))) if record.get("release") else None
    rel = releases.match_release(folder, kind) or _layout_release(config, kind)
    if rel is not None:
        return Resolution(rel.resolution, "manifest", rel.conditioning_resolution), rel
    sample = config.get("sample_size")
    factor = _vae_factor_near(folder)
    if isinstance(sample, int) and sample == SD21_SAMPLE_SIZE and config.get("cross_attention_dim") == 1024:
        px = SD21_DERIVED_DEFAULT_PX
        return Resolution(px, "config", warning=(
            f"{folder} says sample_size {sample} ({sample * factor} px), Stable Diffusion 2.1's value that "
            f"DiffusionSat copied unchanged; assuming {px} px (the 512 release): install it with "
            "`diffusionsat download` or pass --resolution")), None
    if isinstance(sample, int) and sample > 0:
        cond = None
        if kind == "controlnet-superres" and int(config.get("conditioning_scale") or 1) > 1:
            cond = sample * factor // int(config["conditioning_scale"])
        return Resolution(sample * factor, "config", cond), None
    return Resolution(512, "default", warning=f"{folder} does not tell its resolution; assuming 512 px "
                      "(pass --resolution)"), None


def task_resolution(facts: Any, task: str, references: bool = False) -> Resolution:
    """The resolution ``task`` runs at for a bundle or :class:`~engine.models.registry.ModelFacts`: a ControlNet task at
    its ControlNet's (superres, temporal, in-painting with references), else the UNet's."""
    uses_controlnet = task in ("superres", "temporal") or (task == "inpaint" and references)
    cn = getattr(facts, "controlnet_resolution", None)
    if uses_controlnet and cn is not None:
        return cn
    return facts.unet_resolution


def request_resolution(facts: Any, request: Any) -> int:
    """The tile (generate: default image) size in px for ``request``: its ``resolution`` when given,
    else :func:`task_resolution`. The real run and :func:`~engine.models.registry.plan_resolution` both call this."""
    override = getattr(request, "resolution", None)
    if override:
        return int(override)
    return task_resolution(facts, request.task, bool(getattr(request, "references", None))).px
