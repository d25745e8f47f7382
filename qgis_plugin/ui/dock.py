"""The DiffusionSat dock: Generate, In-paint, Super-resolve, Temporal and Extend tabs.

The widgets only collect values; each tab's ``prepare()`` turns them into a
:class:`~..requests.PreparedJob` through :mod:`..prepare` (the same code the Processing
algorithms use) and the controller (the plugin) runs it as a task.
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable, Optional

from qgis.core import QgsCoordinateReferenceSystem, QgsGeometry, QgsProject, QgsRasterLayer, QgsRectangle, QgsWkbTypes
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsExtentWidget, QgsMapLayerComboBox, QgsRubberBand
from qgis.PyQt.QtCore import QDate, QEvent, Qt
from qgis.PyQt.QtGui import QColor
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
    QProgressBar,
    QPushButton,
    QScrollArea,
    QRadioButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .. import memory, schema
from ..checks import GSD_RANGE_M, RangeWarning, cloud_warning, date_warning, gsd_warning
from ..compat import LAYER_POLYGON, LAYER_RASTER, icon
from ..results import band_name_of, band_names_of, sort_by_band
from ..layers import output_folder, output_stem, unique_path
from ..prepare import (
    MASK_NODATA,
    MASK_POLYGONS,
    MASK_RASTER,
    extended_grid,
    extent_in,
    prepare_extend,
    prepare_generate,
    prepare_inpaint,
    prepare_superres,
    prepare_temporal,
)
from ..requests import (
    DEFAULT_GSD_M,
    DEFAULT_SIZE,
    PreparedJob,
    RequestError,
    default_date,
    grid_info,
    ground_size,
    gsd_for_extent,
    gsd_size,
    layer_date,
    output_size,
    parse_band_names,
)

#: Mask-rule presets and what each selects (shown in the list, its tooltip and under it).
MASK_PRESETS = [
    ("s2-scl-cloud", "Sentinel-2 L2A SCL band: cloud shadow, medium/high cloud, cirrus (classes 3, 8, 9, 10)"),
    ("s2-qa60-cloud", "Sentinel-2 L1C QA60 band: opaque clouds and cirrus (bits 10, 11)"),
    ("landsat-cloud", "Landsat Collection 2 QA_PIXEL: dilated cloud, cirrus, cloud, cloud shadow"),
    ("fmask-cloud", "Fmask output: cloud and cloud shadow (values 2, 4)"),
    ("bits:14-15=3", "Landsat Collection 1 BQA: high-confidence cirrus (bits 14-15 = 3)"),
    ("nonzero", "Any non-zero pixel of the mask raster (a 0/1 mask, a probability > 0)"),
]
PRESET_HELP = dict(MASK_PRESETS)
#: The largest value a QSpinBox holds.
_INT_MAX = 2**31 - 1


def _apply_bounds(widget, bounds, old_default=None, initial=None) -> None:
    """Give a spin box the engine's range; ``initial`` (else the engine's default, when the box
    still shows the previous default ``old_default``) becomes its value."""
    if widget is None:
        return
    untouched = old_default is not None and widget.value() == old_default
    integer = isinstance(widget, QSpinBox)
    lo = widget.minimum() if bounds.minimum is None else bounds.minimum
    hi = widget.maximum() if bounds.maximum is None else bounds.maximum
    if integer:
        widget.setRange(int(lo), int(min(hi, _INT_MAX)))
    else:
        widget.setRange(float(lo), float(hi))
    value = initial if initial is not None else (bounds.default if untouched else None)
    if value is not None:
        widget.setValue(int(value) if integer else float(value))


def _get(w):
    """A remembered widget's value (str, int, float or bool)."""
    if isinstance(w, QDateEdit):
        return _pydate(w.date()).isoformat()
    if isinstance(w, QComboBox):
        return w.currentText()
    if isinstance(w, (QCheckBox, QRadioButton)):
        return w.isChecked()
    if isinstance(w, (QSpinBox, QDoubleSpinBox)):
        return w.value()
    if isinstance(w, QLineEdit):
        return w.text()
    raise TypeError(type(w))


def _set(w, value) -> None:
    if isinstance(w, QDateEdit):
        from ..requests import parse_date

        d = parse_date(value)
        if d:
            w.setDate(_qdate(d))
    elif isinstance(w, QComboBox):
        i = w.findText(str(value))
        if i >= 0:
            w.setCurrentIndex(i)
        elif w.isEditable():
            w.setEditText(str(value))
    elif isinstance(w, (QCheckBox, QRadioButton)):
        w.setChecked(bool(value))
    elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
        w.setValue(value)
    elif isinstance(w, QLineEdit):
        w.setText(str(value))


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


def _spread_box(task: str) -> QSpinBox:
    """The Uncertainty (spread) box: 1 shows "off" (the default: no spread sent); the top: the
    engine's (``apply_limits``)."""
    box = QSpinBox()
    box.setObjectName(f"spread_{task}")
    box.setRange(1, 16)
    box.setValue(1)
    box.setSpecialValueText("off")
    box.setSuffix(" seeds")
    box.setToolTip("Sample this many seeds in all (the image is the first, unchanged) and add a layer of "
                   "their per-pixel spread under the image: where it is high, the model is guessing (the job "
                   "takes that many times longer)")
    return box


def _layer_gsd(layer) -> Optional[float]:
    """A raster layer's mean ground sample distance in metres (None when unknown)."""
    try:
        if layer is None or not layer.isValid() or not layer.crs().isValid() or not layer.width():
            return None
        return grid_info(layer.extent(), layer.crs(), layer.width(), layer.height()).gsd_m
    except (RequestError, ZeroDivisionError, ValueError):
        return None


