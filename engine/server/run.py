"""Running the app: bind, print the one ready line, serve until SIGTERM/SIGINT.

The ready line is the contract with whoever started the server (the QGIS plugin, the tests,
a service manager): exactly one JSON object on stdout, flushed, once the socket accepts
connections::

    {"url": "http://127.0.0.1:8765", "token_file": "/home/me/.config/diffusionsat/token",
     "pid": 1234, "version": "0.1.0", "host": "127.0.0.1", "port": 8765}

Everything else (logs) goes to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Optional

from .. import __version__
from ..errors import DeviceError
from .config import ServerConfig, is_loopback
from .errors import ServerConfigError

log = logging.getLogger("engine.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: a free one chosen by the OS)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ServerConfigError(f"cannot resolve --host {host!r} ({err.strerror}); give an IP address "
                                "such as 127.0.0.1") from None
    family, socktype, proto, _, addr = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections only
    # then, and without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socktype, proto or socket.IPPROTO_TCP)
    if os.name != "nt":
        # Lets a restarted server reuse its port at once; on Windows the flag means something unsafe.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise ServerConfigError(f"cannot listen on {host}:{port} ({err.strerror}); another program may "
                                "use the port: pick another with --port, or --port 0 for a free one") from None
    sock.set_inheritable(True)
    return sock


def ready_line(config: ServerConfig, port: int) -> str:
    # A wildcard bind is reached locally through the loopback address.
    host = config.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return json.dumps({
        "url": f"http://{shown}:{port}",
        "token_file": str(config.token_file) if config.token_file else None,
        "pid": os.getpid(),
        "version": __version__,
        "host": config.host,
        "port": port,
    })


def guarded_h11_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for each request head (slow-loris protection).

    uvicorn times out idle keep-alive connections only *after* a response; a client that opens a
    socket and then sends nothing, or trickles a request head byte by byte, holds the connection
    (and a slot of ``limit_concurrency``) forever. Here a connection that has not delivered a
    complete request head within ``header_timeout_s`` of starting one (or of connecting) is closed.
    """
    import h11
    from uvicorn.protocols.http import h11_impl
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # Past --max-connections uvicorn answers 503 with a plain-text body; ours are all JSON. The
    # protocol looks the answer up in its module at call time, so that is where it is replaced.
    h11_impl.service_unavailable = _busy_json

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request head in %g s", header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm_head_timer()  # a (next) request head has begun: it must end in time
            else:
                self._disarm_head_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol


_BUSY = json.dumps({"detail": "the engine has too many open connections (--max-connections); retry in "
                              "a few seconds", "code": "too_many_connections"}).encode()


async def _busy_json(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(_BUSY)).encode()),
        (b"retry-after", b"5"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


def uvicorn_limits(config: ServerConfig) -> dict:
    """The uvicorn settings that bound what clients can hold: connections and idle time."""
    return {
        "http": guarded_h11_protocol(config.header_timeout_s),
        "limit_concurrency": config.max_connections,
        "timeout_keep_alive": config.keep_alive_s,
        "h11_max_incomplete_event_size": 64 * 1024,  # a request head over 64 KiB is refused (400)
    }


def serve(config: ServerConfig, *, log_level: str = "info") -> None:
    """Serve ``config`` until SIGTERM/SIGINT; a running job is cancelled on the way out."""
    import uvicorn

    from .app import create_app

    if not is_loopback(config.host):
        print(f"warning: the engine listens on {config.host}, reachable from other machines: anyone "
              "with the token can run jobs and read files under the allowed roots; traffic is not "
              "encrypted, so use it on a trusted network or behind a TLS proxy", file=sys.stderr, flush=True)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    try:
        app = create_app(config)
    except DeviceError as err:
        sock.close()
        raise ServerConfigError(str(err)) from None

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(ready_line(config, port), flush=True)
                log.info("DiffusionSat engine %s ready on port %d (workdir %s)", __version__, port,
                         config.workdir)

    uv_config = uvicorn.Config(
        app,
        log_config=None,  # our logging setup (stderr) stays in charge
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        # Connections, idle time and request heads are bounded (slow-loris, socket exhaustion).
        **uvicorn_limits(config),
    )
    server = _Server(uv_config)
    server.run(sockets=[sock])


def setup_logging(level: str = "info") -> None:
    """Logs to stderr, one line each; stdout carries only the ready line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("engine.server", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def main_serve(config: ServerConfig, log_level: Optional[str] = None) -> int:
    setup_logging(log_level or "info")
    serve(config, log_level=log_level or "info")
    return 0
