"""The two DiffusionSat ControlNets (reference §5): the metadata ControlNet and ControlNet3D.

Both subclass diffusers' ``ControlNetModel`` for its modules (time embedding, down and mid blocks,
zero-initialised residual convolutions, the state-dict names) and replace the forward, because
the reference changes the embedding (metadata of the target *and* of the conditioning frames is
added to the time embedding) and, for the 3D model, folds frames into the batch and mixes the
residuals over time before summing them.

Saved folders use the official class names in ``config.json`` (``ControlNetModel`` and
``ControlNetModel3D``) and the official extra config keys (``conditioning_in_channels``,
``conditioning_scale``, ``use_metadata``, ``num_metadata``, ``use_temporal_transformer``), so the
released checkpoints load unchanged and ours load in the reference code.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from diffusers.models.controlnets.controlnet import (
    ControlNetModel,
    ControlNetOutput,
    zero_module,
)
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from torch import nn

from ._config import extends_config_of, undecorated_init
from .configs import CONTROLNET_CLASS_NAMES
from .unet import (
    NUM_METADATA,
    embed_metadata,
    metadata_embedding_like,
    prepare_metadata,
)

#: Heads x head width of the temporal transformer on the first residual (conv_in's output).
FIRST_TEMPORAL_HEADS, FIRST_TEMPORAL_HEAD_DIM = 8, 64
COND_EMBED_CHANNELS = (16, 32, 96, 256)


def conditioning_strides(conditioning_scale: int, blocks: int = 3) -> list[int]:
    """Strides of the conditioning embedding: 2 while the running scale is below 8, then 1.

    ``conditioning_scale`` = model resolution // conditioning resolution: 1 -> (2, 2, 2) (8x down,
    conditioning at image resolution), 2 -> (2, 2, 1), 4 -> (2, 1, 1).
    """
    strides, value = [], int(conditioning_scale)
    for _ in range(blocks):
        strides.append(2 if value < 8 else 1)
        value *= 2
    return strides


class ConditioningEmbedding2D(nn.Module):
    """``controlnet_cond_embedding``: conv_in -> 16, then (conv, strided conv) pairs, zero conv_out."""

    def __init__(self, in_channels: int, out_channels: int, conditioning_scale: int = 1,
                 channels: tuple[int, ...] = COND_EMBED_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        strides = conditioning_strides(conditioning_scale, len(channels) - 1)
        self.blocks = nn.ModuleList()
        for (c_in, c_out), stride in zip(zip(channels[:-1], channels[1:]), strides):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=stride))
        self.conv_out = zero_module(nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv_in(x))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)


class ConditioningEmbedding3D(nn.Module):
    """The 3D version: k=3 Conv3d pairs whose second conv halves H and W only (1, 2, 2)."""

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...] = COND_EMBED_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv3d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv3d(c_in, c_out, kernel_size=(1, 3, 3), padding=(0, 1, 1), stride=(1, 2, 2)))
        self.conv_out = zero_module(nn.Conv3d(channels[-1], out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv_in(x))
        for block in self.blocks:
            x = nn.functional.silu(block(x))
        return self.conv_out(x)


def _official_json(config_json: str, class_name: str, drop: tuple[str, ...] = ()) -> str:
    config = json.loads(config_json)
    config["_class_name"] = class_name
    for key in drop:
        config.pop(key, None)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


#: UNet config keys a ControlNet copies in :meth:`SatControlNet.from_unet`.
_FROM_UNET_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "mid_block_type", "num_metadata",
)


class SatControlNet(ControlNetModel):
    """The metadata ControlNet (2D): one conditioning image per sample (or per frame, summed).

    ``forward(sample, timestep, encoder_hidden_states, controlnet_cond, metadata=..., cond_metadata=...)``
    returns the residuals to pass to :class:`~engine.models.unet.SatUNet` as
    ``down_block_additional_residuals`` / ``mid_block_additional_residual``.
    """

    official_class_name = "ControlNetModel"
    ignore_for_config = ["conditioning_channels"]

    @extends_config_of(
        ControlNetModel,
        conditioning_in_channels=3,
        conditioning_scale=1,
        use_metadata=True,
        num_metadata=NUM_METADATA,
    )
    def __init__(self, *args: Any, conditioning_in_channels: int = 3, conditioning_scale: int = 1,
                 use_metadata: bool = True, num_metadata: int = NUM_METADATA, **kwargs: Any):
        kwargs.pop("conditioning_channels", None)
        undecorated_init(ControlNetModel)(self, *args, conditioning_channels=conditioning_in_channels, **kwargs)
        self._build_conditioning(conditioning_in_channels, conditioning_scale)
        self.metadata_embedding = metadata_embedding_like(self, num_metadata) if use_metadata else None

    def _build_conditioning(self, in_channels: int, conditioning_scale: int) -> None:
        self.controlnet_cond_embedding = ConditioningEmbedding2D(
            in_channels, self.config.block_out_channels[0], conditioning_scale
        )

    def to_json_string(self) -> str:
        return _official_json(super().to_json_string(), self.official_class_name)

    # --------------------------------------------------------------------------------------------

    @classmethod
    def from_unet(cls, unet, *, conditioning_in_channels: int = 3, conditioning_scale: int = 1,
                  load_weights: bool = True, **extra: Any) -> "SatControlNet":
        """A ControlNet shaped like ``unet``, with its conv_in, time and metadata embeddings, down
        blocks and mid block copied (the residual convolutions and conditioning output stay zero)."""
        config = {k: unet.config[k] for k in _FROM_UNET_KEYS if k in unet.config}
        if config.get("mid_block_type") not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            config.pop("mid_block_type", None)
        use_metadata = getattr(unet, "metadata_embedding", None) is not None
        controlnet = cls(conditioning_in_channels=conditioning_in_channels, conditioning_scale=conditioning_scale,
                         use_metadata=use_metadata, **config, **extra)
        if load_weights:
            for name in ("conv_in", "time_embedding", "class_embedding", "metadata_embedding", "down_blocks",
                         "mid_block"):
                src = getattr(unet, name, None)
                if src is not None:
                    getattr(controlnet, name).load_state_dict(src.state_dict())
        return controlnet

    # --------------------------------------------------------------------------------------------

    def _metadata_emb(self, metadata, cond_metadata, batch: int, dtype, device) -> Optional[torch.Tensor]:
        """Σ MLP(target metadata) + Σ_frames Σ MLP(cond metadata); None without metadata."""
        if self.metadata_embedding is None:
            return None
        n = self.config.num_metadata
        total = embed_metadata(self.time_proj, self.metadata_embedding,
                               prepare_metadata(metadata, batch, n, device), dtype)
        if cond_metadata is None:
            cond_metadata = torch.zeros(batch, n, device=device)
        cond_metadata = torch.as_tensor(cond_metadata, device=device).float()
        if cond_metadata.ndim == 3:  # (b, 7, T): each frame embedded, summed over frames
            b, fields, frames = cond_metadata.shape
            flat = cond_metadata.permute(0, 2, 1).reshape(b * frames, fields)
            emb = embed_metadata(self.time_proj, self.metadata_embedding,
                                 prepare_metadata(flat, b * frames, n, device), dtype)
            total = total + emb.reshape(b, frames, -1).sum(dim=1)
        else:
            total = total + embed_metadata(self.time_proj, self.metadata_embedding,
                                           prepare_metadata(cond_metadata, batch, n, device), dtype)
        return total

    def _time_emb(self, sample: torch.Tensor, timestep, extra: Optional[torch.Tensor], class_labels) -> torch.Tensor:
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        if timesteps.shape[0] == 1:
            timesteps = timesteps.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        if extra is not None:
            emb = emb + extra.to(emb.dtype)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are needed: this ControlNet has a class embedding")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        return emb

    def _encode(self, sample, emb, encoder_hidden_states, attention_mask, cross_attention_kwargs):
        """Down and mid blocks: the raw residuals (before the zero convolutions)."""
        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.unsqueeze(1)
        residuals = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += res
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states,
                                        attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs)
            else:
                sample = self.mid_block(sample, emb)
        return residuals, sample

    def _channel_order(self, cond: torch.Tensor) -> torch.Tensor:
        """``controlnet_conditioning_channel_order: "bgr"`` flips the channel axis (dim 1), as the
        official ControlNet does; "rgb" (the default) leaves it."""
        order = self.config.get("controlnet_conditioning_channel_order", "rgb")
        if order == "bgr":
            return torch.flip(cond, dims=[1])
        if order != "rgb":
            raise ValueError(f"unknown controlnet_conditioning_channel_order {order!r} (rgb or bgr)")
        return cond

    @staticmethod
    def _scale(down, mid, conditioning_scale: float, guess_mode: bool, device):
        if guess_mode:
            scales = torch.logspace(-1, 0, len(down) + 1, device=device) * conditioning_scale
            return [r * s for r, s in zip(down, scales)], mid * scales[-1]
        return [r * conditioning_scale for r in down], mid * conditioning_scale

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        metadata: Optional[torch.Tensor] = None,
        cond_metadata: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guess_mode: bool = False,
        return_dict: bool = True,
        **_: Any,
    ):
        """``controlnet_cond`` (b, C, H_c, W_c) in [0, 1]; ``metadata`` (b, 7) of the target and
        ``cond_metadata`` (b, 7) or (b, 7, T) of the conditioning, normalised; None = unknown."""
        batch = sample.shape[0]
        controlnet_cond = self._channel_order(controlnet_cond)
        extra = self._metadata_emb(metadata, cond_metadata, batch, sample.dtype, sample.device)
        emb = self._time_emb(sample, timestep, extra, class_labels)
        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))
        residuals, mid = self._encode(sample, emb, encoder_hidden_states, attention_mask, cross_attention_kwargs)
        down = [block(r) for r, block in zip(residuals, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(mid)
        down, mid = self._scale(down, mid, conditioning_scale, guess_mode, sample.device)
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


def _straight_through_clamp(alpha: torch.Tensor) -> torch.Tensor:
    """clamp(alpha, 0, 1) in the forward pass, identity gradient in the backward pass."""
    return alpha + (alpha.clamp(0.0, 1.0) - alpha).detach()


class SatControlNet3D(SatControlNet):
    """ControlNet3D: several dated conditioning frames of the same place (temporal generation).

    ``controlnet_cond`` is (b, C, T, H, W) at image resolution; ``cond_metadata`` (b, 7, T).
    """

    official_class_name = "ControlNetModel3D"

    @extends_config_of(SatControlNet, use_temporal_transformer=True,
                       first_temporal_heads=FIRST_TEMPORAL_HEADS, first_temporal_head_dim=FIRST_TEMPORAL_HEAD_DIM)
    def __init__(self, *args: Any, use_temporal_transformer: bool = True,
                 first_temporal_heads: int = FIRST_TEMPORAL_HEADS,
                 first_temporal_head_dim: int = FIRST_TEMPORAL_HEAD_DIM, **kwargs: Any):
        # first_temporal_*: the reference hard-codes 8 x 64 (absent from official configs, so the
        # defaults apply to them); the tiny preset uses a narrower block to stay fast on a CPU.
        undecorated_init(SatControlNet)(self, *args, **kwargs)
        channels = self.config.block_out_channels
        # Zero 1x1x1 Conv3d per residual instead of the 2D ones.
        self.controlnet_down_blocks = nn.ModuleList(
            [zero_module(nn.Conv3d(c, c, kernel_size=1)) for c in self._residual_channels()]
        )
        self.controlnet_mid_block = zero_module(nn.Conv3d(channels[-1], channels[-1], kernel_size=1))
        n = len(self.controlnet_down_blocks)
        self.temporal_blocks = nn.ModuleList([nn.Identity() for _ in range(n)])
        if use_temporal_transformer:
            heads_cfg = self.config.attention_head_dim
            if isinstance(heads_cfg, int):
                heads_cfg = [heads_cfg] * len(channels)
            for index, (c, value) in self._temporal_positions(heads_cfg).items():
                if index == 0:
                    # the first block keeps TransformerTemporalModel's default 32 groups
                    heads, head_dim, groups = first_temporal_heads, first_temporal_head_dim, 32
                else:
                    # the head-split trap: here the config value is the *per-head* width; these
                    # blocks take the model's norm_num_groups (the official code passes it on)
                    heads, head_dim, groups = c // value, value, self.config.norm_num_groups
                self.temporal_blocks[index] = TransformerTemporalModel(
                    num_attention_heads=heads, attention_head_dim=head_dim, in_channels=c,
                    norm_num_groups=groups, double_self_attention=True,
                )
        self.mixing_attns = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(n)])

    def _build_conditioning(self, in_channels: int, conditioning_scale: int) -> None:
        self.controlnet_cond_embedding = ConditioningEmbedding3D(in_channels, self.config.block_out_channels[0])

    def _residual_channels(self) -> list[int]:
        channels = list(self.config.block_out_channels)
        out = [channels[0]]
        for i, c in enumerate(channels):
            out += [c] * self.config.layers_per_block
            if i < len(channels) - 1:
                out.append(c)
        return out

    def _temporal_positions(self, heads_cfg) -> dict[int, tuple[int, int]]:
        """Residual index -> (channels, config value): conv_in's output and each downsampler's."""
        channels = list(self.config.block_out_channels)
        positions = {0: (channels[0], heads_cfg[0])}
        index = 0
        for i, c in enumerate(channels[:-1]):
            index += self.config.layers_per_block + 1
            positions[index] = (c, heads_cfg[i])
        return positions

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The mixing scalars may be stored as 0-d or (1,) tensors; accept either.
        for i in range(len(self.mixing_attns)):
            key = f"{prefix}mixing_attns.{i}"
            if key in state_dict and state_dict[key].numel() == 1:
                state_dict[key] = state_dict[key].reshape(1)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _mix(self, index: int, r: torch.Tensor, frames: int) -> torch.Tensor:
        """r (b, c, T, h, w) -> α·temporal(r) + (1-α)·r where a temporal block is placed."""
        block = self.temporal_blocks[index]
        if isinstance(block, nn.Identity):
            return r
        b, c, t, h, w = r.shape
        folded = r.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        out = block(folded, num_frames=frames).sample
        out = out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        alpha = _straight_through_clamp(self.mixing_attns[index]).to(r.dtype)
        return alpha * out + (1 - alpha) * r

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        metadata: Optional[torch.Tensor] = None,
        cond_metadata: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        guess_mode: bool = False,
        return_dict: bool = True,
        **_: Any,
    ):
        if controlnet_cond.ndim != 5:
            raise ValueError(f"ControlNet3D needs (batch, channels, frames, H, W) conditioning, got {tuple(controlnet_cond.shape)}")
        b, _, frames = controlnet_cond.shape[:3]
        controlnet_cond = self._channel_order(controlnet_cond)
        n = self.config.num_metadata
        cond = self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))  # (b, 320, T, h, w)
        cond = cond.permute(0, 2, 1, 3, 4).reshape(b * frames, *cond.shape[1:2], *cond.shape[3:])
        # Frames folded into the batch, (b t) order: latent, timestep and text repeated per frame.
        x = sample.repeat_interleave(frames, dim=0)
        text = encoder_hidden_states.repeat_interleave(frames, dim=0)
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == b:
            timestep = timestep.repeat_interleave(frames, dim=0)
        extra = None
        if self.metadata_embedding is not None:
            target = embed_metadata(self.time_proj, self.metadata_embedding,
                                    prepare_metadata(metadata, b, n, sample.device), sample.dtype)
            extra = target.repeat_interleave(frames, dim=0)
            if cond_metadata is not None:
                cm = torch.as_tensor(cond_metadata, device=sample.device).float()
                cm = cm.permute(0, 2, 1).reshape(b * frames, n) if cm.ndim == 3 else cm.repeat_interleave(frames, 0)
            else:
                cm = torch.zeros(b * frames, n, device=sample.device)
            extra = extra + embed_metadata(self.time_proj, self.metadata_embedding, cm, sample.dtype)
        if class_labels is not None:
            class_labels = class_labels.repeat_interleave(frames, dim=0)
        emb = self._time_emb(x, timestep, extra, class_labels)
        x = self.conv_in(x) + cond
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(frames, dim=0)
        residuals, mid = self._encode(x, emb, text, attention_mask, cross_attention_kwargs)

        def unfold(r: torch.Tensor) -> torch.Tensor:  # (b t) c h w -> b c t h w
            return r.reshape(b, frames, *r.shape[1:]).permute(0, 2, 1, 3, 4)

        down = []
        for index, (r, block) in enumerate(zip(residuals, self.controlnet_down_blocks)):
            r = self._mix(index, block(unfold(r)), frames)
            down.append(r.sum(dim=2))
        mid = self.controlnet_mid_block(unfold(mid)).sum(dim=2)
        down, mid = self._scale(down, mid, conditioning_scale, guess_mode, sample.device)
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


_OURS = {"SatControlNet": SatControlNet, "SatControlNet3D": SatControlNet3D}
CONTROLNET_CLASSES = {name: _OURS[ours] for name, ours in CONTROLNET_CLASS_NAMES.items()}
