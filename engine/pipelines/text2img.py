"""Text + metadata -> image: the single-image DiffusionSat pipeline (reference §4).

The loop lives in :mod:`engine.pipelines.base`; this pipeline adds no conditioning of its own.
Use it from a notebook like any diffusers pipeline::

    pipe = DiffusionSatPipeline.from_pretrained("path/to/model")   # or "tiny"
    image = pipe("a satellite image of a harbour", metadata, height=512, width=512).images[0]
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..progress import CancelToken, ProgressCallback
from .base import DiffusionSatBasePipeline, PipelineOutput


class DiffusionSatPipeline(DiffusionSatBasePipeline):
    """Text + metadata -> image. Components follow diffusers' names (``vae``, ``text_encoder``,
    ``tokenizer``, ``unet`` (a :class:`~engine.models.unet.SatUNet`), ``scheduler``)."""

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
        return_dict: bool = True,
        callback: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> PipelineOutput:
        """Sample images: ``.images`` is (b, H, W, 3) float32 in [0, 1] for ``output_type="np"``,
        (b, 3, H, W) for ``"pt"``, the (b, 4, H/8, W/8) latents for ``"latent"``; b = prompts x
        ``num_images_per_prompt``.

        ``metadata`` is an :class:`engine.metadata.SatMetadata` (lon/lat in degrees, GSD in m/px,
        cloud cover 0..1, date), a list of them (one per prompt), or the 7 normalised values the
        model sees (7 or (b, 7), in :data:`engine.metadata.FIELDS` order, as
        :meth:`SatMetadata.normalised <engine.metadata.SatMetadata.normalised>` computes them);
        None conditions on metadata 0 (unknown). ``height``/``width`` are in px, positive
        multiples of 8; the model's native resolution (512 or 256 px for the releases, as
        ``diffusionsat models`` lists it) gives the best images. ``latents``: initial
        noise of the latent shape above (unscaled; drawn on the CPU in fp32 from ``generator``
        when None, so a seed gives the same image on every device).

        ``callback`` gets a :class:`~engine.progress.Progress` per step; ``cancel`` is polled
        before every step and before every UNet and VAE-decoder block;
        ``callback_on_step_end(pipe, i, t, tensors)`` is diffusers' (it may return new
        ``latents``/``prompt_embeds``)."""
        return self.generate(
            prompt, metadata, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
            latents=latents, eta=eta, output_type=output_type, return_dict=return_dict, callback=callback,
            cancel=cancel, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
