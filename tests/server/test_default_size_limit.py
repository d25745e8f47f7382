"""--max-pixels holds for a generate request that leaves a side to the engine: ``resolution``
alone (the default size is the model's px), ``width`` or ``height`` alone, or nothing. Before,
only width+height (or size, or gsd) were counted: ``{"resolution": 1099511627776}`` was queued
and failed in the worker with an internal error, ``{"width": 4096}`` ran past a 128 x 128 limit."""

from __future__ import annotations

import pytest

from .conftest import MAX_PIXELS, call, generate_request


def _without_size(**fields):
    req = generate_request(**fields)
    for key in ("width", "height"):
        if key not in fields:
            req.pop(key)
    return req


@pytest.mark.parametrize("fields", [{"resolution": 1024}, {"width": 4096}, {"height": 1024}, {},
                                    {"resolution": 64, "spread": 8}],
                         ids=["resolution", "width-only", "height-only", "model-default", "spread"])
def test_a_size_left_to_the_engine_is_counted_against_max_pixels(server, fields):
    for path in ("/v1/plan", "/v1/jobs"):
        reply = call(server, "POST", path, json_body=_without_size(**fields))
        assert reply.status == 413, (path, reply.body)
        assert reply.json["code"] == "too_large" and "--max-pixels" in reply.json["detail"]


def test_a_default_size_within_the_limit_is_still_planned(server):
    reply = call(server, "POST", "/v1/plan", json_body=_without_size(resolution=64))
    assert reply.status == 200, reply.body
    assert reply.json["width"] * reply.json["height"] <= MAX_PIXELS


def test_a_resolution_past_one_image_is_refused_at_once(server):
    for path in ("/v1/plan", "/v1/jobs"):
        reply = call(server, "POST", path, json_body=_without_size(resolution=2**40))
        assert reply.status == 422, (path, reply.body)
        assert reply.json["code"] == "invalid_request" and "px per tile side" in reply.json["detail"]


def test_an_explicit_tile_past_max_pixels_is_refused_for_conditional_tasks_too(server, tmp_path):
    """inpaint with resolution 1024 over a 64 px input: the output is small, but the model would
    run on one 1024 x 1024 tile, 64 times the test server's --max-pixels (128 x 128)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    src = tmp_path / "in.tif"
    with rasterio.open(src, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32618",
                       transform=from_origin(583000, 4507640, 10, 10), nodata=0) as ds:
        data = np.full((3, 64, 64), 120, np.uint8)
        data[:, 20:30, 20:30] = 0
        ds.write(data)
    req = {"task": "inpaint", "input": str(src), "mask": "nodata", "steps": 2, "model": "tiny"}
    for path in ("/v1/plan", "/v1/jobs"):
        reply = call(server, "POST", path, json_body=dict(req, resolution=1024))
        assert reply.status == 413, (path, reply.body)
        assert reply.json["code"] == "too_large" and "1024 px tile" in reply.json["detail"]
    assert call(server, "POST", "/v1/plan", json_body=dict(req, resolution=64)).status == 200
