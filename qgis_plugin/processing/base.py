"""What every DiffusionSat algorithm shares: engine connection, progress/cancel bridge, outputs.

``prepareAlgorithm`` (main thread) reads layers and builds a :class:`PreparedJob`;
``processAlgorithm`` (any thread) only talks to the engine through :func:`run_job`, with
``feedback.isCanceled()`` cancelling the engine job and engine progress driving the progress bar.
The output layer gets the same style, temporal range and provenance as the dock's results.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any, Optional

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterString,
    QgsProject,
)
from qgis.PyQt.QtCore import QTimer

from .. import schema
from ..compat import NUMBER_DOUBLE, NUMBER_INTEGER, icon, set_advanced
from ..connection import EngineConfigError, resolve_spec, shared_manager
from ..layers import move_to_result_group, provenance, style_result, style_spread
from ..preflight import PreflightRefused, engine_key, evaluate, record_outcome
from ..requests import PreparedJob, RequestError, parse_date
from ..tasks import friendly_error, run_job
from ..results import result_name, spread_name

ENGINE_HELP = (
    "<p>The engine is the one set in DiffusionSat → Engine settings, or, when set, the one in the "
    "environment variables <code>DIFFUSIONSAT_URL</code> and <code>DIFFUSIONSAT_TOKEN_FILE</code> "
    "(for <code>qgis_process</code> and scripts).</p>"
    "<p>The output is an AI-generated (synthetic) image, labelled as such in its metadata.</p>"
    "<p>Before the job is submitted, the engine's plan is logged (output size, ground sample "
    "distance, tiles, model evaluations, a time estimate). A job over the limits in DiffusionSat → "
    "Engine settings (output megapixels, estimated minutes) fails with the reason unless "
    "ALLOW_LARGE (advanced) is set; a request the engine refuses fails before anything runs.</p>"
)


class ResultStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles a loaded output like the dock does (RGB, temporal range, provenance)."""

    # Processing holds post-processors by raw pointer: keep the Python objects alive.
    _alive: list["ResultStyler"] = []

    def __init__(self, date: Optional[_dt.date], info: dict[str, Any], warnings: list[str]) -> None:
        super().__init__()
        self.date = date
        self.info = info
        self.warnings = warnings

    @classmethod
    def create(cls, date, info, warnings) -> "ResultStyler":
        inst = cls(date, info, warnings)
        cls._alive.append(inst)
        del cls._alive[:-32]
        return inst

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 - QGIS API
        if layer is not None and layer.isValid():
            style_result(layer, date=self.date, info=self.info, warnings=self.warnings)
            project = context.project() or QgsProject.instance()
            if not move_to_result_group(layer, project):
                # QGIS versions that put the layer in the tree after this call: once they did
                layer_id = layer.id()
                QTimer.singleShot(0, lambda: move_to_result_group(project.mapLayer(layer_id), project))


class SpreadStyler(ResultStyler):
    """Styles a loaded spread map (a colour ramp with a legend) and puts it in the results group."""

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 - QGIS API
        if layer is not None and layer.isValid():
            style_spread(layer)
            if self.date is not None:
                from ..layers import set_temporal_range

                set_temporal_range(layer, self.date)
            project = context.project() or QgsProject.instance()
            if not move_to_result_group(layer, project):
                layer_id = layer.id()
                QTimer.singleShot(0, lambda: move_to_result_group(project.mapLayer(layer_id), project))


