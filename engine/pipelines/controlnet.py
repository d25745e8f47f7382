"""Text + metadata + a conditioning image -> image: DiffusionSat with a ControlNet (reference §5).

Either ControlNet: the 2D metadata ControlNet (super-resolution from Sentinel-2) or ControlNet3D
(temporal generation from dated frames). The unconditional half of classifier-free guidance
zeroes the conditioning frames' metadata too but keeps the same, un-zeroed control image; the
residual scale applies to both halves; guess mode runs the ControlNet on the conditional half
only and gives the unconditional half zero residuals (consistent halves, unlike the reference's
crash).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import InvalidRequest
from ..models.registry import missing_controlnet
from .base import PipelineOutput, SamplingRun
from .rows import rows
from .text2img import DiffusionSatPipeline


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


class DiffusionSatControlNetPipeline(DiffusionSatPipeline):
    """:class:`DiffusionSatPipeline` plus a registered ``controlnet`` (a
    :class:`~engine.models.controlnet.SatControlNet` or ``SatControlNet3D``) and ``control=``.
    ``controlnet`` None runs the plain text + metadata loop (``control`` must then be None)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, controlnet,
                 match_reference_fp16: bool = True):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, match_reference_fp16=match_reference_fp16)
        self.register_modules(controlnet=controlnet)

    @classmethod
    def _from_loaded_bundle(cls, bundle, controlnet_task: Optional[str] = None, **kwargs: Any):
        """The loaded model's ControlNet: the one for ``controlnet_task`` ("superres", "temporal"),
        else the only one (the tiny preset has two: name the task)."""
        if controlnet_task is not None:
            controlnet = bundle.controlnet_for(controlnet_task)
        elif len(bundle.controlnets) == 1:
            controlnet = next(iter(bundle.controlnets.values()))
        elif "controlnet" in cls._optional_components:
            controlnet = None
        elif not bundle.controlnets:
            raise missing_controlnet(bundle.name, "conditional generation", bundle.controlnets)
        else:
            raise InvalidRequest(f"the model {bundle.name!r} has ControlNets for "
                                 f"{', '.join(sorted(bundle.controlnets))}: pass controlnet_task=")
        return cls.from_bundle(bundle, controlnet=controlnet, **kwargs)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] = "a satellite image", metadata: Any = None, *,
                 control: Optional[Control] = None, **kwargs: Any) -> PipelineOutput:
        """As :meth:`DiffusionSatPipeline.__call__` (the same keyword arguments: ``height``,
        ``width``, ``num_inference_steps``, ``guidance_scale``, ``generator``, ``callback_on_step_end``,
        ...), conditioned on ``control`` (see :class:`Control`); ``cancel`` is also polled before
        every ControlNet block."""
        return self.generate(prompt, metadata, control=control, **kwargs)

    def prepare_conditioning(self, run: SamplingRun, prompts: int, n: int, control: Optional[Control] = None,
                             **conditioning: Any) -> None:
        if control is not None:
            if self.controlnet is None:
                raise InvalidRequest("this model has no ControlNet for conditional generation")
            run.control = self.expand_control(control, prompts, n, run.do_cfg)
        super().prepare_conditioning(run, prompts, n, **conditioning)

    def expand_control(self, control: Control, prompts: int, n: int, do_cfg: bool) -> Control:
        """``control`` with one row per image (and the zeroed unconditional metadata rows first)."""
        image = rows(control.image, prompts, "control image").repeat_interleave(n, 0)
        cond_md = control.cond_metadata
        if cond_md is None:
            shape = (image.shape[0], 7) if image.ndim == 4 else (image.shape[0], 7, image.shape[2])
            cond_md = torch.zeros(shape)
        cond_md = rows(torch.as_tensor(cond_md, dtype=torch.float32), prompts, "cond_metadata")
        cond_md = cond_md.repeat_interleave(n, 0)
        if self.match_reference_fp16 and self.dtype == torch.float16:
            cond_md = cond_md.half().float()
        cond_md = cond_md.to(self._execution_device)
        if do_cfg:
            cond_md = torch.cat([torch.zeros_like(cond_md), cond_md])
        return Control(image=image, cond_metadata=cond_md, scale=control.scale, guess_mode=control.guess_mode)

    def control_residuals(self, model_in, t, text, metadata, control: Control, do_cfg: bool):
        """The ControlNet's residuals for a (possibly CFG-doubled) batch."""
        image = control.image.to(self._execution_device, self.dtype)
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
