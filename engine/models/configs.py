"""Model folders' configuration files and the engine's shipped resources, read without torch.

What ``--model`` designates, the ``models`` listing and every check before the first model call
read only these JSON files, so they answer without importing torch or diffusers (a refusal or a
listing in a fraction of a second). The weights are read by :mod:`engine.models.weights`.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..errors import ModelLoadError, ModelNotFound

#: ControlNet ``_class_name`` values (diffusers' and the official checkpoints') -> our class
#: (engine.models.controlnet builds its class table from this one)
CONTROLNET_CLASS_NAMES = {"ControlNetModel": "SatControlNet", "ControlNetModel3D": "SatControlNet3D",
                          "SatControlNet": "SatControlNet", "SatControlNet3D": "SatControlNet3D"}


def resource_path(*parts: str) -> Path:
    """A file shipped in ``engine/resources`` (the tiny preset's and SD 2.1's configs)."""
    return Path(str(resources.files("engine") / "resources" / Path(*parts)))


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing: not a model folder in the diffusers layout")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); re-download or repair it") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return config
