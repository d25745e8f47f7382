"""Names that moved between QGIS 3.22 (Qt5) and QGIS 3.3x/4.x (Qt6), resolved once.

Everything else in the plugin uses scoped enums that exist on every supported version; the few
that were renamed are looked up here so no module needs a version check of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from qgis.core import Qgis, QgsColorRampShader, QgsCoordinateReferenceSystem, QgsRasterLayerTemporalProperties
from qgis.PyQt.QtGui import QIcon


def _first(*candidates: Any) -> Any:
    for owner, names in candidates:
        obj = owner
        try:
            for name in names.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return obj
    raise AttributeError(f"none of {[n for _, n in candidates]} exists in this QGIS")


#: Raster temporal mode "fixed range" (Qgis.RasterTemporalMode since 3.22; the class enum before).
RASTER_FIXED_RANGE = _first(
    (Qgis, "RasterTemporalMode.FixedTemporalRange"),
    (QgsRasterLayerTemporalProperties, "ModeFixedTemporalRange"),
)

#: WKT2 (2019) for CRS definitions that have no authority code (Qgis.CrsWktVariant since 3.36).
WKT2_2019 = _first(
    (Qgis, "CrsWktVariant.Wkt2_2019"),
    (QgsCoordinateReferenceSystem, "WktVariant.WKT2_2019"),
    (QgsCoordinateReferenceSystem, "WKT2_2019"),
)

#: A colour ramp interpolated between its stops (Qgis.ShaderInterpolationMethod since 3.28).
RAMP_INTERPOLATED = _first(
    (Qgis, "ShaderInterpolationMethod.Linear"),
    (QgsColorRampShader, "Type.Interpolated"),
    (QgsColorRampShader, "Interpolated"),
)

MSG_INFO = Qgis.MessageLevel.Info
MSG_WARNING = Qgis.MessageLevel.Warning
MSG_CRITICAL = Qgis.MessageLevel.Critical
MSG_SUCCESS = Qgis.MessageLevel.Success


def plugin_dir() -> Path:
    """The folder of the installed plugin (``diffusionsat/``) or, in the repository, ``qgis_plugin/``."""
    return Path(__file__).parent


def resource_path(*parts: str) -> Optional[Path]:
    """A file shipped with the plugin: ``<plugin>/<parts>`` in the ZIP, or the repository's copy.

    The packaged plugin holds ``icons/`` and ``metadata.txt``; in a source checkout they live in
    ``resources/icons/`` and at the top level, one folder up.
    """
    here = plugin_dir()
    candidates = [here.joinpath(*parts)]
    if parts and parts[0] == "icons":
        candidates.append(here.parent.joinpath("resources", *parts))
        candidates.append(here.resolve().parent.joinpath("resources", *parts))
    else:
        candidates.append(here.parent.joinpath(*parts))
        candidates.append(here.resolve().parent.joinpath(*parts))
    for path in candidates:
        if path.exists():
            return path
    return None


def icon(name: str) -> QIcon:
    """The plugin's SVG icon ``name`` (without extension); an empty icon if it is missing."""
    path = resource_path("icons", f"{name}.svg")
    return QIcon(str(path)) if path else QIcon()


def plugin_metadata() -> dict[str, str]:
    """The ``[general]`` section of metadata.txt (version, name, ...); empty if not found."""
    import configparser

    path = resource_path("metadata.txt")
    if path is None:
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    return dict(parser["general"]) if parser.has_section("general") else {}


# Processing enums (Qgis.Processing* since 3.36; class-scoped before).
from qgis.core import QgsProcessing, QgsProcessingParameterDefinition, QgsProcessingParameterNumber  # noqa: E402

PARAM_ADVANCED = _first((Qgis, "ProcessingParameterFlag.Advanced"),
                        (QgsProcessingParameterDefinition, "Flag.FlagAdvanced"),
                        (QgsProcessingParameterDefinition, "FlagAdvanced"))
NUMBER_INTEGER = _first((Qgis, "ProcessingNumberParameterType.Integer"),
                        (QgsProcessingParameterNumber, "Type.Integer"),
                        (QgsProcessingParameterNumber, "Integer"))
NUMBER_DOUBLE = _first((Qgis, "ProcessingNumberParameterType.Double"),
                       (QgsProcessingParameterNumber, "Type.Double"),
                       (QgsProcessingParameterNumber, "Double"))
SOURCE_RASTER = _first((Qgis, "ProcessingSourceType.Raster"),
                       (QgsProcessing, "SourceType.TypeRaster"), (QgsProcessing, "TypeRaster"))
SOURCE_POLYGON = _first((Qgis, "ProcessingSourceType.VectorPolygon"),
                        (QgsProcessing, "SourceType.TypeVectorPolygon"), (QgsProcessing, "TypeVectorPolygon"))


def set_advanced(param):
    """Mark a Processing parameter as advanced (shown under "Advanced Parameters")."""
    param.setFlags(param.flags() | PARAM_ADVANCED)
    return param

# Layer filters for QgsMapLayerComboBox (Qgis.LayerFilter since 3.34).
from qgis.core import QgsMapLayerProxyModel  # noqa: E402

LAYER_RASTER = _first((Qgis, "LayerFilter.RasterLayer"), (QgsMapLayerProxyModel, "Filter.RasterLayer"),
                      (QgsMapLayerProxyModel, "RasterLayer"))
LAYER_POLYGON = _first((Qgis, "LayerFilter.PolygonLayer"), (QgsMapLayerProxyModel, "Filter.PolygonLayer"),
                       (QgsMapLayerProxyModel, "PolygonLayer"))
