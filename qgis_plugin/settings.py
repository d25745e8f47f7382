"""The plugin's settings, kept in QgsSettings under ``DiffusionSat/``.

The engine token is a secret and is never stored here: the settings hold either the path of a
user-only token file or the id of a QGIS authentication configuration (auth manager) whose
password field holds the token.

Environment variables override the engine settings, so Processing in batch scripts and
``qgis_process`` can be pointed at an engine without touching a profile:

- ``DIFFUSIONSAT_URL``: the URL of a running engine (``http://127.0.0.1:8765``)
- ``DIFFUSIONSAT_TOKEN_FILE``: the file holding that engine's token
- ``DIFFUSIONSAT_TOKEN``: the token itself (prefer the file)
- ``DIFFUSIONSAT_ENGINE_PYTHON``: the interpreter for "start a local engine" when none is set
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping, Optional

from qgis.core import QgsSettings

PREFIX = "DiffusionSat/"
MODE_LOCAL = "local"
MODE_REMOTE = "remote"
#: Upload policy for input rasters: ``auto`` passes file paths to a local engine and uploads to a
#: remote one (and after a "path not allowed" answer), ``always`` uploads, ``never`` never does.
UPLOAD_POLICIES = ("auto", "always", "never")


@dataclass
class PluginSettings:
    """Everything the plugin remembers between sessions (no secrets)."""

    mode: str = MODE_LOCAL
    python: str = ""  # interpreter of the engine environment for "start a local engine"
    url: str = ""  # "use an existing engine"
    token_file: str = ""
    authcfg: str = ""  # QGIS auth manager configuration whose password is the token
    model: str = "auto"  # the model requests ask for ('auto', 'tiny', a folder on the engine)
    upload: str = "auto"
    output_dir: str = ""  # for unsaved projects; default ~/DiffusionSat
    size: int = 512  # longest side of a generated image, px
    steps: int = 0  # the forms' first steps; 0 = the engine's default (its OpenAPI: see schema.py)
    # Pre-flight limits: a larger job is run only when the user confirms it (dock) or sets
    # ALLOW_LARGE (Processing); 0 turns a limit off.
    max_output_mpx: float = 100.0  # output megapixels
    max_minutes: float = 120.0  # estimated minutes
    # Ask before a job whose GSD, date or cloud cover is outside the model's training range
    # (False: the dock only shows the warning and runs).
    ask_out_of_range: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, qsettings: Optional[QgsSettings] = None) -> "PluginSettings":
        s = qsettings or QgsSettings()
        values = {}
        defaults = cls()
        for f in fields(cls):
            if f.name == "extra":
                continue
            default = getattr(defaults, f.name)
            raw = s.value(PREFIX + f.name, default)
            try:
                if isinstance(default, bool):
                    values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
                    continue
                values[f.name] = type(default)(raw) if raw is not None else default
            except (TypeError, ValueError):
                values[f.name] = default
        loaded = cls(**values)
        if loaded.mode not in (MODE_LOCAL, MODE_REMOTE):
            loaded.mode = MODE_LOCAL
        if loaded.upload not in UPLOAD_POLICIES:
            loaded.upload = "auto"
        return loaded

    def save(self, qsettings: Optional[QgsSettings] = None) -> None:
        s = qsettings or QgsSettings()
        for name, value in asdict(self).items():
            if name != "extra":
                s.setValue(PREFIX + name, value)

    def default_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else Path.home() / "DiffusionSat"


def repo_engine_python() -> Optional[str]:
    """In a source checkout (dev install), the engine environment's interpreter ``<repo>/.venv``."""
    here = Path(__file__).resolve().parent
    for root in (here.parent, Path(__file__).parent.parent):
        for rel in (".venv/bin/python", ".venv/Scripts/python.exe"):
            candidate = root / rel
            if candidate.is_file() and (root / "engine").is_dir():
                return str(candidate)
    return None


def default_engine_python(settings: PluginSettings, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The interpreter to start a local engine with: the setting, the environment, the checkout."""
    for candidate in (settings.python, env.get("DIFFUSIONSAT_ENGINE_PYTHON", "")):
        if candidate:
            return candidate
    return repo_engine_python()


def token_from_authcfg(authcfg: str) -> Optional[str]:
    """The token kept in a QGIS authentication configuration (its password or token field)."""
    if not authcfg:
        return None
    from qgis.core import QgsApplication, QgsAuthMethodConfig

    manager = QgsApplication.authManager()
    if manager is None:
        return None
    config = QgsAuthMethodConfig()
    loaded = manager.loadAuthenticationConfig(authcfg, config, True)
    ok = loaded[0] if isinstance(loaded, tuple) else loaded
    if not ok:
        return None
    for key in ("token", "password", "value"):
        value = config.config(key)
        if value:
            return value.strip()
    return None


def read_token_file(path: str) -> str:
    """The token in ``path`` (first non-empty line); OSError/ValueError with a clear message."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise ValueError(f"the token file {path} is empty")
