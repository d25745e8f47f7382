"""The HTTP API of the real server (subprocess, tiny model): auth, jobs, cancel, queue, errors."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import MAX_PIXELS, call, download_spread, generate_request, wait_for

PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
    ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef/result"),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef/result/spread"),
    ("POST", "/v1/uploads"),
    ("GET", "/v1/openapi.json"),
]


def assert_error(reply, status, code=None):
    assert reply.status == status, (reply.status, reply.body[:500])
    body = reply.json
    assert set(body) == {"detail", "code"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return body


def test_health_needs_no_token(server):
    reply = call(server, "GET", "/v1/health", token=None)
    assert reply.status == 200
    health = reply.json
    assert health["status"] == "ok"
    assert health["version"] == server.ready["version"] == "0.1.0"
    assert health["device"] == "cpu" and health["cuda"] is False and health["free_vram_mb"] is None
    assert isinstance(health["queue"], int)


def test_ready_line(server):
    assert server.ready["url"].startswith("http://127.0.0.1:")
    assert server.ready["token_file"] == str(server.token_file)
    assert server.ready["pid"] == server.process.pid


@pytest.mark.parametrize("method,path", PROTECTED)
def test_missing_token_is_401(server, method, path):
    body = assert_error(call(server, method, path, token=None), 401, "unauthorized")
    assert "Bearer" in body["detail"]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_wrong_token_is_403(server, method, path):
    assert_error(call(server, method, path, token="not-the-token-" + "x" * 30), 403, "forbidden")


def test_malformed_authorization_is_401(server):
    assert_error(call(server, "GET", "/v1/jobs", token=None, headers={"Authorization": "Basic abc"}),
                 401, "unauthorized")


def test_no_cors(server):
    reply = call(server, "OPTIONS", "/v1/jobs", token=None,
                 headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert reply.status >= 400
    assert "access-control-allow-origin" not in {k.lower() for k in reply.headers.keys()}


def test_models(server):
    reply = call(server, "GET", "/v1/models")
    assert reply.status == 200
    models = reply.json
    assert models["default"] == "tiny"
    from engine.tasks import REQUEST_MODELS

    tiny = models["models"][0]
    assert tiny == {"name": "tiny", "tasks": list(REQUEST_MODELS), "resolution": 256, "kind": "built-in",
                    "path": None, "trained_against": None, "resolution_source": "built-in",
                    "conditioning_resolution": None, "release": None, "unet_checkpoint": None, "warning": None}
    assert {"generate", "superres", "temporal", "inpaint"} <= set(tiny["tasks"])


def test_openapi_published(server):
    doc = call(server, "GET", "/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/models", "/v1/health",
            "/v1/uploads"} <= set(doc["paths"])
    assert "GenerateRequest" in doc["components"]["schemas"]


def test_submit_poll_fetch(server, tmp_path):
    import rasterio

    request = generate_request(steps=3)
    reply = call(server, "POST", "/v1/jobs", json_body=request)
    assert reply.status == 202, reply.body
    submitted = reply.json
    assert submitted["state"] == "queued" and len(submitted["id"]) == 32
    job = wait_for(server, submitted["id"])
    assert job["state"] == "done", job
    assert job["progress"] == 1.0 and job["step"] == 3 and job["total_steps"] == 3
    assert job["error"] is None and job["started"] and job["finished"]
    result = job["result"]
    assert "path" not in result
    assert result["result_url"] == f"/v1/jobs/{job['id']}/result"
    assert result["model"] == "tiny" and result["seed"] == 1
    assert (result["width"], result["height"]) == (64, 64)

    reply = call(server, "GET", result["result_url"])
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "image/tiff"
    out = tmp_path / "result.tif"
    out.write_bytes(reply.body)
    with rasterio.open(out) as src:
        assert (src.width, src.height, src.count) == (64, 64, 3)
        assert src.crs.to_epsg() == 32618
        assert tuple(src.bounds) == pytest.approx(tuple(request["bbox"]))
        assert src.tags()["synthetic"] in ("True", "true")

    listed = call(server, "GET", "/v1/jobs").json["jobs"]
    assert job["id"] in [j["id"] for j in listed]


def test_spread_map_is_downloadable_beside_the_result(server, tmp_path):
    import numpy as np
    import rasterio

    job = wait_for(server, call(server, "POST", "/v1/jobs", json_body=generate_request(spread=2)).json["id"])
    assert job["state"] == "done", job
    spread_path, result_path = download_spread(server, job, tmp_path)
    with rasterio.open(spread_path) as spread, rasterio.open(result_path) as image:
        assert spread.dtypes == ("float32",) and (spread.transform, spread.crs) == (image.transform, image.crs)
        values = spread.read(1)
        assert np.isfinite(values).all() and values.max() > 0  # two seeds differ somewhere
        assert image.tags()["spread_file"] == "generate.spread.tif"
    # A job without spread has no spread map: 404 that says how to ask for one.
    plain = wait_for(server, call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"])
    assert plain["result"]["spread_url"] is None
    body = assert_error(call(server, "GET", f"/v1/jobs/{plain['id']}/result/spread"), 404, "not_found")
    assert '"spread"' in body["detail"]


def test_model_default_filled_in(server):
    # The request names no model: the server's --model tiny is used.
    job_id = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    job = wait_for(server, job_id)
    assert job["state"] == "done" and job["result"]["model"] == "tiny"


def test_cancel_mid_run_then_next_job_runs(server):
    job_id = call(server, "POST", "/v1/jobs", json_body=generate_request(steps=200)).json["id"]
    running = wait_for(server, job_id, until=lambda j: j["state"] == "running" and j["step"] >= 2)
    assert running["eta_s"] is None or running["eta_s"] > 0
    reply = call(server, "DELETE", f"/v1/jobs/{job_id}")
    assert reply.status == 200
    assert reply.json["state"] == "cancelled"
    stopped = wait_for(server, job_id, timeout=10)
    assert stopped["state"] == "cancelled"
    assert stopped["progress"] < 1.0 and stopped["step"] < 200
    step_at_stop = stopped["step"]
    time.sleep(0.3)
    assert call(server, "GET", f"/v1/jobs/{job_id}").json["step"] == step_at_stop  # really stopped
    assert_error(call(server, "GET", f"/v1/jobs/{job_id}/result"), 410, "gone")
    assert not (server.workdir / "jobs" / job_id).exists()

    after = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    assert wait_for(server, after)["state"] == "done"


def test_cancel_while_queued(server):
    first = call(server, "POST", "/v1/jobs", json_body=generate_request(steps=200)).json["id"]
    queued = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    wait_for(server, first, until=lambda j: j["state"] == "running")
    assert call(server, "GET", f"/v1/jobs/{queued}").json["state"] == "queued"
    assert_error(call(server, "GET", f"/v1/jobs/{queued}/result"), 409, "not_ready")
    cancelled = call(server, "DELETE", f"/v1/jobs/{queued}").json
    assert cancelled["state"] == "cancelled" and cancelled["finished"] is not None
    call(server, "DELETE", f"/v1/jobs/{first}")
    wait_for(server, first)
    time.sleep(0.3)
    never = call(server, "GET", f"/v1/jobs/{queued}").json
    assert never["state"] == "cancelled" and never["started"] is None and never["step"] == 0


def test_queue_runs_fifo(server):
    ids = [call(server, "POST", "/v1/jobs", json_body=generate_request(seed=i)).json["id"] for i in range(4)]
    jobs = [wait_for(server, job_id) for job_id in ids]
    assert [j["state"] for j in jobs] == ["done"] * 4
    for earlier, later in zip(jobs, jobs[1:], strict=False):
        # One worker: each job starts only after the one before it has finished.
        assert earlier["started"] <= earlier["finished"] <= later["started"]
    assert [j["result"]["seed"] for j in jobs] == [0, 1, 2, 3]


def test_health_counts_queue(server):
    first = call(server, "POST", "/v1/jobs", json_body=generate_request(steps=200)).json["id"]
    second = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    wait_for(server, first, until=lambda j: j["state"] == "running")
    health = call(server, "GET", "/v1/health", token=None).json
    assert health["queue"] == 1 and health["running"] is True
    for job_id in (second, first):
        call(server, "DELETE", f"/v1/jobs/{job_id}")
    wait_for(server, first)


@pytest.mark.parametrize("request_body,status,code,words", [
    ({"task": "paint", "bbox": [0, 0, 1, 1]}, 422, "invalid_request", "unknown task"),
    (generate_request(bbox=[583640, 4507000, 583000, 4507640]), 422, "invalid_request", "inverted"),
    (generate_request(width=60), 422, "invalid_request", "multiple of 8"),
    (generate_request(date="2021-02-30"), 422, "invalid_request", "date"),
    (generate_request(date="1900-01-01"), 422, "invalid_metadata", "1980"),
    (generate_request(model="/no/such/model/folder"), 404, "model_not_found", "does not exist"),
    (generate_request(crs="EPSG:999999"), 422, "invalid_request", "CRS"),
    (generate_request(steps=0), 422, "invalid_request", "steps"),
    (generate_request(cloud_cover=40), 422, "invalid_request", "0.4"),
    (generate_request(colour="blue"), 422, "invalid_request", "colour"),
    (generate_request(device="cuda:7"), 400, "device_error", "cuda"),
    ([1, 2, 3], 422, "invalid_request", "JSON object"),
])
def test_bad_requests_are_4xx_with_a_message(server, request_body, status, code, words):
    body = assert_error(call(server, "POST", "/v1/jobs", json_body=request_body), status, code)
    assert words.lower() in body["detail"].lower(), body


def test_body_that_is_not_json(server):
    reply = call(server, "POST", "/v1/jobs", data=b"{not json", headers={"Content-Type": "application/json"})
    assert "not valid JSON" in assert_error(reply, 422, "invalid_request")["detail"]


def test_pixel_limit(server):
    side = 8 * int((MAX_PIXELS ** 0.5) // 8 + 8)
    body = assert_error(call(server, "POST", "/v1/jobs", json_body=generate_request(width=side, height=side)),
                        413, "too_large")
    assert "--max-pixels" in body["detail"]


def test_json_body_size_limit(server):
    huge = generate_request(prompt="x" * (2 << 20))
    assert_error(call(server, "POST", "/v1/jobs", json_body=huge), 413, "too_large")


def test_unknown_job_and_endpoint(server):
    for method, path in [("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/result")]:
        assert "no job" in assert_error(call(server, method, path), 404, "not_found")["detail"]
    assert_error(call(server, "GET", "/v2/anything"), 404, "not_found")
    assert_error(call(server, "PUT", "/v1/jobs"), 405, "method_not_allowed")


def _fake_model_with_corrupt_weights(root):
    """An official-layout model folder whose UNet weights are garbage (configs are fine)."""
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "SatUNet", "sample_size": 32}))
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 64)
    for sub, name in [("vae", "config.json"), ("text_encoder", "config.json"),
                      ("tokenizer", "tokenizer_config.json"), ("scheduler", "scheduler_config.json")]:
        (root / sub).mkdir()
        (root / sub / name).write_text("{}")
    return root


def test_failing_job_leaves_server_healthy(server, tmp_path):
    model = _fake_model_with_corrupt_weights(tmp_path / "broken-model")
    job_id = call(server, "POST", "/v1/jobs", json_body=generate_request(model=str(model))).json["id"]
    job = wait_for(server, job_id)
    assert job["state"] == "failed"
    assert "corrupt" in job["error"] and "re-download" in job["error"]
    assert job["error_code"] == "model_load_error"
    assert "Traceback" not in job["error"]
    body = assert_error(call(server, "GET", f"/v1/jobs/{job_id}/result"), 410, "gone")
    assert "failed" in body["detail"]
    assert call(server, "GET", "/v1/health", token=None).json["status"] == "ok"
    after = call(server, "POST", "/v1/jobs", json_body=generate_request()).json["id"]
    assert wait_for(server, after)["state"] == "done"


def _geotiff_bytes(tmp_path) -> bytes:
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    path = tmp_path / "in.tif"
    with rasterio.open(path, "w", driver="GTiff", width=32, height=16, count=2, dtype="uint16",
                       crs="EPSG:32633", transform=from_bounds(300000, 4600000, 300320, 4600160, 32, 16)) as dst:
        dst.write(np.arange(2 * 16 * 32, dtype="uint16").reshape(2, 16, 32))
    return path.read_bytes()


def test_upload_geotiff(server, tmp_path):
    reply = call(server, "POST", "/v1/uploads", data=_geotiff_bytes(tmp_path), headers={"Content-Type": "image/tiff"})
    assert reply.status == 201, reply.body
    info = reply.json
    assert info["path_ref"] == f"upload:{info['upload_id']}"
    assert (info["width"], info["height"], info["count"]) == (32, 16, 2)
    assert info["crs"] == "EPSG:32633"
    assert (server.workdir / "uploads" / f"{info['upload_id']}.tif").is_file()


def test_upload_rejects_what_is_not_a_geotiff(server):
    assert_error(call(server, "POST", "/v1/uploads", data=b"hello, not a tiff",
                      headers={"Content-Type": "image/tiff"}), 422, "raster_error")
    assert_error(call(server, "POST", "/v1/uploads", data=b"{}", headers={"Content-Type": "application/json"}),
                 415, "unsupported_media_type")
    assert_error(call(server, "POST", "/v1/uploads", data=b"", headers={"Content-Type": "image/tiff"}),
                 422, "invalid_request")
    leftovers = [p for p in (server.workdir / "uploads").iterdir() if p.suffix == ".partial"]
    assert leftovers == []


def test_unknown_upload_ref_in_a_request(server):
    body = assert_error(call(server, "POST", "/v1/jobs",
                             json_body=generate_request(model="upload:" + "0" * 32)), 422, "invalid_request")
    assert "upload the file again" in body["detail"]


def test_inpaint_an_uploaded_geotiff(server, tmp_path):
    """An input-taking task end to end: upload, refer to it as upload:<id>, fetch the result."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    path = tmp_path / "holey.tif"
    image = np.full((3, 64, 64), 120, dtype="uint8")
    image[:, 20:40, 20:40] = 0  # the nodata hole to fill
    bounds = (583000, 4507000, 583640, 4507640)
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32618", transform=from_bounds(*bounds, 64, 64)) as dst:
        dst.write(image)
    ref = call(server, "POST", "/v1/uploads", data=path.read_bytes(),
               headers={"Content-Type": "image/tiff"}).json["path_ref"]
    reply = call(server, "POST", "/v1/jobs", json_body={"task": "inpaint", "input": ref, "steps": 2,
                                                          "date": "2021-06-15", "seed": 3})
    assert reply.status == 202, reply.body
    job = wait_for(server, reply.json["id"], timeout=120)
    assert job["state"] == "done", job
    assert job["task"] == "inpaint" and job["result"]["width"] == 64
    out = tmp_path / "filled.tif"
    out.write_bytes(call(server, "GET", job["result"]["result_url"]).body)
    with rasterio.open(out) as src:
        assert (src.width, src.height) == (64, 64) and src.crs.to_epsg() == 32618
        assert tuple(src.bounds) == pytest.approx(bounds)
        filled = src.read()
    assert (filled[:, :10, :10] == 120).all()  # untouched outside the hole


