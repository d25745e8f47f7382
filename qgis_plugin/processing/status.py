"""``diffusionsat:enginestatus``: is the engine there, which device and models does it have."""

from __future__ import annotations

import json

from qgis.core import QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingOutputString

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
        feedback.pushInfo(f"Engine {health.get('version')} at {client.url}: {health.get('status')}, "
                          f"device {health.get('device')}")
        for m in models.get("models", []):
            feedback.pushInfo(f"model {m.get('name')}: tasks {', '.join(m.get('tasks') or [])}")
        return {"URL": client.url, "HEALTH": json.dumps(health), "MODELS": json.dumps(models)}
