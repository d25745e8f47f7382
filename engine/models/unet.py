"""SatUNet: Stable Diffusion's conditional UNet plus one MLP per metadata field.

Why a subclass of diffusers' ``UNet2DConditionModel`` (and not a re-written forward): the
reference adds the metadata embeddings to the timestep embedding, after the time and class
embeddings and before the activation, which is exactly where diffusers adds its "augmented"
embedding (``get_aug_embed``). Overriding that one hook keeps every other feature of the current
UNet (SDPA attention, ControlNet residuals, gradient checkpointing, LoRA/PEFT, ``torch.compile``)
and its state-dict layout, so an official checkpoint loads unchanged and a plain SD UNet is a
SatUNet with ``use_metadata=False``. The only extra work per step is the 7 small MLPs, batched
through one call of the sinusoidal projection.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from ._config import extends_config_of, undecorated_init

#: Number of metadata fields: lon, lat, gsd, cloud cover, year, month, day.
NUM_METADATA = 7

#: Key under which the metadata tensor travels through ``added_cond_kwargs``.
_METADATA_KEY = "diffusionsat_metadata"


def build_metadata_embedding(num_metadata: int, proj_dim: int, embed_dim: int) -> nn.ModuleList:
    """One ``TimestepEmbedding(proj_dim -> embed_dim)`` per field, named as in the reference."""
    return nn.ModuleList(
        [TimestepEmbedding(proj_dim, embed_dim) for _ in range(num_metadata)]
    )


def metadata_embedding_like(model: nn.Module, num_metadata: int) -> nn.ModuleList:
    """Metadata MLPs sized like ``model``'s time embedding (projection dim -> embedding dim)."""
    return build_metadata_embedding(
        num_metadata, model.time_embedding.linear_1.in_features, model.time_embedding.linear_2.out_features
    )


def init_metadata_embedding(embedding: nn.ModuleList, generator: Optional[torch.Generator] = None):
    """Initialise the metadata MLPs explicitly (PyTorch's default ``nn.Linear`` init).

    diffusers >= 0.33 skips weight initialisation in ``from_pretrained``; layers that a plain SD
    checkpoint does not provide would otherwise hold whatever memory they were given (diffusers
    PR #12153). We never rely on construction-time init for them.
    """
    with torch.no_grad():
        for module in embedding.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / (module.in_features**0.5)
                # kaiming_uniform(a=sqrt(5)) for the weight, U(-1/sqrt(fan_in), ..) for the bias:
                # what nn.Linear.reset_parameters does, but with an optional generator.
                w = torch.empty_like(module.weight, device="cpu", dtype=torch.float32)
                w.uniform_(-bound, bound, generator=generator)
                module.weight.copy_(w)
                if module.bias is not None:
                    b = torch.empty_like(module.bias, device="cpu", dtype=torch.float32)
                    b.uniform_(-bound, bound, generator=generator)
                    module.bias.copy_(b)


