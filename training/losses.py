"""The diffusion training objective: targets and min-SNR loss weights (reference page §8).

The target follows the noise scheduler's ``prediction_type``: the noise for ``epsilon``, the
velocity ``v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀`` for ``v_prediction`` (Stable Diffusion 2.1).

Min-SNR-γ weighting (Hang et al. 2023), with SNR(t) = ᾱ_t / (1 − ᾱ_t):

- ``reference``: ``min(SNR, γ) / SNR`` -- the epsilon-form weight, which the reference applied
  even when training v-prediction (what the released checkpoints were trained with);
- ``v``: ``min(SNR, γ) / (SNR + 1)`` -- the form derived for v-prediction;
- ``none``: 1 (plain MSE; the reference's ControlNet training).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["snr", "snr_weights", "training_target", "weighted_mse"]


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep, fp32, on ``timesteps``' device."""
    acp = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return acp / (1.0 - acp)


def snr_weights(scheduler: Any, timesteps: torch.Tensor, mode: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights (batch,) for ``mode`` in reference / v / none."""
    if mode == "none":
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    ratio = snr(scheduler.alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if mode == "reference":
        return clipped / ratio
    if mode == "v":
        return clipped / (ratio + 1.0)
    raise ValueError(f"unknown SNR weighting {mode!r}")


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict, from the scheduler config's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``weights`` × the per-sample MSE, computed in fp32."""
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    return (per_sample * weights.float()).mean()
