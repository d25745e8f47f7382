"""The server's settings: one dataclass that ``diffusionsat serve`` fills from its flags."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..tasks import MAX_PIXELS

#: Bytes of a JSON job request; a real request is a few hundred bytes.
MAX_JSON_BYTES = 1 << 20
#: Default output pixel-count limit per job (the engine's own single-image limit).
DEFAULT_MAX_PIXELS = MAX_PIXELS
#: Jobs waiting behind the running one; more are refused with 429 and Retry-After.
DEFAULT_MAX_QUEUE = 32
#: Denoising steps one job may ask for (the request schema itself allows up to 999).
DEFAULT_MAX_STEPS = 200
#: Wall-clock seconds one job may hold the worker; past it the job fails with code time_limit.
DEFAULT_MAX_JOB_SECONDS = 3600.0
#: Open HTTP connections (idle keep-alive ones included); past it uvicorn answers 503.
DEFAULT_MAX_CONNECTIONS = 64
#: Seconds a connection may take to send a complete request head, and may sit idle between
#: requests: a client that trickles bytes (slow-loris) or just holds the socket is cut off.
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5.0
#: Seconds a request body may stall (no bytes at all) before the request is answered 408.
DEFAULT_BODY_TIMEOUT_S = 30.0


def default_token_file() -> Path:
    """``$XDG_CONFIG_HOME/diffusionsat/token`` (``~/.config/diffusionsat/token``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "diffusionsat" / "token"


def default_workdir() -> Path:
    """``$XDG_CACHE_HOME/diffusionsat/server`` (``~/.cache/diffusionsat/server``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffusionsat" / "server"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """Everything the app, the job worker and the runner need to know.

    Sizes are in bytes and pixels, times in seconds unless the name says otherwise.
    """

    token: str
    workdir: Path = field(default_factory=default_workdir)
    host: str = "127.0.0.1"
    port: int = 0
    token_file: Optional[Path] = None
    default_model: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    retention_hours: float = 24.0
    allowed_roots: tuple[Path, ...] = ()
    max_upload_bytes: int = 512 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_models: int = 1
    max_json_bytes: int = MAX_JSON_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_steps: int = DEFAULT_MAX_STEPS
    max_job_seconds: float = DEFAULT_MAX_JOB_SECONDS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    #: VRT inputs are read (when all their sources pass the same checks) only with --allow-vrt.
    allow_vrt: bool = False
    #: ``hf:`` model ids in requests (downloads from the Hugging Face hub) only with --allow-hf.
    allow_hf: bool = False

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).expanduser().resolve()
        # Roots are compared after resolving symlinks, so a link inside a root cannot escape it.
        self.allowed_roots = tuple(Path(p).expanduser().resolve() for p in self.allowed_roots)

    def input_policy(self):
        """What jobs and plans of this server may open (:mod:`engine.geo.guard`)."""
        from ..geo.guard import InputPolicy

        return InputPolicy(roots=self.allowed_roots, allow_vrt=self.allow_vrt, uploads=self.uploads_dir)

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600.0

    @property
    def jobs_dir(self) -> Path:
        return self.workdir / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.workdir / "uploads"
