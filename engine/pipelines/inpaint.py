"""In-painting: generate inside a mask, keep the rest (optionally conditioned through a ControlNet).

The known region's latents, re-noised to the current noise level, replace the generated ones
outside the mask after every step; optional RePaint-style resampling passes re-noise and
re-denoise each step to harmonise the seam. The caller composites the final pixels so that
unmasked pixels stay bit-identical to the input. In-painting with dated reference frames
conditions through the temporal ControlNet (``controlnet`` is optional here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import InvalidRequest
from .base import PipelineOutput, SamplingRun
from .rows import randn_rows, rows
from .controlnet import Control, DiffusionSatControlNetPipeline


@dataclass
class Inpaint:
    """In-painting inputs: ``image`` (b, 3, H, W) in [0, 1]; ``mask`` (b, 1, H, W), 1 = generate;
    ``resample``: extra re-noising passes per step (RePaint-style harmonisation; DDIM/DDPM only)."""

    image: torch.Tensor
    mask: torch.Tensor
    resample: int = 0


class DiffusionSatInpaintPipeline(DiffusionSatControlNetPipeline):
    """:class:`~engine.pipelines.controlnet.DiffusionSatControlNetPipeline` with ``inpaint=``;
    its ``controlnet`` is optional (needed only with ``control=``)."""

    _optional_components = ["controlnet"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, controlnet=None,
                 match_reference_fp16: bool = True):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, controlnet,
                         match_reference_fp16=match_reference_fp16)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] = "a satellite image", metadata: Any = None, *,
                 inpaint: Inpaint, control: Optional[Control] = None, **kwargs: Any) -> PipelineOutput:
        """As :meth:`DiffusionSatControlNetPipeline.__call__`, keeping ``inpaint.image`` outside
        ``inpaint.mask`` (see :class:`Inpaint`)."""
        return self.generate(prompt, metadata, control=control, inpaint=inpaint, **kwargs)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (b, 3, H, W) -> scaled latents (the distribution's mode: deterministic)."""
        if self.rows_alone(image.shape[0]):
            return torch.cat([self.encode_image(image[i : i + 1]) for i in range(image.shape[0])])
        image = image.to(self._execution_device, self.vae.dtype) * 2 - 1
        latents = self.vae.encode(image).latent_dist.mode()
        return latents.to(self.dtype) * self.vae.config.scaling_factor

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask (b, 1, H, W) -> latent cells to generate: any masked pixel marks its cell."""
        k = self.vae_scale_factor
        pooled = torch.nn.functional.max_pool2d(mask.float(), kernel_size=k, stride=k)
        return pooled.to(self._execution_device, self.dtype)

    def prepare_conditioning(self, run: SamplingRun, prompts: int, n: int, inpaint: Optional[Inpaint] = None,
                             **conditioning: Any) -> None:
        super().prepare_conditioning(run, prompts, n, **conditioning)
        if inpaint is None:
            raise InvalidRequest("in-painting needs inpaint=Inpaint(image, mask)")
        if inpaint.resample and not hasattr(self.scheduler, "alphas_cumprod"):
            raise InvalidRequest("resampling passes need a DDIM or DDPM scheduler (--scheduler ddim)")
        if inpaint.resample and type(self.scheduler).__name__ not in ("DDIMScheduler", "DDPMScheduler"):
            raise InvalidRequest("resampling passes need a stateless scheduler: use --scheduler ddim")
        run.extra["resample"] = inpaint.resample
        run.extra["known"] = self.encode_image(rows(inpaint.image, prompts, "image").repeat_interleave(n, 0))
        run.extra["mask"] = self.latent_mask(rows(inpaint.mask, prompts, "mask").repeat_interleave(n, 0))

    def prepare_run_latents(self, run: SamplingRun, height: int, width: int, latents, eta: float) -> torch.Tensor:
        latents = super().prepare_run_latents(run, height, width, latents, eta)
        # the noise the known region is re-noised with stays fixed over the steps
        known = run.extra["known"]
        run.extra["noise"] = randn_rows(known.shape, run.generator).to(
            self._execution_device, self.dtype)
        return latents

    def denoise_step(self, run: SamplingRun, i: int, t, t_next, latents: torch.Tensor) -> torch.Tensor:
        """One step, the known region put back at the next noise level; with resampling passes,
        RePaint's jump back to ``t`` and denoise again."""
        known, mask, passes = run.extra["known"], run.extra["mask"], 1 + run.extra["resample"]
        for p in range(passes):
            stepped = super().denoise_step(run, i, t, t_next, latents)
            level = known if t_next is None else self.scheduler.add_noise(known, run.extra["noise"], t_next[None])
            stepped = mask * stepped + (1 - mask) * level
            if p + 1 < passes:
                latents = self._renoise(stepped, t_next, t, run.generator)
        return stepped

    def _renoise(self, latents: torch.Tensor, t_from, t_to, generator) -> torch.Tensor:
        """Take x at noise level ``t_from`` (lower) back up to ``t_to`` (RePaint's resampling jump)."""
        device = self._execution_device
        acp = self.scheduler.alphas_cumprod.to(device)
        if t_from is not None and int(t_from) >= 0:
            a_from = acp[t_from]
        else:
            a_from = self.scheduler.final_alpha_cumprod.to(device)
        ratio = (acp[t_to] / a_from).to(torch.float32)
        noise = randn_rows(latents.shape, generator).to(device)
        return (ratio.sqrt() * latents.float() + (1 - ratio).sqrt() * noise).to(latents.dtype)
