"""What every route module shares: the API prefix, the token check, and reading a request body
(size and stall limits, JSON shape, the job request's validation off the event loop).

The app's state (``request.app.state``) holds the config, the job manager, the upload store and
the model cache that :func:`engine.server.app.create_app` made; routes read them from there.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from ...errors import DiffusionSatError, InvalidRequest
from ...tasks import REQUEST_MODELS
from ..errors import ApiError, TooLarge
from ..inputs import resolve_request
from ..security import check_bearer

API_PREFIX = "/v1"

#: How deep a job request's JSON may nest; a real one is 2 levels deep (a list in the object).
MAX_JSON_DEPTH = 16

#: Bodies up to this size are read and discarded before a 413, so that the client, still sending,
#: receives the answer instead of a broken pipe; larger ones are cut off at once.
DRAIN_LIMIT = 64 * 1024 * 1024

_bearer = HTTPBearer(auto_error=False, description="the engine's token (see its token file)")


async def _require_token(request: Request) -> None:
    check_bearer(request.headers.get("authorization"), request.app.state.config.token)


#: The dependencies of every endpoint but ``GET /v1/health``: ``_bearer`` only publishes the
#: scheme in the OpenAPI document; ``_require_token`` decides.
AUTH = [Depends(_bearer), Depends(_require_token)]


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def body_chunks(request: Request, idle_timeout_s: float):
    """``request.stream()``, but a client that stops sending the body for ``idle_timeout_s`` gets a
    408 instead of holding a connection (and a worker task) for ever (slow-loris on the body)."""
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


async def read_limited(request: Request, limit: int, idle_timeout_s: float = 30.0) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        if int(length) <= DRAIN_LIMIT:
            async for _ in body_chunks(request, idle_timeout_s):
                pass
        raise TooLarge(f"the request body is {int(length)} bytes, more than this endpoint's limit of {limit}")
    chunks, size = [], 0
    async for chunk in body_chunks(request, idle_timeout_s):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is more than this endpoint's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_json_shape(data: Any) -> None:
    """Refuse, with a 422, JSON that no request model could hold but that would trip the code
    behind validation: nesting past :data:`MAX_JSON_DEPTH` (recursion) and NUL characters (which
    no path, CRS or prompt can contain, and which the OS refuses in paths). Iterative: any depth."""
    stack = [(data, 1, "request")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request nests deeper than {MAX_JSON_DEPTH} levels at {short(where)}; "
                                 "a job request is a flat JSON object with a few lists")
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidRequest(f"{short(where)}: contains a NUL character, which no path or text "
                                     "field may contain")
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    raise InvalidRequest("a field name contains a NUL character")
                stack.append((item, depth + 1, key if where == "request" else f"{where}.{key}"))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}.{i}") for i, item in enumerate(value))


async def job_json(request: Request) -> Any:
    """The JSON body of a job request, its size and shape checked (not yet its fields)."""
    config = request.app.state.config
    body = await read_limited(request, config.max_json_bytes, config.body_timeout_s)
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRequest(f"the body is not valid JSON ({err}); send a JSON object") from None
    except RecursionError:
        raise InvalidRequest(f"the request nests deeper than {MAX_JSON_DEPTH} levels; a job request is "
                             "a flat JSON object with a few lists") from None
    check_json_shape(data)
    if isinstance(data, dict) and not isinstance(data.get("task", "generate"), str):
        raise InvalidRequest(f"task: must be a string, one of {', '.join(REQUEST_MODELS)}")
    return data


def resolve(state: Any, data: Any, *, check: bool = True) -> Any:
    """:func:`~engine.server.inputs.resolve_request` under the server's input policy; an OS refusal
    of a path becomes the request's 422. ``check``: run :func:`engine.tasks.check` too."""
    from ...geo.guard import run_confined

    config = state.config
    try:
        return run_confined(config.input_policy(), resolve_request, data, config, state.uploads, check=check)
    except OSError as err:
        raise path_refused(err) from None


def path_refused(err: OSError) -> Exception:
    """A path the OS refuses outright (too long, a loop of links, ...): the request's fault."""
    if isinstance(err, DiffusionSatError):
        return err
    name = short(str(err.filename)) if err.filename else "a path in the request"
    return InvalidRequest(f"{name}: cannot be used as a path on the engine's machine "
                          f"({err.strerror or err}); give a shorter, existing path or upload the file")


def check_steps(job_request: Any, config: Any) -> None:
    """The engine's limits checked after the run's own checks: steps, and the size of a generate
    request that leaves a side to the engine (engine.server.inputs.check_default_size)."""
    from ..inputs import check_default_size

    check_default_size(job_request, config)
    steps = getattr(job_request, "steps", None)
    if isinstance(steps, int) and steps > config.max_steps:
        raise InvalidRequest(f"steps: {steps} is more than this engine's limit of {config.max_steps} "
                             "steps per job (--max-steps); 20-50 steps are usual")


async def job_request(request: Request) -> Any:
    """The JSON body of a job request, validated (size, JSON, fields, paths, limits, and the run's
    own checks: :func:`engine.tasks.check`)."""
    data = await job_json(request)
    # Validation reads files (model configs, CRS database): keep it off the event loop.
    job = await run_in_threadpool(resolve, request.app.state, data)
    check_steps(job, request.app.state.config)
    return job
