"""Jobs: a FIFO queue, one worker thread (one GPU), progress, cancellation, retention.

The HTTP layer only ever calls the non-blocking methods of :class:`JobManager` (submit, get,
cancel, list); the worker thread runs the tasks one after another with a shared
:class:`~engine.models.cache.ModelCache`, so a model is loaded once and reused. A job that raises
becomes ``failed`` with a message and the worker goes on with the next one: whatever goes wrong
while a job is in the worker's hands (its folder cannot be made, the runner raises anything at
all, the bookkeeping after it trips), that job, and only that job, ends ``failed`` (or
``cancelled``, if the user asked first) with ``finished`` set, so no client waits forever.

The queue is bounded (``max_queue``: a full queue answers 429 with ``Retry-After``) and each job
has a wall-clock limit (``max_job_seconds``): past it the job is stopped at the end of the current
denoising step and fails with code ``time_limit``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import Cancelled, DiffusionSatError, DiskFull, RasterError
from ..progress import CancelToken, Progress
from .config import DEFAULT_MAX_JOB_SECONDS, DEFAULT_MAX_QUEUE

log = logging.getLogger("engine.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)
#: Finished job records kept for GET /v1/jobs (their files follow the retention time).
MAX_FINISHED_RECORDS = 1000

#: runner(request, out_path, *, models, progress, cancel) -> TaskResult (engine.tasks.run_task)
Runner = Callable[..., Any]


def _iso(t: Optional[float]) -> Optional[str]:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Job:
    """One request's life: state, progress, timings, result. Mutated under the manager's lock."""

    id: str
    task: str
    request: Any
    folder: Path
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    cancel_token: CancelToken = field(default_factory=CancelToken)
    step: int = 0
    total_steps: int = 0
    tile: int = 0
    total_tiles: int = 1
    windows: bool = False  #: joint denoising over windows: step = windows done, tile = steps done (Progress.windows)
    fraction: float = 0.0
    message: str = "queued"
    error: Optional[str] = None
    error_code: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    progress_started: Optional[float] = None  #: first progress report (denoising began)
    result: Any = None  #: engine.tasks.TaskResult when done
    result_path: Optional[Path] = None
    expired: bool = False
    timed_out: bool = False  #: stopped by the engine's per-job time limit, not by the user

    def eta_s(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left, from the pace since denoising began (model loading is not extrapolated)."""
        if self.state != RUNNING or self.progress_started is None or self.fraction <= 0.0:
            return None
        elapsed = (now or time.time()) - self.progress_started
        return round(max(0.0, elapsed * (1.0 - self.fraction) / self.fraction), 1)

    def as_dict(self) -> dict[str, Any]:
        """The job as the API shows it: no server-side paths, a result URL instead."""
        result = None
        warnings: list[str] = []
        if self.result is not None:
            result = self.result.as_dict()
            result.pop("path", None)
            warnings = list(result.get("warnings", []))
            result["result_url"] = None if self.expired else f"/v1/jobs/{self.id}/result"
            asked = getattr(self.request, "spread", None)
            result["spread_url"] = None if self.expired or not asked else f"/v1/jobs/{self.id}/result/spread"
        return {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "progress": round(1.0 if self.state == DONE else self.fraction, 4),
            "step": self.step,
            "total_steps": self.total_steps,
            "tile": self.tile,
            "total_tiles": self.total_tiles,
            "windows": self.windows,
            "eta_s": self.eta_s(),
            "message": self.message,
            "error": self.error,
            "error_code": self.error_code,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "result": result,
            "expired": self.expired,
            "warnings": warnings,
        }


