"""Exponential moving average of the trained UNet, as the reference kept it (§8).

decay = min((1 + k) / (10 + k), max_decay) at the k-th update (k = 0, 1, ...; one update per
optimizer step, no warm-up), so the average follows the weights closely at first. The average
lives in an fp32 copy of the model, which is saved as ``checkpoint-N/unet_ema/`` in the same
folder layout as the weights themselves.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """An fp32 shadow copy of ``model`` updated with :meth:`update` after each optimizer step."""

    def __init__(self, model: torch.nn.Module, max_decay: float = 0.9999):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.max_decay = float(max_decay)
        self.updates = 0

    def decay(self, k: int) -> float:
        """Decay of the ``k``-th update (0-based)."""
        return min((1.0 + k) / (10.0 + k), self.max_decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow ← d·shadow + (1 − d)·weights, for every parameter of ``model``."""
        d = self.decay(self.updates)
        shadow = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            target = shadow[name]
            target.lerp_(param.detach().to(device=target.device, dtype=target.dtype), 1.0 - d)
        self.updates += 1

    def to(self, device: torch.device | str) -> "EMA":
        self.model.to(device)
        return self

    def load_weights(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = int(updates)
