"""From a JSON body to a validated, runnable request: upload refs, allowed roots, early checks.

Everything a client can get wrong is found here, while the HTTP request is still open, so it is
answered with a 4xx and a message instead of becoming a failed job later:

* ``"upload:<id>"`` strings anywhere in the request are replaced by the stored upload's path
  *before* validation, so any request model with path fields (``input``, ``inputs``, ``mask``,
  ...) accepts uploads without server changes;
* paths the request reads (``request.input_paths()`` and model folders) must lie under the
  ``--allowed-root`` folders when any are configured;
* the CRS, bbox, date, device and model are checked as the task itself would;
* the output pixel count is held to ``--max-pixels``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..atomic import publish_file
from ..errors import InvalidRequest, ModelNotFound, RasterError
from ..geo.guard import inspect_input
from .config import ServerConfig
from .errors import InputNotFound, PathNotAllowed, TooLarge

UPLOAD_PREFIX = "upload:"
_UPLOAD_REF = re.compile(r"^upload:(\S+)$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
#: Request fields naming model folders (read by the server, so confined like inputs).
MODEL_PATH_FIELDS = ("model", "unet", "base", "controlnet")
#: ``model`` values that are names, not folders.
_MODEL_NAMES = ("auto", "tiny")


@dataclass(frozen=True)
class UploadInfo:
    """A stored upload: its id, file, and what rasterio saw in it."""

    upload_id: str
    path: Path
    width: int
    height: int
    count: int
    crs: Optional[str]
    dtype: str
    bounds: tuple[float, float, float, float]
    size_bytes: int

    @property
    def path_ref(self) -> str:
        return f"{UPLOAD_PREFIX}{self.upload_id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "upload_id": self.upload_id,
            "path_ref": self.path_ref,
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "crs": self.crs,
            "dtype": self.dtype,
            "bounds": list(self.bounds),
            "size_bytes": self.size_bytes,
        }


class UploadStore:
    """Uploaded GeoTIFFs in ``<workdir>/uploads/<id>.tif``; the file system is the index.

    Keeping no in-memory index means uploads survive a server restart until the retention sweep
    removes them, and several requests can reference one upload.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def new_partial(self) -> tuple[str, Path]:
        """A fresh id and the temporary path its bytes are streamed to."""
        upload_id = secrets.token_hex(16)
        return upload_id, self.folder / f"{upload_id}.partial"

    def finish(self, upload_id: str, partial: Path) -> UploadInfo:
        """Validate a fully received upload with rasterio and move it into place.

        Raises :class:`RasterError` (and deletes the bytes) when it is not a readable GeoTIFF.
        """
        import rasterio
        from rasterio.errors import RasterioError

        final = self.folder / f"{upload_id}.tif"
        try:
            # Only the GTiff driver may parse the bytes: a VRT or similar would let an upload
            # point at other files on the server, past the allowed roots.
            with rasterio.open(partial, driver="GTiff") as src:
                if src.driver != "GTiff":
                    raise RasterError(
                        f"the upload is a {src.driver} raster, not a GeoTIFF; export the layer as "
                        "GeoTIFF (Content-Type image/tiff) and upload that"
                    )
                info = UploadInfo(
                    upload_id=upload_id,
                    path=final,
                    width=src.width,
                    height=src.height,
                    count=src.count,
                    crs=src.crs.to_string() if src.crs else None,
                    dtype=str(src.dtypes[0]) if src.count else "",
                    bounds=tuple(float(v) for v in src.bounds),
                    size_bytes=partial.stat().st_size,
                )
        except RasterError:
            partial.unlink(missing_ok=True)
            raise
        except (RasterioError, OSError, ValueError) as err:
            partial.unlink(missing_ok=True)
            first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise RasterError(
                f"the upload is not a readable GeoTIFF ({first}); send the raw bytes of a .tif file "
                "with Content-Type image/tiff"
            ) from None
        publish_file(partial, final, what="the upload")
        return info

    def path(self, upload_id: str) -> Path:
        """The stored file of ``upload_id``; :class:`InvalidRequest` if there is none."""
        if not _UPLOAD_ID.match(upload_id):
            raise InvalidRequest(
                f"{UPLOAD_PREFIX}{upload_id} is not an upload reference; use the path_ref that "
                "POST /v1/uploads returned (upload:<32 hex digits>)"
            )
        path = self.folder / f"{upload_id}.tif"
        if not path.is_file():
            raise InvalidRequest(
                f"upload {UPLOAD_PREFIX}{upload_id} does not exist on this engine (uploads are "
                "deleted after the retention time, and by a restart with another workdir); upload "
                "the file again"
            )
        return path

    def sweep(self, max_age_s: float, now: Optional[float] = None) -> int:
        """Delete uploads (and abandoned partial ones) older than ``max_age_s``; return how many."""
        now = time.time() if now is None else now
        removed = 0
        for entry in list(self.folder.iterdir()) if self.folder.is_dir() else []:
            try:
                if now - entry.stat().st_mtime > max_age_s:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed += 1
            except OSError:
                continue  # deleted meanwhile by another sweep or server
        return removed


