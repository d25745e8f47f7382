"""extend through the real server: POST /v1/plan and /v1/jobs with an uploaded layer, the result
downloaded; refusals are 4xx JSON."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.tasks import ExtendRequest

from .conftest import call, wait_for
from .test_api import assert_error

UTM = "EPSG:32618"
X0, Y0 = 583000.0, 4507640.0  # 64 x 64 px at 10 m


def upload_layer(server, tmp_path) -> tuple[str, np.ndarray]:
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.stack([(60 + 40 * np.sin(xx / 7.0) + 30 * np.cos(yy / 5.0) + 20 * b).astype("uint8")
                      for b in range(3)])
    path = tmp_path / "layer.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs=UTM,
                       transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
        dst.write(image)
    reply = call(server, "POST", "/v1/uploads", data=path.read_bytes(), headers={"Content-Type": "image/tiff"})
    assert reply.status in (200, 201), reply.body
    return reply.json["path_ref"], image


def test_extend_job_runs_and_its_result_downloads(server, tmp_path):
    ref, image = upload_layer(server, tmp_path)
    # 64 x 64 px grown 320 m left and 320 m down: 96 x 96 px... and 160 m right: 112 x 96 px
    body = {"task": "extend", "input": ref, "bbox": [X0 - 320, Y0 - 960, X0 + 800, Y0], "steps": 2, "seed": 4}
    plan = call(server, "POST", "/v1/plan", json_body=body)
    assert plan.status == 200, plan.body
    p = plan.json
    assert (p["task"], p["width"], p["height"], p["windows"], p["windows_skipped"]) == ("extend", 112, 96, 1, 0)
    assert p["new_pixels"] == 112 * 96 - 64 * 64 and p["unet_evaluations"] == 1 * 2 * 2
    reply = call(server, "POST", "/v1/jobs", json_body=body)
    assert reply.status == 202, reply.body
    job = wait_for(server, reply.json["id"], timeout=180)
    assert job["state"] == "done", job
    assert job["task"] == "extend" and (job["result"]["width"], job["result"]["height"]) == (112, 96)
    out = tmp_path / "big.tif"
    out.write_bytes(call(server, "GET", job["result"]["result_url"]).body)
    with rasterio.open(out) as ds:
        assert tuple(ds.bounds) == pytest.approx((X0 - 320, Y0 - 960, X0 + 800, Y0))
        assert ds.tags()["task"] == "extend"
        data = ds.read()
    assert np.array_equal(data[:, 0:64, 32:96], image)  # the layer, bit for bit


@pytest.mark.parametrize("change, words", [
    ({"bbox": [X0 + 10, Y0 - 300, X0 + 300, Y0 - 10]}, "nothing to extend"),
    ({"bbox": [X0 - 5000, Y0 - 5000, X0 + 5000, Y0 + 5000]}, "max-pixels"),
    ({"scheduler": "dpm++"}, "ddim"),
])
def test_extend_refusals_are_4xx_json(server, tmp_path, change, words):
    ref, _ = upload_layer(server, tmp_path)
    body = {"task": "extend", "input": ref, "bbox": [X0 - 320, Y0 - 960, X0 + 800, Y0], **change}
    for path in ("/v1/plan", "/v1/jobs"):
        reply = call(server, "POST", path, json_body=body)
        assert 400 <= reply.status < 500, reply.body
        detail = assert_error(reply, reply.status)["detail"]
        assert words in detail and "\n" not in detail


def test_the_server_confines_the_extend_input():
    assert ExtendRequest(input="/data/a.tif", bbox=(0, 0, 1, 1)).input_paths() == ["/data/a.tif"]


def test_near_valid_extend_plans_never_5xx(server, tmp_path):
    """Bboxes in other CRSs, inverted, degenerate, off the CRS's area, bands beyond the file, a
    one-band file, a file that is no raster: POST /v1/plan answers 200 or a 4xx JSON, never 5xx."""
    import itertools

    ref, _ = upload_layer(server, tmp_path)
    grey = tmp_path / "grey.tif"
    with rasterio.open(grey, "w", driver="GTiff", width=32, height=32, count=1, dtype="float32", crs=UTM,
                       transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
        dst.write(np.random.default_rng(1).random((1, 32, 32), dtype=np.float32))
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    bboxes = [[X0 - 320, Y0 - 960, X0 + 800, Y0], [0, 0, 1, 1], [5, 5, 1, 1], [-74.01, 40.70, -73.99, 40.72],
              [X0 - 1e7, Y0 - 1e7, X0 + 1e7, Y0 + 1e7], [X0 - 10, Y0 - 10, X0 - 10, Y0 - 10]]
    statuses = []
    cases = [(ref, bbox, crs, [1, 2, 3]) for bbox, crs in itertools.product(
        bboxes, [None, "EPSG:4326", "EPSG:3857"])]
    cases += [(ref, bboxes[0], "nonsense", [1, 2, 3]), (ref, bboxes[0], None, [1, 1, 1]),
              (ref, bboxes[0], None, [1, 2, 9]), (str(grey), bboxes[0], None, [1, 2, 3]),
              (str(grey), bboxes[0], None, [1, 1, 1]), (str(junk), bboxes[0], None, [1, 2, 3])]
    for inp, bbox, crs, bands in cases:
        body = {"task": "extend", "input": inp, "bbox": bbox, "rgb_bands": bands, "steps": 2}
        if crs:
            body["crs"] = crs
        reply = call(server, "POST", "/v1/plan", json_body=body)
        statuses.append(reply.status)
        assert reply.status < 500, (body, reply.body[:500])
        if reply.status >= 400:
            assert set(reply.json) == {"detail", "code"} and "\n" not in reply.json["detail"], reply.body
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)


def test_fuzzed_extend_plans_are_200_or_4xx_json(server, tmp_path):
    """A bounded fuzzer over ExtendRequest's fields (bbox NaN/inf/huge/inverted/empty, CRSs that do
    not transform, bands past the file's, spread as any JSON type, 1x1 px, all-nodata and 8-band
    uint16 layers): POST /v1/plan answers 200 or a 4xx {detail, code}, never 5xx."""
    import json as _json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ref, _ = upload_layer(server, tmp_path)
    layers = [ref]
    for name, (count, dtype, n, value, nodata) in {"one": (3, "uint8", 1, 9, None), "empty": (3, "uint8", 32, 0, 0),
                                                   "u16": (8, "uint16", 32, 900, None)}.items():
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=count, dtype=dtype, crs=UTM,
                           nodata=nodata, transform=from_origin(X0, Y0, 10.0, 10.0)) as dst:
            dst.write(np.full((count, n, n), value, dtype=dtype))
        layers.append(call(server, "POST", "/v1/uploads", data=path.read_bytes(),
                           headers={"Content-Type": "image/tiff"}).json["path_ref"])
    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([X0 - 320, Y0 - 960, X0 + 800,
                       Y0, 0.0, -1e308, 1e308]), st.integers(-2**70, 2**70))
    anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**64), st.floats(), st.text(max_size=8),
                         st.lists(st.integers(-1, 9), max_size=4))
    fields = {
        "bbox": st.one_of(st.lists(number, min_size=4, max_size=4), st.just([X0 - 320, Y0 - 960, X0 + 800, Y0]), anything),
        "crs": st.sampled_from(["EPSG:4326", "EPSG:3857", "EPSG:32633", 'LOCAL_CS["x",UNIT["m",1]]', "EPSG:0", "", "x"]),
        "rgb_bands": st.one_of(st.lists(st.integers(-1, 2**40), min_size=0, max_size=4), st.text(max_size=8)),
        "spread": anything, "cloud_cover": anything, "date": anything, "input_nodata": anything,
        "guidance": anything, "seed": anything, "scheduler": st.sampled_from(["ddim", "default", "dpm++", 3]),
    }

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(layer=st.sampled_from(layers), parts=st.fixed_dictionaries({}, optional=fields))
    def check(layer, parts):
        body = {"task": "extend", "input": layer, "bbox": [X0 - 320, Y0 - 960, X0 + 800, Y0], "steps": 1, **parts}
        data = _json.dumps(body).encode()  # NaN and Infinity as Python's json writes them
        reply = call(server, "POST", "/v1/plan", data=data, headers={"Content-Type": "application/json"})
        assert reply.status == 200 or 400 <= reply.status < 500, (body, reply.body[:500])
        if reply.status >= 400:
            assert set(reply.json) == {"detail", "code"} and "\n" not in reply.json["detail"], reply.body

    check()
    assert call(server, "GET", "/v1/health", token=None).json["status"] == "ok"
