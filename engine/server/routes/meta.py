"""``GET /v1/health`` (the only endpoint without a token) and ``GET /v1/openapi.json``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ... import __version__
from ..schemas import HealthOut
from .common import API_PREFIX, AUTH

log = logging.getLogger("engine.server")

router = APIRouter(prefix=API_PREFIX)


@router.get("/health", response_model=HealthOut, tags=["engine"])
def health(request: Request) -> dict[str, Any]:
    """Whether the engine answers, its version and device, free GPU memory and the queue.

    The only endpoint without a token, so that a client can tell "no engine" from "wrong token".
    """
    state = request.app.state
    placement, manager, models = state.placement, state.manager, state.models
    free = total = None
    cuda = placement.device.startswith("cuda")
    if cuda:
        try:
            import torch

            free_b, total_b = torch.cuda.mem_get_info(torch.device(placement.device))
            free, total = free_b // (1 << 20), total_b // (1 << 20)
        except Exception:  # noqa: BLE001 - health must answer even if the driver hiccups
            log.debug("could not read free GPU memory", exc_info=True)
    return {
        "status": "ok",
        "version": __version__,
        "device": placement.device if placement.device != "cuda" else "cuda:0",
        "dtype": placement.dtype,
        "cuda": cuda,
        "free_vram_mb": free,
        "total_vram_mb": total,
        "queue": manager.queued_count(),
        "running": manager.running_id() is not None,
        "models_loaded": len(models),
        "model_loads": models.loads,
    }


@router.get("/openapi.json", dependencies=AUTH, include_in_schema=False)
def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
