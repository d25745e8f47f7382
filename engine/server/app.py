"""The HTTP API over :mod:`engine.tasks`: jobs, progress, cancellation, uploads, results.

``create_app(config)`` builds the FastAPI app; ``engine.server.run.serve`` runs it with uvicorn.
Every endpoint but ``GET /v1/health`` needs ``Authorization: Bearer <token>``. Every error is
``{"detail": <a message a person can act on>, "code": <machine code>}``, never a traceback.
No CORS headers are sent: web pages in a browser cannot call the engine, only programs that hold the token.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DiffusionSatError, DiskFull, InvalidRequest
from .config import ServerConfig
from .errors import (
    ApiError,
    Gone,
    NotFound,
    NotReady,
    TooLarge,
    UnsupportedMediaType,
    error_body,
    error_code,
    error_status,
)
from .inputs import UploadStore, resolve_request
from .jobs import CANCELLED, DONE, FAILED, JobManager
from .security import check_bearer

log = logging.getLogger("engine.server")

API_PREFIX = "/v1"
_UPLOAD_TYPES = ("image/tiff", "image/geotiff", "application/octet-stream")


# ---- response shapes (published in the OpenAPI document) -----------------------------------


class ErrorOut(BaseModel):
    detail: str = Field(..., description="what went wrong and what to do about it")
    code: str = Field(..., description="machine code: invalid_request, model_not_found, unauthorized, "
                                       "forbidden, not_found, not_ready, gone, too_large, ...")


class HealthOut(BaseModel):
    status: str
    version: str
    device: str
    dtype: str
    cuda: bool
    free_vram_mb: Optional[int]
    total_vram_mb: Optional[int]
    queue: int = Field(..., description="jobs waiting (not counting the running one)")
    running: bool
    models_loaded: int = Field(..., description="models held in memory now")
    model_loads: int = Field(..., description="models loaded since the engine started (a reused one does not "
                                              "count)")


class ModelOut(BaseModel):
    name: str
    tasks: list[str]
    resolution: int = Field(..., description="native output size in px")
    kind: str
    path: Optional[str]
    trained_against: Optional[str] = Field(None, description="for a ControlNet: the UNet it was trained against")
    resolution_source: Optional[str] = Field(
        None, description="where `resolution` comes from: manifest, recorded by training, config, default, built-in")
    conditioning_resolution: Optional[int] = Field(None, description="for a ControlNet: px of its conditioning")
    release: Optional[str] = Field(None, description="the released checkpoint this is (see `diffusionsat download`)")
    unet_checkpoint: Optional[str] = Field(
        None, description="single-image: the checkpoint-N used; ControlNet: the UNet it pairs with")
    warning: Optional[str] = Field(None, description="a guess the engine had to make about this model")


class ModelsOut(BaseModel):
    models: list[ModelOut]
    default: str


class SubmitOut(BaseModel):
    id: str
    state: str


class JobResultOut(BaseModel):
    task: str
    seed: int
    model: str
    width: int
    height: int
    crs: str
    bbox: list[float]
    metadata: dict[str, Any]
    warnings: list[str]
    seconds: float
    denoise_steps: Optional[int] = Field(None, description="denoising steps run, summed over tiles (skipped tiles run none)")
    denoise_seconds: Optional[float] = Field(None, description="seconds those steps took")
    result_url: Optional[str]


class PlanOut(BaseModel):
    task: str
    width: int = Field(..., description="output width, px")
    height: int = Field(..., description="output height, px")
    crs: str
    bbox: list[float] = Field(..., description="output bounds in crs units")
    gsd_m: float = Field(..., description="output ground sample distance, metres per pixel")
    tiles: int
    model_px: int = Field(..., description="model window side, output px")
    steps: int
    unet_evaluations: int
    output_megapixels: float
    mpx_per_step: Optional[float] = Field(None, description="megapixels through the UNet per step of one tile")
    work_mpx: Optional[float] = Field(None, description="megapixels through the UNet over the job (time scales with it)")
    model: Optional[str] = Field(None, description="the model the job would run (what auto picks)")
    notices: list[str] = Field(default_factory=list, description="one-line notes on rules applied to the model")


class JobOut(BaseModel):
    id: str
    task: str
    state: str = Field(..., description="queued, running, done, failed or cancelled")
    progress: float = Field(..., ge=0.0, le=1.0)
    step: int
    total_steps: int
    tile: int
    total_tiles: int
    eta_s: Optional[float]
    message: str
    error: Optional[str]
    error_code: Optional[str]
    created: Optional[str]
    started: Optional[str]
    finished: Optional[str] = Field(..., description="set when the job has stopped for good")
    result: Optional[JobResultOut]
    expired: bool
    warnings: list[str]


class JobListOut(BaseModel):
    jobs: list[JobOut]


class UploadOut(BaseModel):
    upload_id: str
    path_ref: str = Field(..., description="use this string in a job request's path fields")
    width: int
    height: int
    count: int
    crs: Optional[str]
    dtype: str
    bounds: list[float]
    size_bytes: int


_ERRORS = {status: {"model": ErrorOut} for status in (401, 403, 404, 409, 410, 413, 415, 422, 429, 507)}

#: How deep a job request's JSON may nest; a real one is 2 levels deep (a list in the object).
MAX_JSON_DEPTH = 16


# ---- helpers --------------------------------------------------------------------------------


def _json_error(status: int, detail: str, code: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(detail, code), status_code=status, headers=headers)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_request_validation(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return "; ".join(parts) or "the request is not valid"


#: Bodies up to this size are read and discarded before a 413, so that the client, still sending,
#: receives the answer instead of a broken pipe; larger ones are cut off at once.
DRAIN_LIMIT = 64 * 1024 * 1024


async def _body_chunks(request: Request, idle_timeout_s: float):
    """``request.stream()``, but a client that stops sending the body for ``idle_timeout_s`` gets a
    408 instead of holding a connection (and a worker task) for ever (slow-loris on the body)."""
    import asyncio

    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(f"the request body stalled: nothing arrived for {idle_timeout_s:g} s; send it "
                           "again", status=408, code="request_timeout",
                           headers={"Connection": "close"}) from None
        yield chunk


async def _read_limited(request: Request, limit: int, idle_timeout_s: float = 30.0) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        if int(length) <= DRAIN_LIMIT:
            async for _ in _body_chunks(request, idle_timeout_s):
                pass
        raise TooLarge(f"the request body is {int(length)} bytes, more than this endpoint's limit of {limit}")
    chunks, size = [], 0
    async for chunk in _body_chunks(request, idle_timeout_s):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is more than this endpoint's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_json_shape(data: Any) -> None:
    """Refuse, with a 422, JSON that no request model could hold but that would trip the code
    behind validation: nesting past :data:`MAX_JSON_DEPTH` (recursion) and NUL characters (which
    no path, CRS or prompt can contain, and which the OS refuses in paths). Iterative: any depth."""
    stack = [(data, 1, "request")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request nests deeper than {MAX_JSON_DEPTH} levels at {_short(where)}; "
                                 "a job request is a flat JSON object with a few lists")
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidRequest(f"{_short(where)}: contains a NUL character, which no path or text "
                                     "field may contain")
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise InvalidRequest("a field name contains a NUL character")
                stack.append((item, depth + 1, key if where == "request" else f"{where}.{key}"))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}.{i}") for i, item in enumerate(value))


def _model_tasks(kind: str, model: Any = None) -> list[str]:
    from ..tasks import REQUEST_MODELS

    declared = getattr(model, "tasks", None)
    if declared:
        return list(declared)
    if kind == "built-in":  # the tiny preset has every component each task needs
        return list(REQUEST_MODELS)
    if kind == "single-image":
        return [t for t in ("generate", "inpaint") if t in REQUEST_MODELS]
    return []


def _job_request_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """The body schema of POST /v1/jobs (one of the task request models) and its components."""
    from ..tasks import MAX_PIXELS, REQUEST_MODELS

    components: dict[str, Any] = {}
    refs = []
    for task, model in REQUEST_MODELS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        if task == "generate":  # the pixel limit of one image (a model validator, not a field's range)
            schema["x-max-pixels"] = MAX_PIXELS
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        refs.append((task, {"$ref": f"#/components/schemas/{model.__name__}"}))
    if len(refs) == 1:
        return refs[0][1], components
    return {
        "oneOf": [r for _, r in refs],
        "discriminator": {"propertyName": "task", "mapping": {t: r["$ref"] for t, r in refs}},
    }, components


# ---- the app --------------------------------------------------------------------------------


def create_app(config: ServerConfig, *, manager: Optional[JobManager] = None, runner=None) -> FastAPI:
    """Build the app. ``manager``/``runner`` are for tests; by default a :class:`JobManager`
    over :func:`engine.tasks.run_task` with a model cache of ``config.max_models`` models."""
    from ..device import resolve
    from ..models.cache import ModelCache

    placement = resolve(config.device, config.dtype)
    config.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    uploads = UploadStore(config.uploads_dir, config.max_upload_bytes)
    models = ModelCache(max_models=config.max_models)
    if manager is None:
        from ..geo.guard import confined_runner

        # Every job opens its files under the server's input policy (allowed roots, no VRTs...).
        manager = JobManager(config.jobs_dir, models=models, runner=confined_runner(runner, config.input_policy()),
                             retention_s=config.retention_s, max_queue=config.max_queue,
                             max_job_seconds=config.max_job_seconds)
    stop_sweeping = threading.Event()

    def sweep_forever() -> None:
        # Often enough that nothing outlives the retention time by much, rarely enough to be free.
        interval = min(300.0, max(1.0, config.retention_s / 4))
        while not stop_sweeping.is_set():
            try:
                manager.sweep()
                uploads.sweep(config.retention_s)
            except Exception:  # noqa: BLE001 - a failing sweep must not take the server down
                log.exception("retention sweep failed")
            stop_sweeping.wait(interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        sweeper = threading.Thread(target=sweep_forever, name="diffusionsat-sweeper", daemon=True)
        sweeper.start()
        try:
            yield
        finally:
            stop_sweeping.set()
            await run_in_threadpool(manager.shutdown)

    app = FastAPI(
        title="DiffusionSat engine",
        version=__version__,
        description=(
            "Jobs over HTTP for the DiffusionSat QGIS plugin. Every endpoint but /v1/health needs "
            "`Authorization: Bearer <token>` (the token is in the engine's token file). Errors are "
            '`{"detail": ..., "code": ...}`.'
        ),
        lifespan=lifespan,
        # The document is served under /v1 behind the token; the browsable docs pages load
        # scripts from a CDN, which an offline or locked-down engine must not depend on.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.config = config
    app.state.manager = manager
    app.state.uploads = uploads
    app.state.models = models
    bearer = HTTPBearer(auto_error=False, description="the engine's token (see its token file)")

    async def require_token(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.token)

    # `bearer` only publishes the scheme in the OpenAPI document; require_token decides.
    auth = [Depends(bearer), Depends(require_token)]

    # ---- errors ------------------------------------------------------------------------------

    @app.exception_handler(DiffusionSatError)
    async def _engine_error(request: Request, exc: DiffusionSatError) -> JSONResponse:
        return _json_error(error_status(exc), str(exc), error_code(exc), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, _format_request_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _json_error(404, f"no endpoint {request.method} {_short(request.url.path)}; the API is "
                                    f"under {API_PREFIX} (see {API_PREFIX}/openapi.json)", "not_found")
        if exc.status_code == 405:
            return _json_error(405, f"{request.method} is not allowed on {_short(request.url.path)}",
                               "method_not_allowed", getattr(exc, "headers", None))
        return _json_error(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(500, "internal error in the engine; its log has the details, please report it",
                           "internal_error")

    # ---- endpoints ---------------------------------------------------------------------------

    @app.get(f"{API_PREFIX}/health", response_model=HealthOut, tags=["engine"])
    def health() -> dict[str, Any]:
        """Whether the engine answers, its version and device, free GPU memory and the queue.

        The only endpoint without a token, so that a client can tell "no engine" from "wrong token".
        """
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

    @app.get(f"{API_PREFIX}/openapi.json", dependencies=auth, include_in_schema=False)
    def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(f"{API_PREFIX}/models", response_model=ModelsOut, dependencies=auth, responses=_ERRORS,
             tags=["engine"])
    def list_models() -> dict[str, Any]:
        """Models this engine can run: the built-in tiny one and the installed ones, best first."""
        from ..models.loading import installed_models, tiny_entry

        out = [{**tiny_entry(), "tasks": _model_tasks("built-in")}]
        for m in installed_models():
            out.append({**m.as_dict(), "tasks": _model_tasks(m.kind, m)})
        return {"models": out, "default": config.default_model}

    @app.post(f"{API_PREFIX}/uploads", response_model=UploadOut, status_code=201, dependencies=auth,
              responses=_ERRORS, tags=["inputs"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "image/tiff": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload(request: Request) -> dict[str, Any]:
        """Store a GeoTIFF (the raw bytes as the body) for use as a job input.

        Answers with ``path_ref`` (``upload:<id>``) to put into a job request's path fields.
        Uploads are deleted after the retention time.
        """
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in _UPLOAD_TYPES:
            raise UnsupportedMediaType(
                f"upload the raw GeoTIFF bytes with Content-Type image/tiff (got {_short(ctype) or 'none'})"
            )
        limit = config.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise TooLarge(f"the upload is {int(length) / 2**20:.1f} MiB, more than this engine's limit "
                           f"of {limit / 2**20:.0f} MiB (--max-upload-mb); upload a smaller window")
        upload_id, partial = uploads.new_partial()
        size = 0
        try:
            with open(partial, "wb") as fh:
                async for chunk in _body_chunks(request, config.body_timeout_s):
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"the upload is more than this engine's limit of {limit / 2**20:.0f} "
                                       "MiB (--max-upload-mb); upload a smaller window")
                    fh.write(chunk)
            if size == 0:
                raise InvalidRequest("the upload is empty; send the GeoTIFF's bytes as the request body")
        except OSError as err:
            partial.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left in the engine's workdir {config.uploads_dir} for a "
                               f"{size / 2**20:.1f} MiB upload (or more); free space there, or start the "
                               "engine with another --workdir") from None
            raise
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        info = await run_in_threadpool(uploads.finish, upload_id, partial)
        log.info("upload %s stored (%d bytes, %dx%d px)", upload_id, size, info.width, info.height)
        return info.as_dict()

    @app.post(f"{API_PREFIX}/jobs", response_model=SubmitOut, status_code=202, dependencies=auth,
              responses=_ERRORS, tags=["jobs"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
    async def submit(request: Request) -> dict[str, Any]:
        """Queue a task request (the same fields as ``diffusionsat <task>``); answers at once.

        Fields that take input files accept ``upload:<id>`` refs or paths on the engine's machine.
        A request that names no ``model`` runs with the engine's ``--model``.
        """
        # _job_request has run the checks the run makes before its first model call (inputs
        # opened under the job's input policy, output grid, pixel limits, masks, dates:
        # engine.tasks.check in resolve_request), so a request that would fail is refused now, with a 4xx.
        job_request = await _job_request(request)
        job = manager.submit(job_request)
        # "queued" is the state at acceptance; the worker may already have started it since.
        return {"id": job.id, "state": "queued"}

    async def _job_request(request: Request) -> Any:
        """The JSON body of a job request, validated (size, JSON, fields, paths, limits)."""
        body = await _read_limited(request, config.max_json_bytes, config.body_timeout_s)
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidRequest(f"the body is not valid JSON ({err}); send a JSON object") from None
        except RecursionError:
            raise InvalidRequest(f"the request nests deeper than {MAX_JSON_DEPTH} levels; a job request is "
                                 "a flat JSON object with a few lists") from None
        _check_json_shape(data)
        if isinstance(data, dict) and not isinstance(data.get("task", "generate"), str):
            from ..tasks import REQUEST_MODELS

            raise InvalidRequest(f"task: must be a string, one of {', '.join(REQUEST_MODELS)}")
        # Validation reads files (model configs, CRS database): keep it off the event loop.
        job_request = await run_in_threadpool(_resolve, data)
        steps = getattr(job_request, "steps", None)
        if isinstance(steps, int) and steps > config.max_steps:
            raise InvalidRequest(f"steps: {steps} is more than this engine's limit of {config.max_steps} "
                                 "steps per job (--max-steps); 20-50 steps are usual")
        return job_request

    def _resolve(data: Any) -> Any:
        from ..geo.guard import run_confined

        try:
            return run_confined(config.input_policy(), resolve_request, data, config, uploads)
        except OSError as err:
            if isinstance(err, DiffusionSatError):
                raise
            # A path the OS refuses outright (too long, a loop of links, ...): the request's fault.
            name = _short(str(err.filename)) if err.filename else "a path in the request"
            raise InvalidRequest(f"{name}: cannot be used as a path on the engine's machine "
                                 f"({err.strerror or err}); give a shorter, existing path or upload the file") from None

    def _plan(job_request: Any) -> dict[str, Any]:
        from ..tasks import plan

        try:
            return plan(job_request)
        except OSError as err:
            if isinstance(err, DiffusionSatError):
                raise
            name = _short(str(err.filename)) if err.filename else "an input of the request"
            raise InvalidRequest(f"{name}: cannot be read on the engine's machine ({err.strerror or err}); "
                                 "give a path the engine can read or upload the file") from None

    @app.post(f"{API_PREFIX}/plan", response_model=PlanOut, dependencies=auth, responses=_ERRORS,
              tags=["jobs"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}}})
    async def plan_job(request: Request) -> dict[str, Any]:
        """The pre-flight of a task request: output grid, tiles and model calls. Runs nothing.

        Checks the request as ``POST /v1/jobs`` does, so a request that plans will also be accepted.
        """
        from ..geo.guard import run_confined

        job_request = await _job_request(request)
        return await run_in_threadpool(run_confined, config.input_policy(), _plan, job_request)

    @app.get(f"{API_PREFIX}/jobs", response_model=JobListOut, dependencies=auth, responses=_ERRORS,
             tags=["jobs"])
    def list_jobs() -> dict[str, Any]:
        """Every job this engine remembers, oldest first."""
        return {"jobs": manager.list()}

    def _job_or_404(job_id: str) -> dict[str, Any]:
        job = manager.snapshot(job_id)
        if job is None:
            raise NotFound(f"no job {_short(job_id, 40)!r} on this engine (jobs are forgotten when the "
                           "engine restarts); submit it again")
        return job

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}", response_model=JobOut, dependencies=auth, responses=_ERRORS,
             tags=["jobs"])
    def get_job(job_id: str) -> dict[str, Any]:
        """A job's state, progress (0..1), step/tile, ETA in seconds, error and result."""
        return _job_or_404(job_id)

    @app.delete(f"{API_PREFIX}/jobs/{{job_id}}", response_model=JobOut, dependencies=auth, responses=_ERRORS,
                tags=["jobs"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one never starts, a running one stops within one denoising step
        (``finished`` is set once it has stopped). A finished job is left as it is."""
        job = manager.cancel(job_id)
        if job is None:
            _job_or_404(job_id)
        return job

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/result", dependencies=auth, tags=["jobs"],
             response_class=FileResponse,
             responses={200: {"content": {"image/tiff": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "the result as a Cloud-Optimized GeoTIFF"}, **_ERRORS})
    def get_result(job_id: str):
        """The job's result, a Cloud-Optimized GeoTIFF on the requested grid."""
        _job_or_404(job_id)
        job = manager.get(job_id)
        state = job.state
        if state == DONE and job.result_path is not None and job.result_path.is_file():
            return FileResponse(job.result_path, media_type="image/tiff",
                                filename=f"diffusionsat-{job.task}-{job.id[:8]}.tif")
        if state == DONE:
            raise Gone(f"the result of job {job_id} was deleted after the retention time "
                       f"({config.retention_hours:g} h); submit the job again")
        if state == FAILED:
            raise Gone(f"job {job_id} failed, so it has no result: {job.error}")
        if state == CANCELLED:
            raise Gone(f"job {job_id} was cancelled, so it has no result")
        raise NotReady(f"job {job_id} is {state} ({job.as_dict()['progress'] * 100:.0f} %); "
                       "poll GET /v1/jobs/{id} until its state is done")

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        body, components = _job_request_schemas()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(components)
        schemas["JobRequest"] = body
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    return app