def test_conditional_task_with_a_missing_input(server):
    body = assert_error(call(server, "POST", "/v1/jobs", json_body={"task": "superres", "input": "/no/such.tif"}),
                        422, "input_not_found")
    assert "does not exist" in body["detail"] and "/v1/uploads" in body["detail"]


def test_plan_is_a_dry_run(server):
    before = len(call(server, "GET", "/v1/jobs").json["jobs"])
    reply = call(server, "POST", "/v1/plan", json_body=generate_request(width=128, height=64, steps=3, guidance=2.0))
    assert reply.status == 200, reply.body
    p = reply.json
    assert (p["task"], p["width"], p["height"], p["tiles"], p["steps"]) == ("generate", 128, 64, 1, 3)
    assert p["unet_evaluations"] == 6  # 3 steps x 2 (classifier-free guidance)
    assert p["gsd_m"] == pytest.approx((640 / 128 * 640 / 64) ** 0.5, rel=0.01)
    assert len(call(server, "GET", "/v1/jobs").json["jobs"]) == before  # nothing queued
    assert_error(call(server, "POST", "/v1/plan", json_body=generate_request(bbox=[5, 5, 1, 1])), 422,
                 "invalid_request")
    assert call(server, "POST", "/v1/plan", json_body=generate_request(), token=None).status == 401


