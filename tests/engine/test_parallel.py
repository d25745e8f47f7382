"""The run context of a split run (engine/parallel.py): rank, world size and device from the launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.parallel import RunContext, split_run_id


def test_no_launcher_is_one_process():
    assert RunContext.from_env(env={}) == RunContext(0, 1, "auto")
    assert not RunContext.from_env(env={}).distributed


def test_launcher_rank_and_world_size():
    ctx = RunContext.from_env("cpu", env={"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert ctx == RunContext(2, 4, "cpu") and ctx.distributed


@pytest.mark.parametrize("env", [{"RANK": "3", "WORLD_SIZE": "1"}, {"RANK": "x", "WORLD_SIZE": "4"},
                                 {"WORLD_SIZE": "four"}])
def test_a_single_or_unreadable_launch_is_rank_0_of_1(env):
    assert RunContext.from_env("cpu", env=env) == RunContext(0, 1, "cpu")


def test_auto_device_without_cuda_stays_auto():
    torch = pytest.importorskip("torch")
    ctx = RunContext.from_env("auto", env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert ctx.device == ("cuda:%d" % (1 % torch.cuda.device_count()) if torch.cuda.is_available() else "auto")


def test_split_run_id_is_shared_and_distinct(tmp_path):
    a = split_run_id(tmp_path / "out.tif", "k")
    assert a == split_run_id(Path(str(tmp_path)) / "." / "out.tif", "k")  # every rank derives the same id
    assert a != split_run_id(tmp_path / "out.tif", "other") and len(a) == 32
