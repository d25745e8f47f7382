"""The DiffusionSat sampler: text + metadata -> image, optionally with a ControlNet or in-painting.

Single image (reference §4): the Stable Diffusion text-to-image loop with one addition, the
normalised metadata goes to the UNet at every step. Classifier-free guidance pairs the empty
prompt with an all-zero metadata vector in the unconditional branch (one guidance scale for both).

With a ControlNet (reference §5, :class:`Control`): the unconditional half also zeroes the
conditioning frames' metadata but keeps the same, un-zeroed control image; the residual scale
applies to both halves; guess mode runs the ControlNet on the conditional half only and gives
the unconditional half zero residuals (consistent halves, unlike the reference's crash).

In-painting (:class:`Inpaint`): the known region's latents, re-noised to the current noise level,
replace the generated ones outside the mask after every step; optional RePaint-style resampling
passes re-noise and re-denoise each step to harmonise the seam. The caller composites the final
pixels so that unmasked pixels stay bit-identical to the input.

The loop reads top to bottom: check inputs, encode the prompt, prepare metadata and latents,
denoise (reporting progress and honouring cancellation once per step), decode.
"""

from __future__ import annotations

import contextlib
import threading

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidRequest
from ..progress import CancelToken, Progress, ProgressCallback, report

#: ``--scheduler`` names. ``default`` keeps the checkpoint's own scheduler (what the reference did).
from ..tasks import SCHEDULER_NAMES as SCHEDULERS  # noqa: E402 - the names live with the request models


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


def set_timesteps(scheduler: Any, steps: int, device: Any = None) -> Any:
    """``scheduler.set_timesteps(steps)``, kept inside the trained range: with "leading" spacing
    and ``steps_offset`` 1 (SD 2.1's config, and the normalisation of old ones) diffusers asks for
    timestep ``num_train_timesteps`` at ``steps == num_train_timesteps`` (1000) and fails with an
    IndexError. Then the offset is dropped, on a copy (the model's scheduler is shared)."""
    scheduler.set_timesteps(steps, device=device)
    limit = scheduler.config.get("num_train_timesteps")
    if limit is not None and len(scheduler.timesteps) and int(scheduler.timesteps.max()) >= limit:
        scheduler = scheduler.__class__.from_config(scheduler.config, steps_offset=0)
        scheduler.set_timesteps(steps, device=device)
    return scheduler


@dataclass
class Control:
    """ControlNet conditioning for one call.

    ``image``: (b, C, H_c, W_c) for the metadata ControlNet or (b, C, T, H, W) for ControlNet3D,
    in [0, 1] as the checkpoint expects (see ``engine.geo.sentinel2`` for Sentinel-2);
    ``cond_metadata``: normalised metadata of the conditioning, (b, 7) or (b, 7, T); None = unknown.
    """

    image: torch.Tensor
    cond_metadata: Optional[torch.Tensor] = None
    scale: float = 1.0
    guess_mode: bool = False


@dataclass
class Inpaint:
    """In-painting inputs: ``image`` (b, 3, H, W) in [0, 1]; ``mask`` (b, 1, H, W), 1 = generate."""

    image: torch.Tensor
    mask: torch.Tensor
    resample: int = 0


@dataclass
class PipelineOutput:
    images: Any  #: (batch, H, W, 3) float32 in [0, 1] for "np"; a tensor for "pt"/"latent"


