"""How the ranks of a split run keep in step: through files in the folder they share.

Every rank writes only its own files there (``tiling-<run id>-rank<r>.<suffix>``, :func:`part_path`):
its partial accumulator (``acc``), its markers (``done``: its tiles are in; ``stripe``: its stripe of
rows is written; ``failed``: it failed, and why) and its lock (``lock``: held while the rank is at
work, so that the same command launched twice at once is refused instead of mixing two runs'
files, :func:`lock_rank`). A rank waits for the others' markers (:func:`wait_for_ranks`, up to
``$DIFFUSIONSAT_SPLIT_TIMEOUT`` seconds, :func:`split_timeout`) and, while it works, looks about once
a second whether another rank failed or rank 0 removed the folder (:class:`RunWatch`), so that a
failure anywhere stops every rank within a tile. Markers of an earlier run of the same id (one
that was killed) are removed before a rank takes any (:func:`clear_stale`). :mod:`engine.parallel`
runs the split run itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .atomic import write_text_atomic
from .errors import Cancelled, DiffusionSatError, InvalidRequest, RasterError
from .progress import CancelToken

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two launches of one command are not told apart
    fcntl = None

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The environment variable that sets how long (seconds) a rank waits for the others (default 3600).
TIMEOUT_ENV = "DIFFUSIONSAT_SPLIT_TIMEOUT"
#: How often (seconds) a rank at work checks whether the run failed elsewhere (a few stat() calls).
WATCH_INTERVAL_S = 1.0
#: How long (seconds) a rank tries for its lock before it takes the run for another launch's.
LOCK_PATIENCE_S = 2.0


def split_timeout(env: Optional[Mapping[str, str]] = None, default: float = 3600.0) -> float:
    """How long a rank of a split run waits for the others' tiles or stripes: ``$DIFFUSIONSAT_SPLIT_TIMEOUT``
    seconds, or ``default`` (an hour: the ranks' shares may take that much longer than one another)."""
    text = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InvalidRequest(f"{TIMEOUT_ENV}={text!r} is no number of seconds > 0; set it e.g. to 7200, or unset it "
                             f"(default {default:g})")
    return value


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InvalidRequest(f"run_id must be 1-64 letters, digits, '-' or '_', got {run_id!r}")
    return run_id


def part_path(folder: Path, run_id: str, rank: int, suffix: str) -> Path:
    return folder / f"tiling-{run_id}-rank{rank}.{suffix}"


#: A rank's markers: its tiles are accumulated, its stripe is written, it failed (the message).
MARKERS = ("done", "stripe", "failed")


class SplitRunBusy(RasterError):
    """Another launch of the same split run (same output, same request) is at work in its folder."""


def lock_rank(folder: Path, run_id: str, rank: int) -> Optional[int]:
    """Hold rank ``rank``'s lock of the run for this process (an open descriptor; the lock goes when
    it is closed or the process ends, however it ends), or raise :class:`SplitRunBusy`.

    The same command launched twice at once has the same run id, so the same folder and files: its
    second launch would truncate the first one's partials and take or remove its markers."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(folder, run_id, rank, patience_s=LOCK_PATIENCE_S)  # rank 0 may hold it a moment (clear_stale)
    if fd not in (False, None):
        with contextlib.suppress(OSError):  # which launch this rank is of (see clear_stale)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _launch_id().encode(), 0)
    if fd is False:
        raise SplitRunBusy(
            f"another launch of this same split run is at work on {str(folder.parent)!r} (its rank {rank} holds "
            f"{str(folder.name)!r}); wait for it to end, or stop it, or give another --out")
    return fd


def _try_lock(folder: Path, run_id: str, rank: int, patience_s: float = 0.0) -> Union[int, None, bool]:
    """Rank ``rank``'s lock of the run: its descriptor, False if another process holds it (for
    ``patience_s`` seconds), None where there are no locks (Windows)."""
    if fcntl is None:
        return None
    fd = os.open(part_path(folder, run_id, rank, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(0.05)


def _launch_id(env: Optional[Mapping[str, str]] = None) -> str:
    """What tells this launch from an earlier one, where the launcher says (torchrun and accelerate:
    ``TORCHELASTIC_RUN_ID``; SLURM: the job and step), else ""."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return "torchelastic:" + env["TORCHELASTIC_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    return ""


