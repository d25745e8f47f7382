"""``diffusionsat:generate``: an image for an extent and a date."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterCrs,
    QgsProcessingParameterExtent,
    QgsProcessingOutputRasterLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProject,
)

from .. import schema
from ..compat import NUMBER_DOUBLE, NUMBER_INTEGER, set_advanced
from ..prepare import prepare_generate
from ..requests import DEFAULT_SIZE, round8
from .base import ENGINE_HELP, EngineAlgorithm


class GenerateAlgorithm(EngineAlgorithm):
    TASK = "generate"

    def displayName(self) -> str:  # noqa: N802
        return "Generate an image for an extent and a date"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Generates a synthetic satellite image that covers EXTENT exactly, conditioned on "
            "its place and ground resolution (derived by the engine from the extent, the CRS and "
            "the size), the DATE, the CLOUD_COVER fraction and an optional PROMPT.</p>"
            "<p>SIZE is the longest side in pixels; the other side follows the extent's shape on "
            "the ground (the engine decides the grid, as for the command line's --size). WIDTH and "
            "HEIGHT (advanced) set a side exactly. GSD (advanced) instead generates the extent at "
            "that many metres per pixel, of any size (over one model window the engine denoises "
            "overlapping windows jointly, as the command line's --gsd): use it for a large extent, "
            "where one SIZE image would be coarser than the training imagery (about 0.3-20 m/px). "
            "The output CRS is CRS, or the extent's CRS.</p>"
            "<p>From the command line: <code>qgis_process run diffusionsat:generate -- "
            "EXTENT='12.45,12.52,41.88,41.93 [EPSG:4326]' DATE=2021-06-15 SIZE=512 "
            "OUTPUT=/tmp/rome.tif</code> (extent order: xmin,xmax,ymin,ymax).</p>" + ENGINE_HELP
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        # Defaults and ranges: the engine's, as far as known when the provider loads (the fallback
        # table before any engine answered); every run is checked against the live engine's.
        limits = schema.current()
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent"))
        self.addParameter(QgsProcessingParameterCrs("CRS", "Output CRS (default: the extent's)", optional=True))
        self.addParameter(QgsProcessingParameterString("DATE", "Date (YYYY-MM-DD; empty = unknown)", optional=True))
        cloud = QgsProcessingParameterNumber("CLOUD_COVER", "Cloud cover (fraction 0..1; empty = unknown)",
                                             NUMBER_DOUBLE, optional=True, minValue=0.0, maxValue=1.0)
        self.addParameter(cloud)
        self.addParameter(QgsProcessingParameterString("PROMPT", "Prompt", optional=True))
        self.addParameter(QgsProcessingParameterNumber("SIZE", "Longest side (px, multiple of 8)", NUMBER_INTEGER,
                                                       defaultValue=DEFAULT_SIZE, minValue=8,
                                                       maxValue=limits.max_side))
        for name, label in (("WIDTH", "Width (px; overrides SIZE)"), ("HEIGHT", "Height (px; overrides SIZE)")):
            self.addParameter(set_advanced(QgsProcessingParameterNumber(
                name, label, NUMBER_INTEGER, optional=True, minValue=8, maxValue=limits.max_side)))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "GSD", "Ground resolution (m/px; overrides SIZE: the extent at that resolution, any size)",
            NUMBER_DOUBLE, optional=True, minValue=0.01, maxValue=10000.0)))
        self.add_sampling_parameters()
        spread = limits.get("generate", "spread")
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "SPREAD", "Uncertainty seeds (empty = off; 2 or more: a spread map of that many seeds)",
            NUMBER_INTEGER, optional=True, minValue=spread.minimum if spread.minimum is not None else 2,
            maxValue=spread.maximum if spread.maximum is not None else 16)))
        self.addParameter(set_advanced(QgsProcessingParameterString(
            "SCHEDULER", "Scheduler (empty = the engine's default; or e.g. ddim, dpm++, unipc, euler, pndm, "
            "default = the checkpoint's own)", optional=True)))
        self.add_engine_options()
        self.add_output("Generated image")
        self.addOutput(QgsProcessingOutputRasterLayer("SPREAD", "Spread map (with SPREAD)"))

    def prepare(self, parameters, context, feedback):
        extent_crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
        crs = self.parameterAsCrs(parameters, "CRS", context)
        if not crs.isValid():
            crs = extent_crs
        if not crs.isValid():
            crs = context.project().crs() if context.project() else QgsProject.instance().crs()
        if not crs.isValid():
            raise QgsProcessingException(
                "the extent has no CRS: write it as 'xmin,xmax,ymin,ymax [EPSG:4326]' or set CRS")
        extent = self.parameterAsExtent(parameters, "EXTENT", context, crs)
        width = self.optional_number(parameters, "WIDTH", context, integer=True)
        height = self.optional_number(parameters, "HEIGHT", context, integer=True)
        size = self.parameterAsInt(parameters, "SIZE", context)
        date = self.date_value(parameters, "DATE", context)
        options = self.options_value(parameters, context)
        gsd = self.optional_number(parameters, "GSD", context)
        if gsd is None and options.get("gsd") is not None:
            gsd = options.pop("gsd")  # {"gsd": 20} in OPTIONS: the engine takes gsd or size, not both
        if gsd is not None and (width or height):
            raise QgsProcessingException("GSD sets the output size from the extent: leave WIDTH and HEIGHT empty")
        job = prepare_generate(
            extent, crs, size=None if gsd is not None else size, gsd=gsd, width=round8(width) if width else None,
            height=round8(height) if height else None,
            output_path=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            date=date,
            cloud_cover=self.optional_number(parameters, "CLOUD_COVER", context),
            prompt=self.parameterAsString(parameters, "PROMPT", context) or "",
            **self.sampling_values(parameters, context),
            spread=self.optional_number(parameters, "SPREAD", context, integer=True),
            scheduler=(self.parameterAsString(parameters, "SCHEDULER", context) or "").strip() or None,
            model=self.model_value(parameters, context),
        )
        job.request.update(options)
        sides = f"{job.request['width'] if width else '…'}×{job.request['height'] if height else '…'} px" \
            if width or height else f"{size} px on the longest side"
        if gsd is not None:
            sides = f"{gsd:g} m/px over the extent"
        feedback.pushInfo(f"Target grid: {sides} in {job.request['crs'][:60]} (the engine's plan below)")
        return job
