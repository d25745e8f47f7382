"""The plan's work (megapixels through the UNet) and the denoising actually run, for time estimates."""

from __future__ import annotations

import pytest

from engine.models.cache import ModelCache
from engine.tasks import parse_request, plan, run_task

from .test_tiled_tasks import FAST, s2_dn, write

BBOX = (289000.0, 4639000.0, 294000.0, 4644600.0)


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def test_generate_work_scales_with_pixels_and_the_steps_are_counted(tmp_path, models):
    small = plan(parse_request({**FAST, "task": "generate", "bbox": BBOX, "crs": "EPSG:32633", "size": 64,
                                "steps": 2}))
    big = plan(parse_request({**FAST, "task": "generate", "bbox": BBOX, "crs": "EPSG:32633", "width": 3576,
                              "height": 4096, "steps": 2}))
    assert big["unet_evaluations"] == small["unet_evaluations"]  # what the old estimate counted
    assert (small["width"], small["height"]) == (56, 64)  # size is the longest side (the bbox is 5 x 5.6 km)
    assert big["work_mpx"] / small["work_mpx"] == pytest.approx(3576 * 4096 / (56 * 64), rel=1e-3)
    result = run_task(parse_request({**FAST, "task": "generate", "bbox": BBOX, "crs": "EPSG:32633",
                                     "size": 64, "steps": 2}), tmp_path / "g.tif", models=models)
    assert result.denoise_steps == 2 and result.denoise_seconds > 0
    assert result.as_dict()["denoise_steps"] == 2


def test_skipped_tiles_run_no_steps(tmp_path, models):
    dn = s2_dn((13, 32, 256))
    dn[:, :, 128:] = 0  # the right half has no data: its tiles are skipped
    src = write(tmp_path / "s2.tif", dn, nodata=0)
    request = parse_request({**FAST, "task": "superres", "input": src, "factor": 4, "steps": 2, "overlap": 0})
    p = plan(request)
    result = run_task(request, tmp_path / "sr.tif", models=models)
    assert p["tiles"] >= 2
    assert 0 < result.denoise_steps < p["tiles"] * p["steps"]
    assert result.denoise_steps % p["steps"] == 0
