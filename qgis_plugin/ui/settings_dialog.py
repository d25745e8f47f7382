"""Engine settings: start a local engine, or use an existing one (URL + token)."""

from __future__ import annotations

from typing import Optional

from qgis.gui import QgsAuthConfigSelect, QgsFileWidget
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
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

    def __init__(self, settings: PluginSettings, parent: Optional[QWidget] = None, check=None) -> None:
        super().__init__(parent)
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
        self.model = QLineEdit(settings.model)
        self.model.setToolTip("'auto' (the best installed model), 'tiny' (built-in test model) or a "
                              "model folder on the engine's machine")
        cf.addRow("Model", self.model)
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
        s.model = self.model.text().strip() or "auto"
        s.upload = self.upload.currentText()
        s.output_dir = self.output_dir.filePath().strip()
        s.max_output_mpx = float(self.max_mpx.value())
        s.max_minutes = float(self.max_minutes.value())
        return s

    def test_connection(self) -> None:
        if self._check is not None:
            self.status.setText(self._check(self.values()))
