"""The local engine server: jobs over HTTP for the QGIS plugin, with a token, progress and cancel.

    diffusionsat serve                        # 127.0.0.1, a free port, token in a user-only file

Modules: :mod:`.app` (builds the FastAPI app), :mod:`.routes` (its endpoints, one APIRouter per
concern), :mod:`.schemas` (the response shapes), :mod:`.jobs` (the FIFO queue and its
single worker), :mod:`.inputs` (uploads, upload refs, allowed roots, early request checks),
:mod:`.security` (the token file and the bearer check), :mod:`.run` (uvicorn, the ready line),
:mod:`.config` and :mod:`.errors`. FastAPI is imported only by :mod:`.app` and :mod:`.routes`,
uvicorn only by :mod:`.run` (the ``server`` extra), so the rest imports without them.
"""

from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]


def create_app(*args, **kwargs):
    """See :func:`engine.server.app.create_app` (imported lazily: it needs FastAPI)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs):
    """See :func:`engine.server.run.serve` (imported lazily: it needs uvicorn)."""
    from .run import serve as _serve

    return _serve(*args, **kwargs)
