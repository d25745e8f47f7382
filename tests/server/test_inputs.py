"""In-process parts of the server: upload refs, allowed roots, the token file, the job worker."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
from pydantic import BaseModel, ConfigDict

from engine.errors import Cancelled, InvalidRequest, RasterError
from engine.progress import Progress
from engine.server.config import ServerConfig
from engine.server.errors import (
    InputNotFound,
    PathNotAllowed,
    ServerConfigError,
    TooLarge,
    error_code,
    error_status,
)
from engine.server.inputs import UploadStore, resolve_request, resolve_upload_refs
from engine.server.jobs import JobManager
from engine.server.security import check_bearer, ensure_token_file

from .conftest import REPO


class FakeConditionalRequest(BaseModel):
    """A request model shaped like the coming conditional tasks: an input, a list, a mask."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str = "superres"
    input: str
    inputs: list[str] = []
    mask: Optional[str] = None
    prompt: str = "a satellite image"
    model: str = "auto"
    device: str = "auto"
    dtype: str = "auto"

    def input_paths(self) -> list[str]:
        return [self.input, *self.inputs, *([self.mask] if self.mask else [])]


def parse_fake(data: dict) -> FakeConditionalRequest:
    return FakeConditionalRequest.model_validate(data)


@pytest.fixture
def config(tmp_path) -> ServerConfig:
    return ServerConfig(token="t" * 32, workdir=tmp_path / "work", default_model="tiny")


@pytest.fixture
def uploads(config) -> UploadStore:
    return UploadStore(config.uploads_dir, config.max_upload_bytes)


def _tif(path: Path, count: int = 1) -> Path:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=count, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(10, 50, 0.01, 0.01)) as dst:
        dst.write(np.zeros((count, 8, 8), dtype="uint8"))
    return path


def _stored_upload(uploads: UploadStore, tmp_path: Path) -> str:
    upload_id, partial = uploads.new_partial()
    partial.write_bytes(_tif(tmp_path / "src.tif").read_bytes())
    info = uploads.finish(upload_id, partial)
    assert info.path.is_file() and not partial.exists()
    assert (info.width, info.height, info.count, info.crs) == (8, 8, 1, "EPSG:4326")
    return info.path_ref


def test_upload_refs_are_resolved_anywhere(uploads, tmp_path):
    ref = _stored_upload(uploads, tmp_path)
    stored = str(uploads.path(ref.split(":", 1)[1]))
    data = {"input": ref, "inputs": [ref, "/elsewhere/a.tif"], "nested": {"mask": ref}, "n": 3,
            "prompt": "upload: not a ref because of the space"}
    out = resolve_upload_refs(data, uploads)
    assert out == {"input": stored, "inputs": [stored, "/elsewhere/a.tif"], "nested": {"mask": stored}, "n": 3,
                   "prompt": "upload: not a ref because of the space"}


def test_unknown_or_malformed_upload_ref(uploads):
    with pytest.raises(InvalidRequest, match="upload the file again"):
        resolve_upload_refs({"input": "upload:" + "a" * 32}, uploads)
    with pytest.raises(InvalidRequest, match="not an upload reference"):
        resolve_upload_refs({"input": "upload:../../etc/passwd"}, uploads)


def test_not_a_geotiff_upload_is_refused_and_removed(uploads):
    upload_id, partial = uploads.new_partial()
    partial.write_bytes(b"not a tiff at all")
    with pytest.raises(RasterError, match="not a readable GeoTIFF"):
        uploads.finish(upload_id, partial)
    assert list(uploads.folder.iterdir()) == []


def test_an_upload_that_points_at_other_files_is_refused(uploads, tmp_path):
    """A VRT (XML naming other files) must not become an 'upload' that reads past the roots."""
    secret = _tif(tmp_path / "secret.tif")
    vrt = (f'<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
           f'<SimpleSource><SourceFilename>{secret}</SourceFilename><SourceBand>1</SourceBand>'
           f'</SimpleSource></VRTRasterBand></VRTDataset>')
    upload_id, partial = uploads.new_partial()
    partial.write_text(vrt)
    with pytest.raises(RasterError, match="not a readable GeoTIFF"):
        uploads.finish(upload_id, partial)
    assert list(uploads.folder.iterdir()) == []


def test_request_with_upload_refs_validates(config, uploads, tmp_path):
    ref = _stored_upload(uploads, tmp_path)
    request = resolve_request({"task": "superres", "input": ref, "inputs": [ref], "mask": ref},
                              config, uploads, parse=parse_fake)
    stored = str(uploads.path(ref.split(":", 1)[1]))
    assert request.input == request.mask == stored and request.inputs == [stored]
    assert request.model == "tiny"  # the server's --model fills what the request leaves out