def clear_stale(folder: Path, run_id: str, world_size: int) -> None:
    """Rank 0 at its start: remove the partials and markers of every other rank not at work now.

    A rank of this run holds its lock from its start until its stripe is written, which needs rank
    0's tiles: so a rank whose lock is free now has not started yet, and what it has in the folder is
    an earlier run's (killed, e.g. SIGKILL). It would remove it itself when it starts, but maybe
    only after rank 0 took it (a ``.failed`` failing the rerun, or a ``.done`` merged with an old
    partial). The rank's lock is held while its files go, so it cannot start meanwhile. Where the
    launcher tells launches apart (:func:`_launch_id`), the files of a rank of this very launch that
    has already ended (it failed before rank 0 started) stay, so that rank 0 stops at once."""
    launch = _launch_id()
    for r in range(1, world_size):
        fd = _try_lock(folder, run_id, r)
        if fd is False or fd is None:
            continue  # at work (or no locks here: left to the rank itself)
        try:
            if launch and os.pread(fd, 512, 0).decode(errors="replace") == launch:
                continue  # this launch's rank r, ended already
            remove_rank_files(folder, run_id, r)
        finally:
            os.close(fd)


def mark_failed(folder: Path, run_id: str, rank: int, err: BaseException) -> Optional[RasterError]:
    """Say that ``rank`` failed with ``err``, so that no rank waits for it any longer; returns the
    error to raise instead of ``err`` when that was an internal one because the run's folder is gone
    (rank 0 abandoned the run, e.g. a marker had no folder left to go into), else None."""
    # on a full disk even the marker may not fit (DiskFull): the error to report is the first one
    with contextlib.suppress(OSError, DiffusionSatError):
        write_text_atomic(part_path(folder, run_id, rank, "failed"), f"{type(err).__name__}: {err}")
    if not isinstance(err, (DiffusionSatError, KeyboardInterrupt)) and not folder.is_dir():
        return abandoned(folder, run_id)
    return None


def abandoned(folder: Path, run_id: str) -> RasterError:
    return RasterError(f"the split run {run_id} was abandoned (its folder {str(folder)!r} is gone: "
                       "rank 0 failed or was cancelled; see its log); nothing was written")


def _failure(message: str, rank: int) -> BaseException:
    """The error a waiting rank raises on reading rank ``rank``'s failure marker (``message``)."""
    name = message.split(":", 1)[0]
    if name == "Cancelled":
        return Cancelled(f"rank {rank} was cancelled; nothing was written")
    if name in ("KeyboardInterrupt", "_Terminated"):
        return Cancelled(f"rank {rank} was interrupted (Ctrl-C or SIGTERM); nothing was written")
    return RasterError(f"rank {rank} failed ({message}); nothing was written")


