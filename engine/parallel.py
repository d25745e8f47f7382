"""Split a tiled run over several processes (``accelerate launch``, torchrun, or plain processes).

Every rank takes a contiguous block of tiles (:func:`tiles_for_rank`), accumulates it into its
own partial file in a shared folder (:func:`accumulate_partial`; no two processes ever write one
file), then marks itself done. Once every rank is done, each rank normalises and writes its own
band of output rows, its :class:`~engine.geo.stripes.Stripe` (:func:`plan_stripes`), summing the
partials that reach into it (:func:`merge_partials`), and marks that done too; rank 0 then
publishes the COG from the stripes. Only the COG's compression is left to one process: the merge,
the encoding and the overviews are shared (a whole tile's output is ~2 Gpx, which one process
merged in minutes after the last tile). :func:`run_tiled_distributed` does all of it for a rank.

The ranks keep in step through files in that folder (:mod:`engine.split_sync`: markers, locks,
waits, and a watch that stops every rank within a tile when one failed); rank 0 removes the
run's files at the end, whatever the outcome.

Which rank this process is, how many there are and which device it takes come in a
:class:`RunContext` (:meth:`RunContext.from_env` reads what the launcher set), given by the
caller rather than read deep inside a task. Accumulation itself is :mod:`engine.geo.accumulate`'s.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .atomic import disk_full, is_disk_full, write_text_atomic
from .errors import InvalidRequest, RasterError
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
from .split_sync import (
    MARKERS,
    RunWatch,
    check_run_id,
    clear_stale,
    lock_rank,
    mark_failed,
    part_path,
    remove_partials,
    remove_rank_files,
    wait_for_ranks,
)


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
    check_run_id(run_id)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not tiles:
        raise InvalidRequest("no tiles to run")
    remove_rank_files(folder, run_id, rank, MARKERS)  # its markers of an earlier run of this id (one that failed)
    width, height = output_size(tiles)
    mine = tiles_for_rank(tiles, rank, world_size)
    row0 = min((int(t.out_valid.row_off) for t in mine), default=0)
    row1 = max((int(t.out_valid.row_off + t.out_valid.height) for t in mine), default=0)
    acc_path = part_path(folder, run_id, rank, "acc")
    done = skipped = 0
    try:
        acc = Accumulator(
            acc_path, width=width, bands=bands, row0=row0, nrows=row1 - row0, ring=False, create=True
        )
        try:
            def consume(tile: Tile, contribution: Any, token: Any) -> None:
                add_contribution(acc, tile, contribution)

            watch = RunWatch(cancel, folder, run_id, rank, world_size)
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
        write_text_atomic(part_path(folder, run_id, rank, "done"), json.dumps(header))
    except BaseException as err:
        instead = mark_failed(folder, run_id, rank, err)
        if instead is not None:
            raise instead from None
        if isinstance(err, OSError):
            if is_disk_full(err):
                part_path(folder, run_id, rank, "acc").unlink(missing_ok=True)
                raise disk_full(folder, (row1 - row0) * width * (bands + 1) * ACCUMULATOR_DTYPE.itemsize,
                                f"rank {rank}'s partial result") from None
        raise
    return TilingStats(done, skipped, 0, time.perf_counter() - start)


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
    check_run_id(run_id)
    folder = Path(folder)
    sources: list[Accumulator] = []
    try:
        # this rank's tiles are done (fraction 1: the bar does not jump back); the wait and the merge follow
        report(progress, Progress(1, 1, 0, 1, "waiting for the other ranks' tiles"))
        headers = wait_for_ranks(folder, run_id, world_size, timeout_s, poll_s, cancel)
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
                        part_path(folder, run_id, h["rank"], "acc"),
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
    lock = lock_rank(folder, run_id, rank)  # before this rank touches any file of the run
    try:
        if rank == 0:
            clear_stale(folder, run_id, world_size)
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
        cancel = RunWatch(cancel, folder, run_id, rank, world_size)  # stop when the run is over elsewhere
        try:
            stripe.folder.mkdir(exist_ok=True)
            with open_writer(stripe) as writer:
                merged = merge_partials(
                    folder, world_size, writer, run_id=run_id, rows=(stripe.row0, stripe.row1), scale=scale,
                    offset=offset, timeout_s=timeout_s, cleanup=False, progress=progress, cancel=cancel,
                )
            write_text_atomic(part_path(folder, run_id, rank, "stripe"), json.dumps(
                dict(rank=rank, row0=stripe.row0, row1=stripe.row1, nodata_pixels=merged.nodata_pixels)))
            report(progress, Progress(0, 1, 1, 1, f"wrote rows {stripe.row0}-{stripe.row1}"))
        except BaseException as err:
            instead = mark_failed(folder, run_id, rank, err)
            if instead is not None:
                raise instead from None
            raise
        if rank != 0:
            return None
        report(progress, Progress(1, 1, 0, 1, "waiting for the other ranks' stripes"))
        written = wait_for_ranks(folder, run_id, world_size, timeout_s, 0.2, cancel, marker="stripe")
        report(progress, Progress(1, 1, 0, 1, "publishing the COG"))
        with open_writer(stripes):
            pass
    except BaseException:
        if rank == 0:  # all but its own failure marker, which the other ranks may still wait to see
            remove_partials(folder, run_id, world_size, keep=part_path(folder, run_id, 0, "failed"))
            shutil.rmtree(stripe.folder, ignore_errors=True)
        raise
    remove_partials(folder, run_id, world_size)
    shutil.rmtree(stripe.folder, ignore_errors=True)
    return TilingStats(merged.tiles, merged.skipped_tiles, sum(w["nodata_pixels"] for w in written),
                       merged.seconds + mine.seconds)


__all__ = [
    "PHASES",
    "RunContext",
    "accumulate_partial",
    "merge_partials",
    "phase_of",
    "plan_stripes",
    "run_tiled_distributed",
    "split_progress",
    "split_run_id",
    "tiles_for_rank",
]
