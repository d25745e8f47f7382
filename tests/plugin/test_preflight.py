"""The pre-flight in the dock: the engine's plan, the time estimate, the limits, refused requests."""

from __future__ import annotations

import threading

import pytest

from qgis_plugin import preflight as pf
from qgis_plugin.compat import MSG_CRITICAL, MSG_WARNING
from qgis_plugin.requests import PreparedJob

from .conftest import wait_for_task
from .test_dock import UTM, UTM_EXTENT


def job_ids(server) -> list[str]:
    from qgis_plugin.engine_client import EngineClient

    return [j["id"] for j in EngineClient(server.url, server.token).jobs()]


@pytest.fixture
def shown(plugin, monkeypatch):
    """Every text the plugin puts in the dock's pre-flight line."""
    texts: list[str] = []
    original = plugin.dock.show_plan

    def spy(text):
        texts.append(text)
        original(text)

    monkeypatch.setattr(plugin.dock, "show_plan", spy)
    return texts


def test_generate_shows_the_plan_and_learns_the_time_per_megapixel(plugin, engine_env, shown, qtbot):
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    tab.size.setValue(128)  # enough work to measure (preflight.MIN_LEARN_MPX), still a quick job
    width, height = tab.target_size()
    task = tab.run()
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    check = task.preflight
    assert check is not None
    plan = check.plan
    assert (plan["task"], plan["width"], plan["height"], plan["tiles"]) == ("generate", width, height, 1)
    assert plan["unet_evaluations"] == 2 * 2  # 2 steps, classifier-free guidance doubles them
    assert check.model == "tiny" and check.device == "cpu"
    summary = next(t for t in shown if t.startswith("Plan:"))
    for needle in (f"{width} × {height} px", "Mpx", "m/px", "1 tile", "4 UNet evaluations", "under 1 min",
                   "an estimate", "default for the tiny model on cpu"):
        assert needle in summary, (needle, summary)
    # The dock line ends with the outcome, and the measured time is kept for this engine.
    key = pf.engine_key(task.spec)
    stored = pf.stored_rate(key, "tiny", "generate")
    assert stored is not None and stored[1] == 1
    result = task.outcome.result
    # The engine's own measurement: its denoising steps and their time (not the model loading).
    assert result["denoise_steps"] == 2 and 0 < result["denoise_seconds"] <= result["seconds"]
    mpx_per_step = 2 * width * height / 1e6  # the whole image, twice (guidance)
    assert check.mpx_per_step == pytest.approx(mpx_per_step, rel=1e-3)
    assert stored[0] == pytest.approx(result["denoise_seconds"] / (2 * mpx_per_step), rel=1e-2)
    assert plugin.dock.plan_label.text().startswith("Done:") and "(measured)" in plugin.dock.plan_label.text()

    # The next plan's estimate uses it.
    second = tab.run()
    wait_for_task(qtbot, second)
    assert second.error is None, second.error
    assert second.preflight.basis == "measured on this engine (1 job)"
    assert second.preflight.seconds_per_mpx == pytest.approx(stored[0])
    assert any("measured on this engine (1 job)" in t for t in shown if t.startswith("Plan:"))
    assert pf.stored_rate(key, "tiny", "generate")[1] == 2


def test_over_the_limit_asks_and_a_declined_job_is_not_submitted(plugin, engine_env, qgis_iface, qtbot):
    plugin.settings().max_output_mpx = 0.001  # the 64 px test image is 0.0036 Mpx
    asked = []
    answer = {"value": False}

    def confirm(check):
        asked.append((check, threading.current_thread() is threading.main_thread()))
        return answer["value"]

    plugin.confirm_large = confirm
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    before = job_ids(engine_env)
    task = tab.run()
    wait_for_task(qtbot, task)
    assert len(asked) == 1 and asked[0][1], "confirm must be asked once, on the main thread"
    check = asked[0][0]
    assert check.reasons() and "more than the limit of 0.001 Mpx" in check.reasons()[0]
    assert "0.001 Mpx" in check.confirm_text() and "Run it anyway?" in check.confirm_text()
    assert task.declined and task.outcome is None and task.error is None
    assert job_ids(engine_env) == before, "a declined job must not reach the engine"
    assert plugin.last_layer is None
    warnings = qgis_iface.messageBar().get_messages(MSG_WARNING)
    assert warnings and "was not started" in warnings[-1] and "declined" in warnings[-1]
    assert plugin.dock.plan_label.text().startswith("Not started:")

    answer["value"] = True  # confirmed: it runs
    task = tab.run()
    wait_for_task(qtbot, task)
    assert len(asked) == 2
    assert task.error is None and task.outcome is not None, task.error
    assert len(job_ids(engine_env)) == len(before) + 1
    assert plugin.last_layer is not None


