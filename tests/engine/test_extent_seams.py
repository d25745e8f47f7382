"""Seams of joint denoising: a deterministic stand-in model whose windows disagree (the canvas is
continuous across window borders) and the real tiny model (no gradient jump at window borders)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch
from diffusers import DDIMScheduler

from engine.geo.tiles import plan_tiles
from engine.tasks import GenerateRequest
from engine.tasks.extent import extent_layout
from engine.tasks.extent.joint import joint_denoise

UTM = "EPSG:32633"
# 1536 m at 2 m/px: 768 px, a canvas of 96 x 96 latent cells (tiny: windows of 32 cells)
BBOX = (288500.0, 4639300.0, 288500.0 + 1536.0, 4639300.0 + 1536.0)


def smooth(rows: slice, cols: slice) -> torch.Tensor:
    """A smooth field of absolute canvas coordinates, (4, h, w)."""
    y = torch.arange(rows.start, rows.stop, dtype=torch.float32)[:, None]
    x = torch.arange(cols.start, cols.stop, dtype=torch.float32)[None, :]
    base = 0.5 * torch.sin(2 * torch.pi * y / 57.0) * torch.cos(2 * torch.pi * x / 83.0)
    return torch.stack([base * (c + 1) / 4 for c in range(4)])


def offset(k: int) -> float:
    """A per-window constant in [-1, 1]: the windows disagree."""
    return ((k * 7919) % 13) / 6.0 - 1.0


def stand_in(layout, offsets: bool):
    def predict(latents, t, index):
        out = []
        for k in index:
            w = layout.windows[k].window
            rows = slice(int(w.row_off), int(w.row_off + w.height))
            cols = slice(int(w.col_off), int(w.col_off + w.width))
            out.append(smooth(rows, cols) + (offset(k) if offsets else 0.0))
        return torch.stack(out)

    return predict


def run(layout, offsets: bool) -> np.ndarray:
    pipe = SimpleNamespace(scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012, clip_sample=False), _execution_device="cpu")
    canvas = joint_denoise(pipe, layout, prompt="", metadata=None, steps=5, guidance=1.0, seed=3, batch_size=3,
                           predict=stand_in(layout, offsets))
    return canvas[0].numpy().astype(np.float64)


def jumps(field: np.ndarray, layout) -> tuple[float, float]:
    """(largest mean |step| across a window border, largest mean |step| anywhere else), over
    both axes; a border is where some window starts or ends."""
    found = []
    for axis, key in ((2, "col_off"), (1, "row_off")):
        steps = np.abs(np.diff(field, axis=axis)).mean(axis=(0, 3 - axis))  # steps[x-1]: between x-1 and x
        borders = set()
        for w in layout.windows:
            start = int(getattr(w.window, key))
            borders.update(b for b in (start, start + int(w.window.width)) if 0 < b < len(steps) + 1)
        mask = np.zeros(len(steps), bool)
        mask[[b - 1 for b in borders]] = True
        found.append((steps[mask].max(), steps[~mask].max()))
    return max(f[0] for f in found), max(f[1] for f in found)


def test_the_blended_canvas_is_continuous_where_windows_disagree():
    layout = extent_layout(BBOX, UTM, 2.0, 256)
    assert (layout.canvas_w, layout.canvas_h) == (96, 96) and len(layout.windows) == 16
    # the windows' disagreement alone: the same run with and without the per-window offsets (the
    # noise, the smooth field and the scheduler are the same, so they cancel)
    blended = run(layout, True) - run(layout, False)
    spread = max(offset(k) for k in range(16)) - min(offset(k) for k in range(16))
    border, inside = jumps(blended, layout)
    # the same windows cut hard (no overlap, weight 1 up to each border): the step the blend removes
    hard_windows = tuple(plan_tiles(96, 96, 32, 0, factor=8))
    hard = replace(layout, windows=hard_windows, overlap=0)
    cut = run(hard, True) - run(hard, False)
    hard_border, hard_inside = jumps(cut, hard)
    assert hard_inside < 1e-5 and hard_border > spread * 0.05  # a real step at every hard cut, flat inside
    assert border <= inside  # no step at a border larger than inside the windows (the ramps)
    assert border < hard_border / 10
    assert np.abs(blended).max() > spread * 0.05  # the offsets do reach the canvas


def test_tiny_model_shows_no_gradient_jump_at_window_borders(tmp_path):
    """The real tiny model (random weights, so its images are noise-like at every scale): the
    mean |horizontal difference| of the columns at window borders (and vertical, of rows) lies
    within the spread of the interior columns. Bound: interior columns' means scatter by about
    10 % (448 rows of noise-like differences); a border more than 4 standard deviations above
    the interior mean, or a border mean 15 % above it, would be a seam."""
    from engine.tasks.generate import generate

    bbox = (BBOX[0], BBOX[1], BBOX[0] + 896.0, BBOX[1] + 896.0)  # 448 px: 2 x 2 windows
    request = GenerateRequest(model="tiny", bbox=bbox, crs=UTM, gsd=2.0, steps=3, seed=5, guidance=1.0)
    generate(request, tmp_path / "t.tif")
    with rasterio.open(tmp_path / "t.tif") as ds:
        image = ds.read().astype(np.float64)
    layout = extent_layout(bbox, UTM, 2.0, 256)
    assert len(layout.windows) == 4
    for axis, key in ((2, "col_off"), (1, "row_off")):
        steps = np.abs(np.diff(image, axis=axis)).mean(axis=(0, 3 - axis))
        borders = set()
        for w in layout.windows:  # window edges in px (the decoder's tiles share them)
            start = int(getattr(w.out_window, key))
            borders.update(b for b in (start, start + int(w.out_window.width)) if 0 < b < len(steps) + 1)
        assert borders == {192, 256}
        mask = np.zeros(len(steps), bool)
        mask[[b - 1 for b in borders]] = True
        interior = steps[~mask]
        assert steps[mask].max() <= interior.mean() + 4 * interior.std()
        assert steps[mask].mean() / interior.mean() < 1.15


def test_the_canvas_in_files_gives_the_canvas_in_ram(tmp_path):
    """The band-by-band steps over a canvas file (memory flat in the extent) are the in-RAM steps."""
    from engine.tasks.extent.joint import denoise_to_file

    layout = extent_layout((BBOX[0], BBOX[1], BBOX[0] + 1536.0, BBOX[1] + 1100.0), UTM, 2.0, 256)
    assert len({w.row for w in layout.windows}) > 2 and layout.canvas_h % 24  # a shifted last window-row
    ram = run(layout, True)

    pipe = SimpleNamespace(scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012, clip_sample=False), _execution_device="cpu")
    canvas = denoise_to_file(pipe, layout, tmp_path, prompt="", metadata=None, steps=5, guidance=1.0, seed=3,
                             batch_size=2, predict=stand_in(layout, True))
    try:
        streamed = canvas.read(0, layout.canvas_h).astype(np.float64)
        part = canvas.read(10, 50, 7, 61)
    finally:
        canvas.close()
    assert np.allclose(streamed, ram, rtol=0, atol=1e-5)
    assert np.array_equal(part, streamed[:, 10:50, 7:61].astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [canvas.path.name]  # the other step's file is gone
