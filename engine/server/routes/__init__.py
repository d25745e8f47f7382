"""The server's endpoints, one :class:`fastapi.APIRouter` per concern; :func:`engine.server.app.create_app`
includes them in this order (the order of the paths in the OpenAPI document).

* :mod:`.meta`: ``GET /v1/health`` (no token) and ``GET /v1/openapi.json``;
* :mod:`.models`: ``GET /v1/models``;
* :mod:`.files`: ``POST /v1/uploads``;
* :mod:`.jobs`: ``POST/GET /v1/jobs``, ``GET/DELETE /v1/jobs/{id}``, ``GET /v1/jobs/{id}/result``;
* :mod:`.plan`: ``POST /v1/plan``.

Shared pieces (the prefix, the token check, body reading) are in :mod:`.common`.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import files, jobs, meta, models, plan

ROUTERS: tuple[APIRouter, ...] = (meta.router, models.router, files.router, jobs.router, plan.router)
