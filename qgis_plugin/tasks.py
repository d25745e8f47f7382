"""Running a prepared job on the engine: one function for Processing, one QgsTask for the dock.

:func:`run_job` is the whole conversation with the engine (upload inputs if needed, ask for the
plan, submit, poll progress, honour cancel, download the result). It touches no QGIS layer, so it
runs in a ``QgsTask`` thread or a Processing algorithm's thread alike. :class:`EngineTask` wraps it for the
task manager (progress bar, cancel button) and hands the outcome back on the main thread in
``finished()``, where the layer is added.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from qgis.core import QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from . import preflight as pf
from .connection import EngineConfigError, EngineManager, EngineSpec
from .inputs import as_geotiff, rasterize_mask, remove_quietly
from .requests import PreparedJob, RequestError
from .schema import Limits, limits_of

LOG_TAG = "DiffusionSat"

ProgressFn = Callable[[float, str], None]


@dataclass
class JobOutcome:
    """What a finished job left: the downloaded file and the engine's record."""

    path: str
    job_id: str
    result: dict[str, Any] = field(default_factory=dict)
    plan: Optional[dict[str, Any]] = None
    spread_path: Optional[str] = None  #: the downloaded spread map (a job submitted with ``spread``)

    @property
    def warnings(self) -> list[str]:
        return [str(w) for w in (self.result.get("warnings") or [])]


def progress_text(job: dict[str, Any], joint: bool = False) -> str:
    """``step 3/20 · tile 1/4 · about 12 s left`` from a job record.

    ``joint``: a generate job denoising windows together (its plan's ``joint_denoising``), whose
    engine reports ``step`` = windows done in this denoising step, ``tile`` = steps done and
    ``total_tiles`` = steps + 1 (the decode is the last part; its meter counts window steps):
    ``window 3/4 · step 1/20`` (it read "step 4/4" for 1 step)."""
    if joint:
        return _joint_progress_text(job)
    parts = []
    step, steps = job.get("step") or 0, job.get("total_steps") or 0
    # Between tiles (and while writing) the engine reports a placeholder "step 0/1": not a step.
    if steps and not (step == 0 and steps == 1):
        parts.append(f"step {step}/{steps}")
    tiles = job.get("total_tiles") or 0
    if tiles > 1:
        # ``tile`` counts the tiles finished: the one running is the next, and none after the last.
        parts.append(f"tile {min((job.get('tile') or 0) + 1, tiles)}/{tiles}")
    if job.get("message") == "decoding":  # generate --gsd's last part: VAE tiles after the steps, not steps
        parts = [f"decoding {step}/{steps}"]
    eta = job.get("eta_s")
    if isinstance(eta, (int, float)) and eta > 0:
        parts.append(f"about {eta:.0f} s left")
    msg = job.get("message")
    if msg and not parts:
        parts.append(str(msg))
    return " · ".join(parts) or str(job.get("state") or "")


def denoises_windows(job: dict[str, Any], plan: Any = None) -> bool:
    """Whether ``job`` denoises windows together (generate over windows, extend): the engine's job
    record says so (``windows``) and so does its plan (``joint_denoising``)."""
    return bool(job.get("windows")) or (isinstance(plan, dict) and bool(plan.get("joint_denoising")))


def _joint_progress_text(job: dict[str, Any]) -> str:
    parts = []
    done, windows = job.get("step") or 0, job.get("total_steps") or 0
    # ``total_tiles`` is the denoising steps + 1: the engine counts the decode as the job's last part
    steps = max(1, (job.get("total_tiles") or 2) - 1)
    msg = str(job.get("message") or "")
    if msg == "decoding" and windows:
        parts.append(f"decoding {done}/{windows}")
    elif msg == "denoising" and windows and steps:
        parts.append(f"window {max(1, min(done, windows))}/{windows}")
        parts.append(f"step {min((job.get('tile') or 0) + 1, steps)}/{steps}")
    eta = job.get("eta_s")
    if isinstance(eta, (int, float)) and eta > 0:
        parts.append(f"about {eta:.0f} s left")
    if msg and not parts:
        parts.append(msg)
    return " · ".join(parts) or str(job.get("state") or "")