class JobManager:
    """The queue and its single worker thread.

    ``runner`` defaults to :func:`engine.tasks.run_task`; ``models`` is the shared model cache.
    Call :meth:`start` once and :meth:`shutdown` on exit.
    """

    def __init__(self, jobs_dir: Path, *, models: Any = None, runner: Optional[Runner] = None,
                 retention_s: float = 24 * 3600.0, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_job_seconds: Optional[float] = DEFAULT_MAX_JOB_SECONDS) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.models = models
        self.runner = runner
        self.retention_s = float(retention_s)
        self.max_queue = max(1, int(max_queue))
        self.max_job_seconds = None if max_job_seconds is None else float(max_job_seconds)
        self._durations: "deque[float]" = deque(maxlen=20)  #: of recent jobs, for Retry-After
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._queue: "deque[Job]" = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._current: Optional[Job] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="diffusionsat-worker", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel the running job and every queued one, and stop the worker."""
        with self._lock:
            self._stopping = True
            for job in list(self._queue):
                self._finish_cancelled(job, "cancelled: the engine is shutting down")
            self._queue.clear()
            if self._current is not None:
                self._current.cancel_token.cancel()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the API side (never blocks on a job) ------------------------------------------------

    def submit(self, request: Any) -> Job:
        job_id = uuid.uuid4().hex
        job = Job(id=job_id, task=getattr(request, "task", "generate"), request=request,
                  folder=self.jobs_dir / job_id)
        with self._lock:
            if self._stopping:
                from .errors import ApiError

                raise ApiError("the engine is shutting down; submit the job to a running engine",
                               status=503, code="shutting_down")
            if len(self._queue) >= self.max_queue:
                from .errors import QueueFull

                wait = self._retry_after_s()
                raise QueueFull(
                    f"the engine's queue is full ({len(self._queue)} jobs waiting, --max-queue "
                    f"{self.max_queue}); submit again in about {wait} s, or cancel jobs you no longer need",
                    retry_after=wait)
            self._jobs[job_id] = job
            self._queue.append(job)
            self._wake.notify_all()
        log.info("job %s queued (%s)", job_id, job.task)
        return job

    def _retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: the recent mean job time (under the lock)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return int(min(600, max(1, round(mean))))

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def snapshot(self, job_id: str) -> Optional[dict[str, Any]]:
        """The job's API dict, read consistently under the lock; None if unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.as_dict()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [job.as_dict() for job in self._jobs.values()]

    def queued_count(self) -> int:
        with self._lock:
            return len(self._queue)

    def running_id(self) -> Optional[str]:
        with self._lock:
            return None if self._current is None else self._current.id

    def cancel(self, job_id: str) -> Optional[dict[str, Any]]:
        """Cancel a job: a queued one never starts, a running one stops within one denoising step.

        The state reads ``cancelled`` at once; ``finished`` is set when the worker has actually
        stopped (immediately for a queued job). Cancelling a finished job changes nothing.
        Returns the job's dict, or None for an unknown id.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state == QUEUED:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                self._finish_cancelled(job, "cancelled before it started")
            elif job.state == RUNNING:
                job.cancel_token.cancel()
                job.state = CANCELLED
                job.message = "cancelling: stops at the end of the current step"
                log.info("job %s cancel requested", job_id)
            return job.as_dict()

    # ---- the worker --------------------------------------------------------------------------

    def _finish_cancelled(self, job: Job, message: str) -> None:
        job.state = CANCELLED
        job.message = message
        job.finished = time.time()
        log.info("job %s %s", job.id, message)

    def _next(self) -> Optional[Job]:
        with self._lock:
            while not self._queue and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            job = self._queue.popleft()
            job.state = RUNNING
            job.started = time.time()
            job.message = "loading the model"
            self._current = job
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            timer = None
            if self.max_job_seconds is not None:
                timer = threading.Timer(self.max_job_seconds, self._time_out, args=(job,))
                timer.daemon = True
                timer.start()
            try:
                self._run(job)
            except BaseException as err:  # noqa: BLE001 - the worker must survive anything a job does
                # Whatever escaped _run, this job (and only this one) ends for good.
                log.exception("job %s: unexpected error in the worker", job.id)
                try:
                    self._fail(job, f"internal error: {type(err).__name__}: {err}", "internal_error")
                except BaseException:  # noqa: BLE001 - last resort: never leave it running
                    with self._lock:
                        job.state, job.error_code, job.finished = FAILED, "internal_error", time.time()
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    if job.finished is None:  # belt and braces: a job the worker let go has stopped
                        job.state = CANCELLED if job.state == CANCELLED else FAILED
                        job.finished = time.time()
                    if job.started is not None:
                        self._durations.append(job.finished - job.started)
                    self._current = None
                    self._trim_records()

    def _time_out(self, job: Job) -> None:
        with self._lock:
            if job.state != RUNNING:
                return
            job.timed_out = True
            job.message = "stopping: over the engine's time limit per job"
        job.cancel_token.cancel()
        log.warning("job %s is over the time limit of %g s; stopping it", job.id, self.max_job_seconds)

    def _progress(self, job: Job) -> Callable[[Progress], None]:
        def update(p: Progress) -> None:
            with self._lock:
                if job.progress_started is None:
                    job.progress_started = time.time()
                job.step, job.total_steps = p.step, p.total_steps
                job.tile, job.total_tiles = p.tile, p.total_tiles
                job.windows = job.windows or p.windows  # sticky: the decode that follows reports tiles
                job.fraction = p.fraction
                if job.state == RUNNING:
                    job.message = p.message or "running"
        return update

    def _run(self, job: Job) -> None:
        runner = self.runner
        if runner is None:
            from ..tasks import run_task as runner
        out = job.folder / f"{job.task}.tif"
        log.info("job %s running", job.id)
        try:
            try:
                job.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise DiskFull(f"no space left in the engine's workdir {self.jobs_dir} for the job's "
                                   "result; free some space (or shorten --retention-hours)") from None
                raise RasterError(f"cannot create the job's folder in the engine's workdir {self.jobs_dir} "
                                  f"({err.strerror or err}); check that it is a writable folder") from None
            result = runner(job.request, out, models=self.models, progress=self._progress(job),
                            cancel=job.cancel_token)
            result_path = Path(result.path)
        except Cancelled:
            shutil.rmtree(job.folder, ignore_errors=True)
            if job.timed_out:
                self._fail(job, f"stopped after {self.max_job_seconds:g} s, the engine's time limit per job "
                                "(--max-job-seconds); request fewer steps or a smaller output", "time_limit")
                return
            with self._lock:
                self._finish_cancelled(job, "cancelled while running; nothing was written")
            return
        except DiffusionSatError as err:
            self._fail(job, str(err), _code(err))
            return
        except MemoryError:
            self._fail(job, "out of memory; request a smaller output or fewer models", "out_of_memory")
            return
        except Exception as err:  # noqa: BLE001 - a failed job must leave the server serving
            if type(err).__name__ == "OutOfMemoryError":
                self._fail(job, "the GPU ran out of memory; request a smaller output, or start the "
                                "engine with --dtype fp16 or --device cpu", "out_of_memory")
                return
            log.exception("job %s failed with an internal error", job.id)
            self._fail(job, f"internal error: {type(err).__name__}: {err}", "internal_error")
            return
        with self._lock:
            if job.state == CANCELLED:
                # The cancel came after the last step's check: honour it, drop the file.
                shutil.rmtree(job.folder, ignore_errors=True)
                self._finish_cancelled(job, "cancelled while running; nothing was kept")
                return
            job.state = DONE
            job.result = result
            job.result_path = result_path
            job.fraction = 1.0
            job.message = "done"
            job.finished = time.time()
        log.info("job %s done in %.1f s", job.id, job.finished - (job.started or job.finished))

    def _fail(self, job: Job, message: str, code: str) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)
        with self._lock:
            if job.state == CANCELLED:  # the user cancelled first: that is what they asked for
                self._finish_cancelled(job, "cancelled while running; nothing was written")
                return
            job.state = FAILED
            job.error = message
            job.error_code = code
            job.message = "failed"
            job.finished = time.time()
        log.warning("job %s failed: %s", job.id, message)

    # ---- retention ---------------------------------------------------------------------------

    def _trim_records(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINAL_STATES]
        for job in finished[: max(0, len(finished) - MAX_FINISHED_RECORDS)]:
            shutil.rmtree(job.folder, ignore_errors=True)
            del self._jobs[job.id]

    def sweep(self, now: Optional[float] = None) -> int:
        """Delete results older than the retention time, and job folders no record knows.

        Expired jobs stay listed (their result answers 410). Returns the number of folders removed.
        """
        now = time.time() if now is None else now
        removed = 0
        with self._lock:
            known = set(self._jobs)
            expired = [j for j in self._jobs.values()
                       if j.state in FINAL_STATES and not j.expired and j.finished is not None
                       and now - j.finished > self.retention_s]
            for job in expired:
                job.expired = True
                job.result_path = None
            # Records far past retention are dropped too, so memory stays bounded on a long run.
            for job in [j for j in self._jobs.values()
                        if j.expired and j.finished is not None and now - j.finished > 7 * self.retention_s]:
                del self._jobs[job.id]
        for job in expired:
            if job.folder.exists():
                shutil.rmtree(job.folder, ignore_errors=True)
                removed += 1
        # Folders of jobs from an earlier run of the server (no record) follow the same rule.
        for entry in list(self.jobs_dir.iterdir()) if self.jobs_dir.is_dir() else []:
            if entry.name in known:
                continue
            try:
                if now - entry.stat().st_mtime > self.retention_s:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                    removed += 1
            except OSError:
                continue
        return removed


def _code(err: BaseException) -> str:
    from .errors import error_code

    return error_code(err)