class DiffusionSatPipeline:
    """The single-image DiffusionSat sampler over a :class:`~engine.models.loading.ModelBundle`'s parts.

    Components follow diffusers' names (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``scheduler``) so a diffusers pipeline folder maps onto it one to one.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, *, controlnet=None,
                 match_reference_fp16: bool = True):
        self.controlnet = controlnet
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
    def from_bundle(cls, bundle, **kwargs: Any) -> "DiffusionSatPipeline":
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
        control: Optional[Control] = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """One UNet evaluation with classifier-free guidance (and the ControlNet's residuals).

        ``text``, ``metadata`` (and ``control.cond_metadata``) hold the unconditional rows first
        when guidance is on (``[uncond; cond]``, as built by :meth:`__call__`); ``control.image``
        holds one row per image and is repeated, un-zeroed, for the unconditional half.
        ``metadata_embeds`` (from :meth:`embed_metadata`) saves recomputing the metadata MLPs.
        """
        do_cfg = guidance_scale > 1.0
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        model_in = self.scheduler.scale_model_input(model_in, t)
        if control is not None:
            down, mid = self.control_residuals(model_in, t, text, metadata, control, do_cfg)
            unet_kwargs["down_block_additional_residuals"] = down
            unet_kwargs["mid_block_additional_residual"] = mid
        if metadata_embeds is not None:
            unet_kwargs["metadata_embeds"] = metadata_embeds
        out = self.unet(model_in, t, encoder_hidden_states=text, metadata=metadata, **unet_kwargs).sample
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    def control_residuals(self, model_in, t, text, metadata, control: Control, do_cfg: bool):
        """The ControlNet's residuals for a (possibly CFG-doubled) batch."""
        image = control.image.to(self.device, self.dtype)
        cond_md = control.cond_metadata
        if do_cfg and control.guess_mode:
            # Guess mode: the ControlNet sees only the conditional half; the unconditional half
            # gets zero residuals. Every input is taken from the same (conditional) half.
            half = lambda x: None if x is None else x.chunk(2)[1]  # noqa: E731
            down, mid = self.controlnet(
                half(model_in), t, half(text), image, conditioning_scale=control.scale,
                metadata=half(metadata), cond_metadata=half(cond_md), guess_mode=True, return_dict=False,
            )
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
            return down, mid
        if do_cfg:
            image = torch.cat([image, image])
        return self.controlnet(
            model_in, t, text, image, conditioning_scale=control.scale, metadata=metadata,
            cond_metadata=cond_md, guess_mode=control.guess_mode, return_dict=False,
        )

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (b, 3, H, W) -> scaled latents (the distribution's mode: deterministic)."""
        image = image.to(self.device, self.vae.dtype) * 2 - 1
        latents = self.vae.encode(image).latent_dist.mode()
        return latents.to(self.dtype) * self.vae.config.scaling_factor

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask (b, 1, H, W) -> latent cells to generate: any masked pixel marks its cell."""
        k = self.vae_scale_factor
        return torch.nn.functional.max_pool2d(mask.float(), kernel_size=k, stride=k).to(self.device, self.dtype)

    def _renoise(self, latents: torch.Tensor, t_from, t_to, generator) -> torch.Tensor:
        """Take x at noise level ``t_from`` (lower) back up to ``t_to`` (RePaint's resampling jump)."""
        acp = self.scheduler.alphas_cumprod.to(self.device)
        a_from = acp[t_from] if t_from is not None and int(t_from) >= 0 else self.scheduler.final_alpha_cumprod.to(self.device)
        ratio = (acp[t_to] / a_from).to(torch.float32)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(self.device)
        return (ratio.sqrt() * latents.float() + (1 - ratio).sqrt() * noise).to(latents.dtype)

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
        control: Optional[Control] = None,
        inpaint: Optional[Inpaint] = None,
    ) -> PipelineOutput:
        """Sample images. ``metadata`` is a SatMetadata, a list of them (one per prompt), or
        normalised values (7 or (b, 7)). ``control`` adds a ControlNet (the pipeline must have
        one); ``inpaint`` keeps the unmasked region of ``inpaint.image``. ``cancel`` is polled
        before every step and before every UNet, ControlNet and VAE-decoder block."""
        with _cancel_between_blocks(cancel, self.unet, self.controlnet, getattr(self.vae, "decoder", None)):
            return self._sample(
                prompt, metadata, height=height, width=width, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                generator=generator, latents=latents, eta=eta, output_type=output_type,
                callback=callback, cancel=cancel, control=control, inpaint=inpaint)

    def _sample(self, prompt, metadata, *, height, width, num_inference_steps, guidance_scale,
                num_images_per_prompt, generator, latents, eta, output_type, callback, cancel,
                control, inpaint) -> PipelineOutput:
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidRequest("at least one prompt is needed (the empty string is allowed)")
        if num_inference_steps < 1:
            raise InvalidRequest(f"steps must be at least 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise InvalidRequest(f"images per prompt must be at least 1, got {num_images_per_prompt}")
        self.check_size(height, width)
        if control is not None and self.controlnet is None:
            raise InvalidRequest("this model has no ControlNet for conditional generation")
        n = num_images_per_prompt
        batch = len(prompts) * n
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompt; metadata follows its prompt (the reference's n > 1 bug is fixed)
        text = self.encode_prompt(prompts).repeat_interleave(n, dim=0)
        md = self.prepare_metadata(metadata, len(prompts)).repeat_interleave(n, dim=0)
        if do_cfg:
            uncond_text = self.encode_prompt([""]).expand(batch, -1, -1)
            text = torch.cat([uncond_text, text])
            md = torch.cat([torch.zeros_like(md), md])
        if control is not None:
            control = self._expand_control(control, len(prompts), n, do_cfg)
        known = mask = None
        if inpaint is not None:
            if inpaint.resample and not hasattr(self.scheduler, "alphas_cumprod"):
                raise InvalidRequest("resampling passes need a DDIM or DDPM scheduler (--scheduler ddim)")
            if inpaint.resample and type(self.scheduler).__name__ not in ("DDIMScheduler", "DDPMScheduler"):
                raise InvalidRequest("resampling passes need a stateless scheduler: use --scheduler ddim")
            known = self.encode_image(_rows(inpaint.image, len(prompts), "image").repeat_interleave(n, 0))
            mask = self.latent_mask(_rows(inpaint.mask, len(prompts), "mask").repeat_interleave(n, 0))

        # 3. Timesteps and latents
        self.scheduler = set_timesteps(self.scheduler, num_inference_steps, self.device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(batch, height, width, generator, latents)
        accepted = _step_params(self.scheduler)
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

        if known is not None:
            # the noise the known region is re-noised with stays fixed over the steps
            known_noise = torch.randn(known.shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)

        # 4. Denoise (metadata is constant over the steps: embed it once)
        md_embeds = self.embed_metadata(md)
        total = len(timesteps)
        report(callback, Progress(step=0, total_steps=total, message="denoising"))
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < total else None
            passes = 1 + (inpaint.resample if inpaint is not None else 0)
            for p in range(passes):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                noise = self.predict_noise(latents, t, text, md, guidance_scale, metadata_embeds=md_embeds,
                                           control=control)
                stepped = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                if known is not None:
                    level = known if t_next is None else self.scheduler.add_noise(known, known_noise, t_next[None])
                    stepped = mask * stepped + (1 - mask) * level
                    if p + 1 < passes:  # RePaint: jump back to t and denoise this step again
                        latents = self._renoise(stepped, t_next, t, generator)
                        continue
                latents = stepped
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


    def _expand_control(self, control: Control, prompts: int, n: int, do_cfg: bool) -> Control:
        image = _rows(control.image, prompts, "control image").repeat_interleave(n, 0)
        cond_md = control.cond_metadata
        if cond_md is None:
            shape = (image.shape[0], 7) if image.ndim == 4 else (image.shape[0], 7, image.shape[2])
            cond_md = torch.zeros(shape)
        cond_md = _rows(torch.as_tensor(cond_md, dtype=torch.float32), prompts, "cond_metadata")
        cond_md = cond_md.repeat_interleave(n, 0)
        if self.match_reference_fp16 and self.dtype == torch.float16:
            cond_md = cond_md.half().float()
        cond_md = cond_md.to(self.device)
        if do_cfg:
            cond_md = torch.cat([torch.zeros_like(cond_md), cond_md])
        return Control(image=image, cond_metadata=cond_md, scale=control.scale, guess_mode=control.guess_mode)


@contextlib.contextmanager
def _cancel_between_blocks(cancel: Optional[CancelToken], *models: Any):
    """Poll ``cancel`` before each down/mid/up block of ``models`` (forward pre-hooks), so a
    cancelled job stops within one block, not at the end of a (possibly minutes-long) step."""
    handles = []
    if cancel is not None:
        owner = threading.get_ident()  # the models may be shared: another thread's run is not ours

        def check(module, args):
            if threading.get_ident() == owner:
                cancel.raise_if_cancelled()

        for model in models:
            if model is None:
                continue
            blocks = [*(getattr(model, "down_blocks", None) or []), getattr(model, "mid_block", None),
                      *(getattr(model, "up_blocks", None) or [])]
            for block in blocks:
                if isinstance(block, torch.nn.Module):
                    handles.append(block.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rows(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``x`` with one row per prompt (a single row is shared by all prompts)."""
    x = torch.as_tensor(x)
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    if x.shape[0] != batch:
        raise InvalidRequest(f"{x.shape[0]} rows of {what} for {batch} prompts")
    return x


def _step_params(scheduler: Any) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
