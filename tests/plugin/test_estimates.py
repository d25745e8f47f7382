"""Time estimates follow the work (pixels through the UNet), measured by the engine itself."""

from __future__ import annotations

import pytest

from qgis_plugin import preflight as pf

BBOX = [289000.0, 4639000.0, 294000.0, 4644600.0]


def _plan(client, width, height):
    return client.plan({"task": "generate", "bbox": BBOX, "crs": "EPSG:32633", "width": width,
                        "height": height, "steps": 20, "model": "tiny"})


def test_a_large_generate_is_estimated_by_its_pixels(engine_env, plugin_settings):
    from qgis_plugin.engine_client import EngineClient

    client = EngineClient(engine_env.url, engine_env.token)
    small, big = _plan(client, 512, 512), _plan(client, 3576, 4096)
    assert small["unet_evaluations"] == big["unet_evaluations"] == 40
    rate = pf.default_rate("cpu", "/models/diffusionsat", 512)  # a released model on a CPU
    small_check = pf.Preflight(small, rate, "default", max_megapixels=0, max_minutes=120)
    big_check = pf.Preflight(big, rate, "default", max_megapixels=0, max_minutes=120)
    assert big_check.estimate_s / small_check.estimate_s == pytest.approx(3576 * 4096 / 512 ** 2, rel=1e-3)
    assert pf.describe_duration(big_check.estimate_s) != "under 1 min"
    # On a model/device ten times slower than the default, the large-job question appears.
    slow = pf.Preflight(big, 10 * rate, "default", max_megapixels=0, max_minutes=120)
    assert slow.reasons() and "would take" in slow.reasons()[0]
    assert "Mpx through the UNet" in big_check.summary()


def test_skipped_tiles_do_not_pull_the_learned_rate_down(plugin_settings):
    plan = {"task": "superres", "width": 2048, "height": 2048, "tiles": 16, "model_px": 512, "steps": 20,
            "unet_evaluations": 16 * 20, "mpx_per_step": 0.262144, "work_mpx": 16 * 20 * 0.262144}
    check = pf.Preflight(plan, 4.0, "default", engine="http://gpu:1", model="m")
    # Half the tiles were empty (skipped): the engine ran 8 x 20 steps in 84 s of denoising.
    rate = pf.record_outcome(check, {"seconds": 100.0, "denoise_steps": 160, "denoise_seconds": 84.0})
    assert rate == pytest.approx(84.0 / (160 * 0.262144))
    # An engine without its own measurement: the whole time over the planned work.
    rate = pf.record_outcome(pf.Preflight(plan, 4.0, "default", engine="http://old:1", model="m"), {"seconds": 100.0})
    assert rate == pytest.approx(100.0 / plan["work_mpx"])


def test_the_engine_plans_the_work_and_reports_what_it_ran(engine_env):
    from qgis_plugin.engine_client import EngineClient

    client = EngineClient(engine_env.url, engine_env.token)
    plan = _plan(client, 64, 64)
    assert plan["mpx_per_step"] == pytest.approx(2 * 64 * 64 / 1e6)
    assert plan["work_mpx"] == pytest.approx(20 * plan["mpx_per_step"])


def test_a_job_too_small_to_measure_pixels_does_not_teach_the_rate(plugin_settings):
    # Seen with qgis_process: a 16 × 8 px generate (0.0005 Mpx through the UNet, ~2 s of
    # per-step overhead) taught "3.74e+03 s per megapixel"; the next 4096 × 2048 px job was
    # then estimated at 17 h and refused before running.
    engine = "http://cpu-box:8765"
    assert pf.record_rate(engine, "tiny", "generate", 1.9, 0.000512) is None
    assert pf.stored_rate(engine, "tiny", "generate") is None
    assert pf.record_rate(engine, "tiny", "generate", 1.3, 1.0) == pytest.approx(1.3)
    assert pf.record_rate(engine, "tiny", "generate", 2.0, 0.001) is None  # leaves the learned rate as it was
    assert pf.stored_rate(engine, "tiny", "generate") == (pytest.approx(1.3), 1)
