"""The training loops: single-image SatUNet and ControlNet, on accelerate (reference page §8).

One loop serves both kinds. What differs is the trainable module (the SatUNet, or a ControlNet
next to a frozen SatUNet), the loss weighting (min-SNR for the UNet, plain MSE for ControlNets)
and EMA (UNet only). Everything else is shared:

- accelerate owns devices, mixed precision (fp16/bf16), gradient accumulation and multi-GPU /
  multi-node / DeepSpeed / FSDP, all from its own config (``accelerate config`` /
  ``accelerate launch``);
- data comes from a :class:`~training.datasets.TrainingStream`, a pure function of the seed and
  the batch index, and every random draw of optimizer step ``s`` (VAE posterior sample, noise,
  timesteps) comes from a generator seeded with (seed, s, micro-batch, rank). Resuming from a
  checkpoint therefore reproduces the uninterrupted run's losses exactly (on the same hardware);
- each checkpoint holds only the trainable module (diffusers layout, safetensors), its EMA, and
  accelerate's optimizer/scheduler/scaler state, written atomically (see ``checkpoints``).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from engine.atomic import atomic_folder, publish_folder, write_json_atomic, write_text_atomic
from engine.errors import InvalidRequest

from .checkpoints import (
    TrainingState,
    clean_partials,
    export_model,
    find_resume,
    list_checkpoints,
    prune_checkpoints,
    write_components,
)
from .config import TrainConfig
from .ema import EMA
from .losses import snr_weights, training_target, weighted_mse

__all__ = ["train", "TrainResult", "step_generator"]


@dataclass
class TrainResult:
    """What a finished (or SIGTERM-stopped) run did."""

    run: Path
    global_step: int
    checkpoints: list[Path]
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    samples_per_second: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"run": str(self.run), "global_step": self.global_step, "checkpoints": [str(p) for p in self.checkpoints],
                "stopped_early": self.stopped_early, "seconds": round(self.seconds, 3),
                "samples_per_second": round(self.samples_per_second, 3),
                "last_loss": self.losses[-1] if self.losses else None}


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch: a pure function of where the run is."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(micro), int(rank), 0x7EA1])
    return torch.Generator("cpu").manual_seed(int(state.generate_state(1, np.uint64)[0] & ((1 << 63) - 1)))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report_to(value: Optional[str]) -> Optional[str]:
    if value in ("none", ""):
        return None
    if value is None:
        try:
            import tensorboard  # noqa: F401 - only whether it is installed

            return "tensorboard"
        except ImportError:
            return None
    if value not in ("tensorboard", "wandb", "all"):
        raise InvalidRequest(f"--report-to must be tensorboard, wandb, all or none, got {value!r}")
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(value)
    if module:
        try:
            __import__(module)
        except ImportError:
            raise InvalidRequest(f"--report-to {value} needs the {module} package: pip install {module}") from None
    return value


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _load_bundle(spec: str, components: Optional[str], use_metadata: Optional[bool]):
    from engine.models.loading import load_model
    from engine.models.tiny import build_tiny

    if spec == "tiny":
        return build_tiny()
    return load_model(spec, base=components, use_metadata=use_metadata)


def _build_controlnet(c: TrainConfig, bundle: Any):
    from engine.models.controlnet import SatControlNet, SatControlNet3D
    from engine.models.loading import controlnet_task, load_controlnet

    if c.controlnet_init:
        controlnet = load_controlnet(c.controlnet_init)
        if controlnet_task(controlnet) != c.task:
            raise InvalidRequest(f"--controlnet {c.controlnet_init} is a {controlnet_task(controlnet)} ControlNet, "
                                 f"not {c.task}")
        return controlnet
    unet = bundle.unet
    if c.task == "temporal":
        extra = {}
        if bundle.is_tiny:  # the tiny preset's narrow first temporal block (see build_tiny)
            extra = {"first_temporal_heads": 2, "first_temporal_head_dim": 16}
        return SatControlNet3D.from_unet(unet, conditioning_in_channels=3, **extra)
    if c.task == "superres":
        return SatControlNet.from_unet(unet, conditioning_in_channels=10,
                                       conditioning_scale=c.resolution // c.conditioning_resolution)
    return SatControlNet.from_unet(unet, conditioning_in_channels=3,
                                   conditioning_scale=c.resolution // c.conditioning_resolution)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _Stop:
    """SIGTERM -> checkpoint at the end of the current step, then a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a server worker)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config: TrainConfig, *, log: Callable[[str], None] = _stderr, bundle: Any = None,
          on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Run (or resume) a training run described by ``config``; see the module docstring.

    ``bundle``: a :class:`~engine.models.bundle.ModelBundle` to train from instead of loading
    ``config.base`` (image) / ``config.unet`` (ControlNet); it is modified in place.
    ``on_step(step, loss)`` is called after every optimizer step (benchmarks, notebooks).

    Raises :class:`~engine.errors.InvalidRequest` / ``ModelNotFound`` for user errors before any
    training step runs.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    c = config.resolved()
    run: Path = c.out.expanduser().resolve()
    started = time.perf_counter()
    from .datasets import Transform, open_source

    # Data first: a wrong --data fails in a second, before any model is loaded.
    source = open_source(c.data, "image" if c.kind == "image" else c.task, crop_size=c.crop_size, crop=c.crop,
                         crops_per_image=c.crops_per_image, rgb_bands=c.rgb_bands, frames=c.frames,
                         fmow_csv=c.fmow_csv, shuffle_buffer=c.shuffle_buffer)
    resume_from = find_resume(run, c.resume)
    if resume_from is None and list_checkpoints(run):
        raise InvalidRequest(f"{run} already holds checkpoints; pass --resume latest to continue it, "
                             "or give a new --out")

    accelerator = Accelerator(
        cpu=c.cpu,
        mixed_precision=c.mixed_precision,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
        log_with=_report_to(c.report_to),
        project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")),
    )
    main = accelerator.is_main_process
    if accelerator.state.deepspeed_plugin is not None:
        # we feed batches ourselves (no prepared DataLoader), so DeepSpeed must be told the size
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = c.batch_size
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    set_seed(c.seed)

    # ---- models ---------------------------------------------------------------------------
    if c.kind == "image":
        bundle = bundle or _load_bundle(c.base, c.components, c.use_metadata)
        trainable = bundle.unet
        frozen_unet = None
    else:
        bundle = bundle or _load_bundle(c.unet, c.components, None)
        trainable = _build_controlnet(c, bundle)
        frozen_unet = bundle.unet
    vae_factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    # The saved config says which resolution the weights were trained at: generate's default size.
    trainable.register_to_config(sample_size=c.resolution // vae_factor)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    for module in (bundle.vae, bundle.text_encoder, frozen_unet):
        if module is not None:
            module.requires_grad_(False).eval()
            if next(module.parameters()).dtype != weight_dtype:  # diffusers warns on every cast
                module.to(dtype=weight_dtype)
            module.to(device)
    for cn in bundle.controlnets.values():  # the tiny preset's own ControlNets are not used here
        cn.to("cpu")
    trainable.requires_grad_(True).train()
    if c.gradient_checkpointing:
        trainable.enable_gradient_checkpointing()
        if frozen_unet is not None:
            frozen_unet.enable_gradient_checkpointing()

    # ---- run folder -------------------------------------------------------------------------
    if main:
        clean_partials(run)
        write_components(bundle, run)
        c.write(run / "training_config.json")
        if c.kind == "controlnet":
            unet_dir = run / "unet"
            if not (unet_dir / "config.json").is_file():
                with atomic_folder(unet_dir) as tmp:
                    export_model(frozen_unet, frozen_unet.state_dict(), tmp)
            write_json_atomic(run / "diffusionsat.json", default=str, value={
                "source": "training",
                "trained_against_unet": "tiny" if c.unet == "tiny" else str(Path(c.unet).expanduser().resolve()),
                "task": c.task, "kind": "controlnet", "resolution": c.resolution,
                "conditioning_resolution": c.conditioning_resolution,
            })
        else:
            # the resolution this run trains at, which its UNet config alone does not prove
            # (the released models kept SD 2.1's sample_size): see engine.models.releases
            write_json_atomic(run / "diffusionsat.json", default=str, value={
                "source": "training", "kind": "single-image", "task": "generate", "resolution": c.resolution,
            })
    accelerator.wait_for_everyone()

    # ---- optimisation ---------------------------------------------------------------------
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    optimizer = torch.optim.AdamW(
        [p for p in trainable.parameters() if p.requires_grad], lr=c.lr, betas=(c.adam_beta1, c.adam_beta2),
        weight_decay=c.adam_weight_decay, eps=c.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process per step: scale the horizon to match
    lr_scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=c.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=c.max_steps * accelerator.num_processes)
    if c.ema and accelerator.state.deepspeed_plugin is not None \
            and accelerator.state.deepspeed_plugin.zero_stage == 3:
        # ZeRO-3 partitions the parameters: a full-size EMA copy cannot be updated from them
        log("note: EMA is off under DeepSpeed ZeRO-3 (the parameters are sharded)")
        c.ema = False
    ema = EMA(trainable, c.ema_max_decay).to(device) if c.ema else None
    model, optimizer, lr_scheduler = accelerator.prepare(trainable, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)

    if not sharded:
        # Model weights are saved in the diffusers layout beside the state (export_model), so
        # accelerate must not save or load a second copy.
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    global_step = 0
    batches_consumed = 0
    if resume_from is not None:
        state = TrainingState.read(resume_from)
        if (state.kind, state.task) != (c.kind, c.task):
            raise InvalidRequest(f"{resume_from} is a {state.kind}/{state.task} checkpoint, not {c.kind}/{c.task}")
        if (state.batch_size, state.num_processes, state.gradient_accumulation_steps) != (
                c.batch_size, accelerator.num_processes, c.gradient_accumulation_steps):
            log(f"note: the batch size, process count or accumulation differs from {resume_from.name}; "
                "the data order after the resume differs from an uninterrupted run")
        accelerator.load_state(str(resume_from / "state"))
        if not sharded:
            from engine.models.weights import read_state_dict

            unwrapped.load_state_dict(read_state_dict(resume_from / ("unet" if c.kind == "image" else "controlnet")))
        if ema is not None:
            from engine.models.weights import read_state_dict

            if (resume_from / "unet_ema").is_dir():
                ema.load_weights(read_state_dict(resume_from / "unet_ema"), state.ema_updates)
            else:
                log(f"note: {resume_from.name} has no unet_ema/; the EMA restarts from the current weights")
                ema = EMA(unwrapped, c.ema_max_decay).to(device)
        global_step = state.global_step
        batches_consumed = state.batches_consumed if state.num_processes == accelerator.num_processes \
            else state.global_step * c.gradient_accumulation_steps
        if main:
            log(f"resuming {run.name} from {resume_from.name} (step {global_step})")
    elif c.resume == "latest" and main:
        log(f"note: {run} has no checkpoint yet; starting from step 0")

    losses_file = run / "losses.jsonl"
    if main:
        _truncate_losses(losses_file, global_step)

    # ---- data -------------------------------------------------------------------------------
    from .datasets import TrainingStream, first_examples

    transform = Transform(resolution=c.resolution, conditioning_resolution=c.conditioning_resolution,
                          metadata_dropout=c.metadata_dropout, caption_dropout=c.caption_dropout,
                          temporal=c.task == "temporal")
    stream = TrainingStream(source, transform, c.batch_size, seed=c.seed, rank=accelerator.process_index,
                            world=accelerator.num_processes, start_batch=batches_consumed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=c.num_workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if c.num_workers else None)
    validation = None
    if main and c.validation_every:
        from .validation import ValidationSet

        validation = ValidationSet.from_examples(first_examples(source, transform, c.validation_samples, c.seed),
                                                 c.validation_prompt)

    if accelerator.trackers or accelerator.log_with:
        accelerator.init_trackers("diffusionsat", config={
            k: v for k, v in c.as_json().items() if isinstance(v, (int, float, str, bool))})
    tracker = _tensorboard(accelerator)

    # ---- loop -------------------------------------------------------------------------------
    stop = _Stop()
    stop.install()
    checkpoints: list[Path] = []
    losses: list[float] = []
    samples_per_step = c.batch_size * c.gradient_accumulation_steps * accelerator.num_processes
    window_start, window_steps = time.perf_counter(), 0
    timed_start, timed_steps = None, 0
    stopped_early = False

    def encode_text(captions: list[str]) -> torch.Tensor:
        tokens = bundle.tokenizer(captions, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        with torch.no_grad():
            return bundle.text_encoder(tokens.input_ids.to(device))[0]

    def loss_of(batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        pixels = batch["pixel_values"].to(device, dtype=weight_dtype, non_blocking=True)
        with torch.no_grad():
            posterior = bundle.vae.encode(pixels).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents = (posterior.mean.float() + posterior.std.float() * eps) * bundle.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = training_target(noise_scheduler, latents, noise, timesteps)
        text = encode_text(batch["caption"])
        metadata = batch["metadata"].to(device)
        with accelerator.autocast():
            if c.kind == "image":
                pred = model(noisy, timesteps, text, metadata=metadata).sample
            else:
                down, mid = model(noisy, timesteps, text, controlnet_cond=batch["conditioning"].to(device),
                                  metadata=metadata, cond_metadata=batch["cond_metadata"].to(device),
                                  return_dict=False)
                pred = frozen_unet(noisy.to(weight_dtype), timesteps, text, metadata=metadata,
                                   down_block_additional_residuals=[d.to(weight_dtype) for d in down],
                                   mid_block_additional_residual=mid.to(weight_dtype)).sample
        weights = snr_weights(noise_scheduler, timesteps, c.snr_weighting, c.snr_gamma)
        return weighted_mse(pred, target, weights)

    def save_checkpoint(step: int) -> Path:
        final = run / f"checkpoint-{step}"
        tmp = run / f".checkpoint-{step}.partial"
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
        state_dict = accelerator.get_state_dict(model)
        if main:
            name = "unet" if c.kind == "image" else "controlnet"
            export_model(unwrapped, state_dict, tmp / name)
            if ema is not None:
                export_model(ema.model, ema.model.state_dict(), tmp / "unet_ema")
            TrainingState(global_step=step, batches_consumed=batches_consumed, seed=c.seed,
                          num_processes=accelerator.num_processes, batch_size=c.batch_size,
                          gradient_accumulation_steps=c.gradient_accumulation_steps, kind=c.kind, task=c.task,
                          ema_updates=ema.updates if ema is not None else 0).write(tmp)
            # the same step may be saved again (e.g. SIGTERM right after a checkpoint): replaced whole
            publish_folder(tmp, final)
            if c.kind == "controlnet":
                with atomic_folder(run / "controlnet") as latest:
                    shutil.copytree(final / "controlnet", latest, dirs_exist_ok=True)
            for path in prune_checkpoints(run, c.checkpoints_total_limit):
                log(f"removed {path.name} (--checkpoints-total-limit {c.checkpoints_total_limit})")
            log(f"saved {final.name}")
        accelerator.wait_for_everyone()
        return final

    data = iter(loader)
    try:
        while global_step < c.max_steps:
            micro_losses = []
            for micro in range(c.gradient_accumulation_steps):
                batch = next(data)
                with accelerator.accumulate(model):
                    loss = loss_of(batch, step_generator(c.seed, global_step, micro, accelerator.process_index))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and c.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach().float())
            batches_consumed += c.gradient_accumulation_steps
            global_step += 1
            if ema is not None:
                ema.update(unwrapped)
            step_loss = accelerator.gather(torch.stack(micro_losses).mean()[None]).mean().item()
            losses.append(step_loss)
            lr = lr_scheduler.get_last_lr()[0]
            window_steps += 1
            if timed_start is None:
                timed_start = time.perf_counter()  # the first step (warm-up) is not timed
            else:
                timed_steps += 1
            if main:
                with losses_file.open("a") as handle:
                    handle.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr}) + "\n")
                if not math.isfinite(step_loss):
                    log(f"warning: the loss at step {global_step} is {step_loss}; lower --lr or use bf16")
            accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=global_step)
            if on_step is not None:
                on_step(global_step, step_loss)
            if main and (global_step % c.log_every == 0 or global_step == c.max_steps):
                elapsed = time.perf_counter() - window_start
                rate = window_steps * samples_per_step / elapsed if elapsed > 0 else 0.0
                log(f"step {global_step}/{c.max_steps} loss {step_loss:.4f} lr {lr:.2e} {rate:.2f} samples/s")
                window_start, window_steps = time.perf_counter(), 0
            stop_now = _agreed(accelerator, stop.requested)
            if global_step % c.checkpoint_every == 0 or global_step == c.max_steps or stop_now:
                checkpoints.append(save_checkpoint(global_step))
            if validation is not None and (global_step % c.validation_every == 0 or global_step == c.max_steps):
                from .validation import run_validation

                with accelerator.autocast():
                    run_validation(bundle, unwrapped if c.kind == "image" else frozen_unet,
                                   unwrapped if c.kind == "controlnet" else None, validation,
                                   resolution=c.resolution, steps=c.validation_steps, guidance=c.validation_guidance,
                                   seed=c.seed, out_dir=run / "validation", step=global_step, tracker=tracker)
            if stop_now:
                stopped_early = True
                if main:
                    log(f"stopped by SIGTERM after step {global_step}; resume with --resume latest")
                break
    finally:
        stop.restore()
        accelerator.end_training()
    timed = (time.perf_counter() - timed_start) if timed_start is not None and timed_steps else 0.0
    return TrainResult(run=run, global_step=global_step, checkpoints=checkpoints, losses=losses,
                       stopped_early=stopped_early, seconds=time.perf_counter() - started,
                       samples_per_second=timed_steps * samples_per_step / timed if timed else 0.0)


def _agreed(accelerator: Any, flag: bool) -> bool:
    """True on every process when any process got SIGTERM (so all checkpoint together)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _tensorboard(accelerator: Any) -> Any:
    for tracker in accelerator.trackers:
        if getattr(tracker, "name", "") == "tensorboard":
            return tracker
    return accelerator.trackers[0] if accelerator.trackers else None


def _truncate_losses(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` by a killed process (they are about to be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by the kill
    write_text_atomic(path, "".join(line + "\n" for line in kept))