def embed_metadata(
    time_proj: nn.Module,
    embedding: nn.ModuleList,
    metadata: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Sum of the per-field MLPs applied to the sinusoidal projection of each metadata value.

    ``metadata`` is (batch, num_metadata) of *normalised* values (see ``engine.metadata``). Each
    value goes through the same sinusoidal projection as the timestep; the projection runs in
    fp32 (as ``Timesteps`` does) and its result is cast to ``dtype`` before the MLP.
    """
    batch, fields = metadata.shape
    if fields != len(embedding):
        raise ValueError(
            f"metadata has {fields} fields per sample but the model expects {len(embedding)}"
        )
    proj = time_proj(metadata.reshape(-1)).reshape(batch, fields, -1).to(dtype)
    if torch.is_grad_enabled() and any(p.requires_grad for p in embedding.parameters()):
        # training: the plain per-field loop, so gradients reach every MLP's own parameters
        total = embedding[0](proj[:, 0])
        for i in range(1, fields):
            total = total + embedding[i](proj[:, i])
        return total
    # inference: all fields' MLPs as two batched matrix products (fields x batch x dims)
    w1, b1, w2, b2 = _stacked_weights(embedding)
    x = proj.transpose(0, 1)  # (fields, batch, proj_dim)
    h = torch.nn.functional.silu(torch.baddbmm(b1.to(dtype), x, w1.to(dtype)))
    return torch.baddbmm(b2.to(dtype), h, w2.to(dtype)).sum(dim=0)


def _stacked_weights(embedding: nn.ModuleList) -> tuple[torch.Tensor, ...]:
    """The MLPs' weights stacked per field, cached until a parameter changes (values or storage)."""
    params = list(embedding.parameters())
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cache = embedding.__dict__.get("_diffusionsat_stacked")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            stacks = (
                torch.stack([m.linear_1.weight.t() for m in embedding]),
                torch.stack([m.linear_1.bias for m in embedding])[:, None],
                torch.stack([m.linear_2.weight.t() for m in embedding]),
                torch.stack([m.linear_2.bias for m in embedding])[:, None],
            )
        cache = (key, stacks)
        embedding.__dict__["_diffusionsat_stacked"] = cache
    return cache[1]


class SatUNet(UNet2DConditionModel):
    """The DiffusionSat UNet (reference §1). ``forward`` takes an extra ``metadata`` argument.

    ``metadata``: (batch, 7) normalised metadata, or None. ``None`` (or a missing field) means
    unknown, which training represented as 0; a model with ``use_metadata=False`` ignores it.
    """

    @extends_config_of(UNet2DConditionModel, use_metadata=True, num_metadata=NUM_METADATA)
    def __init__(self, *args: Any, use_metadata: bool = True, num_metadata: int = NUM_METADATA, **kwargs: Any):
        undecorated_init(UNet2DConditionModel)(self, *args, **kwargs)
        self.metadata_embedding = metadata_embedding_like(self, num_metadata) if use_metadata else None

    def embed_metadata(self, metadata: Optional[torch.Tensor], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The (batch, time_embed_dim) metadata embedding that ``forward`` adds to the time embedding.

        Pipelines call this once per image, since metadata does not change across denoising
        steps, and pass the result as ``metadata_embeds`` to every step.
        """
        device = self.time_embedding.linear_1.weight.device
        metadata = prepare_metadata(metadata, batch, self.config.num_metadata, device)
        return embed_metadata(self.time_proj, self.metadata_embedding, metadata, dtype)

    def get_aug_embed(self, emb, encoder_hidden_states, added_cond_kwargs):
        md_emb = None
        if added_cond_kwargs is not None and _METADATA_KEY in added_cond_kwargs:
            added_cond_kwargs = dict(added_cond_kwargs)
            md_emb = added_cond_kwargs.pop(_METADATA_KEY)
        aug_emb = super().get_aug_embed(emb, encoder_hidden_states, added_cond_kwargs)
        if md_emb is None:
            return aug_emb
        md_emb = md_emb.to(emb.dtype)
        return md_emb if aug_emb is None else aug_emb + md_emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        metadata: Optional[torch.Tensor] = None,
        added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None,
        metadata_embeds: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """The UNet forward plus ``metadata`` (batch, 7) normalised values, or ``metadata_embeds``
        precomputed with :meth:`embed_metadata` (which takes precedence)."""
        if self.metadata_embedding is not None:
            if metadata_embeds is None:
                metadata_embeds = self.embed_metadata(metadata, sample.shape[0], sample.dtype)
            added_cond_kwargs = dict(added_cond_kwargs or {})
            added_cond_kwargs[_METADATA_KEY] = metadata_embeds
        return super().forward(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kwargs
        )


def prepare_metadata(
    metadata: Optional[torch.Tensor], batch: int, num_metadata: int, device: torch.device
) -> torch.Tensor:
    """Bring metadata to (batch, num_metadata) fp32 on ``device``; None -> zeros (unknown)."""
    if metadata is None:
        return torch.zeros(batch, num_metadata, device=device)
    metadata = torch.as_tensor(metadata, device=device)
    if metadata.ndim == 1:
        metadata = metadata[None]
    if metadata.shape[-1] != num_metadata:
        raise ValueError(f"metadata must have {num_metadata} values per sample, got {tuple(metadata.shape)}")
    if metadata.shape[0] == 1 and batch > 1:
        metadata = metadata.expand(batch, -1)
    if metadata.shape[0] != batch:
        raise ValueError(f"metadata batch {metadata.shape[0]} does not match the latent batch {batch}")
    # fp16 metadata would lose precision before the projection (712.69 -> 712.5); callers that
    # want the reference's fp16 numbers round explicitly (see pipelines).
    return metadata.float()
