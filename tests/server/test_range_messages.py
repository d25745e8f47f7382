"""A value out of its range gets the same one-line detail from the server as from the CLI:
the bound broken, the value given and the whole allowed range."""

from __future__ import annotations

from engine.errors import InvalidRequest
from engine.tasks import parse_request

from .conftest import call


def test_spread_out_of_range_names_the_allowed_range_as_the_cli_does(server):
    body = {"task": "generate", "bbox": [12.45, 41.88, 12.52, 41.93], "crs": "EPSG:4326", "model": "tiny",
            "spread": 1}
    try:
        parse_request(body)
    except InvalidRequest as err:
        cli_message = str(err)
    for path in ("/v1/plan", "/v1/jobs"):
        reply = call(server, "POST", path, json_body=body)
        assert 400 <= reply.status < 500, reply.body[:200]
        assert "got 1; allowed 2..16" in reply.json["detail"], reply.json
        assert reply.json["detail"] == cli_message