#: Engine error codes answering "I may not read this by path": the inputs are then uploaded as
#: GeoTIFFs (a path outside --allowed-root; a VRT, e.g. stacked band layers, on an engine without
#: --allow-vrt: the upload is a flattened GeoTIFF copy).
UPLOAD_INSTEAD = ("path_not_allowed", "input_refused")


def _upload_inputs(client, request: dict[str, Any], prepared: PreparedJob, temps: list[str]) -> dict[str, Any]:
    request = dict(request)

    def upload(path: str) -> str:
        if str(path).startswith("upload:"):
            return path
        tif, temporary = as_geotiff(str(path))
        if temporary:
            temps.append(tif)
        return client.upload(tif)

    for key in prepared.files:
        value = request.get(key)
        if isinstance(value, list):
            request[key] = [upload(v) for v in value]
        elif value:
            request[key] = upload(value)
    return request


def plan_job(client, request: dict[str, Any], prepared: PreparedJob, *, upload: bool,
             temps: list[str]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Ask the engine for the plan of ``request`` (quick timeout): ``(request, plan)``.

    The request comes back with its inputs uploaded when the engine answered that it may not read
    them by path; the plan is None for an engine without ``POST /v1/plan``. Any other error is
    raised with ``stage = "plan"`` (nothing was submitted).
    """
    from .engine_client import EngineError

    quick = pf.with_timeout(client)
    try:
        return request, quick.plan(request)
    except EngineError as err:
        if not upload and getattr(err, "code", None) in UPLOAD_INSTEAD and prepared.files:
            request = _upload_inputs(client, request, prepared, temps)
            try:
                return request, quick.plan(request)
            except EngineError as again:
                err = again
        if pf.no_plan_endpoint(err):
            QgsMessageLog.logMessage(f"the engine has no plan endpoint ({err}); running without a pre-flight",
                                     LOG_TAG)
            return request, None
        err.stage = "plan"
        raise err


def spread_path_of(output_path: str) -> str:
    """Where a job's spread map is saved: beside its image, as the engine names it (``<name>.spread.tif``)."""
    path = Path(output_path)
    return str(path.with_name(path.stem + ".spread.tif"))


def run_job(client, prepared: PreparedJob, *, upload: bool = False,
            progress: Optional[ProgressFn] = None,
            cancelled: Callable[[], bool] = lambda: False,
            poll_s: float = 0.5,
            on_plan: Optional[Callable[[dict[str, Any], Optional[dict[str, Any]]], None]] = None) -> JobOutcome:
    """Run ``prepared`` on the engine behind ``client`` and download its result.

    Args:
        upload: upload the input files first (remote engine); otherwise paths are sent and the
            files are uploaded only if the engine answers that it may not read them.
        progress: called with (fraction 0..1, text) as the job advances.
        cancelled: polled; when it turns true the job is cancelled on the engine and
            ``EngineCancelled`` is raised.
        on_plan: when given, the engine's plan is asked for first (``POST /v1/plan``) and
            ``on_plan(request, plan)`` is called before anything is submitted; it raises to stop
            (e.g. :class:`~.preflight.PreflightRefused`). ``plan`` is None for an engine without
            the plan endpoint.
    Raises the engine client's exceptions (``EngineError`` carries the engine's message; a
    refused plan has ``stage == "plan"``).
    """
    from .engine_client import EngineError
    from .schema import OutOfRange

    temps: list[str] = []
    plan = None
    try:
        request = dict(prepared.request)
        try:  # the live engine's ranges (its OpenAPI, read once per engine)
            limits_of(client).check(prepared.task, request)
        except OutOfRange as err:
            raise RequestError(str(err)) from None
        if prepared.rasterize:
            spec = prepared.rasterize
            request[spec["field"]] = rasterize_mask(spec["vector"], spec["like"])
            temps.append(request[spec["field"]])
        if upload:
            request = _upload_inputs(client, request, prepared, temps)
        if on_plan is not None:
            request, plan = plan_job(client, request, prepared, upload=upload, temps=temps)
            on_plan(request, plan)
        try:
            job_id = client.submit(request)
        except EngineError as err:
            if upload or getattr(err, "code", None) not in UPLOAD_INSTEAD or not prepared.files:
                raise
            request = _upload_inputs(client, request, prepared, temps)
            job_id = client.submit(request)

        def on_progress(job: dict[str, Any]) -> None:
            if progress is not None:
                frac = job.get("progress")
                progress(float(frac) if isinstance(frac, (int, float)) else 0.0,
                         progress_text(job, denoises_windows(job, plan)))

        final = client.wait(job_id, poll=poll_s, on_progress=on_progress, cancelled=cancelled)
        final = final if isinstance(final, dict) else client.job(job_id)
        state = final.get("state")
        if state == "failed":
            raise EngineError(final.get("error") or "the engine job failed", None, "job_failed")
        Path(prepared.output_path).parent.mkdir(parents=True, exist_ok=True)
        path = client.download_result(job_id, prepared.output_path)
        result = dict(final.get("result") or {})
        spread = None
        if request.get("spread") and result.get("spread_url"):
            spread = client.download_spread(job_id, spread_path_of(prepared.output_path))
        return JobOutcome(path=str(path or prepared.output_path), job_id=job_id, result=result, plan=plan,
                          spread_path=spread)
    finally:
        remove_quietly(temps + list(prepared.temp_files))


def friendly_error(err: BaseException, spec: Optional[EngineSpec] = None) -> str:
    """One or two sentences for the message bar, with the engine's own message when it sent one."""
    from . import engine_client as ec

    where = spec.describe() if spec else "the engine"
    if isinstance(err, EngineConfigError):
        return str(err)
    if isinstance(err, RequestError):
        return str(err)
    if isinstance(err, ec.EngineAuthError):
        return (f"The {where} refused the token ({_detail(err)}). Check the token file or "
                "authentication configuration in DiffusionSat → Engine settings.")
    if isinstance(err, ec.EngineUnavailable):
        return (f"Cannot reach the {where}: {_detail(err)}. Start the engine or check its URL in "
                "DiffusionSat → Engine settings.")
    if isinstance(err, ec.EngineCancelled):
        return "Cancelled."
    if isinstance(err, ec.EngineStartError):
        return f"Could not start the local engine: {_detail(err)}"
    if isinstance(err, pf.PreflightRefused):
        return f"Not started: {err}"
    if isinstance(err, ec.EngineError) and getattr(err, "stage", None) == "plan":
        if 400 <= (getattr(err, "status", None) or 0) < 500:
            return f"The engine refused the request (nothing was started): {_detail(err)}"
        return f"The engine could not plan the job (nothing was started): {_detail(err)}"
    if isinstance(err, ec.EngineError):
        return f"The engine could not run the job: {_detail(err)}"
    return f"{type(err).__name__}: {err}"


def _detail(err: BaseException) -> str:
    for attr in ("message", "detail"):
        value = getattr(err, attr, None)
        if isinstance(value, str) and value:
            return value
    return str(err) or type(err).__name__


class EngineTask(QgsTask):
    """A job in QGIS's task manager: progress, cancel, and ``on_done(task)`` on the main thread.

    Before submitting, the task asks the engine for the plan of the job and emits ``planned``
    with the :class:`~.preflight.Preflight` (size, tiles, time estimate). A plan over the limits
    (``max_megapixels``, ``max_minutes``; 0 = no limit) emits ``confirmation_needed`` and waits,
    without blocking anything but this task, until :meth:`answer` is called on the main thread
    (or the task is cancelled); with ``ask=False`` such a plan is refused at once. Both signals
    are emitted from the task's thread: connections to main-thread code are queued.

    After it ends, ``outcome`` holds the :class:`JobOutcome`, or ``error`` the message to show
    (``None`` with ``was_cancelled`` True when the user cancelled, ``declined`` set to the reason
    when the plan was over the limits and not confirmed: nothing was submitted then).
    """

    planned = pyqtSignal(object)  # Preflight
    confirmation_needed = pyqtSignal(object)  # Preflight; answer with answer(bool)

    def __init__(self, prepared: PreparedJob, spec: EngineSpec, manager: EngineManager,
                 on_done: Optional[Callable[["EngineTask"], None]] = None, *,
                 max_megapixels: float = 0.0, max_minutes: float = 0.0, ask: bool = False,
                 plan_first: bool = True) -> None:
        super().__init__(prepared.describe(), QgsTask.Flag.CanCancel)
        self.prepared = prepared
        self.spec = spec
        self.manager = manager
        self.on_done = on_done
        self.outcome: Optional[JobOutcome] = None
        self.engine_limits: Optional[Limits] = None  # the engine's defaults and ranges, once it answered
        self.error: Optional[str] = None
        self.was_cancelled = False
        self.cancel_stopped_s: Optional[float] = None
        self.declined: Optional[str] = None
        self.status_text = ""
        self.limits = (float(max_megapixels or 0.0), float(max_minutes or 0.0))
        self.ask = ask
        self.plan_first = plan_first
        self.preflight: Optional[pf.Preflight] = None
        self._answered = threading.Event()
        self._accepted = False

    def _progress(self, fraction: float, text: str) -> None:
        self.status_text = text
        self.setProgress(max(0.0, min(100.0, fraction * 100.0)))

    def answer(self, accepted: bool) -> None:
        """The user's answer to ``confirmation_needed`` (main thread)."""
        self._accepted = bool(accepted)
        self._answered.set()

    def _on_plan(self, client, request: dict[str, Any], plan: Optional[dict[str, Any]]) -> None:
        """Worker thread, between the plan and the submission."""
        from . import engine_client as ec

        if plan is None:
            return
        check = pf.evaluate(client, request, plan, engine=pf.engine_key(self.spec),
                            max_megapixels=self.limits[0], max_minutes=self.limits[1])
        self.preflight = check
        self.status_text = check.summary()
        self.planned.emit(check)
        if not check.reasons():
            return
        if not self.ask:
            raise pf.PreflightRefused(check.refusal_text())
        self.status_text = "waiting for confirmation"
        self.confirmation_needed.emit(check)
        while not self._answered.wait(0.1):
            if self.isCanceled():
                raise ec.EngineCancelled("cancelled before the job was submitted", code="cancelled")
        if not self._accepted:
            raise pf.PreflightRefused(f"you declined it: {'; and '.join(check.reasons())}")

    def run(self) -> bool:  # worker thread: HTTP only
        from . import engine_client as ec

        try:
            client = self.manager.client(self.spec)
            self.engine_limits = limits_of(client)  # the dock takes the engine's ranges from them (main thread)
            if self.isCanceled():
                return self._cancelled(0.0)
            on_plan = (lambda request, plan: self._on_plan(client, request, plan)) if self.plan_first else None
            self.outcome = run_job(client, self.prepared, upload=self.spec.upload_inputs,
                                   progress=self._progress, cancelled=self.isCanceled, on_plan=on_plan)
            return True
        except ec.EngineCancelled as err:
            return self._cancelled(getattr(err, "stopped_s", None))
        except pf.PreflightRefused as err:
            self.declined = str(err)
            return False
        except (ec.EngineError, ec.EngineUnavailable, ec.EngineAuthError, EngineConfigError,
                RequestError, OSError) as err:
            self.error = friendly_error(err, self.spec)
        except Exception as err:  # noqa: BLE001 - shown to the user, traceback in the log
            self.error = f"Unexpected error: {type(err).__name__}: {err} (details in the DiffusionSat log)"
            QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG)
        if self.isCanceled():
            return self._cancelled(None)
        return False

    def _cancelled(self, stopped_s: Optional[float]) -> bool:
        """A cancel is not a failure: the task ends as completed (QGIS shows "Task failed" for a
        terminated one), with ``was_cancelled`` set and no outcome, its description saying so."""
        self.was_cancelled = True
        self.cancel_stopped_s = stopped_s
        if stopped_s is None:
            self.status_text = "cancelled; the engine had not confirmed that it stopped"
        else:
            self.status_text = f"cancelled; the engine stopped in {stopped_s:.1f} s"
        self.setDescription(f"{self.description()} (cancelled)")
        return True

    def finished(self, result: bool) -> None:  # main thread
        if not result and self.error is None and not self.was_cancelled and self.declined is None:
            self.was_cancelled = self.isCanceled()
            if not self.was_cancelled:
                self.error = "The task stopped without a result."
        if self.on_done is not None:
            self.on_done(self)
