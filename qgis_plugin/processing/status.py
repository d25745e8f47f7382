"""``diffusionsat:enginestatus``: is the engine there, which device and models does it have."""

from __future__ import annotations

import json

import html

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputString,
    QgsProcessingParameterFileDestination,
)

from ..compat import icon
from ..connection import EngineConfigError, resolve_spec, shared_manager
from ..tasks import friendly_error
from .base import ENGINE_HELP


class EngineStatusAlgorithm(QgsProcessingAlgorithm):
    def createInstance(self):  # noqa: N802
        return EngineStatusAlgorithm()

    def name(self) -> str:
        return "enginestatus"

    def displayName(self) -> str:  # noqa: N802
        return "Engine status"

    def icon(self):
        return icon("diffusionsat")

    def shortHelpString(self) -> str:  # noqa: N802
        return ("<p>Checks the DiffusionSat engine: version, device (CPU/GPU), queue and the "
                "installed models with their tasks. A local engine is started if that is the "
                "setting.</p>" + ENGINE_HELP)

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        # One visible parameter: with none, 3.22's toolbox runs the algorithm without a dialog
        # through MessageBarProgress, whose progress bar raises "setValue(int): unexpected type
        # 'float'", and the answer reaches only the log. The HTML report opens in the Results Viewer.
        self.addParameter(QgsProcessingParameterFileDestination(
            "REPORT", "Status report", "HTML files (*.html)", defaultValue="TEMPORARY_OUTPUT", optional=True))
        self.addOutput(QgsProcessingOutputString("STATUS", "Status"))
        self.addOutput(QgsProcessingOutputString("URL", "Engine URL"))
        self.addOutput(QgsProcessingOutputString("HEALTH", "Health (JSON)"))
        self.addOutput(QgsProcessingOutputString("MODELS", "Models (JSON)"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        from ..engine_client import EngineError

        try:
            spec = resolve_spec()
            client = shared_manager().client(spec)
            health = client.health()
            models = client.models()
        except (EngineConfigError, EngineError, OSError) as err:
            raise QgsProcessingException(friendly_error(err)) from None
        lines = [f"Engine {health.get('version')} at {client.url}: {health.get('status')}, "
                 f"device {health.get('device')}"]
        for m in models.get("models", []):
            lines.append(f"model {m.get('name')}: tasks {', '.join(m.get('tasks') or [])}")
        for line in lines:
            feedback.pushInfo(line)
        results = {"STATUS": "\n".join(lines), "URL": client.url, "HEALTH": json.dumps(health),
                   "MODELS": json.dumps(models)}
        report = self.parameterAsFileOutput(parameters, "REPORT", context)
        if report:
            write_report(report, lines, health, models)
            results["REPORT"] = report
        return results


def write_report(path: str, lines, health, models) -> None:
    """The status as a small HTML page (written atomically), shown in the Results Viewer."""
    import os

    rows = "".join(f"<tr><td>{html.escape(str(m.get('name')))}</td>"
                   f"<td>{html.escape(', '.join(m.get('tasks') or []))}</td></tr>"
                   for m in models.get("models", []))
    body = (f"<html><head><meta charset='utf-8'><title>DiffusionSat engine</title></head><body>"
            f"<h2>DiffusionSat engine</h2><p>{html.escape(lines[0])}</p>"
            f"<table border='1'><tr><th>Model</th><th>Tasks</th></tr>{rows}</table>"
            f"<pre>{html.escape(json.dumps(health, indent=1))}</pre></body></html>")
    tmp = f"{path}.part"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(body)
    os.replace(tmp, path)