def test_models_lists_the_releases_with_their_trained_resolution(tmp_path):
    """GET /v1/models on the installed release layouts (official-shaped configs): resolution and its
    source, conditioning size, tasks and the paired UNet, from the manifest, not from sample_size."""
    import os

    from tests.official_layouts import ZIP_FOLDERS, build_parts, write_release

    from .conftest import start_server, stop_server

    parts = build_parts(tmp_path / "parts")
    models = tmp_path / "models"
    for name in ZIP_FOLDERS:
        write_release(parts, models, name, "download" if name == "controlnet-texas" else "zip")
    (tmp_path / "srv").mkdir()
    srv = start_server(tmp_path / "srv", env={**os.environ, "DIFFUSIONSAT_MODELS": str(models)})
    try:
        listed = {m["name"]: m for m in call(srv, "GET", "/v1/models").json["models"]}
    finally:
        stop_server(srv)
    single = listed[ZIP_FOLDERS["diffusionsat-512"]]
    assert (single["resolution"], single["resolution_source"], single["release"]) == (512, "manifest",
                                                                                     "diffusionsat-512")
    assert single["tasks"] == ["generate", "inpaint", "extend"] and single["unet_checkpoint"] == "checkpoint-150000"
    assert listed[ZIP_FOLDERS["diffusionsat-256"]]["resolution"] == 256
    sr = listed[ZIP_FOLDERS["controlnet-superres"]]
    assert (sr["resolution"], sr["conditioning_resolution"], sr["tasks"]) == (512, 256, ["superres"])
    texas = listed["controlnet-texas"]  # installed by download: named after its release
    assert (texas["resolution"], texas["resolution_source"], texas["tasks"]) == (256, "manifest",
                                                                              ["temporal", "inpaint"])
    assert texas["unet_checkpoint"] == "diffusionsat-512/checkpoint-100000/unet"


def test_resolution_field_sets_the_generated_size(server):
    request = generate_request(resolution=72)
    del request["width"], request["height"]
    job = wait_for(server, call(server, "POST", "/v1/jobs", json_body=request).json["id"])
    assert job["state"] == "done" and (job["result"]["width"], job["result"]["height"]) == (72, 72)
    bad = call(server, "POST", "/v1/jobs", json_body=generate_request(resolution=70))
    assert bad.status == 422 and "multiple of 8" in bad.json["detail"]
