"""A run killed with SIGKILL after a checkpoint resumes exactly where an uninterrupted run would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.models.weights import read_state_dict

from .conftest import FAST

STEPS = 12


def _args(data: Path, run: Path, max_steps: int) -> list[str]:
    return ["train", "image", "--data", str(data), "--out", str(run), *FAST, "--max-steps", str(max_steps),
            "--checkpoint-every", "2", "--validation-every", "0", "--log-every", "1000"]


def _losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


def _optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state" / "optimizer.bin", map_location="cpu", weights_only=True)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, geotiffs):
    reference = tmp_path / "reference"
    assert main(_args(geotiffs, reference, STEPS)) == 0

    killed = tmp_path / "killed"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    # a long run that is killed as soon as its first checkpoint is complete
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *_args(geotiffs, killed, 200)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoint-2").is_dir():
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    resumed_from = done[-1]
    assert 2 <= resumed_from < STEPS, done

    assert main([*_args(geotiffs, killed, STEPS), "--resume", "latest"]) == 0
    want, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))  # lines past the checkpoint were redone, not duplicated
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-9), (step, resumed_from)

    a, b = reference / f"checkpoint-{STEPS}", killed / f"checkpoint-{STEPS}"
    for folder in ("unet", "unet_ema"):
        left, right = read_state_dict(a / folder), read_state_dict(b / folder)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(left[key], right[key], rtol=1e-5, atol=1e-7, msg=f"{folder}/{key}")
    opt_a, opt_b = _optimizer_state(a), _optimizer_state(b)
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][index][name], rtol=1e-5, atol=1e-8)
    meta_a = json.loads((a / "training_state.json").read_text())
    meta_b = json.loads((b / "training_state.json").read_text())
    assert meta_a == meta_b and meta_a["ema_updates"] == STEPS


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, geotiffs):
    run = tmp_path / "term"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *_args(geotiffs, run, 500)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint-2").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "stopped by SIGTERM" in err.decode()
    last = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert last < 500 and max(_losses(run)) == last  # nothing done after the final checkpoint
