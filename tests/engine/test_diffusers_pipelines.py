"""The pipelines used as diffusers pipelines: from_pretrained / save_pretrained, callback_on_step_end,
official roots in one call, VAE slicing, attention processors, model CPU offload (CUDA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import InvalidRequest
from engine.models.unet import SatUNet
from engine.pipelines.controlnet import Control, DiffusionSatControlNetPipeline
from engine.pipelines.inpaint import DiffusionSatInpaintPipeline, Inpaint
from engine.pipelines.text2img import DiffusionSatPipeline
from tests.official_layouts import build_parts, write_release

MD = [500.0, 300.0, 1000.0, 0.0, 200.0, 400.0, 100.0]  # normalised metadata


def sample(pipe, steps=2, seed=1, **kw):
    args = dict(height=64, width=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    args.update(kw)
    return pipe("a satellite image of a harbour", MD, **args).images


def test_the_notebook_snippet_of_docs_models_md(tmp_path):
    """The "use from a notebook" snippet of docs/models.md, run as written (folder = tmp_path)."""
    folder = tmp_path / "my-tiny"
    # --- docs/models.md snippet starts
    import torch

    from engine.pipelines.text2img import DiffusionSatPipeline

    pipe = DiffusionSatPipeline.from_pretrained("tiny")  # or a model folder, or "hf:owner/name"
    pipe.save_pretrained(folder)
    pipe = DiffusionSatPipeline.from_pretrained(folder)
    image = pipe("a satellite image of a harbour", [500.0, 300.0, 1000.0, 0.0, 200.0, 400.0, 100.0],
                 height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(1)).images[0]  # (64, 64, 3) in [0, 1]
    # --- docs/models.md snippet ends
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    for line in ('pipe = DiffusionSatPipeline.from_pretrained("tiny")', "pipe.save_pretrained(folder)",
                 "pipe = DiffusionSatPipeline.from_pretrained(folder)"):
        assert line in doc


def test_saved_tiny_loads_back_and_gives_the_same_image(tiny_bundle, tmp_path):
    pipe = DiffusionSatPipeline.from_bundle(tiny_bundle)
    pipe.save_pretrained(tmp_path / "tiny")
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "DiffusionSatPipeline"
    assert index["unet"] == ["engine.models.unet", "SatUNet"]
    assert not list(tmp_path.glob(".tiny.*"))  # written through a temporary folder, renamed into place

    again = DiffusionSatPipeline.from_pretrained(tmp_path / "tiny")
    assert isinstance(again.unet, SatUNet) and again.unet.metadata_embedding is not None
    assert again.unet is not tiny_bundle.unet
    assert np.array_equal(sample(pipe), sample(again))
    assert not np.array_equal(sample(pipe), sample(again, seed=2))


def test_a_saved_controlnet_pipeline_loads_back_with_its_controlnet(tiny_bundle, tmp_path):
    pipe = DiffusionSatControlNetPipeline.from_bundle(tiny_bundle, controlnet=tiny_bundle.controlnets["temporal"])
    pipe.save_pretrained(tmp_path / "temporal")
    again = DiffusionSatControlNetPipeline.from_pretrained(tmp_path / "temporal")
    assert type(again.controlnet) is type(tiny_bundle.controlnets["temporal"])
    control = Control(torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(0)),
                      torch.full((1, 7, 2), 300.0))
    assert np.array_equal(sample(pipe, control=control), sample(again, control=control))
    with pytest.raises(InvalidRequest, match="controlnet_task"):
        DiffusionSatControlNetPipeline.from_pretrained("tiny")  # two ControlNets: which one?
    assert DiffusionSatInpaintPipeline.from_pretrained("tiny").controlnet is None  # optional there


def test_callback_on_step_end_runs_once_per_step_and_can_change_latents(tiny_bundle):
    pipe = DiffusionSatPipeline.from_bundle(tiny_bundle)
    seen = []

    def record(p, i, t, tensors):
        assert p is pipe and set(tensors) == {"latents", "prompt_embeds"}
        seen.append((i, int(t), tensors["latents"].shape))
        return {}

    sample(pipe, steps=3, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert seen[0][2] == (1, 4, 8, 8)

    marker = torch.full((1, 4, 8, 8), 0.25)
    replaced = sample(pipe, steps=3, output_type="latent",
                      callback_on_step_end=lambda p, i, t, k: {"latents": marker} if i == 2 else k)
    assert torch.equal(replaced, marker)  # the callback's latents are the ones the loop goes on with
    halfway = sample(pipe, steps=3, callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"] * 0}
                     if i == 0 else k)
    assert np.abs(halfway - sample(pipe, steps=3)).max() > 1e-3
    with pytest.raises(InvalidRequest, match="callback_on_step_end_tensor_inputs"):
        sample(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_official_roots_load_with_one_call(tmp_path, monkeypatch):
    parts = build_parts(tmp_path / "parts")
    models = tmp_path / "models"
    root = write_release(parts, models, "diffusionsat-512")  # the zip's folder name, checkpoint-N/unet inside
    pipe = DiffusionSatPipeline.from_pretrained(root)
    assert isinstance(pipe.unet, SatUNet) and pipe.unet.config.cross_attention_dim == 1024
    image = sample(pipe, steps=1, guidance_scale=1.0)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # the super-resolution ControlNet root has no UNet: it pairs with the installed 512 model's
    monkeypatch.setenv("DIFFUSIONSAT_MODELS", str(models))
    sr_root = write_release(parts, models, "controlnet-superres")
    sr = DiffusionSatControlNetPipeline.from_pretrained(sr_root)
    assert sr.controlnet.config.conditioning_in_channels == 10
    assert any("checkpoint-100000" in n for n in sr.notices)
    image = sample(sr, steps=1, guidance_scale=1.0, control=Control(torch.rand(1, 10, 32, 32), torch.tensor([MD])))
    assert np.isfinite(image).all()


def test_vae_slicing_and_attention_processors_keep_the_image(tiny_bundle):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = DiffusionSatPipeline.from_bundle(tiny_bundle)
    ref = sample(pipe, num_images_per_prompt=2)
    pipe.enable_vae_slicing()
    try:
        assert pipe.vae.use_slicing
        assert np.allclose(sample(pipe, num_images_per_prompt=2), ref, atol=1e-5)
    finally:
        pipe.disable_vae_slicing()
    original = pipe.unet.attn_processors
    try:
        pipe.unet.set_attn_processor(AttnProcessor())  # the classic (non-SDPA) attention
        assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())
        assert np.allclose(sample(pipe, num_images_per_prompt=2), ref, atol=1e-4)
    finally:
        pipe.unet.set_attn_processor(original)


def test_inpaint_pipeline_keeps_the_known_region_in_latent_space(tiny_bundle):
    pipe = DiffusionSatInpaintPipeline.from_bundle(tiny_bundle)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    latents = sample(pipe, output_type="latent", inpaint=Inpaint(image, mask))
    known = pipe.encode_image(image)
    assert torch.allclose(latents[..., 4:, :], known[..., 4:, :])  # the unmasked half: the input's latents
    assert not torch.allclose(latents[..., :4, :], known[..., :4, :])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_cpu_offload_on_cuda_gives_the_gpu_image():
    from engine.models.tiny import build_tiny

    on_gpu = DiffusionSatPipeline.from_bundle(build_tiny()).to("cuda")
    ref = sample(on_gpu)
    pipe = DiffusionSatPipeline.from_bundle(build_tiny())
    pipe.enable_model_cpu_offload()
    assert pipe._execution_device.type == "cuda"
    image = sample(pipe)
    assert next(pipe.unet.parameters()).device.type == "cpu"  # offloaded again after the call
    assert np.allclose(image, ref, atol=1e-4)
    cn = DiffusionSatControlNetPipeline.from_bundle(build_tiny(), controlnet=build_tiny().controlnets["superres"])
    cn.enable_model_cpu_offload()
    control = Control(torch.rand(1, 10, 32, 32), torch.tensor([MD]))
    assert np.isfinite(sample(cn, control=control)).all()


def test_a_batch_of_places_with_their_own_generators(tiny_bundle):
    """A researcher's batch: one SatMetadata and one generator per prompt; each image is the one
    its own call gives, and one prompt for several places says how to ask for that."""
    import datetime as dt

    from engine.metadata import SatMetadata

    pipe = DiffusionSatPipeline.from_bundle(tiny_bundle)
    places = [SatMetadata(12.5, 41.9, 1.0, 0.1, dt.date(2021, 6, 15)), SatMetadata(-3.7, 40.4, 2.0, 0.0, dt.date(2020, 5, 1))]
    args = dict(height=64, width=64, num_inference_steps=2)
    both = pipe(["a satellite image", "a farm"], places, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                **args).images
    alone = pipe("a farm", places[1], generator=torch.Generator().manual_seed(2), **args).images
    assert both.shape == (2, 64, 64, 3) and np.array_equal(both[1], alone[0])
    with pytest.raises(InvalidRequest, match=r"2 metadata rows for 1 prompt: .*\[prompt\] \* 2"):
        pipe("a satellite image", places, generator=torch.Generator().manual_seed(1), **args)
