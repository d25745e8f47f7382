"""The server's errors and their one JSON shape: ``{"detail": <message>, "code": <machine code>}``.

Engine errors (:mod:`engine.errors`) keep their own ``http_status``; this module adds the HTTP-only
situations (no token, unknown job, result not ready, body too large) and maps every error to a
stable machine ``code`` that the QGIS plugin can branch on while showing ``detail`` to the user.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import (
    Cancelled,
    DeviceError,
    DiffusionSatError,
    DiskFull,
    InputRefused,
    InvalidMetadata,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    DiskFull,
    RasterError,
)


class ApiError(DiffusionSatError):
    """An HTTP error with a status, a machine code and a message a person can act on."""

    http_status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.http_status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}


class Unauthorized(ApiError):
    """No (or a malformed) ``Authorization: Bearer`` header."""

    http_status = 401
    code = "unauthorized"

    def __init__(self, detail: str) -> None:
        # RFC 6750: a 401 names the scheme the client should use.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="diffusionsat"'})


class Forbidden(ApiError):
    """A token was given but it is not this server's."""

    http_status = 403
    code = "forbidden"


class PathNotAllowed(ApiError):
    """An input path lies outside the server's ``--allowed-root`` folders."""

    http_status = 403
    code = "path_not_allowed"


class InputNotFound(ApiError):
    """An input path of the request does not exist on the engine's machine."""

    http_status = 422
    code = "input_not_found"


class NotFound(ApiError):
    http_status = 404
    code = "not_found"


class NotReady(ApiError):
    """The job has no result yet (queued or running)."""

    http_status = 409
    code = "not_ready"


class Gone(ApiError):
    """The job failed, was cancelled, or its result passed the retention time."""

    http_status = 410
    code = "gone"


class TooLarge(ApiError):
    """A body over the size limit, or an output over the pixel-count limit."""

    http_status = 413
    code = "too_large"


class QueueFull(ApiError):
    """The job queue holds ``--max-queue`` jobs already: try again after ``Retry-After`` seconds."""

    http_status = 429
    code = "queue_full"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(int(retry_after))})


class UnsupportedMediaType(ApiError):
    http_status = 415
    code = "unsupported_media_type"


class ServerConfigError(DiffusionSatError):
    """The server cannot start as configured (token file, port, workdir, device)."""


# Most specific first: InvalidMetadata is an InvalidRequest, so it must be looked at before it.
_ENGINE_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidMetadata, "invalid_metadata"),
    (InvalidRequest, "invalid_request"),
    (ModelNotFound, "model_not_found"),
    (ModelLoadError, "model_load_error"),
    (InputRefused, "input_refused"),
    (DiskFull, "disk_full"),
    (RasterError, "raster_error"),
    (DeviceError, "device_error"),
    (Cancelled, "cancelled"),
)


def error_code(err: BaseException) -> str:
    """The machine code for ``err`` (engine errors get a code derived from their class)."""
    if isinstance(err, ApiError):
        return err.code
    for cls, code in _ENGINE_CODES:
        if isinstance(err, cls):
            return code
    # A DiffusionSatError subclass added later still gets a readable, stable code.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


def error_status(err: BaseException) -> int:
    """The HTTP status for ``err``: its ``http_status`` (an invalid request is 422, see engine.errors)."""
    status = int(getattr(err, "http_status", 400) or 400)
    return status if 400 <= status < 600 else 400


def error_body(detail: str, code: str) -> dict[str, Any]:
    return {"detail": detail, "code": code}
