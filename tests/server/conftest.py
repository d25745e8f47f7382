"""The real engine server in a subprocess (tiny model, free loopback port), and HTTP helpers.

One server serves the whole session: starting one costs a few seconds of imports. Its
``--max-pixels`` is small (128 x 128) so that no test (nor the fuzzer) can queue a job that
keeps the CPU busy for minutes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_PIXELS = 128 * 128
START_TIMEOUT_S = 120


@dataclass
class Server:
    url: str
    token: str
    token_file: Path
    workdir: Path
    process: subprocess.Popen
    log: Path
    ready: dict


def start_server(tmp: Path, *extra: str, env: Optional[dict] = None) -> Server:
    """Start ``python -m engine.cli serve`` and wait for its ready line."""
    token_file = tmp / "token"
    workdir = tmp / "work"
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--token-file", str(token_file),
           "--model", "tiny", "--workdir", str(workdir), "--max-pixels", str(MAX_PIXELS), *extra]
    log_fh = open(log, "w")
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_fh, stdin=subprocess.DEVNULL,
                               text=True, cwd=REPO, env=env)
    log_fh.close()
    lines: list[str] = []

    def read_ready() -> None:
        for line in process.stdout:  # keeps draining after the ready line
            lines.append(line)

    threading.Thread(target=read_ready, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not lines:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    ready = json.loads(lines[0])
    return Server(url=ready["url"], token=token_file.read_text().strip(), token_file=token_file,
                  workdir=workdir, process=process, log=log, ready=ready)


def stop_server(server: Server) -> int:
    server.process.terminate()
    try:
        return server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        return server.process.wait(5)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    code = stop_server(srv)
    assert code == 0, f"the server did not stop cleanly (exit {code}):\n{srv.log.read_text()[-3000:]}"


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def call(server: Server, method: str, path: str, *, token: Any = True, json_body: Any = None,
         data: Optional[bytes] = None, headers: Optional[dict] = None, timeout: float = 30) -> Reply:
    """One HTTP request; ``token=True`` sends the server's token, a string sends that, None none."""
    hdrs = dict(headers or {})
    if token is True:
        hdrs["Authorization"] = f"Bearer {server.token}"
    elif token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(server.url + path, data=data, headers=hdrs, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())


def generate_request(**overrides) -> dict:
    """A small valid generate request: 64 x 64 px over 640 m of New York's UTM zone."""
    req = {"task": "generate", "bbox": [583000, 4507000, 583640, 4507640], "crs": "EPSG:32618",
           "date": "2021-06-15", "width": 64, "height": 64, "steps": 2, "seed": 1}
    req.update(overrides)
    return req


def wait_for(server: Server, job_id: str, *, until=lambda job: job["finished"] is not None,
             timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = call(server, "GET", f"/v1/jobs/{job_id}").json
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")
        time.sleep(0.05)


def download_spread(server: Server, job: dict, folder: Path) -> tuple[Path, Path]:
    """A finished --spread job's spread map and result, downloaded into ``folder`` (spread, result);
    the spread map is served at ``/v1/jobs/{id}/result/spread`` as a GeoTIFF."""
    url = job["result"]["spread_url"]
    assert url == f"/v1/jobs/{job['id']}/result/spread"
    reply = call(server, "GET", url)
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/tiff"
    spread, result = folder / "s.tif", folder / "r.tif"
    spread.write_bytes(reply.body)
    result.write_bytes(call(server, "GET", job["result"]["result_url"]).body)
    return spread, result


def load_engine_client():
    """qgis_plugin/engine_client.py loaded by path: the plugin package's __init__ may need QGIS."""
    name = "diffusionsat_engine_client_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "qgis_plugin" / "engine_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def engine_client():
    return load_engine_client()
