"""Validation samples during training: fixed prompts, metadata and seeds -> PNGs in the run.

The first ``validation_samples`` examples of the data (unshuffled, no dropout) give the metadata,
the caption and, for ControlNet runs, the conditioning; sample ``i`` always uses seed
``seed + i``, so images of successive steps are comparable. Images go to
``RUN/validation/step-<N>-<i>.png`` and to the tracker (TensorBoard) when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engine.atomic import atomic_path

__all__ = ["ValidationSet", "run_validation", "save_png"]


@dataclass
class ValidationSet:
    prompts: list[str]
    metadata: torch.Tensor  #: (n, 7) normalised
    conditioning: Optional[torch.Tensor] = None  #: (n, C, H, W) or (n, C, T, H, W) in [0, 1]
    cond_metadata: Optional[torch.Tensor] = None  #: (n, 7) or (n, 7, T)

    @classmethod
    def from_examples(cls, examples: list[dict[str, Any]], prompt: Optional[str] = None) -> "ValidationSet":
        cond = [e["conditioning"] for e in examples if "conditioning" in e]
        return cls(
            prompts=[prompt or e["caption"] for e in examples],
            metadata=torch.stack([e["metadata"] for e in examples]),
            conditioning=torch.stack(cond) if cond else None,
            cond_metadata=torch.stack([e["cond_metadata"] for e in examples]) if cond else None,
        )


def save_png(image: np.ndarray, path: Path) -> None:
    """(H, W, 3) float in [0, 1] -> 8-bit PNG (PIL), written atomically."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")


@torch.no_grad()
def run_validation(bundle: Any, unet: Any, controlnet: Any, samples: ValidationSet, *, resolution: int,
                   steps: int, guidance: float, seed: int, out_dir: Path, step: int,
                   tracker: Any = None) -> list[Path]:
    """Sample one image per validation entry with the current weights; returns the PNG paths."""
    from engine.pipelines.controlnet import Control, DiffusionSatControlNetPipeline
    from engine.schedulers import make_scheduler

    # controlnet None (single-image training): the plain text + metadata loop
    pipe = DiffusionSatControlNetPipeline(bundle.vae, bundle.text_encoder, bundle.tokenizer, unet,
                                          make_scheduler("default", bundle.scheduler), controlnet=controlnet)
    was_training = [m.training for m in (unet, controlnet) if m is not None]
    for module in (unet, controlnet):
        if module is not None:
            module.eval()
    paths = []
    images = []
    try:
        for i, prompt in enumerate(samples.prompts):
            control = None
            if controlnet is not None and samples.conditioning is not None:
                control = Control(image=samples.conditioning[i:i + 1], cond_metadata=samples.cond_metadata[i:i + 1])
            generator = torch.Generator("cpu").manual_seed(seed + i)
            out = pipe(prompt, samples.metadata[i:i + 1], height=resolution, width=resolution,
                       num_inference_steps=steps, guidance_scale=guidance, generator=generator, control=control)
            image = out.images[0]
            path = out_dir / f"step-{step:06d}-{i}.png"
            save_png(image, path)
            paths.append(path)
            images.append(image)
    finally:
        for module, flag in zip([m for m in (unet, controlnet) if m is not None], was_training):
            module.train(flag)
    if tracker is not None and images:
        try:
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")
        except AttributeError:  # trackers without a TensorBoard writer (W&B logs its own way)
            try:
                import wandb

                tracker.log({"validation": [wandb.Image(img, caption=p) for img, p in zip(images, samples.prompts)]},
                            step=step)
            except ImportError:
                pass
    return paths
