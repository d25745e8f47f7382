"""Training options with the reference recipe's defaults (reference page §8).

One dataclass for single-image and ControlNet training; the CLI fills it from flags and
:meth:`TrainConfig.resolved` fills the defaults that depend on the kind, the task and the
resolution (learning rate, steps, loss weighting, EMA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.atomic import write_json_atomic
from engine.errors import InvalidRequest

CONTROLNET_TASKS = ("superres", "temporal", "control")
SNR_WEIGHTINGS = ("reference", "v", "none")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")

#: ControlNet recipe per task (reference §8): learning rate, steps, resolution.
CONTROLNET_RECIPE = {
    "superres": {"lr": 5e-5, "max_steps": 50_000, "resolution": 512},
    "temporal": {"lr": 2e-5, "max_steps": 40_000, "resolution": 256},
    "control": {"lr": 5e-5, "max_steps": 30_000, "resolution": 512},
}


_RANGES = {"--lr": "give a learning rate above 0, e.g. 1e-5", "--validation-every": "give 0 (off) or more",
           "--max-grad-norm": "give 0 (no clipping) or more", "--num-workers": "give 0 or more",
           "--snr-gamma": "give a value above 0 (the reference: 5)", "--lr-warmup-steps": "give 0 or more"}


def _default(value: Any, default: Any) -> Any:
    """``default`` only when the option was not given: an explicit 0 stays 0 (and is then refused)."""
    return default if value is None else value


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` means "the recipe's default" (see resolved())."""

    kind: str  #: "image" or "controlnet"
    data: list[str]
    out: Path
    base: Optional[str] = None  #: image: "tiny", a model folder, or hf:owner/name
    unet: Optional[str] = None  #: controlnet: the frozen UNet (run folder, model folder, or tiny)
    components: Optional[str] = None  #: an SD 2.1 folder for components the model lacks
    task: str = "image"  #: image, or a ControlNet task: superres, temporal, control
    controlnet_init: Optional[str] = None  #: continue from this ControlNet folder
    resolution: Optional[int] = None  #: px
    conditioning_resolution: Optional[int] = None  #: px (superres: resolution // 2)
    frames: int = 3  #: temporal conditioning frames
    crop_size: Optional[int] = None  #: native px of GeoTIFF crops (default: resolution)
    crop: str = "grid"
    crops_per_image: int = 1
    rgb_bands: Optional[list[int]] = None
    fmow_csv: Optional[str] = None
    shuffle_buffer: int = 1000
    batch_size: int = 16  #: per process
    gradient_accumulation_steps: int = 1
    max_steps: Optional[int] = None  #: optimizer steps
    lr: Optional[float] = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  #: 0 turns clipping off
    mixed_precision: Optional[str] = None  #: None: accelerate's config (default "no")
    gradient_checkpointing: bool = False
    snr_weighting: Optional[str] = None  #: reference (image default), v, none (ControlNet default)
    snr_gamma: float = 5.0
    ema: Optional[bool] = None  #: image: on; ControlNet: off
    ema_max_decay: float = 0.9999
    metadata_dropout: float = 0.1
    caption_dropout: float = 0.1
    checkpoint_every: Optional[int] = None
    checkpoints_total_limit: Optional[int] = None
    resume: Optional[str] = None  #: "latest" or a checkpoint folder
    validation_every: Optional[int] = None  #: default: checkpoint_every; 0 turns it off
    validation_samples: int = 2
    validation_steps: int = 20
    validation_guidance: Optional[float] = None
    validation_prompt: Optional[str] = None
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    report_to: Optional[str] = None  #: tensorboard (default when installed), wandb, all, none
    use_metadata: bool = True
    cpu: bool = False  #: train on the CPU even when a GPU is available
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with every recipe default filled in and every value checked."""
        c = dataclasses.replace(self, out=Path(self.out), data=list(self.data or []))
        if c.kind not in ("image", "controlnet"):
            raise InvalidRequest(f"unknown training kind {c.kind!r}")
        if c.kind == "controlnet":
            if c.task not in CONTROLNET_TASKS:
                raise InvalidRequest(f"unknown --task {c.task!r}; choose one of {', '.join(CONTROLNET_TASKS)}")
            recipe = CONTROLNET_RECIPE[c.task]
            c.resolution = _default(c.resolution, recipe["resolution"])
            c.lr = c.lr if c.lr is not None else recipe["lr"]
            c.max_steps = _default(c.max_steps, recipe["max_steps"])
            c.snr_weighting = _default(c.snr_weighting, "none")
            c.ema = bool(c.ema)
            c.checkpoint_every = _default(c.checkpoint_every, 5000)
            c.validation_guidance = 1.0 if c.validation_guidance is None else c.validation_guidance
            if c.task == "superres":
                c.conditioning_resolution = _default(c.conditioning_resolution, c.resolution // 2)
            else:
                c.conditioning_resolution = c.resolution
        else:
            c.task = "image"
            c.resolution = _default(c.resolution, 512)
            # the reference: 2e-6 for the 512 model, 4e-6 for the 256 model
            c.lr = c.lr if c.lr is not None else (2e-6 if c.resolution >= 512 else 4e-6)
            c.max_steps = _default(c.max_steps, 150_000)
            c.snr_weighting = _default(c.snr_weighting, "reference")
            c.ema = True if c.ema is None else c.ema
            c.checkpoint_every = _default(c.checkpoint_every, 10_000)
            c.validation_guidance = 7.5 if c.validation_guidance is None else c.validation_guidance
        for name in ("resolution", "conditioning_resolution"):
            # each checked before anything divides by it (0 is refused, never replaced by a default)
            value = getattr(c, name)
            if value is not None and (value < 8 or value % 8):
                raise InvalidRequest(f"--{name.replace('_', '-')} {value} must be a positive multiple of 8 "
                                     "(the VAE downsamples by 8)")
        if c.task == "superres" and c.resolution % c.conditioning_resolution:
            raise InvalidRequest(f"--resolution {c.resolution} must be a multiple of --conditioning-resolution "
                                 f"{c.conditioning_resolution}")
        c.crop_size = _default(c.crop_size, c.resolution)
        if c.validation_every is None:
            c.validation_every = c.checkpoint_every
        checks = [
            ("--batch-size", c.batch_size >= 1), ("--gradient-accumulation-steps", c.gradient_accumulation_steps >= 1),
            ("--max-steps", c.max_steps >= 1), ("--lr", c.lr > 0), ("--checkpoint-every", c.checkpoint_every >= 1),
            ("--validation-every", c.validation_every >= 0), ("--max-grad-norm", c.max_grad_norm >= 0),
            ("--num-workers", c.num_workers >= 0), ("--log-every", c.log_every >= 1),
            ("--frames", c.frames >= 1), ("--snr-gamma", c.snr_gamma > 0), ("--crop-size", c.crop_size >= 1),
            ("--crops-per-image", c.crops_per_image >= 1), ("--lr-warmup-steps", c.lr_warmup_steps >= 0),
            ("--validation-samples", c.validation_samples >= 1), ("--validation-steps", c.validation_steps >= 1),
            ("--shuffle-buffer", c.shuffle_buffer >= 1),
        ]
        for flag, ok in checks:
            if not ok:
                raise InvalidRequest(f"{flag} {getattr(c, flag[2:].replace('-', '_'))} is out of range: "
                                     f"{_RANGES.get(flag, 'give at least 1')}")
        for flag, p in (("--metadata-dropout", c.metadata_dropout), ("--caption-dropout", c.caption_dropout)):
            if not 0.0 <= p <= 1.0:
                raise InvalidRequest(f"{flag} {p} must be a probability 0..1")
        if c.snr_weighting not in SNR_WEIGHTINGS:
            raise InvalidRequest(f"--snr-weighting must be one of {', '.join(SNR_WEIGHTINGS)}")
        if c.lr_scheduler not in LR_SCHEDULES:
            raise InvalidRequest(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULES)}")
        if c.mixed_precision is not None and c.mixed_precision not in MIXED_PRECISION:
            raise InvalidRequest(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if c.checkpoints_total_limit is not None and c.checkpoints_total_limit < 1:
            raise InvalidRequest("--checkpoints-total-limit must be at least 1")
        if c.resume is not None and c.resume != "latest" and not Path(c.resume).expanduser().is_dir():
            raise InvalidRequest(f"--resume {c.resume!r} is neither 'latest' nor a checkpoint folder")
        if c.kind == "image" and not c.base:
            raise InvalidRequest("--base is required: tiny, a Stable Diffusion 2.1 folder, or a DiffusionSat folder")
        if c.kind == "controlnet" and not c.unet:
            raise InvalidRequest("--unet is required: the single-image run or model the ControlNet is trained against")
        return c

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        return out

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.as_json(), sort_keys=True, default=str)
