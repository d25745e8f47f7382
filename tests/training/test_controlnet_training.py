"""ControlNet training smoke runs (superres, temporal) on the tiny model and loading their runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.models.controlnet import SatControlNet, SatControlNet3D
from engine.models.loading import load_model
from engine.models.registry import describe_folder
from engine.models.weights import read_state_dict
from engine.pipelines.controlnet import Control, DiffusionSatControlNetPipeline
from training.datasets.shards import ShardWriter

SMOKE = ["--resolution", "32", "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "1",
         "--num-workers", "0", "--report-to", "none", "--validation-steps", "1", "--validation-samples", "1"]


def _superres_shards(folder):
    rng = np.random.default_rng(0)
    with ShardWriter(folder, maxcount=2) as writer:
        for i in range(3):
            writer.write(f"sr{i}", {
                "multispectral.npy": rng.integers(0, 4000, (16, 16, 13), dtype=np.uint16),
                "rgb.npy": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                "metadata.json": {"gsd": 1.0, "cloud_cover": 5, "timestamp": "2017-06-01T10:00:00Z",
                                  "lon": 10.0, "lat": 45.0, "img_filename": "port_1_2_rgb.jpg"},
            })
    return folder


def _temporal_shards(folder):
    rng = np.random.default_rng(1)
    with ShardWriter(folder) as writer:
        for i in range(2):
            fields = {}
            for t in range(5):
                fields[f"input-{t}.npy"] = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                fields[f"metadata-{t}.json"] = {"gsd": 1.0, "timestamp": f"201{t}-05-01", "lon": 5.0, "lat": 50.0}
            writer.write(f"tm{i}", fields)
    return folder


@pytest.mark.parametrize("task", ["superres", "temporal"])
def test_controlnet_training_smoke_and_loading(tmp_path, tiny_run, task):
    data = (_superres_shards if task == "superres" else _temporal_shards)(tmp_path / "data")
    run = tmp_path / task
    code = main(["train", "controlnet", "--task", task, "--unet", str(tiny_run), "--data", str(data),
                 "--out", str(run), *SMOKE])
    assert code == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    ckpt = run / "checkpoint-2"
    assert (ckpt / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (ckpt / "unet").exists() and not (ckpt / "unet_ema").exists()  # only the trainable module
    record = json.loads((run / "diffusionsat.json").read_text())
    assert record["task"] == task and record["trained_against_unet"] == str(tiny_run.resolve())
    info = describe_folder(run)
    assert info.kind == f"controlnet-{task}" and info.trained_against == str(tiny_run.resolve())
    assert record["source"] == "training"
    assert (info.resolution, info.resolution_source) == (record["resolution"], "recorded by training")
    assert len(list((run / "validation").glob("*.png"))) == 2  # one sample at each of the 2 steps

    # the frozen UNet is untouched; the ControlNet moved away from its initialisation
    frozen = read_state_dict(run / "unet")
    trained_unet = read_state_dict(tiny_run / "checkpoint-4" / "unet")
    assert all(torch.equal(frozen[k], trained_unet[k]) for k in trained_unet)
    latest = read_state_dict(run / "controlnet")
    assert all(torch.equal(latest[k], v) for k, v in read_state_dict(ckpt / "controlnet").items())

    for bundle in (load_model(str(run)), load_model(str(run), unet=str(tiny_run))):
        controlnet = bundle.controlnet_for(task)
        assert isinstance(controlnet, SatControlNet3D if task == "temporal" else SatControlNet)
        pipe = DiffusionSatControlNetPipeline.from_bundle(bundle, controlnet=controlnet)
        cond = torch.rand(1, 10, 16, 16) if task == "superres" else torch.rand(1, 3, 3, 32, 32)
        image = pipe("a satellite image", None, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                     control=Control(image=cond)).images
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    if task == "superres":
        assert controlnet.config.conditioning_scale == 2 and controlnet.config.conditioning_in_channels == 10
