"""The engine's defaults and limits of request fields, read from its OpenAPI document.

The engine's request models are the only place where a default or a limit is written; the engine
publishes them at ``GET /v1/openapi.json`` (``components.schemas.GenerateRequest`` ...). The plugin
reads them once per engine (:meth:`.engine_client.EngineClient.openapi`, cached) into
:class:`Limits`: the dock takes its ranges and defaults from them when it talks to an engine, and
every job's request is checked against them before it is sent (:func:`.tasks.run_job`).

:data:`FALLBACK` is the one copy the plugin keeps, for the moments no engine has answered yet
(the Processing algorithms define their parameters when the provider loads, QGIS may start
without an engine). ``tests/plugin/test_schema.py`` keeps it equal to the engine's document.

Standard library only (no QGIS): it runs wherever :mod:`.engine_client` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

#: The request model (OpenAPI component) of each task.
MODELS = {"generate": "GenerateRequest", "superres": "SuperresRequest", "inpaint": "InpaintRequest",
          "temporal": "TemporalRequest", "extend": "ExtendRequest"}

#: The fields whose default and range the plugin's forms show, as the engine publishes them
#: (``default``, ``minimum``, ``maximum``), plus ``x-max-pixels`` of one generated image.
FALLBACK: Dict[str, Dict[str, Dict[str, Any]]] = {
    "generate": {
        "steps": {"default": 20, "minimum": 1, "maximum": 999},
        "guidance": {"default": 7.5, "minimum": 0.0, "maximum": 50.0},
        "seed": {"default": None, "minimum": 0, "maximum": 2**63 - 1},
        "spread": {"default": None, "minimum": 2, "maximum": 16},
    },
    "superres": {
        "steps": {"default": 20, "minimum": 1, "maximum": 999},
        "guidance": {"default": 1.0, "minimum": 0.0, "maximum": 50.0},
        "factor": {"default": 4, "minimum": 1, "maximum": 64},
        "seed": {"default": None, "minimum": 0, "maximum": 2**63 - 1},
        "spread": {"default": None, "minimum": 2, "maximum": 16},
    },
    "inpaint": {
        "steps": {"default": 20, "minimum": 1, "maximum": 999},
        "guidance": {"default": 7.5, "minimum": 0.0, "maximum": 50.0},
        "seed": {"default": None, "minimum": 0, "maximum": 2**63 - 1},
        "spread": {"default": None, "minimum": 2, "maximum": 16},
    },
    "temporal": {
        "steps": {"default": 20, "minimum": 1, "maximum": 999},
        "guidance": {"default": 1.0, "minimum": 0.0, "maximum": 50.0},
        "seed": {"default": None, "minimum": 0, "maximum": 2**63 - 1},
        "spread": {"default": None, "minimum": 2, "maximum": 16},
    },
    "extend": {
        "steps": {"default": 20, "minimum": 1, "maximum": 999},
        "guidance": {"default": 7.5, "minimum": 0.0, "maximum": 50.0},
        "seed": {"default": None, "minimum": 0, "maximum": 2**63 - 1},
    },
}
#: Pixels of one generated image (width x height) the engine accepts.
FALLBACK_MAX_PIXELS = 4096 * 4096

_KEYS = ("default", "minimum", "maximum")


class OutOfRange(ValueError):
    """A request value outside the engine's published range; the message says which and the range."""


@dataclass(frozen=True)
class Bounds:
    """One field's default and inclusive range (None: not published)."""

    default: Any = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None


