"""Run any task request: :func:`run_task` through the task registry (:data:`engine.tasks.RUNNERS`),
and :func:`tiled_runner`, the frame of every tiled task (check, assigned inputs, body, result).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from ..geo.assign import assigned_inputs
from ..models.cache import ModelCache
from ..parallel import RunContext
from ..progress import CancelToken, ProgressCallback
from . import LAYOUTS, runner_of
from .checks import check
from .common import Outcome, TaskResult
from .requests import _Request

# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def tiled_runner(name: str, body: Callable[..., Outcome]) -> Callable[..., Optional[TaskResult]]:
    """The runner of a tiled task: :func:`check`, the inputs with what QGIS assigned them
    (``engine.geo.assign``), ``body`` (the task's work, an :class:`Outcome`), then its TaskResult."""

    def run(request, out, *, models=None, context: Optional[RunContext] = None, progress=None,
            cancel=None) -> Optional[TaskResult]:
        started = time.perf_counter()
        out = check(request, out).out  # everything refusable is refused before the model is loaded
        if models is None:  # not `models or ...`: an empty shared cache is falsy (it has __len__)
            models = ModelCache()
        ctx = context or RunContext()  # one process unless the caller says otherwise
        with assigned_inputs(request, out.parent) as request:
            outcome = body(request, out, models=models, context=ctx, progress=progress, cancel=cancel)
        if ctx.rank != 0:
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
    reading, decoding and writing are left out). A step of a batch of b tiles is reported as b
    per-tile steps (engine.geo.tiles.tile_progress), so ``steps`` is steps x tiles whatever the
    batch size, as the plan's ``mpx_per_step`` (one tile's) expects."""

    def __init__(self, progress: Optional[ProgressCallback]) -> None:
        self.progress = progress
        self.steps = 0
        self.seconds = 0.0
        self._last: Optional[float] = None

    def __call__(self, p) -> None:
        if p.message == "denoising" or p.message.endswith(": denoising"):  # generate --spread: "sample 2/3: denoising"
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
    context: Optional[RunContext] = None,
) -> TaskResult:
    """Run any task request, writing its COG at ``out``. ``on_model_loaded(bundle, placement)``
    (generate only) is called once the model is loaded. ``context``: this process's place in a
    split run of a tiled task (``RunContext.from_env()`` under ``accelerate launch``; default one
    process); a rank other than 0 returns None (rank 0 writes the output and reports)."""
    meter = _DenoiseMeter(progress)
    extra = {"on_model_loaded": on_model_loaded} if on_model_loaded is not None else {}
    if context is not None and request.task in LAYOUTS:  # only the tiled tasks split their tiles
        extra["context"] = context
    result = runner_of(request.task)(request, out, models=models, progress=meter, cancel=cancel, **extra)
    if result is not None:
        result.denoise_steps, result.denoise_seconds = meter.steps, meter.seconds
    return result
