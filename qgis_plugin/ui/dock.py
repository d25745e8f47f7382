"""The DiffusionSat dock: Generate, In-paint, Super-resolve and Temporal tabs.

The widgets only collect values; each tab's ``prepare()`` turns them into a
:class:`~..requests.PreparedJob` through :mod:`..prepare` (the same code the Processing
algorithms use) and the controller (the plugin) runs it as a task.
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable, Optional

from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsExtentWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import QDate, Qt
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDateEdit,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..compat import LAYER_POLYGON, LAYER_RASTER, icon
from ..layers import output_folder, output_stem, unique_path
from ..prepare import (
    MASK_NODATA,
    MASK_POLYGONS,
    MASK_RASTER,
    prepare_generate,
    prepare_inpaint,
    prepare_superres,
    prepare_temporal,
)
from ..requests import (
    DEFAULT_SIZE,
    MAX_SIDE,
    PreparedJob,
    RequestError,
    default_date,
    grid_info,
    guess_band_name,
    layer_date,
    output_size,
    parse_band_names,
)

MASK_PRESETS = ["s2-scl-cloud", "s2-qa60-cloud", "landsat-cloud", "fmask-cloud", "bits:14-15=3", "nonzero"]


def _qdate(d: _dt.date) -> QDate:
    return QDate(d.year, d.month, d.day)


def _pydate(q: QDate) -> _dt.date:
    return _dt.date(q.year(), q.month(), q.day())


def _date_edit(d: Optional[_dt.date] = None) -> QDateEdit:
    edit = QDateEdit()
    edit.setCalendarPopup(True)
    edit.setDisplayFormat("yyyy-MM-dd")
    edit.setDate(_qdate(d or _dt.date.today()))
    return edit


class _Tab(QWidget):
    """A tab with a Run button at the bottom that calls ``controller.run_job(self.prepare())``."""

    task = ""

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__()
        self.dock = dock
        self.layout_ = QVBoxLayout(self)
        self.form = QFormLayout()
        self.layout_.addLayout(self.form)

    def finish(self, run_label: str) -> None:
        self.layout_.addStretch(1)
        self.run_button = QPushButton(icon(self.task), run_label)
        self.run_button.setObjectName(f"run_{self.task}")
        self.run_button.clicked.connect(self.run)
        self.layout_.addWidget(self.run_button)

    def output_path(self, date: Optional[_dt.date] = None) -> str:
        folder = output_folder(QgsProject.instance(), self.dock.settings().default_output_dir())
        return str(unique_path(folder, output_stem(self.task, date)))

    def prepare(self) -> PreparedJob:
        raise NotImplementedError

    def options(self) -> dict:
        """Request fields the conditional tasks share, from the settings (denoising steps)."""
        return {"steps": int(self.dock.settings().steps)}

    def run(self):
        """Prepare and start the job; errors go to the message bar. Returns the task or None."""
        try:
            prepared = self.prepare()
        except RequestError as err:
            self.dock.show_error(str(err))
            return None
        return self.dock.start(prepared)


class GenerateTab(_Tab):
    task = "generate"

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__(dock)
        self.extent: Optional[QgsRectangle] = None
        self.extent_crs: Optional[QgsCoordinateReferenceSystem] = None
        settings = dock.settings()

        row = QHBoxLayout()
        self.draw_button = QToolButton()
        self.draw_button.setObjectName("draw_extent")
        self.draw_button.setText("Draw extent")
        self.draw_button.setIcon(icon("extent"))
        self.draw_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip("Drag a rectangle on the map")
        self.canvas_button = QPushButton("Canvas extent")
        self.canvas_button.clicked.connect(self.use_canvas_extent)
        row.addWidget(self.draw_button)
        row.addWidget(self.canvas_button)
        row.addStretch(1)
        self.layout_.insertLayout(0, row)

        self.info = QLabel("No extent yet: draw a rectangle on the map.")
        self.info.setObjectName("extent_info")
        self.info.setWordWrap(True)
        self.layout_.insertWidget(1, self.info)

        self.size = QSpinBox()
        self.size.setRange(8, MAX_SIDE)
        self.size.setSingleStep(64)
        self.size.setValue(int(settings.size or DEFAULT_SIZE))
        self.size.setSuffix(" px")
        self.size.setToolTip("Longest side of the image; the other follows the extent's shape on the ground")
        self.size.valueChanged.connect(self.refresh_info)
        self.form.addRow("Longest side", self.size)

        date_row = QHBoxLayout()
        self.date = _date_edit(default_date(dock.canvas()))
        self.date_from_time = QToolButton()
        self.date_from_time.setText("⟲")
        self.date_from_time.setToolTip("Take the date from the temporal controller")
        self.date_from_time.clicked.connect(self.reset_date)
        date_row.addWidget(self.date, 1)
        date_row.addWidget(self.date_from_time)
        self.form.addRow("Date", date_row)

        cloud_row = QHBoxLayout()
        self.cloud_known = QCheckBox("known")
        self.cloud = QDoubleSpinBox()
        self.cloud.setRange(0.0, 100.0)
        self.cloud.setSuffix(" %")
        self.cloud.setDecimals(0)
        self.cloud.setEnabled(False)
        self.cloud_known.toggled.connect(self.cloud.setEnabled)
        cloud_row.addWidget(self.cloud_known)
        cloud_row.addWidget(self.cloud, 1)
        self.form.addRow("Cloud cover", cloud_row)

        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("optional, e.g. a satellite image of farmland")
        self.form.addRow("Prompt", self.prompt)

        advanced = QgsCollapsibleGroupBox("Advanced")
        advanced.setCollapsed(True)
        adv = QFormLayout(advanced)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1000)
        self.steps.setValue(int(settings.steps))
        adv.addRow("Steps", self.steps)
        self.guidance = QDoubleSpinBox()
        self.guidance.setRange(0.0, 50.0)
        self.guidance.setSingleStep(0.5)
        self.guidance.setValue(float(settings.guidance))
        adv.addRow("Guidance", self.guidance)
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        adv.addRow("Seed", self.seed)
        self.layout_.addWidget(advanced)
        self.finish("Generate")

    def reset_date(self) -> None:
        self.date.setDate(_qdate(default_date(self.dock.canvas())))

    def set_extent(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        self.extent = QgsRectangle(extent)
        self.extent_crs = QgsCoordinateReferenceSystem(crs)
        self.refresh_info()

    def use_canvas_extent(self) -> None:
        canvas = self.dock.canvas()
        if canvas is not None:
            self.set_extent(canvas.extent(), canvas.mapSettings().destinationCrs())

    def target_size(self) -> tuple[int, int]:
        if self.extent is None:
            raise RequestError("draw the extent to generate on the map first (Draw extent)")
        return output_size(self.extent, self.extent_crs, self.size.value())

    def refresh_info(self) -> None:
        if self.extent is None:
            return
        try:
            width, height = self.target_size()
            info = grid_info(self.extent, self.extent_crs, width, height)
        except RequestError as err:
            self.info.setText(str(err))
            return
        authid = self.extent_crs.authid() or "custom CRS"
        self.info.setText(f"{info.summary()} · {authid}")

    def cloud_cover(self) -> Optional[float]:
        return self.cloud.value() / 100.0 if self.cloud_known.isChecked() else None

    def prepare(self) -> PreparedJob:
        width, height = self.target_size()
        date = _pydate(self.date.date())
        seed = self.seed.value()
        return prepare_generate(
            self.extent, self.extent_crs, width=width, height=height, output_path=self.output_path(date),
            date=date, cloud_cover=self.cloud_cover(), prompt=self.prompt.text(), steps=self.steps.value(),
            guidance=self.guidance.value(), seed=seed if seed >= 0 else None, model=self.dock.settings().model,
        )


class InpaintTab(_Tab):
    task = "inpaint"

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__(dock)
        self.layer = QgsMapLayerComboBox()
        self.layer.setFilters(LAYER_RASTER)
        self.form.addRow("Layer", self.layer)

        self.kind_group = QButtonGroup(self)
        self.kind_raster = QRadioButton("Raster mask + rule")
        self.kind_polygons = QRadioButton("Polygons")
        self.kind_nodata = QRadioButton("The layer's nodata")
        self.kind_raster.setChecked(True)
        kinds = QVBoxLayout()
        for i, button in enumerate((self.kind_raster, self.kind_polygons, self.kind_nodata)):
            self.kind_group.addButton(button, i)
            kinds.addWidget(button)
        self.form.addRow("Mask", kinds)

        self.mask_raster = QgsMapLayerComboBox()
        self.mask_raster.setFilters(LAYER_RASTER)
        self.form.addRow("Mask raster", self.mask_raster)
        self.rule = QComboBox()
        self.rule.setEditable(True)
        self.rule.addItems(MASK_PRESETS)
        self.rule.setToolTip("bits:LO-HI=N, bit:B, values:V,…, gt:X, nonzero, nodata, or a preset")
        self.form.addRow("Rule", self.rule)
        self.mask_polygons = QgsMapLayerComboBox()
        self.mask_polygons.setFilters(LAYER_POLYGON)
        self.form.addRow("Polygon layer", self.mask_polygons)
        self.selected_only = QCheckBox("selected features only")
        self.form.addRow("", self.selected_only)
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("optional")
        self.form.addRow("Prompt", self.prompt)
        self.kind_group.buttonToggled.connect(self._update)
        self._update()
        self.finish("In-paint")

    def mask_kind(self) -> str:
        if self.kind_polygons.isChecked():
            return MASK_POLYGONS
        if self.kind_nodata.isChecked():
            return MASK_NODATA
        return MASK_RASTER

    def _update(self, *args) -> None:
        kind = self.mask_kind()
        for w in (self.mask_raster, self.rule):
            w.setEnabled(kind == MASK_RASTER)
        for w in (self.mask_polygons, self.selected_only):
            w.setEnabled(kind == MASK_POLYGONS)

    def prepare(self) -> PreparedJob:
        layer = self.layer.currentLayer()
        if layer is None:
            raise RequestError("choose the raster layer to in-paint")
        kind = self.mask_kind()
        mask_layer = {MASK_RASTER: self.mask_raster.currentLayer(),
                      MASK_POLYGONS: self.mask_polygons.currentLayer()}.get(kind)
        date = layer_date(layer)[0]
        return prepare_inpaint(
            layer, output_path=self.output_path(date), mask_kind=kind, mask_layer=mask_layer,
            mask_rule=self.rule.currentText(), selected_only=self.selected_only.isChecked(),
            prompt=self.prompt.text(), model=self.dock.settings().model, date=date, options=self.options(),
        )


class SuperresTab(_Tab):
    task = "superres"

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__(dock)
        self.mode_multi = QRadioButton("One multiband layer")
        self.mode_bands = QRadioButton("Single-band layers")
        self.mode_multi.setChecked(True)
        modes = QHBoxLayout()
        modes.addWidget(self.mode_multi)
        modes.addWidget(self.mode_bands)
        self.form.addRow("Source", modes)
        self.layer = QgsMapLayerComboBox()
        self.layer.setFilters(LAYER_RASTER)
        self.form.addRow("Layer", self.layer)
        self.bands = QLineEdit()
        self.bands.setPlaceholderText("from the file, or e.g. B02,B03,B04,B08")
        self.form.addRow("Bands", self.bands)

        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Layer", "Band"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setMinimumHeight(90)
        buttons = QHBoxLayout()
        self.add_band = QPushButton("Add band")
        self.add_band.clicked.connect(lambda: self.add_band_row())
        self.remove_band = QPushButton("Remove")
        self.remove_band.clicked.connect(self._remove_rows)
        buttons.addWidget(self.add_band)
        buttons.addWidget(self.remove_band)
        buttons.addStretch(1)
        self.band_box = QWidget()
        box = QVBoxLayout(self.band_box)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.table)
        box.addLayout(buttons)
        self.layout_.addWidget(self.band_box)

        self.extent = QgsExtentWidget()
        self.extent.setNullValueAllowed(True, "Whole layer")
        self.extent.clear()
        if dock.canvas() is not None:
            self.extent.setMapCanvas(dock.canvas())
        self.layout_.addWidget(QLabel("Extent (layer, canvas or drawn; empty = whole layer)"))
        self.layout_.addWidget(self.extent)
        self.factor = QSpinBox()
        self.factor.setRange(1, 64)
        self.factor.setValue(4)
        self.factor.setPrefix("× ")
        self.form.addRow("Factor", self.factor)
        self.mode_multi.toggled.connect(self._update)
        self._update()
        self.finish("Super-resolve")

    def _update(self, *args) -> None:
        multi = self.mode_multi.isChecked()
        self.layer.setEnabled(multi)
        self.bands.setEnabled(multi)
        self.band_box.setEnabled(not multi)

    def add_band_row(self, layer: Optional[QgsRasterLayer] = None, band: str = "") -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        combo = QgsMapLayerComboBox()
        combo.setFilters(LAYER_RASTER)
        if layer is not None:
            combo.setLayer(layer)
        name = QLineEdit(band or guess_band_name(combo.currentLayer().name() if combo.currentLayer() else "") or "")
        name.setPlaceholderText("B04")
        combo.layerChanged.connect(lambda lyr, edit=name: edit.setText(guess_band_name(lyr.name()) or edit.text())
                                   if lyr is not None else None)
        self.table.setCellWidget(row, 0, combo)
        self.table.setCellWidget(row, 1, name)

    def _remove_rows(self) -> None:
        for row in sorted({i.row() for i in self.table.selectedIndexes()} or {self.table.rowCount() - 1},
                          reverse=True):
            if row >= 0:
                self.table.removeRow(row)

    def band_rows(self) -> list[tuple[object, str]]:
        rows = []
        for row in range(self.table.rowCount()):
            combo = self.table.cellWidget(row, 0)
            edit = self.table.cellWidget(row, 1)
            rows.append((combo.currentLayer(), edit.text().strip()))
        return rows

    def extent_value(self):
        if not self.extent.isValid() or self.extent.outputExtent().isEmpty():
            return None, None
        return self.extent.outputExtent(), self.extent.outputCrs()

    def prepare(self) -> PreparedJob:
        extent, extent_crs = self.extent_value()
        if self.mode_multi.isChecked():
            layer = self.layer.currentLayer()
            if layer is None:
                raise RequestError("choose the Sentinel-2 layer to super-resolve")
            date = layer_date(layer)[0]
            return prepare_superres(output_path=self.output_path(date), layer=layer,
                                    band_names=parse_band_names(self.bands.text()), extent=extent,
                                    extent_crs=extent_crs, factor=self.factor.value(),
                                    model=self.dock.settings().model, date=date, options=self.options())
        rows = self.band_rows()
        if not rows or any(lyr is None for lyr, _ in rows):
            raise RequestError("add the band layers (one row per band) and choose a layer in each")
        missing = [str(i + 1) for i, (_, name) in enumerate(rows) if not name]
        if missing:
            raise RequestError(f"name the Sentinel-2 band of row(s) {', '.join(missing)} (e.g. B04)")
        layers = [lyr for lyr, _ in rows]
        date = layer_date(layers[0])[0]
        return prepare_superres(output_path=self.output_path(date), band_layers=layers,
                                band_names=[name for _, name in rows], extent=extent, extent_crs=extent_crs,
                                factor=self.factor.value(), model=self.dock.settings().model, date=date,
                                options=self.options())


class TemporalTab(_Tab):
    task = "temporal"

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__(dock)
        self.table = QTableWidget(0, 2)
        self.table.setObjectName("temporal_layers")
        self.table.setHorizontalHeaderLabels(["Layer", "Date (YYYY-MM-DD)"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setMinimumHeight(110)
        self.layout_.insertWidget(0, QLabel("Tick the dated layers of one place to use:"))
        self.layout_.insertWidget(1, self.table)
        refresh = QPushButton("Refresh layers")
        refresh.clicked.connect(self.refresh_layers)
        self.layout_.insertWidget(2, refresh)
        self.date = _date_edit(default_date(dock.canvas()))
        self.form.addRow("Target date", self.date)
        self.refresh_layers()
        self.finish("Generate for date")

    def refresh_layers(self) -> None:
        """List the project's raster layers; dates from temporal properties, metadata or names."""
        checked = {lid for lid, _ in self._checked_rows()}
        self.table.setRowCount(0)
        for layer in QgsProject.instance().mapLayers().values():
            if not isinstance(layer, QgsRasterLayer):
                continue
            row = self.table.rowCount()
            self.table.insertRow(row)
            item = QTableWidgetItem(layer.name())
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            d, source = layer_date(layer)
            use = layer.id() in checked or (not checked and d is not None and source == "temporal properties")
            item.setCheckState(Qt.CheckState.Checked if use else Qt.CheckState.Unchecked)
            item.setData(Qt.ItemDataRole.UserRole, layer.id())
            self.table.setItem(row, 0, item)
            date_item = QTableWidgetItem(d.isoformat() if d else "")
            date_item.setToolTip(f"from {source}" if source else "type the acquisition date")
            self.table.setItem(row, 1, date_item)

    def _checked_rows(self) -> list[tuple[str, str]]:
        rows = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.checkState() == Qt.CheckState.Checked:
                date_item = self.table.item(row, 1)
                rows.append((item.data(Qt.ItemDataRole.UserRole), date_item.text() if date_item else ""))
        return rows

    def set_checked(self, layer_ids: list[str]) -> None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            state = Qt.CheckState.Checked if item.data(Qt.ItemDataRole.UserRole) in layer_ids else Qt.CheckState.Unchecked
            item.setCheckState(state)

    def prepare(self) -> PreparedJob:
        from ..requests import parse_date

        rows = self._checked_rows()
        if not rows:
            raise RequestError("tick at least one dated layer")
        project = QgsProject.instance()
        layers, dates = [], []
        for layer_id, text in rows:
            layer = project.mapLayer(layer_id)
            if layer is None:
                raise RequestError("a ticked layer was removed; press Refresh layers")
            d = parse_date(text)
            if text.strip() and d is None:
                raise RequestError(f"{text!r} ({layer.name()}) is not a date; use YYYY-MM-DD")
            layers.append(layer)
            dates.append(d)
        date = _pydate(self.date.date())
        return prepare_temporal(layers, dates, date, output_path=self.output_path(date),
                                model=self.dock.settings().model, options=self.options())


