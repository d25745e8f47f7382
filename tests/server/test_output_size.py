"""The server sizes a generate request as the CLI does: `size` is the longest side (engine.metadata.output_size),
and its OpenAPI document carries the pixel limit the plugin reads."""

from __future__ import annotations

from engine.metadata import output_size
from engine.tasks import MAX_PIXELS

from .conftest import call

ROME = [12.45, 41.88, 12.52, 41.93]  # 5.8 x 5.6 km on the ground


def test_plan_of_a_non_square_bbox_has_the_longest_side_of_size(server):
    reply = call(server, "POST", "/v1/plan", json_body={"task": "generate", "bbox": ROME, "crs": "EPSG:4326",
                                                        "size": 128, "model": "tiny"})  # within the test server's --max-pixels
    assert reply.status == 200, reply.body
    assert (reply.json["width"], reply.json["height"]) == output_size(ROME, "EPSG:4326", 128)
    assert reply.json["width"] == 128 and reply.json["height"] < 128


def test_the_openapi_document_carries_the_pixel_limit_of_one_image(server):
    schemas = call(server, "GET", "/v1/openapi.json").json["components"]["schemas"]
    assert schemas["GenerateRequest"]["x-max-pixels"] == MAX_PIXELS
    assert "longest side" in schemas["GenerateRequest"]["properties"]["size"]["description"]