class EngineAlgorithm(QgsProcessingAlgorithm):
    """Base class: subclasses define TASK, the parameters and :meth:`prepare`."""

    #: Longer labels push the algorithm dialog's parameter panel wider than the dialog (at 688 px on
    #: 3.22 the "…" button that picks layers went out of sight): the detail goes to the tooltip.
    LABEL_CHARS = 26  # with " [optional]", within the 376 px the panel has at 688 px

    def addParameter(self, param, createOutput=True):  # noqa: N802 - QGIS's name
        text = param.description()
        if len(text) > self.LABEL_CHARS and " (" in text:
            if not param.help():
                param.setHelp(text)
            param.setDescription(text.split(" (", 1)[0])
        return super().addParameter(param, createOutput)

    TASK = ""
    OUTPUT = "OUTPUT"
    MODEL = "MODEL"
    OPTIONS = "OPTIONS"
    ALLOW_LARGE = "ALLOW_LARGE"

    def __init__(self) -> None:
        super().__init__()
        self._prepared: Optional[PreparedJob] = None
        self._limits: tuple[float, float] = (0.0, 0.0)
        self._allow_large = False
        self._load: Optional[tuple] = None

    def createInstance(self):  # noqa: N802
        return type(self)()

    def name(self) -> str:
        return self.TASK

    def icon(self):
        return icon(self.TASK or "diffusionsat")

    # -- parameters shared by the four tasks --------------------------------------------------

    def add_output(self, description: str) -> None:
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, description))
        self.addOutput(QgsProcessingOutputNumber("SEED", "Seed used"))
        self.addOutput(QgsProcessingOutputString("WARNINGS", "Engine warnings"))

    def add_engine_options(self) -> None:
        self.addParameter(set_advanced(QgsProcessingParameterString(
            self.MODEL, "Model ('auto', 'tiny', or a model folder on the engine; empty = the plugin setting)",
            optional=True)))
        self.addParameter(set_advanced(QgsProcessingParameterString(
            self.OPTIONS, "More request fields as JSON (e.g. {\"steps\": 30, \"seed\": 7})",
            optional=True, multiLine=True)))
        self.addParameter(set_advanced(QgsProcessingParameterBoolean(
            self.ALLOW_LARGE, "Allow a job over the limits (output megapixels, estimated minutes in the "
            "engine settings)", defaultValue=False, optional=True)))

    def add_sampling_parameters(self) -> None:
        """STEPS, GUIDANCE and SEED (advanced), with this task's defaults and ranges from the engine's
        schema as far as known when the provider loads; every run is checked against the live one."""
        limits = schema.current()
        steps, guidance, seed = (limits.get(self.TASK, name) for name in ("steps", "guidance", "seed"))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "STEPS", "Denoising steps", NUMBER_INTEGER, defaultValue=steps.default, minValue=steps.minimum,
            maxValue=steps.maximum)))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "GUIDANCE", "Guidance scale", NUMBER_DOUBLE, defaultValue=guidance.default, minValue=guidance.minimum,
            maxValue=guidance.maximum)))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "SEED", "Seed (empty = random, recorded in the output)", NUMBER_INTEGER, optional=True,
            minValue=seed.minimum)))

    def sampling_values(self, parameters, context) -> dict[str, Any]:
        """{"steps", "guidance"[, "seed"]} from :meth:`add_sampling_parameters`' fields."""
        values: dict[str, Any] = {"steps": self.parameterAsInt(parameters, "STEPS", context),
                                  "guidance": self.parameterAsDouble(parameters, "GUIDANCE", context)}
        seed = self.optional_number(parameters, "SEED", context, integer=True)
        if seed is not None:
            values["seed"] = seed
        return values

    SPREAD = "SPREAD"

    def add_spread_parameter(self) -> None:
        """SPREAD (advanced, empty = off): that many seeds, and a spread map (their per-pixel
        standard deviation) written beside the output, returned as the SPREAD output and loaded
        (styled, under the image) when the output is."""
        from qgis.core import QgsProcessingOutputRasterLayer

        spread = schema.current().get(self.TASK, "spread")
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            self.SPREAD, "Uncertainty seeds (empty = off; 2 or more: a spread map of that many seeds)",
            NUMBER_INTEGER, optional=True, minValue=spread.minimum if spread.minimum is not None else 2,
            maxValue=spread.maximum if spread.maximum is not None else 16)))
        self.addOutput(QgsProcessingOutputRasterLayer(self.SPREAD, "Spread map (with SPREAD)"))

    def request_options(self, parameters, context) -> dict[str, Any]:
        """The sampling fields (and SPREAD where the algorithm has it), with OPTIONS (JSON, the
        explicit word) on top."""
        values = self.sampling_values(parameters, context)
        if self.parameterDefinition(self.SPREAD) is not None:
            spread = self.optional_number(parameters, self.SPREAD, context, integer=True)
            if spread is not None:
                values["spread"] = spread
        return {**values, **self.options_value(parameters, context)}

    def model_value(self, parameters, context) -> Optional[str]:
        text = (self.parameterAsString(parameters, self.MODEL, context) or "").strip()
        if text:
            return text
        from ..settings import PluginSettings

        return PluginSettings.load().model or None

    def options_value(self, parameters, context) -> dict[str, Any]:
        text = (self.parameterAsString(parameters, self.OPTIONS, context) or "").strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as err:
            raise QgsProcessingException(f"OPTIONS is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise QgsProcessingException("OPTIONS must be a JSON object such as {\"steps\": 30}")
        return value

    @staticmethod
    def optional_value(parameters, name) -> Any:
        value = parameters.get(name)
        return None if value in (None, "") else value

    def optional_number(self, parameters, name, context, integer: bool = False):
        if self.optional_value(parameters, name) is None:
            return None
        return (self.parameterAsInt if integer else self.parameterAsDouble)(parameters, name, context)

    def date_value(self, parameters, name, context, required: bool = False) -> Optional[_dt.date]:
        text = (self.parameterAsString(parameters, name, context) or "").strip()
        if not text:
            if required:
                raise QgsProcessingException(f"{name} is required (YYYY-MM-DD)")
            return None
        d = parse_date(text)
        if d is None:
            raise QgsProcessingException(f"{name} {text!r} is not a date; use YYYY-MM-DD")
        return d

    # -- running -------------------------------------------------------------------------------

    def prepare(self, parameters, context, feedback) -> PreparedJob:
        raise NotImplementedError

    def prepareAlgorithm(self, parameters, context, feedback) -> bool:  # noqa: N802 - main thread
        from ..settings import PluginSettings

        try:
            self._prepared = self.prepare(parameters, context, feedback)
        except RequestError as err:
            raise QgsProcessingException(str(err)) from None
        settings = PluginSettings.load()
        self._limits = (float(settings.max_output_mpx), float(settings.max_minutes))
        self._allow_large = bool(self.parameterAsBool(parameters, self.ALLOW_LARGE, context))
        # Remember the load the dialog asked for: it is registered in this (main-thread) context,
        # but the dialog runs processAlgorithm with a context of its own, and 3.22's
        # takeResultsFrom() replaces the pending loads with that context's (empty) list.
        self._load = None
        out = self._prepared.output_path
        if context.willLoadLayerOnCompletion(out):
            details = context.layerToLoadOnCompletionDetails(out)
            self._load = (details.name, details.project, details.outputName)
        return True

    def register_load(self, context, key: str, path: str, name: str, styler) -> None:
        """Make ``context`` (the one processAlgorithm runs with) load ``path`` on completion, when
        the caller asked for it in prepareAlgorithm's context (possibly another one)."""
        if context.willLoadLayerOnCompletion(key):
            details = context.layerToLoadOnCompletionDetails(key)
            if key != path:  # the download made the path absolute
                loads = dict(context.layersToLoadOnCompletion())
                loads[path] = loads.pop(key)
                context.setLayersToLoadOnCompletion(loads)
                details = context.layerToLoadOnCompletionDetails(path)
        elif self._load is not None:
            _, project, output_name = self._load
            context.addLayerToLoadOnCompletion(path, QgsProcessingContext.LayerDetails(
                name, project, output_name or self.OUTPUT))
            details = context.layerToLoadOnCompletionDetails(path)
        else:
            return
        details.name = name
        details.setPostProcessor(styler)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - worker thread
        from ..engine_client import EngineCancelled, EngineError

        prepared = self._prepared
        if prepared is None:
            raise QgsProcessingException("the algorithm was not prepared")
        try:
            spec = resolve_spec()
        except EngineConfigError as err:
            raise QgsProcessingException(str(err)) from None
        feedback.pushInfo(f"Engine: {spec.describe()}")
        feedback.pushInfo("Request: " + json.dumps(prepared.request))

        last = {"key": None}

        def progress(fraction: float, text: str) -> None:
            feedback.setProgress(100.0 * fraction)
            # The dialog logs every progress text: one line when the job moves on (step, tile,
            # state), not one a poll with only the time left changed.
            key = re.sub(r" · about \d+ s left$", "", text or "")
            if text and key != last["key"]:
                last["key"] = key
                feedback.setProgressText(text)

        checked = {}

        def on_plan(request, plan) -> None:
            if plan is None:
                feedback.pushInfo("The engine gives no plan (an older engine): running without a pre-flight.")
                return
            check = evaluate(client, request, plan, engine=engine_key(spec),
                             max_megapixels=self._limits[0], max_minutes=self._limits[1])
            checked["preflight"] = check
            feedback.pushInfo(check.summary())
            if check.reasons():
                if not self._allow_large:
                    raise QgsProcessingException(
                        f"Refused before running: {check.refusal_text()}. Set ALLOW_LARGE (advanced "
                        "parameter) to run it anyway, or raise the limits in DiffusionSat → Engine settings.")
                feedback.pushWarning("Over the limits, running because ALLOW_LARGE is set: "
                                     + "; ".join(check.reasons()))

        try:
            client = shared_manager().client(spec)
            outcome = run_job(client, prepared, upload=spec.upload_inputs, progress=progress,
                              cancelled=feedback.isCanceled, on_plan=on_plan)
        except PreflightRefused as err:
            raise QgsProcessingException(str(err)) from None
        except EngineCancelled as err:
            stopped = getattr(err, "stopped_s", None)
            raise QgsProcessingException(
                f"Cancelled: the engine stopped the job in {stopped:.1f} s." if stopped is not None else
                "Cancelled: the engine was told to stop the job.") from None
        except (EngineError, EngineConfigError, RequestError, OSError) as err:
            raise QgsProcessingException(friendly_error(err, spec)) from None
        for warning in outcome.warnings:
            feedback.pushWarning(warning)
        rate = record_outcome(checked.get("preflight"), outcome.result)
        if rate is not None:
            feedback.pushInfo(f"Time estimates for this engine now use {rate:.3g} s per megapixel through the UNet.")
        info = provenance(outcome.path, outcome.result, prepared.request)
        # The dock's descriptive name with the [synthetic] marker (not the plain name chosen
        # before the run): the legend tells results apart and marks them synthetic either way.
        detail = f"×{prepared.request['factor']}" if prepared.task == "superres" and prepared.request.get(
            "factor") else ""
        name = result_name(prepared.task, source=getattr(prepared, "source_name", "") or "", date=prepared.date,
                           result=outcome.result, detail=detail)
        self.register_load(context, prepared.output_path, outcome.path, name,
                           ResultStyler.create(prepared.date, info, outcome.warnings))
        seed = outcome.result.get("seed")
        outputs = {
            self.OUTPUT: outcome.path,
            "SEED": seed if isinstance(seed, (int, float)) else None,
            "WARNINGS": "\n".join(outcome.warnings),
        }
        if outcome.spread_path:
            outputs["SPREAD"] = outcome.spread_path
            if context.willLoadLayerOnCompletion(outcome.path):  # loaded with its image, styled
                details = context.layerToLoadOnCompletionDetails(outcome.path)
                context.addLayerToLoadOnCompletion(outcome.spread_path, QgsProcessingContext.LayerDetails(
                    spread_name(name, prepared.request.get("spread")), details.project, "SPREAD"))
                context.layerToLoadOnCompletionDetails(outcome.spread_path).setPostProcessor(
                    SpreadStyler.create(prepared.date, info, []))
        return outputs


def _remembering_dialog(self, parent=None):
    """The toolbox's dialog for a DiffusionSat algorithm, with the values last used
    (:mod:`..processing_memory`); scripts are not affected."""
    from ..processing_memory import make_dialog

    return make_dialog(self, parent)


# Added here (not in the class body) to keep the class as it was; QGIS asks this first.
EngineAlgorithm.createCustomParametersWidget = _remembering_dialog
