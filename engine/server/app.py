"""The HTTP API over :mod:`engine.tasks`: jobs, progress, cancellation, uploads, results.

``create_app(config)`` builds the FastAPI app (its state, the error handlers, the routers of
:mod:`engine.server.routes`, the OpenAPI document); ``engine.server.run.serve`` runs it with uvicorn.
Every endpoint but ``GET /v1/health`` needs ``Authorization: Bearer <token>``. Every error is
``{"detail": <a message a person can act on>, "code": <machine code>}``, never a traceback.
No CORS headers are sent: web pages in a browser cannot call the engine, only programs that hold the token.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DiffusionSatError
from .config import ServerConfig
from .errors import error_body, error_code, error_status
from .inputs import UploadStore
from .jobs import JobManager
from .routes import ROUTERS
from .routes.common import API_PREFIX, short

log = logging.getLogger("engine.server")


# ---- helpers --------------------------------------------------------------------------------


def _json_error(status: int, detail: str, code: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(detail, code), status_code=status, headers=headers)


def _format_request_validation(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return "; ".join(parts) or "the request is not valid"


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
    app.state.placement = placement
    app.state.manager = manager
    app.state.uploads = uploads
    app.state.models = models

    # ---- errors: every one is {"detail", "code"} (statuses and codes: errors.ERROR_TABLE) -----

    @app.exception_handler(DiffusionSatError)
    async def _engine_error(request: Request, exc: DiffusionSatError) -> JSONResponse:
        return _json_error(error_status(exc), str(exc), error_code(exc), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, _format_request_validation(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _json_error(404, f"no endpoint {request.method} {short(request.url.path)}; the API is "
                                    f"under {API_PREFIX} (see {API_PREFIX}/openapi.json)", "not_found")
        if exc.status_code == 405:
            return _json_error(405, f"{request.method} is not allowed on {short(request.url.path)}",
                               "method_not_allowed", getattr(exc, "headers", None))
        return _json_error(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(500, "internal error in the engine; its log has the details, please report it",
                           "internal_error")

    # ---- endpoints (engine/server/routes/) ----------------------------------------------------

    for router in ROUTERS:
        app.include_router(router)

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