def test_a_request_the_engine_refuses_shows_its_message_and_submits_nothing(plugin, engine_env, qgis_iface,
                                                                          qtbot, monkeypatch, tmp_path):
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    original = tab.prepare

    def inverted():
        job = original()
        xmin, ymin, xmax, ymax = job.request["bbox"]
        job.request["bbox"] = [xmax, ymin, xmin, ymax]
        return job

    monkeypatch.setattr(tab, "prepare", inverted)
    before = job_ids(engine_env)
    task = tab.run()
    wait_for_task(qtbot, task)
    assert task.outcome is None and task.preflight is None
    errors = qgis_iface.messageBar().get_messages(MSG_WARNING)  # the user can fix it: not critical
    assert errors and "refused the request (nothing was started)" in errors[-1]
    assert "bbox is inverted" in errors[-1]
    assert "bbox is inverted" in plugin.dock.plan_label.text()

    # An input the engine cannot find (paths are sent as they are, as to a remote engine that
    # reads a shared folder): the engine's 422 message, before any job exists.
    plugin.settings().upload = "never"
    missing = tmp_path / "not-there" / "s2.tif"
    job = PreparedJob("superres", {"task": "superres", "input": str(missing), "model": "tiny", "steps": 2},
                      str(tmp_path / "out.tif"), "sr", files=("input",))
    task = plugin.start(job)
    wait_for_task(qtbot, task)
    assert task.outcome is None
    errors = qgis_iface.messageBar().get_messages(MSG_WARNING)
    assert "refused the request" in errors[-1] and str(missing) in errors[-1]
    assert job_ids(engine_env) == before
    assert not (tmp_path / "out.tif").exists()


def test_estimates_defaults_running_average_and_limits(plugin_settings):
    assert pf.default_rate("cuda:0", "auto", 512) == 0.2
    assert pf.default_rate("cpu", "/models/diffusionsat", 512) == 4.0
    assert pf.default_rate("cpu", "tiny", 256) < 1.0
    engine = "http://gpu-box:8765"
    assert pf.stored_rate(engine, "auto", "generate") is None
    assert pf.record_rate(engine, "auto", "generate", 10.0, 100) == pytest.approx(0.1)
    assert pf.record_rate(engine, "auto", "generate", 30.0, 100) == pytest.approx(0.2)  # running average
    assert pf.stored_rate(engine, "auto", "generate") == (pytest.approx(0.2), 2)
    assert pf.stored_rate(engine, "tiny", "generate") is None
    assert pf.stored_rate("http://other:1", "auto", "generate") is None
    assert pf.record_rate(engine, "auto", "generate", None, 100) is None
    assert pf.record_rate(engine, "auto", "generate", 5.0, 0) is None
    # Each task learns its own rate: a super-resolution step runs the ControlNet too (seen at ~16 s
    # per megapixel against generate's 1.3-3.6), and must not skew generate's estimates.
    assert pf.stored_rate(engine, "auto", "superres") is None
    assert pf.record_rate(engine, "auto", "superres", 160.0, 10) == pytest.approx(16.0)
    assert pf.stored_rate(engine, "auto", "generate") == (pytest.approx(0.2), 2)
    assert pf.stored_rate(engine, "auto", "superres") == (pytest.approx(16.0), 1)

    plan = {"task": "superres", "width": 12000, "height": 10000, "gsd_m": 2.5, "tiles": 900,
            "model_px": 512, "steps": 20, "unet_evaluations": 900 * 20, "output_megapixels": 120.0}
    check = pf.Preflight(plan, 2.0, "default", max_megapixels=100, max_minutes=120)
    # 900 tiles x 20 steps of one 512 px window (0.262 Mpx): 4719 Mpx through the UNet
    assert check.work_mpx == pytest.approx(900 * 20 * 512 * 512 / 1e6)
    assert check.estimate_s == pytest.approx(2.0 * check.work_mpx)
    assert pf.describe_duration(check.estimate_s) == "about 157 min"
    reasons = check.reasons()
    assert len(reasons) == 2 and "120.0 Mpx" in reasons[0] and "157 min" in reasons[1]
    assert "900 tiles" in check.summary() and "2.5 m/px" in check.summary()
    assert pf.Preflight(plan, 0.5, "default", max_megapixels=0, max_minutes=0).reasons() == []

    from qgis_plugin.settings import PluginSettings
    from qgis_plugin.ui.settings_dialog import EngineSettingsDialog

    plugin_settings.max_output_mpx = 12.5
    plugin_settings.max_minutes = 30
    plugin_settings.save()
    loaded = PluginSettings.load()
    assert (loaded.max_output_mpx, loaded.max_minutes) == (12.5, 30.0)
    values = EngineSettingsDialog(loaded).values()
    assert (values.max_output_mpx, values.max_minutes) == (12.5, 30.0)


def test_an_engine_without_the_plan_endpoint_still_runs_jobs(tmp_path):
    from qgis_plugin.engine_client import EngineError
    from qgis_plugin.tasks import run_job

    class OldEngine:
        timeout = 30.0
        submitted = []

        def plan(self, request):
            raise EngineError("no endpoint POST /v1/plan", 404, "not_found")

        def submit(self, request):
            self.submitted.append(request)
            return "job-1"

        def wait(self, job_id, **kwargs):
            return {"state": "done", "result": {"seconds": 1.0}}

        def download_result(self, job_id, dest):
            (tmp_path / "out.tif").write_bytes(b"x")
            return dest

    seen = []
    job = PreparedJob("generate", {"task": "generate"}, str(tmp_path / "out.tif"), "g")
    outcome = run_job(OldEngine(), job, on_plan=lambda request, plan: seen.append(plan))
    assert seen == [None] and outcome.plan is None and len(OldEngine.submitted) == 1
