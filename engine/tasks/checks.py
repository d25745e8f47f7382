"""Check and plan any task request, before any model is loaded (and without torch).

:func:`check` is the one validation of a request after its fields: the run calls it before loading
the model, and ``--dry-run``, ``POST /v1/plan`` and the server's check before accepting a job (202)
call it too, so they refuse exactly the same requests with the same messages. This module imports
neither torch nor diffusers (a test holds it to that), so a refusal answers at once; the layouts of
the tiled tasks are imported from their task modules when such a request is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rasterio.windows import Window

from ..device import resolve
from ..errors import InvalidRequest, RasterError
from ..geo.assign import assigned_inputs
from ..geo.guard import check_output
from ..geo.sentinel2_bands import to_model_input
from ..geo.sources import MaskSource, RGBSource
from ..metadata import (
    SatMetadata,
    derive_from_bbox,
    ground_pixel_size,
    output_size,
    parse_crs,
    validate_bbox,
)
from ..models.registry import (
    auto_model,
    controlnet_task_of,
    locate_model,
    missing_controlnet,
    plan_resolution,
)
from ..models.resolution import request_resolution
from . import layout_of
from .common import Layout, check_resample, date_of, output_sidecars, spread_samples
from .requests import _Request

# --------------------------------------------------------------------------------------------
# Checks before the first model call (the run, --dry-run and the server)
# --------------------------------------------------------------------------------------------


@dataclass
class Checked:
    """A request that passed every check its run makes before the first model call."""

    request: _Request
    out: Optional[Path]  #: the output path (None: chosen later, e.g. by the server)
    model_px: int  #: the model's output tile size, from its config files
    width: int
    height: int
    crs: str
    bbox: tuple[float, float, float, float]
    tiles: int
    gsd_m: float
    model: str = ""  #: the model's name (what ``auto`` picked)
    notices: tuple[str, ...] = ()  #: the one-line notes the run will print about the model (pairing, tile size)
    extent: Optional[dict] = None  #: generate --gsd over several windows: the joint layout (engine.tasks.extent)


def check(request: _Request, out: Optional[str | Path] = None) -> Checked:
    """Refuse now whatever the run of ``request`` would refuse before producing anything.

    The one validation of a request after its fields: the run calls it before loading the model,
    and ``--dry-run``, ``POST /v1/plan`` and the server's check before accepting a job (202) call it
    too, so they refuse exactly the same requests with the same messages. It reads headers, config
    files and one pixel of each input; it loads no model and writes nothing. ``out`` is checked
    when given (the server picks its own).
    """
    if request.task == "generate":  # the request's own values first: no file is needed to refuse them
        crs = parse_crs(request.crs)
        validate_bbox(request.bbox, crs)
    else:
        SatMetadata(date=request.date, cloud_cover=request.cloud_cover)
        for day in (getattr(request, "input_dates", None) or []) + (getattr(request, "reference_dates", None) or []):
            SatMetadata(date=day)
    path = _check_out(out, request) if out is not None else None
    resolve(request.device, request.dtype)
    located = locate_model(auto_model(request), unet=request.unet, base=request.base, controlnet=request.controlnet)
    # the same rules as the real run (request_resolution), on the facts just located; an hf: id
    # not yet downloaded has none (plan_resolution answers the released models' size)
    model_px = request_resolution(located.facts, request) if located.facts is not None else plan_resolution(request)
    needs = controlnet_task_of(request)
    have = located.controlnet_tasks()
    if needs is not None and have is not None and needs not in have:
        raise missing_controlnet(located.root.name, needs, have)
    if request.task == "generate" and getattr(request, "gsd", None) is not None:
        return _check_extent(request, path, model_px, located)
    if request.task == "extend":  # the input's grid grown to the bbox, jointly denoised windows
        from .extend import check_extend

        return check_extend(request, path, model_px, located)
    if request.task == "generate":
        width, height = output_size(request.bbox, crs, request.size, request.width, request.height, model_px)
        derive_from_bbox(request.bbox, crs, width, height, date=request.date, cloud_cover=request.cloud_cover)
        gsd = ground_pixel_size(request.bbox, crs, width, height)
        return Checked(request, path, model_px, width, height, request.crs, tuple(request.bbox), 1,
                       (gsd[0] * gsd[1]) ** 0.5, *_model_notes(located))
    with assigned_inputs(request) as assigned:
        layout = check_inputs(assigned, model_px, located)
    grid = layout.out_grid
    gsd = ground_pixel_size(grid.bounds, grid.crs.to_wkt(), grid.width, grid.height)
    return Checked(request, path, model_px, grid.width, grid.height, grid.crs.to_string(), tuple(grid.bounds),
                   len(layout.tiles), (gsd[0] * gsd[1]) ** 0.5, *_model_notes(located))


def _check_extent(request, path, model_px: int, located) -> Checked:
    """``generate --gsd``: the bbox's grid at that GSD; larger than the model's window, the joint
    layout (its windows are the plan's tiles)."""
    from .extent.grid import check_extent, extent_grid, extent_layout, extent_sampler, is_joint

    crs = parse_crs(request.crs)
    bbox, width, height = extent_grid(request.bbox, crs, request.gsd)
    check_extent(width, height)
    derive_from_bbox(bbox, crs, width, height, date=request.date, cloud_cover=request.cloud_cover)
    gsd = ground_pixel_size(bbox, crs, width, height)
    extent = None
    tiles = 1
    if is_joint(width, height, model_px):
        layout = extent_layout(request.bbox, request.crs, request.gsd, model_px)
        extent, tiles = layout.plan(), len(layout.windows)
    name, notices = _model_notes(located)
    if extent is not None:  # the run's note when the default sampler becomes DDIM for this size
        _, note = extent_sampler(request.scheduler, width, height, layout.canvas_h, layout.canvas_w)
        notices = (*notices, note) if note else notices
    return Checked(request, path, model_px, width, height, request.crs, tuple(bbox), tiles,
                   (gsd[0] * gsd[1]) ** 0.5, name, notices, extent=extent)


def _model_notes(located) -> tuple[str, tuple[str, ...]]:
    """The model's name and the notes about it that the run prints, for plans."""
    name = "tiny" if located.tiny else located.hub if located.hub else located.root.name
    return name, tuple(located.notices)


def check_inputs(request, model_px: int, located=None) -> Layout:
    """Open every input of a tiled request as its run will, and read one pixel of each:
    what would fail on the first tile fails here, before any model is loaded. ``located`` is the
    :class:`engine.models.registry.LocatedModel` of the request's model (for its scheduler)."""
    layout = layout_of(request.task)(request, model_px)
    grid = layout.out_grid
    first = Window(0, 0, 1, 1)
    # the metadata values the tiles will be conditioned on (dates 1980..2100, cloud cover 0..1)
    own = request.date if request.task == "temporal" else date_of(request.input, request.date)
    SatMetadata(date=own, cloud_cover=request.cloud_cover)
    for _, day in layout.frames:
        SatMetadata(date=day)
    if request.task == "superres":
        win = layout.window
        to_model_input(layout.source.read(Window(win.col_off, win.row_off, 1, 1)))
        return layout
    sources = []
    try:
        if request.task == "inpaint":
            check_resample(request, located.scheduler_class() if located is not None else None)
            MaskSource(request, grid)
            sources.append(RGBSource(request.input, grid, request.rgb_bands))
        sources += [RGBSource(p, grid) for p, _ in layout.frames]
        for source in sources:
            source.read(first)
    finally:
        for source in sources:
            source.close()
    return layout


def _check_out(out, request=None) -> Path:
    """The output path: a .tif in an existing, writable folder (the writer's own conditions), and
    never one of the run's inputs (an existing output is the caller's call: --overwrite)."""
    out = Path(out)
    if out.is_dir():
        raise InvalidRequest(f"output {str(out)!r} is a folder; name a file in it, e.g. {str(out / 'out.tif')!r}")
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InvalidRequest(f"output {str(out)!r} must end in .tif (a Cloud-Optimized GeoTIFF is written)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise RasterError(f"output folder {str(folder)!r} does not exist; create it or choose another --out")
    if not os.access(folder, os.W_OK):
        raise RasterError(f"output folder {str(folder)!r} is not writable; choose another --out")
    if request is not None:  # never write over one of the run's inputs (an existing output is the caller's call)
        check_output(out, request.input_paths(), sidecars=output_sidecars(request, out))
    return out


def plan(request: _Request, out: Optional[str | Path] = None) -> dict[str, Any]:
    """What ``request`` would do, after :func:`check`: the output grid, the number of tiles and of
    UNet evaluations. Loads no model and writes nothing. For ``--dry-run``, ``POST /v1/plan`` and the
    plugin's pre-flight."""
    c = check(request, out)
    cfg = 2 if request.guidance > 1.0 else 1
    samples = spread_samples(request)  # every sample is denoised (and decoded) in full
    plan = {"width": c.width, "height": c.height, "crs": c.crs, "bbox": list(c.bbox), "tiles": c.tiles,
            "gsd_m": c.gsd_m, "task": request.task, "model_px": c.model_px, "steps": request.steps,
            "unet_evaluations": c.tiles * request.steps * cfg * samples,
            "output_megapixels": round(c.width * c.height / 1e6, 3), "model": c.model, "notices": list(c.notices)}
    # The work, in megapixels through the UNet: a generate runs the whole image at once, the other
    # tasks one model_px window per tile (a time estimate scales with this, not with evaluations).
    eval_px = c.width * c.height if request.task == "generate" and not c.extent else c.model_px * c.model_px
    if c.extent:  # generate --gsd over windows: each window is one model_px evaluation per step
        plan.update(c.extent)
        if request.task == "generate":
            plan["gsd_requested"] = request.gsd
    passes = 1 + int(getattr(request, "resample", 0) or 0)
    plan["unet_evaluations"] *= passes  # in-painting's --resample: every pass of a step runs the UNet
    # one step of one tile (window) and one sample: the tasks report each tile-sample's steps (the
    # measured denoise_steps count tiles x samples x steps); the work counts every sample
    plan["mpx_per_step"] = round(eval_px * cfg * passes / 1e6, 6)
    plan["work_mpx"] = round(eval_px * cfg * passes * samples * c.tiles * request.steps / 1e6, 6)
    if samples > 1:
        plan["spread_samples"] = samples
    return plan
