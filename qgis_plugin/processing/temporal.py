"""``diffusionsat:temporal``: from dated images of a place, an image for another date."""

from __future__ import annotations

import re

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterExtent,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterString,
)

from ..compat import SOURCE_RASTER
from ..prepare import prepare_temporal
from ..requests import layer_date, parse_date
from .base import ENGINE_HELP, EngineAlgorithm


class TemporalAlgorithm(EngineAlgorithm):
    TASK = "temporal"

    def displayName(self) -> str:  # noqa: N802
        return "Generate an image for a date from dated layers"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>From INPUTS, images of one place taken on other dates, generates the image for "
            "DATE.</p><p>Each input's date comes from INPUT_DATES (comma-separated, in the order "
            "of INPUTS), else from the layer's temporal properties, its file's metadata or a date "
            "in its name.</p>" + ENGINE_HELP
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers("INPUTS", "Dated input layers", SOURCE_RASTER))
        self.addParameter(QgsProcessingParameterString(
            "INPUT_DATES", "Input dates, comma-separated (empty = from the layers)", optional=True))
        self.addParameter(QgsProcessingParameterString("DATE", "Target date (YYYY-MM-DD)"))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent (empty = the first layer's)", optional=True))
        self.add_sampling_parameters()
        self.add_spread_parameter()
        self.add_engine_options()
        self.add_output("Image for the target date")

    def prepare(self, parameters, context, feedback):
        layers = self.parameterAsLayerList(parameters, "INPUTS", context) or []
        text = (self.parameterAsString(parameters, "INPUT_DATES", context) or "").strip()
        if text:
            dates = [parse_date(t) for t in re.split(r"[,;\s]+", text) if t]
            if len(dates) != len(layers) or any(d is None for d in dates):
                raise QgsProcessingException(
                    f"INPUT_DATES needs one YYYY-MM-DD date per input layer ({len(layers)})")
        else:
            dates = [layer_date(lyr)[0] for lyr in layers]
        extent, extent_crs = None, None
        if self.optional_value(parameters, "EXTENT") is not None:
            extent_crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
            extent = self.parameterAsExtent(parameters, "EXTENT", context)
        prepared = prepare_temporal(
            layers, dates, self.date_value(parameters, "DATE", context, required=True),
            output_path=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            extent=extent, extent_crs=extent_crs,
            model=self.model_value(parameters, context), options=self.request_options(parameters, context),
        )
        prepared.source_name = layers[0].name() if layers else ""  # as the dock's (its first layer)
        return prepared
