"""Which engine to talk to, and the local engine the plugin started (if any).

:func:`resolve_spec` turns settings + environment into an :class:`EngineSpec` on the main thread
(it reads the token file or the auth manager there). :class:`EngineManager` hands out clients
for a spec; for "start a local engine" it launches ``<python> -m engine.cli serve`` once, in the
calling thread (a task's or a Processing algorithm's, never the GUI's), and keeps it until
:meth:`EngineManager.stop` (plugin unload or interpreter exit).
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlparse

from .settings import (
    MODE_LOCAL,
    MODE_REMOTE,
    PluginSettings,
    default_engine_python,
    read_token_file,
    token_from_authcfg,
)


class EngineConfigError(Exception):
    """The engine settings are incomplete; the message says what to set."""


@dataclass(frozen=True)
class EngineSpec:
    """Where the engine is. ``token`` is held in memory only."""

    mode: str
    url: str = ""
    token: str = field(default="", repr=False)
    python: str = ""
    model: str = "auto"
    upload: str = "auto"

    @property
    def is_local(self) -> bool:
        """True when the engine runs on this machine (it can read our files by path)."""
        if self.mode == MODE_LOCAL:
            return True
        host = (urlparse(self.url).hostname or "").lower()
        return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")

    @property
    def upload_inputs(self) -> bool:
        """Whether input rasters are uploaded up front (else passed as paths)."""
        if self.upload == "always":
            return True
        if self.upload == "never":
            return False
        return not self.is_local

    def describe(self) -> str:
        if self.mode == MODE_LOCAL:
            return f"local engine ({self.python})"
        return f"engine at {self.url}"


def resolve_spec(settings: Optional[PluginSettings] = None,
                 env: Mapping[str, str] = os.environ) -> EngineSpec:
    """The engine to use: ``DIFFUSIONSAT_URL`` (+ ``DIFFUSIONSAT_TOKEN_FILE`` or
    ``DIFFUSIONSAT_TOKEN``) when set, else the plugin settings.

    Raises :class:`EngineConfigError` with what to set when the configuration is incomplete.
    """
    settings = settings or PluginSettings.load()
    url = env.get("DIFFUSIONSAT_URL", "").strip()
    if url:
        token = env.get("DIFFUSIONSAT_TOKEN", "").strip()
        token_file = env.get("DIFFUSIONSAT_TOKEN_FILE", "").strip()
        if token_file:
            token = _read_token(token_file)
        if not token:
            raise EngineConfigError(
                "DIFFUSIONSAT_URL is set but no token: set DIFFUSIONSAT_TOKEN_FILE to the engine's "
                "token file (printed by `diffusionsat serve`)"
            )
        return EngineSpec(MODE_REMOTE, url=url.rstrip("/"), token=token, model=settings.model,
                          upload=settings.upload)
    if settings.mode == MODE_REMOTE:
        if not settings.url:
            raise EngineConfigError(
                "no engine URL is set: open DiffusionSat → Engine settings and enter the URL and "
                "token of a running engine, or choose “start a local engine”"
            )
        token = ""
        if settings.authcfg:
            token = token_from_authcfg(settings.authcfg) or ""
            if not token:
                raise EngineConfigError(
                    f"the QGIS authentication configuration {settings.authcfg} holds no token "
                    "(put the token in its password field) or could not be unlocked"
                )
        elif settings.token_file:
            token = _read_token(settings.token_file)
        else:
            raise EngineConfigError(
                "no engine token is set: in DiffusionSat → Engine settings choose the engine's "
                "token file or a QGIS authentication configuration holding it"
            )
        return EngineSpec(MODE_REMOTE, url=settings.url.rstrip("/"), token=token,
                          model=settings.model, upload=settings.upload)
    python = default_engine_python(settings, env)
    if not python:
        raise EngineConfigError(
            "no engine interpreter is set: in DiffusionSat → Engine settings give the Python of "
            "the environment where DiffusionSat's engine is installed (e.g. …/.venv/bin/python), "
            "or the URL and token of a running engine"
        )
    if not Path(python).exists():
        raise EngineConfigError(f"the engine interpreter {python} does not exist; fix it in Engine settings")
    return EngineSpec(MODE_LOCAL, python=python, model=settings.model, upload=settings.upload)


def _read_token(path: str) -> str:
    try:
        return read_token_file(path)
    except (OSError, ValueError) as err:
        raise EngineConfigError(f"cannot read the engine token file {path}: {err}") from None


class EngineManager:
    """Clients for engine specs; owns the local engine the plugin started.

    Thread-safe: tasks and Processing algorithms call :meth:`client` from worker threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = None  # engine_client.LocalEngine
        self._local_python: Optional[str] = None
        self._workdir: Optional[str] = None
        atexit.register(self.stop)

    def client(self, spec: EngineSpec, timeout: float = 30.0):
        """An ``EngineClient`` for ``spec``; starts the local engine on first use (blocking, up to
        two minutes, so call it off the GUI thread)."""
        from .engine_client import EngineClient

        if spec.mode == MODE_REMOTE:
            return EngineClient(spec.url, spec.token, timeout=timeout)
        return self._local_engine(spec).client()

    def local_url(self) -> Optional[str]:
        local = self._local
        return getattr(local, "url", None) if local is not None else None

    def _local_engine(self, spec: EngineSpec):
        from .engine_client import LocalEngine

        with self._lock:
            if self._local is not None and (self._local_python != spec.python or not self._alive()):
                self._stop_locked()
            if self._local is None:
                self._workdir = self._workdir or tempfile.mkdtemp(prefix="diffusionsat-engine-")
                token_file = os.path.join(self._workdir, "token")
                self._local = LocalEngine.start(
                    spec.python,
                    token_file=token_file,
                    extra_args=("--workdir", self._workdir),
                )  # the client drops QGIS's PYTHONPATH/GDAL/PROJ variables from the environment
                self._local_python = spec.python
            return self._local

    def _alive(self) -> bool:
        return self._local is not None and self._local.running()

    def _stop_locked(self) -> None:
        local, self._local = self._local, None
        if local is not None:
            local.stop()

    def stop(self) -> None:
        """Stop the local engine if this manager started one."""
        with self._lock:
            self._stop_locked()


