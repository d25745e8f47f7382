"""benchmarks/tasks_tiny.py: the model clock counts nested forward calls once (the VAE's decode()
reaches only its children), and the quick mode runs end to end with the tiny model."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.tasks_tiny import ModelClock  # noqa: E402


class Inner(torch.nn.Module):
    def forward(self, x):
        return x + 1


class Outer(torch.nn.Module):  # a UNet: forward calls a child
    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        return self.block(self.block(x))


class Vae(torch.nn.Module):  # decode() is not forward: only the decoder's forward runs
    def __init__(self):
        super().__init__()
        self.decoder = Inner()

    def decode(self, x):
        return self.decoder(x)


def test_the_model_clock_counts_outermost_calls_and_only_their_time():
    ticks = itertools.count()
    clock = ModelClock(clock=lambda: float(next(ticks)))  # every reading one second later
    bundle = SimpleNamespace(unet=Outer(), vae=Vae(), text_encoder=None, controlnets={"superres": Inner()})
    handles = clock.watch(bundle)
    x = torch.zeros(1)
    bundle.unet(x)  # nested block calls inside: one call, one interval
    bundle.vae.decode(x)  # reached through the child
    bundle.controlnets["superres"](x)
    assert clock.calls == 3
    assert clock.seconds == 3.0  # one tick per outermost call, none for the nested ones
    for h in handles:
        h.remove()
    bundle.unet(x)
    assert clock.calls == 3


def test_the_quick_mode_runs_the_superres_benchmark_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tasks_tiny.py"), "--quick", "--sizes", "256",
                           "--threads", "1", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "superres" in line]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:5] == ["superres", "256²", "0.1", "1"]
    wall, model = float(cells[5]), float(cells[7])
    assert 0 < model < wall
    assert re.fullmatch(r"[\d.]+ s \([\d.]+ %\)", cells[8])
    assert not list(tmp_path.iterdir())  # inputs and outputs removed
