"""Split runs as their users meet them: a rank killed or failing mid-run, rank 0 abandoning the run,
a rerun after that, the progress each rank shows (engine/parallel.py, the CLI's split-run lines).

Real tiles, real partial files and markers in tmp_path; the stand-in model is a plain function."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

import engine.parallel as parallel
import engine.split_sync as split_sync
from engine.errors import Cancelled, RasterError
from engine.geo.tiles import plan_tiles
from engine.parallel import accumulate_partial, tiles_for_rank


def zeros_reader(tile):
    return np.zeros((1, *tile.shape), dtype=np.float32)


def ones(tile, array):
    """A stand-in model: ones over the tile's output window."""
    return np.ones((3, int(tile.out_window.height), int(tile.out_window.width)), dtype=np.float32)


@pytest.fixture
def watch_every_call(monkeypatch):
    """The ranks check the run's state at every tile (1 s apart in a real run)."""
    monkeypatch.setattr(split_sync, "WATCH_INTERVAL_S", 0.0)


def test_a_rank_stops_mid_tiles_when_another_rank_fails(tmp_path, watch_every_call):
    """Rank 0 went on with its whole share of tiles (hours on a big run) after rank 1 had failed or
    been killed with Ctrl-C, and only noticed in the wait after its last tile; now it stops at the
    next tile, naming rank 1 and why."""
    tiles = plan_tiles(600, 600, 64, 16)
    mine = tiles_for_rank(tiles, 0, 2)
    assert len(mine) > 20
    seen = []

    def interrupted(tile, array):
        raise KeyboardInterrupt

    def model(tile, array):
        seen.append(tile.index)
        if len(seen) == 2:  # meanwhile rank 1 is interrupted (its process writes its failure marker)
            with pytest.raises(KeyboardInterrupt):
                accumulate_partial(zeros_reader, interrupted, tiles, bands=3, folder=tmp_path, rank=1,
                                   world_size=2, run_id="k1")
        return ones(tile, array)

    with pytest.raises(Cancelled, match=r"rank 1 was interrupted \(Ctrl-C or SIGTERM\)"):
        accumulate_partial(zeros_reader, model, tiles, bands=3, folder=tmp_path, rank=0, world_size=2,
                           run_id="k1", overlap=False)
    assert len(seen) <= 3, f"rank 0 ran {len(seen)} of its {len(mine)} tiles after rank 1 failed"
    assert (tmp_path / "tiling-k1-rank0.failed").exists()  # in turn, for the ranks still at work


def test_a_rank_stops_mid_tiles_when_rank_0_abandoned_the_run(tmp_path, watch_every_call):
    """Rank 0 killed (SIGTERM) mid-tiles removes the run's folder; rank 1 went on with all its tiles
    and then died on an internal FileNotFoundError (its marker had no folder). Now it stops at the
    next tile with the one-line "abandoned" error."""
    tiles = plan_tiles(600, 600, 64, 16)
    folder = tmp_path / ".diffusionsat-split-x"
    seen = []

    def model(tile, array):
        seen.append(tile.index)
        if len(seen) == 2:
            shutil.rmtree(folder)  # what rank 0 does when it fails or is terminated
        return ones(tile, array)

    for overlap in (False, True):
        seen.clear()
        with pytest.raises(RasterError, match="abandoned"):
            accumulate_partial(zeros_reader, model, tiles, bands=3, folder=folder, rank=1, world_size=2,
                               run_id="k2", overlap=overlap)
        assert len(seen) <= 2 + 2 * overlap, seen  # (the overlapped loop may have a tile or two in flight)


def test_the_last_tile_then_rank_0_gone_is_abandoned_not_an_internal_error(tmp_path):
    """The folder gone between the last tile and the marker (no watch in between) is "abandoned"."""
    tiles = plan_tiles(100, 100, 64, 16)
    folder = tmp_path / "s"
    last = tiles_for_rank(tiles, 1, 2)[-1].index

    def model(tile, array):
        if tile.index == last:
            shutil.rmtree(folder)
        return ones(tile, array)

    with pytest.raises(RasterError, match="abandoned"):
        accumulate_partial(zeros_reader, model, tiles, bands=3, folder=folder, rank=1, world_size=2,
                           run_id="k3", overlap=False)


