"""``GET /v1/models``: the models this engine can run."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ...tasks import REQUEST_MODELS
from ..schemas import ERROR_RESPONSES, ModelsOut
from .common import API_PREFIX, AUTH

router = APIRouter(prefix=API_PREFIX)


def model_tasks(kind: str, model: Any = None) -> list[str]:
    """The tasks a model of ``kind`` runs: those it declares, else what its kind allows."""
    declared = getattr(model, "tasks", None)
    if declared:
        return list(declared)
    if kind == "built-in":  # the tiny preset has every component each task needs
        return list(REQUEST_MODELS)
    if kind == "single-image":
        return [t for t in ("generate", "inpaint") if t in REQUEST_MODELS]
    return []


@router.get("/models", response_model=ModelsOut, dependencies=AUTH, responses=ERROR_RESPONSES,
            tags=["engine"])
def list_models(request: Request) -> dict[str, Any]:
    """Models this engine can run: the built-in tiny one and the installed ones, best first."""
    from ...models.registry import installed_models, tiny_entry

    out = [{**tiny_entry(), "tasks": model_tasks("built-in")}]
    for m in installed_models():
        out.append({**m.as_dict(), "tasks": model_tasks(m.kind, m)})
    return {"models": out, "default": request.app.state.config.default_model}
