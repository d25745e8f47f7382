"""The Processing provider ``diffusionsat``."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider

from ..compat import icon, plugin_metadata


class DiffusionSatProvider(QgsProcessingProvider):
    """Provides ``diffusionsat:generate``, ``:superres``, ``:inpaint``, ``:temporal``, ``:extend``,
    ``:enginestatus``."""

    def id(self) -> str:  # noqa: A003 - QGIS API name
        return "diffusionsat"

    def name(self) -> str:
        return "DiffusionSat"

    def longName(self) -> str:
        version = plugin_metadata().get("version", "")
        return f"DiffusionSat {version}".strip()

    def icon(self):
        return icon("diffusionsat")

    def svgIconPath(self) -> str:
        from ..compat import resource_path

        path = resource_path("icons", "diffusionsat.svg")
        return str(path) if path else ""

    def loadAlgorithms(self) -> None:
        from .extend import ExtendAlgorithm
        from .generate import GenerateAlgorithm
        from .inpaint import InpaintAlgorithm
        from .status import EngineStatusAlgorithm
        from .superres import SuperresAlgorithm
        from .temporal import TemporalAlgorithm

        for alg in (GenerateAlgorithm(), SuperresAlgorithm(), InpaintAlgorithm(), TemporalAlgorithm(),
                    ExtendAlgorithm(), EngineStatusAlgorithm()):
            self.addAlgorithm(alg)

    def supportedOutputRasterLayerExtensions(self) -> list[str]:
        # The engine writes Cloud-Optimized GeoTIFFs; other formats would need a conversion.
        return ["tif"]

    def defaultRasterFileExtension(self) -> str:
        return "tif"