class DiffusionSatDock(QgsDockWidget):
    """The dock. ``controller`` provides ``settings()``, ``start(prepared)``, ``show_error(msg)``,
    ``open_settings()`` and ``canvas()``; the plugin is the controller. The status area shows the
    engine and the pre-flight of the last job (:meth:`show_plan`)."""

    def __init__(self, controller, parent: Optional[QWidget] = None) -> None:
        super().__init__("DiffusionSat", parent)
        self.setObjectName("DiffusionSatDock")
        self.controller = controller
        body = QWidget()
        layout = QVBoxLayout(body)
        self.tabs = QTabWidget()
        self.generate = GenerateTab(self)
        self.inpaint = InpaintTab(self)
        self.superres = SuperresTab(self)
        self.temporal = TemporalTab(self)
        self.tabs.addTab(self.generate, icon("generate"), "Generate")
        self.tabs.addTab(self.inpaint, icon("inpaint"), "In-paint")
        self.tabs.addTab(self.superres, icon("superres"), "Super-resolve")
        self.tabs.addTab(self.temporal, icon("temporal"), "Temporal")
        layout.addWidget(self.tabs)
        self.plan_label = QLabel("")
        self.plan_label.setObjectName("plan_status")
        self.plan_label.setWordWrap(True)
        self.plan_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plan_label.setToolTip("The engine's plan of the last job: output size, ground sample distance, "
                                   "tiles, model evaluations and a time estimate")
        self.plan_label.hide()
        layout.addWidget(self.plan_label)
        status_row = QHBoxLayout()
        self.engine_label = QLabel("")
        self.engine_label.setObjectName("engine_status")
        self.engine_label.setWordWrap(True)
        engine_button = QPushButton("Engine…")
        engine_button.clicked.connect(lambda: controller.open_settings())
        status_row.addWidget(self.engine_label, 1)
        status_row.addWidget(engine_button)
        layout.addLayout(status_row)
        note = QLabel("Results are AI-generated (synthetic) images, labelled as such. All inference "
                      "runs on the engine you configure; nothing is sent elsewhere.")
        note.setWordWrap(True)
        note.setStyleSheet("color: gray; font-size: small;")
        layout.addWidget(note)
        self.setWidget(body)
        self.refresh_engine_label()

    # -- the controller's services, for the tabs --------------------------------------------------

    def settings(self):
        return self.controller.settings()

    def canvas(self):
        return self.controller.canvas()

    def start(self, prepared: PreparedJob):
        return self.controller.start(prepared)

    def show_error(self, message: str) -> None:
        self.controller.show_error(message)

    def show_plan(self, text: str) -> None:
        """The pre-flight line of the last job (plan, estimate, refusal or outcome)."""
        self.plan_label.setText(text)
        self.plan_label.setVisible(bool(text))

    def refresh_engine_label(self) -> None:
        self.engine_label.setText(self.controller.engine_summary())

    def connect_extent_tool(self, tool, activate: Callable[[bool], None]) -> None:
        """Wire the Draw extent button to the map tool (checked while the tool is active)."""
        self.generate.draw_button.toggled.connect(activate)
        tool.extentDrawn.connect(self.generate.set_extent)