def test_an_earlier_runs_failure_marker_does_not_stop_a_rerun_mid_tiles(tmp_path, watch_every_call):
    """A failed run leaves rank 1's marker; rank 1 of the rerun removes it when it starts, possibly
    after rank 0 has begun its tiles: rank 0 must not take the old marker for a new failure."""
    tiles = plan_tiles(300, 300, 64, 16)

    def broken(tile, array):
        raise RuntimeError("out of GPU memory")

    with pytest.raises(RuntimeError):
        accumulate_partial(zeros_reader, broken, tiles, bands=3, folder=tmp_path, rank=1, world_size=2,
                           run_id="k4")
    assert (tmp_path / "tiling-k4-rank1.failed").exists()
    stats = accumulate_partial(zeros_reader, ones, tiles, bands=3, folder=tmp_path, rank=0, world_size=2,
                               run_id="k4", overlap=False)
    assert stats.tiles == len(tiles_for_rank(tiles, 0, 2))


def test_a_full_disk_names_the_partial_not_the_failure_marker(tmp_path, monkeypatch):
    """On a full tmpfs both ranks said "no space left ... to write '...rank1.failed'": the failure
    marker, which did not fit either, hid what had filled the disk (the rank's partial result)."""
    import errno

    from engine.errors import DiskFull

    real = split_sync.write_text_atomic

    def full_disk(dest, text, **kw):  # the edge: a disk with no room left for a marker
        if str(dest).endswith(".failed"):
            raise DiskFull(f"no space left to write {dest}")
        return real(dest, text, **kw)

    monkeypatch.setattr(split_sync, "write_text_atomic", full_disk)

    def no_space(tile, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    tiles = plan_tiles(100, 100, 64, 16)
    with pytest.raises(DiskFull, match="rank 1's partial result") as err:
        accumulate_partial(zeros_reader, no_space, tiles, bands=3, folder=tmp_path, rank=1, world_size=2,
                           run_id="d1", overlap=False)
    assert ".failed" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # the partial is removed


def run_rank(tiles, rank, world, folder, run_id, dest, model, outcomes, progress=None):
    """One rank of a split run (its own writers and files, as a process has); its outcome into
    ``outcomes[rank]``: its stats, or the exception it raised."""
    from engine.geo.cog import CogWriter
    from engine.geo.stripes import Stripe, stripe_alignment
    from engine.geo.tiles import output_size
    from rasterio.transform import from_origin

    w, h = output_size(tiles)

    def open_writer(part):
        layout = {"stripe": part} if isinstance(part, Stripe) else {"stripes": part}
        return CogWriter(dest, width=w, height=h, count=3, dtype="float32", crs="EPSG:32633",
                         transform=from_origin(500000.0, 4600000.0, 10.0, 10.0), blocksize=128,
                         overviews=False, **layout)

    try:
        outcomes[rank] = parallel.run_tiled_distributed(
            zeros_reader, model, tiles, bands=3, folder=folder, rank=rank, world_size=world, run_id=run_id,
            open_writer=open_writer, timeout_s=30, align=stripe_alignment(w, h, 128), progress=progress)
    except BaseException as err:  # noqa: BLE001 - the test looks at it
        outcomes[rank] = err


def test_the_same_command_launched_twice_at_once_leaves_the_first_launch_alone(tmp_path, monkeypatch):
    """Both launches of one command have the same run id, so the same folder and files: the second
    truncated the first's partials and removed its markers (both failed on broken stripes, or the
    first wrote a wrong COG). Now the second launch's ranks refuse at once, touching nothing."""
    import threading

    monkeypatch.setattr(split_sync, "LOCK_PATIENCE_S", 0.1)  # (2 s in a real run)
    tiles = plan_tiles(300, 200, 64, 16)
    folder, dest = tmp_path / ".diffusionsat-split-x", tmp_path / "o.tif"
    first, second = [None, None], [None, None]
    rank1 = {t.index for t in tiles_for_rank(tiles, 1, 2)}
    at_work, go_on = [threading.Event(), threading.Event()], threading.Event()

    def slow(tile, array):  # both ranks of the first launch at their tiles, until go_on
        at_work[tile.index in rank1].set()
        go_on.wait(30)
        return ones(tile, array)

    threads = [threading.Thread(target=run_rank, args=(tiles, r, 2, folder, "twice", dest, slow, first))
               for r in range(2)]
    for t in threads:
        t.start()
    assert at_work[0].wait(30) and at_work[1].wait(30)
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    for r in (1, 0):
        run_rank(tiles, r, 2, folder, "twice", dest, ones, second)
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == before  # nothing added, cut or removed
    go_on.set()
    for t in threads:
        t.join(60)
    assert all(isinstance(e, split_sync.SplitRunBusy) for e in second), second
    assert "another launch of this same split run" in str(second[0])
    assert list(folder.iterdir()) == []  # the first launch cleaned up after itself
    assert first[0].tiles == len(tiles) and first[1] is None, first
    from rasterio import open as rio_open

    with rio_open(dest) as ds:
        assert np.array_equal(ds.read(), np.ones((3, 200, 300), dtype=np.float32))


def test_each_rank_shows_its_own_share_and_its_steps_after_the_tiles(tmp_path):
    """Rank 1's progress jumped between the model's reports (tile 10/18: 50 % at its first tile)
    and the tile loop's (tile 1/9: 11 %), and the steps after the tiles (the waits, "wrote rows
    a-b", the publish) never showed in the CLI's lines. Now rank r's fractions grow from 0 in its
    own share and each step is told once, in order."""
    import threading

    from engine.geo.tiles import tile_progress
    from engine.progress import Progress

    tiles = plan_tiles(300, 600, 64, 16)
    seen = {0: [], 1: []}
    said = {0: [], 1: []}
    updates = {r: parallel.split_progress(seen[r].append, said[r].append) for r in (0, 1)}

    def model(tile, array):  # reports its steps as the sampler does: in the whole plan's tiles
        report = tile_progress(updates[threading.current_thread().rank], tile, len(tiles))
        for step in (1, 2):
            report(Progress(step, 2, 0, 1, "denoising"))
        return ones(tile, array)

    outcomes = [None, None]

    def rank_main(r):
        threading.current_thread().rank = r
        run_rank(tiles, r, 2, tmp_path / "s", "p1", tmp_path / "o.tif", model, outcomes, progress=updates[r])

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes[0].tiles == len(tiles), outcomes
    for r in (0, 1):
        fractions = [p.fraction for p in seen[r]]
        assert fractions[0] < 0.2 and fractions[-1] == 1.0, (r, fractions[:3])
        assert all(b >= a for a, b in zip(fractions, fractions[1:])), (r, fractions)
    rows = [s for s in said[1] if s.startswith("wrote rows")]
    assert said[1] == ["waiting for the other ranks' tiles", "merging the ranks' tiles", "merged", *rows] and rows
    assert said[0][-2:] == ["waiting for the other ranks' stripes", "publishing the COG"]


def test_the_wait_for_the_other_ranks_is_set_from_the_environment():
    """WORLD_SIZE=2 with only rank 0 started waited an hour, and the error then said to "give
    merge_partials a longer timeout_s", which no CLI user can do. The wait is now
    $DIFFUSIONSAT_SPLIT_TIMEOUT seconds (an hour unset); a bad value is one line naming the variable."""
    from engine.errors import InvalidRequest

    assert split_sync.split_timeout({}) == 3600.0
    assert split_sync.split_timeout({"DIFFUSIONSAT_SPLIT_TIMEOUT": " 90 "}) == 90.0
    for bad in ("abc", "0", "-5", "inf", "nan"):
        with pytest.raises(InvalidRequest, match="DIFFUSIONSAT_SPLIT_TIMEOUT"):
            split_sync.split_timeout({"DIFFUSIONSAT_SPLIT_TIMEOUT": bad})


def test_a_rank_that_never_started_is_named_with_what_to_do(tmp_path):
    from engine.geo.cog import CogWriter
    from rasterio.transform import from_origin

    tiles = plan_tiles(100, 100, 64, 16)
    accumulate_partial(zeros_reader, ones, tiles, bands=3, folder=tmp_path, rank=0, world_size=2, run_id="t1")
    with pytest.raises(RasterError, match=r"rank\(s\) 1 of 2 did not finish .* within 0.2 s.*"
                                          r"were they started.*DIFFUSIONSAT_SPLIT_TIMEOUT"):
        with CogWriter(tmp_path / "o.tif", width=100, height=100, count=3, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(500000.0, 4600000.0, 10.0, 10.0)) as out:
            parallel.merge_partials(tmp_path, 2, out, run_id="t1", timeout_s=0.2, poll_s=0.05)
    assert not (tmp_path / "o.tif").exists()


def test_rank_0_stopped_in_its_tiles_by_another_rank_cleans_up(tmp_path, watch_every_call):
    """Rank 0 stopped mid-tiles because rank 1 failed (in its tiles, or opening its stripe while
    rank 0 still worked) left every partial, lock and marker behind: its clean-up only covered what
    came after its tiles."""
    import threading

    tiles = plan_tiles(300, 400, 64, 16)
    folder, dest = tmp_path / "s", tmp_path / "o.tif"
    rank1 = {t.index for t in tiles_for_rank(tiles, 1, 2)}
    def model(tile, array):
        if tile.index in rank1:
            raise RuntimeError("out of GPU memory")
        for _ in range(200):  # rank 0 is still at its tiles when rank 1's failure marker appears
            if (folder / "tiling-c1-rank1.failed").exists():
                break
            time.sleep(0.05)
        return ones(tile, array)

    outcomes = [None, None]
    threads = [threading.Thread(target=run_rank, args=(tiles, r, 2, folder, "c1", dest, model, outcomes))
               for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[0], RasterError) and "rank 1 failed" in str(outcomes[0]), outcomes
    assert {p.name for p in folder.iterdir()} <= {"tiling-c1-rank0.failed"} and not dest.exists()


def test_a_rerun_whose_rank_1_starts_late_takes_none_of_a_killed_runs_files(tmp_path):
    """A run killed with SIGKILL leaves rank 1's partial and markers (of another result here: the
    input changed since). In the rerun, rank 1 (slow to load its model) starts after rank 0 has
    finished its tiles: rank 0 took the old ``.done`` and merged the old partial into its rows.
    Now rank 0 removes, at its start, the files of every rank not at work (its lock free)."""
    import threading

    from engine.progress import Progress

    tiles = plan_tiles(300, 400, 64, 16)
    folder, dest = tmp_path / "s", tmp_path / "o.tif"

    def old_model(tile, array):
        return 3 * ones(tile, array)

    accumulate_partial(zeros_reader, old_model, tiles, bands=3, folder=folder, rank=1, world_size=2, run_id="st")
    assert (folder / "tiling-st-rank1.done").exists()
    waiting = threading.Event()

    def rank0_progress(p: Progress) -> None:
        if p.message == "waiting for the other ranks' tiles":
            waiting.set()

    outcomes = [None, None]
    rank0 = threading.Thread(target=run_rank, args=(tiles, 0, 2, folder, "st", dest, ones, outcomes, rank0_progress))
    rank0.start()
    waiting.wait(20)
    time.sleep(0.5)  # rank 0 would have taken the old marker by now
    run_rank(tiles, 1, 2, folder, "st", dest, ones, outcomes)
    rank0.join(60)
    assert outcomes[0].tiles == len(tiles) and outcomes[1] is None, outcomes
    from rasterio import open as rio_open

    with rio_open(dest) as ds:
        assert np.array_equal(ds.read(), np.ones((3, 400, 300), dtype=np.float32))


def test_a_rank_of_this_launch_that_failed_before_rank_0_started_still_stops_rank_0(tmp_path, monkeypatch):
    """Rank 0 clears the files of ranks not at work when it starts; under a launcher that tells
    launches apart (torchrun: TORCHELASTIC_RUN_ID) it keeps those of a rank of its own launch that
    has already failed (out of memory at its first tile, while rank 0 still loaded its model), and
    fails after its tiles instead of waiting an hour for that rank."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    tiles = plan_tiles(300, 400, 64, 16)
    folder, dest = tmp_path / "s", tmp_path / "o.tif"

    def broken(tile, array):
        raise RuntimeError("out of GPU memory")

    outcomes = [None, None]
    run_rank(tiles, 1, 2, folder, "early", dest, broken, outcomes)
    assert isinstance(outcomes[1], RuntimeError)
    run_rank(tiles, 0, 2, folder, "early", dest, ones, outcomes)
    assert isinstance(outcomes[0], RasterError) and "rank 1 failed" in str(outcomes[0]) and "GPU memory" in str(outcomes[0])
    assert not dest.exists()
