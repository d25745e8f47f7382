"""The Processing paths an analyst takes in the GUI, not only ``processing.run``.

The algorithm dialog (3.22) runs a ``QgsProcessingAlgRunnerTask`` with the dialog's context;
``prepareAlgorithm`` runs in that context on the main thread, ``processAlgorithm`` in a context of
its own in the task's thread, and the dialog then hands its context to ``handleAlgorithmResults``.
The toolbox runs an algorithm without visible parameters with no dialog at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from qgis.core import (
    QgsApplication,
    QgsProcessingAlgRunnerTask,
    QgsProcessingFeedback,
    QgsProcessingOutputHtml,
    QgsProcessingOutputLayerDefinition,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QDate

from .test_processing import TINY, UTM_EXTENT, provider  # noqa: F401 - the fixture


def run_like_the_dialog(qtbot, alg_id: str, parameters: dict, load_output: bool = True):
    """What AlgorithmDialog.runAlgorithm + finish do on 3.22, without the widgets."""
    from processing.gui.Postprocessing import handleAlgorithmResults
    from processing.tools import dataobjects

    alg = QgsApplication.processingRegistry().createAlgorithmById(alg_id)
    feedback = QgsProcessingFeedback()
    context = dataobjects.createContext(feedback)
    params = dict(parameters)
    if load_output:
        # The destination widget with "Open output file after running algorithm" checked.
        params["OUTPUT"] = QgsProcessingOutputLayerDefinition(str(params["OUTPUT"]), QgsProject.instance())
    task = QgsProcessingAlgRunnerTask(alg, params, context, feedback)
    done = {}
    task.executed.connect(lambda ok, results: done.update(ok=ok, results=results))
    assert not task.isCanceled()
    QgsApplication.taskManager().addTask(task)
    qtbot.waitUntil(lambda: "ok" in done, timeout=180_000)
    loaded = handleAlgorithmResults(alg, context, feedback, True, done["results"]) if done["ok"] else None
    return done["ok"], done["results"], loaded, feedback


def layers_from(path: Path):
    return [lyr for lyr in QgsProject.instance().mapLayers().values()
            if Path(lyr.source().split("|")[0]) == path]


def test_dialog_run_loads_styles_and_dates_the_output(provider, engine_env, tmp_path, qgis_new_project, qtbot):  # noqa: F811
    out = tmp_path / "dialog.tif"
    ok, results, loaded, feedback = run_like_the_dialog(qtbot, "diffusionsat:generate", {
        "EXTENT": UTM_EXTENT, "DATE": "2020-02-29", "OUTPUT": str(out), **TINY})
    assert ok, feedback.textLog()
    assert loaded
    assert Path(results["OUTPUT"]) == out and out.exists()
    layers = layers_from(out)
    assert len(layers) == 1, "the dialog's run added no layer"
    layer = layers[0]
    # The dock's descriptive name with the synthetic marker (was the plain "Generated 2020-02-29").
    assert isinstance(layer, QgsRasterLayer) and layer.name().startswith("Generated · 2020-02-29 · seed ")
    assert layer.name().endswith("[synthetic]")
    assert layer.temporalProperties().isActive()
    assert layer.temporalProperties().fixedTemporalRange().begin().date() == QDate(2020, 2, 29)
    assert "synthetic" in layer.metadata().keywords().get("DiffusionSat", [])
    assert layer.renderer().type() == "multibandcolor"


def test_dialog_run_without_open_output_adds_nothing(provider, engine_env, tmp_path, qgis_new_project, qtbot):  # noqa: F811
    out = tmp_path / "quiet.tif"
    ok, _results, _, feedback = run_like_the_dialog(qtbot, "diffusionsat:generate", {
        "EXTENT": UTM_EXTENT, "OUTPUT": str(out), **TINY}, load_output=False)
    assert ok, feedback.textLog()
    assert out.exists() and layers_from(out) == []


def test_engine_status_opens_a_dialog_and_reports_as_its_output(provider, engine_env, tmp_path, qtbot):  # noqa: F811
    alg = QgsApplication.processingRegistry().algorithmById("diffusionsat:enginestatus")
    # With no visible parameter the toolbox runs it through MessageBarProgress (3.22), whose
    # progress bar raises TypeError on the float progress and shows the answer nowhere.
    assert alg.countVisibleParameters() > 0
    assert any(isinstance(o, QgsProcessingOutputHtml) for o in alg.outputDefinitions())
    report = tmp_path / "status.html"
    ok, results, _, feedback = run_like_the_dialog(qtbot, "diffusionsat:enginestatus",
                                                   {"REPORT": str(report)}, load_output=False)
    assert ok, feedback.textLog()
    health = json.loads(results["HEALTH"])
    assert results["REPORT"] == str(report)
    text = report.read_text(encoding="utf-8")
    assert str(health["version"]) in text and "tiny" in text
    assert "tiny" in results["STATUS"] and str(health["version"]) in results["STATUS"]


def test_dialog_results_of_a_layer_are_named_after_that_layer(provider, engine_env, tmp_path, qgis_new_project,  # noqa: F811
                                                             qtbot):
    # Seen in the GUI: the in-paint dialog's result over "big scene" was loaded as
    # "layer · in-painted · 2021-06-15 · seed … [synthetic]" (the dock names it after its input).
    from .conftest import require_task
    from .helpers import make_rgb_geotiff

    require_task(engine_env, "inpaint")
    scene = QgsRasterLayer(str(make_rgb_geotiff(tmp_path / "scene.tif", hole=True)), "big scene")
    QgsProject.instance().addMapLayer(scene)
    out = tmp_path / "filled.tif"
    ok, _, loaded, feedback = run_like_the_dialog(qtbot, "diffusionsat:inpaint", {
        "INPUT": scene.id(), "MASK_KIND": 3, "MODEL": "tiny", "OPTIONS": '{"steps": 2}', "OUTPUT": str(out)})
    assert ok and loaded, feedback.textLog()
    (layer,) = layers_from(out)
    assert layer.name().startswith("big scene · in-painted · "), layer.name()
    if engine_env.supports("superres")[0]:
        from .helpers import make_s2_geotiff
        from .test_dock import S2_BANDS

        s2 = QgsRasterLayer(str(make_s2_geotiff(tmp_path / "s2.tif", bands=S2_BANDS)), "T33TTG bands")
        QgsProject.instance().addMapLayer(s2)
        out = tmp_path / "sharp.tif"
        ok, _, loaded, feedback = run_like_the_dialog(qtbot, "diffusionsat:superres", {
            "INPUT": s2.id(), "FACTOR": 2, "MODEL": "tiny", "OPTIONS": '{"steps": 2}', "OUTPUT": str(out)})
        assert ok and loaded, feedback.textLog()
        (layer,) = layers_from(out)
        assert layer.name().startswith("T33TTG bands · super-resolved · ×2 · "), layer.name()
