"""``diffusionsat:generate``: an image for an extent and a date."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterCrs,
    QgsProcessingParameterExtent,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProject,
)

from ..compat import NUMBER_DOUBLE, NUMBER_INTEGER, set_advanced
from ..prepare import prepare_generate
from ..requests import DEFAULT_SIZE, MAX_SIDE, RequestError, output_size, round8
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
            "the ground. WIDTH and HEIGHT (advanced) set both exactly. The output CRS is CRS, "
            "or the extent's CRS.</p>"
            "<p>From the command line: <code>qgis_process run diffusionsat:generate -- "
            "EXTENT='12.45,12.52,41.88,41.93 [EPSG:4326]' DATE=2021-06-15 SIZE=512 "
            "OUTPUT=/tmp/rome.tif</code> (extent order: xmin,xmax,ymin,ymax).</p>" + ENGINE_HELP
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent"))
        self.addParameter(QgsProcessingParameterCrs("CRS", "Output CRS (default: the extent's)", optional=True))
        self.addParameter(QgsProcessingParameterString("DATE", "Date (YYYY-MM-DD; empty = unknown)", optional=True))
        cloud = QgsProcessingParameterNumber("CLOUD_COVER", "Cloud cover (fraction 0..1; empty = unknown)",
                                             NUMBER_DOUBLE, optional=True, minValue=0.0, maxValue=1.0)
        self.addParameter(cloud)
        self.addParameter(QgsProcessingParameterString("PROMPT", "Prompt", optional=True))
        self.addParameter(QgsProcessingParameterNumber("SIZE", "Longest side (px, multiple of 8)", NUMBER_INTEGER,
                                                       defaultValue=DEFAULT_SIZE, minValue=8, maxValue=MAX_SIDE))
        for name, label in (("WIDTH", "Width (px; overrides SIZE)"), ("HEIGHT", "Height (px; overrides SIZE)")):
            self.addParameter(set_advanced(QgsProcessingParameterNumber(
                name, label, NUMBER_INTEGER, optional=True, minValue=8, maxValue=MAX_SIDE)))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "STEPS", "Denoising steps", NUMBER_INTEGER, defaultValue=20, minValue=1, maxValue=999)))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "GUIDANCE", "Guidance scale", NUMBER_DOUBLE, defaultValue=7.5, minValue=0.0, maxValue=50.0)))
        self.addParameter(set_advanced(QgsProcessingParameterNumber(
            "SEED", "Seed (empty = random, recorded in the output)", NUMBER_INTEGER, optional=True, minValue=0)))
        self.addParameter(set_advanced(QgsProcessingParameterString(
            "SCHEDULER", "Scheduler (default, ddim, dpm++, unipc, euler, pndm)", defaultValue="default",
            optional=True)))
        self.add_engine_options()
        self.add_output("Generated image")

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
        if width and height:
            width, height = round8(width), round8(height)
        else:
            try:
                width, height = output_size(extent, crs, self.parameterAsInt(parameters, "SIZE", context))
            except RequestError as err:
                raise QgsProcessingException(str(err)) from None
        date = self.date_value(parameters, "DATE", context)
        options = self.options_value(parameters, context)
        job = prepare_generate(
            extent, crs, width=width, height=height,
            output_path=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            date=date,
            cloud_cover=self.optional_number(parameters, "CLOUD_COVER", context),
            prompt=self.parameterAsString(parameters, "PROMPT", context) or "",
            steps=self.parameterAsInt(parameters, "STEPS", context),
            guidance=self.parameterAsDouble(parameters, "GUIDANCE", context),
            seed=self.optional_number(parameters, "SEED", context, integer=True),
            scheduler=(self.parameterAsString(parameters, "SCHEDULER", context) or "default").strip(),
            model=self.model_value(parameters, context),
        )
        job.request.update(options)
        feedback.pushInfo(f"Target grid: {width}×{height} px in {job.request['crs'][:60]}")
        return job
