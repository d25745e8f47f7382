"""Schedulers: the one factory for every sampler the engine builds.

* :func:`scheduler_from_config` — the checkpoint's own scheduler from its ``scheduler_config.json``;
* :func:`normalise_scheduler` — old configs rewritten as the official pipelines do before sampling;
* :func:`make_scheduler` — a ``--scheduler`` choice built from the checkpoint's scheduler config
  (``auto``, the default, is DPM-Solver++ 2M: :func:`resolve_scheduler_name`);
* :func:`set_timesteps` — ``scheduler.set_timesteps`` kept inside the trained timestep range.
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import InvalidRequest, ModelLoadError

#: ``--scheduler`` names. ``auto`` (the default) is DPM-Solver++ (2M), which at 20 steps comes
#: closer to a converged image than the reference's DDIM does (tests/engine/test_samplers.py), and
#: DDIM where RePaint resampling needs a stateless sampler; ``default`` keeps the checkpoint's own
#: scheduler (DDIM for the released checkpoints: what the reference sampled with).
SCHEDULER_NAMES = ("auto", "default", "ddim", "dpm++", "unipc", "euler", "pndm", "ddpm")
#: what ``auto`` means: without resampling, and with it (RePaint re-noises the latents between
#: steps, which a multistep solver's history does not allow)
AUTO_SCHEDULER, AUTO_SCHEDULER_RESAMPLING = "dpm++", "ddim"


def resolve_scheduler_name(name: Optional[str], resample: int = 0) -> str:
    """The ``--scheduler`` choice ``auto`` made concrete (``dpm++``, or ``ddim`` with RePaint
    resampling passes); every other name is returned as it is."""
    name = (name or "auto").lower()
    if name == "auto":
        return AUTO_SCHEDULER_RESAMPLING if resample else AUTO_SCHEDULER
    return name


def scheduler_label(name: Optional[str], base: Any, resample: int = 0) -> str:
    """What an output's ``scheduler`` tag records: the sampler that ran (``auto`` resolved,
    ``default`` as the checkpoint scheduler's class name)."""
    name = resolve_scheduler_name(name, resample)
    return type(base).__name__ if name == "default" else name


def scheduler_from_config(config: dict) -> Any:
    """The diffusers scheduler a ``scheduler_config.json`` names (``_class_name``; DDIM when absent)."""
    import diffusers

    class_name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not class_name.endswith("Scheduler"):
        raise ModelLoadError(f"unknown scheduler class {class_name!r} in the scheduler config")
    return cls.from_config(config)


def normalise_scheduler(scheduler: Any) -> Optional[str]:
    """Rewrite an old scheduler config as the official pipelines do before sampling
    (``steps_offset`` -> 1, ``clip_sample`` -> False); returns a one-line notice or None."""
    changes = {}
    config = scheduler.config
    if "steps_offset" in config and config["steps_offset"] != 1:
        changes["steps_offset"] = 1
    if config.get("clip_sample") is True:
        changes["clip_sample"] = False
    if not changes:
        return None
    before = ", ".join(f"{k}={config[k]}" for k in changes)
    scheduler.register_to_config(**changes)
    after = ", ".join(f"{k}={v}" for k, v in changes.items())
    return f"old scheduler config ({before}) normalised to {after}, as the official pipelines do (deprecated values)"


def make_scheduler(name: str, base: Any, resample: int = 0) -> Any:
    """A scheduler of kind ``name`` (one of :data:`SCHEDULER_NAMES`) built from the checkpoint's
    scheduler ``base`` (its config: betas, prediction type); always a new object. ``resample``:
    the request's RePaint passes (``auto`` is then DDIM, see :func:`resolve_scheduler_name`)."""
    import diffusers

    name = resolve_scheduler_name(name, resample)
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
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    cls, extra = classes[name]
    # The checkpoint's effective values, defaults included: diffusers would otherwise not pass on the
    # keys its config file left out (``_use_default_values``), so the same checkpoint saved by
    # save_pretrained (every key written) and as released (SD 2.1's short file) would give another
    # sampler different timesteps ("leading" from the DDIM config vs the solver's own "linspace").
    config = {k: v for k, v in base.config.items() if k != "_use_default_values"}
    return cls.from_config(config, **extra)


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
