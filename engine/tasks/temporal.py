"""Temporal generation: the image of a place for a new date from dated images of it (ControlNet3D),
tiled over the first input's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geo.guard import display_name
from ..geo.sources import RGBSource, grid_of
from ..geo.tiles import plan_tiles
from ..models.resolution import request_resolution
from ..parallel import RunContext
from .common import (
    Layout,
    Outcome,
    TiledJob,
    check_pixels,
    check_same_place,
    dated_frames,
    metadata_tags,
    provenance_tags,
    run_job,
    seed_for,
    spread_samples,
    tile_overlap,
    whole_metadata,
)
from .run import tiled_runner
from .sampling import Batches, batch_choice, bundle_for, controlnet_process, frames_controls, pipeline, tiles_per_call


def layout(request, model_px: int) -> Layout:
    """The first input's grid (or its --bbox subset); every input must cover it."""
    frames = dated_frames(request.inputs, request.input_dates, "inputs")
    grid, window = grid_of(request.inputs[0]).subset(request.bbox, request.crs)
    check_same_place([p for p, _ in frames], grid)
    check_pixels(grid.width, grid.height, request.max_pixels)
    tiles = plan_tiles(grid.width, grid.height, model_px, tile_overlap(request, model_px), 1)
    return Layout(grid, tiles, model_px, grid, window, frames=frames)


def temporal(request, out: Path, *, models, context: RunContext, progress=None, cancel=None) -> Outcome:
    """Generate the image of a place for a new date from dated images of it (ControlNet3D)."""
    bundle, placement = bundle_for(models, request, context)
    controlnet = bundle.controlnet_for("temporal")
    model_px = request_resolution(bundle, request)
    tiling = layout(request, model_px)
    frames, grid, tiles = tiling.frames, tiling.out_grid, tiling.tiles
    sources = [RGBSource(p, grid) for p, _ in frames]
    seed = seed_for(request, context)
    pipe = pipeline(bundle, request, controlnet)
    notices: list[str] = []
    choice = batch_choice(request, bundle, placement, model_px, controlnet=True)
    batches = Batches(choice, notices)

    def read(tile):
        arrays, valid = [], None
        for s in sources:
            a, v = s.read(tile.valid)
            arrays.append(a)
            valid = v if valid is None else valid & v
        return np.concatenate(arrays), valid

    def control_of(arrays, mds):
        return frames_controls(arrays, [d for _, d in frames], mds, request.conditioning_scale)

    process = controlnet_process(pipe, request, batches, control_of, grid=grid, model_px=model_px,
                                 date=request.date, seed=seed, total_tiles=len(tiles), progress=progress,
                                 cancel=cancel)
    centre = whole_metadata(grid, request.date, request.cloud_cover)
    tags = _tags(request, provenance_tags("temporal", bundle, placement, request, seed), frames, centre)
    tags.update(choice.tags())
    job = TiledJob(out=out, grid=grid, tiles=tiles, bands=3, dtype="uint8", read=read, process=process, tags=tags,
                   run_key=request.model_dump_json(),
                   batch_size=tiles_per_call(choice, spread_samples(request)), spread=spread_samples(request))
    try:
        run_job(job, context, progress, cancel)
    finally:
        for s in sources:
            s.close()
    warnings = list(bundle.notices) + notices + centre.out_of_range_warnings("temporal")
    return Outcome(grid=grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


def _tags(request, tags: dict, frames, centre) -> dict:
    """The output's tags: provenance, the dated inputs, the date generated, the whole output's metadata."""
    tags.update(inputs=";".join(display_name(p) for p, _ in frames),
                input_dates=";".join(d.isoformat() for _, d in frames),
                metadata_date=request.date.isoformat(), TIFFTAG_DATETIME=request.date.strftime("%Y:%m:%d 00:00:00"),
                conditioning_scale=request.conditioning_scale)
    tags.update(metadata_tags(centre))
    return tags


#: the task's runner (engine.tasks.RUNNERS): check, assigned inputs, then :func:`temporal`
run = tiled_runner("temporal", temporal)
