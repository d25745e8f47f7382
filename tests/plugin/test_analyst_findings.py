"""Findings from using the installed plugin in the real QGIS GUI (Xvfb, a fresh profile, an existing
engine with the tiny model), each reproduced here in real headless QGIS against the real engine."""

from __future__ import annotations

import json
import re
import urllib.request

from qgis_plugin.tasks import progress_text

from .conftest import require_task, wait_for_task
from .helpers import make_rgb_geotiff
from .test_dock import add_layer
from .test_processing import TINY, UTM_EXTENT, provider  # noqa: F401 - the fixture


def test_tiled_progress_never_counts_past_the_last_tile_nor_shows_a_placeholder_step(plugin, engine_env, qtbot,
                                                                                     tmp_path):
    # Seen in the GUI: an in-paint of a 1500×1200 px scene ended as "Task complete: DiffusionSat: in-paint
    # scene_rgb — step 0/1 · tile 43/42" (the engine's tile counter is "tiles finished", and between tiles
    # it reports a placeholder step 0/1).
    require_task(engine_env, "inpaint")
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif", size=320, hole=True), "scene")
    tab = plugin.dock.inpaint
    tab.layer.setLayer(layer)
    tab.kind_nodata.setChecked(True)
    tab.steps.setValue(2)
    task = tab.run()
    assert task is not None
    seen = []
    task.progressChanged.connect(lambda _v: seen.append(task.description()))
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    tiles = [(int(a), int(b)) for d in seen for a, b in re.findall(r"tile (\d+)/(\d+)", d)]
    assert tiles and tiles[0][1] > 1, seen  # a tiled job
    assert all(1 <= a <= b for a, b in tiles), seen
    # The engine's own record of the finished job (what the last poll sees: "writing the last rows").
    req = urllib.request.Request(f"{engine_env.url}/v1/jobs/{task.outcome.job_id}",
                                 headers={"Authorization": f"Bearer {engine_env.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        final = json.loads(resp.read())
    seen.append(progress_text(final))
    assert not any("step 0/1" in d for d in seen), seen
    assert all(re.findall(r"step \d+/(\d+)", d) in ([], ["2"]) for d in seen), seen


def test_the_largest_steps_the_forms_offer_are_steps_the_engine_accepts(plugin, engine_env):
    # The dock's and the generate dialog's Steps went to 1000; the engine refuses more than 999
    # ("steps: Input should be less than or equal to 999") after the user has set up the whole job.
    from qgis_plugin.processing.generate import GenerateAlgorithm

    tabs = (plugin.dock.generate, plugin.dock.inpaint, plugin.dock.superres, plugin.dock.temporal)
    offered = {tab.steps.maximum() for tab in tabs if getattr(tab, "steps", None) is not None}
    alg = GenerateAlgorithm()
    alg.initAlgorithm({})
    offered.add(int(alg.parameterDefinition("STEPS").maximum()))
    assert offered
    for steps in offered:
        status, body = engine_env.post("/v1/plan", {"task": "generate", "bbox": [289000, 4639000, 294000, 4644600],
                                                    "crs": "EPSG:32633", "size": 64, "steps": steps, "model": "tiny"})
        # A server may set a lower --max-steps (the test engine's is 200): only that may refuse it.
        assert status == 200 or "--max-steps" in str(body.get("detail")), (steps, body)


def test_processing_dialogs_show_every_parameter_without_scrolling_sideways(qgis_processing, plugin_settings,
                                                                           qgis_new_project, qgis_iface, qtbot,
                                                                           monkeypatch):
    # Seen in the GUI: at its default size (688 px wide under Xvfb) the temporal dialog's parameter panel
    # scrolled sideways: "Input dates, comma-separated (empty = from the layers) [optional]" pushed the
    # "…" button that picks the dated layers out of sight. Details belong in the help, not the label.
    from qgis.core import QgsApplication
    from qgis.gui import QgsBrowserGuiModel
    from qgis.PyQt.QtWidgets import QScrollArea

    from qgis_plugin.processing.provider import DiffusionSatProvider

    browser = QgsBrowserGuiModel()
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: browser)
    provider = DiffusionSatProvider()
    assert QgsApplication.processingRegistry().addProvider(provider)
    try:
        for alg in provider.algorithms():
            if alg.id() == "diffusionsat:enginestatus":
                continue
            dialog = alg.createCustomParametersWidget(None)
            assert dialog is not None
            qtbot.addWidget(dialog)
            dialog.resize(688, 523)
            dialog.show()
            qtbot.wait(50)
            for area in dialog.mainWidget().findChildren(QScrollArea):
                bar = area.horizontalScrollBar()
                assert bar.maximum() == 0, (alg.id(), bar.maximum(),
                                            [d.description() for d in alg.parameterDefinitions()])
            dialog.close()
    finally:
        QgsApplication.processingRegistry().removeProvider(provider)


class _RecordingFeedback:
    """A real QgsProcessingFeedback that keeps the progress texts it is given (as the dialog's log does)."""

    @staticmethod
    def make():
        from qgis.core import QgsProcessingFeedback

        class Recording(QgsProcessingFeedback):
            def __init__(self):
                super().__init__()
                self.texts = []

            def setProgressText(self, text):  # noqa: N802 - QGIS's name
                self.texts.append(text)
                super().setProgressText(text)

        return Recording()


def test_the_processing_log_gets_a_progress_line_when_the_progress_changes_not_every_poll(
        provider, engine_env, tmp_path, qgis_new_project):  # noqa: F811
    # Seen in the GUI: the algorithm dialog's log repeated "step 1/20 · tile 1/4 · about 150 s left" five
    # times (once a poll, the time left changing), and "step 0/20 · tile 1/4" three times.
    import processing

    # Keep the engine busy, so that the job waits in the queue for several polls.
    status, body = engine_env.post("/v1/jobs", {"task": "generate", "bbox": [289000, 4639000, 294000, 4644600],
                                                "crs": "EPSG:32633", "size": 128, "steps": 12, "model": "tiny"})
    assert status in (200, 201, 202), body
    feedback = _RecordingFeedback.make()
    processing.run("diffusionsat:generate", {"EXTENT": UTM_EXTENT, "OUTPUT": str(tmp_path / "g.tif"), **TINY},
                   feedback=feedback)
    keys = [re.sub(r" · about \d+ s left$", "", t) for t in feedback.texts]
    assert keys, "no progress text"
    repeats = [a for a, b in zip(keys, keys[1:]) if a == b]
    assert not repeats, feedback.texts