_SHARED: Optional[EngineManager] = None
_SHARED_LOCK = threading.Lock()


def shared_manager() -> EngineManager:
    """The manager the dock and the Processing algorithms share within one QGIS process (so a
    local engine is started once and its loaded model reused)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = EngineManager()
        return _SHARED


# ---- "Test connection": what a job will do ---------------------------------------------------

# What starting a local engine needs, cheapest first: a missing engine fails in a fraction of a
# second; the model list then imports the engine's model code (torch), as the server will.
_PROBE = (
    "import json, importlib.util as u, engine\n"
    "missing = [m for m in ('engine.server', 'fastapi', 'uvicorn', 'torch', 'diffusers', 'rasterio') "
    "if u.find_spec(m) is None]\n"
    "if missing: raise SystemExit('ModuleNotFoundError: No module named ' + ', '.join(repr(m) for m in missing))\n"
    "from engine.models.registry import installed_models\n"
    "print(json.dumps({'version': engine.__version__, 'models': ['tiny'] + [m.name for m in installed_models()]}))\n"
)


def probe_interpreter(python: str, timeout: float = 120.0) -> dict:
    """Run, in ``python``, what starting a local engine imports (the engine and its server), the
    way the plugin starts it (sanitised environment, home folder): ``{"version", "models"}``.
    Raises :class:`EngineConfigError` with the interpreter's own error and the fix."""
    import json as _json
    import subprocess

    from .engine_client import sanitised_environment

    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                              env=sanitised_environment(), cwd=os.path.expanduser("~"))
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EngineConfigError(f"cannot run the engine interpreter {python}: {err}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        hint = ""
        if "No module named" in last:
            hint = (" Install the engine into that environment (pip install 'diffusionsat[server]', or "
                    "bash scripts/setup.sh in the DiffusionSat checkout), or choose its .venv/bin/python.")
        raise EngineConfigError(f"{python} cannot run the engine: {last}.{hint}")
    try:
        return _json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EngineConfigError(f"{python} answered the engine probe with {done.stdout[-200:]!r}") from None


def check_engine(settings: PluginSettings, manager: Optional["EngineManager"] = None) -> str:
    """A one-line verdict for the settings dialog's Test button: what the first job would meet.

    Remote: the engine's health and models. Local: the engine already running for these
    settings, or else the interpreter is made to import the engine and its server (it says
    "Not OK" with the import error for an interpreter without the engine).
    """
    from .engine_client import EngineClient, EngineError

    try:
        spec = resolve_spec(settings)
    except EngineConfigError as err:
        return f"Not OK: {err}"
    if spec.mode == MODE_LOCAL:
        local = manager._local if manager is not None else None
        if local is not None and manager._local_python == spec.python and local.running():
            client = local.client(timeout=5)
        else:
            try:
                found = probe_interpreter(spec.python)
            except EngineConfigError as err:
                return f"Not OK: {err}"
            return (f"OK: {spec.python} runs engine {found.get('version')}; models: "
                    f"{', '.join(found.get('models') or []) or 'none'}. It is started on the first job.")
    else:
        client = EngineClient(spec.url, spec.token, timeout=5)
    try:
        health = client.health()
        models = client.models()
    except EngineError as err:
        return f"Not OK: {err}"
    names = ", ".join(m.get("name", "?") for m in models.get("models", []))
    return f"OK: engine {health.get('version')} on {health.get('device')}; models: {names or 'none'}"
