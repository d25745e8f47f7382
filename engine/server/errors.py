"""The server's errors, the one table of their HTTP statuses and codes, and their one JSON shape:
``{"detail": <message>, "code": <machine code>}``.

Engine errors (:mod:`engine.errors`) know nothing of HTTP; this module adds the HTTP-only situations
(no token, unknown job, result not ready, body too large) and :data:`ERROR_TABLE` maps every error
type, the engine's and these, to its status and to a stable machine ``code`` that the QGIS plugin
can branch on while showing ``detail`` to the user.
"""

from __future__ import annotations

import re
from typing import Any, Optional

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
    RasterError,
)


class ApiError(DiffusionSatError):
    """An HTTP error with a message a person can act on; its status and code come from
    :data:`ERROR_TABLE` unless this one error names its own (``status=``, ``code=``)."""

    def __init__(self, detail: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.headers = headers or {}


class Unauthorized(ApiError):
    """No (or a malformed) ``Authorization: Bearer`` header."""

    def __init__(self, detail: str) -> None:
        # RFC 6750: a 401 names the scheme the client should use.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="diffusionsat"'})


class Forbidden(ApiError):
    """A token was given but it is not this server's."""


class PathNotAllowed(ApiError):
    """An input path lies outside the server's ``--allowed-root`` folders."""


class InputNotFound(ApiError):
    """An input path of the request does not exist on the engine's machine."""


class NotFound(ApiError):
    """No such job (or endpoint)."""


class NotReady(ApiError):
    """The job has no result yet (queued or running)."""


class Gone(ApiError):
    """The job failed, was cancelled, or its result passed the retention time."""


class TooLarge(ApiError):
    """A body over the size limit, or an output over the pixel-count limit."""


class QueueFull(ApiError):
    """The job queue holds ``--max-queue`` jobs already: try again after ``Retry-After`` seconds."""

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(int(retry_after))})


class UnsupportedMediaType(ApiError):
    """An upload that is not the raw bytes of a GeoTIFF."""


class ServerConfigError(DiffusionSatError):
    """The server cannot start as configured (token file, port, workdir, device)."""


#: The one table: error type -> (HTTP status, machine code). The first class the error is an
#: instance of wins, so the most specific come first (InvalidMetadata is an InvalidRequest, DiskFull
#: a RasterError). An engine error not listed is a 400 with a code made from its class name.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    # the engine's errors
    (InvalidMetadata, 422, "invalid_metadata"),
    (InvalidRequest, 422, "invalid_request"),
    (ModelNotFound, 404, "model_not_found"),
    (ModelLoadError, 422, "model_load_error"),
    (InputRefused, 403, "input_refused"),
    (DiskFull, 507, "disk_full"),
    (RasterError, 422, "raster_error"),
    (DeviceError, 400, "device_error"),
    (Cancelled, 409, "cancelled"),
    # the server's own
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (PathNotAllowed, 403, "path_not_allowed"),
    (InputNotFound, 422, "input_not_found"),
    (NotFound, 404, "not_found"),
    (NotReady, 409, "not_ready"),
    (Gone, 410, "gone"),
    (TooLarge, 413, "too_large"),
    (QueueFull, 429, "queue_full"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (ApiError, 400, "bad_request"),
)


def _entry(err: BaseException) -> Optional[tuple[int, str]]:
    for cls, status, code in ERROR_TABLE:
        if isinstance(err, cls):
            return status, code
    return None


def error_code(err: BaseException) -> str:
    """The machine code for ``err``: its own (an :class:`ApiError` given ``code=``), else the table's."""
    own = getattr(err, "code", None) if isinstance(err, ApiError) else None
    if own:
        return own
    entry = _entry(err)
    if entry is not None:
        return entry[1]
    # A DiffusionSatError subclass added later still gets a readable, stable code.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


def error_status(err: BaseException) -> int:
    """The HTTP status for ``err``: its own (an :class:`ApiError` given ``status=``), else the table's
    (an invalid request is 422); 400 for an engine error the table does not list."""
    own = getattr(err, "status", None) if isinstance(err, ApiError) else None
    status = int(own) if own else (_entry(err) or (400, ""))[0]
    return status if 400 <= status < 600 else 400


def error_body(detail: str, code: str) -> dict[str, Any]:
    return {"detail": detail, "code": code}
