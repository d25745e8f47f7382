"""The pre-flight of a job: the engine's plan of the request, a time estimate, and the limits.

Before a job is submitted, the plugin asks the engine for its plan (``POST /v1/plan``: output
size, GSD, tiles, UNet evaluations, the work in megapixels; the request is validated exactly as
for a job, and nothing runs). The time estimate is ``work × seconds per megapixel``: the work is
the megapixels that pass through the UNet (a generate runs the whole image at once, so a
3576×4096 px image costs 56 times a 512 px one for the same number of evaluations; the other
tasks run one model window per tile), and the seconds per megapixel are the engine's own
measurement of its denoising steps in finished jobs (``denoise_seconds`` over ``denoise_steps``,
so tiles it skipped do not count; a running average kept in QgsSettings per engine and model),
or, before any job has finished there, a conservative default for the engine's device. A plan whose output or estimated time exceeds the limits in the settings is
refused unless the user confirms (dock) or sets ``ALLOW_LARGE`` (Processing).

Everything here is plain Python on plain dicts, callable from a task's thread (QSettings is
reentrant: each call uses its own QgsSettings).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from qgis.core import QgsSettings

from .settings import PREFIX

#: Seconds a plan request may take before it counts as "no answer" (a plan takes tens of ms).
PLAN_TIMEOUT_S = 10.0
#: Before any job has finished on an engine: seconds per megapixel through the released models'
#: UNet (one evaluation; 0.05 s for a 512 px window in fp16 on a GPU); deliberately on the slow side.
DEFAULT_SECONDS_PER_MPX = {"cuda": 0.2, "mps": 1.2, "cpu": 4.0}
#: The built-in tiny test model (random weights) is much faster.
TINY_SECONDS_PER_MPX = {"cuda": 0.02, "cpu": 0.3}
#: Weight of the newest job in the running average of seconds per evaluation.
NEW_WEIGHT = 0.5
#: A job with less work than this (megapixels through the UNet, all steps) does not teach the
#: rate: its time is the per-step overhead, not pixels (a 16 x 8 px job measured 3,700 s per
#: megapixel, and the next large job's estimate became hours). 0.05 Mpx: 2 steps of 128 x 128 px.
MIN_LEARN_MPX = 0.05
ESTIMATES = PREFIX + "estimates/"


class PreflightRefused(Exception):
    """The job was not submitted: its plan is over the limits and the user did not confirm."""


# ---- seconds per evaluation, per engine -------------------------------------------------------


def engine_key(spec) -> str:
    """What the estimates of an engine are filed under: its URL, or, for the local engine the
    plugin starts (a new port each time), ``local:`` and its interpreter."""
    if getattr(spec, "mode", "") == "local":
        return f"local:{spec.python}"
    return str(getattr(spec, "url", "") or "unknown").rstrip("/")


def _settings_key(engine: str, model: str, task: str) -> str:
    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "_"

    return f"{ESTIMATES}{clean(engine)}/{clean(model or 'auto')}/{clean(task or 'generate')}/"


def stored_rate(engine: str, model: str, task: str,
                qsettings: Optional[QgsSettings] = None) -> Optional[tuple[float, int]]:
    """``(seconds per megapixel-step, number of jobs measured)`` for ``engine``, ``model`` and
    ``task``, or None. Per task: a ControlNet task (super-resolution, temporal) runs a second
    network beside the UNet at every step and measured ~5x generate's rate per megapixel."""
    s = qsettings or QgsSettings()
    key = _settings_key(engine, model, task)
    try:
        # (the earlier "seconds_per_eval" counted evaluations of any size: not reused)
        rate = float(s.value(key + "seconds_per_mpx", 0.0) or 0.0)
        runs = int(s.value(key + "jobs", 0) or 0)
    except (TypeError, ValueError):
        return None
    if not (rate > 0 and math.isfinite(rate)) or runs <= 0:
        return None
    return rate, runs


def record_rate(engine: str, model: str, task: str, seconds: Any, work_mpx: Any,
                qsettings: Optional[QgsSettings] = None) -> Optional[float]:
    """Fold a finished job (``seconds`` of denoising over the ``work_mpx`` megapixels it ran
    through the UNet) into the engine's running estimate; returns the new seconds per megapixel
    (None if unusable, or too small to measure: :data:`MIN_LEARN_MPX`)."""
    try:
        seconds, work_mpx = float(seconds), float(work_mpx)
    except (TypeError, ValueError):
        return None
    if not (seconds > 0 and math.isfinite(seconds)) or not (work_mpx > 0 and math.isfinite(work_mpx)):
        return None
    if work_mpx < MIN_LEARN_MPX:
        return None
    measured = seconds / work_mpx
    s = qsettings or QgsSettings()
    previous = stored_rate(engine, model, task, s)
    if previous is None:
        rate, runs = measured, 1
    else:
        rate, runs = (1 - NEW_WEIGHT) * previous[0] + NEW_WEIGHT * measured, previous[1] + 1
    key = _settings_key(engine, model, task)
    s.setValue(key + "seconds_per_mpx", rate)
    s.setValue(key + "jobs", runs)
    return rate


