"""``POST /v1/plan``: the pre-flight of a task request (output grid, tiles, model calls)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..schemas import ERROR_RESPONSES, PlanOut
from .common import API_PREFIX, AUTH, check_steps, job_json, path_refused, resolve
from .jobs import JOB_REQUEST_BODY

router = APIRouter(prefix=API_PREFIX)


def _plan(state: Any, data: Any) -> dict[str, Any]:
    """Validate ``data`` as ``POST /v1/jobs`` does and plan it, under the input policy.

    :func:`engine.tasks.plan` runs :func:`engine.tasks.check` itself, so the request is resolved
    without it: the checks run once, in the order submit runs them (fields, paths, the run's
    checks, then the step limit).
    """
    from ...geo.guard import run_confined
    from ...tasks import plan

    job = resolve(state, data, check=False)
    try:
        planned = run_confined(state.config.input_policy(), plan, job)
    except OSError as err:
        raise path_refused(err) from None
    check_steps(job, state.config)
    return planned


@router.post("/plan", response_model=PlanOut, dependencies=AUTH, responses=ERROR_RESPONSES, tags=["jobs"],
             openapi_extra=JOB_REQUEST_BODY)
async def plan_job(request: Request) -> dict[str, Any]:
    """The pre-flight of a task request: output grid, tiles and model calls. Runs nothing.

    Checks the request as ``POST /v1/jobs`` does, so a request that plans will also be accepted.
    """
    data = await job_json(request)
    return await run_in_threadpool(_plan, request.app.state, data)