def resolve_upload_refs(value: Any, uploads: UploadStore) -> Any:
    """``value`` with every ``"upload:<id>"`` string (in dicts and lists, at any depth) replaced by
    the stored file's path. Other values are returned unchanged."""
    if isinstance(value, str):
        m = _UPLOAD_REF.match(value)
        return str(uploads.path(m.group(1))) if m else value
    if isinstance(value, dict):
        return {k: resolve_upload_refs(v, uploads) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_upload_refs(v, uploads) for v in value]
    return value


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def confine_path(path: str | os.PathLike, config: ServerConfig, *, what: str = "input") -> Path:
    """Resolve ``path`` and check it is readable by this server under its rules.

    Uploads are always allowed. With ``--allowed-root`` folders configured, any other path must
    resolve (symlinks followed) inside one of them, else :class:`PathNotAllowed` (403).
    """
    resolved = Path(path).expanduser().resolve()
    if _within(resolved, [config.uploads_dir]):
        return resolved
    if config.allowed_roots and not _within(resolved, config.allowed_roots):
        roots = ", ".join(str(r) for r in config.allowed_roots)
        raise PathNotAllowed(
            f"the {what} path {str(path)!r} is outside the folders this engine may read ({roots}); "
            "move the file there, upload it with POST /v1/uploads, or start the engine with "
            "--allowed-root for its folder"
        )
    return resolved


def output_pixels(request: Any) -> Optional[int]:
    """Pixels the request makes the engine produce when it states its size, else None: the
    output's, times the samples of ``spread`` (each is a whole image denoised and decoded)."""
    if getattr(request, "gsd", None) is not None:  # generate --gsd: the bbox's grid at that GSD
        from ..errors import DiffusionSatError
        from ..tasks.extent import extent_grid

        try:
            _, width, height = extent_grid(request.bbox, request.crs, request.gsd)
        except DiffusionSatError:  # a bad bbox or CRS: the task's check refuses it with its own message
            return None
        return width * height * int(getattr(request, "spread", None) or 1)
    size = getattr(request, "size", None)
    width = getattr(request, "width", None) or size
    height = getattr(request, "height", None) or size
    if width and height:
        return int(width) * int(height) * int(getattr(request, "spread", None) or 1)
    return None


def _check_model_paths(request: Any, config: ServerConfig) -> None:
    from ..models.registry import describe_folder, models_dirs

    roots_for_models = list(config.allowed_roots) + [p.expanduser().resolve() for p in models_dirs()]
    for field in MODEL_PATH_FIELDS:
        spec = getattr(request, field, None)
        if isinstance(spec, str) and spec.startswith("hf:") and not config.allow_hf and spec != config.default_model:
            raise PathNotAllowed(
                f"the {field} {spec!r} would be downloaded from the Hugging Face hub, which this engine "
                "does not do for requests; install the model into the engine's models folder, or start "
                "the engine with --allow-hf"
            )
        if not isinstance(spec, str) or not spec or spec in _MODEL_NAMES or spec.startswith("hf:"):
            continue
        path = Path(spec).expanduser()
        if config.allowed_roots:
            resolved = path.resolve()
            if not _within(resolved, roots_for_models):
                raise PathNotAllowed(
                    f"the {field} folder {spec!r} is outside the folders this engine may read; "
                    "install the model into the engine's models folder or start the engine with "
                    "--allowed-root for it"
                )
        if not path.exists():
            raise ModelNotFound(
                f"{field} folder {spec!r} does not exist on the engine's machine; use 'tiny', "
                "'auto' or a folder listed by GET /v1/models"
            )
        if not path.is_dir():
            raise ModelNotFound(f"{field} {spec!r} is a file; give the model's folder")
        if field == "model" and not getattr(request, "unet", None) and describe_folder(path) is None:
            # Cheap (reads config files only) and catches "not a model folder" before queueing.
            raise ModelNotFound(
                f"{spec!r} is not a DiffusionSat model folder: no UNet (config.json, unet/ or "
                "checkpoint-N/unet/) and no ControlNet (controlnet/) inside; use a folder listed by "
                "GET /v1/models"
            )


