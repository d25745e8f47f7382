"""The dock as analysts use it (issue 12, usability gaps), in real headless QGIS against the real
engine (tiny model): progress text, the check before a run, band matching, options, result names,
remembered values, layout, help, the model list."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsMultiBandColorRenderer, QgsProject, QgsRectangle
from qgis.gui import QgsLayerTreeView, QgsMessageBar
from qgis.PyQt.QtCore import QDate, QTimer
from qgis.PyQt.QtWidgets import QApplication, QMessageBox, QPushButton, QToolButton

from qgis_plugin import checks, memory
from qgis_plugin.compat import MSG_CRITICAL, MSG_WARNING
from qgis_plugin.results import SYNTHETIC_MARK

from .conftest import REPO, engine_missing_reason, engine_python, require_task, wait_for_task
from .helpers import make_rgb_geotiff, make_s2_geotiff
from .test_dock import S2_BANDS, UTM, UTM_EXTENT, add_layer, run_and_wait


#: Qt objects the tests must not let Python delete while Qt may still send them events.
KEEP_ALIVE: list = []


# -- 1. progress -------------------------------------------------------------------------------------


def test_progress_shows_step_tile_and_time_left_in_the_task_manager_and_the_dock(plugin, engine_env, qtbot):
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    tab.steps.setValue(200)  # several seconds even on a quiet machine: the time-left estimate shows between polls
    seen = []
    task = tab.run()
    assert task is not None
    # Connected after the plugin's own handler: sees what it wrote.
    task.progressChanged.connect(lambda _v: seen.append((task.description(), plugin.dock.progress.text())))
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    assert seen, "no progress arrived"
    descriptions = [d for d, _ in seen if "step " in d]
    assert descriptions, seen
    assert descriptions[-1].startswith(task.prepared.describe()) and "/200" in descriptions[-1]
    assert any("step " in text and "%" in text for _, text in seen), seen
    assert any("left" in d for d, _ in seen), "no time left reported"
    assert plugin.dock.progress.text() == "done"


# -- 2. the check before a run -------------------------------------------------------------------------


def _answer_next_box(button, seen: list):
    """Answer the next modal question (as a user would click), recording its text."""
    def click():
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox):
            QTimer.singleShot(50, click)
            return
        seen.append(box.text())
        box.button(button).click()
    QTimer.singleShot(50, click)


def test_out_of_range_gsd_is_asked_before_a_run_with_possible_advice(plugin, engine_env, qtbot):
    plugin.settings().ask_out_of_range = True
    tab = plugin.dock.generate
    # A 4,670 km extent: no output size brings it to 20 m/px, so the advice is a smaller extent.
    wide = QgsRectangle(-2_335_000, 4_000_000, 2_335_000, 6_000_000)
    tab.set_extent(wide, QgsCoordinateReferenceSystem("EPSG:3857"))
    tab.size.setValue(512)
    tab.date.setDate(QDate(2030, 5, 1))
    seen: list = []
    _answer_next_box(QMessageBox.StandardButton.No, seen)
    before = set(QgsProject.instance().mapLayers())
    assert tab.run() is None  # declined: nothing started
    assert seen, "no question was asked"
    text = seen[0]
    assert "outside the 0.2–20 m/px" in text and "Draw a smaller extent" in text
    assert "Longest side" not in text  # not advice that cannot work at 4096 px
    assert "2030-05-01" in text and "2000–2024" in text
    assert "Not started" in plugin.dock.plan_label.text()
    assert set(QgsProject.instance().mapLayers()) == before
    assert not list(plugin.settings().default_output_dir().glob("*.tif"))  # the reserved name was released

    # Yes runs it (the tiny model does not care).
    tab.set_extent(UTM_EXTENT, UTM)
    tab.size.setValue(64)
    tab.date.setDate(QDate(2021, 6, 15))
    seen.clear()
    _answer_next_box(QMessageBox.StandardButton.Yes, seen)
    task = tab.run()
    assert seen and "Raise Longest side to at least" in seen[0]  # 5.6 km at 64 px: a possible size
    assert task is not None
    wait_for_task(qtbot, task)
    assert task.error is None, task.error


def test_in_range_requests_are_not_questioned(plugin):
    plugin.settings().ask_out_of_range = True
    tab = plugin.dock.generate
    tab.set_extent(QgsRectangle(289000, 4639000, 294120, 4644120), UTM)  # 5.12 km
    tab.size.setValue(512)  # 10 m/px
    tab.date.setDate(QDate(2021, 6, 15))
    assert tab.range_warnings() == []
    tab.size.setValue(64)
    (w,) = tab.range_warnings()
    assert "Raise Longest side to at least 256 px" in w.advice


def test_advice_for_each_kind_of_input():
    w = checks.gsd_warning(0.05 / 4, factor=4, input_gsd_m=0.05)
    assert w is not None and "No factor" in w.advice
    w = checks.gsd_warning(60 / 4, factor=4, input_gsd_m=60)
    assert w is None
    w = checks.gsd_warning(100 / 4, factor=4, input_gsd_m=100)
    assert "Factor of 16" in w.advice
    assert "Warp" in checks.gsd_warning(60.0).advice
    assert checks.date_warning(None) is None and checks.date_warning(dt.date(2010, 1, 1)) is None
    assert "Target date" in checks.date_warning(dt.date(1990, 1, 1), "Target date").advice


def test_the_training_ranges_are_the_engines():
    reason = engine_missing_reason()
    if reason:
        pytest.skip(reason)
    code = ("from engine.metadata import TRAINING_GSD_RANGE_M as g, TRAINING_YEAR_RANGE as y, "
            "MAX_TRAINING_CLOUD_COVER as c; print(repr((tuple(g), tuple(y), c)))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME",)}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([str(engine_python()), "-c", code], capture_output=True, text=True, cwd=str(REPO),
                         env=env, timeout=120, check=True).stdout
    assert eval(out) == (checks.GSD_RANGE_M, checks.YEAR_RANGE, checks.MAX_CLOUD_COVER)


# -- 3. super-resolve: the selected layers, bands matched by name and description ------------------------


def _single(tmp_path, file_stem, band_description, layer_name):
    path = make_s2_geotiff(tmp_path / f"{file_stem}.tif", bands=(band_description,), size=16)
    return add_layer(path, layer_name)


def test_use_the_selected_layers_matches_bands_by_name_and_description(plugin, qgis_iface, monkeypatch, tmp_path,
                                                                        qtbot):
    layers = [
        _single(tmp_path, "x1", "s2_B04", "red band"),  # from the band description
        _single(tmp_path, "T33TTG_20210615_B8A_20m", "", "nir narrow"),  # from the file name
        _single(tmp_path, "x3", "", "B02"),  # from the layer name
        _single(tmp_path, "x4", "S2_B03", "green"),
    ]
    unrelated = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif"), "rgb")
    view = QgsLayerTreeView()
    from qgis.core import QgsLayerTreeModel

    model = QgsLayerTreeModel(QgsProject.instance().layerTreeRoot(), view)
    view.setModel(model)
    KEEP_ALIVE.append(view)  # deleting a view with pending events crashes Qt; keep it for the session
    for layer in layers + [unrelated]:
        view.setCurrentLayer(layer)
    selection = view.selectionModel()
    selection.clearSelection()
    from qgis.PyQt.QtCore import QItemSelectionModel

    for layer in layers + [unrelated]:
        node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
        selection.select(view.node2index(node), QItemSelectionModel.SelectionFlag.Select)
    assert len(view.selectedLayers()) == 5
    monkeypatch.setattr(qgis_iface, "layerTreeView", lambda: view)
    tab = plugin.dock.superres
    tab.use_selected.click()
    assert tab.mode_bands.isChecked()
    rows = tab.band_rows()
    # The 3-band RGB layer is not a band layer; the others are sorted in Sentinel-2 order.
    assert [name for _, name in rows] == ["B02", "B03", "B04", "B8A"]
    assert [lyr.name() for lyr, _ in rows] == ["B02", "green", "red band", "nir narrow"]


def test_a_multiband_layer_with_prefixed_band_descriptions_gets_the_engines_names(plugin, tmp_path):
    names = [f"s2_{b}" for b in S2_BANDS]
    layer = add_layer(make_s2_geotiff(tmp_path / "stack.tif", bands=names, size=16), "stack")
    tab = plugin.dock.superres
    tab.layer.setLayer(layer)
    assert tab.bands.text() == ",".join(S2_BANDS)
    plain = add_layer(make_s2_geotiff(tmp_path / "plain.tif", bands=S2_BANDS, size=16), "plain")
    tab.bands.clear()
    tab.layer.setLayer(plain)
    assert tab.bands.text() == ""  # the engine reads these itself


# -- 4. options in every tab, warnings in the dock's words -----------------------------------------------


def test_steps_seed_date_rgb_level_baseline_reach_the_requests(plugin, tmp_path):
    rgb = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif", hole=True), "rgb")
    tab = plugin.dock.inpaint
    tab.layer.setLayer(rgb)
    tab.kind_nodata.setChecked(True)
    tab.steps.setValue(3)
    tab.seed.setValue(5)
    tab.date_set.setChecked(True)
    tab.adv_date.setDate(QDate(2020, 1, 2))
    for spin, v in zip(tab.rgb, (3, 2, 1)):
        spin.setValue(v)
    req = tab.prepare().request
    assert (req["steps"], req["seed"], req["date"], req["rgb_bands"]) == (3, 5, "2020-01-02", [3, 2, 1])

    s2 = add_layer(make_s2_geotiff(tmp_path / "s2.tif", bands=S2_BANDS, size=16), "s2")
    sr = plugin.dock.superres
    sr.layer.setLayer(s2)
    sr.level.setCurrentText("L2A")
    sr.baseline.setText("04.00")
    sr.steps.setValue(4)
    req = sr.prepare().request
    assert (req["level"], req["baseline"], req["steps"]) == ("L2A", "04.00", 4)
    assert "seed" not in req, req  # random

    tp = plugin.dock.temporal
    tp.steps.setValue(2)
    tp.seed.setValue(9)
    assert not hasattr(tp, "date_set")  # the target date is the date there


def test_engine_warnings_speak_the_docks_words():
    msg = "no acquisition date found in the input; the date is left unknown (give --date)"
    assert checks.in_dock_words(msg, "superres").endswith("(give Date (Advanced))")
    assert "--" not in checks.in_dock_words("name the file's bands with --bands", "superres")
    assert "the dates in the layer table" in checks.in_dock_words("with --input-date", "temporal")
    assert "Longest side" in checks.in_dock_words("lower --size", "generate")
    # the options added since: ground resolution, the seed and the model, named as the dock names them
    said = checks.in_dock_words("give either --gsd or --width; --seed 3; install weights or use --model tiny", "generate")
    assert said == ("give either Ground resolution (Size) or Longest side; Seed (Advanced) 3; install weights or "
                    "use the Model (DiffusionSat settings) tiny"), said
    assert "--" not in checks.in_dock_words("choose another --seed or --model", "extend")


def test_an_undated_superres_warning_reaches_the_user_without_cli_flags(plugin, engine_env, qgis_iface, qtbot,
                                                                        tmp_path):
    require_task(engine_env, "superres")
    from osgeo import gdal

    path = make_s2_geotiff(tmp_path / "undated.tif", bands=S2_BANDS, size=16)
    ds = gdal.Open(str(path), gdal.GA_Update)
    ds.SetMetadata({})
    ds = None
    tab = plugin.dock.superres
    tab.layer.setLayer(add_layer(path, "undated scene"))
    tab.factor.setValue(2)
    task = run_and_wait(qtbot, tab)
    assert task.error is None, task.error
    raw = task.outcome.warnings
    assert any("--date" in w for w in raw), raw  # what the engine said
    shown = " ".join(qgis_iface.messageBar().get_messages(MSG_WARNING))
    assert "acquisition date" in shown and "--" not in shown
    full = plugin.dock.plan_label.text()  # the whole text, in the dock
    assert "acquisition date" in full and "--date" not in full and "(give Date (Advanced))" in full
    keywords = " ".join(plugin.last_layer.metadata().keywords().get("DiffusionSat", []))
    assert "--date" not in plugin.last_layer.metadata().abstract() + keywords


# -- 5. results: unique descriptive names, the input's style, a synthetic marker --------------------------


def test_results_have_unique_descriptive_names_a_synthetic_marker_and_the_inputs_style(plugin, engine_env, qtbot,
                                                                                       tmp_path):
    require_task(engine_env, "inpaint")
    layer = add_layer(make_rgb_geotiff(tmp_path / "scene.tif", hole=True), "scene 2021")
    renderer = QgsMultiBandColorRenderer(layer.dataProvider(), 3, 2, 1)
    layer.setRenderer(renderer)
    tab = plugin.dock.inpaint
    tab.layer.setLayer(layer)
    tab.kind_nodata.setChecked(True)
    tab.seed.setValue(11)
    names = []
    for _ in range(2):
        task = run_and_wait(qtbot, tab)
        assert task.error is None, task.error
        out = plugin.last_layer
        names.append(out.name())
        assert out.renderer().type() == "multibandcolor"
        assert (out.renderer().redBand(), out.renderer().greenBand(), out.renderer().blueBand()) == (3, 2, 1)
    assert names[0] != names[1]
    for name in names:
        assert name.startswith("scene 2021 · in-painted") and "seed 11" in name and name.endswith(
            (SYNTHETIC_MARK, f"{SYNTHETIC_MARK} (2)"))
    generated = plugin.dock.generate
    generated.set_extent(UTM_EXTENT, UTM)
    generated.date.setDate(QDate(2021, 6, 15))
    run_and_wait(qtbot, generated)
    assert plugin.last_layer.name().startswith("Generated · 2021-06-15 · seed ")
    assert SYNTHETIC_MARK in plugin.last_layer.name()


# -- 6. values remembered per project and per user ---------------------------------------------------------


def _reload(plugin_obj, qgis_iface):
    import qgis_plugin

    plugin_obj.unload()
    fresh = qgis_plugin.classFactory(qgis_iface)
    fresh.initGui()
    return fresh


def test_dock_values_are_remembered_per_project_and_per_user(plugin, engine_env, qgis_iface, qtbot, tmp_path):
    tab = plugin.dock.generate
    tab.set_extent(UTM_EXTENT, UTM)
    tab.prompt.setText("terraced vineyards")
    tab.steps.setValue(3)
    tab.seed.setValue(123)
    tab.cloud_known.setChecked(True)
    tab.cloud.setValue(7)
    tab.date.setDate(QDate(2019, 8, 9))
    rgb = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif", hole=True), "rgb")
    plugin.dock.inpaint.layer.setLayer(rgb)
    plugin.dock.inpaint.kind_nodata.setChecked(True)
    plugin.dock.inpaint.prompt.setText("fields")
    run_and_wait(qtbot, tab)  # values are remembered when a job starts
    plugin.dock.inpaint.save_values()

    again = _reload(plugin, qgis_iface)
    try:
        g = again.dock.generate
        assert (g.prompt.text(), g.steps.value(), g.seed.value(), g.cloud_known.isChecked(), g.cloud.value()) == \
            ("terraced vineyards", 3, 123, True, 7)
        assert g.date.date() == QDate(2019, 8, 9)
        assert g.extent is not None and g.extent.toString(1) == UTM_EXTENT.toString(1)
        assert again.dock.inpaint.kind_nodata.isChecked() and again.dock.inpaint.layer.currentLayer() == rgb

        # The project is saved with its values; another value is used (and remembered) elsewhere.
        project_file = tmp_path / "a.qgz"
        assert QgsProject.instance().write(str(project_file))
        memory.save("generate/prompt", "glaciers", project=QgsProject.instance())
        QgsProject.instance().clear()
        memory.save("generate/prompt", "glaciers")
        # Per user: a new project starts from the user's last values, without the extent.
        final = _reload(again, qgis_iface)
        again = final
        assert final.dock.generate.prompt.text() == "glaciers" and final.dock.generate.steps.value() == 3
        assert final.dock.generate.extent is None
        # Per project: opening the project brings back its own values.
        assert QgsProject.instance().read(str(project_file))
        qtbot.waitUntil(lambda: final.dock.generate.prompt.text() == "terraced vineyards", timeout=5000)
        assert final.dock.generate.extent is not None
    finally:
        again.unload()
        plugin.unload = lambda: None  # already unloaded above


# -- 7. layout and messages ----------------------------------------------------------------------------------


def test_all_tabs_visible_at_a_narrow_dock_and_the_run_button_does_not_move(plugin, qtbot):
    dock = plugin.dock
    dock.setFloating(True)
    dock.resize(300, 700)
    dock.show()
    qtbot.waitExposed(dock)
    bar = dock.tabs.tabBar()
    if bar.isVisible():
        for i in range(dock.tabs.count()):
            rect = bar.tabRect(i)
            assert rect.right() <= bar.width() and rect.width() > 20, (i, rect, bar.width())
    else:  # too narrow for the tab titles: every task is in the task selector instead
        selector = dock.task_selector
        assert selector.isVisible() and selector.count() == dock.tabs.count()
    QApplication.processEvents()  # the floating dock settles to its minimum size (task selector shown)
    button = dock.generate.run_button
    before = button.mapTo(dock, button.rect().topLeft())
    dock.show_plan("Plan: " + "a long status line that wraps " * 30)
    QApplication.processEvents()
    assert button.mapTo(dock, button.rect().topLeft()) == before
    dock.show_plan("short")
    QApplication.processEvents()
    assert button.mapTo(dock, button.rect().topLeft()) == before
    dock.hide()


def test_long_messages_keep_their_text_and_engine_problems_offer_the_settings(plugin):
    from qgis_plugin.plugin import push_notice

    bar = QgsMessageBar()
    opened = []
    long_text = "Cannot reach the engine at http://127.0.0.1:9: connection refused. " * 5
    item = push_notice(bar, long_text, MSG_WARNING, 15, lambda: opened.append(True))
    assert item is not None and item.duration() == 15 and item.level() == MSG_WARNING
    buttons = [b for b in item.findChildren(QPushButton) if b.text() == "Settings…"]
    assert buttons
    buttons[0].click()
    assert opened == [True]
    # A long message is shortened in the bar, with "Show more" for the whole text.
    assert item.text() != long_text and item.text().endswith("…")
    assert any(b.text() == "Show more" for b in item.findChildren(QToolButton))
    # A message the settings cannot fix gets no Settings button.
    other = push_notice(bar, "the mask covers nothing", MSG_WARNING, 15, None)
    assert not [b for b in other.findChildren(QPushButton) if b.text() == "Settings…"]


# -- 8. help, Raster menu, mask presets, the engine's model list ---------------------------------------------


def test_help_opens_the_user_guide_and_the_menu_is_under_raster(plugin, qgis_iface, monkeypatch):
    from qgis.PyQt.QtGui import QDesktopServices

    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", staticmethod(lambda url: opened.append(url) or True))
    plugin.dock.help_button.click()
    assert opened and opened[0].toLocalFile().endswith("docs/plugin.md")
    assert os.path.exists(opened[0].toLocalFile())
    raster_menu = qgis_iface.addPluginToRasterMenu
    menus = {call.args[0] for call in raster_menu.call_args_list}
    actions = {call.args[1].text() for call in raster_menu.call_args_list}
    assert menus == {"&DiffusionSat"} and {"Engine settings…", "User guide"} <= actions


def test_mask_rule_presets_are_described(plugin, tmp_path):
    tab = plugin.dock.inpaint
    tab.rule.setCurrentIndex(tab.rule.findText("s2-qa60-cloud"))
    assert "QA60" in tab.rule_help.text()
    assert tab.rule.itemData(0, 3)  # a tooltip per preset (Qt.ToolTipRole)
    tab.rule.setEditText("values:3,8")
    assert "your own rule" in tab.rule_help.text()
    layer = add_layer(make_rgb_geotiff(tmp_path / "rgb.tif"), "rgb")
    tab.layer.setLayer(layer)
    tab.mask_raster.setLayer(layer)
    tab.rule.setCurrentIndex(tab.rule.findText("s2-scl-cloud"))
    assert tab.prepare().request["mask_rule"] == "s2-scl-cloud"


def test_the_model_is_chosen_from_the_engines_list(plugin, engine_env):
    from qgis_plugin.settings import MODE_REMOTE
    from qgis_plugin.ui.settings_dialog import EngineSettingsDialog

    settings = plugin.settings()
    settings.mode = MODE_REMOTE
    settings.url = engine_env.url
    settings.token_file = str(engine_env.token_file)
    settings.model = "auto"
    dialog = EngineSettingsDialog(settings, None, models=plugin.engine_models)
    assert dialog.load_models() >= 1
    texts = [dialog.model.itemText(i) for i in range(dialog.model.count())]
    tiny = [t for t in texts if t.startswith("tiny — ")]
    assert tiny and "generate" in tiny[0] and "superres" in tiny[0]
    dialog.model.setCurrentIndex(texts.index(tiny[0]))
    assert dialog.values().model == "tiny"
    assert "tiny" in dialog.model_info.text() and "px" in dialog.model_info.text()
    dialog.model.setEditText("/models/my-finetune")
    assert dialog.values().model == "/models/my-finetune"


def test_a_user_fixable_problem_is_a_warning_not_critical(plugin, qgis_iface):
    assert plugin.dock.generate.run() is None  # no extent
    assert qgis_iface.messageBar().get_messages(MSG_WARNING)
    assert not qgis_iface.messageBar().get_messages(MSG_CRITICAL)


# -- 6b. the Processing dialogs remember too -----------------------------------------------------------------


def test_processing_dialogs_remember_their_values_per_project_and_per_user(qgis_processing, plugin_settings,
                                                                            qgis_new_project, qgis_iface,
                                                                            monkeypatch):
    from qgis.core import QgsApplication
    from qgis.gui import QgsBrowserGuiModel

    from qgis_plugin.processing.provider import DiffusionSatProvider

    browser = QgsBrowserGuiModel()  # the dialog asks QGIS's iface for it; pytest-qgis has none
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: browser)

    provider = DiffusionSatProvider()
    assert QgsApplication.processingRegistry().addProvider(provider)
    try:
        alg = QgsApplication.processingRegistry().algorithmById("diffusionsat:generate")
        dialog = alg.createCustomParametersWidget(None)
        assert dialog is not None
        dialog.setParameters({"EXTENT": "289000,294000,4639000,4644600 [EPSG:32633]", "PROMPT": "salt flats",
                              "SIZE": 128, "DATE": "2020-02-03"})
        values = dialog.createProcessingParameters()  # what pressing Run reads
        assert values["PROMPT"] == "salt flats"
        again = alg.createCustomParametersWidget(None).createProcessingParameters()
        assert (again["PROMPT"], again["SIZE"], again["DATE"]) == ("salt flats", 128, "2020-02-03")
        assert str(again["EXTENT"]).startswith("289000")
        # A new project: the user's last values.
        QgsProject.instance().clear()
        assert alg.createCustomParametersWidget(None).createProcessingParameters()["PROMPT"] == "salt flats"
        # processing.run() keeps the algorithm's own defaults.
        fresh = alg.create()
        assert fresh.parameterDefinition("PROMPT").defaultValue() in (None, "")
        dialog.close()
    finally:
        QgsApplication.processingRegistry().removeProvider(provider)
