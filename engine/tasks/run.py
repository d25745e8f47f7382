"""Check, plan and run any task request.

:func:`check` is the one validation of a request after its fields: the run calls it before loading
the model, and ``--dry-run``, ``POST /v1/plan`` and the server's check before accepting a job (202)
call it too, so they refuse exactly the same requests with the same messages. :func:`run_task` runs
any request through the task registry (:data:`engine.tasks.RUNNERS`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rasterio.windows import Window

from ..device import resolve
from ..errors import InvalidRequest, RasterError
from ..geo.assign import assigned_inputs
from ..geo.guard import check_output
from ..geo.sentinel2_bands import to_model_input
from ..geo.sources import MaskSource, RGBSource
from ..metadata import SatMetadata, derive_from_bbox, ground_pixel_size, parse_crs, validate_bbox
from ..models.cache import ModelCache
from ..models.bundle import missing_controlnet
from ..models.registry import auto_model, controlnet_task_of, locate_model, plan_resolution
from ..models.resolution import request_resolution
from ..progress import CancelToken, ProgressCallback
from . import layout_of, runner_of
from .common import Layout, Outcome, TaskResult, _distributed, check_resample, date_of, spread_path
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
    if request.task == "generate":
        width = request.width or request.size or model_px
        height = request.height or request.size or model_px
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
        sidecars = [spread_path(out)] if getattr(request, "spread", None) else []
        check_output(out, request.input_paths(), sidecars=sidecars)
    return out


def plan(request: _Request, out: Optional[str | Path] = None) -> dict[str, Any]:
    """What ``request`` would do, after :func:`check`: the output grid, the number of tiles and of
    UNet evaluations. Loads no model and writes nothing. For ``--dry-run``, ``POST /v1/plan`` and the
    plugin's pre-flight."""
    c = check(request, out)
    cfg = 2 if request.guidance > 1.0 else 1
    samples = (getattr(request, "spread", None) or 1) if request.task == "generate" else 1
    plan = {"width": c.width, "height": c.height, "crs": c.crs, "bbox": list(c.bbox), "tiles": c.tiles,
            "gsd_m": c.gsd_m, "task": request.task, "model_px": c.model_px, "steps": request.steps,
            "unet_evaluations": c.tiles * request.steps * cfg * samples,
            "output_megapixels": round(c.width * c.height / 1e6, 3), "model": c.model, "notices": list(c.notices)}
    # The work, in megapixels through the UNet: a generate runs the whole image at once, the other
    # tasks one model_px window per tile (a time estimate scales with this, not with evaluations).
    eval_px = c.width * c.height if request.task == "generate" else c.model_px * c.model_px
    passes = 1 + int(getattr(request, "resample", 0) or 0)
    plan["mpx_per_step"] = round(eval_px * cfg * samples * passes / 1e6, 6)
    plan["work_mpx"] = round(plan["mpx_per_step"] * c.tiles * request.steps, 6)
    return plan


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def tiled_runner(name: str, body: Callable[..., Outcome]) -> Callable[..., Optional[TaskResult]]:
    """The runner of a tiled task: :func:`check`, the inputs with what QGIS assigned them
    (``engine.geo.assign``), ``body`` (the task's work, an :class:`Outcome`), then its TaskResult."""

    def run(request, out, *, models=None, progress=None, cancel=None) -> Optional[TaskResult]:
        started = time.perf_counter()
        out = check(request, out).out  # everything refusable is refused before the model is loaded
        if models is None:  # not `models or ...`: an empty shared cache is falsy (it has __len__)
            models = ModelCache()
        with assigned_inputs(request, out.parent) as request:
            outcome = body(request, out, models=models, progress=progress, cancel=cancel)
        if _distributed()[0] != 0:
            return None  # a non-zero rank of a split run: rank 0 wrote the COG and reports
        grid = outcome.grid
        return TaskResult(
            path=out, task=name, seed=outcome.seed, model=outcome.model, width=grid.width, height=grid.height,
            crs=grid.crs.to_string(), bbox=tuple(grid.bounds), metadata=outcome.metadata,
            warnings=outcome.warnings, seconds=time.perf_counter() - started,
        )

    run.__name__ = name
    run.__doc__ = f"Run the {name} task (see engine.tasks.{name}.{name})."
    return run


class _DenoiseMeter:
    """Wraps a progress callback: counts the denoising steps run and times them (model loading,
    reading, decoding and writing are left out)."""

    def __init__(self, progress: Optional[ProgressCallback]) -> None:
        self.progress = progress
        self.steps = 0
        self.seconds = 0.0
        self._last: Optional[float] = None

    def __call__(self, p) -> None:
        if p.message == "denoising":
            now = time.perf_counter()
            if p.step > 0 and self._last is not None:
                self.steps += 1
                self.seconds += now - self._last
            self._last = now
        if self.progress is not None:
            self.progress(p)


def run_task(
    request: _Request,
    out: str | Path,
    *,
    models=None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_model_loaded=None,
) -> TaskResult:
    """Run any task request, writing its COG at ``out``. ``on_model_loaded(bundle, placement)``
    (generate only) is called once the model is loaded."""
    meter = _DenoiseMeter(progress)
    extra = {"on_model_loaded": on_model_loaded} if on_model_loaded is not None else {}
    result = runner_of(request.task)(request, out, models=models, progress=meter, cancel=cancel, **extra)
    if result is not None:
        result.denoise_steps, result.denoise_seconds = meter.steps, meter.seconds
    return result
