"""One table maps error types to HTTP statuses and codes (engine/server/errors.py); the engine's
error classes know nothing of HTTP."""

from __future__ import annotations

import inspect

import pytest

import engine.errors as engine_errors
from engine.server import errors as server_errors
from engine.server.errors import ERROR_TABLE, ApiError, error_code, error_status


def test_engine_errors_know_nothing_of_http():
    for _, cls in inspect.getmembers(engine_errors, inspect.isclass):
        if issubclass(cls, Exception):
            assert not hasattr(cls, "http_status"), cls
            assert not hasattr(cls, "status") and not hasattr(cls, "code"), cls


@pytest.mark.parametrize("cls, status, code", [
    (engine_errors.InvalidMetadata, 422, "invalid_metadata"),
    (engine_errors.InvalidRequest, 422, "invalid_request"),
    (engine_errors.ModelNotFound, 404, "model_not_found"),
    (engine_errors.ModelLoadError, 422, "model_load_error"),
    (engine_errors.RasterError, 422, "raster_error"),
    (engine_errors.DiskFull, 507, "disk_full"),
    (engine_errors.InputRefused, 403, "input_refused"),
    (engine_errors.DeviceError, 400, "device_error"),
    (engine_errors.Cancelled, 409, "cancelled"),
    (server_errors.Forbidden, 403, "forbidden"),
    (server_errors.PathNotAllowed, 403, "path_not_allowed"),
    (server_errors.InputNotFound, 422, "input_not_found"),
    (server_errors.NotFound, 404, "not_found"),
    (server_errors.NotReady, 409, "not_ready"),
    (server_errors.Gone, 410, "gone"),
    (server_errors.TooLarge, 413, "too_large"),
    (server_errors.UnsupportedMediaType, 415, "unsupported_media_type"),
    (server_errors.ServerConfigError, 400, "server_config_error"),
])
def test_each_error_has_its_status_and_code(cls, status, code):
    err = cls("message")
    assert (error_status(err), error_code(err)) == (status, code)


def test_the_errors_with_their_own_arguments():
    assert (error_status(server_errors.Unauthorized("no token")), error_code(server_errors.Unauthorized("x"))) \
        == (401, "unauthorized")
    full = server_errors.QueueFull("full", retry_after=7)
    assert (error_status(full), error_code(full), full.headers) == (429, "queue_full", {"Retry-After": "7"})
    own = ApiError("stalled", status=408, code="request_timeout")
    assert (error_status(own), error_code(own)) == (408, "request_timeout")
    assert (error_status(ApiError("plain")), error_code(ApiError("plain"))) == (400, "bad_request")


def test_every_listed_class_comes_before_its_base_classes():
    """The first match wins: a class listed after one of its bases could never be reached."""
    classes = [cls for cls, _, _ in ERROR_TABLE]
    for i, cls in enumerate(classes):
        for base in classes[:i]:
            assert not issubclass(cls, base), f"{cls.__name__} is shadowed by {base.__name__}"
