"""Hugging Face hub ids (``--model hf:owner/name[@revision]``): checked, then downloaded once into
the hub cache with ``huggingface_hub.snapshot_download`` and loaded as a folder."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelNotFound


def hub_repo(spec: str) -> str:
    repo = spec[3:].partition("@")[0]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ModelNotFound(f"{spec!r} is not a hub id; write hf:owner/name or hf:owner/name@revision")
    return repo


def resolve_hub_id(spec: str) -> Path:
    """Download ``hf:owner/name[@revision]`` (weights, configs, tokenizer) and return the local folder."""
    repo, _, revision = spec[3:].partition("@")
    hub_repo(spec)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=repo,
            revision=revision or None,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "*/*.json", "*/*.txt",
                            "*/*.safetensors", "*/*/*.json", "*/*/*.safetensors", "*.bin", "*/*.bin",
                            "*/*/*.bin"],
        )
    except Exception as err:
        raise ModelNotFound(
            f"could not download {repo!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}); check the name and your network, or download the "
            "folder yourself and pass its path"
        ) from err
    return Path(local)
