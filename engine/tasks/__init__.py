"""The user-level tasks: typed requests in, georeferenced rasters out.

- :mod:`engine.tasks.requests`: the request models, the one schema of the CLI and the server.
- :mod:`engine.tasks.checks`: :func:`check` / :func:`plan` (every refusal before the first model
  call; no torch), and :mod:`engine.tasks.run`: :func:`run_task` (any request, through the
  registry below).
- one module per task: :mod:`~engine.tasks.generate`, :mod:`~engine.tasks.superres`,
  :mod:`~engine.tasks.temporal`, :mod:`~engine.tasks.inpaint`, :mod:`~engine.tasks.extend`; what the tiled ones share
  (provenance, seeds, the tiled job, results) is :mod:`engine.tasks.common`, and their model side
  (device, pipeline, each tile's noise) :mod:`engine.tasks.sampling`; ``generate --gsd`` over
  several windows (joint denoising of one latent canvas) is :mod:`engine.tasks.extent`, and
  :mod:`~engine.tasks.extend` outpaints a layer on that canvas, the layer's latents held fixed.

Importing this package stays light (pydantic, no torch, diffusers or rasterio): the CLI builds its
parser from the request models and ``diffusionsat --help`` must be quick. So the registries name
each task's module and function, imported only when the task runs or is checked, and the names
that live in the heavy modules are resolved on first use (:func:`__getattr__`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .requests import (
    DEFAULT_PROMPT,
    MAX_PIXELS,
    REQUEST_MODELS,
    SCHEDULER_NAMES,
    ExtendRequest,
    GenerateRequest,
    InpaintRequest,
    SuperresRequest,
    TemporalRequest,
    format_validation_error,
    parse_request,
)

#: task name -> "module:function" of its runner, ``function(request, out, *, models, progress,
#: cancel) -> TaskResult`` (None on a non-zero rank of a split run); :func:`runner_of` imports it.
RUNNERS: dict[str, str] = {
    "generate": "generate:generate",
    "superres": "superres:run",
    "temporal": "temporal:run",
    "inpaint": "inpaint:run",
    "extend": "extend:run",
}

#: task name -> "module:function" of its layout, ``function(request, model_px) -> Layout`` (the
#: output grid and tiles, known before any model is loaded): the tiled tasks; :func:`layout_of`.
LAYOUTS: dict[str, str] = {
    "superres": "superres:layout",
    "temporal": "temporal:layout",
    "inpaint": "inpaint:layout",
    "extend": "extend:layout",
}


def _resolve(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def runner_of(task: str) -> Callable:
    """The function that runs ``task`` (its module is imported now)."""
    return _resolve(RUNNERS[task])


def layout_of(task: str) -> Callable:
    """The layout function of a tiled ``task`` (its module is imported now)."""
    return _resolve(LAYOUTS[task])


#: public names defined in the heavy modules -> their module, imported on first use (PEP 562) so
#: that ``import engine.tasks`` loads neither torch nor rasterio.
_LAZY = {
    "Checked": "checks",
    "check": "checks",
    "plan": "checks",
    "run_task": "run",
    "TaskResult": "common",
    "Outcome": "common",
    "spread_path": "common",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_PROMPT", "ExtendRequest", "MAX_PIXELS", "REQUEST_MODELS", "SCHEDULER_NAMES", "GenerateRequest", "InpaintRequest",
    "SuperresRequest", "TemporalRequest", "format_validation_error", "parse_request", "RUNNERS", "LAYOUTS",
    "runner_of", "layout_of", *_LAZY,
]
