"""One progress type and one cancellation token for every long loop in the engine.

The CLI turns :class:`Progress` into a progress bar, the server into job state, the QGIS plugin
into a task-manager percentage. Cancellation is cooperative: loops call
:meth:`CancelToken.raise_if_cancelled` once per denoising step (and per tile), so a cancelled job
stops within one step.
"""

from __future__ import annotations

import threading
import time
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
    #: generate --gsd's joint steps: ``step`` counts the windows of denoising step ``tile`` + 1 (of
    #: ``total_tiles`` - 1: the decode is the last part), so the job's fraction counts window steps
    windows: bool = False

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


class ProgressLines:
    """Progress as plain lines (step, tile, percent, ETA) for a log file or a pipe, where a bar
    would be noise: the first update, then at most one line every ``interval`` seconds, and the
    end. Call it with :class:`Progress` updates; ``close()`` ends it."""

    def __init__(self, stream, *, label: str = "progress", interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.label = label
        self.interval = interval
        self.clock = clock
        self.started: Optional[float] = None
        self.last_line: Optional[float] = None
        self.written: Optional[Progress] = None  #: the state of the last line
        self.lines = 0

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        if self.started is None:
            self.started = now
        due = self.last_line is None or now - self.last_line >= self.interval
        # The end is always written, once (the tiler's own end reports, 100 % again, add nothing).
        finished = progress.fraction >= 1.0 and (self.written is None or self.written.fraction < 1.0)
        if due or finished:
            self._write(progress, now)

    def _write(self, progress: Progress, now: float) -> None:
        elapsed = now - (self.started if self.started is not None else now)
        fraction = progress.fraction
        # A tiler's report between tiles (step 0 of 1, "tile i/n") has no denoising step to show.
        between_tiles = progress.total_steps == 1 and progress.step == 0 and progress.message not in ("", "denoising")
        parts = [] if between_tiles else [f"step {progress.step}/{progress.total_steps}"]
        if progress.total_tiles > 1:
            parts.insert(0, f"tile {min(progress.tile + 1, progress.total_tiles)}/{progress.total_tiles}")
        if progress.windows:  # "step 1/2, window 13/225", not "tile 1/3, step 13/225"
            steps = max(1, progress.total_tiles - 1)
            parts = [f"step {min(progress.tile + 1, steps)}/{steps}", f"window {progress.step}/{progress.total_steps}"]
        if progress.message == "decoding":  # generate --gsd's last part: VAE tiles, not denoising steps
            parts = [f"decoding {progress.step}/{progress.total_steps}"]
        parts.append(f"{fraction:.0%}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if 0 < fraction < 1:
            parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        print(f"{self.label}: " + ", ".join(parts), file=self.stream, flush=True)
        self.last_line = now
        self.written = progress
        self.lines += 1

    def close(self) -> None:
        """Nothing to undo (lines are complete); kept for symmetry with the bar."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
