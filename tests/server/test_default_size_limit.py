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
