"""Shared fixtures: the tiny model (random weights, CPU) and its official-layout export."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a hub: any accidental download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Installed user models must not change what "auto" means inside tests.
os.environ.setdefault("DIFFUSIONSAT_MODELS", os.path.join(os.path.dirname(__file__), "_no_models_here"))


@pytest.fixture(scope="session")
def tiny_bundle():
    from engine.models.loading import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_bundle):
    """The tiny model saved as an official DiffusionSat root (checkpoint-0/unet inside)."""
    from engine.models.loading import save_bundle

    return save_bundle(tiny_bundle, tmp_path_factory.mktemp("models") / "tiny-official",
                       unet_subfolder="checkpoint-0/unet")