def _marker_stamp(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def _check_run(folder: Path, run_id: str, world_size: int, skip: Optional[int] = None,
               ignore: Mapping[int, Any] = {}) -> None:
    """Raise if the run is over for everyone: its folder is gone, or a rank (but ``skip``) failed;
    ``ignore`` maps a rank to the :func:`_marker_stamp` of a failure marker not to take (yet)."""
    if not folder.is_dir():  # rank 0 removes it when the run fails anywhere
        raise abandoned(folder, run_id)
    for r in range(world_size):
        failed = part_path(folder, run_id, r, "failed")
        if r != skip and failed.exists() and (r not in ignore or _marker_stamp(failed) != ignore[r]):
            try:
                message = failed.read_text()
            except OSError:  # removed meanwhile (rank 0 cleaning up): the run is over all the same
                message = "unknown"
            raise _failure(message, r)


class RunWatch(CancelToken):
    """The tile loop's cancel token in a split run: the caller's, and (checked at most every
    ``interval`` seconds) whether another rank failed or rank 0 abandoned the run, so that a
    rank stops within a tile of that instead of finishing its whole share first.

    A failure marker that was already there when the watch began may be an earlier run's (its rank
    removes it when it starts, maybe later than this one): the watch leaves those to the wait after
    the tiles (:func:`wait_for_ranks`), and takes only markers written since."""

    def __init__(self, cancel: Optional[CancelToken], folder: Path, run_id: str, rank: int, world_size: int,
                 interval: Optional[float] = None) -> None:
        super().__init__()
        self.inner, self.folder, self.run_id = cancel, folder, run_id
        self.rank, self.world_size = rank, world_size
        self.interval = WATCH_INTERVAL_S if interval is None else interval
        self._next = time.monotonic() + self.interval
        self._old = {r: _marker_stamp(part_path(folder, run_id, r, "failed")) for r in range(world_size)}

    def cancel(self) -> None:
        if self.inner is not None:
            self.inner.cancel()
        super().cancel()

    @property
    def cancelled(self) -> bool:
        return super().cancelled or (self.inner is not None and self.inner.cancelled)

    def raise_if_cancelled(self) -> None:
        if self.inner is not None:
            self.inner.raise_if_cancelled()
        super().raise_if_cancelled()
        now = time.monotonic()
        if now >= self._next:  # a few stat() calls a second at most, whatever the tile rate
            self._next = now + self.interval
            self.check()

    def check(self) -> None:
        """Raise now if the run is over elsewhere (see the class)."""
        _check_run(self.folder, self.run_id, self.world_size, skip=self.rank, ignore=self._old)


def wait_for_ranks(
    folder: Path, run_id: str, world_size: int, timeout_s: float, poll_s: float, cancel: Optional[CancelToken],
    marker: str = "done",
) -> list[dict]:
    """The ``marker`` headers of ranks ``0..world_size-1``, once all are there; a rank's ``failed``
    marker stops the wait at once."""
    what = "tiles" if marker == "done" else "stripes"
    deadline = time.monotonic() + timeout_s
    while True:
        if cancel is not None:
            cancel.raise_if_cancelled()
        _check_run(folder, run_id, world_size)
        missing = [r for r in range(world_size) if not part_path(folder, run_id, r, marker).exists()]
        if not missing:
            return [json.loads(part_path(folder, run_id, r, marker).read_text()) for r in range(world_size)]
        if time.monotonic() >= deadline:
            raise RasterError(
                f"rank(s) {', '.join(map(str, missing))} of {world_size} did not finish their {what} "
                f"within {timeout_s:g} s (no marker in {str(folder)!r}, run {run_id}): were they started, "
                f"and are they alive? Check their logs; {TIMEOUT_ENV}=<seconds> sets this wait"
            )
        time.sleep(poll_s)


def remove_rank_files(folder: Union[str, os.PathLike], run_id: str, rank: int,
                      suffixes: Sequence[str] = ("acc", *MARKERS), keep: Optional[Path] = None) -> None:
    """Remove rank ``rank``'s files of the run with these ``suffixes`` (what is there of them), but ``keep``."""
    for suffix in suffixes:
        path = part_path(Path(folder), run_id, rank, suffix)
        if path != keep:
            path.unlink(missing_ok=True)


def remove_partials(folder: Union[str, os.PathLike], run_id: str, world_size: int,
                    keep: Optional[Path] = None) -> None:
    """Remove a split run's partials, markers and locks (what is there of them), but ``keep``."""
    for r in range(world_size):
        remove_rank_files(folder, run_id, r, ("acc", "lock", *MARKERS), keep)


__all__ = [
    "MARKERS",
    "RunWatch",
    "SplitRunBusy",
    "abandoned",
    "check_run_id",
    "clear_stale",
    "lock_rank",
    "mark_failed",
    "part_path",
    "remove_partials",
    "remove_rank_files",
    "split_timeout",
    "wait_for_ranks",
]