def check_default_size(request: Any, config: ServerConfig) -> None:
    """A generate request that leaves a side to the engine (no width+height, no gsd): the size
    the run will use (the other side from the bbox's shape, ``size`` defaulting to the model's
    native px, which ``resolution`` sets), against ``--max-pixels``. Without it ``resolution``
    alone (or ``width`` alone) asked for any size past the limit. Called with the step limit, after
    the run's own checks (the model paths are confined, its config is read here), so that submit
    and plan refuse alike and in the same order."""
    resolution = getattr(request, "resolution", None)
    if resolution and resolution * resolution > config.max_pixels:  # any task: one tile is resolution^2 px
        raise TooLarge(f"a {resolution} px tile ({resolution * resolution} pixels, --resolution) is more than this "
                       f"engine's limit of {config.max_pixels} (--max-pixels); leave resolution out (the model's "
                       "own size) or give a smaller one")
    if getattr(request, "task", None) != "generate" or getattr(request, "gsd", None) is not None:
        return
    if getattr(request, "width", None) and getattr(request, "height", None):
        return  # output_pixels checked it
    from ..errors import DiffusionSatError
    from ..metadata import output_size
    from ..models.registry import plan_resolution

    try:
        default = plan_resolution(request)
        width, height = output_size(request.bbox, request.crs, request.size, request.width, request.height, default)
    except DiffusionSatError:  # a bad bbox, CRS or model: the task's check refuses it with its own message
        return
    pixels = width * height * int(getattr(request, "spread", None) or 1)
    if pixels > config.max_pixels:
        raise TooLarge(
            f"the output would be {width}x{height} px"
            + (f" x {request.spread} spread samples" if getattr(request, "spread", None) else "")
            + f" ({pixels} pixels), more than this engine's limit of {config.max_pixels} (--max-pixels); "
            "request a smaller size (or width/height) or resolution, or fewer spread samples"
        )


def precheck(request: Any, config: ServerConfig) -> None:
    """The engine's own limits (pixels, the folders it may read), before the task's checks."""
    pixels = output_pixels(request)
    if pixels is not None and pixels > config.max_pixels:
        raise TooLarge(
            f"the output would have {pixels} pixels (width x height x spread samples), more than "
            f"this engine's limit of {config.max_pixels} (--max-pixels); request a smaller "
            "width/height, fewer spread samples or a coarser resolution"
        )
    _check_model_paths(request, config)
    # The rest (place, dates, device, model folders, inputs) is engine.tasks.check, called by
    # resolve_request: the same checks as the run, --dry-run and POST /v1/plan.


def resolve_request(
    data: Any,
    config: ServerConfig,
    uploads: UploadStore,
    parse: Optional[Callable[[dict], Any]] = None,
    *,
    check: bool = True,
) -> Any:
    """Turn a job's JSON body into a validated request model the worker can run.

    ``parse`` is :func:`engine.tasks.parse_request` unless given (tests pass their own request
    models). The server's ``--model``/``--device``/``--dtype`` fill fields the body leaves out.
    ``check``: run :func:`engine.tasks.check` at the end (``POST /v1/plan`` leaves it to
    :func:`engine.tasks.plan`, which runs it, so that it runs once).
    """
    engine_models = parse is None
    if parse is None:
        from ..tasks import parse_request as parse
    if not isinstance(data, dict):
        raise InvalidRequest("a job request is a JSON object with a 'task' field, e.g. "
                             '{"task": "generate", "bbox": [...], "crs": "EPSG:4326"}')
    data = dict(data)
    for key, default in (("model", config.default_model), ("device", config.device), ("dtype", config.dtype)):
        if data.get(key) is None:
            data[key] = default
    data = resolve_upload_refs(data, uploads)
    request = parse(data)
    policy = config.input_policy()
    for path in request.input_paths():
        resolved = confine_path(path, config)
        if not resolved.exists():  # a file, or a folder such as a Sentinel-2 .SAFE product
            raise InputNotFound(f"input {str(path)!r} does not exist on the engine's machine; "
                              "upload it with POST /v1/uploads or give a path the engine can read")
        # What the file *is* (a VRT, links out of a folder, sidecars): checked before any pixel is read.
        inspect_input(path, policy)
    precheck(request, config)
    limit = getattr(request, "max_pixels", None)
    if "max_pixels" in getattr(type(request), "model_fields", {}) and (limit is None or limit > config.max_pixels):
        # Tasks whose output size follows from their inputs check it themselves once they have
        # read them: hand them the engine's limit.
        request = request.model_copy(update={"max_pixels": config.max_pixels})
    if engine_models and check:
        from ..tasks import check as run_checks

        run_checks(request)  # the run's own checks before its first model call, so that it fails now, with a 4xx
    return request
