"""Hypothesis over job requests that are almost valid: no 5xx, and every refusal is JSON.

The schema-driven fuzzer (test_fuzz.py) rarely produces a request that passes validation (a
random string is not a CRS); these requests reach the checks behind validation and the queue.
Needs only hypothesis (the dev extra), not schemathesis.
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings

from .conftest import call


def _near_valid_job_requests():
    """Requests that are mostly valid, with values at and past the edges of each field."""
    from hypothesis import strategies as st

    side = st.sampled_from([8, 16, 64, 120, 128, 136, 0, -8, 4096])
    optional = {
        "date": st.sampled_from(["2021-06-15", "1980-01-01", "2100-12-31", "1979-12-31", "2021-02-29", "x"]),
        "cloud_cover": st.sampled_from([0, 0.5, 1, 1.5, 50, -0.1]),
        "prompt": st.text(max_size=40),
        "steps": st.integers(-1, 3),
        "guidance": st.floats(-1, 60, allow_nan=False),
        "seed": st.integers(-1, 2**64),
        "scheduler": st.sampled_from(["default", "ddim", "dpm++", "unipc", "euler", "pndm", "nope"]),
        "model": st.sampled_from(["tiny", "auto", "hf:owner/name", "/no/such", "", "upload:" + "0" * 32]),
        "device": st.sampled_from(["auto", "cpu", "cuda", "mps", "tpu"]),
        "dtype": st.sampled_from(["auto", "fp32", "bf16", "fp16", "int8"]),
    }
    grids = st.sampled_from([
        ("EPSG:32618", [583000, 4507000, 583640, 4507640]),
        ("EPSG:4326", [12.45, 41.88, 12.52, 41.93]),
        ("EPSG:4326", [179.9, -10, -179.9, 10]),
        ("EPSG:32633", [12.45, 41.88, 12.52, 41.93]),
        ("EPSG:3857", [-20037508.34, -20037508.34, 20037508.34, 20037508.34]),
        ("4326", [0, 0, 1, 1]),
        ("not a crs", [0, 0, 1, 1]),
        ("EPSG:4326", [0, 0, 0, 1]),
        ("EPSG:4326", [-181, 0, 1, 1]),
    ])

    @st.composite
    def build(draw):
        crs, bbox = draw(grids)
        req = {"task": "generate", "crs": crs, "bbox": bbox, "width": draw(side), "height": draw(side)}
        for name, strategy in optional.items():
            if draw(st.booleans()):
                req[name] = draw(strategy)
        return req

    return build()


def test_near_valid_job_requests(server):
    statuses = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=_near_valid_job_requests())
    def check(body):
        reply = call(server, "POST", "/v1/jobs", json_body=body)
        statuses.append(reply.status)
        assert reply.status < 500, (body, reply.body[:500])
        if reply.status == 202:
            call(server, "DELETE", f"/v1/jobs/{reply.json['id']}")
        else:
            assert set(reply.json) == {"detail", "code"}, reply.body

    check()
    assert 202 in statuses and any(400 <= s < 500 for s in statuses)
    # Whatever was accepted and cancelled, the worker is free again.
    deadline = time.monotonic() + 30
    while call(server, "GET", "/v1/health", token=None).json["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _json_values(max_leaves: int = 12):
    """Any JSON value, bounded in size: scalars (NULs, long strings, huge numbers included) nested
    in lists and objects."""
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30), st.sampled_from(["\x00", "/" + "x" * 2000, "upload:" + "f" * 32, "generate",
                                               "superres", "inpaint", "temporal", "tiny", "EPSG:4326"]),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
        max_leaves=max_leaves)


def _random_json_requests():
    """Arbitrary JSON bodies, and valid requests with one field replaced by arbitrary JSON."""
    from hypothesis import strategies as st

    fields = ["task", "bbox", "crs", "date", "width", "height", "size", "steps", "guidance", "seed", "spread",
              "model", "device", "dtype", "prompt", "scheduler", "input", "inputs", "mask", "rgb_bands",
              "references", "input_dates", "cloud_cover", "max_pixels", "overlap", "no_such_field"]
    fields += ["task", "input", "model"] * 4  # the fields the code behind validation looks at first
    bases = st.sampled_from([
        {"task": "generate", "bbox": [583000, 4507000, 583640, 4507640], "crs": "EPSG:32618",
         "width": 64, "height": 64, "steps": 2},
        {"task": "superres", "input": "/tmp/no-such.tif", "steps": 2},
        {"task": "inpaint", "input": "/tmp/no-such.tif", "steps": 2},
        {"task": "temporal", "inputs": ["/tmp/no-such.tif"], "date": "2021-06-15", "steps": 2},
    ])
    one_field = st.tuples(bases, st.sampled_from(fields), _json_values()).map(
        lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(_json_values(), one_field, one_field, one_field)


def test_random_json_never_5xx(server):
    import json

    statuses = []

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=_random_json_requests())
    def check(body):
        for endpoint in ("/v1/jobs", "/v1/plan"):
            reply = call(server, "POST", endpoint, data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            statuses.append(reply.status)
            assert reply.status < 500, (endpoint, body, reply.body[:500])
            if reply.status == 202:
                call(server, "DELETE", f"/v1/jobs/{reply.json['id']}")
            elif reply.status >= 400:
                assert set(reply.json) == {"detail", "code"}, reply.body

    check()
    assert any(400 <= s < 500 for s in statuses)


def _rasters(folder):
    """Real GeoTIFFs of several shapes (and two things that are not rasters) to point requests at."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    utm = (583000, 4507000, 583640, 4507640)
    specs = {"rgb": (utm, 3, "uint8", "EPSG:32618"), "rgb2": (utm, 3, "uint8", "EPSG:32618"),
             "far": ((683000, 4607000, 683640, 4607640), 1, "uint8", "EPSG:32618"),
             "one": (utm, 1, "uint16", "EPSG:32618"), "geo": ((12.4, 41.8, 12.5, 41.9), 3, "uint8", "EPSG:4326"),
             "s2": (utm, 12, "uint16", "EPSG:32618"), "float": (utm, 3, "float32", "EPSG:32618")}
    paths = []
    for name, (bounds, count, dtype, crs) in specs.items():
        path = folder / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=48, height=48, count=count, dtype=dtype, nodata=0,
                           crs=crs, transform=from_bounds(*bounds, 48, 48)) as dst:
            data = np.full((count, 48, 48), 100, dtype=dtype)
            data[:, 8:16, 8:16] = 0
            dst.write(data)
        paths.append(str(path))
    (folder / "junk.tif").write_text("not a raster")
    (folder / "folder.tif").mkdir()
    return paths + [str(folder / "junk.tif"), str(folder / "folder.tif")]