class Limits:
    """Defaults and ranges by task and field; ``source`` says where they came from."""

    def __init__(self, fields: Mapping[str, Mapping[str, Bounds]], max_pixels: int, source: str) -> None:
        self.fields = {task: dict(by_name) for task, by_name in fields.items()}
        self.max_pixels = int(max_pixels)
        self.source = source

    def __repr__(self) -> str:
        return f"Limits(source={self.source!r})"

    def get(self, task: str, name: str) -> Bounds:
        """The bounds of ``name`` in ``task``'s requests (all None when the plugin keeps none)."""
        return self.fields.get(task, {}).get(name, Bounds())

    def default(self, task: str, name: str) -> Any:
        return self.get(task, name).default

    @property
    def max_side(self) -> int:
        """The longest side (px, a multiple of 8) of a square generated image within the limit."""
        return max(8, math.isqrt(self.max_pixels) // 8 * 8)

    def check(self, task: str, request: Mapping[str, Any]) -> None:
        """Raise :class:`OutOfRange` for the first value of ``request`` outside its range."""
        for name, bounds in self.fields.get(task, {}).items():
            value = request.get(name)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # absent (the engine's default applies) or not a number: the engine says why
            if bounds.minimum is not None and value < bounds.minimum:
                raise OutOfRange(f"{name} {value:g} is below the engine's minimum of {bounds.minimum:g}")
            if bounds.maximum is not None and value > bounds.maximum:
                raise OutOfRange(f"{name} {value:g} is above the engine's maximum of {bounds.maximum:g}")
        if task == "generate":
            width, height = request.get("width"), request.get("height")
            size = request.get("size")
            if isinstance(width, int) and isinstance(height, int) and width * height > self.max_pixels:
                raise OutOfRange(f"{width}×{height} px is more than the engine's {self.max_pixels} pixels "
                                 "for one generated image")
            if isinstance(size, int) and size > self.max_side:
                raise OutOfRange(f"a longest side of {size} px is above the engine's {self.max_side} px")


def _bounds(entry: Mapping[str, Any]) -> Dict[str, Any]:
    return {key: entry[key] for key in _KEYS if key in entry}


def _from_fallback() -> Dict[str, Dict[str, Bounds]]:
    return {task: {name: Bounds(**info) for name, info in by_name.items()} for task, by_name in FALLBACK.items()}


def fallback() -> Limits:
    """The plugin's own table (used until an engine answers)."""
    return Limits(_from_fallback(), FALLBACK_MAX_PIXELS, "the plugin's fallback table")


def published(doc: Mapping[str, Any], task: str, name: str) -> Dict[str, Any]:
    """``default``/``minimum``/``maximum`` of one field in an OpenAPI document (pydantic writes
    an optional field's range inside ``anyOf``); empty when the document does not have it."""
    schemas = (doc.get("components") or {}).get("schemas") or {}
    prop = ((schemas.get(MODELS.get(task, "")) or {}).get("properties") or {}).get(name)
    if not isinstance(prop, Mapping):
        return {}
    found = _bounds(prop)
    for member in prop.get("anyOf") or ():
        if isinstance(member, Mapping):
            for key, value in _bounds(member).items():
                found.setdefault(key, value)
    if "default" not in found:
        found["default"] = None
    return found


def limits_from_openapi(doc: Mapping[str, Any], source: str = "the engine") -> Limits:
    """The :class:`Limits` an engine publishes; a field the document lacks (an older engine)
    keeps the fallback's bounds."""
    table = _from_fallback()
    for task, by_name in table.items():
        for name, old in list(by_name.items()):
            found = published(doc, task, name)
            if found:
                by_name[name] = Bounds(found.get("default"), found.get("minimum"), found.get("maximum"))
    schemas = (doc.get("components") or {}).get("schemas") or {}
    max_pixels = (schemas.get(MODELS["generate"]) or {}).get("x-max-pixels")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        max_pixels = FALLBACK_MAX_PIXELS
    return Limits(table, max_pixels, source)


def limits_of(client) -> Limits:
    """The limits of the engine behind ``client`` (its OpenAPI document, fetched once per engine
    URL); the fallback when the engine does not publish one."""
    try:
        doc = client.openapi()
    except Exception:  # noqa: BLE001 - an engine without the document: the engine still validates
        return fallback()
    if not isinstance(doc, Mapping):
        return fallback()
    return limits_from_openapi(doc, f"the engine at {getattr(client, 'url', '?')}")


_CURRENT: Dict[str, Limits] = {}


def current() -> Limits:
    """The limits of the engine the plugin talked to last (the fallback before any)."""
    return _CURRENT.get("limits") or fallback()


def remember(limits: Limits) -> None:
    _CURRENT["limits"] = limits
