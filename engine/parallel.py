"""Split a tiled run over several processes (``accelerate launch``, torchrun, or plain processes).

Every rank takes a contiguous block of tiles (:func:`tiles_for_rank`), accumulates it into its
own partial file in a shared folder (:func:`accumulate_partial`; no two processes ever write one
file), then marks itself done. Once every rank is done, each rank normalises and writes its own
band of output rows, its :class:`~engine.geo.stripes.Stripe` (:func:`plan_stripes`), summing the
partials that reach into it (:func:`merge_partials`), and marks that done too; rank 0 then
publishes the COG from the stripes. Only the COG's compression is left to one process: the merge,
the encoding and the overviews are shared (a whole tile's output is ~2 Gpx, which one process
merged in minutes after the last tile). :func:`run_tiled_distributed` does all of it for a rank.

A rank removes its own markers of an earlier run of the same id before it starts (a run that
failed leaves some), so a rerun never takes a stale marker of its own; rank 0 removes the whole
run's files at the end, whatever the outcome.

Which rank this process is, how many there are and which device it takes come in a
:class:`RunContext` (:meth:`RunContext.from_env` reads what the launcher set), given by the
caller rather than read deep inside a task. Accumulation itself is :mod:`engine.geo.accumulate`'s.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .atomic import disk_full, is_disk_full, write_text_atomic
from .errors import Cancelled, DiffusionSatError, InvalidRequest, RasterError
from .geo.accumulate import (
    ACCUMULATOR_DTYPE,
    Accumulator,
    ProcessFn,
    ReadFn,
    TilingStats,
    add_contribution,
    check_writer,
    encoding,
    flush,
    tile_loop,
)
from .geo.stripes import Stripe, stripe_alignment
from .geo.tiles import Tile, output_size, row_major
from .progress import CancelToken, Progress, ProgressCallback, report

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


@dataclass(frozen=True)
class RunContext:
    """Where this process stands in a run: its rank, the number of processes, its device."""

    rank: int = 0  #: this process, 0..world_size-1 (rank 0 merges and writes)
    world_size: int = 1  #: processes sharing the run's tiles
    device: str = "auto"  #: the device this process runs the model on

    @property
    def distributed(self) -> bool:
        """True when the tiles are split over more than one process."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto", env: Optional[Mapping[str, str]] = None) -> "RunContext":
        """The context a launcher (accelerate, torchrun) set in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

        Without a launcher (or with unreadable values) a single process, rank 0 of 1. Under a
        multi-process launch with ``device="auto"`` and CUDA present, each process takes its own
        GPU: ``cuda:<LOCAL_RANK mod GPU count>``; any other device is kept as given.
        """
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
        except ValueError:
            rank, world = 0, 1
        if world <= 1:
            rank, world = 0, 1
        if device == "auto" and world > 1:
            import torch  # noqa: PLC0415 -- only a multi-process launch asks which GPU is whose

            if torch.cuda.is_available():
                device = f"cuda:{int(env.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
        return cls(rank, world, device)


#: The messages of a split run's steps after the tiles (the progress reports them at fraction 1).
PHASES = ("waiting for the other ranks' tiles", "merging the ranks' tiles", "merged", "wrote rows",
          "waiting for the other ranks' stripes", "publishing the COG")


def phase_of(progress: Progress) -> Optional[str]:
    """The split-run step that ``progress`` reports (one of :data:`PHASES`, rows included), or None."""
    message = progress.message or ""
    return message if message.startswith(PHASES) else None


#: In a split run's tile loop (this thread): the model's job-wide progress reports in this rank's share.
_SHARE: contextvars.ContextVar[Optional[Callable[[Progress], Progress]]] = contextvars.ContextVar(
    "diffusionsat_rank_share", default=None)


