"""A standard-library client for the DiffusionSat engine server, and a starter for a local engine.

This module runs inside QGIS's Python (3.9+): it imports nothing outside the standard library
(no requests, no numpy, not the engine). The engine runs in its own Python environment and is
reached over HTTP::

    engine = LocalEngine.start("/path/to/engine-venv/bin/python", model="tiny")
    client = engine.client()
    job_id = client.submit({"task": "generate", "bbox": [...], "crs": "EPSG:32618",
                            "date": "2021-06-15", "width": 512, "height": 512})
    client.wait(job_id, on_progress=lambda job: print(job["progress"]))
    client.download_result(job_id, "/data/project/diffusionsat/result.tif")
    engine.stop()

Errors are :class:`EngineError` (``.status``, ``.code``, and the engine's own message as the
text, so the plugin can show it unchanged); :class:`EngineUnavailable` when nothing answers,
:class:`EngineAuthError` for a missing or wrong token, :class:`EngineCancelled` when a wait ends
by cancellation.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "EngineError",
    "EngineUnavailable",
    "EngineAuthError",
    "EngineCancelled",
    "EngineStartError",
    "EngineClient",
    "LocalEngine",
    "read_token",
    "sanitised_environment",
]

_CHUNK = 1 << 16
#: OpenAPI documents by (engine URL, token): read once per engine (EngineClient.openapi).
_OPENAPI_CACHE: Dict[Any, Dict[str, Any]] = {}
_OPENAPI_LOCK = threading.Lock()
#: Variables QGIS sets for its own Python, GDAL and PROJ; inherited, they make the engine's
#: Python load QGIS's modules or its GDAL/PROJ data of another version (crashes, wrong CRSs).
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PROJ_LIB", "PROJ_DATA", "GDAL_DATA",
                "GDAL_DRIVER_PATH")
_DROPPED_ENV_PREFIXES = ("QGIS_",)


# ---- errors ---------------------------------------------------------------------------------


#: How long a cancel waits for the engine to confirm that the job stopped.
CANCEL_WAIT_S = 20.0


class EngineError(Exception):
    """An error reported by (or about) the engine. ``str(err)`` is the message to show."""

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class EngineUnavailable(EngineError):
    """No engine answers at the URL (not started, wrong port, stopped) or it did not answer in time."""


class EngineAuthError(EngineError):
    """The engine refused the token (401: none sent, 403: not this engine's)."""


class EngineCancelled(EngineError):
    """The job was cancelled (by this client's ``cancelled()`` or by someone else)."""


class EngineStartError(EngineError):
    """A local engine could not be started; the message ends with the engine's last log lines."""


# ---- the client -----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The engine never redirects; following one would send the token to another address.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        return None


def _is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EngineClient:
    """Talks to one engine at ``url`` (e.g. ``http://127.0.0.1:8765``) with its ``token``.

    ``timeout`` is the socket timeout of each request in seconds (polling requests are quick;
    downloads and uploads apply it per read/write, not to the whole transfer).
    """

    def __init__(self, url: str, token: Optional[str], timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        handlers: List[Any] = [_NoRedirect()]
        if _is_loopback_url(self.url):
            # A system proxy must not see (or break) traffic to an engine on this machine.
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"EngineClient({self.url!r})"

    # ---- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, body: Any = None, headers: Optional[Dict[str, str]] = None,
                 auth: bool = True):
        """Send one request; return the open response (caller closes) or raise an EngineError."""
        all_headers = {"Accept": "application/json"}
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        req = urllib.request.Request(self.url + path, data=body, headers=all_headers, method=method)
        try:
            return self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, OSError)) and "timed out" in str(reason):
                raise EngineUnavailable(
                    f"the DiffusionSat engine at {self.url} did not answer within {self.timeout:g} s; "
                    "it may be overloaded or stuck: check its log, or restart it", code="timeout"
                ) from None
            raise EngineUnavailable(
                f"no DiffusionSat engine answers at {self.url}: start one from the plugin settings "
                f"or run `diffusionsat serve` ({reason})", code="unavailable"
            ) from None
        except (TimeoutError, OSError) as err:  # socket.timeout while reading headers, resets
            raise EngineUnavailable(
                f"the DiffusionSat engine at {self.url} did not answer properly ({err}); check that it "
                "is running", code="unavailable"
            ) from None

    def _http_error(self, err: urllib.error.HTTPError) -> EngineError:
        detail, code = None, None
        try:
            payload = json.loads(err.read().decode("utf-8") or "null")
            if isinstance(payload, dict):
                detail, code = payload.get("detail"), payload.get("code")
                if not isinstance(detail, str):  # e.g. a list from a non-engine server
                    detail = json.dumps(detail) if detail is not None else None
        except (ValueError, OSError, UnicodeDecodeError):
            pass
        finally:
            err.close()
        message = detail or f"the engine answered HTTP {err.code} {err.reason}"
        # 403 also answers a path outside the engine's --allowed-root: not a token problem
        if err.code == 401 or (err.code == 403 and code in (None, "forbidden", "unauthorized")):
            # The hint says what the plugin's user does (the settings); the engine's own detail
            # follows it for the rest. The hint must not repeat the engine's advice (it came twice).
            hint = ("no token was sent: set the engine's token in the plugin settings"
                    if err.code == 401 else
                    "the token does not match this engine's: set the right one in the plugin settings")
            return EngineAuthError(f"{hint} ({message})", err.code, code)
        return EngineError(message, err.code, code)

    def _json(self, method: str, path: str, payload: Any = None, auth: bool = True) -> Any:
        body = None
        headers = {}
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        with self._request(method, path, body=body, headers=headers, auth=auth) as resp:
            raw = resp.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise EngineError(f"the server at {self.url} is not a DiffusionSat engine (its answer is not "
                              "JSON); check the URL", code="bad_response") from None

    @staticmethod
    def _job_path(job_id: str) -> str:
        return "/v1/jobs/" + urllib.parse.quote(str(job_id), safe="")

    # ---- the API ----------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``{"status": "ok", "version", "device", "cuda", "free_vram_mb", "queue", ...}`` (no token needed)."""
        return self._json("GET", "/v1/health", auth=False)

    def models(self) -> Dict[str, Any]:
        """``{"models": [{"name", "tasks", "resolution", "kind", "path"}, ...], "default": ...}``."""
        return self._json("GET", "/v1/models")

    def openapi(self) -> Dict[str, Any]:
        """The engine's OpenAPI document (its request fields' defaults and limits: see
        ``schema.py``), fetched once per engine URL and token and then kept."""
        key = (self.url, self.token)
        with _OPENAPI_LOCK:
            doc = _OPENAPI_CACHE.get(key)
        if doc is None:
            doc = self._json("GET", "/v1/openapi.json")
            with _OPENAPI_LOCK:
                _OPENAPI_CACHE[key] = doc
        return doc

    def submit(self, request: Mapping[str, Any]) -> str:
        """Queue a task request dict; return the job id."""
        return self._json("POST", "/v1/jobs", dict(request))["id"]

    def plan(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """The pre-flight of a request without running it: output width/height/crs/bbox, gsd_m,
        tiles, model_px, steps, unet_evaluations, output_megapixels."""
        return self._json("POST", "/v1/plan", dict(request))

    def job(self, job_id: str) -> Dict[str, Any]:
        """The job's state dict (state, progress 0..1, step, total_steps, eta_s, error, result, ...)."""
        return self._json("GET", self._job_path(job_id))

    def jobs(self) -> List[Dict[str, Any]]:
        return self._json("GET", "/v1/jobs")["jobs"]

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Cancel a job (queued: never starts; running: stops within one denoising step)."""
        return self._json("DELETE", self._job_path(job_id))

    def upload_file(self, path: str) -> Dict[str, Any]:
        """Upload a GeoTIFF; return the engine's description (``path_ref``, width, height, crs, ...)."""
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            with self._request("POST", "/v1/uploads", body=fh, headers={
                    "Content-Type": "image/tiff", "Content-Length": str(size)}) as resp:
                return json.loads(resp.read().decode("utf-8"))

    def upload(self, path: str) -> str:
        """Upload a GeoTIFF; return the ``"upload:<id>"`` ref to put in a request's path fields."""
        return self.upload_file(path)["path_ref"]

    def download_spread(self, job_id: str, dest_path: str) -> str:
        """Save the spread map of a finished job submitted with ``spread`` at ``dest_path``."""
        return self.download_result(job_id, dest_path, part="/spread")

    def download_result(self, job_id: str, dest_path: str, part: str = "") -> str:
        """Save a finished job's GeoTIFF at ``dest_path`` (written to a temporary file, then renamed,
        so an interrupted download never leaves a half file there). Returns ``dest_path``.
        ``part``: ``/spread`` for the job's spread map."""
        dest_path = os.path.abspath(dest_path)
        folder = os.path.dirname(dest_path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{dest_path}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            with self._request("GET", self._job_path(job_id) + "/result" + part,
                               headers={"Accept": "image/tiff"}) as resp, open(tmp, "wb") as out:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
            os.replace(tmp, dest_path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return dest_path

    def wait_stopped(self, job_id: str, within_s: float = CANCEL_WAIT_S) -> Optional[float]:
        """After a cancel: poll until the engine says the job has stopped (it stops between UNet
        blocks, so within seconds); the seconds it took, or None if it was still running."""
        start = time.monotonic()
        while time.monotonic() - start < within_s:
            try:
                state = self.job(job_id).get("state")
            except EngineError:
                return None
            if state in ("cancelled", "failed", "done"):
                return time.monotonic() - start
            time.sleep(0.1)
        return None

    def wait(self, job_id: str, poll: float = 0.5, on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
             cancelled: Callable[[], bool] = lambda: False, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Poll until the job is done and return its dict.

        ``on_progress(job)`` is called after every poll. When ``cancelled()`` turns true the job
        is cancelled on the engine and :class:`EngineCancelled` is raised; a failed job raises
        :class:`EngineError` with the engine's message; ``timeout`` (seconds) raises
        :class:`EngineError` with code ``timeout`` (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if cancelled():
                self.cancel(job_id)
                stopped = self.wait_stopped(job_id)
                err = EngineCancelled(f"job {job_id} was cancelled", code="cancelled")
                err.stopped_s = stopped
                raise err
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            state = job.get("state")
            if state == "done":
                return job
            if state == "failed":
                raise EngineError(job.get("error") or f"job {job_id} failed", None,
                                  job.get("error_code") or "job_failed")
            if state == "cancelled":
                raise EngineCancelled(f"job {job_id} was cancelled on the engine", code="cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise EngineError(f"job {job_id} did not finish within {timeout:g} s (it is {state}); "
                                  "wait longer or cancel it", code="timeout")
            # Sleep in small slices so that cancelled() is honoured quickly even with a slow poll.
            end = time.monotonic() + poll
            while time.monotonic() < end:
                if cancelled():
                    break
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))


# ---- a local engine -------------------------------------------------------------------------


def read_token(path: str) -> str:
    """The token in an engine's token file (one line); :class:`EngineAuthError` if unusable."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as err:
        raise EngineAuthError(f"cannot read the engine token file {path} ({err.strerror}); start the "
                              "engine once to create it, or give the right path", code="token_file") from None
    if not token:
        raise EngineAuthError(f"the engine token file {path} is empty; delete it and restart the engine",
                              code="token_file")
    return token


def sanitised_environment(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's) without QGIS's Python/GDAL/PROJ settings (see _DROPPED_ENV)."""
    source = os.environ if env is None else env
    clean = {k: v for k, v in source.items()
             if k.upper() not in _DROPPED_ENV and not k.upper().startswith(_DROPPED_ENV_PREFIXES)}
    clean["PYTHONUNBUFFERED"] = "1"  # the ready line must not wait in a buffer
    clean["PYTHONIOENCODING"] = "utf-8"
    return clean


class LocalEngine:
    """An engine process started by :meth:`start`; ``url``, ``token``, ``process``, ``client()``,
    ``stop()``. Its log (stderr) is kept: the last lines are in :meth:`log_tail`."""

    def __init__(self, process: "subprocess.Popen[str]", url: str, token: str, token_file: str,
                 ready: Dict[str, Any], log_lines: Deque[str]) -> None:
        self.process = process
        self.url = url
        self.token = token
        self.token_file = token_file
        self.ready = ready
        self._log = log_lines

    def __repr__(self) -> str:
        return f"LocalEngine(url={self.url!r}, pid={self.process.pid})"

    @classmethod
    def start(cls, python_executable: str, token_file: Optional[str] = None, model: Optional[str] = None,
              extra_args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
              timeout: float = 120.0, cwd: Optional[str] = None) -> "LocalEngine":
        """Start ``python -m engine.cli serve --port 0 ...`` and wait for its ready line.

        ``python_executable`` is the engine environment's interpreter (not QGIS's). The
        environment is sanitised (:func:`sanitised_environment`). Raises :class:`EngineStartError`
        with the engine's last log lines when it exits or is not ready within ``timeout`` s.
        """
        cmd = [python_executable, "-m", "engine.cli", "serve", "--port", "0"]
        if token_file:
            cmd += ["--token-file", os.path.expanduser(token_file)]
        if model:
            cmd += ["--model", model]
        cmd += [str(a) for a in extra_args]
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            # No console window popping up next to QGIS.
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=sanitised_environment(env), cwd=cwd or os.path.expanduser("~"),
                text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
            )
        except OSError as err:
            raise EngineStartError(f"cannot run the engine's Python {python_executable!r} ({err.strerror}); "
                                   "set the engine interpreter in the plugin settings", code="start_failed") from None
        log_lines: Deque[str] = collections.deque(maxlen=200)
        ready_q: "queue.Queue[Dict[str, Any]]" = queue.Queue()

        def drain_stdout() -> None:
            # After the ready line stdout is drained too: a full pipe would block the engine.
            assert process.stdout is not None
            for line in process.stdout:
                text = line.strip()
                if ready_q.empty() and text.startswith("{"):
                    try:
                        payload = json.loads(text)
                    except ValueError:
                        payload = None
                    if isinstance(payload, dict) and "url" in payload:
                        ready_q.put(payload)
                        continue
                if text:
                    log_lines.append(text)

        def drain_stderr() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                log_lines.append(line.rstrip("\n"))

        for target in (drain_stdout, drain_stderr):
            threading.Thread(target=target, name=f"diffusionsat-engine-{target.__name__}", daemon=True).start()

        deadline = time.monotonic() + timeout
        ready: Optional[Dict[str, Any]] = None
        while ready is None:
            try:
                ready = ready_q.get(timeout=0.1)
            except queue.Empty:
                if process.poll() is not None:
                    time.sleep(0.2)  # let the drain threads collect the last words
                    raise EngineStartError(
                        f"the engine exited (code {process.returncode}) before it was ready"
                        + _tail_text(log_lines), code="start_failed") from None
                if time.monotonic() > deadline:
                    _stop_process(process)
                    raise EngineStartError(
                        f"the engine was not ready within {timeout:g} s" + _tail_text(log_lines),
                        code="start_timeout") from None
        try:
            token = read_token(ready.get("token_file") or token_file or "")
        except EngineAuthError:
            _stop_process(process)
            raise
        return cls(process, ready["url"], token, ready.get("token_file") or token_file or "", ready, log_lines)

    def client(self, timeout: float = 30.0) -> EngineClient:
        return EngineClient(self.url, self.token, timeout=timeout)

    def log_tail(self, lines: int = 20) -> List[str]:
        """The engine's last log lines (its stderr)."""
        return list(self._log)[-lines:]

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """Stop the engine (SIGTERM: a running job is cancelled), kill it if it lingers; return its exit code."""
        return _stop_process(self.process, timeout)

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _stop_process(process: "subprocess.Popen[str]", timeout: float = 15.0) -> Optional[int]:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


def _tail_text(lines: Deque[str], n: int = 15) -> str:
    tail = list(lines)[-n:]
    if not tail:
        return " (it printed nothing)"
    return ":\n" + "\n".join(tail)
