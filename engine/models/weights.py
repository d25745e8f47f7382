"""Reading and writing weight files safely, in the diffusers folder layout.

Only safetensors and ``torch.load(weights_only=True)`` are used: nothing unpickles arbitrary
objects. A model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or the
official checkpoints' ``diffusion_pytorch_model.bin``; ``.fp16`` variants and sharded
``*.index.json`` files are read too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError, ModelNotFound

WEIGHTS_STEM = "diffusion_pytorch_model"


def weight_files(folder: Path, stem: str = WEIGHTS_STEM) -> list[Path]:
    """The weight file(s) of a model folder, safetensors first; [] if there are none."""
    candidates = [
        f"{stem}.safetensors",
        f"{stem}.bin",
        f"{stem}.fp16.safetensors",
        f"{stem}.fp16.bin",
    ]
    for name in candidates:
        if (folder / name).is_file():
            return [folder / name]
    for index_name in (f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as err:
                raise ModelLoadError(f"the shard index {index} is not valid JSON ({err}); re-download it") from err
            return [folder / s for s in shards]
    return []


def read_state_dict(folder: str | os.PathLike, stem: str = WEIGHTS_STEM) -> dict[str, torch.Tensor]:
    """Load a folder's weights to CPU tensors; clear errors for missing or corrupt files."""
    folder = Path(folder)
    files = weight_files(folder, stem)
    if not files:
        raise ModelNotFound(
            f"no weights in {folder}: expected {stem}.safetensors or {stem}.bin beside config.json"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ModelNotFound(f"weight shard {file} listed in the index is missing; re-download the model")
        state.update(_read_file(file))
    return state


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # every reader error means the same thing to the user
        raise ModelLoadError(
            f"the weight file {file} is corrupt or truncated ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else 'unreadable'}); re-download or re-export it"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"the weight file {file} does not hold a plain state dict of tensors")
    return state