class _Tab(QWidget):
    """A tab with a Run button at the bottom that calls ``controller.run_job(self.prepare())``.

    ``remembered`` maps keys to widgets whose values are kept per project and per user
    (:mod:`..memory`); ``remembered_layers`` maps keys to layer combos (per project only).
    """

    task = ""

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__()
        self.dock = dock
        self.layout_ = QVBoxLayout(self)
        self.form = QFormLayout()
        self.layout_.addLayout(self.form)
        self.remembered: dict[str, QWidget] = {}
        self.remembered_layers: dict[str, QgsMapLayerComboBox] = {}

    def finish(self, run_label: str) -> None:
        self.layout_.addStretch(1)
        self.run_button = QPushButton(icon(self.task), run_label)
        self.run_button.setObjectName(f"run_{self.task}")
        self.run_button.clicked.connect(self.run)
        self.layout_.addWidget(self.run_button)
        self.apply_limits(schema.current(), initial=True)
        self.restore_values()

    def apply_limits(self, limits: "schema.Limits", initial: bool = False) -> None:
        """The engine's ranges on this tab's fields (:mod:`..schema`); its defaults where the user
        left the previous default (or, ``initial``, where the settings name no value)."""
        old = getattr(self, "limits", None)
        self.limits = limits
        for name in ("steps", "guidance", "factor"):
            widget = getattr(self, name, None)
            if widget is None:
                continue
            bounds = limits.get(self.task, name)
            start = None
            if initial:
                start = (getattr(self.dock.settings(), name, 0) or None) if name == "steps" else None
                start = start if start is not None else bounds.default
            _apply_bounds(widget, bounds, old.default(self.task, name) if old is not None else None, start)
        spread = getattr(self, "spread", None)
        top = limits.get(self.task, "spread").maximum
        if spread is not None and top is not None:
            spread.setMaximum(int(top))
        seed = getattr(self, "seed", None)
        if seed is not None:  # -1 is "random": the engine's minimum (0) is the first seed
            top = limits.get(self.task, "seed").maximum
            seed.setMaximum(int(min(top if top is not None else _INT_MAX, _INT_MAX)))

    # -- remembered values ----------------------------------------------------------------------

    #: a tab with a drawn extent (``extent``, ``extent_crs``, ``set_extent``: Generate, Extend) keeps
    #: it per project under ``<task>/extent``
    keeps_extent = False

    def save_values(self) -> None:
        for key, widget in self.remembered.items():
            memory.save(f"{self.task}/{key}", _get(widget))
        for key, combo in self.remembered_layers.items():
            layer = combo.currentLayer()
            memory.save(f"{self.task}/{key}", layer.id() if layer is not None else "", user=False)
        if self.keeps_extent and self.extent is not None:
            e = self.extent
            memory.save(f"{self.task}/extent", f"{e.xMinimum()!r},{e.yMinimum()!r},{e.xMaximum()!r},{e.yMaximum()!r}",
                        user=False)
            memory.save(f"{self.task}/extent_crs", self.extent_crs.toWkt(), user=False)

    def restore_values(self) -> None:
        for key, widget in self.remembered.items():
            _set(widget, memory.load(f"{self.task}/{key}", _get(widget)))
        project = QgsProject.instance()
        for key, combo in self.remembered_layers.items():
            layer = project.mapLayer(memory.load(f"{self.task}/{key}", "", user=False))
            if layer is not None:
                combo.setLayer(layer)
        if self.keeps_extent:
            text = memory.load(f"{self.task}/extent", "", user=False)
            crs = QgsCoordinateReferenceSystem.fromWkt(memory.load(f"{self.task}/extent_crs", "", user=False))
            try:
                values = [float(v) for v in text.split(",")] if text else []
            except ValueError:
                values = []
            if len(values) == 4 and crs.isValid():
                self.set_extent(QgsRectangle(*values), crs)

    def cloud_row(self, object_name: str = "") -> QHBoxLayout:
        """A "known" check box and a percentage (``cloud_known``, ``cloud``; Generate, Extend): unticked,
        the cloud cover is unknown to the model (:meth:`cloud_cover` is None)."""
        row = QHBoxLayout()
        self.cloud_known = QCheckBox("known")
        if object_name:
            self.cloud_known.setObjectName(object_name)
        self.cloud = QDoubleSpinBox()
        self.cloud.setRange(0.0, 100.0)
        self.cloud.setSuffix(" %")
        self.cloud.setDecimals(0)
        self.cloud.setEnabled(False)
        self.cloud_known.toggled.connect(self.cloud.setEnabled)
        row.addWidget(self.cloud_known)
        row.addWidget(self.cloud, 1)
        return row

    def cloud_cover(self) -> Optional[float]:
        """The cloud cover fraction of :meth:`cloud_row`, None where unknown (not ticked)."""
        return self.cloud.value() / 100.0 if self.cloud_known.isChecked() else None

    def extent_buttons(self, suffix: str, text: str, tip: str, canvas_tip: str = "") -> QHBoxLayout:
        """The row of a tab with a drawn extent (Generate, Extend): ``draw_button`` (the map tool's
        toggle, object name ``draw_extent<suffix>``) and ``canvas_button`` (the canvas's extent)."""
        row = QHBoxLayout()
        self.draw_button = QToolButton()
        self.draw_button.setObjectName(f"draw_extent{suffix}")
        self.draw_button.setText(text)
        self.draw_button.setIcon(icon("extent"))
        self.draw_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip(tip)
        self.canvas_button = QPushButton("Canvas extent")
        self.canvas_button.setObjectName(f"canvas_extent{suffix}")
        if canvas_tip:
            self.canvas_button.setToolTip(canvas_tip)
        self.canvas_button.clicked.connect(self.use_canvas_extent)
        row.addWidget(self.draw_button)
        row.addWidget(self.canvas_button)
        row.addStretch(1)
        return row

    def clear_outline(self) -> None:
        """Remove the tab's outline of its extent from the map (Generate, Extend), if it has one."""
        if getattr(self, "outline", None) is not None:
            canvas = self.dock.canvas()
            if canvas is not None and canvas.scene() is not None:
                canvas.scene().removeItem(self.outline)
            self.outline = None

    # -- the conditional tasks' advanced options ------------------------------------------------

    def add_advanced(self, *, rgb: bool = False, product: bool = False, date: bool = True,
                     spread: bool = True) -> QFormLayout:
        """Steps, seed, date, (``spread``) Uncertainty and (``rgb``) RGB bands / (``product``) level
        and baseline."""
        box = QgsCollapsibleGroupBox("Advanced")
        box.setObjectName(f"advanced_{self.task}")
        box.setCollapsed(True)
        adv = QFormLayout(box)
        self.steps = QSpinBox()  # range and default: the engine's (apply_limits)
        adv.addRow("Steps", self.steps)
        self.seed = QSpinBox()
        self.seed.setRange(-1, _INT_MAX)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        adv.addRow("Seed", self.seed)
        self.remembered.update(steps=self.steps, seed=self.seed)
        if spread:
            self.spread = _spread_box(self.task)
            adv.addRow("Uncertainty", self.spread)
            self.remembered.update(spread=self.spread)
        if date:
            date_row = QHBoxLayout()
            self.date_set = QCheckBox("set")
            self.date_set.setObjectName(f"date_set_{self.task}")
            self.date_set.setToolTip("Condition on this date instead of the layer's own (unknown if it has none)")
            self.adv_date = _date_edit(default_date(self.dock.canvas()))  # inside the training years
            self.adv_date.setEnabled(False)
            self.date_set.toggled.connect(self.adv_date.setEnabled)
            date_row.addWidget(self.date_set)
            date_row.addWidget(self.adv_date, 1)
            adv.addRow("Date", date_row)
            self.remembered.update(date_set=self.date_set, date=self.adv_date)
        if rgb:
            rgb_row = QHBoxLayout()
            self.rgb = []
            for i, name in enumerate("RGB"):
                spin = QSpinBox()
                spin.setRange(1, 999)
                spin.setValue(i + 1)
                spin.setPrefix(f"{name} ")
                rgb_row.addWidget(spin)
                self.rgb.append(spin)
                self.remembered[f"rgb_{name}"] = spin
            adv.addRow("RGB bands", rgb_row)
        if product:
            self.level = QComboBox()
            self.level.addItems(["from the file", "L1C", "L2A"])
            self.level.setToolTip("Sentinel-2 product level (L1C top of atmosphere, L2A surface reflectance)")
            adv.addRow("Product level", self.level)
            self.baseline = QLineEdit()
            self.baseline.setPlaceholderText("from the file, e.g. 04.00")
            self.baseline.setToolTip("Processing baseline: from 04.00 on, L1C/L2A values carry a +1000 offset")
            adv.addRow("Baseline", self.baseline)
            self.remembered.update(level=self.level, baseline=self.baseline)
        self.layout_.addWidget(box)
        self.advanced = box
        return adv

    def date_override(self) -> Optional[_dt.date]:
        return _pydate(self.adv_date.date()) if getattr(self, "date_set", None) and self.date_set.isChecked() else None

    def output_path(self, date: Optional[_dt.date] = None) -> str:
        folder = output_folder(QgsProject.instance(), self.dock.settings().default_output_dir())
        return str(unique_path(folder, output_stem(self.task, date)))

    def prepare(self) -> PreparedJob:
        raise NotImplementedError

    def options(self) -> dict:
        """Request fields the conditional tasks share: steps, seed, date; RGB bands, level, baseline."""
        steps = getattr(self, "steps", None)
        chosen = steps.value() if steps is not None else self.dock.settings().steps  # 0: the engine's default
        opts: dict = {"steps": int(chosen)} if chosen else {}
        seed = getattr(self, "seed", None)
        if seed is not None and seed.value() >= 0:
            opts["seed"] = int(seed.value())
        spread = getattr(self, "spread", None)
        if spread is not None and spread.value() > 1:  # 1 is "off": nothing sent
            opts["spread"] = int(spread.value())
        if self.date_override() is not None:
            opts["date"] = self.date_override().isoformat()
        if getattr(self, "rgb", None):
            opts["rgb_bands"] = [s.value() for s in self.rgb]
        if getattr(self, "level", None) is not None and self.level.currentIndex() > 0:
            opts["level"] = self.level.currentText()
        if getattr(self, "baseline", None) is not None and self.baseline.text().strip():
            opts["baseline"] = self.baseline.text().strip()
        return opts

    def range_warnings(self) -> list[RangeWarning]:
        """Values outside the model's training range, with advice (checked before a job)."""
        return []

    def source_layer(self):
        """The input layer whose name and style the result takes (None for Generate)."""
        return None

    def run(self):
        """Prepare and start the job; errors go to the message bar. Returns the task or None.

        Before anything starts, values outside the model's training range are shown with advice
        and the user is asked whether to run anyway.
        """
        try:
            prepared = self.prepare()
        except RequestError as err:
            self.dock.show_error(str(err))
            return None
        source = self.source_layer()
        prepared.source_layer_id = source.id() if source is not None else ""
        prepared.source_name = source.name() if source is not None else ""
        warnings = self.range_warnings()
        prepared.range_advice = [w.text() for w in warnings]
        if warnings:
            text = " ".join(f"• {w.text()}" for w in warnings)
            self.dock.show_plan(f"Before {prepared.describe()}: {text}")
            if not self.dock.controller.confirm_out_of_range(prepared, warnings):
                self.dock.controller.discard(prepared)
                self.dock.show_plan(f"Not started (outside the training range): {text}")
                return None
        self.save_values()
        return self.dock.start(prepared)


