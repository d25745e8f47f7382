"""Schemathesis over the published OpenAPI document: no input makes the server answer 5xx.

Every operation gets a bounded number of generated requests (valid and invalid ones) with the
token. Jobs the fuzzer manages to queue are cancelled at once, so the worker stays free.
"""

from __future__ import annotations

import json

import pytest

from .conftest import call

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

#: Generated requests per operation and generation mode.
EXAMPLES = 25


def _error_shape_ok(response) -> bool:
    try:
        body = json.loads(response.content)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("detail"), str) and isinstance(body.get("code"), str)


def _tiff_bodies():
    """Bytes for POST /v1/uploads: a real GeoTIFF, truncated or corrupted ones, and noise."""
    import numpy as np
    from hypothesis import strategies as st
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:4326",
                      transform=from_origin(10, 50, 0.01, 0.01)) as dst:
            dst.write(np.zeros((1, 8, 8), dtype="uint8"))
        real = mem.read()
    return st.one_of(
        st.just(real),
        st.integers(0, len(real) - 1).map(lambda n: real[:n]),
        st.tuples(st.integers(0, len(real) - 1), st.integers(0, 255)).map(
            lambda t: real[: t[0]] + bytes([t[1]]) + real[t[0] + 1:]),
        st.binary(max_size=512),
    )


@pytest.fixture(scope="module")
def api_schema(server):
    schemathesis.openapi.media_type("image/tiff", _tiff_bodies())
    document = call(server, "GET", "/v1/openapi.json").json
    return schemathesis.openapi.from_dict(document)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_5xx(server, api_schema, mode):
    auth = {"Authorization": f"Bearer {server.token}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    seen: dict[str, set] = {}

    def check_operation(operation):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            # The fuzzer may swap in its own Authorization header; the token is what we test with.
            case.headers = {**(case.headers or {}), **auth}
            response = case.call(base_url=server.url, timeout=30)
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (operation.label, case.body, response.text[:500])
            if response.status_code >= 400:
                assert _error_shape_ok(response), (operation.label, response.text[:500])
            if response.status_code == 202:
                call(server, "DELETE", f"/v1/jobs/{response.json()['id']}")

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid form to generate.
            assert mode is GenerationMode.NEGATIVE, operation.label

    for operation in operations:
        check_operation(operation)
    if mode is GenerationMode.POSITIVE:
        assert set(seen) == {op.label for op in operations}
    else:
        assert {"POST /v1/jobs", "POST /v1/uploads"} <= set(seen)
    assert call(server, "GET", "/v1/health", token=None).json["status"] == "ok"