def device_kind(device: Optional[str]) -> str:
    text = (device or "").lower()
    for kind in ("cuda", "mps"):
        if text.startswith(kind):
            return kind
    return "cpu"


def is_tiny(model: str, model_px: Any) -> bool:
    """The built-in tiny model: asked for by name, or "auto" on an engine that has nothing else
    (its windows are 256 px)."""
    return model == "tiny" and model_px in (None, 256)


def default_rate(device: Optional[str], model: str, model_px: Any = None) -> float:
    kind = device_kind(device)
    if is_tiny(model, model_px):
        return TINY_SECONDS_PER_MPX.get(kind, TINY_SECONDS_PER_MPX["cpu"])
    return DEFAULT_SECONDS_PER_MPX.get(kind, DEFAULT_SECONDS_PER_MPX["cpu"])


# ---- the pre-flight ---------------------------------------------------------------------------


def describe_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return "under 1 min"
    minutes = seconds / 60.0
    if minutes < 600:
        return f"about {minutes:.0f} min"
    return f"about {minutes:.0f} min ({minutes / 60:.0f} h)"


@dataclass
class Preflight:
    """A plan with its time estimate, checked against the limits."""

    plan: dict[str, Any]
    seconds_per_mpx: float
    basis: str  # "measured on this engine (3 jobs)" or "default for cpu"
    device: str = ""
    model: str = ""
    engine: str = ""
    max_megapixels: float = 100.0
    max_minutes: float = 120.0

    @property
    def task(self) -> str:
        return str(self.plan.get("task") or "")

    @property
    def evaluations(self) -> int:
        try:
            return int(self.plan.get("unet_evaluations") or 0)
        except (TypeError, ValueError):
            return 0

    @property
    def megapixels(self) -> float:
        value = self.plan.get("output_megapixels")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return int(self.plan["width"]) * int(self.plan["height"]) / 1e6
        except (KeyError, TypeError, ValueError):
            return 0.0

    def _int(self, key: str, default: int) -> int:
        try:
            return int(self.plan.get(key) or default)
        except (TypeError, ValueError):
            return default

    @property
    def work_mpx(self) -> float:
        """Megapixels through the UNet over the whole job (the engine's, or from the plan's size,
        tiles and evaluations for an engine that predates it)."""
        value = self.plan.get("work_mpx")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
        if self.task == "generate":
            eval_px = self._int("width", 0) * self._int("height", 0)
        else:
            eval_px = self._int("model_px", 512) ** 2
        return self.evaluations * eval_px / 1e6

    @property
    def mpx_per_step(self) -> float:
        """Megapixels through the UNet in one denoising step of one tile."""
        value = self.plan.get("mpx_per_step")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
        return self.work_mpx / max(1, self._int("tiles", 1) * self._int("steps", 1))

    @property
    def estimate_s(self) -> float:
        return self.work_mpx * self.seconds_per_mpx

    def reasons(self) -> list[str]:
        """Why this job is over the limits (empty when it is not)."""
        out = []
        if self.max_megapixels > 0 and self.megapixels > self.max_megapixels:
            out.append(f"the output is {self.megapixels:,.1f} Mpx, more than the limit of "
                       f"{self.max_megapixels:g} Mpx")
        minutes = self.estimate_s / 60.0
        if self.max_minutes > 0 and minutes > self.max_minutes:
            took = f"{minutes:,.0f} min" if minutes >= 10 else f"{minutes:.2g} min"
            out.append(f"it would take about {took} (estimated), more than the limit of "
                       f"{self.max_minutes:g} min")
        return out

    #: Plan keys an engine may use for the windows (or tiles) it will not denoise.
    SKIPPED_KEYS = ("windows_skipped", "skipped_windows", "skipped_tiles", "tiles_skipped")

    @property
    def skipped_windows(self) -> int:
        for key in self.SKIPPED_KEYS:
            value = self.plan.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0

    def grid_text(self) -> str:
        p = self.plan
        tiles = int(p.get("tiles") or 1)
        gsd = p.get("gsd_m")
        gsd_text = f"{float(gsd):.3g} m/px · " if isinstance(gsd, (int, float)) else ""
        pieces = f"{tiles} tile{'s' if tiles != 1 else ''}"
        windows = p.get("windows")
        if p.get("joint_denoising") and isinstance(windows, int) and windows > 0:
            # generate --gsd: overlapping windows denoised together (one image), not separate tiles
            overlap = p.get("window_overlap_px")
            pieces = (f"{windows} window{'s' if windows != 1 else ''} denoised together"
                      + (f" ({overlap} px overlap)" if isinstance(overlap, int) and overlap > 0 else ""))
        skipped = self.skipped_windows
        if skipped:  # extend: windows wholly inside the known layer are not denoised
            pieces += f", {skipped} skipped (all known pixels)"
        return (f"{p.get('width')} × {p.get('height')} px ({self.megapixels:.3g} Mpx) · {gsd_text}"
                f"{pieces} · {self.evaluations:,} UNet evaluations "
                f"({self.work_mpx:,.3g} Mpx through the UNet)")

    def estimate_text(self) -> str:
        return (f"{describe_duration(self.estimate_s)} (an estimate: {self.seconds_per_mpx:.3g} s per "
                f"megapixel through the UNet, {self.basis})")

    def summary(self) -> str:
        """One line for the dock and the Processing log."""
        return f"Plan: {self.grid_text()} · time {self.estimate_text()}"

    def confirm_text(self) -> str:
        reasons = self.reasons()
        return (f"This {self.task} job is over your limits: {'; and '.join(reasons)}.\n\n"
                f"{self.grid_text()}\nEstimated time: {self.estimate_text()}.\n\n"
                "Run it anyway? (The limits are in DiffusionSat → Engine settings.)")

    def refusal_text(self) -> str:
        return (f"the job is over the limits: {'; and '.join(self.reasons())} ({self.grid_text()}; "
                f"estimated time {self.estimate_text()})")


