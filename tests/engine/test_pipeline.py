"""The text+metadata sampler: CFG branch contents, seeds, batches, schedulers, progress, cancel."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import torch

from engine.errors import Cancelled, InvalidRequest
from engine.metadata import SatMetadata
from engine.pipelines.text2img import DiffusionSatPipeline
from engine.progress import CancelToken
from engine.schedulers import SCHEDULER_NAMES, make_scheduler

ROME = SatMetadata(lon_deg=12.485, lat_deg=41.905, gsd_m=1.0, cloud_cover=0.05, date=dt.date(2021, 6, 15))
SAHARA = SatMetadata(lon_deg=10.0, lat_deg=25.0, gsd_m=8.0, cloud_cover=0.0, date=dt.date(2005, 1, 2))
SIZE = 64  # 8x8 latents: seconds per test on the CPU


@pytest.fixture()
def pipe(tiny_bundle):
    p = DiffusionSatPipeline.from_bundle(tiny_bundle)
    p.scheduler = make_scheduler("default", tiny_bundle.scheduler)
    return p


class Recorder:
    """Wraps the UNet (the edge of this unit) and records what each call received."""

    def __init__(self, unet):
        self.unet = unet
        self.calls = []

    def __call__(self, sample, t, encoder_hidden_states, metadata=None, metadata_embeds=None, **kw):
        # The metadata the step actually sees: the precomputed embeddings must be those of `metadata`.
        assert torch.equal(metadata_embeds, self.unet.embed_metadata(metadata, sample.shape[0], sample.dtype))
        self.calls.append({"sample": sample.clone(), "text": encoder_hidden_states.clone(), "metadata": metadata.clone()})
        return self.unet(sample, t, encoder_hidden_states, metadata_embeds=metadata_embeds, **kw)

    def __getattr__(self, name):
        return getattr(self.unet, name)


def run(pipe, **kw):
    args = dict(height=SIZE, width=SIZE, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).images


def test_cfg_unconditional_branch_is_empty_prompt_and_zero_metadata(pipe):
    rec = Recorder(pipe.unet)
    pipe.unet = rec
    run(pipe, prompt="a satellite image of a stadium", metadata=ROME, guidance_scale=7.5)
    call = rec.calls[0]
    assert call["sample"].shape[0] == 2
    uncond_md, cond_md = call["metadata"]
    assert torch.equal(uncond_md, torch.zeros(7))
    assert torch.allclose(cond_md, torch.tensor(ROME.normalised(), dtype=torch.float32))
    empty = pipe.encode_prompt([""])[0]
    prompt = pipe.encode_prompt(["a satellite image of a stadium"])[0]
    assert torch.equal(call["text"][0], empty)
    assert torch.equal(call["text"][1], prompt)
    assert not torch.equal(empty, prompt)
    assert torch.equal(call["sample"][0], call["sample"][1])  # same latents in both halves


def test_guidance_one_runs_a_single_branch(pipe):
    rec = Recorder(pipe.unet)
    pipe.unet = rec
    run(pipe, metadata=ROME, guidance_scale=1.0)
    assert rec.calls[0]["sample"].shape[0] == 1
    assert torch.allclose(rec.calls[0]["metadata"][0], torch.tensor(ROME.normalised(), dtype=torch.float32))


def test_guidance_combines_the_branches(pipe):
    """noise = uncond + g * (cond - uncond): check against two separate single-branch runs."""
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor(500)
    pipe.scheduler.set_timesteps(3)
    md = pipe.prepare_metadata(ROME, 1)
    text = pipe.encode_prompt(["x"])
    empty = pipe.encode_prompt([""])
    with torch.no_grad():
        cond = pipe.predict_noise(latents, t, text, md, 1.0)
        uncond = pipe.predict_noise(latents, t, empty, torch.zeros_like(md), 1.0)
        both = pipe.predict_noise(latents, t, torch.cat([empty, text]), torch.cat([torch.zeros_like(md), md]), 4.0)
    assert torch.allclose(both, uncond + 4.0 * (cond - uncond), atol=1e-5)


def test_seed_determinism(pipe):
    a = run(pipe, metadata=ROME, generator=torch.Generator().manual_seed(5))
    b = run(pipe, metadata=ROME, generator=torch.Generator().manual_seed(5))
    c = run(pipe, metadata=ROME, generator=torch.Generator().manual_seed(6))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_metadata_changes_the_image(pipe):
    a = run(pipe, metadata=ROME)
    b = run(pipe, metadata=SAHARA)
    assert np.abs(a - b).max() > 1e-4
    assert a.shape == (1, SIZE, SIZE, 3) and a.min() >= 0 and a.max() <= 1


def test_batches_expand_metadata_with_the_prompt(pipe):
    """The reference breaks with num_images_per_prompt > 1; here metadata follows its prompt."""
    pipe.batch_invariant = False  # the whole batch in one UNet call (on the CPU it runs image by image)
    rec = Recorder(pipe.unet)
    pipe.unet = rec
    images = run(pipe, prompt=["a", "b"], metadata=[ROME, SAHARA], num_images_per_prompt=2, guidance_scale=2.0)
    assert images.shape == (4, SIZE, SIZE, 3)
    md = rec.calls[0]["metadata"]
    assert md.shape == (8, 7)
    assert torch.equal(md[:4], torch.zeros(4, 7))
    rome, sahara = (torch.tensor(m.normalised(), dtype=torch.float32) for m in (ROME, SAHARA))
    for row, expected in zip(md[4:], [rome, rome, sahara, sahara]):
        assert torch.allclose(row, expected)
    # the two images of one prompt differ (different noise), the batch is not a copy
    assert np.abs(images[0] - images[1]).max() > 1e-4
    # image by image (the CPU's default): the same rows, each image's [uncond; cond] alone
    pipe.batch_invariant, rec.calls = None, []
    alone = run(pipe, prompt=["a", "b"], metadata=[ROME, SAHARA], num_images_per_prompt=2, guidance_scale=2.0)
    assert [c["sample"].shape[0] for c in rec.calls[:4]] == [2, 2, 2, 2]
    for call, expected in zip(rec.calls[:4], [rome, rome, sahara, sahara]):
        assert torch.equal(call["metadata"][0], torch.zeros(7)) and torch.allclose(call["metadata"][1], expected)
    assert np.abs(alone - images).max() < 1e-4  # equal up to the last bits


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_epsilon_and_v_prediction(pipe, prediction_type):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    images = run(pipe, metadata=ROME)
    assert np.isfinite(images).all()
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=other)
    assert np.abs(run(pipe, metadata=ROME) - images).max() > 1e-4


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_runs(pipe, tiny_bundle, name):
    pipe.scheduler = make_scheduler(name, tiny_bundle.scheduler)
    assert pipe.scheduler.config.prediction_type == tiny_bundle.scheduler.config.prediction_type
    images = run(pipe, metadata=ROME, num_inference_steps=4)
    assert np.isfinite(images).all()


def test_unknown_scheduler(tiny_bundle):
    with pytest.raises(InvalidRequest, match="unknown scheduler"):
        make_scheduler("heun++", tiny_bundle.scheduler)


def test_progress_and_cancel(pipe):
    seen = []
    run(pipe, num_inference_steps=4, callback=seen.append)
    assert [p.step for p in seen] == [0, 1, 2, 3, 4]
    assert seen[-1].fraction == 1.0

    token = CancelToken()
    steps = []

    def cancel_after_two(p):
        steps.append(p.step)
        if p.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        run(pipe, num_inference_steps=10, callback=cancel_after_two, cancel=token)
    assert max(steps) == 2  # stopped within one denoising step


def test_size_and_metadata_validation(pipe):
    with pytest.raises(InvalidRequest, match="multiple of 8"):
        run(pipe, height=60)
    with pytest.raises(InvalidRequest, match="7 values"):
        run(pipe, metadata=[1.0, 2.0])


def test_fp16_metadata_rounds_like_the_reference(tiny_bundle):
    from engine.models.tiny import build_tiny

    bundle = build_tiny()
    bundle.unet.half()
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    md = pipe.prepare_metadata([712.69, 0, 0, 0, 0, 0, 0], 1)
    assert md[0, 0].item() == 712.5  # what the released fp16 pipelines fed the projection
    pipe.match_reference_fp16 = False
    assert abs(pipe.prepare_metadata([712.69, 0, 0, 0, 0, 0, 0], 1)[0, 0].item() - 712.69) < 1e-3
    bundle.unet.float()
    assert abs(pipe.prepare_metadata([712.69, 0, 0, 0, 0, 0, 0], 1)[0, 0].item() - 712.69) < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    from engine.models.tiny import build_tiny

    bundle = build_tiny().to("cuda", dtype)
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    images = run(pipe, metadata=ROME, height=128, width=128)
    assert np.isfinite(images).all() and images.std() > 0


@pytest.mark.parametrize("scheduler", ["default", "ddim", "pndm", "ddpm", "dpm++", "euler", "unipc"])
def test_the_largest_step_count_stays_in_the_trained_timesteps(scheduler):
    """--steps 1000 (the top of the allowed range) with SD 2.1's scheduler config ("leading",
    steps_offset 1) asked diffusers for timestep 1000 of 0..999: an IndexError, an internal error."""
    from diffusers import DDIMScheduler

    from engine.schedulers import make_scheduler, set_timesteps
    from tests.official_layouts import SD21_DDIM

    sched = set_timesteps(make_scheduler(scheduler, DDIMScheduler.from_config(SD21_DDIM)), 1000)
    assert int(sched.timesteps.max()) <= 999 and int(sched.timesteps.min()) >= 0
    few = set_timesteps(make_scheduler(scheduler, DDIMScheduler.from_config(SD21_DDIM)), 20)
    reference = make_scheduler(scheduler, DDIMScheduler.from_config(SD21_DDIM))
    reference.set_timesteps(20)
    assert few.timesteps.tolist() == reference.timesteps.tolist()  # unchanged where diffusers is right
    if scheduler in ("default", "ddim"):
        x = torch.zeros(1, 4, 8, 8)
        sched.step(x, sched.timesteps[0], x)  # was: IndexError: index 1000 is out of bounds
