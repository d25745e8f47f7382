"""The map tool for drawing the extent to generate: drag a rectangle on the map."""

from __future__ import annotations

from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle
from qgis.gui import QgsMapToolExtent
from qgis.PyQt.QtCore import pyqtSignal


class ExtentMapTool(QgsMapToolExtent):
    """QGIS's rectangle tool; ``extentDrawn`` carries the rectangle *and* the canvas CRS it is in
    (the canvas CRS may change later, the drawn extent keeps its own)."""

    extentDrawn = pyqtSignal(QgsRectangle, QgsCoordinateReferenceSystem)

    def __init__(self, canvas) -> None:
        super().__init__(canvas)
        self._canvas = canvas
        self.extentChanged.connect(self._on_extent)

    def _on_extent(self, rect: QgsRectangle) -> None:
        if rect is None or rect.isEmpty():
            return
        crs = self._canvas.mapSettings().destinationCrs()
        self.extentDrawn.emit(QgsRectangle(rect), QgsCoordinateReferenceSystem(crs))
