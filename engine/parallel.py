"""Split a tiled run over several processes (``accelerate launch``, torchrun, or plain processes).

Every rank takes a contiguous block of tiles (:func:`tiles_for_rank`), accumulates it into its
own partial file in a shared folder (:func:`accumulate_partial`; no two processes ever write one
file), then marks itself done; rank 0 waits for the markers and merges the partials into one COG
(:func:`merge_partials`). :func:`run_tiled_distributed` does both steps for a rank.

Which rank this process is, how many there are and which device it takes come in a
:class:`RunContext` (:meth:`RunContext.from_env` reads what the launcher set), given by the
caller rather than read deep inside a task. Accumulation itself is :mod:`engine.geo.accumulate`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .atomic import disk_full, is_disk_full, write_text_atomic
from .errors import Cancelled, InvalidRequest, RasterError
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
from .geo.tiles import Tile, output_size, row_major
from .progress import CancelToken, Progress, ProgressCallback, report

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


def tiles_for_rank(tiles: Sequence[Tile], rank: int, world_size: int) -> list[Tile]:
    """Rank ``rank``'s share of ``tiles``: a contiguous row-major block, sizes differing by <= 1.

    Contiguous blocks (not round-robin) keep each rank's partial accumulator to a band of rows.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidRequest(f"rank {rank} is not in 0..{world_size - 1}")
    ordered = row_major(tiles)
    n = len(ordered)
    return ordered[rank * n // world_size : (rank + 1) * n // world_size]


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

            skipped = tile_loop(read_fn, process_fn, mine, consume, bands=bands, fill_nodata=fill_nodata,
                                batch_size=batch_size, cancel=cancel, progress=progress,
                                label=f"rank {rank}: ", overlap=overlap)
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
        write_text_atomic(_part(folder, run_id, rank, "done"), json.dumps(header))
    except BaseException as err:
        with contextlib.suppress(OSError):  # on a full disk even the marker may not fit
            write_text_atomic(_part(folder, run_id, rank, "failed"), f"{type(err).__name__}: {err}")
        if isinstance(err, OSError):
            if is_disk_full(err):
                _part(folder, run_id, rank, "acc").unlink(missing_ok=True)
                raise disk_full(folder, (row1 - row0) * width * (bands + 1) * ACCUMULATOR_DTYPE.itemsize,
                                f"rank {rank}'s partial result") from None
        raise
    return TilingStats(done, skipped, 0, time.perf_counter() - start)


def _wait_for_ranks(
    folder: Path, run_id: str, world_size: int, timeout_s: float, poll_s: float, cancel: Optional[CancelToken]
) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        if cancel is not None:
            cancel.raise_if_cancelled()
        for r in range(world_size):
            failed = _part(folder, run_id, r, "failed")
            if failed.exists():
                message = failed.read_text()
                if message.startswith("Cancelled"):
                    raise Cancelled(f"rank {r} was cancelled; nothing was written")
                raise RasterError(f"rank {r} failed while tiling ({message}); nothing was written")
        missing = [r for r in range(world_size) if not _part(folder, run_id, r, "done").exists()]
        if not missing:
            return [json.loads(_part(folder, run_id, r, "done").read_text()) for r in range(world_size)]
        if time.monotonic() >= deadline:
            raise RasterError(
                f"rank(s) {', '.join(map(str, missing))} of {world_size} did not finish their tiles "
                f"within {timeout_s:g} s (no marker in {str(folder)!r}, run {run_id}); check those "
                "processes' logs, or give merge_partials a longer timeout_s"
            )
        time.sleep(poll_s)


def merge_partials(
    folder: Union[str, os.PathLike],
    world_size: int,
    writer: Any,
    *,
    run_id: str,
    scale: Optional[float] = None,
    offset: float = 0.0,
    timeout_s: float = 3600.0,
    poll_s: float = 0.2,
    cleanup: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> TilingStats:
    """On rank 0: wait for every rank's marker, sum the partials, normalise and write ``writer``.

    Waits up to ``timeout_s`` seconds (polling every ``poll_s``) for the ``.done`` markers of
    ranks ``0..world_size-1``; a ``.failed`` marker stops the wait at once. ``cleanup`` removes
    this run's partial files afterwards, whatever the outcome. ``scale``/``offset`` as in
    :func:`~engine.geo.accumulate.run_tiled`.

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
        enc = encoding(writer, scale, offset)
        for h in headers:
            if h["nrows"] > 0:
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
        nodata_px = flush(sources, 0, height, width, bands, writer, enc, cancel, False)
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
            for r in range(world_size):
                for suffix in ("acc", "done", "failed"):
                    _part(folder, run_id, r, suffix).unlink(missing_ok=True)


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
    open_writer: Callable[[], Any],
    scale: Optional[float] = None,
    offset: float = 0.0,
    fill_nodata: bool = True,
    timeout_s: float = 3600.0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    batch_size: int = 1,
    overlap: bool = True,
) -> Optional[TilingStats]:
    """One rank's part of a split run: accumulate its tiles; rank 0 then merges and writes.

    ``open_writer()`` is called on rank 0 only and must return a not-yet-entered
    :class:`~engine.geo.cog.CogWriter`; the COG appears at its destination when the merge
    succeeds, and nothing does otherwise. Returns the merge's stats on rank 0, None elsewhere.
    With ``world_size == 1`` this is :func:`~engine.geo.accumulate.run_tiled` through one partial file.
    """
    mine = accumulate_partial(
        read_fn,
        process_fn,
        tiles,
        bands=bands,
        folder=folder,
        rank=rank,
        world_size=world_size,
        run_id=run_id,
        fill_nodata=fill_nodata,
        progress=progress,
        cancel=cancel,
        batch_size=batch_size,
        overlap=overlap,
    )
    if rank != 0:
        return None
    with open_writer() as writer:
        stats = merge_partials(
            folder,
            world_size,
            writer,
            run_id=run_id,
            scale=scale,
            offset=offset,
            timeout_s=timeout_s,
            progress=progress,
            cancel=cancel,
        )
    return TilingStats(stats.tiles, stats.skipped_tiles, stats.nodata_pixels, stats.seconds + mine.seconds)


__all__ = [
    "RunContext",
    "accumulate_partial",
    "merge_partials",
    "run_tiled_distributed",
    "split_run_id",
    "tiles_for_rank",
]