class GenerateTab(_Tab):
    task = "generate"
    keeps_extent = True

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__(dock)
        self.extent: Optional[QgsRectangle] = None
        self.extent_crs: Optional[QgsCoordinateReferenceSystem] = None
        settings = dock.settings()

        self.layout_.insertLayout(0, self.extent_buttons("", "Draw extent", "Drag a rectangle on the map"))

        self.info = QLabel("No extent yet: draw a rectangle on the map.")
        self.info.setObjectName("extent_info")
        self.info.setWordWrap(True)
        self.layout_.insertWidget(1, self.info)

        self.size = QSpinBox()
        self.size.setRange(8, schema.current().max_side)  # and apply_limits
        self.size.setSingleStep(64)
        self.size.setValue(int(settings.size or DEFAULT_SIZE))
        self.size.setSuffix(" px")
        self.size.setToolTip("Longest side of the image; the other follows the extent's shape on the ground")
        self.size.valueChanged.connect(self.refresh_info)
        self.size_mode = QComboBox()
        self.size_mode.setObjectName("size_mode")
        self.size_mode.addItems(["Longest side", "Ground resolution"])
        self.size_mode.setToolTip("Longest side: one image of that many px (the model's native size is best). "
                                  "Ground resolution: the extent at that many metres per pixel, of any size; "
                                  "larger than one window, the engine denoises overlapping windows together, "
                                  "each conditioned on its own place. Chosen for you when the extent is large.")
        self.gsd = QDoubleSpinBox()
        self.gsd.setObjectName("gsd")
        self.gsd.setDecimals(2)
        self.gsd.setRange(0.1, 1000.0)
        self.gsd.setValue(DEFAULT_GSD_M)
        self.gsd.setSingleStep(0.5)
        self.gsd.setSuffix(" m/px")
        self.gsd.setToolTip("Metres per pixel on the ground (the training imagery: about 0.3-20 m/px)")
        self.gsd.valueChanged.connect(self.refresh_info)
        self.size_mode.currentIndexChanged.connect(self._mode_changed)
        # True while Ground resolution is the dock's own choice (a large extent), not the user's:
        # a later extent that fits one image goes back to Longest side.
        self._auto_gsd = False
        self._switching = False
        self.size_mode.currentIndexChanged.connect(self._size_chosen)
        self.gsd.valueChanged.connect(self._size_chosen)
        size_row = QHBoxLayout()
        size_row.addWidget(self.size_mode)
        size_row.addWidget(self.size, 1)
        size_row.addWidget(self.gsd, 1)
        self.gsd.setVisible(False)
        self.form.addRow("Size", size_row)

        date_row = QHBoxLayout()
        self.date = _date_edit(default_date(dock.canvas()))
        self.date_from_time = QToolButton()
        self.date_from_time.setText("⟲")
        self.date_from_time.setToolTip("Take the date from the temporal controller")
        self.date_from_time.clicked.connect(self.reset_date)
        date_row.addWidget(self.date, 1)
        date_row.addWidget(self.date_from_time)
        self.form.addRow("Date", date_row)

        self.form.addRow("Cloud cover", self.cloud_row())

        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("optional, e.g. a satellite image of farmland")
        self.form.addRow("Prompt", self.prompt)

        advanced = QgsCollapsibleGroupBox("Advanced")
        advanced.setCollapsed(True)
        adv = QFormLayout(advanced)
        self.steps = QSpinBox()  # ranges and defaults: the engine's (apply_limits)
        adv.addRow("Steps", self.steps)
        self.guidance = QDoubleSpinBox()
        self.guidance.setSingleStep(0.5)
        adv.addRow("Guidance", self.guidance)
        self.seed = QSpinBox()
        self.seed.setRange(-1, _INT_MAX)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        adv.addRow("Seed", self.seed)
        self.spread = _spread_box(self.task)
        adv.addRow("Uncertainty", self.spread)
        self.layout_.addWidget(advanced)
        self.remembered.update(size=self.size, date=self.date, cloud_known=self.cloud_known, cloud=self.cloud,
                               prompt=self.prompt, steps=self.steps, guidance=self.guidance, seed=self.seed,
                               spread=self.spread, size_mode=self.size_mode, gsd=self.gsd)
        self.outline: Optional[QgsRubberBand] = None
        self.finish("Generate")

    def reset_date(self) -> None:
        self.date.setDate(_qdate(default_date(self.dock.canvas())))

    @property
    def by_ground_resolution(self) -> bool:
        return self.size_mode.currentIndex() == 1

    def _size_chosen(self, *args) -> None:
        if not self._switching:  # the user set the mode or the resolution: the dock keeps it
            self._auto_gsd = False

    def _mode_changed(self, *args) -> None:
        self.size.setVisible(not self.by_ground_resolution)
        self.gsd.setVisible(self.by_ground_resolution)
        self.refresh_info()

    def set_extent(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        self.extent = QgsRectangle(extent)
        self.extent_crs = QgsCoordinateReferenceSystem(crs)
        too_coarse = self._too_coarse()
        if too_coarse and not self._gsd_fits_limits():
            # even at the coarsest training resolution the image would be over the output limit (a
            # continent at 20 m/px: gigapixels): keep Longest side, whose warning says to draw smaller
            too_coarse = False
            if self.by_ground_resolution and self._auto_gsd:
                self._switching = True
                self.size_mode.setCurrentIndex(0)
                self._auto_gsd = False
                self._switching = False
        self._switching = True
        try:
            if too_coarse and (not self.by_ground_resolution or self._auto_gsd):
                # One image over this extent would be coarser than the training imagery: generate it
                # at a ground resolution instead (any size; the engine denoises windows jointly).
                self.gsd.setValue(gsd_for_extent(self.extent, self.extent_crs, GSD_RANGE_M))
                self.size_mode.setCurrentIndex(1)
                self._auto_gsd = True
            elif not too_coarse and self.by_ground_resolution and self._auto_gsd:
                # The dock chose Ground resolution for an earlier, larger extent: this one fits one
                # image (at 20 m/px a 1 km extent would be a 48 px thumbnail).
                self.size_mode.setCurrentIndex(0)
                self._auto_gsd = False
        finally:
            self._switching = False
        self.refresh_info()
        self.draw_outline()

    def draw_outline(self) -> None:
        """Outline the extent to generate on the map (a rubber band, in the extent's own CRS)."""
        canvas = self.dock.canvas()
        if canvas is None or self.extent is None:
            return
        if self.outline is None:
            self.outline = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
            self.outline.setStrokeColor(QColor(230, 160, 20))
            self.outline.setFillColor(QColor(230, 160, 20, 30))
            self.outline.setWidth(2)
        self.outline.setToGeometry(QgsGeometry.fromRect(self.extent), self.extent_crs)
        self.outline.show()

    def range_warnings(self) -> list[RangeWarning]:
        if self.extent is None:
            return []
        width, height = self.target_size()
        info = grid_info(self.extent, self.extent_crs, width, height)
        gsd = gsd_warning(info.gsd_m) if self.by_ground_resolution else gsd_warning(
            info.gsd_m, longest_px=max(width, height), ground_m=max(info.width_m, info.height_m),
            max_px=self.limits.max_side)
        found = [gsd,
                 date_warning(_pydate(self.date.date())), cloud_warning(self.cloud_cover())]
        return [w for w in found if w is not None]

    def use_canvas_extent(self) -> None:
        canvas = self.dock.canvas()
        if canvas is not None:
            self.set_extent(canvas.extent(), canvas.mapSettings().destinationCrs())

    def _gsd_fits_limits(self) -> bool:
        """Whether the extent at the ground resolution the dock would choose stays within the
        output megapixels of Engine settings (0: no limit)."""
        try:
            limit = float(self.dock.settings().max_output_mpx)
            if limit <= 0:
                return True
            width, height = gsd_size(self.extent, self.extent_crs,
                                     gsd_for_extent(self.extent, self.extent_crs, GSD_RANGE_M))
            return width * height / 1e6 <= limit
        except (RequestError, AttributeError, TypeError, ValueError):
            return True

    def _too_coarse(self) -> bool:
        """True when the extent at the largest Longest side allowed is coarser than the training GSDs."""
        try:
            width, height = output_size(self.extent, self.extent_crs, max(self.size.value(), DEFAULT_SIZE),
                                        max_side=self.limits.max_side)
            return grid_info(self.extent, self.extent_crs, width, height).gsd_m > GSD_RANGE_M[1]
        except RequestError:
            return False

    def target_size(self) -> tuple[int, int]:
        if self.extent is None:
            raise RequestError("draw the extent to generate on the map first (Draw extent)")
        if self.by_ground_resolution:
            return gsd_size(self.extent, self.extent_crs, self.gsd.value())
        return output_size(self.extent, self.extent_crs, self.size.value(), max_side=self.limits.max_side)

    def apply_limits(self, limits: "schema.Limits", initial: bool = False) -> None:
        super().apply_limits(limits, initial)
        self.size.setMaximum(limits.max_side)
        top = limits.get("generate", "spread").maximum
        if top is not None:
            self.spread.setMaximum(int(top))

    def grid_extent(self) -> QgsRectangle:
        """The extent of the grid the engine makes: the drawn extent, or, at a ground resolution,
        the grid centred on it at exactly that many m/px (it grows by up to 4 px per side to
        multiples of 8 px, as engine.tasks.extent.grid.extent_grid)."""
        if not self.by_ground_resolution:
            return QgsRectangle(self.extent)
        width, height = self.target_size()
        width_m, height_m = ground_size(self.extent, self.extent_crs)
        e, gsd = self.extent, self.gsd.value()
        sx, sy = e.width() * gsd / width_m, e.height() * gsd / height_m
        c = e.center()
        return QgsRectangle(c.x() - width * sx / 2, c.y() - height * sy / 2,
                            c.x() + width * sx / 2, c.y() + height * sy / 2)

    def refresh_info(self) -> None:
        if self.extent is None:
            return
        try:
            width, height = self.target_size()
            # at a ground resolution: the grid's own m/px and size (not 7.98 m/px over the drawn 3 km)
            info = grid_info(self.grid_extent(), self.extent_crs, width, height)
        except RequestError as err:
            self.info.setText(str(err))
            return
        authid = self.extent_crs.authid() or "custom CRS"
        self.info.setText(f"{info.summary()} · {authid}")

    def prepare(self) -> PreparedJob:
        self.target_size()  # an extent is drawn and has an area; the engine sizes the grid from `size`
        date = _pydate(self.date.date())
        seed = self.seed.value()
        by_gsd = self.by_ground_resolution
        return prepare_generate(
            self.extent, self.extent_crs, size=None if by_gsd else self.size.value(),
            gsd=self.gsd.value() if by_gsd else None, output_path=self.output_path(date),
            date=date, cloud_cover=self.cloud_cover(), prompt=self.prompt.text(), steps=self.steps.value(),
            guidance=self.guidance.value(), seed=seed if seed >= 0 else None, model=self.dock.settings().model,
            spread=self.spread.value() if self.spread.value() > 1 else None,
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
        self.rule.setObjectName("mask_rule")
        self.rule.setEditable(True)
        for i, (rule, helptext) in enumerate(MASK_PRESETS):
            self.rule.addItem(rule)
            self.rule.setItemData(i, helptext, Qt.ItemDataRole.ToolTipRole)
        self.rule.setToolTip("A preset, or a rule: bits:LO-HI=N, bit:B, values:V,…, gt:X, nonzero, nodata")
        self.form.addRow("Rule", self.rule)
        self.rule_help = QLabel("")
        self.rule_help.setObjectName("mask_rule_help")
        self.rule_help.setWordWrap(True)
        self.rule_help.setStyleSheet("color: gray;")
        self.form.addRow("", self.rule_help)
        self.rule.currentTextChanged.connect(self._rule_help)
        self._rule_help(self.rule.currentText())
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
        self.add_advanced(rgb=True)
        self.remembered.update(kind_raster=self.kind_raster, kind_polygons=self.kind_polygons,
                               kind_nodata=self.kind_nodata, rule=self.rule, selected_only=self.selected_only,
                               prompt=self.prompt)
        self.remembered_layers.update(layer=self.layer, mask_raster=self.mask_raster,
                                      mask_polygons=self.mask_polygons)
        self.finish("In-paint")

    def _rule_help(self, text: str) -> None:
        rule = text.strip()
        self.rule_help.setText(PRESET_HELP.get(rule) or (
            "your own rule: bits:LO-HI=N, bit:B, values:V,…, gt:X, nonzero or nodata" if rule else ""))

    def source_layer(self):
        return self.layer.currentLayer()

    def range_warnings(self) -> list[RangeWarning]:
        layer = self.layer.currentLayer()
        date = self.date_override() or layer_date(layer)[0]
        found = [gsd_warning(_layer_gsd(layer)), date_warning(date, "Date (Advanced)")]
        return [w for w in found if w is not None]

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
        date = self.date_override() or layer_date(layer)[0]
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
        self.use_selected = QPushButton("Use the selected layers")
        self.use_selected.setObjectName("use_selected_layers")
        self.use_selected.setToolTip("One row per raster layer selected in the Layers panel, bands matched by "
                                     "name or band description (B04, s2_B04, T33TTG_…_B8A_20m)")
        self.use_selected.clicked.connect(lambda: self.use_layers(self.dock.controller.selected_layers()))
        self.add_band = QPushButton("Add band")
        self.add_band.clicked.connect(lambda: self.add_band_row())
        self.remove_band = QPushButton("Remove")
        self.remove_band.clicked.connect(self._remove_rows)
        buttons.addWidget(self.add_band)
        buttons.addWidget(self.remove_band)
        buttons.addStretch(1)
        # Always enabled: it switches to single-band layers itself.
        self.layout_.addWidget(self.use_selected)
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
        self.factor = QSpinBox()  # range and default: the engine's (apply_limits)
        self.factor.setPrefix("× ")
        self.form.addRow("Factor", self.factor)
        self.mode_multi.toggled.connect(self._update)
        self.layer.layerChanged.connect(self._fill_bands)
        self._update()
        self.add_advanced(product=True)
        self.remembered.update(mode_multi=self.mode_multi, mode_bands=self.mode_bands, bands=self.bands,
                               factor=self.factor)
        self.remembered_layers.update(layer=self.layer)
        self.finish("Super-resolve")

    def _update(self, *args) -> None:
        multi = self.mode_multi.isChecked()
        self.layer.setEnabled(multi)
        self.bands.setEnabled(multi)
        self.band_box.setEnabled(not multi)

    def _fill_bands(self, layer) -> None:
        """Band names from the layer's band descriptions when they are not the engine's own
        (``s2_B04`` → ``B04``); nothing when the file's names can be read as they are."""
        if layer is None or not isinstance(layer, QgsRasterLayer):
            return
        from ..results import band_descriptions

        names = band_names_of(layer)
        if names and names != [d.strip() for d in band_descriptions(layer)]:
            self.bands.setText(",".join(names))

    def use_layers(self, layers) -> int:
        """Replace the band rows by ``layers`` (the selected ones), bands matched by name and sorted
        in Sentinel-2 order; switches to single-band layers. Returns the number of rows."""
        rasters = [lyr for lyr in layers if isinstance(lyr, QgsRasterLayer) and lyr.bandCount() == 1]
        if not rasters:
            self.dock.show_error("select the single-band Sentinel-2 layers in the Layers panel first")
            return 0
        self.mode_bands.setChecked(True)
        self.table.setRowCount(0)
        for layer, band in sort_by_band((lyr, band_name_of(lyr)) for lyr in rasters):
            self.add_band_row(layer, band or "")
        return self.table.rowCount()

    def source_layer(self):
        if self.mode_multi.isChecked():
            return self.layer.currentLayer()
        rows = self.band_rows()
        return rows[0][0] if rows else None

    def range_warnings(self) -> list[RangeWarning]:
        layer = self.source_layer()
        gsd = _layer_gsd(layer)
        factor = self.factor.value()
        date = self.date_override() or (layer_date(layer)[0] if layer is not None else None)
        found = [gsd_warning(gsd / factor if gsd else None, factor=factor, input_gsd_m=gsd),
                 date_warning(date, "Date (Advanced)")]
        return [w for w in found if w is not None]

    def add_band_row(self, layer: Optional[QgsRasterLayer] = None, band: str = "") -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        combo = QgsMapLayerComboBox()
        combo.setFilters(LAYER_RASTER)
        if layer is not None:
            combo.setLayer(layer)
        name = QLineEdit(band or (band_name_of(combo.currentLayer()) if combo.currentLayer() else "") or "")
        name.setPlaceholderText("B04")
        combo.layerChanged.connect(lambda lyr, edit=name: edit.setText(band_name_of(lyr) or edit.text())
                                   if isinstance(lyr, QgsRasterLayer) else None)
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
            date = self.date_override() or layer_date(layer)[0]
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
        date = self.date_override() or layer_date(layers[0])[0]
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
        self.add_advanced(date=False)
        self.remembered.update(target_date=self.date)
        self.finish("Generate for date")

    def source_layer(self):
        rows = self._checked_rows()
        return QgsProject.instance().mapLayer(rows[0][0]) if rows else None

    def range_warnings(self) -> list[RangeWarning]:
        found = [gsd_warning(_layer_gsd(self.source_layer())), date_warning(_pydate(self.date.date()), "Target date")]
        return [w for w in found if w is not None]

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


class ExtendTab(_Tab):
    """Extend (outpaint) a layer: its pixels kept as they are, a larger extent around them generated.

    The new extent is drawn with the dock's extent tool (or taken from the canvas); the dock shows
    the grid the engine will write (the layer's own pixels and alignment, grown outward) and
    outlines it on the map."""

    task = "extend"
    keeps_extent = True

    def __init__(self, dock: "DiffusionSatDock") -> None:
        super().__init__(dock)
        self.extent: Optional[QgsRectangle] = None
        self.extent_crs: Optional[QgsCoordinateReferenceSystem] = None
        self.outline: Optional[QgsRubberBand] = None
        self.layer = QgsMapLayerComboBox()
        self.layer.setObjectName("extend_layer")
        self.layer.setFilters(LAYER_RASTER)
        self.layer.setToolTip("The raster layer to extend: its pixels stay exactly as they are")
        self.form.addRow("Layer", self.layer)

        self.form.addRow("Extent", self.extent_buttons(
            "_extend", "Draw new extent", "Drag a rectangle on the map around the layer: the extent to cover",
            "Cover the map canvas's current extent"))
        self.info = QLabel("No extent yet: draw the new extent around the layer on the map.")
        self.info.setObjectName("extend_info")
        self.info.setWordWrap(True)
        self.form.addRow("", self.info)

        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("optional, e.g. a satellite image of farmland")
        self.form.addRow("Prompt", self.prompt)
        adv = self.add_advanced(rgb=True, spread=False)
        self.guidance = QDoubleSpinBox()  # range and default: the engine's (apply_limits)
        self.guidance.setSingleStep(0.5)
        adv.insertRow(1, "Guidance", self.guidance)
        adv.addRow("Cloud cover", self.cloud_row("cloud_known_extend"))
        self.layer.layerChanged.connect(lambda *_: self.refresh_info())
        self.remembered.update(prompt=self.prompt, guidance=self.guidance, cloud_known=self.cloud_known,
                               cloud=self.cloud)
        self.remembered_layers.update(layer=self.layer)
        self.finish("Extend layer")

    def source_layer(self):
        return self.layer.currentLayer()

    def use_canvas_extent(self) -> None:
        canvas = self.dock.canvas()
        if canvas is not None:
            self.set_extent(canvas.extent(), canvas.mapSettings().destinationCrs())

    def set_extent(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        self.extent = QgsRectangle(extent)
        self.extent_crs = QgsCoordinateReferenceSystem(crs)
        self.refresh_info()

    def grid(self):
        """The grid the engine will write (:func:`..prepare.extended_grid`); RequestError says why not."""
        if self.extent is None:
            raise RequestError("draw the new extent around the layer on the map first (Draw new extent)")
        return extended_grid(self.layer.currentLayer(), self.extent, self.extent_crs)

    def refresh_info(self) -> None:
        if self.extent is None:
            return
        layer = self.layer.currentLayer()
        try:
            grid = self.grid()
        except RequestError as err:
            self.info.setText(str(err))
            self.clear_outline()
            return
        text = grid.summary()
        gsd = _layer_gsd(layer)
        if gsd:
            text += f" · {gsd:.3g} m/px (the layer's)"
        if grid.new_pixels <= 0:
            text += ". The extent lies inside the layer: draw one beyond its edges."
        else:
            drawn = extent_in(self.extent, self.extent_crs, layer.crs())
            if drawn is not None and not drawn.intersects(layer.extent()):
                # the engine refuses it (a gap would make the output mostly far from any known pixel)
                text += (". The drawn extent does not touch the layer: Extend grows the layer outward, so "
                         "draw the new extent around the layer or against one of its edges")
        self.info.setText(text)
        self.draw_outline(grid.extent, layer.crs())

    def draw_outline(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        """Outline the grid to write on the map (the layer's own extent stays inside it)."""
        canvas = self.dock.canvas()
        if canvas is None:
            return
        if self.outline is None:
            self.outline = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
            self.outline.setStrokeColor(QColor(40, 120, 220))
            self.outline.setFillColor(QColor(40, 120, 220, 25))
            self.outline.setWidth(2)
        self.outline.setToGeometry(QgsGeometry.fromRect(extent), crs)
        tabs = getattr(self.dock, "tabs", None)
        self.outline.setVisible(tabs is None or tabs.currentWidget() is self)

    def show_outline(self, visible: bool) -> None:
        """Show the outline while this tab is the dock's current one (it is not the Generate extent)."""
        if self.outline is not None:
            self.outline.setVisible(visible)

    def range_warnings(self) -> list[RangeWarning]:
        layer = self.layer.currentLayer()
        date = self.date_override() or (layer_date(layer)[0] if layer is not None else None)
        found = [gsd_warning(_layer_gsd(layer)), date_warning(date, "Date (Advanced)"),
                 cloud_warning(self.cloud_cover())]
        return [w for w in found if w is not None]

    def options(self) -> dict:
        opts = super().options()
        opts["guidance"] = float(self.guidance.value())
        return opts

    def prepare(self) -> PreparedJob:
        layer = self.layer.currentLayer()
        if layer is None:
            raise RequestError("choose the raster layer to extend")
        self.grid()  # an extent is drawn and the layer has a grid
        date = self.date_override() or layer_date(layer)[0]
        return prepare_extend(layer, output_path=self.output_path(date), extent=self.extent,
                              extent_crs=self.extent_crs, date=date, cloud_cover=self.cloud_cover(),
                              prompt=self.prompt.text(), model=self.dock.settings().model, options=self.options())


class DiffusionSatDock(QgsDockWidget):
    """The dock. ``controller`` provides ``settings()``, ``start(prepared)``, ``show_error(msg)``,
    ``open_settings()``, ``open_help()``, ``canvas()``, ``selected_layers()``,
    ``confirm_out_of_range(prepared, warnings)`` and ``discard(prepared)``; the plugin is the
    controller. The status area (a fixed height, so nothing below it moves) shows the engine's plan,
    the progress of the running job (step, tile, time left) and the outcome of the last one."""

    STATUS_LINES = 5

    def __init__(self, controller, parent: Optional[QWidget] = None) -> None:
        super().__init__("DiffusionSat", parent)
        self.setObjectName("DiffusionSatDock")
        self.controller = controller
        body = QWidget()
        layout = QVBoxLayout(body)
        self.tabs = QTabWidget()
        # All four tabs stay visible at a narrow dock: they shrink (text elided) instead of
        # scrolling out of sight.
        self.tabs.setUsesScrollButtons(False)
        self.tabs.setElideMode(Qt.TextElideMode.ElideRight)
        self.tabs.tabBar().setExpanding(True)
        self.generate = GenerateTab(self)
        self.inpaint = InpaintTab(self)
        self.superres = SuperresTab(self)
        self.temporal = TemporalTab(self)
        self.extend = ExtendTab(self)
        #: the tab a drawn extent goes to (the one whose Draw button started the extent tool)
        self.extent_target = self.generate
        for tab, name, tip in ((self.generate, "Generate", "Generate an image for a drawn extent and a date"),
                               (self.inpaint, "In-paint", "Fill masked (cloudy, missing) pixels of a layer"),
                               (self.superres, "Super-resolve", "Sharpen Sentinel-2 bands"),
                               (self.temporal, "Temporal", "The image of a place for another date"),
                               (self.extend, "Extend", "Extend (outpaint) a layer: a larger extent around it, "
                                                       "its own pixels kept")):
            index = self.tabs.addTab(tab, icon(tab.task), name)
            self.tabs.setTabToolTip(index, tip)
        layout.addWidget(self.tabs, 1)
        # Five tab titles do not fit a typical dock (~400 px: "Ge…", "In…", "Supe…"): below the width
        # they need, the tab bar gives way to a task selector (icon and full name) above the same pages.
        self.task_selector = QComboBox()
        self.task_selector.setObjectName("task_selector")
        self.task_selector.setToolTip("The task (the dock's tabs, when the dock is wide enough to show them)")
        for i in range(self.tabs.count()):
            self.task_selector.addItem(self.tabs.tabIcon(i), self.tabs.tabText(i))
            self.task_selector.setItemData(i, self.tabs.tabToolTip(i), Qt.ItemDataRole.ToolTipRole)
        self.task_selector.currentIndexChanged.connect(self.tabs.setCurrentIndex)
        self.tabs.currentChanged.connect(self.task_selector.setCurrentIndex)
        layout.insertWidget(layout.indexOf(self.tabs), self.task_selector)
        self.task_selector.hide()
        self.tabs.installEventFilter(self)
        # The new extent's outline belongs to the Extend tab: shown while it is the current one
        self.tabs.currentChanged.connect(lambda *_: self.extend.show_outline(self.tabs.currentWidget() is self.extend))

        # Status: a fixed-height, scrollable, selectable text (messages are never clipped and
        # the Run buttons above never move), and a progress row.
        self.plan_label = QLabel("Ready.")
        self.plan_label.setObjectName("plan_status")
        self.plan_label.setWordWrap(True)
        self.plan_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.plan_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plan_label.setToolTip("The engine's plan of the last job (output size, ground sample distance, "
                                   "tiles, time estimate), checks before it and its outcome")
        self.status_area = QScrollArea()
        self.status_area.setObjectName("status_area")
        self.status_area.setWidgetResizable(True)
        self.status_area.setWidget(self.plan_label)
        self.status_area.setFixedHeight(self.fontMetrics().lineSpacing() * self.STATUS_LINES + 10)
        layout.addWidget(self.status_area)
        progress_row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setObjectName("job_progress")
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        progress_row.addWidget(self.progress, 1)
        layout.addLayout(progress_row)

        status_row = QHBoxLayout()
        self.engine_label = QLabel("")
        self.engine_label.setObjectName("engine_status")
        self.engine_label.setWordWrap(True)
        engine_button = QPushButton("Engine…")
        engine_button.setObjectName("open_settings")
        engine_button.setToolTip("Engine settings: local or existing engine, model, outputs, limits")
        engine_button.clicked.connect(lambda: controller.open_settings())
        self.help_button = QToolButton()
        self.help_button.setObjectName("open_help")
        self.help_button.setText("Help")
        self.help_button.setToolTip("The user guide (docs/plugin.md)")
        self.help_button.clicked.connect(lambda: controller.open_help())
        status_row.addWidget(self.engine_label, 1)
        status_row.addWidget(engine_button)
        status_row.addWidget(self.help_button)
        layout.addLayout(status_row)
        note = QLabel("Results are AI-generated (synthetic) images, labelled as such. All inference "
                      "runs on the engine you configure; nothing is sent elsewhere.")
        note.setWordWrap(True)
        note.setStyleSheet("color: gray; font-size: small;")
        layout.addWidget(note)
        self.setWidget(body)
        self.refresh_engine_label()

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.tabs and event.type() in (QEvent.Type.Resize, QEvent.Type.Show):
            self.fit_tabs()
        return super().eventFilter(watched, event)

    def tab_titles_fit(self) -> bool:
        """Whether the tab bar can show every tab's full title (icon and text) at the dock's width."""
        bar = self.tabs.tabBar()
        metrics, icon_px = bar.fontMetrics(), bar.iconSize().width()
        # tabSizeHint is protected (not callable on QTabWidget's own bar): the title, the icon and
        # the style's margins around them (about 12 px a side, 4 px between icon and text)
        needed = sum(metrics.horizontalAdvance(bar.tabText(i)) + icon_px + 28 for i in range(bar.count()))
        return needed <= self.tabs.width()

    def fit_tabs(self) -> None:
        """Tabs when their titles fit, else the task selector (the same pages, the same order)."""
        fit = self.tab_titles_fit()
        if fit == self.tabs.tabBar().isVisibleTo(self.tabs) and fit != self.task_selector.isVisibleTo(self):
            return
        self.tabs.tabBar().setVisible(fit)
        self.task_selector.setVisible(not fit)
        body = self.widget()
        if body is not None and body.layout() is not None:  # now, not at the next event loop turn
            body.layout().activate()

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
        """The status text: the pre-flight of the last job (plan, estimate, refusal or outcome)."""
        self.plan_label.setText(text or "Ready.")

    def show_progress(self, fraction: Optional[float], text: str = "") -> None:
        """The running job's progress (``None`` = no job running)."""
        if fraction is None:
            self.progress.setValue(0)
            self.progress.setFormat(text or "idle")
            return
        self.progress.setValue(int(round(max(0.0, min(1.0, fraction)) * 100)))
        self.progress.setFormat(f"%p% · {text}" if text else "%p%")

    def refresh_engine_label(self) -> None:
        self.engine_label.setText(self.controller.engine_summary())

    def tabs_of(self) -> list:
        return [self.generate, self.inpaint, self.superres, self.temporal, self.extend]

    def extent_tabs(self) -> list:
        """The tabs with a Draw extent button (the dock's extent tool)."""
        return [self.generate, self.extend]

    def draw_buttons(self) -> list:
        return [tab.draw_button for tab in self.extent_tabs()]

    def clear_outlines(self) -> None:
        for tab in self.extent_tabs():
            tab.clear_outline()

    def apply_limits(self, limits: "schema.Limits") -> None:
        """The ranges and defaults of the engine the plugin talks to (read from its OpenAPI)."""
        for tab in self.tabs_of():
            tab.apply_limits(limits)

    def restore_values(self) -> None:
        """The remembered form values of the current project (after a project is opened)."""
        self.temporal.refresh_layers()
        for tab in self.tabs_of():
            tab.restore_values()

    def save_values(self) -> None:
        for tab in self.tabs_of():
            tab.save_values()

    def connect_extent_tool(self, tool, activate: Callable[[bool], None]) -> None:
        """Wire the Draw extent button to the map tool (checked while the tool is active)."""
        for tab in self.extent_tabs():
            tab.draw_button.toggled.connect(lambda on, t=tab: self._draw_toggled(t, on, activate))
        tool.extentDrawn.connect(self._extent_drawn)

    def _draw_toggled(self, tab, on: bool, activate: Callable[[bool], None]) -> None:
        if on:
            self.extent_target = tab
        activate(on)

    def _extent_drawn(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        (self.extent_target or self.generate).set_extent(extent, crs)
