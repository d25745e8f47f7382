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

from .compat import MSG_CRITICAL, MSG_INFO, MSG_SUCCESS, MSG_WARNING, icon
from .connection import EngineConfigError, resolve_spec, shared_manager
from .layers import add_result_layer, provenance
from .preflight import Preflight, record_outcome
from .requests import PreparedJob
from .settings import PluginSettings
from .tasks import LOG_TAG, EngineTask

MENU = "&DiffusionSat"


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
        self.dock.connect_extent_tool(self.extent_tool, self.activate_extent_tool)
        self.extent_tool.deactivated.connect(lambda: self._set_draw_checked(False))

        self.action_settings = self._action("settings", "Engine settings…", toolbar=False)
        self.action_settings.triggered.connect(self.open_settings)
        self.action_diagnostics = self._action("diagnostics", "Copy diagnostics (Markdown)", toolbar=False)
        self.action_diagnostics.triggered.connect(self.copy_diagnostics)

    def _action(self, icon_name: str, text: str, checkable: bool = False, toolbar: bool = True) -> QAction:
        action = QAction(icon(icon_name), text, self.iface.mainWindow())
        action.setObjectName(f"diffusionsat_{icon_name}")
        action.setCheckable(checkable)
        self.iface.addPluginToMenu(MENU, action)
        if toolbar and self.toolbar is not None:
            self.toolbar.addAction(action)
        self.actions.append(action)
        return action

    def unload(self) -> None:
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
            self.iface.removePluginMenu(MENU, action)
            if self.toolbar is not None:
                self.toolbar.removeAction(action)
            action.deleteLater()
        self.actions = []
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.dock is not None:
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
            canvas.setMapTool(self.extent_tool)
        elif not on and canvas.mapTool() is self.extent_tool:
            canvas.unsetMapTool(self.extent_tool)
        self._set_draw_checked(on)

    def _set_draw_checked(self, on: bool) -> None:
        for widget in (getattr(self, "action_extent", None),
                       self.dock.generate.draw_button if self.dock is not None else None):
            if widget is not None and widget.isChecked() != on:
                widget.blockSignals(True)
                widget.setChecked(on)
                widget.blockSignals(False)

    def show_error(self, message: str) -> None:
        self.iface.messageBar().pushMessage("DiffusionSat", message, MSG_CRITICAL, 0)
        QgsMessageLog.logMessage(message, LOG_TAG, MSG_CRITICAL)

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
        task.confirmation_needed.connect(lambda check, t=task: self._confirm(t, check))
        self._tasks.add(task)
        self._show_plan(f"{prepared.describe()}: asking the engine for the plan…")
        QgsApplication.taskManager().addTask(task)
        self.iface.messageBar().pushMessage("DiffusionSat", f"{prepared.describe()} started", MSG_INFO, 3)
        return task

    # -- the pre-flight -------------------------------------------------------------------------

    def _show_plan(self, text: str) -> None:
        if self.dock is not None:
            self.dock.show_plan(text)

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
        if self.dock is not None:
            self.dock.refresh_engine_label()
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
                error = task.error or "the job failed"
                self._show_plan(f"Failed: {error}" if task.preflight is not None else error)
                self.show_error(task.error or "the job failed")
            return
        outcome = task.outcome
        self._learn_from(task)
        try:
            layer = add_result_layer(
                outcome.path, task.prepared.layer_name, date=task.prepared.date,
                info=provenance(outcome.path, outcome.result, task.prepared.request),
                warnings=outcome.warnings, project=QgsProject.instance(), canvas=self.canvas())
        except OSError as err:
            self.show_error(str(err))
            return
        self.last_layer = layer
        if outcome.warnings:
            bar.pushMessage("DiffusionSat", f"{layer.name()} added; " + "; ".join(outcome.warnings),
                            MSG_WARNING, 10)
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

        dialog = EngineSettingsDialog(self.settings(), self.iface.mainWindow(), check=self.check_engine)
        if dialog.exec():
            new = dialog.values()
            new.save()
            self._settings = new
            if self.dock is not None:
                self.dock.refresh_engine_label()

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
