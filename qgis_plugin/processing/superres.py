"""``diffusionsat:superres``: a Sentinel-2 layer at a finer resolution."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterExtent,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from .. import schema
from ..compat import NUMBER_INTEGER, SOURCE_RASTER
from ..prepare import prepare_superres
from ..requests import guess_band_name, layer_date, parse_band_names
from .base import ENGINE_HELP, EngineAlgorithm


class SuperresAlgorithm(EngineAlgorithm):
    TASK = "superres"

    def displayName(self) -> str:  # noqa: N802
        return "Super-resolve a Sentinel-2 layer"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Super-resolves Sentinel-2 imagery by FACTOR (output GSD = input GSD / FACTOR).</p>"
            "<p>Give either INPUT, one multiband layer (BANDS names its bands in order, e.g. "
            "<code>B02,B03,B04,B08</code>; empty = read from the file's band descriptions; "
            "<code>-</code> skips a band), or BAND_LAYERS, single-band layers, with BANDS naming "
            "each layer's band in the same order (empty = guessed from the layer names, e.g. "
            "<code>..._B04_10m</code>).</p>"
            "<p>EXTENT limits the work to a window; empty = the whole layer. Nodata stays nodata "
            "in the output.</p>" + ENGINE_HELP
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Sentinel-2 layer (multiband)", optional=True))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            "BAND_LAYERS", "…or single-band layers", SOURCE_RASTER, optional=True))
        self.addParameter(QgsProcessingParameterString("BANDS", "Band names in order (e.g. B02,B03,B04,B08)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent (empty = whole layer)", optional=True))
        factor = schema.current().get("superres", "factor")  # the engine's (see generate.py)
        self.addParameter(QgsProcessingParameterNumber("FACTOR", "Factor", NUMBER_INTEGER, defaultValue=factor.default,
                                                       minValue=factor.minimum, maxValue=factor.maximum))
        self.addParameter(QgsProcessingParameterString(
            "DATE", "Acquisition date (YYYY-MM-DD; empty = the layer's temporal properties or tags, "
            "else unknown)", optional=True))
        self.add_sampling_parameters()
        self.add_spread_parameter()
        self.add_engine_options()
        self.add_output("Super-resolved image")

    def prepare(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context) if self.optional_value(parameters, "INPUT") else None
        band_layers = self.parameterAsLayerList(parameters, "BAND_LAYERS", context) or []
        names = parse_band_names(self.parameterAsString(parameters, "BANDS", context) or "")
        if band_layers and names is None:
            names = [guess_band_name(lyr.name()) or guess_band_name(lyr.source()) for lyr in band_layers]
            if any(n is None for n in names):
                raise QgsProcessingException(
                    "cannot tell the Sentinel-2 band of every band layer from its name; give BANDS")
        extent, extent_crs = None, None
        if self.optional_value(parameters, "EXTENT") is not None:
            extent_crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
            extent = self.parameterAsExtent(parameters, "EXTENT", context)
        source_layer = layer or (band_layers[0] if band_layers else None)
        date = self.date_value(parameters, "DATE", context) or (
            layer_date(source_layer)[0] if source_layer is not None else None)
        prepared = prepare_superres(
            output_path=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            layer=layer, band_layers=band_layers, band_names=names, extent=extent, extent_crs=extent_crs,
            factor=self.parameterAsInt(parameters, "FACTOR", context),
            model=self.model_value(parameters, context), options=self.request_options(parameters, context),
            date=date,
        )
        prepared.source_name = source_layer.name() if source_layer is not None else ""  # as the dock's
        return prepared
