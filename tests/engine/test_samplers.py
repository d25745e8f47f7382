"""Fewer steps at equal quality: the samplers solve the same ODE, so their images converge to each
other as the step count grows, and DPM-Solver++ (the ``auto`` default) gets there in fewer steps
than the reference's DDIM.

The tiny model (random weights, CPU) at 64 px, guidance 1, the same initial latents for every
sampler; distances are RMS over the decoded images in [0, 1]. Measured once (docs/benchmarks.md,
"Samplers"): the largest distance between samplers 0.023 at 5 steps, 0.0040 at 50; to a 200-step
DDIM reference at 20 steps, DDIM 0.0091 and DPM-Solver++ 0.0023.
"""

import pytest
import torch

from engine.pipelines.text2img import DiffusionSatPipeline
from engine.schedulers import make_scheduler, resolve_scheduler_name
from engine.tasks.common import check_resample
from engine.tasks.requests import GenerateRequest, InpaintRequest

PX = 64


@pytest.fixture(scope="module")
def one_thread():
    # ~400 tiny UNet calls on 8x8 latents: one thread avoids OpenMP's spin-waits on a loaded 2-core machine
    # (measured 20x faster there); the distances do not depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample(tiny_bundle, one_thread):
    pipe = DiffusionSatPipeline.from_bundle(tiny_bundle)
    latents = torch.randn(1, 4, PX // 8, PX // 8, generator=torch.Generator().manual_seed(0))
    cache = {}

    def run(name: str, steps: int) -> torch.Tensor:
        if (name, steps) not in cache:
            pipe.scheduler = make_scheduler(name, tiny_bundle.scheduler)
            cache[name, steps] = pipe("a satellite image", None, height=PX, width=PX, num_inference_steps=steps,
                                      guidance_scale=1.0, latents=latents.clone(),
                                      generator=torch.Generator().manual_seed(1), output_type="pt").images
        return cache[name, steps]

    return run


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def spread(sample, steps: int) -> float:
    """The largest distance between the images of ddim, dpm++ and unipc at ``steps``."""
    images = [sample(name, steps) for name in ("ddim", "dpm++", "unipc")]
    return max(rms(a, b) for i, a in enumerate(images) for b in images[i + 1:])


def test_samplers_converge_to_each_other_as_steps_grow(sample):
    few, many = spread(sample, 5), spread(sample, 50)
    assert few > 0  # they are different samplers
    assert many < 0.5 * few, (few, many)


def test_dpm_solver_at_20_steps_is_closer_to_the_converged_image_than_ddim(sample):
    reference = sample("ddim", 200)
    ddim, dpm = rms(sample("ddim", 20), reference), rms(sample("dpm++", 20), reference)
    assert dpm < 0.6 * ddim, (dpm, ddim)


def test_auto_is_dpm_solver_and_ddim_for_resampling():
    assert GenerateRequest(bbox=(0, 0, 1, 1)).scheduler == "auto"
    assert resolve_scheduler_name("auto") == "dpm++"
    assert resolve_scheduler_name("auto", resample=2) == "ddim"
    assert resolve_scheduler_name("unipc", resample=2) == "unipc"  # an explicit choice is kept (and refused)


def test_auto_scheduler_builds_dpm_solver_or_ddim(tiny_bundle):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    dpm = make_scheduler("auto", tiny_bundle.scheduler)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.solver_order == 2
    assert dpm.config.prediction_type == tiny_bundle.scheduler.config.prediction_type  # the checkpoint's
    assert isinstance(make_scheduler("auto", tiny_bundle.scheduler, resample=1), DDIMScheduler)
    assert type(make_scheduler("default", tiny_bundle.scheduler)) is type(tiny_bundle.scheduler)


def test_resampling_with_the_default_sampler_is_accepted(tmp_path):
    base = {"input": str(tmp_path / "in.tif"), "mask": str(tmp_path / "m.tif"), "resample": 2}
    check_resample(InpaintRequest(**base), "DDIMScheduler")  # auto -> ddim: accepted
    with pytest.raises(Exception, match="--resample needs"):
        check_resample(InpaintRequest(**base, scheduler="dpm++"), "DDIMScheduler")


@pytest.mark.parametrize("name", ["dpm++", "unipc", "euler"])
def test_a_sampler_has_the_same_timesteps_for_a_saved_checkpoint(tiny_bundle, tiny_folder, name):
    """The built-in tiny model and the same model saved as a folder (every config key written out)
    give a sampler the same timesteps: diffusers passes on only the keys a config file named, so the
    solvers took "leading" spacing from a saved config and their own "linspace" from a short one."""
    from engine.models.loading import load_model
    from engine.schedulers import set_timesteps

    loaded = load_model(str(tiny_folder))
    a = set_timesteps(make_scheduler(name, tiny_bundle.scheduler), 20)
    b = set_timesteps(make_scheduler(name, loaded.scheduler), 20)
    assert torch.equal(a.timesteps, b.timesteps)
    assert a.config.timestep_spacing == tiny_bundle.scheduler.config.timestep_spacing  # the checkpoint's