def with_timeout(client, seconds: float = PLAN_TIMEOUT_S):
    """A copy of ``client`` whose requests give up after ``seconds`` (for quick calls)."""
    timeout = getattr(client, "timeout", None)
    if not isinstance(timeout, (int, float)) or timeout <= seconds:
        return client
    quick = copy.copy(client)
    quick.timeout = seconds
    return quick


def resolved_model(client, request: Mapping[str, Any], model_px: Any = None) -> str:
    """The model the engine will use for ``request``: its ``model``, else the engine's default;
    "auto" on an engine that has only the built-in model is "tiny"."""
    from .engine_client import EngineError

    name = str(request.get("model") or "").strip()
    if name and name != "auto":
        return name
    try:
        models = client.models()
    except EngineError:
        return name or "auto"
    if not name:
        name = str(models.get("default") or "auto")
    if name == "auto":
        names = [m.get("name") for m in models.get("models", []) if isinstance(m, dict)]
        if names == ["tiny"] and model_px in (None, 256):
            return "tiny"
    return name


def evaluate(client, request: Mapping[str, Any], plan: Mapping[str, Any], *, engine: str,
             max_megapixels: float, max_minutes: float) -> Preflight:
    """The :class:`Preflight` of ``plan``: the engine's device (``GET /v1/health``), the model,
    and the seconds per evaluation measured on this engine or the device's default."""
    from .engine_client import EngineError

    quick = with_timeout(client)
    try:
        device = str(quick.health().get("device") or "")
    except EngineError:
        device = ""
    model_px = plan.get("model_px")
    model = resolved_model(quick, request, model_px)
    stored = stored_rate(engine, model, str(plan.get("task") or request.get("task") or "generate"))
    if stored is not None:
        rate, runs = stored
        basis = f"measured on this engine ({runs} job{'s' if runs != 1 else ''})"
    else:
        rate = default_rate(device, model, model_px)
        what = "the tiny model" if is_tiny(model, model_px) else "the model"
        basis = f"default for {what} on {device or 'an unknown device'} until a job has finished"
    return Preflight(dict(plan), rate, basis, device=device, model=model, engine=engine,
                     max_megapixels=float(max_megapixels), max_minutes=float(max_minutes))


def no_plan_endpoint(err: BaseException) -> bool:
    """True when the engine predates ``POST /v1/plan`` (it answers 404 for the endpoint)."""
    return getattr(err, "status", None) in (404, 405) and getattr(err, "code", None) in (
        "not_found", "method_not_allowed", None) and "no job" not in str(err)


def measured_work(preflight: Preflight, result: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(seconds, megapixels)`` a finished job measured: the engine's own count of denoising steps
    run and their time when it reports them (skipped tiles and model loading left out), else the
    job's whole time over the planned work (an older engine)."""
    steps, seconds = result.get("denoise_steps"), result.get("denoise_seconds")
    if isinstance(steps, int) and steps > 0 and isinstance(seconds, (int, float)) and seconds > 0:
        return seconds, steps * preflight.mpx_per_step
    return result.get("seconds"), preflight.work_mpx


def record_outcome(preflight: Optional[Preflight], result: Mapping[str, Any]) -> Optional[float]:
    """After a job finished: fold its time into the engine's estimate (None if nothing to learn)."""
    if preflight is None or not preflight.engine:
        return None
    seconds, work = measured_work(preflight, result)
    return record_rate(preflight.engine, preflight.model, preflight.task or "generate", seconds, work)
