"""``POST /v1/uploads``: a GeoTIFF sent as the body, stored for use as a job input."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...atomic import is_disk_full
from ...errors import DiskFull, InvalidRequest
from ..errors import TooLarge, UnsupportedMediaType
from ..schemas import ERROR_RESPONSES, UploadOut
from .common import API_PREFIX, AUTH, body_chunks, short

log = logging.getLogger("engine.server")

router = APIRouter(prefix=API_PREFIX)

_UPLOAD_TYPES = ("image/tiff", "image/geotiff", "application/octet-stream")


@router.post("/uploads", response_model=UploadOut, status_code=201, dependencies=AUTH,
             responses=ERROR_RESPONSES, tags=["inputs"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "image/tiff": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(request: Request) -> dict[str, Any]:
    """Store a GeoTIFF (the raw bytes as the body) for use as a job input.

    Answers with ``path_ref`` (``upload:<id>``) to put into a job request's path fields.
    Uploads are deleted after the retention time.
    """
    config, uploads = request.app.state.config, request.app.state.uploads
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in _UPLOAD_TYPES:
        raise UnsupportedMediaType(
            f"upload the raw GeoTIFF bytes with Content-Type image/tiff (got {short(ctype) or 'none'})"
        )
    limit = config.max_upload_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the upload is {int(length) / 2**20:.1f} MiB, more than this engine's limit "
                       f"of {limit / 2**20:.0f} MiB (--max-upload-mb); upload a smaller window")
    # The bytes go to a temporary file that UploadStore.finish validates and renames into place
    # (engine.atomic.publish_file); on any failure it is removed here.
    upload_id, partial = uploads.new_partial()
    size = 0
    try:
        with open(partial, "wb") as fh:
            async for chunk in body_chunks(request, config.body_timeout_s):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the upload is more than this engine's limit of {limit / 2**20:.0f} "
                                   "MiB (--max-upload-mb); upload a smaller window")
                fh.write(chunk)
        if size == 0:
            raise InvalidRequest("the upload is empty; send the GeoTIFF's bytes as the request body")
    except OSError as err:
        partial.unlink(missing_ok=True)
        if is_disk_full(err):
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
