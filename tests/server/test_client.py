"""qgis_plugin/engine_client.py (standard library only) against the real server."""

from __future__ import annotations

import ast
import socket
import sys
import threading
import time

import pytest

from .conftest import REPO, generate_request


def test_client_imports_only_the_standard_library():
    tree = ast.parse((REPO / "qgis_plugin" / "engine_client.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_end_to_end(server, engine_client, tmp_path):
    import rasterio

    client = engine_client.EngineClient(server.url, server.token)
    assert client.health()["status"] == "ok"
    assert client.models()["models"][0]["name"] == "tiny"
    assert client.plan(generate_request(steps=3))["unet_evaluations"] == 6
    job_id = client.submit(generate_request(steps=3))
    seen = []
    job = client.wait(job_id, poll=0.05, on_progress=lambda j: seen.append(j["progress"]))
    assert job["state"] == "done" and seen[-1] == 1.0
    assert seen == sorted(seen)
    assert job_id in [j["id"] for j in client.jobs()]
    dest = tmp_path / "sub" / "out.tif"
    assert client.download_result(job_id, str(dest)) == str(dest)
    with rasterio.open(dest) as src:
        assert (src.width, src.height) == (64, 64) and src.crs.to_epsg() == 32618
    assert [p.name for p in dest.parent.iterdir()] == ["out.tif"]  # no temporary file left


def test_cancel_through_wait(server, engine_client):
    client = engine_client.EngineClient(server.url, server.token)
    job_id = client.submit(generate_request(steps=200))
    progressed = threading.Event()

    def on_progress(job):
        if job["step"] >= 1:
            progressed.set()

    with pytest.raises(engine_client.EngineCancelled):
        client.wait(job_id, poll=0.05, on_progress=on_progress, cancelled=progressed.is_set)
    deadline = time.monotonic() + 10
    while client.job(job_id)["finished"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.job(job_id)["state"] == "cancelled"


def test_errors_carry_the_engine_message(server, engine_client, tmp_path):
    client = engine_client.EngineClient(server.url, server.token)
    with pytest.raises(engine_client.EngineError) as err:
        client.submit(generate_request(width=60))
    assert err.value.status == 422 and err.value.code == "invalid_request"
    assert "multiple of 8" in str(err.value)
    with pytest.raises(engine_client.EngineError) as err:
        client.job("f" * 32)
    assert err.value.status == 404 and err.value.code == "not_found"

    failing = tmp_path / "broken"
    from .test_api import _fake_model_with_corrupt_weights

    _fake_model_with_corrupt_weights(failing)
    job_id = client.submit(generate_request(model=str(failing)))
    with pytest.raises(engine_client.EngineError, match="corrupt") as err:
        client.wait(job_id, poll=0.05)
    assert err.value.code == "model_load_error"


def test_auth_errors(server, engine_client):
    with pytest.raises(engine_client.EngineAuthError, match="no token") as err:
        engine_client.EngineClient(server.url, None).jobs()
    assert err.value.status == 401
    with pytest.raises(engine_client.EngineAuthError, match="token does not match") as err:
        engine_client.EngineClient(server.url, "wrong" * 10).jobs()
    assert err.value.status == 403
    # health needs no token: a client can tell "no engine" from "wrong token"
    assert engine_client.EngineClient(server.url, "wrong").health()["status"] == "ok"


def test_nothing_listening(engine_client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = engine_client.EngineClient(f"http://127.0.0.1:{port}", "x", timeout=5)
    with pytest.raises(engine_client.EngineUnavailable, match="no DiffusionSat engine answers") as err:
        client.health()
    assert "diffusionsat serve" in str(err.value)


def test_upload(server, engine_client, tmp_path):
    from .test_api import _geotiff_bytes

    path = tmp_path / "layer.tif"
    path.write_bytes(_geotiff_bytes(tmp_path))
    client = engine_client.EngineClient(server.url, server.token)
    ref = client.upload(str(path))
    assert ref.startswith("upload:") and len(ref) == len("upload:") + 32


def test_sanitised_environment(engine_client):
    env = engine_client.sanitised_environment({
        "PATH": "/usr/bin", "PYTHONPATH": "/qgis/python", "PYTHONHOME": "/qgis", "PROJ_LIB": "/qgis/proj",
        "PROJ_DATA": "/qgis/proj", "GDAL_DATA": "/qgis/gdal", "GDAL_DRIVER_PATH": "/qgis/gdalplugins",
        "QGIS_PREFIX_PATH": "/qgis", "HOME": "/home/me"})
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/me"
    for dropped in ("PYTHONPATH", "PYTHONHOME", "PROJ_LIB", "PROJ_DATA", "GDAL_DATA", "GDAL_DRIVER_PATH",
                    "QGIS_PREFIX_PATH"):
        assert dropped not in env


def test_read_token(engine_client, tmp_path):
    path = tmp_path / "token"
    path.write_text("abc123\n")
    assert engine_client.read_token(str(path)) == "abc123"
    with pytest.raises(engine_client.EngineAuthError):
        engine_client.read_token(str(tmp_path / "missing"))


def test_local_engine_start(engine_client, tmp_path, monkeypatch):
    # QGIS's own settings must not reach the engine: each poisoned value here would break it
    # (a foreign `engine` package first on the path, PROJ/GDAL data that does not exist).
    poisoned = tmp_path / "qgis-python" / "engine"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('QGIS PYTHONPATH leaked into the engine')\n")
    monkeypatch.setenv("PYTHONPATH", str(poisoned.parent))
    for name in ("PROJ_LIB", "PROJ_DATA", "GDAL_DATA"):
        monkeypatch.setenv(name, str(tmp_path / "nowhere"))
    token_file = tmp_path / "token"
    engine = engine_client.LocalEngine.start(
        sys.executable, token_file=str(token_file), model="tiny",
        extra_args=["--workdir", str(tmp_path / "work"), "--max-pixels", str(128 * 128)], timeout=120)
    try:
        assert engine.url.startswith("http://127.0.0.1:")
        assert engine.token == token_file.read_text().strip()
        client = engine.client()
        assert client.health()["status"] == "ok"
        job_id = client.submit(generate_request())
        assert client.wait(job_id, poll=0.05)["state"] == "done"
        assert any("ready on port" in line for line in engine.log_tail(50))
        # Stopping with a job running: the job is cancelled and the engine exits cleanly, fast.
        long_job = client.submit(generate_request(steps=200))
        while client.job(long_job)["state"] != "running":
            time.sleep(0.02)
        stop_started = time.monotonic()
    finally:
        code = engine.stop()
    assert code == 0, engine.log_tail(30)
    assert time.monotonic() - stop_started < 15
    assert not engine.running()
    assert any("cancelled" in line for line in engine.log_tail(30)), engine.log_tail(30)


def test_local_engine_start_failure_shows_the_log(engine_client, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("z" * 43)
    token_file.chmod(0o644)
    with pytest.raises(engine_client.EngineStartError, match="chmod 600"):
        engine_client.LocalEngine.start(sys.executable, token_file=str(token_file), timeout=60)
