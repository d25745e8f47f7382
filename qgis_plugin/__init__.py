"""DiffusionSat for QGIS: generate, in-paint, super-resolve and date satellite imagery.

QGIS calls :func:`classFactory` with its interface (``None`` inside ``qgis_process``, where only
``initProcessing()`` runs). The plugin speaks HTTP to a DiffusionSat engine in its own Python
environment; nothing here imports torch or numpy.
"""


def classFactory(iface):  # noqa: N802 - QGIS's name
    from .plugin import DiffusionSatPlugin

    return DiffusionSatPlugin(iface)
