"""How many tiles (generate: samples) go to the model in one call: ``--batch-size``, or its default.

The default (``batch_size`` None) is chosen per run from the device and the model at the task's
resolution:

* on the CPU: 1. The CPU runs a batch's images one at a time through the models anyway (so that
  a batch's pixels equal ``--batch-size 1``'s, see
  :attr:`engine.pipelines.base.DiffusionSatBasePipeline.batch_invariant`), and a batch measured
  no faster there (docs/benchmarks.md, "Batched tiles");
* on CUDA: the device's free memory (``torch.cuda.mem_get_info``) less a reserve, times
  :data:`MEMORY_SHARE`, over :func:`tile_bytes` (an estimate of one tile's activation memory
  from the UNet's and the VAE's configs), at least 1 and at most :data:`CAP`.

If the GPU still runs out of memory at an automatic size the batch is halved and retried (down
to 1), with a notice; a size the user gave is not changed (it fails with a message naming
``--batch-size``). No torch at import (only :func:`free_memory` imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

#: the most tiles per call the automatic rule chooses
CAP = 16
#: the share of the free memory (after :data:`RESERVE_BYTES`) the automatic rule may plan for
MEMORY_SHARE = 0.6
#: memory kept free for the allocator's fragmentation, cuDNN workspaces and the other tensors
RESERVE_BYTES = 1 << 30
#: live activation tensors per UNet level at its peak (resnets, attention, skip connections kept
#: for the up blocks), and per VAE decoder level: a deliberately high count
UNET_TENSORS_PER_LEVEL = 24
VAE_TENSORS_PER_LEVEL = 8
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

#: the rule in words: the help of ``--batch-size`` and the outputs' ``batch_size_rule`` tag
RULE = ("auto: 1 on the CPU; on CUDA the free GPU memory (60 % of it, less 1 GiB) over an estimate of one "
        "tile's activation memory (UNet and VAE sizes at the task's resolution, the precision, x2 with "
        "guidance, x1.5 with a ControlNet), 1..16; halved and retried if the GPU runs out of memory")


def _level_elements(channels: Sequence[int], side: int) -> int:
    """Elements of one activation per level: channels x (side / 2^level)^2."""
    return sum(int(c) * max(1, side >> level) ** 2 for level, c in enumerate(channels))


def tile_bytes(unet_channels: Sequence[int], vae_channels: Sequence[int], model_px: int, dtype: str,
               guidance: bool, controlnet: bool, latent_factor: int = 8) -> int:
    """An estimate of the GPU memory one more tile in a batch needs: the UNet's activations at the
    latent size (its rows doubled by classifier-free guidance, x1.5 for a ControlNet's encoder
    copy) plus the VAE decoder's at the output size (decoder levels run from the deepest up)."""
    size = _DTYPE_BYTES.get(dtype, 4)
    latent = max(1, model_px // latent_factor)
    unet = UNET_TENSORS_PER_LEVEL * _level_elements(unet_channels, latent) * size
    unet *= 2 if guidance else 1
    unet = unet * 3 // 2 if controlnet else unet
    vae = VAE_TENSORS_PER_LEVEL * _level_elements(list(vae_channels), model_px) * size
    return unet + vae


def auto_batch_size(free_bytes: Optional[int], per_tile: int) -> int:
    """The automatic batch size for ``free_bytes`` free (None: the CPU, 1)."""
    if free_bytes is None or per_tile <= 0:
        return 1
    usable = (free_bytes - RESERVE_BYTES) * MEMORY_SHARE
    return int(max(1, min(CAP, usable // per_tile)))


def free_memory(device: str) -> Optional[int]:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None for any other device."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):  # no CUDA after all: as the CPU
        return None
    return int(free)


@dataclass(frozen=True)
class BatchChoice:
    """The batch size of a run and where it came from (the ``batch_size``/``batch_size_rule`` tags)."""

    size: int
    auto: bool

    @property
    def rule(self) -> str:
        return RULE if self.auto else "given (--batch-size)"

    def tags(self) -> dict:
        return {"batch_size": self.size, "batch_size_rule": self.rule}


def choose(request_size: Optional[int], device: str, *, unet_channels: Sequence[int],
           vae_channels: Sequence[int], model_px: int, dtype: str, guidance: bool, controlnet: bool,
           free_bytes: Optional[int] = None) -> BatchChoice:
    """The request's ``batch_size``, else the automatic one for ``device`` (see the module's doc)."""
    if request_size is not None:
        return BatchChoice(int(request_size), auto=False)
    free = free_bytes if free_bytes is not None else free_memory(device)
    per_tile = tile_bytes(unet_channels, vae_channels, model_px, dtype, guidance, controlnet)
    return BatchChoice(auto_batch_size(free, per_tile), auto=True)


def is_cuda_oom(err: BaseException) -> bool:
    """torch's CUDA out-of-memory error (by name, so nothing imports torch here)."""
    return type(err).__name__ == "OutOfMemoryError"
