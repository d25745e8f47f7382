"""Installing released checkpoints: the real download code against a loopback server laid out as
Zenodo's records API (no network), then the engine uses what was installed."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
import zipfile

import pytest

from engine.cli import main

RECORD = "13751498"  # diffusionsat-512


@pytest.fixture()
def zenodo(tmp_path, tiny_folder, monkeypatch):
    """A local 'Zenodo' serving one record whose zip holds the tiny model in the official layout."""
    files = tmp_path / "files"
    files.mkdir()
    archive = files / "diffusionsat_512.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in tiny_folder.rglob("*"):
            if path.is_file():
                zf.write(path, f"diffusionsat_512/{path.relative_to(tiny_folder)}")
    state = {"md5": hashlib.md5(archive.read_bytes()).hexdigest(), "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            state["requests"].append(self.path)
            if self.path == f"/api/records/{RECORD}":
                body = json.dumps({"files": [{
                    "key": archive.name, "size": archive.stat().st_size, "checksum": f"md5:{state['md5']}",
                    "links": {"self": f"http://127.0.0.1:{self.server.server_port}/files/{archive.name}"},
                }]}).encode()
            elif self.path == f"/files/{archive.name}":
                body = archive.read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DIFFUSIONSAT_ZENODO_API", f"http://127.0.0.1:{server.server_port}/api/records")
    models = tmp_path / "models"
    monkeypatch.setenv("DIFFUSIONSAT_MODELS", str(models))
    yield state, models
    server.shutdown()


def test_download_installs_and_the_engine_uses_it(zenodo, tmp_path, capsys):
    state, models = zenodo
    assert main(["download", "diffusionsat-512", "--json", "--quiet"]) == 0
    installed = json.loads(capsys.readouterr().out)["path"]
    assert installed == str(models / "diffusionsat-512")
    assert (models / "diffusionsat-512" / "checkpoint-0" / "unet" / "config.json").is_file()
    assert [p.name for p in models.iterdir()] == ["diffusionsat-512"]  # no temporary folders left
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert [m["name"] for m in listed] == ["tiny", "diffusionsat-512"]
    # download recorded which manifest entry it installed: its resolution comes from there
    record = json.loads((models / "diffusionsat-512" / "diffusionsat.json").read_text())
    assert (record["source"], record["release"], record["record"]) == ("download", "diffusionsat-512", RECORD)
    assert (listed[1]["resolution"], listed[1]["resolution_source"]) == (512, "manifest")
    out = tmp_path / "g.tif"
    assert main(["generate", "--bbox", "12.45,41.88,12.52,41.93", "--size", "64", "--steps", "1", "--quiet",
                 "--json", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "diffusionsat-512"  # auto picks the installed model
    # a second download refuses to overwrite unless asked
    assert main(["download", "diffusionsat-512", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_corrupt_download_installs_nothing(zenodo, capsys):
    state, models = zenodo
    state["md5"] = "0" * 32
    assert main(["download", "diffusionsat-512", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checksum" in err and len(err.strip().splitlines()) == 1
    assert not models.exists() or list(models.iterdir()) == []


def test_zip_slip_is_refused(tmp_path):
    from engine.models.download import DownloadError, _safe_extract

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(DownloadError, match="outside"):
        _safe_extract(evil, target)
    assert not (tmp_path / "outside.txt").exists()
    shutil.rmtree(target)
