"""The job endpoints: submit (``POST /v1/jobs``), list, state and progress, cancel, result."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ..errors import Gone, NotFound, NotReady
from ..jobs import CANCELLED, DONE, FAILED
from ..schemas import ERROR_RESPONSES, JobListOut, JobOut, SubmitOut
from .common import API_PREFIX, AUTH, job_request, short

router = APIRouter(prefix=API_PREFIX)

#: The body of POST /v1/jobs and /v1/plan: one of the task request models (see app.custom_openapi).
JOB_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}}}


@router.post("/jobs", response_model=SubmitOut, status_code=202, dependencies=AUTH,
             responses=ERROR_RESPONSES, tags=["jobs"], openapi_extra=JOB_REQUEST_BODY)
async def submit(request: Request) -> dict[str, Any]:
    """Queue a task request (the same fields as ``diffusionsat <task>``); answers at once.

    Fields that take input files accept ``upload:<id>`` refs or paths on the engine's machine.
    A request that names no ``model`` runs with the engine's ``--model``.
    """
    # job_request has run the checks the run makes before its first model call (inputs
    # opened under the job's input policy, output grid, pixel limits, masks, dates:
    # engine.tasks.check in resolve_request), so a request that would fail is refused now, with a 4xx.
    job = request.app.state.manager.submit(await job_request(request))
    # "queued" is the state at acceptance; the worker may already have started it since.
    return {"id": job.id, "state": "queued"}


@router.get("/jobs", response_model=JobListOut, dependencies=AUTH, responses=ERROR_RESPONSES, tags=["jobs"])
def list_jobs(request: Request) -> dict[str, Any]:
    """Every job this engine remembers, oldest first."""
    return {"jobs": request.app.state.manager.list()}


def _job_or_404(request: Request, job_id: str) -> dict[str, Any]:
    job = request.app.state.manager.snapshot(job_id)
    if job is None:
        raise NotFound(f"no job {short(job_id, 40)!r} on this engine (jobs are forgotten when the "
                       "engine restarts); submit it again")
    return job


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=AUTH, responses=ERROR_RESPONSES,
            tags=["jobs"])
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    """A job's state, progress (0..1), step/tile, ETA in seconds, error and result."""
    return _job_or_404(request, job_id)


@router.delete("/jobs/{job_id}", response_model=JobOut, dependencies=AUTH, responses=ERROR_RESPONSES,
               tags=["jobs"])
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a job: a queued one never starts, a running one stops within one denoising step
    (``finished`` is set once it has stopped). A finished job is left as it is."""
    job = request.app.state.manager.cancel(job_id)
    if job is None:
        _job_or_404(request, job_id)
    return job


_TIFF = {200: {"content": {"image/tiff": {"schema": {"type": "string", "format": "binary"}}},
               "description": "a Cloud-Optimized GeoTIFF"}, **ERROR_RESPONSES}


@router.get("/jobs/{job_id}/result", dependencies=AUTH, tags=["jobs"], response_class=FileResponse,
            responses=_TIFF)
def get_result(request: Request, job_id: str):
    """The job's result, a Cloud-Optimized GeoTIFF on the requested grid."""
    job = _finished_job(request, job_id)
    return FileResponse(job.result_path, media_type="image/tiff",
                        filename=f"diffusionsat-{job.task}-{job.id[:8]}.tif")


@router.get("/jobs/{job_id}/result/spread", dependencies=AUTH, tags=["jobs"], response_class=FileResponse,
            responses=_TIFF)
def get_spread(request: Request, job_id: str):
    """The per-pixel spread map of a job submitted with ``spread`` (a float32 COG beside the result
    on the same grid: the standard deviation of brightness over the seeds, 0..1)."""
    from ...tasks.common import spread_path

    job = _finished_job(request, job_id)
    path = spread_path(job.result_path)
    if not getattr(job.request, "spread", None):
        raise NotFound(f"job {short(job_id, 40)!r} was not asked for a spread map; submit it again with "
                       '"spread": N (2..16 seeds)')
    if not path.is_file():
        raise Gone(f"the spread map of job {job_id} is gone; submit the job again")
    return FileResponse(path, media_type="image/tiff", filename=f"diffusionsat-{job.task}-{job.id[:8]}.spread.tif")


def _finished_job(request: Request, job_id: str):
    """The job record of a job whose result is there to download; else the 4xx that says why."""
    _job_or_404(request, job_id)
    job = request.app.state.manager.get(job_id)
    retention_hours = request.app.state.config.retention_hours
    state = job.state
    if state == DONE and job.result_path is not None and job.result_path.is_file():
        return job
    if state == DONE:
        raise Gone(f"the result of job {job_id} was deleted after the retention time "
                   f"({retention_hours:g} h); submit the job again")
    if state == FAILED:
        raise Gone(f"job {job_id} failed, so it has no result: {job.error}")
    if state == CANCELLED:
        raise Gone(f"job {job_id} was cancelled, so it has no result")
    raise NotReady(f"job {job_id} is {state} ({job.as_dict()['progress'] * 100:.0f} %); "
                   "poll GET /v1/jobs/{id} until its state is done")
