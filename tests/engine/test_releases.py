"""The released checkpoints run as they were trained: resolution, pairing and tile size come from
the manifest (or the record beside the weights), never from SD 2.1's ``sample_size`` 96.

Every layout here is built with the official-shaped configs of ``tests/official_layouts.py``
(SD 2.1's, widths shrunk, ``sample_size`` 96 kept), as each zip unpacks and as ``download``
installs it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.models import releases
from engine.models.cache import ModelCache
from engine.models.download import RELEASES
from engine.models.loading import load_model
from engine.models.registry import describe_folder, installed_models, model_facts
from engine.models.resolution import SD21_SAMPLE_SIZE
from engine.schedulers import normalise_scheduler, scheduler_from_config
from engine.tasks import parse_request, plan, run_task
from tests.official_layouts import (
    OLD_PNDM,
    SD21_DDIM,
    ZIP_FOLDERS,
    build_parts,
    write_release,
)

from .test_tiled_tasks import s2_dn, write

BBOX = "12.45,41.88,12.52,41.93"
EXPECTED = {  # release -> (kind, resolution, conditioning resolution, tasks)
    "diffusionsat-512": ("single-image", 512, None, ["generate", "inpaint", "extend"]),
    "diffusionsat-256": ("single-image", 256, None, ["generate", "inpaint", "extend"]),
    "controlnet-superres": ("controlnet-superres", 512, 256, ["superres"]),
    "controlnet-texas": ("controlnet-temporal", 256, 256, ["temporal", "inpaint"]),
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts(tmp_path_factory.mktemp("official-parts"))


@pytest.fixture(scope="module")
def zips(parts, tmp_path_factory):
    """All four releases as their zips unpack (the official folder names), in one models folder."""
    models = tmp_path_factory.mktemp("models-zip")
    return {name: write_release(parts, models, name) for name in ZIP_FOLDERS}


@pytest.fixture()
def installed(zips, monkeypatch):
    monkeypatch.setenv("DIFFUSIONSAT_MODELS", str(next(iter(zips.values())).parent))
    return zips


@pytest.fixture(scope="module")
def cache():
    return ModelCache(max_models=2)


def test_manifest_is_the_download_list_and_names_the_records():
    assert list(RELEASES) == list(releases.releases())  # one source of truth
    assert {n: r.record for n, r in RELEASES.items()} == {
        "diffusionsat-512": "13751498", "diffusionsat-256": "13756199",
        "controlnet-superres": "13756246", "controlnet-texas": "13756211"}
    for name, (kind, px, cond, tasks) in EXPECTED.items():
        rel = RELEASES[name]
        assert (rel.kind, rel.resolution, list(rel.tasks)) == (kind, px, tasks)
        assert rel.folders == (ZIP_FOLDERS[name],) and rel.prediction_type == "v_prediction"
        assert rel.training["gsd_m"][0] < rel.training["gsd_m"][1]
    for name in ("controlnet-superres", "controlnet-texas"):
        assert RELEASES[name].pairs_with == {"release": "diffusionsat-512", "checkpoint": "checkpoint-100000"}


@pytest.mark.parametrize("installed_by", ["zip", "download"])
def test_layouts_are_recognised_with_their_trained_resolution(parts, tmp_path, installed_by):
    for name, (kind, px, cond, tasks) in EXPECTED.items():
        root = write_release(parts, tmp_path, name, installed_by)
        if kind == "single-image":  # what the configs say: 768 px
            config = json.loads((root / "checkpoint-150000" / "unet" / "config.json").read_text())
            assert config["sample_size"] == SD21_SAMPLE_SIZE
        info = describe_folder(root)
        assert (info.kind, info.resolution, info.resolution_source, info.tasks) == (kind, px, "manifest", tasks)
        assert info.release == name and info.warning is None
        if kind != "single-image":
            assert info.conditioning_resolution == cond
            assert info.unet_checkpoint == "diffusionsat-512/checkpoint-100000/unet"
        else:
            assert info.unet_checkpoint == "checkpoint-150000"
    if installed_by == "download":
        record = releases.read_record(tmp_path / "controlnet-superres")
        assert record["source"] == "download" and record["release"] == "controlnet-superres"


def test_a_renamed_sd21_derived_folder_is_not_taken_as_768(parts, tmp_path):
    root = write_release(parts, tmp_path, "diffusionsat-512")
    renamed = root.rename(tmp_path / "my-model")
    info = describe_folder(renamed)
    assert info.resolution == 512 and info.resolution_source == "config"
    assert "sample_size 96" in info.warning and "--resolution" in info.warning
    facts = model_facts(str(renamed))
    assert facts.unet_resolution.px == 512 and any("sample_size 96" in n for n in facts.notices)
    # a renamed ControlNet is still recognised by its layout (the only release of its kind)
    cn = write_release(parts, tmp_path, "controlnet-texas").rename(tmp_path / "texas-copy")
    assert (describe_folder(cn).resolution, describe_folder(cn).release) == (256, "controlnet-texas")


def test_auto_picks_the_512_model_and_the_listing_tells_sources(installed, capsys):
    facts = model_facts("auto")
    assert facts.root.name == ZIP_FOLDERS["diffusionsat-512"]
    assert [m.resolution for m in installed_models() if m.kind == "single-image"] == [512, 256]
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    sr = listed[ZIP_FOLDERS["controlnet-superres"]]
    assert (sr["resolution"], sr["conditioning_resolution"], sr["resolution_source"], sr["tasks"]) == \
        (512, 256, "manifest", ["superres"])
    assert sr["unet_checkpoint"] == "diffusionsat-512/checkpoint-100000/unet"
    assert listed[ZIP_FOLDERS["diffusionsat-256"]]["resolution"] == 256
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "512 px, conditioning 256 px (from the manifest); tasks superres" in text
    assert "pairs with UNet diffusionsat-512/checkpoint-100000/unet" in text


def test_controlnet_without_unet_pairs_with_checkpoint_100000(installed):
    for name in ("controlnet-superres", "controlnet-texas"):
        facts = model_facts(str(installed[name]))
        assert facts.unet_folder == installed["diffusionsat-512"] / "checkpoint-100000" / "unet"
        assert any("checkpoint-100000/unet, the UNet it was trained against" in n for n in facts.notices)
    # --unet overrides the pairing
    other = installed["diffusionsat-512"] / "checkpoint-150000"
    assert model_facts(str(installed["controlnet-texas"]), unet=str(other)).unet_folder == other / "unet"


def _shapes(module, into: list):
    return module.register_forward_pre_hook(lambda m, args, kwargs: into.append(tuple(args[0].shape)),
                                            with_kwargs=True)


def test_generate_runs_at_512_and_256_with_no_size(installed, tmp_path, capsys):
    out = tmp_path / "g.tif"
    argv = ["generate", "--bbox", BBOX, "--steps", "1", "--guidance", "1", "--seed", "1", "--quiet", "--json"]
    assert main([*argv, "--out", str(out)]) == 0  # --model auto
    result = json.loads(capsys.readouterr().out)
    # the model's 512 px on the longest side of Rome's 5.8 x 5.6 km bbox (the other side follows its shape)
    assert (result["model"], result["width"], result["height"]) == (ZIP_FOLDERS["diffusionsat-512"], 512, 488)
    fresh = tmp_path / "g2.tif"  # (an existing --out is refused by --dry-run as by the run)
    assert main([*argv, "--model", str(installed["diffusionsat-256"]), "--dry-run", "--out", str(fresh)]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 256
    # --resolution overrides the manifest, on generate's default size and in the plan alike
    assert main([*argv, "--resolution", "128", "--dry-run", "--out", str(fresh)]) == 0
    assert json.loads(capsys.readouterr().out)["model_px"] == 128
    assert main([*argv, "--resolution", "100", "--out", str(out)]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_superres_runs_at_512_with_256_conditioning(installed, tmp_path, cache):
    src = write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif", s2_dn((13, 24, 24)))
    request = parse_request({"task": "superres", "model": str(installed["controlnet-superres"]), "input": src,
                             "factor": 4, "steps": 1, "seed": 2})
    assert plan(request)["model_px"] == 512
    bundle, _ = cache.get(request.model)
    cond, latents = [], []
    hooks = [_shapes(bundle.controlnets["superres"].controlnet_cond_embedding, cond), _shapes(bundle.unet, latents)]
    try:
        result = run_task(request, tmp_path / "sr.tif", models=cache)
    finally:
        for h in hooks:
            h.remove()
    assert cond[0][-2:] == (256, 256) and latents[0][-2:] == (64, 64)  # 512 px tile, 256 px conditioning
    assert (result.width, result.height) == (96, 96)
    assert any("superres tiles at 512 px with 256 px conditioning" in w for w in result.warnings)
    assert any("checkpoint-100000" in w for w in result.warnings)


def test_temporal_runs_at_256(installed, tmp_path, cache):
    rng = np.random.default_rng(4)
    inputs = [write(tmp_path / f"t_{y}-06-01.tif", (rng.random((3, 40, 40)) * 255).astype("uint8"))
              for y in (2019, 2020)]
    request = parse_request({"task": "temporal", "model": str(installed["controlnet-texas"]), "inputs": inputs,
                             "date": "2021-06-01", "steps": 1, "seed": 2})
    assert plan(request)["model_px"] == 256
    bundle, _ = cache.get(request.model)
    latents = []
    hook = _shapes(bundle.unet, latents)
    try:
        result = run_task(request, tmp_path / "t.tif", models=cache)
    finally:
        hook.remove()
    assert latents[0][-2:] == (32, 32)  # 256 px, not the paired UNet's 512
    assert any("temporal tiles at 256 px" in w for w in result.warnings)
    # --resolution is honoured by the run and by the plan the same way
    forced = parse_request({**request.model_dump(mode="json"), "resolution": 128})
    assert plan(forced)["model_px"] == 128


def test_auto_picks_the_installed_controlnet_for_its_task(installed, tmp_path, cache, capsys):
    """--model auto (the default) on superres, temporal and in-painting with references is the
    installed ControlNet for that task, not the 512 model (which has none and was refused)."""
    src = write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif", s2_dn((13, 24, 24)))
    rng = np.random.default_rng(5)
    frames = [write(tmp_path / f"a_{y}-06-01.tif", (rng.random((3, 40, 40)) * 255).astype("uint8"))
              for y in (2019, 2020)]
    mask = write(tmp_path / "mask.tif", (rng.random((1, 40, 40)) > 0.7).astype("uint8"))
    for argv, px in ((["superres", "--input", src], 512),
                     (["temporal", "--input", frames[0], "--input", frames[1], "--date", "2021-06-01"], 256),
                     (["inpaint", "--input", frames[0], "--mask", mask, "--mask-rule", "nonzero",
                       "--reference", frames[1]], 256)):
        assert main([*argv, "--dry-run", "--json", "--out", str(tmp_path / "o.tif")]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["model_px"] == px
    request = parse_request({"task": "temporal", "inputs": frames, "date": "2021-06-01", "steps": 1, "seed": 2})
    assert request.model == "auto"
    result = run_task(request, tmp_path / "t.tif", models=cache)
    assert result.model == ZIP_FOLDERS["controlnet-texas"]
    assert any(f"the ControlNet {ZIP_FOLDERS['controlnet-texas']} runs with" in w for w in result.warnings)


def test_dry_run_prints_the_notes_and_model_of_the_run(installed, tmp_path, capsys):
    """--dry-run (and POST /v1/plan) said nothing of the model it planned for: not what auto
    picked, nor the pairing and tile-size notes the real run prints."""
    src = write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif", s2_dn((13, 24, 24)))
    assert main(["superres", "--input", src, "--dry-run", "--out", str(tmp_path / "o.tif")]) == 0
    captured = capsys.readouterr()
    assert f"model {ZIP_FOLDERS['controlnet-superres']}; nothing written" in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
    assert any("runs with" in n and "checkpoint-100000/unet" in n for n in notes), captured.err
    assert any("superres tiles at 512 px with 256 px conditioning" in n for n in notes), captured.err
    request = parse_request({"task": "generate", "bbox": [12.45, 41.88, 12.52, 41.93]})
    planned = plan(request)
    assert planned["model"] == ZIP_FOLDERS["diffusionsat-512"]
    assert any("using the installed model" in n for n in planned["notices"])


def test_old_scheduler_configs_are_normalised_with_a_notice():
    old_ddim = scheduler_from_config({**SD21_DDIM, "steps_offset": 0, "clip_sample": True})
    note = normalise_scheduler(old_ddim)
    assert old_ddim.config.steps_offset == 1 and old_ddim.config.clip_sample is False
    assert "steps_offset=0, clip_sample=True" in note and "steps_offset=1, clip_sample=False" in note
    old_ddim.set_timesteps(20)
    assert int(old_ddim.timesteps[-1]) == 1  # the offset is applied when sampling
    pndm = scheduler_from_config(OLD_PNDM)
    assert "steps_offset=0" in normalise_scheduler(pndm) and pndm.config.steps_offset == 1
    assert normalise_scheduler(scheduler_from_config(SD21_DDIM)) is None  # SD 2.1's own: left alone


def test_an_old_scheduler_in_a_release_folder_is_normalised_on_load(parts, tmp_path):
    root = write_release(parts, tmp_path, "diffusionsat-256")
    (root / "scheduler" / "scheduler_config.json").unlink()  # a hard link: replace, do not edit
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SD21_DDIM, "steps_offset": 0}))
    bundle = load_model(str(root))
    assert bundle.scheduler.config.steps_offset == 1
    assert any("normalised to steps_offset=1" in n for n in bundle.notices)


@pytest.mark.parametrize("which", ["controlnet-superres", "controlnet-texas"])
def test_a_bgr_controlnet_flips_its_conditioning(parts, which):
    from engine.models.loading import load_controlnet

    rgb = load_controlnet(parts / which).eval()
    bgr = load_controlnet(parts / which).eval()
    bgr.register_to_config(controlnet_conditioning_channel_order="bgr")
    with torch.no_grad():  # non-zero output convs, so that the conditioning reaches the residuals
        for model in (rgb, bgr):
            torch.manual_seed(0)
            model.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.05)
            for block in model.controlnet_down_blocks:
                block.weight.normal_(0, 0.05)
        g = torch.Generator().manual_seed(1)
        sample, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 1024, generator=g)
        # 2D: 10 bands at half the tile (conditioning_scale 2); 3D: 3 RGB frames at the tile size
        cond = torch.rand(1, 10, 32, 32, generator=g) if which == "controlnet-superres" else \
            torch.rand(1, 3, 2, 64, 64, generator=g)
        t = torch.tensor([500])
        got = bgr(sample, t, text, cond, return_dict=False)[0]
        same_as_flipped = rgb(sample, t, text, cond.flip(1), return_dict=False)[0]
        unflipped = rgb(sample, t, text, cond, return_dict=False)[0]
    for a, b in zip(got, same_as_flipped):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(got[0], unflipped[0], atol=1e-4)


def test_resolution_flag_on_a_conditional_command(tmp_path, capsys):
    src = write(tmp_path / "s2.tif", s2_dn((13, 100, 90)))
    argv = ["superres", "--input", src, "--factor", "4", "--date", "2021-06-15", "--model", "tiny", "--dry-run",
            "--json", "--out", str(tmp_path / "sr.tif")]
    assert main(argv) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*argv, "--resolution", "128"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert (default["model_px"], forced["model_px"]) == (256, 128)
    assert forced["tiles"] > default["tiles"]  # smaller tiles over the same 400 x 360 px output
