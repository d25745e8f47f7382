"""What a loaded model is: :class:`ModelBundle`, the components a pipeline needs and where they
came from (its resolutions are :class:`~engine.models.resolution.Resolution`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .registry import missing_controlnet
from .resolution import Resolution
from .unet import SatUNet


@dataclass
class ModelBundle:
    """Everything a pipeline needs, plus what the user should be told about where it came from."""

    name: str
    source: str
    unet: SatUNet
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    native_resolution: int
    is_tiny: bool = False
    root: Optional[Path] = None
    notices: list[str] = field(default_factory=list)
    #: task name ("superres", "temporal", "control") -> ControlNet trained for it
    controlnets: dict[str, Any] = field(default_factory=dict)
    #: where ``native_resolution`` came from, and the ControlNet's own
    #: (see :func:`~engine.models.resolution.task_resolution`)
    unet_resolution: Optional["Resolution"] = None
    controlnet_resolution: Optional["Resolution"] = None

    def __post_init__(self) -> None:
        if self.unet_resolution is None:
            self.unet_resolution = Resolution(self.native_resolution, "built-in" if self.is_tiny else "config")

    @property
    def tasks(self) -> list[str]:
        """The tasks this bundle can run."""
        tasks = ["generate", "inpaint"]
        for task in ("superres", "temporal"):
            if task in self.controlnets:
                tasks.append(task)
        return tasks

    def controlnet_for(self, task: str) -> Any:
        if task not in self.controlnets:
            raise missing_controlnet(self.name, task, self.controlnets)
        return self.controlnets[task]

    def to(self, device: str, dtype: torch.dtype) -> "ModelBundle":
        for module in (self.unet, self.vae, self.text_encoder, *self.controlnets.values()):
            # only cast when needed: diffusers logs a warning on every dtype cast
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
            module.to(device=device)
            module.eval()
            module.requires_grad_(False)
        return self

    @property
    def uses_metadata(self) -> bool:
        return bool(self.unet.config.get("use_metadata", False)) and self.unet.metadata_embedding is not None


def vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
