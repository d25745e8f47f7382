"""``diffusionsat:inpaint``: fill masked (cloudy, missing) pixels of a layer."""

from __future__ import annotations

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsRasterLayer,
    QgsVectorLayer,
)

from ..compat import SOURCE_POLYGON, SOURCE_RASTER
from ..prepare import MASK_NODATA, MASK_POLYGONS, MASK_RASTER, prepare_inpaint
from ..requests import layer_date
from .base import ENGINE_HELP, EngineAlgorithm


class InpaintAlgorithm(EngineAlgorithm):
    TASK = "inpaint"
    MASK_KINDS = (MASK_RASTER, MASK_POLYGONS, MASK_NODATA)

    def displayName(self) -> str:  # noqa: N802
        return "In-paint masked pixels (clouds, gaps)"

    def shortHelpString(self) -> str:  # noqa: N802
        return (
            "<p>Fills the pixels of INPUT that a mask marks, with synthetic content that matches "
            "their surroundings.</p>"
            "<p>The mask is: a raster layer (MASK) with a MASK_RULE such as "
            "<code>bits:14-15=3</code>, <code>values:3,8,9,10</code>, <code>gt:0.4</code> or a "
            "preset (<code>s2-scl-cloud</code>, <code>s2-qa60-cloud</code>, "
            "<code>landsat-cloud</code>, <code>fmask-cloud</code>); a polygon layer (MASK; "
            "SELECTED_ONLY to use its selection); or, with MASK_KIND = nodata, the input's own "
            "nodata. MASK_KIND auto picks from what MASK is.</p>" + ENGINE_HELP
        )

    def initAlgorithm(self, config=None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Layer to in-paint"))
        self.addParameter(QgsProcessingParameterEnum(
            "MASK_KIND", "Mask", options=["auto (from MASK)", "raster + rule", "polygons", "input's nodata"],
            defaultValue=0))
        self.addParameter(QgsProcessingParameterMapLayer(
            "MASK", "Mask layer (raster or polygons)", optional=True, types=[SOURCE_RASTER, SOURCE_POLYGON]))
        self.addParameter(QgsProcessingParameterString("MASK_RULE", "Mask rule (raster masks)", optional=True))
        self.addParameter(QgsProcessingParameterBoolean("SELECTED_ONLY", "Selected polygons only", defaultValue=False))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent (empty = whole layer)", optional=True))
        self.addParameter(QgsProcessingParameterString("PROMPT", "Prompt", optional=True))
        self.addParameter(QgsProcessingParameterString(
            "DATE", "Acquisition date of INPUT (YYYY-MM-DD; empty = the layer's temporal properties or "
            "tags, else unknown)", optional=True))
        self.add_sampling_parameters()
        self.add_spread_parameter()
        self.add_engine_options()
        self.add_output("In-painted image")

    def prepare(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        mask_layer = self.parameterAsLayer(parameters, "MASK", context) if self.optional_value(parameters, "MASK") else None
        kind_index = self.parameterAsEnum(parameters, "MASK_KIND", context)
        if kind_index == 0:
            if mask_layer is None:
                kind = MASK_NODATA
            elif isinstance(mask_layer, QgsRasterLayer):
                kind = MASK_RASTER
            elif isinstance(mask_layer, QgsVectorLayer):
                kind = MASK_POLYGONS
            else:
                raise QgsProcessingException("MASK must be a raster or a polygon layer")
        else:
            kind = self.MASK_KINDS[kind_index - 1]
        extent, extent_crs = None, None
        if self.optional_value(parameters, "EXTENT") is not None:
            extent_crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
            extent = self.parameterAsExtent(parameters, "EXTENT", context)
        prepared = prepare_inpaint(
            layer, output_path=self.parameterAsOutputLayer(parameters, self.OUTPUT, context),
            mask_kind=kind, mask_layer=mask_layer,
            mask_rule=self.parameterAsString(parameters, "MASK_RULE", context) or None,
            selected_only=self.parameterAsBool(parameters, "SELECTED_ONLY", context),
            extent=extent, extent_crs=extent_crs,
            prompt=self.parameterAsString(parameters, "PROMPT", context) or "",
            model=self.model_value(parameters, context), options=self.request_options(parameters, context),
            date=self.date_value(parameters, "DATE", context) or (layer_date(layer)[0] if layer is not None else None),
        )
        prepared.source_name = layer.name() if layer is not None else ""  # the result is named after it
        return prepared
