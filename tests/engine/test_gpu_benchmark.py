"""The GPU throughput benchmark is a prepared script for a lent GPU: it must run before it gets there.

``--quick`` is the smoke run with the tiny architecture on the CPU (64 px windows, one round): every
row is measured eager and compiled (the ``--compile`` path, traced without generated kernels), FLOPs
are counted (non-zero, larger for UNet+ControlNet than for the UNet alone), super-resolution runs end
to end through the engine task, and the projection for a whole Sentinel-2 tile is computed from the
rows. On a machine with CUDA the same script is the real benchmark; the CUDA row below runs it there.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import gpu_throughput  # noqa: E402


def _run(tmp_path, *args):
    out = tmp_path / "rows.json"
    rc = gpu_throughput.main([*args, "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_run_on_cpu(tmp_path):
    data = _run(tmp_path, "--quick")
    rows = {(r["what"], r["mode"], r["batch"]): r for r in data["rows"]}
    expected = {(w, "eager", b) for w in ("UNet", "UNet+ControlNet", "VAE decode") for b in (1, 2)}
    expected |= {(w, "compiled", 1) for w in ("UNet", "UNet+ControlNet")}
    assert set(rows) == expected
    for r in rows.values():
        assert r["flops"] > 0 and r["ms_per_call"] > 0 and r["dtype"] == "fp32"
    # FLOPs are the model's: a batch of 2 is twice the work, and the ControlNet adds to the UNet
    assert rows[("UNet", "eager", 2)]["flops"] == pytest.approx(2 * rows[("UNet", "eager", 1)]["flops"], rel=1e-6)
    assert rows[("UNet+ControlNet", "eager", 1)]["flops"] > rows[("UNet", "eager", 1)]["flops"]
    assert rows[("UNet", "compiled", 1)]["flops"] == rows[("UNet", "eager", 1)]["flops"]
    proj = data["projection"]
    assert proj["windows"] == gpu_throughput.windows_per_tile(64)
    assert proj["minutes"] > 0
    (e2e,) = data["e2e"]  # the real super-resolution task, batch_size 2, at 2 steps
    assert e2e["batch_size"] == 2 and e2e["steps"] == 2 and e2e["tiles"] >= 1 and e2e["tiles_per_s"] > 0


def test_budget_skips_what_is_left(tmp_path):
    data = _run(tmp_path, "--quick", "--no-compile", "--no-e2e", "--budget-s", "0")
    assert data["rows"] and all(r.get("skipped") for r in data["rows"])
    assert data["projection"] is None


def test_windows_per_tile_matches_the_issue_scale():
    # 10,980 px x 4 = 43,920 px at 512 px windows with 64 px overlap: about 9k windows
    assert 9000 <= gpu_throughput.windows_per_tile(512) <= 10000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(tmp_path):
    data = _run(tmp_path, "--quick", "--device", "cuda", "--dtypes", "bf16", "--batches", "1",
                "--cudagraph-batches", "1")
    assert all(r.get("peak_mib") for r in data["rows"])
    assert {r["mode"] for r in data["rows"]} == {"eager", "compiled", "compiled+cudagraphs"}