def test_near_valid_conditional_requests_never_5xx(server, tmp_path_factory):
    """superres/inpaint/temporal over real files: what plan() (run before 202) and the checks
    behind it raise must be a 4xx, never an internal error."""
    from hypothesis import strategies as st

    files = _rasters(tmp_path_factory.mktemp("rasters"))
    optional = {
        "bbox": st.sampled_from([[583000, 4507000, 583320, 4507320], [0, 0, 1, 1], [5, 5, 1, 1],
                                 [12.41, 41.81, 12.45, 41.85]]),
        "crs": st.sampled_from(["EPSG:32618", "EPSG:4326", "EPSG:3857"]),
        "factor": st.sampled_from([1, 2, 4, 64]), "overlap": st.sampled_from([0, 8, 1000]),
        "mask": st.sampled_from(["nodata", *files]),
        "mask_rule": st.sampled_from(["bits:14-15=3", "nonsense", "values:1,2", "bits:99=1"]),
        "rgb_bands": st.sampled_from([[1, 2, 3], [1, 1, 1], [1, 2, 9]]), "dilate": st.sampled_from([0, 256]),
        "references": st.lists(st.sampled_from(files), max_size=2),
        "reference_dates": st.sampled_from([["2021-01-01"], ["2021-01-01", "2021-02-01"]]),
        "bands": st.sampled_from(["B01,B02", "B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B11,B12"]),
        "level": st.sampled_from(["L1C", "L2A"]),
        "input_dates": st.sampled_from([["2021-01-01"], ["2021-01-01", "2021-02-01"]]),
    }
    fields = {"superres": ["bbox", "crs", "factor", "overlap", "bands", "level"],
              "inpaint": ["bbox", "crs", "overlap", "mask", "mask_rule", "rgb_bands", "dilate", "references",
                          "reference_dates"],
              "temporal": ["bbox", "crs", "overlap", "input_dates"]}

    @st.composite
    def build(draw):
        task = draw(st.sampled_from(sorted(fields)))
        req = {"task": task, "steps": 2}
        if task == "temporal":
            req.update(inputs=draw(st.lists(st.sampled_from(files), min_size=1, max_size=3)), date="2022-01-01")
        else:
            req["input"] = draw(st.sampled_from(files))
        for name in fields[task]:
            if draw(st.booleans()):
                req[name] = draw(optional[name])
        return req

    statuses = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=build())
    def check(body):
        reply = call(server, "POST", "/v1/plan", json_body=body)
        statuses.append(reply.status)
        assert reply.status < 500, (body, reply.body[:500])
        if reply.status >= 400:
            assert set(reply.json) == {"detail", "code"}, reply.body

    check()
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)
