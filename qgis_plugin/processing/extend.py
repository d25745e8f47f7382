"""``diffusionsat:extend``: extend (outpaint) a raster to a larger extent around it."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterExtent,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from ..compat import NUMBER_DOUBLE
from ..prepare import extended_grid, prepare_extend
from ..requests import RequestError, layer_date
from .base import ENGINE_HELP, EngineAlgorithm


class ExtendAlgorithm(EngineAlgorithm):
    TASK = "extend"

    def displayName(self) -> str:  # noqa: N802
        return "Extend (outpaint) a raster"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Makes a larger raster around INPUT that covers EXTENT: every pixel of INPUT is kept "
            "exactly (bit for bit), the new ones are generated to continue it without a seam.</p>"
            "<p>The output keeps INPUT's grid: its CRS, pixel size and pixel alignment; EXTENT (in "
            "any CRS) is snapped outward to that grid, and the output covers it and INPUT's own "
            "extent. All of INPUT's bands, with their data type and nodata, are in the output. The "
            "model reads bands 1, 2, 3 as red, green, blue; for another order give "
            "<code>{\"rgb_bands\": [3, 2, 1]}</code> in OPTIONS (advanced).</p>"
            "<p>DATE conditions the new pixels (empty = INPUT's date from its temporal properties "
            "or tags, else unknown); CLOUD_COVER, PROMPT, STEPS, GUIDANCE and SEED as for "
            "generate.</p>"
            "<p>From the command line: <code>qgis_process run diffusionsat:extend -- "
            "INPUT=scene.tif EXTENT='289000,294000,4639000,4644600 [EPSG:32633]' "
            "OUTPUT=/tmp/extended.tif</code> (extent order: xmin,xmax,ymin,ymax).</p>" + ENGINE_HELP
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster layer to extend"))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "New extent (to cover; larger than INPUT)"))
        self.addParameter(QgsProcessingParameterString(
            "DATE", "Date (YYYY-MM-DD; empty = the layer's temporal properties or tags, else unknown)",
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            "CLOUD_COVER", "Cloud cover (fraction 0..1; empty = unknown)", NUMBER_DOUBLE, optional=True,
            minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterString("PROMPT", "Prompt", optional=True))
        self.add_sampling_parameters()
        self.add_engine_options()
        self.add_output("Extended image")

    def prepare(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException("INPUT is not a raster layer")
        extent_crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
        if not extent_crs.isValid():
            extent_crs = layer.crs()  # an extent without [CRS]: in the layer's
        extent = self.parameterAsExtent(parameters, "EXTENT", context, extent_crs)
        date = self.date_value(parameters, "DATE", context) or layer_date(layer)[0]
        prepared = prepare_extend(
            layer, output_path=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            extent=extent, extent_crs=extent_crs, date=date,
            cloud_cover=self.optional_number(parameters, "CLOUD_COVER", context),
            prompt=self.parameterAsString(parameters, "PROMPT", context) or "",
            model=self.model_value(parameters, context), options=self.request_options(parameters, context),
        )
        prepared.source_name = layer.name()  # the result is named after it, as the dock's
        try:
            feedback.pushInfo(f"Output grid (the layer's pixels, grown): "
                              f"{extended_grid(layer, extent, extent_crs).summary()}")
        except RequestError:
            pass
        return prepared