def _share_of(tiles: Sequence[Tile], mine: Sequence[Tile], label: str) -> Callable[[Progress], Progress]:
    """The model's per-step reports count the whole plan's tiles (``tile i/len(tiles)``, times the
    samples of ``--spread``), the tile loop's this rank's: a report of the whole plan becomes one of
    this rank's share (``tile - first`` of ``len(mine)``)."""
    first, n_all, n = min((t.index for t in mine), default=0), len(tiles), len(mine)

    def share(p: Progress) -> Progress:
        if n and n != n_all and p.total_tiles and p.total_tiles % n_all == 0 and not (p.message or "").startswith(label):
            s = p.total_tiles // n_all  # samples per tile (--spread)
            return Progress(p.step, p.total_steps, max(0, p.tile - first * s), n * s, p.message, p.windows)
        return p

    return share


def split_progress(progress: ProgressCallback, say: Optional[Callable[[str], None]] = None) -> ProgressCallback:
    """A split run's rank's view of ``progress`` (the CLI's bar or lines): the model's reports in its
    share of the tiles (they counted the whole plan's, so that rank 1 of 2 jumped from 50 % to
    11 %), and each step after the tiles (:data:`PHASES`: the waits, "wrote rows a-b", the publish)
    told once to ``say`` (a line), where a bar or lines at 100 % showed nothing of them."""
    told: list[str] = []

    def inner(p: Progress) -> None:
        share = _SHARE.get()
        phase = phase_of(p)
        if phase is not None and say is not None and (not told or told[-1] != phase):
            told.append(phase)
            say(phase)
        progress(share(p) if share is not None else p)

    return inner


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


def tiles_for_rank(tiles: Sequence[Tile], rank: int, world_size: int) -> list[Tile]:
    """Rank ``rank``'s share of ``tiles``: a contiguous row-major block, sizes differing by <= 1.

    Contiguous blocks (not round-robin) keep each rank's partial accumulator to a band of rows.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidRequest(f"rank {rank} is not in 0..{world_size - 1}")
    ordered = row_major(tiles)
    n = len(ordered)
    return ordered[rank * n // world_size : (rank + 1) * n // world_size]


def plan_stripes(tiles: Sequence[Tile], world_size: int, folder: Union[str, os.PathLike],
                 align: Optional[int] = None) -> list[Stripe]:
    """Every rank's band of output rows to merge and write (their files in ``folder``), rank order,
    together the whole output.

    Stripe ``r`` starts where rank ``r``'s tiles start (rounded to a multiple of ``align``,
    default :func:`~engine.geo.stripes.stripe_alignment` of the output), so a rank mostly reads its own
    partial; a stripe may be empty (an output of fewer rows than ranks x ``align``).
    """
    width, height = output_size(tiles)
    align = align or stripe_alignment(width, height)
    starts = [0]
    for r in range(1, world_size):
        mine = tiles_for_rank(tiles, r, world_size)
        first = min((int(t.out_valid.row_off) for t in mine), default=height)
        starts.append(min(height, max(starts[-1], align * round(first / align))))
    starts.append(height)
    return [Stripe(Path(folder), r, starts[r], starts[r + 1]) for r in range(world_size)]


def split_run_id(out: Union[str, os.PathLike], key: str = "") -> str:
    """The run id every rank of one split run derives alike, without talking to the others: a
    hash of the output's absolute path and ``key`` (what makes the run distinct, e.g. the request)."""
    return hashlib.sha256(f"{Path(out).resolve()}|{key}".encode()).hexdigest()[:32]


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InvalidRequest(f"run_id must be 1-64 letters, digits, '-' or '_', got {run_id!r}")
    return run_id


def _part(folder: Path, run_id: str, rank: int, suffix: str) -> Path:
    return folder / f"tiling-{run_id}-rank{rank}.{suffix}"


#: A rank's markers: its tiles are accumulated, its stripe is written, it failed (the message).
_MARKERS = ("done", "stripe", "failed")


class SplitRunBusy(RasterError):
    """Another launch of the same split run (same output, same request) is at work in its folder."""


