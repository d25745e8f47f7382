"""Generate: the image of a place and a date (the main job), one image written as a COG.

The metadata is derived in one place (``engine.metadata``) from the bbox, CRS and size; with
``spread`` more seeds are sampled and their per-pixel spread is written beside the output.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from rasterio.crs import CRS

from ..batching import BatchChoice
from ..geo.cog import write_cog
from ..metadata import derive_from_bbox, grid_transform, output_size, parse_crs
from ..models.cache import ModelCache
from ..models.resolution import request_resolution
from ..pipelines.text2img import DiffusionSatPipeline
from ..progress import CancelToken, Progress, ProgressCallback
from ..schedulers import make_scheduler
from .checks import check
from .common import (
    TaskResult,
    new_seed,
    provenance_tags,
    spread_path,
    spread_tags,
    welford_step,
)
from .requests import GenerateRequest
from .sampling import Batches, batch_choice


def rasterio_crs(crs: Any):
    """The rasterio CRS of a pyproj CRS (authority codes kept where there is one)."""
    authority = crs.to_authority()
    if authority is not None:
        return CRS.from_user_input(":".join(authority))
    return CRS.from_wkt(crs.to_wkt())


def generate(
    request: GenerateRequest,
    out: str | Path,
    *,
    models=None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_model_loaded=None,
) -> TaskResult:
    """Generate the image for ``request`` and write it as a COG at ``out`` (atomically).

    ``models`` is a :class:`engine.models.cache.ModelCache` (a fresh one if None).
    """
    if request.gsd is not None:  # the bbox at a ground resolution, jointly over windows when large
        from .extent.joint import generate_extent

        return generate_extent(request, out, models=models, progress=progress, cancel=cancel,
                               on_model_loaded=on_model_loaded)
    started = time.perf_counter()
    out = check(request, out).out  # everything refusable is refused before the model is loaded
    crs = parse_crs(request.crs)
    if models is None:  # not `models or ...`: an empty cache is falsy (it has __len__) yet shared
        models = ModelCache()
    bundle, placement = models.get(
        request.model, unet=request.unet, base=request.base, controlnet=request.controlnet,
        device=request.device, dtype=request.dtype, compile=request.compile,
    )
    if on_model_loaded is not None:
        on_model_loaded(bundle, placement)
    model_px = request_resolution(bundle, request)
    width, height = output_size(request.bbox, crs, request.size, request.width, request.height, model_px)
    metadata = derive_from_bbox(
        request.bbox, crs, width, height, date=request.date, cloud_cover=request.cloud_cover
    )
    warnings = list(bundle.notices) + metadata.out_of_range_warnings()
    if max(width, height) > 2 * model_px:
        warnings.append(
            f"{width}x{height} px is far above the model's native {model_px} px: "
            "expect repeated structures; generate at the native size and tile, or lower --size"
        )
    seed = request.seed if request.seed is not None else new_seed()
    first, spread = _sample(request, bundle, placement, metadata, width, height, seed, progress, cancel)
    tags = _tags(request, bundle, placement, seed, metadata)
    if cancel is not None:
        cancel.raise_if_cancelled()
    _write(out, first, spread, tags, crs, grid_transform(request.bbox, width, height), seed, request.spread or 1)
    return TaskResult(
        path=out,
        task="generate",
        seed=seed,
        model=bundle.name,
        width=width,
        height=height,
        crs=request.crs,
        bbox=tuple(request.bbox),
        metadata=metadata.as_dict(),
        warnings=warnings,
        seconds=time.perf_counter() - started,
    )


def _sample(request, bundle, placement, metadata, width: int, height: int, seed: int, progress, cancel):
    """The image of seed ``seed`` (H, W, 3 in 0..1) and, with ``spread``, the per-pixel spread map.

    Each sample has its own seed (seed, seed+1, ...): its initial noise and its scheduler's noise
    come from its own generator, so sample 0 is exactly the single-seed image whatever the batch.
    The samples run ``--batch-size`` at a time (default: :mod:`engine.batching`'s rule), so peak
    memory is one batch's images; the spread map is accumulated on the way (Welford, in sample
    order), not from a stack of all the samples.
    """
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    samples = request.spread or 1
    choice = _batch_choice(request, bundle, placement, max(width, height))
    _CHOICES[id(request)] = choice
    notices: list[str] = []
    batches = Batches(choice, notices, what="samples")
    state: dict[str, Any] = {"first": None, "mean": None, "m2": None, "done": 0}

    def run(indices: list[int]) -> list[None]:
        pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler)
        latents = torch.cat([
            pipe.prepare_latents(1, height, width, torch.Generator("cpu").manual_seed(seed + i)).cpu().float()
            / pipe.scheduler.init_noise_sigma for i in indices])
        # the scheduler's own noise, if it draws any: one generator per sample
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in indices]
        images = pipe(
            [request.prompt] * len(indices),
            metadata if bundle.uses_metadata else None,
            height=height,
            width=width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            num_images_per_prompt=1,
            generator=generators[0] if len(generators) == 1 else generators,
            latents=latents,
            callback=_samples_progress(progress, indices, samples),
            cancel=cancel,
        ).images
        for i, image in zip(indices, images):
            if i < state["done"]:
                continue  # a retried batch (out of memory) never re-adds a sample
            _add_sample(state, i, image, samples)
        return [None] * len(indices)

    try:
        batches(run, list(range(samples)))
    except BaseException:
        _CHOICES.pop(id(request), None)
        raise
    finally:
        for notice in notices:
            _log.warning(notice)
    # per-pixel standard deviation over the samples of the mean of R, G, B (0..1)
    spread = np.sqrt(state["m2"] / samples).astype(np.float32) if samples > 1 else None
    return state["first"], spread


def _add_sample(state: dict, i: int, image: np.ndarray, samples: int) -> None:
    """Sample ``i`` (in order) into the first image and the running mean / M2 of brightness."""
    if state["first"] is None:
        state["first"] = image
    if samples > 1:
        brightness = image.mean(axis=-1, dtype=np.float64)
        if state["mean"] is None:
            state["mean"], state["m2"] = np.zeros_like(brightness), np.zeros_like(brightness)
        welford_step(state["mean"], state["m2"], brightness, i)
    state["done"] = i + 1


#: the batch size each running request's samples were drawn at, by id(request), for its tags
_CHOICES: dict[int, BatchChoice] = {}
_log = logging.getLogger(__name__)


def _batch_choice(request, bundle, placement, size_px: int) -> BatchChoice:
    """``request.batch_size`` or the automatic one (engine.tasks.sampling.batch_choice) for the model
    at ``size_px``, at most the samples there are."""
    choice = batch_choice(request, bundle, placement, size_px, controlnet=False)
    samples = request.spread or 1
    return BatchChoice(min(choice.size, samples), choice.auto)


def _samples_progress(progress, indices: list[int], samples: int):
    """Per-sample progress for a batch of samples (``sample i/N: denoising``), each step of the
    batch reported as one step of each of its samples in turn (see engine.geo.tiles.tile_progress)."""
    if progress is None or samples <= 1:
        return progress

    def report(p):
        b = len(indices)
        if b == 1 or p.step == 0 or not p.total_steps:
            events = [(indices[0], p.step)]
        else:  # this step did tile-steps (step-1)*b+1 .. step*b of the batch's samples in turn
            events = []
            for j in range(b):
                done = (p.step - 1) * b + j + 1
                k = (done - 1) // p.total_steps
                events.append((indices[k], done - k * p.total_steps))
        for i, step in events:
            progress(Progress(step=step, total_steps=p.total_steps, tile=i, total_tiles=samples,
                              message=f"sample {i + 1}/{samples}: {p.message}"))

    return report


def _tags(request, bundle, placement, seed: int, metadata) -> dict:
    """The image's tags: provenance, the synthetic-image description, the metadata conditioned on."""
    choice = _CHOICES.pop(id(request), None)
    tags = {
        **provenance_tags("generate", bundle, placement, request, seed),
        **(choice.tags() if choice is not None else {}),
        "TIFFTAG_IMAGEDESCRIPTION": f"AI-generated (synthetic) image: DiffusionSat {bundle.name}, seed {seed}",
        **metadata.to_tags(),
    }
    if request.date is not None:
        tags["TIFFTAG_DATETIME"] = request.date.strftime("%Y:%m:%d 00:00:00")
    return tags


def _write(out: Path, first: np.ndarray, spread: Optional[np.ndarray], tags: dict, crs, transform,
           seed: int, samples: int) -> None:
    """Write the image (and the spread map beside it, first) as COGs; no orphan spread map is left."""
    image = np.clip(np.rint(first * 255.0), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    if spread is not None:
        map_tags = spread_tags(tags, seed, samples)
        tags["spread_file"] = spread_path(out).name
        write_cog(spread_path(out), spread, crs=rasterio_crs(crs), transform=transform, tags=map_tags,
                  band_descriptions=["spread"])
    try:
        write_cog(
            out,
            image,
            crs=rasterio_crs(crs),
            transform=transform,
            tags=tags,
            band_descriptions=["red", "green", "blue"],
            colorinterp=["red", "green", "blue"],
        )
    except BaseException:
        if spread is not None:  # no orphan spread map without its image
            spread_path(out).unlink(missing_ok=True)
        raise
