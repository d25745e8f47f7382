"""The plugin's lifecycle: Processing provider, toolbar, menu, dock, extent tool, tasks.

``initProcessing()`` registers the Processing provider (QGIS calls it on its own for plugins
with ``hasProcessingProvider=yes``, also in ``qgis_process``); ``initGui()`` adds the user
interface and ``unload()`` removes every trace of it, stops the local engine and cancels jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qgis.core import QgsApplication, QgsMessageLog, QgsProject
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QApplication, QMessageBox

try:  # Qt6 (QGIS 4) moved QAction to QtGui
    from qgis.PyQt.QtGui import QAction
except ImportError:
    from qgis.PyQt.QtWidgets import QAction

from . import schema
from .checks import in_dock_words
from .compat import MSG_CRITICAL, MSG_INFO, MSG_SUCCESS, MSG_WARNING, icon, resource_path
from .connection import EngineConfigError, resolve_spec, shared_manager
from .layers import add_result_layer, add_spread_layer, provenance
from .preflight import Preflight, record_outcome
from .results import copy_style, result_name, spread_name
from .requests import PreparedJob
from .settings import PluginSettings
from .tasks import LOG_TAG, EngineTask

MENU = "&DiffusionSat"
#: The user guide online, for an installed plugin without the repository's docs/.
HELP_URL = "https://github.com/diffusionsat-qgis/diffusionsat-qgis/blob/main/docs/plugin.md"
#: How the engine's training-range warnings start (the dock's check replaces them with its advice).
RANGE_WARNING_STARTS = ("GSD ", "year ", "cloud cover ")
#: Messages that the user can fix in the engine settings get a "Settings…" button.
SETTINGS_HINTS = ("Engine settings", "engine URL", "token", "Cannot reach", "local engine", "interpreter")


def push_notice(bar, text: str, level, duration: int, on_settings=None, title: str = "DiffusionSat"):
    """A message bar item whose full text is always reachable ("more" for long ones) and, with
    ``on_settings``, a "Settings…" button. Returns the item (None on a bar that makes none)."""
    short = text if len(text) <= 160 else text[:157].rstrip() + "…"
    if short != text:
        bar.pushMessage(title, short, text, level, duration)
    else:
        bar.pushMessage(title, text, level, duration)
    item = bar.currentItem() if hasattr(bar, "currentItem") else None
    if item is None or on_settings is None:
        return item
    from qgis.PyQt.QtWidgets import QPushButton

    button = QPushButton("Settings…")
    button.setObjectName("diffusionsat_settings_button")
    button.clicked.connect(lambda: on_settings())
    item.layout().addWidget(button)
    return item


class DiffusionSatPlugin:
    def __init__(self, iface) -> None:
        self.iface = iface
        self.provider = None
        self.dock = None
        self.toolbar = None
        self.extent_tool = None
        self.actions: list[QAction] = []
        self.manager = shared_manager()
        self._settings: Optional[PluginSettings] = None
        self._tasks: set[EngineTask] = set()
        self.last_layer = None  # the last result layer added (tests and scripting)
        self.last_spread_layer = None  # the spread map added with it, when the job asked for one
        self._previous_tool = None  # the map tool to go back to after drawing an extent

    # -- Processing -------------------------------------------------------------------------------

    def initProcessing(self) -> None:  # noqa: N802 - QGIS's name
        from .processing.provider import DiffusionSatProvider

        if self.provider is None:
            self.provider = DiffusionSatProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    # -- GUI -----------------------------------------------------------------------------------

    def initGui(self) -> None:  # noqa: N802 - QGIS's name
        from .ui.dock import DiffusionSatDock
        from .ui.extent_tool import ExtentMapTool

        self.initProcessing()
        self.toolbar = self.iface.addToolBar("DiffusionSat")
        self.toolbar.setObjectName("DiffusionSatToolbar")

        self.dock = DiffusionSatDock(self, self.iface.mainWindow())
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()

        self.action_dock = self._action("diffusionsat", "DiffusionSat panel", checkable=True)
        self.dock.setToggleVisibilityAction(self.action_dock)

        self.extent_tool = ExtentMapTool(self.iface.mapCanvas())
        self.action_extent = self._action("extent", "Draw extent to generate", checkable=True)
        self.extent_tool.setAction(self.action_extent)
        self.action_extent.toggled.connect(self.activate_extent_tool)
        self.action_extent.triggered.connect(self._toolbar_extent)
        self.dock.connect_extent_tool(self.extent_tool, self.activate_extent_tool)
        self.extent_tool.deactivated.connect(lambda: self._set_draw_checked(False))
        # One rectangle per activation: the previous map tool comes back after drawing.
        self.extent_tool.extentDrawn.connect(lambda *_: self.activate_extent_tool(False))
        QgsProject.instance().readProject.connect(self._project_read)

        self.action_settings = self._action("settings", "Engine settings…", toolbar=False)
        self.action_settings.triggered.connect(self.open_settings)
        self.action_diagnostics = self._action("diagnostics", "Copy diagnostics (Markdown)", toolbar=False)
        self.action_diagnostics.triggered.connect(self.copy_diagnostics)
        self.action_help = self._action("help", "User guide", toolbar=False)
        self.action_help.triggered.connect(self.open_help)

    def _project_read(self, *args) -> None:
        if self.dock is not None:
            self.dock.restore_values()

    def _action(self, icon_name: str, text: str, checkable: bool = False, toolbar: bool = True) -> QAction:
        action = QAction(icon(icon_name), text, self.iface.mainWindow())
        action.setObjectName(f"diffusionsat_{icon_name}")
        action.setCheckable(checkable)
        self.iface.addPluginToRasterMenu(MENU, action)  # metadata.txt: category=Raster
        if toolbar and self.toolbar is not None:
            self.toolbar.addAction(action)
        self.actions.append(action)
        return action

    def unload(self) -> None:
        try:
            QgsProject.instance().readProject.disconnect(self._project_read)
        except (TypeError, RuntimeError):
            pass
        for task in list(self._tasks):
            task.on_done = None
            if task.status() not in (task.TaskStatus.Complete, task.TaskStatus.Terminated):
                task.cancel()
        self._tasks.clear()
        canvas = self.canvas()
        if self.extent_tool is not None:
            if canvas is not None and canvas.mapTool() is self.extent_tool:
                canvas.unsetMapTool(self.extent_tool)
            self.extent_tool.deleteLater()
            self.extent_tool = None
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU, action)
            if self.toolbar is not None:
                self.toolbar.removeAction(action)
            action.deleteLater()
        self.actions = []
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.dock is not None:
            self.dock.clear_outlines()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        self.manager.stop()

    # -- services for the dock ----------------------------------------------------------------

    def settings(self) -> PluginSettings:
        if self._settings is None:
            self._settings = PluginSettings.load()
        return self._settings

    def canvas(self):
        return self.iface.mapCanvas() if self.iface is not None else None

    def engine_summary(self) -> str:
        try:
            spec = resolve_spec(self.settings())
        except EngineConfigError as err:
            return f"Engine: not set up — {err}"
        if spec.mode == "local":
            url = self.manager.local_url()
            state = f"running at {url}" if url else "starts with the first job"
            return f"Engine: local, {state}"
        return f"Engine: {spec.url}"

    def activate_extent_tool(self, on: bool) -> None:
        canvas = self.canvas()
        if canvas is None or self.extent_tool is None:
            return
        if on and canvas.mapTool() is not self.extent_tool:
            self._previous_tool = canvas.mapTool()
            canvas.setMapTool(self.extent_tool)
        elif not on and canvas.mapTool() is self.extent_tool:
            previous, self._previous_tool = self._previous_tool, None
            if previous is not None and previous is not self.extent_tool:
                canvas.setMapTool(previous)
            else:
                canvas.unsetMapTool(self.extent_tool)
        self._set_draw_checked(on)

    def _toolbar_extent(self, on: bool) -> None:
        """The toolbar's Draw extent to generate (triggered by the user, after its toggle): the
        drawn extent goes to the Generate tab. (Not on ``toggled``: the map tool checks its action
        when any Draw button activates it.)"""
        canvas = self.canvas()
        if self.dock is not None and canvas is not None and canvas.mapTool() is self.extent_tool:
            # ``on`` may already read False: the toggle's handler unchecked it for another tab
            self.dock.extent_target = self.dock.generate
            self._set_draw_checked(True)

    def _set_draw_checked(self, on: bool) -> None:
        """Check the Draw button of the tab the extent goes to (and the toolbar action, for
        Generate); uncheck the others."""
        target = self.dock.extent_target if self.dock is not None else None
        action = getattr(self, "action_extent", None)
        buttons = self.dock.draw_buttons() if self.dock is not None else []
        wanted = [(action, on and (target is None or target is self.dock.generate))]
        wanted += [(button, on and target is not None and button is target.draw_button) for button in buttons]
        for widget, checked in wanted:
            if widget is not None and widget.isChecked() != checked:
                widget.blockSignals(True)
                widget.setChecked(checked)
                widget.blockSignals(False)

    def selected_layers(self) -> list:
        """The layers selected in the Layers panel."""
        view = self.iface.layerTreeView() if self.iface is not None else None
        try:
            return list(view.selectedLayers()) if view is not None else []
        except (AttributeError, TypeError):
            return []

    def _settings_action(self, message: str):
        return self.open_settings if any(h in message for h in SETTINGS_HINTS) else None

    def show_error(self, message: str) -> None:
        """A problem the user can fix (a missing extent, engine settings, a refused request): a
        warning that goes away by itself, with a "Settings…" button where the settings fix it."""
        message = str(message)
        push_notice(self.iface.messageBar(), message, MSG_WARNING, 15, self._settings_action(message))
        QgsMessageLog.logMessage(message, LOG_TAG, MSG_WARNING)
        if self.dock is not None:
            self.dock.show_plan(message)

    def show_failure(self, message: str) -> None:
        """An unexpected failure (the engine crashed, a bug): critical, stays until dismissed."""
        push_notice(self.iface.messageBar(), message, MSG_CRITICAL, 0, self._settings_action(message))
        QgsMessageLog.logMessage(message, LOG_TAG, MSG_CRITICAL)

    def confirm_out_of_range(self, prepared: PreparedJob, warnings) -> bool:
        """Ask whether to run a job whose values are outside the model's training range."""
        if not self.settings().ask_out_of_range:
            return True
        parent = self.iface.mainWindow() if self.iface is not None else None
        yes, no = QMessageBox.StandardButton.Yes, QMessageBox.StandardButton.No
        text = ("\n\n".join(f"• {w.text()}" for w in warnings)
                + "\n\nRun anyway? (No: nothing is started; change the values and run again.)")
        box = QMessageBox(QMessageBox.Icon.Warning, "DiffusionSat: outside the training range", text, yes | no,
                          parent)
        box.setObjectName("diffusionsat_range_check")
        box.setDefaultButton(no)
        return box.exec() == yes

    def discard(self, prepared: PreparedJob) -> None:
        self._discard_output(prepared)

    def open_help(self) -> str:
        """Open the user guide: the checkout's docs/plugin.md, else the online copy. Returns the URL."""
        from qgis.PyQt.QtCore import QUrl
        from qgis.PyQt.QtGui import QDesktopServices

        local = resource_path("docs", "plugin.md")
        if local is None:
            candidate = Path(__file__).resolve().parent.parent / "docs" / "plugin.md"
            local = candidate if candidate.is_file() else None
        url = QUrl.fromLocalFile(str(local)) if local is not None else QUrl(HELP_URL)
        QDesktopServices.openUrl(url)
        return url.toString()

    def start(self, prepared: PreparedJob) -> Optional[EngineTask]:
        """Run ``prepared`` as a background task; its layer is added when it finishes.

        The task first asks the engine for the job's plan (shown in the dock); a plan over the
        limits in the settings is submitted only if :meth:`confirm_large` says yes, and a request
        the engine refuses is never submitted (its message goes to the message bar).
        """
        try:
            spec = resolve_spec(self.settings())
        except EngineConfigError as err:
            self._discard_output(prepared)
            self.show_error(str(err))
            return None
        settings = self.settings()
        task = EngineTask(prepared, spec, self.manager, on_done=self._task_done,
                          max_megapixels=settings.max_output_mpx, max_minutes=settings.max_minutes, ask=True)
        task.planned.connect(self._plan_ready)
        task.progressChanged.connect(lambda _value, t=task: self._task_progress(t))
        task.confirmation_needed.connect(lambda check, t=task: self._confirm(t, check))
        self._tasks.add(task)
        self._show_plan(f"{prepared.describe()}: asking the engine for the plan…")
        if self.dock is not None:
            self.dock.show_progress(0.0, "starting")
            self.dock.refresh_engine_label()
        QgsApplication.taskManager().addTask(task)
        self.iface.messageBar().pushMessage("DiffusionSat", f"{prepared.describe()} started", MSG_INFO, 3)
        return task

    # -- the pre-flight -------------------------------------------------------------------------

    def _show_plan(self, text: str) -> None:
        if self.dock is not None:
            self.dock.show_plan(text)

    def _task_progress(self, task: EngineTask) -> None:  # main thread (queued from the task)
        """Step, tile and time left in the task manager (the task's description) and the dock."""
        text = task.status_text
        task.setDescription(f"{task.prepared.describe()} — {text}" if text else task.prepared.describe())
        if self.dock is not None and task in self._tasks:
            self.dock.show_progress(task.progress() / 100.0, text)

    def _plan_ready(self, check: Preflight) -> None:  # main thread (queued from the task)
        self._show_plan(check.summary())
        QgsMessageLog.logMessage(check.summary(), LOG_TAG, MSG_INFO)

    def _confirm(self, task: EngineTask, check: Preflight) -> None:  # main thread (queued from the task)
        accepted = False
        try:
            if not task.isCanceled() and task in self._tasks:
                accepted = bool(self.confirm_large(check))
        finally:
            task.answer(accepted)  # the task waits for this; never leave it waiting

    def confirm_large(self, check: Preflight) -> bool:
        """Ask whether to run a job that is over the limits (a modal question, main thread)."""
        parent = self.iface.mainWindow() if self.iface is not None else None
        yes, no = QMessageBox.StandardButton.Yes, QMessageBox.StandardButton.No
        return QMessageBox.question(parent, "DiffusionSat: a large job", check.confirm_text(), yes | no, no) == yes

    @staticmethod
    def _discard_output(prepared: PreparedJob) -> None:
        path = Path(prepared.output_path)
        if path.exists() and path.stat().st_size == 0:
            path.unlink()

    def _task_done(self, task: EngineTask) -> None:
        self._tasks.discard(task)
        if task.engine_limits is not None:  # the engine answered: its defaults and ranges from now on
            schema.remember(task.engine_limits)
            if self.dock is not None:
                self.dock.apply_limits(task.engine_limits)
        if self.dock is not None:
            self.dock.refresh_engine_label()
            self.dock.show_progress(None, "done" if task.outcome is not None else
                                    "cancelled" if task.was_cancelled else "not run")
        bar = self.iface.messageBar()
        if task.outcome is None:
            self._discard_output(task.prepared)
            if task.declined is not None:
                self._show_plan(f"Not started: {task.declined}."
                                + (f" {task.preflight.summary()}" if task.preflight else ""))
                bar.pushMessage("DiffusionSat", f"{task.prepared.describe()} was not started: {task.declined}",
                                MSG_WARNING, 10)
                return
            if task.was_cancelled:
                self._show_plan(f"{task.prepared.describe()}: cancelled.")
                bar.pushMessage("DiffusionSat", f"{task.prepared.describe()} was cancelled", MSG_INFO, 5)
            else:
                error = in_dock_words(task.error or "the job failed", task.prepared.task)
                fixable = any(h in error for h in ("refused the request", "Cannot reach", "refused the token",
                                                   "Engine settings", "not set up", "Could not start"))
                (self.show_error if fixable else self.show_failure)(error)
                self._show_plan(f"Failed: {error}" if task.preflight is not None else error)
            return
        outcome = task.outcome
        self._learn_from(task)
        project = QgsProject.instance()
        prepared = task.prepared
        source = project.mapLayer(getattr(prepared, "source_layer_id", "") or "")
        detail = f"×{prepared.request['factor']}" if prepared.task == "superres" and prepared.request.get("factor") \
            else ""
        name = result_name(prepared.task, source=getattr(prepared, "source_name", "") or "", date=prepared.date,
                           result=outcome.result, detail=detail, project=project)
        warnings = [in_dock_words(w, prepared.task) for w in outcome.warnings]
        advice = list(getattr(prepared, "range_advice", None) or [])
        if advice:  # the dock's own check said it with advice that fits the dock: no second version
            warnings = advice + [w for w in warnings if not w.startswith(RANGE_WARNING_STARTS)]
        try:
            layer = add_result_layer(
                outcome.path, name, date=prepared.date,
                info=provenance(outcome.path, outcome.result, prepared.request),
                warnings=warnings, project=project, canvas=self.canvas())
        except OSError as err:
            self.show_failure(str(err))
            return
        if prepared.task in ("inpaint", "extend"):  # the same bands as the input: its style
            copy_style(source, layer)
        self.last_layer = layer
        self.last_spread_layer = None  # a job without Uncertainty has none (not the previous job's)
        if outcome.spread_path:
            try:
                self.last_spread_layer = add_spread_layer(
                    outcome.spread_path, spread_name(layer.name(), prepared.request.get("spread")), image=layer,
                    date=prepared.date, info=provenance(outcome.spread_path, outcome.result, prepared.request),
                    project=project)
            except OSError as err:
                warnings.append(str(err))
        if warnings:
            push_notice(bar, f"{layer.name()} added; " + "; ".join(warnings), MSG_WARNING, 15)
            if self.dock is not None:  # after the plan/outcome line, the whole text of the warnings
                before = self.dock.plan_label.text()
                self.dock.show_plan((before + "\n" if before.startswith("Done:") else "")
                                    + f"{layer.name()} added. Warnings: " + "; ".join(warnings))
        else:
            bar.pushMessage("DiffusionSat", f"{layer.name()} added ({outcome.path})", MSG_SUCCESS, 5)

    def _learn_from(self, task: EngineTask) -> None:
        """A finished job's time goes into the engine's seconds-per-evaluation estimate."""
        check, outcome = task.preflight, task.outcome
        if check is None or outcome is None:
            return
        rate = record_outcome(check, outcome.result)
        if rate is None:
            return
        seconds = float(outcome.result.get("seconds") or 0.0)
        self._show_plan(f"Done: {check.grid_text()} in {seconds:.1f} s. Time estimates for this engine now use "
                        f"{rate:.3g} s per megapixel through the UNet (measured).")

    # -- actions -------------------------------------------------------------------------------

    def open_settings(self) -> None:
        from .ui.settings_dialog import EngineSettingsDialog

        dialog = EngineSettingsDialog(self.settings(), self.iface.mainWindow(), check=self.check_engine,
                                      models=self.engine_models)
        if dialog.exec():
            self.apply_settings(dialog.values())

    def apply_settings(self, new: PluginSettings) -> None:
        """Save and use ``new``; leaving "start a local engine" (or changing its interpreter)
        stops the local engine now rather than when QGIS exits."""
        old = self.settings()
        new.save()
        self._settings = new
        if old.mode == "local" and (new.mode != "local" or new.python != old.python):
            self.manager.stop()
        if self.dock is not None:
            self.dock.refresh_engine_label()

    def engine_models(self, settings: PluginSettings) -> list[dict]:
        """The engine's models (``GET /v1/models``: name, tasks, resolution) for the settings
        dialog; a local engine is started for it. Raises EngineError/EngineConfigError."""
        spec = resolve_spec(settings)
        return list((self.manager.client(spec).models() or {}).get("models") or [])

    def check_engine(self, settings: PluginSettings) -> str:
        """A one-line verdict on ``settings`` for the dialog's Test button (see connection.check_engine)."""
        from qgis.PyQt.QtCore import Qt
        from qgis.PyQt.QtWidgets import QApplication as _App

        from .connection import check_engine

        _App.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            return check_engine(settings, self.manager)
        finally:
            _App.restoreOverrideCursor()

    def copy_diagnostics(self) -> str:
        from .diagnostics import report

        try:
            text = report(resolve_spec(self.settings()), self.manager)
        except EngineConfigError as err:
            text = report(None, self.manager, error=str(err))
        QApplication.clipboard().setText(text)
        self.iface.messageBar().pushMessage("DiffusionSat", "Diagnostics copied to the clipboard", MSG_INFO, 3)
        return text
