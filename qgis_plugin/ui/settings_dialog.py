"""Engine settings: start a local engine, or use an existing one (URL + token)."""

from __future__ import annotations

from typing import Optional

from qgis.gui import QgsAuthConfigSelect, QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from ..settings import MODE_LOCAL, MODE_REMOTE, UPLOAD_POLICIES, PluginSettings, repo_engine_python


class EngineSettingsDialog(QDialog):
    """Edits a :class:`PluginSettings`; the token itself is never stored in the settings."""

    def __init__(self, settings: PluginSettings, parent: Optional[QWidget] = None, check=None,
                 models=None) -> None:
        super().__init__(parent)
        self._models = models
        self.setWindowTitle("DiffusionSat — Engine settings")
        self.settings = settings
        self._check = check
        layout = QVBoxLayout(self)

        self.local = QRadioButton("Start a local engine")
        self.remote = QRadioButton("Use an existing engine")
        group = QButtonGroup(self)
        group.addButton(self.local)
        group.addButton(self.remote)
        (self.remote if settings.mode == MODE_REMOTE else self.local).setChecked(True)

        local_box = QGroupBox()
        lf = QFormLayout(local_box)
        self.python = QgsFileWidget()
        self.python.setFilePath(settings.python or repo_engine_python() or "")
        self.python.setToolTip("The Python of the environment where DiffusionSat's engine is installed "
                               "(not QGIS's Python), e.g. ~/diffusionsat/.venv/bin/python")
        lf.addRow("Engine Python", self.python)
        layout.addWidget(self.local)
        layout.addWidget(local_box)

        remote_box = QGroupBox()
        rf = QFormLayout(remote_box)
        self.url = QLineEdit(settings.url)
        self.url.setPlaceholderText("http://127.0.0.1:8765")
        rf.addRow("URL", self.url)
        self.token_file = QgsFileWidget()
        self.token_file.setFilePath(settings.token_file)
        rf.addRow("Token file", self.token_file)
        self.authcfg = QgsAuthConfigSelect()
        self.authcfg.setConfigId(settings.authcfg)
        rf.addRow("…or token in auth config", self.authcfg)
        rf.addRow(QLabel("The auth configuration's password field holds the token (Basic method)."))
        layout.addWidget(self.remote)
        layout.addWidget(remote_box)

        common = QGroupBox("Requests and outputs")
        cf = QFormLayout(common)
        model_row = QHBoxLayout()
        self.model = QComboBox()
        self.model.setObjectName("model")
        self.model.setEditable(True)  # a model folder on the engine's machine may be typed too
        self.model.addItem("auto", "auto")
        self.model.setItemData(0, "the best installed model for each task", Qt.ItemDataRole.ToolTipRole)
        self.model.setCurrentText(settings.model or "auto")
        self.model.setToolTip("Choose from the engine's models (Load models), or type a model folder on the "
                              "engine's machine; 'auto' takes the best installed model for each task")
        self.load_models_button = QPushButton("Load models")
        self.load_models_button.setObjectName("load_models")
        self.load_models_button.setToolTip("Ask the engine (GET /v1/models) which models it has and the tasks each serves")
        self.load_models_button.clicked.connect(self.load_models)
        model_row.addWidget(self.model, 1)
        model_row.addWidget(self.load_models_button)
        cf.addRow("Model", model_row)
        self.model_info = QLabel("")
        self.model_info.setObjectName("model_info")
        self.model_info.setWordWrap(True)
        self.model_info.setStyleSheet("color: gray;")
        cf.addRow("", self.model_info)
        self.model.currentIndexChanged.connect(self._model_changed)
        self.upload = QComboBox()
        self.upload.addItems(UPLOAD_POLICIES)
        self.upload.setCurrentText(settings.upload)
        self.upload.setToolTip("auto: paths for an engine on this machine, uploads for a remote one")
        cf.addRow("Upload inputs", self.upload)
        self.output_dir = QgsFileWidget()
        self.output_dir.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_dir.setFilePath(str(settings.default_output_dir()))
        cf.addRow("Outputs (unsaved projects)", self.output_dir)
        layout.addWidget(common)

        limits = QGroupBox("Before a job runs")
        lim = QFormLayout(limits)
        self.max_mpx = QDoubleSpinBox()
        self.max_mpx.setRange(0.0, 1e6)
        self.max_mpx.setDecimals(1)
        self.max_mpx.setSuffix(" Mpx")
        self.max_mpx.setSpecialValueText("no limit")
        self.max_mpx.setValue(float(settings.max_output_mpx))
        self.max_mpx.setToolTip("Ask before running a job whose output is larger (megapixels)")
        lim.addRow("Confirm outputs over", self.max_mpx)
        self.max_minutes = QDoubleSpinBox()
        self.max_minutes.setRange(0.0, 1e6)
        self.max_minutes.setDecimals(0)
        self.max_minutes.setSuffix(" min")
        self.max_minutes.setSpecialValueText("no limit")
        self.max_minutes.setValue(float(settings.max_minutes))
        self.max_minutes.setToolTip("Ask before running a job estimated to take longer (the estimate is "
                                    "learnt from this engine's finished jobs)")
        lim.addRow("Confirm jobs longer than", self.max_minutes)
        self.ask_range = QCheckBox("Ask before running outside the model's training range (GSD, date, cloud cover)")
        self.ask_range.setObjectName("ask_out_of_range")
        self.ask_range.setChecked(bool(settings.ask_out_of_range))
        self.ask_range.setToolTip("Unticked, the dock only shows the warning and its advice, and runs")
        lim.addRow(self.ask_range)
        layout.addWidget(limits)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        test = QPushButton("Test connection")
        buttons.addButton(test, QDialogButtonBox.ButtonRole.ActionRole)
        test.clicked.connect(self.test_connection)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def values(self) -> PluginSettings:
        s = PluginSettings(**{**self.settings.__dict__})
        s.mode = MODE_REMOTE if self.remote.isChecked() else MODE_LOCAL
        s.python = self.python.filePath().strip()
        s.url = self.url.text().strip()
        s.token_file = self.token_file.filePath().strip()
        s.authcfg = self.authcfg.configId() or ""
        s.model = self.model_name() or "auto"
        s.upload = self.upload.currentText()
        s.output_dir = self.output_dir.filePath().strip()
        s.max_output_mpx = float(self.max_mpx.value())
        s.max_minutes = float(self.max_minutes.value())
        s.ask_out_of_range = self.ask_range.isChecked()
        return s

    def model_name(self) -> str:
        """The chosen model: an item's name (its text also lists the tasks), or the typed text."""
        text = self.model.currentText().strip()
        index = self.model.findText(text)
        data = self.model.itemData(index) if index >= 0 else None
        return str(data) if data else text

    def _model_changed(self, index: int) -> None:
        tip = self.model.itemData(index, Qt.ItemDataRole.ToolTipRole) if index >= 0 else ""
        self.model_info.setText(str(tip or ""))

    def load_models(self) -> int:
        """Fill the Model list from the engine: ``name — task, task`` per model. Returns the count."""
        if self._models is None:
            return 0
        from ..connection import EngineConfigError
        from ..engine_client import EngineError

        try:
            models = self._models(self.values())
        except (EngineConfigError, EngineError, OSError) as err:
            self.status.setText(f"Could not list the engine's models: {err}")
            return 0
        current = self.model_name()
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItem("auto", "auto")
        self.model.setItemData(0, "the best installed model for each task", Qt.ItemDataRole.ToolTipRole)
        for m in models:
            name = str(m.get("name", "?"))
            tasks = ", ".join(m.get("tasks") or []) or "no task"
            self.model.addItem(f"{name} — {tasks}", name)
            tip = f"{name}: {tasks}; {m.get('resolution', '?')} px, {m.get('kind', '')}"
            self.model.setItemData(self.model.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        index = self.model.findData(current)
        if index >= 0:
            self.model.setCurrentIndex(index)
        else:
            self.model.setEditText(current)
        self.model.blockSignals(False)
        self._model_changed(self.model.currentIndex())
        self.status.setText(f"The engine has {len(models)} model(s).")
        return len(models)

    def test_connection(self) -> None:
        if self._check is not None:
            self.status.setText(self._check(self.values()))
