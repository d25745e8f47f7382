"""Shared fixtures: the tiny model (random weights, CPU) and its official-layout export."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a hub: any accidental download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Installed user models must not change what "auto" means inside tests.
os.environ.setdefault("DIFFUSIONSAT_MODELS", os.path.join(os.path.dirname(__file__), "_no_models_here"))


@pytest.fixture(scope="session")
def tiny_bundle():
    from engine.models.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_bundle):
    """The tiny model saved as an official DiffusionSat root (checkpoint-0/unet inside)."""
    from engine.models.loading import save_bundle

    return save_bundle(tiny_bundle, tmp_path_factory.mktemp("models") / "tiny-official",
                       unet_subfolder="checkpoint-0/unet")


@contextlib.contextmanager
def recording_http_server():
    """A loopback HTTP server that records the path of every request it gets (and answers 404):
    proof that something did, or did not, make an outbound request. Yields (url, hits)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    finally:
        srv.shutdown()
        srv.server_close()
