"""Single-image training: the loss falls, checkpoints load in the engine, errors are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.models.loading import load_model
from engine.models.registry import describe_folder, find_unet_folder
from engine.models.weights import read_state_dict
from engine.pipelines.text2img import DiffusionSatPipeline
from training.config import TrainConfig
from training.losses import snr_weights
from training.trainer import train

from .conftest import FAST, UTM


def _losses(run):
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def test_loss_goes_down_on_a_small_set(tmp_path, geotiffs):
    config = TrainConfig(kind="image", data=[str(geotiffs / UTM["name"])], out=tmp_path / "fit", base="tiny",
                         resolution=32, batch_size=4, lr=2e-3, max_steps=40, checkpoint_every=100,
                         validation_every=0, num_workers=0, report_to="none", metadata_dropout=0.0,
                         caption_dropout=0.0, snr_weighting="none", log_every=100)
    result = train(config, log=lambda _: None)
    losses = [row["loss"] for row in _losses(tmp_path / "fit")]
    assert len(losses) == 40 and result.global_step == 40
    # per-step losses are noisy (random timesteps): compare the first steps with the last 16
    first, last = np.mean(losses[:8]), np.mean(losses[-16:])
    assert last < 0.85 * first, (first, last)


def test_run_folder_loads_in_the_engine(tiny_run, tmp_path, capsys):
    assert sorted(p.name for p in tiny_run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for name in ("unet", "unet_ema", "state", "training_state.json"):
        assert (tiny_run / "checkpoint-4" / name).exists()
    assert (tiny_run / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tiny_run.glob(".*partial"))
    assert len(list((tiny_run / "validation").glob("step-000004-*.png"))) == 1
    assert [row["step"] for row in _losses(tiny_run)] == [1, 2, 3, 4]
    # load_model picks the highest checkpoint-N/unet: the trained (non-EMA) weights
    assert find_unet_folder(tiny_run) == tiny_run / "checkpoint-4" / "unet"
    bundle = load_model(str(tiny_run))
    trained = read_state_dict(tiny_run / "checkpoint-4" / "unet")
    assert all(torch.equal(bundle.unet.state_dict()[k], v) for k, v in trained.items())
    assert bundle.native_resolution == 32  # the config records the training resolution
    ema = read_state_dict(tiny_run / "checkpoint-4" / "unet_ema")
    assert any(not torch.equal(ema[k], trained[k]) for k in trained)
    image = DiffusionSatPipeline.from_bundle(bundle)("a satellite image", None, height=32, width=32,
                                                      num_inference_steps=1).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert describe_folder(tiny_run).kind == "single-image"
    # the run records the resolution it trained at, which is what the engine then runs it at
    record = json.loads((tiny_run / "diffusionsat.json").read_text())
    assert record["source"] == "training" and record["kind"] == "single-image" and record["resolution"] == 32
    info = describe_folder(tiny_run)
    assert (info.resolution, info.resolution_source) == (32, "recorded by training")
    out = tmp_path / "gen.tif"
    code = main(["generate", "--model", str(tiny_run), "--bbox", "12.45,41.88,12.52,41.93", "--size", "64",
                 "--steps", "1", "--seed", "1", "--quiet", "--out", str(out)])
    assert code == 0 and out.is_file()


def test_checkpoint_limit_and_refusing_to_overwrite(tmp_path, geotiffs, capsys):
    run = tmp_path / "limited"
    args = ["train", "image", "--data", str(geotiffs / UTM["name"]), "--out", str(run), *FAST,
            "--checkpoint-every", "1", "--checkpoints-total-limit", "2", "--validation-every", "0"]
    assert main([*args, "--max-steps", "3"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    capsys.readouterr()
    # a run folder with checkpoints is never silently restarted
    assert main([*args, "--max-steps", "3"]) == 2
    assert "--resume latest" in capsys.readouterr().err
    # resuming a finished run at its last step does nothing more
    assert main([*args, "--max-steps", "3", "--resume", "latest"]) == 0


def test_snr_weightings():
    from engine.models.tiny import build_tiny

    scheduler = build_tiny().scheduler
    t = torch.tensor([0, 500, 999])
    acp = scheduler.alphas_cumprod[t]
    snr = acp / (1 - acp)
    assert torch.allclose(snr_weights(scheduler, t, "reference"), torch.clamp(snr, max=5) / snr)
    assert torch.allclose(snr_weights(scheduler, t, "v"), torch.clamp(snr, max=5) / (snr + 1))
    assert torch.equal(snr_weights(scheduler, t, "none"), torch.ones(3))


@pytest.mark.parametrize("extra, message", [
    (["--data", "{missing}"], "does not exist"),
    (["--resolution", "30"], "multiple of 8"),
    (["--resume", "/nonexistent/checkpoint"], "--resume"),
    (["--lr", "-1"], "--lr"),
    # 0 is refused, never replaced by the recipe's default (150,000 steps, 512 px, every 10,000 steps)
    (["--max-steps", "0"], "--max-steps 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--resolution", "0"], "--resolution 0"),
    (["--crop-size", "0"], "--crop-size 0"),
])
def test_cli_errors_are_one_line(tmp_path, geotiffs, capsys, extra, message):
    args = ["train", "image", "--data", str(geotiffs), "--out", str(tmp_path / "r"), *FAST, "--max-steps", "1"]
    if extra[0] == "--data":
        args[args.index("--data") + 1] = str(tmp_path / "missing")
        extra = []
    code = main([*args, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("field", ["max_steps", "checkpoint_every", "resolution", "conditioning_resolution"])
def test_controlnet_zero_is_refused_not_defaulted(tmp_path, field):
    from engine.errors import InvalidRequest
    from training.config import TrainConfig

    config = TrainConfig(kind="controlnet", task="superres", unet="tiny", data=["x"], out=tmp_path, **{field: 0})
    with pytest.raises(InvalidRequest, match=f"--{field.replace('_', '-')} 0"):
        config.resolved()
    assert TrainConfig(kind="controlnet", task="superres", unet="tiny", data=["x"], out=tmp_path).resolved().max_steps \
        == 50_000  # not given: the recipe's default


def test_cli_errors_for_empty_folders_and_tasks(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train", "image", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), *FAST])
    assert code == 2 and "no GeoTIFFs" in capsys.readouterr().err
    code = main(["train", "controlnet", "--task", "colour", "--unet", "tiny", "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown --task" in err and len(err.strip().splitlines()) == 1


def test_training_from_a_plain_sd_folder_adds_initialised_metadata_mlps(tmp_path, tiny_bundle, geotiffs):
    """--base with a Stable Diffusion layout (UNet2DConditionModel, no metadata MLPs)."""
    from diffusers import UNet2DConditionModel

    from engine.models.loading import save_bundle

    sd = save_bundle(tiny_bundle, tmp_path / "sd", unet_subfolder=None)
    config = {k: v for k, v in tiny_bundle.unet.config.items()
              if not k.startswith("_") and k not in ("use_metadata", "num_metadata")}
    plain = UNet2DConditionModel(**config)
    plain.load_state_dict({k: v for k, v in tiny_bundle.unet.state_dict().items()
                           if not k.startswith("metadata_embedding.")})
    plain.save_pretrained(sd / "unet", safe_serialization=True)
    run = tmp_path / "from-sd"
    args = ["train", "image", "--data", str(geotiffs / UTM["name"]), "--out", str(run), *FAST, "--max-steps", "1",
            "--validation-every", "0"]
    args[args.index("tiny")] = str(sd)
    assert main(args) == 0
    unet = load_model(str(run)).unet
    assert unet.config.use_metadata and unet.metadata_embedding is not None
    weights = read_state_dict(run / "checkpoint-1" / "unet")
    md = [v for k, v in weights.items() if k.startswith("metadata_embedding.")]
    assert len(md) == 28 and all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in md)
