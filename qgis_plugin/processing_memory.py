"""The Processing dialogs remember their values, per project and per user.

The DiffusionSat algorithms open a :class:`RememberingDialog` (through the algorithm's
``createCustomParametersWidget``, which the toolbox, the menus and the locator ask first): it
starts from the values last run in this project (QgsProject entry), else the user's last values
(QgsSettings, without layers), and stores the values of each run. ``processing.run()``, batch and
``qgis_process`` are not affected: scripts keep their explicit defaults.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from qgis.core import (
    QgsProcessingDestinationParameter,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
    QgsProcessingParameterFeatureSource,
    QgsProject,
    QgsSettings,
)

from . import memory

_LAYER_TYPES = (QgsProcessingParameterRasterLayer, QgsProcessingParameterVectorLayer,
                QgsProcessingParameterFeatureSource, QgsProcessingParameterMultipleLayers)


def _plain(value: Any) -> Any:
    """A JSON-able copy of a dialog value, or None for values that are not worth keeping."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return None


def remembered_values(alg, *, project: Optional[QgsProject] = None,
                      qsettings: Optional[QgsSettings] = None) -> dict[str, Any]:
    """The values to open ``alg``'s dialog with: the project's, else the user's."""
    key = f"processing/{alg.id()}"
    texts = [memory.load(key, "", project=project, user=False),
             (qsettings or QgsSettings()).value(memory.USER_PREFIX + key, "")]
    for text in texts:
        if not text:
            continue
        try:
            values = json.loads(str(text))
        except ValueError:
            continue
        if isinstance(values, dict) and values:
            return values
    return {}


def remember_values(alg, values: dict[str, Any], *, project: Optional[QgsProject] = None,
                    qsettings: Optional[QgsSettings] = None) -> None:
    """Keep ``values`` of a run of ``alg``: all in the project, all but layers for the user."""
    kept, for_user = {}, {}
    for param in alg.parameterDefinitions():
        if isinstance(param, QgsProcessingDestinationParameter):
            continue
        value = _plain(values.get(param.name()))
        if value is None:
            continue
        kept[param.name()] = value
        if not isinstance(param, _LAYER_TYPES):
            for_user[param.name()] = value
    key = f"processing/{alg.id()}"
    memory.save(key, json.dumps(kept), project=project, user=False)
    (qsettings or QgsSettings()).setValue(memory.USER_PREFIX + key, json.dumps(for_user))


def make_dialog(alg, parent=None):
    """The algorithm dialog, with the remembered values (None where Processing's GUI is missing)."""
    try:
        from processing.gui.AlgorithmDialog import AlgorithmDialog
    except ImportError:
        return None

    class RememberingDialog(AlgorithmDialog):
        def createProcessingParameters(self, *args, **kwargs):  # noqa: N802 - what Run reads
            values = super().createProcessingParameters(*args, **kwargs)
            remember_values(self.algorithm(), values)
            return values

    dialog = RememberingDialog(alg.create(), parent=parent)
    values = remembered_values(alg)
    if values:
        project = QgsProject.instance()
        values = {k: v for k, v in values.items()
                  if not isinstance(alg.parameterDefinition(k), _LAYER_TYPES) or project.mapLayer(str(v))
                  or isinstance(v, list)}
        dialog.setParameters(values)
    return dialog
