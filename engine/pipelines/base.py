"""What every DiffusionSat pipeline shares: a ``diffusers.DiffusionPipeline`` with the prompt,
the metadata, the latents, the denoising loop and the decoder (reference §4).

The Stable Diffusion text-to-image loop with one addition: the normalised metadata goes to the
UNet at every step. Classifier-free guidance pairs the empty prompt with an all-zero metadata
vector in the unconditional branch (one guidance scale for both).

Being a real ``DiffusionPipeline`` (registered modules ``vae``, ``text_encoder``, ``tokenizer``,
``unet``, ``scheduler``), a pipeline supports what any diffusers pipeline does: ``.to()``,
``save_pretrained(folder)``, ``enable_model_cpu_offload()``, ``enable_vae_slicing()`` /
``enable_vae_tiling()``, ``unet.set_attn_processor(...)`` and ``callback_on_step_end``.
:meth:`DiffusionSatBasePipeline.from_pretrained` loads through the engine's loaders
(:func:`engine.models.loading.load_model`), so a folder saved with ``save_pretrained``, an
official DiffusionSat root (``checkpoint-N/unet``), ``tiny`` and ``hf:owner/name`` all load
with one call.

The subclasses add their conditioning at two hooks: :meth:`prepare_conditioning` (before the
timesteps) and :meth:`denoise_step` (one step of the loop); the loop itself reads top to bottom
in :meth:`generate`: check inputs, encode the prompt, prepare metadata and latents, denoise
(reporting progress and honouring cancellation once per step and between UNet blocks), decode.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import BaseOutput

from ..atomic import atomic_folder
from ..errors import InvalidRequest
from ..models.loading import load_model
from ..progress import CancelToken, Progress, ProgressCallback, report
from ..schedulers import set_timesteps
from .rows import cancel_between_blocks, cfg_rows, control_rows, randn_rows


@dataclass
class PipelineOutput(BaseOutput):
    images: Any  #: (batch, H, W, 3) float32 in [0, 1] for "np"; a tensor for "pt"/"latent"


@dataclass
class SamplingRun:
    """The per-call state of one sampling run (what the hooks read and write)."""

    batch: int
    guidance_scale: float
    prompt_embeds: torch.Tensor  #: [uncond; cond] rows when guidance is on
    metadata: torch.Tensor  #: normalised, [zeros; cond] rows when guidance is on
    generator: Any  #: a torch.Generator, or one per image (a list): see :func:`randn_rows`
    cancel: Optional[CancelToken] = None
    metadata_embeds: Optional[torch.Tensor] = None
    step_kwargs: dict = field(default_factory=dict)
    control: Any = None  #: :class:`engine.pipelines.controlnet.Control`, expanded to the batch
    extra: dict = field(default_factory=dict)  #: the subclasses' own state (in-painting)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


class DiffusionSatBasePipeline(DiffusionPipeline, StableDiffusionMixin):
    """The shared base of the DiffusionSat pipelines (not used on its own). ``StableDiffusionMixin``
    adds diffusers' FreeU and fused-QKV switches (the UNet is a ``UNet2DConditionModel``)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    #: Run each image of a batch through the models alone, so a batch's images equal, bit for bit,
    #: what each gives alone (``--batch-size``). None = on the CPU only: its kernels sum in another
    #: order at another batch size (GroupNorm on channels-last activations, oneDNN convolutions
    #: with few channels, 2-D Linear layers); on CUDA the batch runs as one (equal up to rounding).
    batch_invariant: Optional[bool] = None

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, match_reference_fp16: bool = True):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        #: Round metadata through fp16 before the projection when the model runs in fp16, as the
        #: released pipelines did (712.69 -> 712.5), so fp16 outputs match the reference's.
        self.register_to_config(match_reference_fp16=match_reference_fp16)
        self.match_reference_fp16 = match_reference_fp16
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._interrupt = False

    # ----------------------------------------------------------------------------------------
    # Construction and loading
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, bundle, **kwargs: Any) -> "DiffusionSatBasePipeline":
        """A pipeline over a :class:`~engine.models.bundle.ModelBundle`'s parts (shared, not copied)."""
        return cls(bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.unet, bundle.scheduler, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, unet=None, base=None,
                        controlnet=None, torch_dtype: Optional[torch.dtype] = None, **kwargs: Any):
        """Load a model with the engine's loaders: a folder written by ``save_pretrained``, an official
        DiffusionSat root (``checkpoint-N/unet`` inside), ``"tiny"`` or ``"hf:owner/name[@rev]"``.

        ``unet``/``base``/``controlnet`` are ``--unet``/``--base``/``--controlnet`` (folders);
        ``torch_dtype`` casts every module; other keyword arguments go to the pipeline's
        constructor (``match_reference_fp16``; the ControlNet pipelines' ``controlnet_task``).
        The bundle's notices (what was assumed while loading) are in ``pipe.notices``.
        """
        bundle = load_model(str(pretrained_model_name_or_path), unet=unet, base=base, controlnet=controlnet)
        pipe = cls._from_loaded_bundle(bundle, **kwargs)
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
        pipe.notices = list(bundle.notices)
        return pipe

    @classmethod
    def _from_loaded_bundle(cls, bundle, **kwargs: Any) -> "DiffusionSatBasePipeline":
        return cls.from_bundle(bundle, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (``model_index.json`` + one folder per component), written
        atomically: into a temporary folder beside ``save_directory``, then renamed into place."""
        with atomic_folder(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (less memory, same images)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        """Decode the whole batch at once again (the default)."""
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode large images in overlapping tiles (less memory; seams blended by the VAE)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        """Decode each image in one pass again (the default)."""
        self.vae.disable_tiling()

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' execution device, looked up once per call of :meth:`generate` (diffusers walks
        every submodule for offload hooks each time: 648 walks, 13 % of a 9-tile CPU run)."""
        cached = self.__dict__.get("_call_device")
        return cached if cached is not None else DiffusionPipeline._execution_device.fget(self)

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype: latents and embeddings follow it (the VAE may differ)."""
        return next(self.unet.parameters()).dtype

    # ----------------------------------------------------------------------------------------
    # Pieces (public so tests and other pipelines can reuse them)
    # ----------------------------------------------------------------------------------------

    def rows_alone(self, batch: int) -> bool:
        """Whether a batch of ``batch`` images runs one image at a time (see :attr:`batch_invariant`)."""
        if batch <= 1 or self.batch_invariant is not None:
            return batch > 1 and bool(self.batch_invariant)
        return torch.device(self._execution_device).type == "cpu"

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), 77, hidden) text embeddings, padded to the tokenizer's max length. Each
        distinct prompt is encoded alone (a batch of tiles repeats one: encoded once, as for one tile)."""
        if len(prompts) > 1:
            encoded = {p: self._encode_prompts([p]) for p in dict.fromkeys(prompts)}
            return torch.cat([encoded[p] for p in prompts])
        return self._encode_prompts(list(prompts))

    @torch.no_grad()
    def _encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self._execution_device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
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
            rows = values.shape[0]
            raise InvalidRequest(f"{rows} metadata rows for {batch} prompt{'s' if batch != 1 else ''}: give one prompt "
                                 f"per row (a list of {rows} prompts, e.g. [prompt] * {rows}) or one metadata for all")
        values = values.float()
        if self.match_reference_fp16 and self.dtype == torch.float16:
            values = values.half().float()
        return values.to(self._execution_device)

    def embed_metadata(self, metadata: torch.Tensor) -> Optional[torch.Tensor]:
        """Metadata embeddings for all steps of one run (None for a UNet without metadata)."""
        if getattr(self.unet, "metadata_embedding", None) is None:
            return None
        return self.unet.embed_metadata(metadata, metadata.shape[0], self.dtype)

    def embed_metadata_rows(self, metadata: torch.Tensor, batch: int, do_cfg: bool) -> Optional[torch.Tensor]:
        """:meth:`embed_metadata` of a run's rows; each image's rows alone when :meth:`rows_alone`."""
        if not self.rows_alone(batch):
            return self.embed_metadata(metadata)
        groups = [cfg_rows(i, batch, do_cfg) for i in range(batch)]
        parts = [(idx, self.embed_metadata(metadata[idx])) for idx in groups]
        if parts[0][1] is None:
            return None
        out = parts[0][1].new_empty((metadata.shape[0], *parts[0][1].shape[1:]))
        for idx, embeds in parts:
            out[idx] = embeds
        return out

    def check_size(self, height: int, width: int) -> None:
        """Refuse an image size (px) that is not a positive multiple of the VAE's factor (8)."""
        multiple = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise InvalidRequest(f"{name} {value} px must be a positive multiple of {multiple}")

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: Any, latents=None
    ) -> torch.Tensor:
        """Initial latents (batch, 4, height/8, width/8) for an image of ``height`` x ``width`` px,
        scaled by the scheduler's ``init_noise_sigma``; ``latents`` given: checked and scaled.
        ``generator``: one ``torch.Generator``, or a list of ``batch`` (row i drawn from the i-th,
        exactly as a batch of one from it: see :func:`randn_rows`)."""
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            # Noise is drawn on the CPU in fp32 so a seed gives the same image on every device.
            latents = randn_rows(shape, generator)
        elif tuple(latents.shape) != shape:
            raise InvalidRequest(f"latents of shape {tuple(latents.shape)} given, {shape} expected")
        latents = latents.to(self._execution_device, self.dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (batch, 3, H, W) fp32."""
        scaling = self.vae.config.scaling_factor
        if self.rows_alone(latents.shape[0]):
            return torch.cat([self.decode(latents[i : i + 1]) for i in range(latents.shape[0])])
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
        control: Any = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """One UNet evaluation with classifier-free guidance (and a ControlNet's residuals).

        ``text``, ``metadata`` (and ``control.cond_metadata``) hold the unconditional rows first
        when guidance is on (``[uncond; cond]``, as built by :meth:`encode_conditions`);
        ``metadata_embeds`` (from :meth:`embed_metadata`) saves recomputing the metadata MLPs.
        ``control`` needs a ControlNet pipeline (its ``control_residuals``).
        """
        do_cfg = guidance_scale > 1.0
        b = latents.shape[0]
        if self.rows_alone(b):  # each image as a batch of one: [uncond_i; cond_i] rows
            outs = []
            for i in range(b):
                idx = cfg_rows(i, b, do_cfg)
                outs.append(self._predict_noise(
                    latents[i : i + 1], t, text[idx], metadata[idx], guidance_scale,
                    None if metadata_embeds is None else metadata_embeds[idx],
                    control_rows(control, i, idx), **unet_kwargs))
            return torch.cat(outs)
        return self._predict_noise(latents, t, text, metadata, guidance_scale, metadata_embeds, control, **unet_kwargs)

    def _predict_noise(self, latents, t, text, metadata, guidance_scale, metadata_embeds=None, control=None,
                       **unet_kwargs: Any) -> torch.Tensor:
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

    # ----------------------------------------------------------------------------------------
    # The loop, in diffusers' numbered steps
    # ----------------------------------------------------------------------------------------

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from ``callback_on_step_end``) to skip the remaining steps."""
        return self._interrupt

    def check_inputs(self, prompt, height, width, num_inference_steps, num_images_per_prompt,
                     callback_on_step_end_tensor_inputs) -> list[str]:
        """1. The prompts as a list, after refusing what cannot run."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidRequest("at least one prompt is needed (the empty string is allowed)")
        if num_inference_steps < 1:
            raise InvalidRequest(f"steps must be at least 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise InvalidRequest(f"images per prompt must be at least 1, got {num_images_per_prompt}")
        self.check_size(height, width)
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise InvalidRequest(f"callback_on_step_end_tensor_inputs has to be in {self._callback_tensor_inputs}, "
                                 f"but found {unknown}")
        return prompts

    def encode_conditions(self, prompts: list[str], metadata: Any, n: int, guidance_scale: float,
                          generator, cancel) -> SamplingRun:
        """2. Prompt embeddings and metadata, one row per image; metadata follows its prompt (the
        reference's n > 1 bug is fixed). With guidance the unconditional rows come first."""
        batch = len(prompts) * n
        text = self.encode_prompt(prompts).repeat_interleave(n, dim=0)
        md = self.prepare_metadata(metadata, len(prompts)).repeat_interleave(n, dim=0)
        if guidance_scale > 1.0:
            uncond_text = self.encode_prompt([""]).expand(batch, -1, -1)
            text = torch.cat([uncond_text, text])
            md = torch.cat([torch.zeros_like(md), md])
        return SamplingRun(batch=batch, guidance_scale=guidance_scale, prompt_embeds=text, metadata=md,
                           generator=generator, cancel=cancel)

    def prepare_conditioning(self, run: SamplingRun, prompts: int, n: int, **conditioning: Any) -> None:
        """3. The subclasses' conditioning (ControlNet image, in-painting region) into ``run``."""
        for name, value in conditioning.items():
            if value is not None:
                raise InvalidRequest(f"{type(self).__name__} does not take {name}=")

    def prepare_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """4. The scheduler's timesteps (kept inside the trained range, see :func:`set_timesteps`)."""
        self.scheduler = set_timesteps(self.scheduler, num_inference_steps, self._execution_device)
        return self.scheduler.timesteps

    def prepare_run_latents(self, run: SamplingRun, height: int, width: int, latents, eta: float) -> torch.Tensor:
        """5. The initial latents (and the scheduler's step arguments)."""
        latents = self.prepare_latents(run.batch, height, width, run.generator, latents)
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        run.step_kwargs = {k: v for k, v in (("eta", eta), ("generator", run.generator)) if k in accepted}
        return latents

    def denoise_step(self, run: SamplingRun, i: int, t, t_next, latents: torch.Tensor) -> torch.Tensor:
        """One step of the loop: the latents at the next (lower) noise level."""
        if run.cancel is not None:
            run.cancel.raise_if_cancelled()
        noise = self.predict_noise(latents, t, run.prompt_embeds, run.metadata, run.guidance_scale,
                                   metadata_embeds=run.metadata_embeds, control=run.control)
        return self.scheduler.step(noise, t, latents, **run.step_kwargs).prev_sample

    def denoise(self, run: SamplingRun, timesteps, latents: torch.Tensor, callback: Optional[ProgressCallback],
                callback_on_step_end: Optional[Callable], tensor_inputs: Sequence[str]) -> torch.Tensor:
        """6. The denoising loop; metadata is constant over the steps: embedded once."""
        run.metadata_embeds = self.embed_metadata_rows(run.metadata, run.batch, run.do_cfg)
        total = len(timesteps)
        self._num_timesteps = total
        report(callback, Progress(step=0, total_steps=total, message="denoising"))
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            t_next = timesteps[i + 1] if i + 1 < total else None
            latents = self.denoise_step(run, i, t, t_next, latents)
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "prompt_embeds": run.prompt_embeds}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in tensor_inputs}) or {}
                latents = outputs.pop("latents", latents)
                run.prompt_embeds = outputs.pop("prompt_embeds", run.prompt_embeds)
            report(callback, Progress(step=i + 1, total_steps=total, message="denoising"))
        if run.cancel is not None:
            run.cancel.raise_if_cancelled()
        return latents

    def postprocess(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """7. Decode: "np" (b, H, W, 3) in [0, 1], "pt" (b, 3, H, W), or the "latent"s themselves."""
        if output_type == "latent":
            images = latents
        elif output_type == "pt":
            images = self.decode(latents)
        else:
            images = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy()
        self.maybe_free_model_hooks()
        return PipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def generate(
        self, prompt: str | Sequence[str] = "a satellite image", metadata: Any = None, *, height: int = 512,
        width: int = 512, num_inference_steps: int = 20, guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1, generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None, eta: float = 0.0, output_type: str = "np",
        return_dict: bool = True, callback: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None, callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), **conditioning: Any,
    ):
        """The loop every pipeline's ``__call__`` runs (``conditioning``: its own inputs)."""
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback objects
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._interrupt = False
        blocks = (self.unet, getattr(self, "controlnet", None), getattr(self.vae, "decoder", None))
        self._call_device = None
        self._call_device = self._execution_device
        try:
            with cancel_between_blocks(cancel, *blocks):
                prompts = self.check_inputs(prompt, height, width, num_inference_steps, num_images_per_prompt,
                                            callback_on_step_end_tensor_inputs)
                run = self.encode_conditions(prompts, metadata, num_images_per_prompt, guidance_scale, generator, cancel)
                self.prepare_conditioning(run, len(prompts), num_images_per_prompt, **conditioning)
                timesteps = self.prepare_timesteps(num_inference_steps)
                latents = self.prepare_run_latents(run, height, width, latents, eta)
                latents = self.denoise(run, timesteps, latents, callback, callback_on_step_end,
                                       callback_on_step_end_tensor_inputs)
                return self.postprocess(latents, output_type, return_dict)
        finally:
            self._call_device = None  # the next call may run elsewhere

