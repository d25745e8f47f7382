"""Super-resolution: a Sentinel-2 product (10 m, L1C/L2A) -> RGB at ``factor`` times the resolution,
tiled over the input (the superres ControlNet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window

from ..errors import InvalidRequest
from ..geo.grid import Grid
from ..geo.guard import display_name
from ..geo.sentinel2_bands import to_model_input
from ..geo.sources import S2Source
from ..geo.tiles import plan_tiles
from ..models.resolution import request_resolution
from ..parallel import RunContext
from ..pipelines.controlnet import Control
from .common import (
    Layout,
    Outcome,
    TiledJob,
    check_pixels,
    date_of,
    metadata_tags,
    provenance_tags,
    run_job,
    seed_for,
    spread_samples,
    tile_overlap,
    whole_metadata,
)
from .run import tiled_runner
from .sampling import Batches, batch_choice, bundle_for, controlnet_process, pipeline, tiles_per_call


def layout(request, model_px: int) -> Layout:
    """Input tiles of model_px / factor Sentinel-2 pixels, output at input GSD / factor."""
    factor = request.factor
    if model_px % factor:
        raise InvalidRequest(f"--factor {factor} must divide the model's {model_px} px output tile (e.g. 2, 4, 8)")
    in_tile = model_px // factor
    source = S2Source(request)
    in_grid, window = source.grid.subset(request.bbox, request.crs)
    tiles = plan_tiles(in_grid.width, in_grid.height, in_tile, tile_overlap(request, in_tile), factor)
    out_grid = in_grid.scaled(factor)
    check_pixels(out_grid.width, out_grid.height, request.max_pixels, "a smaller --bbox or --factor")
    return Layout(out_grid, tiles, model_px, in_grid, window, source)


def _resize(array: np.ndarray, size: int):
    """(C, h, w) float -> (1, C, size, size) tensor, bilinear with antialiasing (the reference's resize)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


def superres(request, out: Path, *, models, context: RunContext, progress=None, cancel=None) -> Outcome:
    """Sentinel-2 (10 m, L1C/L2A) -> RGB at ``factor`` times the resolution, tiled over the input."""
    bundle, placement = bundle_for(models, request, context)
    controlnet = bundle.controlnet_for("superres")
    model_px = request_resolution(bundle, request)
    cond_px = model_px // int(controlnet.config.conditioning_scale)
    tiling = layout(request, model_px)
    source, window, tiles, out_grid = tiling.source, tiling.window, tiling.tiles, tiling.out_grid
    date = date_of(request.input, request.date)
    seed = seed_for(request, context)
    pipe = pipeline(bundle, request, controlnet)
    warnings: list[str] = list(bundle.notices)
    choice = batch_choice(request, bundle, placement, model_px, controlnet=True)
    batches = Batches(choice, warnings)
    if date is None:
        warnings.append("no acquisition date found in the input; the date is left unknown (give --date)")

    def read(tile):
        win = Window(window.col_off + tile.valid.col_off, window.row_off + tile.valid.row_off,
                     tile.valid.width, tile.valid.height)
        model_input = to_model_input(source.read(win))
        for w in model_input.warnings:
            if w not in warnings and "nodata" not in w:
                warnings.append(w)
        return model_input.array, model_input.valid

    def control_of(arrays, mds):  # the conditioning's metadata: the target's, at 10 m
        return Control(image=torch.cat([_resize(a, cond_px) for a in arrays]),
                       cond_metadata=torch.tensor([md.with_gsd(10.0).normalised() for md in mds], dtype=torch.float32),
                       scale=request.conditioning_scale)

    process = controlnet_process(pipe, request, batches, control_of, grid=out_grid, model_px=model_px, date=date,
                                 seed=seed, total_tiles=len(tiles), progress=progress, cancel=cancel)
    centre = whole_metadata(out_grid, date, request.cloud_cover)
    tags = _tags(request, provenance_tags("superres", bundle, placement, request, seed), tiling.in_grid, centre)
    tags.update(choice.tags())
    job = TiledJob(out=out, grid=out_grid, tiles=tiles, bands=3, dtype="uint8", read=read, process=process,
                   tags=tags, scale=254.0, offset=1.0, nodata=0, run_key=request.model_dump_json(),
                   batch_size=tiles_per_call(choice, spread_samples(request)), spread=spread_samples(request))
    run_job(job, context, progress, cancel)
    warnings += centre.out_of_range_warnings("superres")
    return Outcome(grid=out_grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


def _tags(request, tags: dict, in_grid: Grid, centre) -> dict:
    """The output's tags: provenance, input and output GSD, the whole output's metadata."""
    gsd_in = abs(in_grid.transform.a)
    tags.update(input=display_name(request.input), factor=request.factor, input_gsd=f"{gsd_in:g}",
                output_gsd=f"{gsd_in / request.factor:g}", conditioning_scale=request.conditioning_scale,
                nodata_note="0 = no input data (values 1..255)")
    tags.update(metadata_tags(centre))
    tags["conditioning_gsd_m"] = 10.0  # the ControlNet's metadata: the target's, with the Sentinel-2 GSD
    return tags


#: the task's runner (engine.tasks.RUNNERS): check, assigned inputs, then :func:`superres`
run = tiled_runner("superres", superres)
