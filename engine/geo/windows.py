"""Pixel windows as users and callers give them."""

from __future__ import annotations

from typing import Any, Optional

from rasterio.windows import Window

from ..errors import InvalidRequest


def parse_window(window: Any) -> Optional[Window]:
    """A rasterio ``Window`` from a Window or ``((row_start, row_stop), (col_start, col_stop))`` (px)."""
    if window is None or isinstance(window, Window):
        return window
    try:
        (r0, r1), (c0, c1) = window
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"window {window!r} is not understood; give a rasterio Window or "
            "((row_start, row_stop), (col_start, col_stop)) in pixels"
        ) from None
    return Window.from_slices((int(r0), int(r1)), (int(c0), int(c1)))
