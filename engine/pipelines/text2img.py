"""Text + metadata -> image: the DiffusionSat single-image sampler (reference §4).

It is the Stable Diffusion text-to-image loop with one addition: the normalised metadata goes to
the UNet at every step. Classifier-free guidance pairs the empty prompt with an all-zero metadata
vector in the unconditional branch (one guidance scale for both). The loop reads top to bottom:
check inputs, encode the prompt, prepare metadata and latents, denoise (reporting progress and
honouring cancellation once per step), decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidRequest
from ..progress import CancelToken, Progress, ProgressCallback, report

#: ``--scheduler`` names. ``default`` keeps the checkpoint's own scheduler (what the reference did).
SCHEDULERS = ("default", "ddim", "dpm++", "unipc", "euler", "pndm", "ddpm")


def make_scheduler(name: str, base: Any) -> Any:
    """A scheduler of kind ``name`` built from the checkpoint's scheduler config ``base``."""
    import diffusers

    name = (name or "default").lower()
    if name == "default":
        return base.__class__.from_config(base.config)
    classes = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "dpm++": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "ddpm": (diffusers.DDPMScheduler, {}),
    }
    if name not in classes:
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, extra = classes[name]
    return cls.from_config(base.config, **extra)


@dataclass
class PipelineOutput:
    images: Any  #: (batch, H, W, 3) float32 in [0, 1] for "np"; a tensor for "pt"/"latent"


class DiffusionSatPipeline:
    """The single-image DiffusionSat sampler over a :class:`~engine.models.loading.ModelBundle`'s parts.

    Components follow diffusers' names (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``scheduler``) so a diffusers pipeline folder maps onto it one to one.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, *, match_reference_fp16: bool = True):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        #: Round metadata through fp16 before the projection when the model runs in fp16, as the
        #: released pipelines did (712.69 -> 712.5), so fp16 outputs match the reference's.
        self.match_reference_fp16 = match_reference_fp16
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> "DiffusionSatPipeline":
        return cls(bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.unet, bundle.scheduler, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ----------------------------------------------------------------------------------------
    # Pieces (public so tests and other pipelines can reuse them)
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), 77, hidden) text embeddings, padded to the tokenizer's max length."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype)

    def prepare_metadata(self, metadata: Any, batch: int) -> torch.Tensor:
        """Normalised metadata as a (batch, 7) fp32 tensor.

        Accepts a :class:`engine.metadata.SatMetadata`, a list of them (one per prompt), a
        sequence of 7 normalised floats, or a (batch|1, 7) array/tensor of normalised values.
        """
        from ..metadata import SatMetadata

        if metadata is None:
            values = torch.zeros(1, 7)
        elif isinstance(metadata, SatMetadata):
            values = torch.tensor([metadata.normalised()], dtype=torch.float64)
        elif isinstance(metadata, (list, tuple)) and metadata and isinstance(metadata[0], SatMetadata):
            values = torch.tensor([m.normalised() for m in metadata], dtype=torch.float64)
        else:
            values = torch.as_tensor(np.asarray(metadata, dtype=np.float64))
            if values.ndim == 1:
                values = values[None]
        if values.ndim != 2 or values.shape[1] != 7:
            raise InvalidRequest(f"metadata must be 7 values per image, got shape {tuple(values.shape)}")
        if values.shape[0] == 1:
            values = values.expand(batch, 7)
        if values.shape[0] != batch:
            raise InvalidRequest(f"{values.shape[0]} metadata rows for {batch} prompts")
        values = values.float()
        if self.match_reference_fp16 and self.dtype == torch.float16:
            values = values.half().float()
        return values.to(self.device)

    def embed_metadata(self, metadata: torch.Tensor) -> Optional[torch.Tensor]:
        """Metadata embeddings for all steps of one run (None for a UNet without metadata)."""
        if getattr(self.unet, "metadata_embedding", None) is None:
            return None
        return self.unet.embed_metadata(metadata, metadata.shape[0], self.dtype)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise InvalidRequest(f"{name} {value} px must be a positive multiple of {multiple}")

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: Optional[torch.Generator], latents=None
    ) -> torch.Tensor:
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            # Noise is drawn on the CPU in fp32 so a seed gives the same image on every device.
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise InvalidRequest(f"latents of shape {tuple(latents.shape)} given, {shape} expected")
        latents = latents.to(self.device, self.dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (batch, 3, H, W) fp32."""
        scaling = self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(self.vae.dtype) / scaling).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        metadata: torch.Tensor,
        guidance_scale: float,
        metadata_embeds: Optional[torch.Tensor] = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """One UNet evaluation with classifier-free guidance.

        ``text`` and ``metadata`` hold the unconditional rows first when guidance is on
        (``[uncond; cond]``, as built by :meth:`__call__`). ``metadata_embeds`` (from
        :meth:`embed_metadata`) saves recomputing the metadata MLPs at every step.
        """
        do_cfg = guidance_scale > 1.0
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = self.scheduler.scale_model_input(model_in, t)
        if metadata_embeds is not None:
            unet_kwargs["metadata_embeds"] = metadata_embeds
        out = self.unet(model_in, t, encoder_hidden_states=text, metadata=metadata, **unet_kwargs).sample
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] = "a satellite image",
        metadata: Any = None,
        *,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "np",
        callback: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> PipelineOutput:
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidRequest("at least one prompt is needed (the empty string is allowed)")
        if num_inference_steps < 1:
            raise InvalidRequest(f"steps must be at least 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise InvalidRequest(f"images per prompt must be at least 1, got {num_images_per_prompt}")
        self.check_size(height, width)
        n = num_images_per_prompt
        batch = len(prompts) * n

        # 2. Encode the prompt; metadata follows its prompt (the reference's n > 1 bug is fixed)
        text = self.encode_prompt(prompts).repeat_interleave(n, dim=0)
        md = self.prepare_metadata(metadata, len(prompts)).repeat_interleave(n, dim=0)
        if guidance_scale > 1.0:
            uncond_text = self.encode_prompt([""]).expand(batch, -1, -1)
            text = torch.cat([uncond_text, text])
            md = torch.cat([torch.zeros_like(md), md])

        # 3. Timesteps and latents
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, height, width, generator, latents)
        step_kwargs = {}
        if "eta" in _step_params(self.scheduler):
            step_kwargs["eta"] = eta
        if "generator" in _step_params(self.scheduler):
            step_kwargs["generator"] = generator

        # 4. Denoise (metadata is constant over the steps: embed it once)
        md_embeds = self.embed_metadata(md)
        total = len(timesteps)
        report(callback, Progress(step=0, total_steps=total, message="denoising"))
        for i, t in enumerate(timesteps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            noise = self.predict_noise(latents, t, text, md, guidance_scale, metadata_embeds=md_embeds)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
            report(callback, Progress(step=i + 1, total_steps=total, message="denoising"))
        if cancel is not None:
            cancel.raise_if_cancelled()

        # 5. Decode
        if output_type == "latent":
            return PipelineOutput(images=latents)
        images = self.decode(latents)
        if output_type == "pt":
            return PipelineOutput(images=images)
        return PipelineOutput(images=images.permute(0, 2, 3, 1).cpu().numpy())


def _step_params(scheduler: Any) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