def test_allowed_roots_confine_input_paths(tmp_path, uploads):
    inside = tmp_path / "data"
    inside.mkdir()
    good = _tif(inside / "a.tif")
    outside = _tif(tmp_path / "b.tif")
    config = ServerConfig(token="t" * 32, workdir=uploads.folder.parent, allowed_roots=(inside,))
    assert resolve_request({"input": str(good)}, config, uploads, parse=parse_fake).input == str(good)
    with pytest.raises(PathNotAllowed, match="outside the folders") as err:
        resolve_request({"input": str(good), "mask": str(outside)}, config, uploads, parse=parse_fake)
    assert error_status(err.value) == 403 and error_code(err.value) == "path_not_allowed"
    # '..' and symlinks are resolved before the check.
    with pytest.raises(PathNotAllowed):
        resolve_request({"input": str(inside / ".." / "b.tif")}, config, uploads, parse=parse_fake)
    link = inside / "link.tif"
    link.symlink_to(outside)
    with pytest.raises(PathNotAllowed):
        resolve_request({"input": str(link)}, config, uploads, parse=parse_fake)
    # Uploads are always readable, roots or not.
    ref = _stored_upload(uploads, tmp_path)
    assert resolve_request({"input": ref}, config, uploads, parse=parse_fake).input.endswith(".tif")


def test_allowed_roots_confine_model_folders(tmp_path, uploads):
    inside = tmp_path / "data"
    inside.mkdir()
    config = ServerConfig(token="t" * 32, workdir=uploads.folder.parent, allowed_roots=(inside,))
    with pytest.raises(PathNotAllowed, match="model folder"):
        resolve_request({"task": "generate", "bbox": [0, 0, 1, 1], "model": str(tmp_path)}, config, uploads)


def test_without_roots_any_readable_path(config, uploads, tmp_path):
    anywhere = _tif(tmp_path / "anywhere.tif")
    assert resolve_request({"input": str(anywhere)}, config, uploads, parse=parse_fake).input == str(anywhere)
    with pytest.raises(InputNotFound, match="does not exist"):
        resolve_request({"input": str(tmp_path / "missing.tif")}, config, uploads, parse=parse_fake)


def test_pixel_limit_from_config(tmp_path, uploads):
    config = ServerConfig(token="t" * 32, workdir=uploads.folder.parent, max_pixels=64 * 64)
    ok = {"task": "generate", "bbox": [0, 0, 1, 1], "width": 64, "height": 64}
    assert resolve_request(ok, config, uploads).width == 64
    with pytest.raises(TooLarge, match="--max-pixels"):
        resolve_request(dict(ok, width=128), config, uploads)


# ---- token file -------------------------------------------------------------------------------


