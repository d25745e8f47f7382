"""The built-in ``tiny`` preset: SD-shaped components, a few MB, random weights (seeded).

For tests, smoke runs and a fresh machine. Its images are noise-like: it proves the plumbing, not
quality. Every task runs on it (it carries a super-resolution and a temporal ControlNet).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..schedulers import scheduler_from_config
from .bundle import ModelBundle, vae_scale_factor
from .configs import resource_path
from .controlnet import SatControlNet, SatControlNet3D
from .unet import SatUNet, init_metadata_embedding

TINY_SEED = 20240101


def build_tiny(seed: int = TINY_SEED) -> ModelBundle:
    """The built-in tiny model: SD-shaped components, a few MB, random weights from ``seed``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def cfg(name: str) -> dict:
        return json.loads(resource_path("tiny", f"{name}.json").read_text())

    # fork_rng: building the tiny model must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = SatUNet.from_config(cfg("unet"))
        init_metadata_embedding(unet.metadata_embedding)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(cfg("vae"))
        torch.manual_seed(seed + 2)
        text_config = {k: v for k, v in cfg("text_encoder").items() if k not in ("architectures", "model_type")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        torch.manual_seed(seed + 3)
        controlnets = {
            # Sentinel-2 (10 bands) at half the output resolution, as the released SR checkpoint
            "superres": _randomise_zero_convs(
                SatControlNet.from_unet(unet, conditioning_in_channels=10, conditioning_scale=2)),
            "temporal": _randomise_zero_convs(SatControlNet3D.from_unet(
                unet, conditioning_in_channels=3, first_temporal_heads=2, first_temporal_head_dim=16)),
        }
    tokenizer = CLIPTokenizer.from_pretrained(resource_path("tiny", "tokenizer"))
    scheduler = scheduler_from_config(cfg("scheduler"))
    return ModelBundle(
        controlnets=controlnets,
        name="tiny",
        source="built-in tiny model (random weights: noise-like images, for tests and smoke runs)",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        native_resolution=unet.config.sample_size * vae_scale_factor(vae),
        is_tiny=True,
    )


def _randomise_zero_convs(controlnet: Any) -> Any:
    """Give a tiny ControlNet's zero-initialised outputs small random weights.

    A trained ControlNet's output convolutions are not zero; a freshly initialised one's are, and
    would make the tiny model ignore its conditioning. The tiny preset stands in for trained
    weights, so its conditioning must reach the output (tests rely on it).
    """
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.5)
            conv.bias.zero_()
        for alpha in getattr(controlnet, "mixing_attns", []):
            alpha.fill_(0.5)
        # He-initialised conditioning convolutions without bias, so that differences between
        # conditioning images survive the stack (default init lets the biases dominate).
        embedding = controlnet.controlnet_cond_embedding
        for conv in [embedding.conv_in, *embedding.blocks]:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
    return controlnet
