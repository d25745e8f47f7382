"""POST /v1/plan for generate --gsd: the grid, the windows and the evaluations, under the engine's
own --max-pixels (a gsd request states no width/height, yet its size is known)."""

from __future__ import annotations

from engine.tasks.extent import extent_layout

from .conftest import MAX_PIXELS, call, wait_for

UTM = "EPSG:32633"


def test_plan_of_a_gsd_extent_shows_windows_and_the_limit_applies(server):
    # 896 m at 2 m/px would be 448 x 448 px: over the test server's --max-pixels (128 x 128)
    big = {"task": "generate", "bbox": [288500, 4639300, 289396, 4640196], "crs": UTM, "gsd": 2.0, "model": "tiny"}
    reply = call(server, "POST", "/v1/plan", json_body=big)
    assert reply.status == 413 or reply.status == 400, reply.body
    assert "max-pixels" in reply.json["detail"]
    # 240 m at 2 m/px: 120 x 120 px, within the limit; the tiny model's window is 256 px: one window
    small = dict(big, bbox=[288500, 4639300, 288740, 4639540])
    reply = call(server, "POST", "/v1/plan", json_body=small)
    assert reply.status == 200, reply.body
    assert (reply.json["width"], reply.json["height"]) == (120, 120) and reply.json["tiles"] == 1
    assert reply.json["width"] * reply.json["height"] <= MAX_PIXELS
    # over windows: with a 64 px model window (--resolution 64) the same extent is 2 x 2 windows
    reply = call(server, "POST", "/v1/plan", json_body=dict(small, resolution=64, steps=3))
    assert reply.status == 200, reply.body
    layout = extent_layout(small["bbox"], UTM, 2.0, 64)
    assert reply.json["windows"] == reply.json["tiles"] == len(layout.windows) > 1
    assert reply.json["joint_denoising"] is True and reply.json["window_overlap_px"] == 16
    assert reply.json["unet_evaluations"] == len(layout.windows) * 3 * 2


def test_non_finite_gsd_is_a_422_saying_finite(server):
    """JSON's NaN/Infinity (Python's json reads them) for the new gsd field: 422 naming "finite",
    not "less than or equal to 100000"; plan and jobs refuse alike."""
    base = {"task": "generate", "bbox": [288500, 4639300, 288740, 4639540], "crs": UTM, "model": "tiny"}
    for value in (float("nan"), float("inf")):
        for path in ("/v1/plan", "/v1/jobs"):
            reply = call(server, "POST", path, json_body=dict(base, gsd=value))
            assert reply.status == 422, reply.body
            assert reply.json == {"detail": "gsd: Input should be a finite number", "code": "invalid_request"}


def test_a_joint_job_says_windows_in_its_record_and_a_plain_one_does_not(server):
    """The job record's ``windows`` flag: a client that did not ask for the plan (a script polling
    /v1/jobs) can still read step/tile as windows/steps; it stays set through the decode."""
    joint = {"task": "generate", "bbox": [288500, 4639300, 288740, 4639540], "crs": UTM, "gsd": 2.0,
             "model": "tiny", "resolution": 64, "steps": 1, "guidance": 1.0, "seed": 3}
    plain = dict(joint, gsd=None, width=64, height=64)
    flags = {}
    for name, body in (("joint", joint), ("plain", plain)):
        reply = call(server, "POST", "/v1/jobs", json_body=body)
        assert reply.status in (200, 201, 202), reply.body
        job = wait_for(server, reply.json["id"], timeout=180)
        assert job["state"] == "done", job
        flags[name] = job["windows"]
    assert flags == {"joint": True, "plain": False}
