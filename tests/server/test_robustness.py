"""The server under faults and abuse: models kept loaded, no job left running, no 5xx, bounded load.

Most tests use the session's real server (subprocess, tiny model, 128 x 128 px limit). Those that
need other limits or a fault inside the server's process run the real app with uvicorn on a
loopback port in this process (``inproc``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from .conftest import call, generate_request, wait_for
from .test_api import assert_error


def _idle(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = call(server, "GET", "/v1/health", token=None).json
        if not health["running"] and health["queue"] == 0:
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


# ---- the model cache ----------------------------------------------------------------------


def test_second_job_on_the_same_model_reuses_it(server):
    _idle(server)
    first = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    assert wait_for(server, first, timeout=120)["state"] == "done"
    after_first = call(server, "GET", "/v1/health", token=None).json
    second = call(server, "POST", "/v1/jobs", json_body=generate_request(seed=2)).json["id"]
    assert wait_for(server, second, timeout=120)["state"] == "done"
    after_second = call(server, "GET", "/v1/health", token=None).json
    # Before the fix every job built a private cache: models_loaded stayed 0 for ever.
    assert after_first["models_loaded"] == after_second["models_loaded"] == 1
    assert after_second["model_loads"] == after_first["model_loads"] >= 1


def test_an_empty_cache_is_still_the_cache_it_is():
    from engine.models.cache import ModelCache

    cache = ModelCache()
    assert len(cache) == 0 and bool(cache)  # `models or ModelCache()` must not replace it


# ---- jobs always end ----------------------------------------------------------------------


def test_job_folder_that_cannot_be_created_fails_that_job_only(server, engine_client):
    _idle(server)
    jobs = server.workdir / "jobs"
    away = server.workdir / "jobs.away"
    jobs.rename(away)
    jobs.write_text("a file where the jobs folder should be")
    try:
        client = engine_client.EngineClient(server.url, server.token)
        job_id = client.submit(generate_request())
        with pytest.raises(engine_client.EngineError) as failed:
            client.wait(job_id, poll=0.05, timeout=60)  # before the fix: "running" for ever
        assert failed.value.code == "raster_error", failed.value
        assert "job's folder" in str(failed.value)
        job = call(server, "GET", f"/v1/jobs/{job_id}").json
        assert job["state"] == "failed" and job["finished"] is not None
    finally:
        jobs.unlink()
        away.rename(jobs)
    later = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    assert wait_for(server, later, timeout=120)["state"] == "done"


def _manager(tmp_path, runner, **kwargs):
    from engine.server.jobs import JobManager

    manager = JobManager(tmp_path / "jobs", runner=runner, **kwargs)
    manager.start()
    return manager


def _wait_finished(manager, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while manager.get(job_id).finished is None:
        assert time.monotonic() < deadline, manager.snapshot(job_id)
        time.sleep(0.01)
    return manager.snapshot(job_id)


def test_a_runner_that_raises_base_exceptions_fails_only_its_job(tmp_path):
    """SystemExit/KeyboardInterrupt from deep inside a library used to escape the job's handling
    and leave it "running" with the worker moving on; now the job ends, and later ones run."""
    started = threading.Event()

    def runner(request, out, *, models, progress, cancel):
        if request == "exit":
            raise SystemExit(3)
        if request == "interrupt-after-cancel":
            started.set()
            while not cancel.cancelled:
                time.sleep(0.01)
            raise KeyboardInterrupt
        Path(out).write_bytes(b"ok")
        return type("R", (), {"path": out, "as_dict": lambda self: {}})()

    manager = _manager(tmp_path, runner)
    try:
        exited = manager.submit("exit")
        job = _wait_finished(manager, exited.id)
        assert job["state"] == "failed" and job["error_code"] == "internal_error"
        cancelled = manager.submit("interrupt-after-cancel")
        assert started.wait(10)
        manager.cancel(cancelled.id)
        job = _wait_finished(manager, cancelled.id)
        assert job["state"] == "cancelled" and job["finished"] is not None
        fine = manager.submit("fine")
        assert _wait_finished(manager, fine.id)["state"] == "done"
    finally:
        manager.shutdown()


def test_time_limit_per_job_fails_the_job_and_frees_the_worker(tmp_path):
    from engine.models.cache import ModelCache
    from engine.tasks import parse_request

    request = parse_request({**generate_request(width=64, height=64, steps=999), "model": "tiny"})
    manager = _manager(tmp_path, None, models=ModelCache(), max_job_seconds=0.5)
    try:
        job = manager.submit(request)
        done = _wait_finished(manager, job.id, timeout=120)
        assert done["state"] == "failed" and done["error_code"] == "time_limit", done
        assert "--max-job-seconds" in done["error"]
        assert not (tmp_path / "jobs" / job.id).exists()
        assert manager.running_id() is None
    finally:
        manager.shutdown()


# ---- no 5xx -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", [[], {}, 1, None, True, ["generate"]], ids=repr)
def test_a_task_that_is_not_a_string_is_422(server, task):
    body = assert_error(call(server, "POST", "/v1/jobs", json_body={**generate_request(), "task": task}),
                        422, "invalid_request")
    assert "task" in body["detail"]


@pytest.mark.parametrize("endpoint", ["/v1/jobs", "/v1/plan"])
@pytest.mark.parametrize("field,value", [
    ("input", "/tmp/a\x00b.tif"),
    ("input", "/" + "x" * 2000 + ".tif"),
    ("input", "/tmp/" + "/".join(["d" * 250] * 8) + "/in.tif"),
    ("model", "/" + "m" * 2000),
    ("model", "/tmp/m\x00"),
    ("prompt", "a\x00b"),
], ids=["nul-input", "2000-char-input", "long-nested-input", "2000-char-model", "nul-model", "nul-prompt"])
def test_nul_bytes_and_overlong_paths_are_422(server, endpoint, field, value):
    request = {"task": "superres", "input": "/tmp/x.tif", "steps": 2} if field == "input" else generate_request()
    request[field] = value
    reply = call(server, "POST", endpoint, json_body=request)
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    assert set(reply.json) == {"detail", "code"}


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_deeply_nested_json_is_422(server, depth):
    body = b'{"task": "generate", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    reply = call(server, "POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"})
    assert_error(reply, 422, "invalid_request")
    assert "nests deeper" in reply.json["detail"]


# ---- limits: spread, steps, queue ---------------------------------------------------------


def test_pixel_limit_counts_spread_samples(server):
    # 64 x 64 = 4096 px fits the 128 x 128 limit; 8 samples of it (32768 px) do not.
    body = assert_error(call(server, "POST", "/v1/jobs", json_body=generate_request(spread=8)), 413, "too_large")
    assert "spread" in body["detail"]
    reply = call(server, "POST", "/v1/plan", json_body=generate_request(spread=4))
    assert reply.status == 200, reply.body


def test_steps_over_the_engine_limit_are_422(server):
    body = assert_error(call(server, "POST", "/v1/jobs", json_body=generate_request(steps=201)), 422,
                        "invalid_request")
    assert "--max-steps" in body["detail"]


def test_conditional_pixel_limit_is_refused_before_202_with_a_readable_limit(server, tmp_path):
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    path = tmp_path / "big.tif"
    with rasterio.open(path, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32618", transform=from_bounds(583000, 4507000, 585560, 4509560, 256, 256)) as dst:
        data = np.full((3, 256, 256), 100, dtype="uint8")
        data[:, 100:120, 100:120] = 0
        dst.write(data)
    ref = call(server, "POST", "/v1/uploads", data=path.read_bytes(),
               headers={"Content-Type": "image/tiff"}).json["path_ref"]
    before = len(call(server, "GET", "/v1/jobs").json["jobs"])
    reply = call(server, "POST", "/v1/jobs", json_body={"task": "inpaint", "input": ref, "steps": 2})
    assert 400 <= reply.status < 500, reply.body  # before: 202, then a failed job
    assert "0 Mpx" not in reply.json["detail"] and "16384 px" in reply.json["detail"], reply.json
    assert len(call(server, "GET", "/v1/jobs").json["jobs"]) == before


def _rgb(path: Path, bounds=(583000, 4507000, 583640, 4507640)) -> str:
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32618", transform=from_bounds(*bounds, 64, 64)) as dst:
        dst.write(np.full((3, 64, 64), 100, dtype="uint8"))
    return str(path)


def test_requests_the_run_would_refuse_are_4xx_before_202(server, tmp_path):
    """POST /v1/jobs runs engine.tasks.plan (the run's own checks) before answering 202."""
    a, b = _rgb(tmp_path / "a.tif"), _rgb(tmp_path / "b.tif")
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    refused = {
        "date count": {"task": "temporal", "inputs": [a, b], "input_dates": ["2021-01-01"], "date": "2021-06-01"},
        "unreadable raster": {"task": "inpaint", "input": str(junk)},
        "not Sentinel-2": {"task": "superres", "input": a},
    }
    before = len(call(server, "GET", "/v1/jobs").json["jobs"])
    for what, body in refused.items():
        reply = call(server, "POST", "/v1/jobs", json_body={**body, "steps": 2})
        assert 400 <= reply.status < 500, (what, reply.status, reply.body[:300])  # before: 202, then failed
        assert set(reply.json) == {"detail", "code"}
        planned = call(server, "POST", "/v1/plan", json_body={**body, "steps": 2})
        assert planned.status == reply.status and planned.json == reply.json, what
    assert len(call(server, "GET", "/v1/jobs").json["jobs"]) == before


# ---- an engine in this process, for other limits and for faults -----------------------------


class InProcess:
    def __init__(self, tmp_path: Path, **overrides):
        import uvicorn

        from engine.server.app import create_app
        from engine.server.config import ServerConfig
        from engine.server.run import bind_socket, uvicorn_limits

        self.config = ServerConfig(token="t" * 32, workdir=tmp_path / "work", default_model="tiny",
                                   device="cpu", max_pixels=128 * 128, **overrides)
        self.app = create_app(self.config)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = self.config.token
        uv = uvicorn.Config(self.app, log_config=None, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2, **uvicorn_limits(self.config))
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture
def inproc(tmp_path):
    servers = []

    def start(**overrides) -> InProcess:
        srv = InProcess(tmp_path / f"s{len(servers)}", **overrides)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_a_full_queue_answers_429_with_retry_after(inproc):
    srv = inproc(max_queue=2)
    ids = [call(srv, "POST", "/v1/jobs", json_body=generate_request(steps=150)).json["id"]]
    wait_for(srv, ids[0], until=lambda job: job["state"] == "running")
    ids += [call(srv, "POST", "/v1/jobs", json_body=generate_request(steps=150)).json["id"] for _ in range(2)]
    reply = call(srv, "POST", "/v1/jobs", json_body=generate_request())
    assert_error(reply, 429, "queue_full")
    assert int(reply.headers["Retry-After"]) >= 1
    assert "--max-queue" in reply.json["detail"]
    for job_id in ids:
        call(srv, "DELETE", f"/v1/jobs/{job_id}")
    for job_id in ids:
        wait_for(srv, job_id, timeout=60)
    accepted = call(srv, "POST", "/v1/jobs", json_body=generate_request())
    assert accepted.status == 202, accepted.body  # room again once the queue drained
    call(srv, "DELETE", f"/v1/jobs/{accepted.json['id']}")


def test_enospc_during_an_upload_is_507_and_leaves_nothing(inproc, tmp_path):
    """The kernel's own ENOSPC: the partial file is a link to /dev/full, where every write fails."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    srv = inproc()
    uploads = srv.app.state.uploads
    real_new_partial = uploads.new_partial

    def new_partial():
        upload_id, partial = real_new_partial()
        partial.symlink_to("/dev/full")
        return upload_id, partial

    uploads.new_partial = new_partial
    reply = call(srv, "POST", "/v1/uploads", data=b"II*\x00" + b"\x00" * 200_000,
                 headers={"Content-Type": "image/tiff"})
    body = assert_error(reply, 507, "disk_full")
    assert "no space left" in body["detail"] and str(srv.config.uploads_dir) in body["detail"]
    assert list(srv.config.uploads_dir.iterdir()) == []  # the link (and nothing else) is gone
    uploads.new_partial = real_new_partial
    assert call(srv, "GET", "/v1/health", token=None).status == 200


def test_plan_and_submit_run_the_checks_once(inproc, monkeypatch):
    """POST /v1/plan and POST /v1/jobs run engine.tasks.check once each (it reads headers, configs and
    pixels of every input: twice is twice the wait), and still refuse what it refuses."""
    import engine.tasks
    import engine.tasks.checks

    srv = inproc()
    calls = []
    real_check = engine.tasks.checks.check

    def counted(*args, **kwargs):
        calls.append(args[0].task)
        return real_check(*args, **kwargs)

    # both ways in: the package's name (the server's resolve_request) and checks.py's own (plan())
    monkeypatch.setattr(engine.tasks, "check", counted)
    monkeypatch.setattr(engine.tasks.checks, "check", counted)
    planned = call(srv, "POST", "/v1/plan", json_body=generate_request())
    assert planned.status == 200, planned.body
    assert planned.json["width"] == 64 and calls == ["generate"]
    submitted = call(srv, "POST", "/v1/jobs", json_body=generate_request())
    assert submitted.status == 202 and calls == ["generate", "generate"]
    call(srv, "DELETE", f"/v1/jobs/{submitted.json['id']}")
    # a refusal of check itself, and the step limit after it, as before
    bad = call(srv, "POST", "/v1/plan", json_body=generate_request(model="no-such-model-anywhere"))
    assert_error(bad, 404, "model_not_found")
    steps = call(srv, "POST", "/v1/plan", json_body=generate_request(steps=srv.config.max_steps + 1))
    assert_error(steps, 422, "invalid_request")
    assert "--max-steps" in steps.json["detail"]


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_slow_loris_sockets_are_bounded_and_cut_off(inproc):
    srv = inproc(max_connections=16, header_timeout_s=1.0)
    socks = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            if i % 2:  # half send a request head that never ends, half send nothing at all
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        time.sleep(0.3)
        # While they are held, the connection limit answers new requests at once (503), not never.
        busy = call(srv, "GET", "/v1/health", token=None, timeout=10)
        assert_error(busy, 503, "too_many_connections")
        # Past the head timeout every one of them has been closed by the server ...
        assert all(_closed_by_peer(s, timeout=10) for s in socks)
        # ... and the engine answers normally again.
        assert call(srv, "GET", "/v1/health", token=None, timeout=10).status == 200
    finally:
        for s in socks:
            s.close()


def test_keep_alive_connections_still_work_across_requests(inproc):
    """The head timer must not cut a keep-alive client that sends request after request."""
    import http.client

    srv = inproc(header_timeout_s=1.0, keep_alive_s=5.0)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/v1/health")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
            time.sleep(1.3)  # idle between requests longer than the head timeout, within keep-alive
    finally:
        conn.close()


def test_a_stalled_request_body_is_408_not_held_for_ever(inproc):
    srv = inproc(body_timeout_s=1.0)
    for path, ctype in (("/v1/jobs", "application/json"), ("/v1/uploads", "image/tiff")):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.token}\r\n"
                      f"Content-Type: {ctype}\r\nContent-Length: 1000\r\n\r\n{{".encode())
            s.settimeout(10)
            answer = b""
            while True:  # the server answers and closes; it does not wait for the other 999 bytes
                data = s.recv(4096)
                if not data:
                    break
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert json.loads(body)["code"] == "request_timeout"
    assert list(srv.config.uploads_dir.iterdir()) == []  # no partial upload left


def test_serve_flags_set_the_limits(tmp_path):
    import subprocess
    import sys

    from .conftest import REPO, start_server, stop_server

    done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--max-queue", "0", "--token-file",
                           str(tmp_path / "tok"), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "--max-queue" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "s").mkdir()
    srv = start_server(tmp_path / "s", "--max-steps", "5", "--max-job-seconds", "600", "--max-connections", "8",
                       "--header-timeout", "2")
    try:
        body = assert_error(call(srv, "POST", "/v1/plan", json_body=generate_request(steps=6)), 422)
        assert "limit of 5 steps" in body["detail"]
        assert call(srv, "POST", "/v1/plan", json_body=generate_request(steps=5)).status == 200
    finally:
        assert stop_server(srv) == 0


def test_an_inverted_bbox_in_the_input_crs_is_422(server, tmp_path):
    """plan() now runs before 202, so what it raises must be a 4xx: rasterio's WindowError was a 500."""
    body = {"task": "temporal", "inputs": [_rgb(tmp_path / "a.tif")], "input_dates": ["2021-01-01"],
            "date": "2022-01-01", "bbox": [583640, 4507640, 583000, 4507000], "steps": 2}
    reply = assert_error(call(server, "POST", "/v1/jobs", json_body=body), 422, "invalid_request")
    assert "min < max" in reply["detail"]
