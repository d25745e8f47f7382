"""Cancelling a running job: a cancel in QGIS's task manager, and the engine really stops."""

from __future__ import annotations

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsRectangle,
    QgsTask,
)

from .conftest import wait_for_task


def test_cancel_ends_the_task_as_cancelled_not_failed_and_the_engine_stops(engine_env, tmp_path, qtbot):
    from qgis_plugin.connection import EngineManager, resolve_spec
    from qgis_plugin.engine_client import EngineClient
    from qgis_plugin.prepare import prepare_generate
    from qgis_plugin.tasks import EngineTask

    crs = QgsCoordinateReferenceSystem("EPSG:32633")
    out = tmp_path / "cancelled.tif"
    job = prepare_generate(QgsRectangle(289000, 4639000, 294000, 4644600), crs, width=128, height=128,
                           output_path=str(out), steps=200, model="tiny")
    statuses = []
    seen = {}

    def done(t):
        seen.update(description=t.description(), was_cancelled=t.was_cancelled, outcome=t.outcome,
                    error=t.error, stopped_s=t.cancel_stopped_s, text=t.status_text)

    task = EngineTask(job, resolve_spec(), EngineManager(), on_done=done)
    task.statusChanged.connect(statuses.append)
    QgsApplication.taskManager().addTask(task)
    qtbot.waitUntil(lambda: task.status_text.startswith("step"), timeout=60_000)
    task.cancel()  # what the task manager's cancel button does
    wait_for_task(qtbot, task, 60_000)
    # QGIS reports a terminated task as "Task failed": a cancel must not end that way.
    qtbot.waitUntil(lambda: int(QgsTask.TaskStatus.Complete) in statuses
                    or int(QgsTask.TaskStatus.Terminated) in statuses, timeout=10_000)
    assert int(QgsTask.TaskStatus.Terminated) not in statuses
    assert int(QgsTask.TaskStatus.Complete) in statuses
    assert seen["was_cancelled"] and seen["outcome"] is None and seen["error"] is None
    assert "cancelled" in seen["description"]
    # The plugin waited (bounded) for the engine to confirm that it stopped.
    assert seen["stopped_s"] is not None, seen["text"]
    assert "engine stopped" in seen["text"]
    jobs = EngineClient(engine_env.url, engine_env.token).jobs()
    assert any(j.get("state") == "cancelled" for j in jobs)
    assert not out.exists() or out.stat().st_size == 0