def _lock_rank(folder: Path, run_id: str, rank: int) -> Optional[int]:
    """Hold rank ``rank``'s lock of the run for this process (an open descriptor; the lock goes when
    it is closed or the process ends, however it ends), or raise :class:`SplitRunBusy`.

    The same command launched twice at once has the same run id, so the same folder and files: its
    second launch would truncate the first one's partials and take or remove its markers."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(folder, run_id, rank, patience_s=LOCK_PATIENCE_S)  # rank 0 may hold it a moment (_clear_stale)
    if fd not in (False, None):
        with contextlib.suppress(OSError):  # which launch this rank is of (see _clear_stale)
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
    fd = os.open(_part(folder, run_id, rank, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
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


def _clear_stale(folder: Path, run_id: str, world_size: int) -> None:
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
            for suffix in ("acc", *_MARKERS):
                _part(folder, run_id, r, suffix).unlink(missing_ok=True)
        finally:
            os.close(fd)


def _mark_failed(folder: Path, run_id: str, rank: int, err: BaseException) -> None:
    """Say that ``rank`` failed, so that no rank waits for it any longer."""
    # on a full disk even the marker may not fit (DiskFull): the error to report is the first one
    with contextlib.suppress(OSError, DiffusionSatError):
        write_text_atomic(_part(folder, run_id, rank, "failed"), f"{type(err).__name__}: {err}")


def accumulate_partial(
    read_fn: ReadFn,
    process_fn: ProcessFn,
    tiles: Sequence[Tile],
    *,
    bands: int,
    folder: Union[str, os.PathLike],
    rank: int,
    world_size: int,
    run_id: str,
    fill_nodata: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    batch_size: int = 1,
    overlap: bool = True,
) -> TilingStats:
    """Accumulate this rank's share of ``tiles`` (the whole plan) into its own partial files.

    Writes ``tiling-<run_id>-rank<rank>.acc`` (weighted sums over this rank's band of output
    rows) into ``folder``, which every rank can reach, then the marker ``...rank<rank>.done``
    (a JSON header). On failure it writes ``...rank<rank>.failed`` with the message, so rank 0
    stops waiting at once, and re-raises. ``bands`` is the number of bands ``process_fn``
    returns. The tiles go through :func:`~engine.geo.accumulate.tile_loop` (reading ahead and
    adding behind the model unless ``overlap`` is False). See
    :func:`~engine.geo.accumulate.run_tiled` for the other arguments.
    """
    start = time.perf_counter()
    _check_run_id(run_id)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not tiles:
        raise InvalidRequest("no tiles to run")
    for suffix in _MARKERS:  # this rank's markers of an earlier run of this id (one that failed)
        _part(folder, run_id, rank, suffix).unlink(missing_ok=True)
    width, height = output_size(tiles)
    mine = tiles_for_rank(tiles, rank, world_size)
    row0 = min((int(t.out_valid.row_off) for t in mine), default=0)
    row1 = max((int(t.out_valid.row_off + t.out_valid.height) for t in mine), default=0)
    acc_path = _part(folder, run_id, rank, "acc")
    done = skipped = 0
    try:
        acc = Accumulator(
            acc_path, width=width, bands=bands, row0=row0, nrows=row1 - row0, ring=False, create=True
        )
        try:
            def consume(tile: Tile, contribution: Any, token: Any) -> None:
                add_contribution(acc, tile, contribution)

            watch = _RunWatch(cancel, folder, run_id, rank, world_size)
            label = f"rank {rank}: "
            token = _SHARE.set(_share_of(tiles, mine, label))  # the model reports from this thread
            try:
                skipped = tile_loop(read_fn, process_fn, mine, consume, bands=bands, fill_nodata=fill_nodata,
                                    batch_size=batch_size, cancel=watch, progress=progress, label=label,
                                    overlap=overlap)
            finally:
                _SHARE.reset(token)
            done = len(mine) - skipped
            acc.sync()  # the data must be on disk before the marker says so (shared file systems)
        finally:
            acc.close()
        header = dict(
            format=1,
            run_id=run_id,
            rank=rank,
            world_size=world_size,
            width=width,
            height=height,
            bands=bands,
            row0=row0,
            nrows=row1 - row0,
            dtype=ACCUMULATOR_DTYPE.name,
            tiles=done,
            skipped_tiles=skipped,
        )
        watch.check()
        write_text_atomic(_part(folder, run_id, rank, "done"), json.dumps(header))
    except BaseException as err:
        _mark_failed(folder, run_id, rank, err)
        if not isinstance(err, (DiffusionSatError, KeyboardInterrupt)) and not folder.is_dir():
            raise _abandoned(folder, run_id) from None  # e.g. the marker had no folder left to go into
        if isinstance(err, OSError):
            if is_disk_full(err):
                _part(folder, run_id, rank, "acc").unlink(missing_ok=True)
                raise disk_full(folder, (row1 - row0) * width * (bands + 1) * ACCUMULATOR_DTYPE.itemsize,
                                f"rank {rank}'s partial result") from None
        raise
    return TilingStats(done, skipped, 0, time.perf_counter() - start)


def _abandoned(folder: Path, run_id: str) -> RasterError:
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
        raise _abandoned(folder, run_id)
    for r in range(world_size):
        failed = _part(folder, run_id, r, "failed")
        if r != skip and failed.exists() and (r not in ignore or _marker_stamp(failed) != ignore[r]):
            try:
                message = failed.read_text()
            except OSError:  # removed meanwhile (rank 0 cleaning up): the run is over all the same
                message = "unknown"
            raise _failure(message, r)


class _RunWatch(CancelToken):
    """The tile loop's cancel token in a split run: the caller's, and (checked at most every
    ``interval`` seconds) whether another rank failed or rank 0 abandoned the run, so that a
    rank stops within a tile of that instead of finishing its whole share first.

    A failure marker that was already there when the watch began may be an earlier run's (its rank
    removes it when it starts, maybe later than this one): the watch leaves those to the wait after
    the tiles (:func:`_wait_for_ranks`), and takes only markers written since."""

    def __init__(self, cancel: Optional[CancelToken], folder: Path, run_id: str, rank: int, world_size: int,
                 interval: Optional[float] = None) -> None:
        super().__init__()
        self.inner, self.folder, self.run_id = cancel, folder, run_id
        self.rank, self.world_size = rank, world_size
        self.interval = WATCH_INTERVAL_S if interval is None else interval
        self._next = time.monotonic() + self.interval
        self._old = {r: _marker_stamp(_part(folder, run_id, r, "failed")) for r in range(world_size)}

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


def _wait_for_ranks(
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
        missing = [r for r in range(world_size) if not _part(folder, run_id, r, marker).exists()]
        if not missing:
            return [json.loads(_part(folder, run_id, r, marker).read_text()) for r in range(world_size)]
        if time.monotonic() >= deadline:
            raise RasterError(
                f"rank(s) {', '.join(map(str, missing))} of {world_size} did not finish their {what} "
                f"within {timeout_s:g} s (no marker in {str(folder)!r}, run {run_id}): were they started, "
                f"and are they alive? Check their logs; {TIMEOUT_ENV}=<seconds> sets this wait"
            )
        time.sleep(poll_s)


def merge_partials(
    folder: Union[str, os.PathLike],
    world_size: int,
    writer: Any,
    *,
    run_id: str,
    rows: Optional[tuple[int, int]] = None,
    scale: Optional[float] = None,
    offset: float = 0.0,
    timeout_s: float = 3600.0,
    poll_s: float = 0.2,
    cleanup: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> TilingStats:
    """Wait for every rank's marker, sum the partials over ``rows``, normalise and write ``writer``.

    ``rows`` (first, end) is the band of output rows to write (default: all of them, into a writer
    of the whole output); only the partials that reach into it are read. Waits up to ``timeout_s``
    seconds (polling every ``poll_s``) for the ``.done`` markers of ranks ``0..world_size-1``; a
    ``.failed`` marker stops the wait at once. ``cleanup`` removes this run's partial files
    afterwards, whatever the outcome (a split run's ranks leave that to rank 0, at the very end).
    ``scale``/``offset`` as in :func:`~engine.geo.accumulate.run_tiled`.

    Raises:
        RasterError: a rank failed, did not finish in time, or the partials disagree in size.
        Cancelled: ``cancel`` was set, or a rank was cancelled.
    """
    start = time.perf_counter()
    _check_run_id(run_id)
    folder = Path(folder)
    sources: list[Accumulator] = []
    try:
        # this rank's tiles are done (fraction 1: the bar does not jump back); the wait and the merge follow
        report(progress, Progress(1, 1, 0, 1, "waiting for the other ranks' tiles"))
        headers = _wait_for_ranks(folder, run_id, world_size, timeout_s, poll_s, cancel)
        shapes = {(h["width"], h["height"], h["bands"], h["dtype"]) for h in headers}
        if len(shapes) != 1:
            raise RasterError(f"the ranks' partial results disagree in size: {sorted(shapes)}")
        width, height, bands, dtype = shapes.pop()
        if dtype != ACCUMULATOR_DTYPE.name:
            raise RasterError(f"partials hold {dtype}, this engine reads {ACCUMULATOR_DTYPE.name}")
        if check_writer(writer, width, height) != bands:
            raise InvalidRequest(f"the output has {writer.profile['count']} bands, the partials {bands}")
        y0, y1 = (0, height) if rows is None else rows
        enc = encoding(writer, scale, offset)
        for h in headers:
            if h["nrows"] > 0 and h["row0"] < y1 and h["row0"] + h["nrows"] > y0:
                sources.append(
                    Accumulator(
                        _part(folder, run_id, h["rank"], "acc"),
                        width=width,
                        bands=bands,
                        row0=h["row0"],
                        nrows=h["nrows"],
                        ring=False,
                        create=False,
                    )
                )
        report(progress, Progress(1, 1, 0, 1, "merging the ranks' tiles"))
        nodata_px = flush(sources, y0, y1, width, bands, writer, enc, cancel, False)
        report(progress, Progress(0, 1, 1, 1, "merged"))
        return TilingStats(
            sum(h["tiles"] for h in headers),
            sum(h["skipped_tiles"] for h in headers),
            nodata_px,
            time.perf_counter() - start,
        )
    finally:
        for src in sources:
            src.close()
        if cleanup:
            remove_partials(folder, run_id, world_size)


def remove_partials(folder: Union[str, os.PathLike], run_id: str, world_size: int,
                    keep: Optional[Path] = None) -> None:
    """Remove a split run's partials and markers (what is there of them), but ``keep``."""
    for r in range(world_size):
        for suffix in ("acc", "lock", *_MARKERS):
            path = _part(Path(folder), run_id, r, suffix)
            if path != keep:
                path.unlink(missing_ok=True)


def run_tiled_distributed(
    read_fn: ReadFn,
    process_fn: ProcessFn,
    tiles: Sequence[Tile],
    *,
    bands: int,
    folder: Union[str, os.PathLike],
    rank: int,
    world_size: int,
    run_id: str,
    open_writer: Callable[[Union[Stripe, Sequence[Stripe]]], Any],
    scale: Optional[float] = None,
    offset: float = 0.0,
    fill_nodata: bool = True,
    timeout_s: float = 3600.0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    batch_size: int = 1,
    overlap: bool = True,
    align: Optional[int] = None,
) -> Optional[TilingStats]:
    """One rank's part of a split run: accumulate its tiles, merge and write its stripe; rank 0
    then publishes the COG from every rank's stripe.

    ``open_writer(stripe)`` must return a not-yet-entered :class:`~engine.geo.cog.CogWriter` of that
    :class:`~engine.geo.stripes.Stripe` of the output (``CogWriter(..., stripe=stripe)``), and
    ``open_writer(stripes)`` (rank 0 only, a list) the one that publishes the output from them
    (``stripes=stripes``); ``align`` is the stripes' row multiple (:func:`plan_stripes`). The COG
    appears at its destination when every rank succeeded, and nothing does otherwise. Returns the
    run's stats on rank 0, None elsewhere.
    """
    folder = Path(folder)
    lock = _lock_rank(folder, run_id, rank)  # before this rank touches any file of the run
    try:
        if rank == 0:
            _clear_stale(folder, run_id, world_size)
        return _run_rank(read_fn, process_fn, tiles, bands=bands, folder=folder, rank=rank, world_size=world_size,
                         run_id=run_id, open_writer=open_writer, scale=scale, offset=offset, fill_nodata=fill_nodata,
                         timeout_s=timeout_s, progress=progress, cancel=cancel, batch_size=batch_size,
                         overlap=overlap, align=align)
    finally:
        if lock is not None:
            os.close(lock)


def _run_rank(read_fn, process_fn, tiles, *, bands, folder, rank, world_size, run_id, open_writer, scale, offset,
              fill_nodata, timeout_s, progress, cancel, batch_size, overlap, align) -> Optional[TilingStats]:
    """:func:`run_tiled_distributed` once this rank holds its lock."""
    stripes = plan_stripes(tiles, world_size, folder / f"tiling-{run_id}-stripes", align)
    stripe = stripes[rank]
    try:
        # (inside the clean-up: rank 0 may stop in its tiles because another rank failed)
        mine = accumulate_partial(
            read_fn, process_fn, tiles, bands=bands, folder=folder, rank=rank, world_size=world_size,
            run_id=run_id, fill_nodata=fill_nodata, progress=progress, cancel=cancel, batch_size=batch_size,
            overlap=overlap,
        )
        cancel = _RunWatch(cancel, folder, run_id, rank, world_size)  # stop when the run is over elsewhere
        try:
            stripe.folder.mkdir(exist_ok=True)
            with open_writer(stripe) as writer:
                merged = merge_partials(
                    folder, world_size, writer, run_id=run_id, rows=(stripe.row0, stripe.row1), scale=scale,
                    offset=offset, timeout_s=timeout_s, cleanup=False, progress=progress, cancel=cancel,
                )
            write_text_atomic(_part(folder, run_id, rank, "stripe"), json.dumps(
                dict(rank=rank, row0=stripe.row0, row1=stripe.row1, nodata_pixels=merged.nodata_pixels)))
            report(progress, Progress(0, 1, 1, 1, f"wrote rows {stripe.row0}-{stripe.row1}"))
        except BaseException as err:
            _mark_failed(folder, run_id, rank, err)
            if not isinstance(err, (DiffusionSatError, KeyboardInterrupt)) and not folder.is_dir():
                raise _abandoned(folder, run_id) from None  # e.g. the stripe's marker had no folder left
            raise
        if rank != 0:
            return None
        report(progress, Progress(1, 1, 0, 1, "waiting for the other ranks' stripes"))
        written = _wait_for_ranks(folder, run_id, world_size, timeout_s, 0.2, cancel, marker="stripe")
        report(progress, Progress(1, 1, 0, 1, "publishing the COG"))
        with open_writer(stripes):
            pass
    except BaseException:
        if rank == 0:  # all but its own failure marker, which the other ranks may still wait to see
            remove_partials(folder, run_id, world_size, keep=_part(folder, run_id, 0, "failed"))
            shutil.rmtree(stripe.folder, ignore_errors=True)
        raise
    remove_partials(folder, run_id, world_size)
    shutil.rmtree(stripe.folder, ignore_errors=True)
    return TilingStats(merged.tiles, merged.skipped_tiles, sum(w["nodata_pixels"] for w in written),
                       merged.seconds + mine.seconds)


__all__ = [
    "PHASES",
    "RunContext",
    "SplitRunBusy",
    "accumulate_partial",
    "merge_partials",
    "phase_of",
    "plan_stripes",
    "remove_partials",
    "run_tiled_distributed",
    "split_progress",
    "split_run_id",
    "split_timeout",
    "tiles_for_rank",
]