def test_token_file_created_user_only(tmp_path):
    path = tmp_path / "cfg" / "diffusionsat" / "token"
    token = ensure_token_file(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_token_file(path) == token  # reused, not replaced


def test_group_or_world_readable_token_file_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("x" * 43 + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(ServerConfigError, match="chmod 600"):
        ensure_token_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(ServerConfigError, match="other users"):
        ensure_token_file(path)
    path.write_text("short")
    os.chmod(path, 0o600)
    with pytest.raises(ServerConfigError, match="usable token"):
        ensure_token_file(path)


def test_serve_refuses_world_readable_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("y" * 43 + "\n")
    os.chmod(path, 0o604)
    done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--token-file", str(path),
                           "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "chmod 600" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bearer_check():
    from engine.server.errors import Forbidden, Unauthorized

    check_bearer("Bearer " + "t" * 32, "t" * 32)
    check_bearer("bearer " + "t" * 32, "t" * 32)
    for header in (None, "", "Bearer", "Basic abc", "Bearer   "):
        with pytest.raises(Unauthorized):
            check_bearer(header, "t" * 32)
    with pytest.raises(Forbidden):
        check_bearer("Bearer " + "u" * 32, "t" * 32)


# ---- the job worker --------------------------------------------------------------------------


class _Req:
    task = "generate"


def _result(out):
    from engine.tasks import TaskResult

    Path(out).write_bytes(b"II*\x00")
    return TaskResult(path=Path(out), task="generate", seed=1, model="fake", width=8, height=8,
                      crs="EPSG:4326", bbox=(0, 0, 1, 1), metadata={}, warnings=["a warning"])


def _wait(manager, job_id, timeout=10):
    deadline = time.monotonic() + timeout
    while manager.snapshot(job_id)["finished"] is None:
        assert time.monotonic() < deadline, manager.snapshot(job_id)
        time.sleep(0.01)
    return manager.snapshot(job_id)


def test_a_job_that_raises_fails_and_the_worker_goes_on(tmp_path, caplog):
    calls = []

    def runner(request, out, *, models, progress, cancel):
        calls.append(out)
        if len(calls) == 1:
            raise RuntimeError("boom in the model")
        return _result(out)

    manager = JobManager(tmp_path / "jobs", runner=runner)
    manager.start()
    try:
        bad = manager.submit(_Req())
        good = manager.submit(_Req())
        failed = _wait(manager, bad.id)
        assert failed["state"] == "failed"
        assert failed["error"] == "internal error: RuntimeError: boom in the model"
        assert failed["error_code"] == "internal_error"
        assert "boom in the model" in caplog.text  # the traceback went to the log
        done = _wait(manager, good.id)
        assert done["state"] == "done" and done["warnings"] == ["a warning"]
        assert "path" not in done["result"]
    finally:
        manager.shutdown()


def test_progress_eta_and_cancel_in_process(tmp_path):
    started = threading.Event()

    def runner(request, out, *, models, progress, cancel):
        for step in range(1000):
            cancel.raise_if_cancelled()
            progress(Progress(step=step, total_steps=1000, message="denoising"))
            if step == 3:
                started.set()
            time.sleep(0.005)
        return _result(out)

    manager = JobManager(tmp_path / "jobs", runner=runner)
    manager.start()
    try:
        job = manager.submit(_Req())
        assert started.wait(5)
        snap = manager.snapshot(job.id)
        assert snap["state"] == "running" and 0 < snap["progress"] < 1 and snap["total_steps"] == 1000
        assert snap["eta_s"] is not None and snap["eta_s"] > 0
        assert manager.cancel(job.id)["state"] == "cancelled"
        stopped = _wait(manager, job.id)
        assert stopped["state"] == "cancelled" and stopped["step"] < 1000
        assert not (tmp_path / "jobs" / job.id).exists()
    finally:
        manager.shutdown()


def test_shutdown_cancels_running_and_queued(tmp_path):
    def runner(request, out, *, models, progress, cancel):
        while True:
            cancel.raise_if_cancelled()
            time.sleep(0.01)

    manager = JobManager(tmp_path / "jobs", runner=runner)
    manager.start()
    running = manager.submit(_Req())
    queued = manager.submit(_Req())
    while manager.snapshot(running.id)["state"] != "running":
        time.sleep(0.01)
    manager.shutdown(timeout=5)
    assert manager.snapshot(running.id)["state"] == "cancelled"
    assert manager.snapshot(queued.id)["state"] == "cancelled"
    assert manager.snapshot(queued.id)["started"] is None


def test_retention_sweep(tmp_path):
    manager = JobManager(tmp_path / "jobs", runner=lambda r, out, **kw: _result(out), retention_s=3600)
    manager.start()
    try:
        job = manager.submit(_Req())
        _wait(manager, job.id)
        orphan = tmp_path / "jobs" / "from-an-earlier-run"
        orphan.mkdir()
        assert manager.sweep() == 0 and manager.get(job.id).result_path.is_file()
        removed = manager.sweep(now=time.time() + 2 * 3600)
        assert removed == 2  # the expired job's folder and the orphan
        snap = manager.snapshot(job.id)
        assert snap["expired"] is True and snap["result"]["result_url"] is None
        assert not (tmp_path / "jobs" / job.id).exists()
    finally:
        manager.shutdown()


def test_upload_sweep(uploads, tmp_path):
    _stored_upload(uploads, tmp_path)
    assert uploads.sweep(3600) == 0
    assert uploads.sweep(3600, now=time.time() + 7200) == 1
    assert list(uploads.folder.iterdir()) == []


def test_cancelled_exception_is_not_a_failure(tmp_path):
    def runner(request, out, *, models, progress, cancel):
        raise Cancelled("cancelled by the user; nothing was written")

    manager = JobManager(tmp_path / "jobs", runner=runner)
    manager.start()
    try:
        job = manager.submit(_Req())
        assert _wait(manager, job.id)["state"] == "cancelled"
    finally:
        manager.shutdown()


def test_real_conditional_requests_are_confined_and_limited(tmp_path, uploads):
    inside = tmp_path / "data"
    inside.mkdir()
    good = _tif(inside / "a.tif", count=3)  # an RGB image: the task's own checks run before 202 too
    outside = _tif(tmp_path / "b.tif")
    config = ServerConfig(token="t" * 32, workdir=uploads.folder.parent, allowed_roots=(inside,), max_pixels=1000)
    request = resolve_request({"task": "inpaint", "input": str(good)}, config, uploads)
    assert request.max_pixels == 1000  # the engine's --max-pixels reaches the task's own check
    with pytest.raises(PathNotAllowed):
        resolve_request({"task": "inpaint", "input": str(good), "references": [str(outside)]}, config, uploads)
    with pytest.raises(PathNotAllowed):
        resolve_request({"task": "temporal", "inputs": [str(outside)], "date": "2021-06-15"}, config, uploads)
    with pytest.raises(InvalidRequest, match="1980"):
        resolve_request({"task": "temporal", "inputs": [str(good)], "date": "1950-06-15"}, config, uploads)
    ref = _stored_upload(uploads, tmp_path)
    with pytest.raises(InvalidRequest, match="band") as refused:  # a 1-band upload is no Sentinel-2 product
        resolve_request({"task": "superres", "input": ref}, config, uploads)
    assert str(uploads.folder) in str(refused.value)  # the upload ref was resolved to the stored file


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with proto 0 each
    keep-alive response waited ~40 ms for a delayed ACK."""
    import socket

    from engine.server.run import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_port_in_use_is_a_clear_error():
    from engine.server.run import bind_socket

    first = bind_socket("127.0.0.1", 0)
    first.listen()
    try:
        with pytest.raises(ServerConfigError, match="--port"):
            bind_socket("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()
