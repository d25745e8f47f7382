"""One progress type and one cancellation token for every long loop in the engine.

The CLI turns :class:`Progress` into a progress bar, the server into job state, the QGIS plugin
into a task-manager percentage. Cancellation is cooperative: loops call
:meth:`CancelToken.raise_if_cancelled` once per denoising step (and per tile), so a cancelled job
stops within one step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """Where a job stands. ``fraction`` runs from 0 to 1 over the whole job."""

    step: int  #: denoising steps done in the current tile (0..total_steps)
    total_steps: int
    tile: int = 0  #: tiles finished before the current one
    total_tiles: int = 1
    message: str = ""

    @property
    def fraction(self) -> float:
        per_tile = self.step / self.total_steps if self.total_steps else 1.0
        return min(1.0, (self.tile + per_tile) / max(1, self.total_tiles))


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """A thread-safe flag that a caller sets and a worker polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user; nothing was written")


def report(callback: Optional[ProgressCallback], progress: Progress) -> None:
    """Call ``callback`` if there is one (keeps the loops free of ``if callback`` noise)."""
    if callback is not None:
        callback(progress)
