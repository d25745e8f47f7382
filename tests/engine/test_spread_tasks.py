"""--spread N for every task (super-resolution, in-painting, temporal, generate --gsd): the spread map
beside the output on its grid, the main output unchanged by --spread, the batch size without effect,
in-painting's kept pixels at spread 0, no orphan spread map; real GeoTIFFs, the tiny model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from engine.geo import cog
from engine.models.cache import ModelCache
from engine.tasks import parse_request, run_task, spread_path
from engine.tasks.checks import plan

from .test_batched_tiles import FAST, UTM, write


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.tags(), ds.profile, ds.transform, ds.crs, ds.descriptions


def superres_input(tmp_path):
    rng = np.random.default_rng(0)
    return {"task": "superres", "factor": 4,
            "input": write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif",
                           (rng.random((13, 16, 28)) * 2500 + 800).astype("uint16"))}  # 2 tiles of 16 px


def temporal_input(tmp_path):
    rng = np.random.default_rng(1)
    return {"task": "temporal", "date": "2022-07-01",
            "inputs": [write(tmp_path / f"rome_{y}-06-01.tif", (rng.random((3, 64, 64)) * 255).astype("uint8"))
                       for y in (2020, 2021)]}


def inpaint_input(tmp_path):
    rng = np.random.default_rng(2)
    image = (rng.random((3, 64, 176)) * 255).astype("uint8")  # 3 tiles of 64 px in a row
    m = np.zeros((64, 176), "uint8")
    m[10:30, 20:60] = 1  # the first tiles only: the last one has nothing to fill (copied, not sampled)
    return {"task": "inpaint", "dilate": 0, "input": write(tmp_path / "scene_2021-06-15.tif", image),
            "mask": write(tmp_path / "mask.tif", m[None])}, image, m.astype(bool)


def run(tmp_path, models, fields, name, **extra):
    result = run_task(parse_request({**FAST, **fields, **extra}), tmp_path / f"{name}.tif", models=models)
    return result


def check_spread_map(out, samples, seed=FAST["seed"]):
    """The spread map beside ``out``: the output's grid, float32, one band, finite, >= 0, tagged."""
    image, tags, profile, transform, crs, _ = read(out)
    spread, stags, sprofile, stransform, scrs, sdesc = read(spread_path(out))
    assert (sprofile["width"], sprofile["height"], stransform, scrs) == (profile["width"], profile["height"],
                                                                           transform, crs)
    assert sprofile["count"] == 1 and sprofile["dtype"] == "float32" and sdesc == ("spread",)
    assert np.isfinite(spread).all() and (spread >= 0).all()
    assert stags["spread_samples"] == str(samples) and stags["spread_seeds"] == f"{seed}..{seed + samples - 1}"
    assert tags["spread_file"] == spread_path(out).name
    return image, spread[0]


@pytest.mark.parametrize("task", ["superres", "temporal"])
def test_controlnet_tasks_spread_map_and_unchanged_output(tmp_path, models, task):
    fields = superres_input(tmp_path) if task == "superres" else temporal_input(tmp_path)
    plain = run(tmp_path, models, fields, "plain")
    assert not spread_path(plain.path).exists()
    spread_runs = {size: run(tmp_path, models, fields, f"spread{size}", spread=2, batch_size=size) for size in (1, 3)}
    spreads = {}
    for size, result in spread_runs.items():
        image, spreads[size] = check_spread_map(result.path, 2)
        # sample 0 is the output without --spread, bit for bit
        assert np.array_equal(image, read(plain.path)[0]), f"--spread changed the output (batch {size})"
    assert np.array_equal(spreads[1], spreads[3]), "the spread map depends on --batch-size"
    assert (spreads[1] > 0).mean() > 0.9  # generated everywhere: the seeds disagree almost everywhere
    assert spreads[1].max() < 1.0


def test_inpaint_spread_is_zero_where_pixels_are_kept(tmp_path, models):
    fields, image, m = inpaint_input(tmp_path)
    plain = run(tmp_path, models, fields, "plain")
    spreads = {}
    for size in (1, 3):
        result = run(tmp_path, models, fields, f"spread{size}", spread=2, batch_size=size)
        out, spreads[size] = check_spread_map(result.path, 2)
        assert np.array_equal(out, read(plain.path)[0])
        assert np.array_equal(out[:, ~m], image[:, ~m])
    assert np.array_equal(spreads[1], spreads[3])
    spread = spreads[1]
    assert (spread[~m] == 0).all()  # exactly 0 on every kept pixel (the last tile is copied, not sampled)
    assert (spread[m] > 0).mean() > 0.9  # measured in the filled pixels


def test_a_failing_write_leaves_no_spread_map(tmp_path, models, monkeypatch):
    fields = superres_input(tmp_path)
    out = tmp_path / "fails.tif"
    finish = cog.CogWriter._finish

    def fail_for_the_output(writer):
        if writer.dest == out:
            raise OSError("the disk went away")
        return finish(writer)

    monkeypatch.setattr(cog.CogWriter, "_finish", fail_for_the_output)
    with pytest.raises(Exception, match="disk went away"):
        run_task(parse_request({**FAST, **fields, "spread": 2}), out, models=models)
    assert not out.exists() and not spread_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tif") == [
        "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif"]


def test_plan_counts_the_samples(tmp_path):
    fields = superres_input(tmp_path)
    one = plan(parse_request({**FAST, **fields}))
    four = plan(parse_request({**FAST, **fields, "spread": 4}))
    assert four["unet_evaluations"] == 4 * one["unet_evaluations"]
    assert four["work_mpx"] == pytest.approx(4 * one["work_mpx"])
    assert four["mpx_per_step"] == one["mpx_per_step"] and four["spread_samples"] == 4


# 448 x 448 px at 2 m: a canvas of 56 x 56 latent cells, 2 x 2 windows of 32 cells overlapping by 8
JOINT_BBOX = (288500.0, 4639300.0, 288500.0 + 896.0, 4639300.0 + 896.0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])  # the canvas in files; in RAM (a multistep sampler)
def test_generate_gsd_spread_over_windows(tmp_path, models, scheduler):
    joint = {"task": "generate", "model": "tiny", "bbox": JOINT_BBOX, "crs": UTM, "gsd": 2.0, "steps": 1, "seed": 7,
             "guidance": 1.0, "scheduler": scheduler, "batch_size": 2}
    plain = run_task(parse_request(joint), tmp_path / "plain.tif", models=models)
    seen = []
    result = run_task(parse_request({**joint, "spread": 2}), tmp_path / "spread.tif", models=models,
                      progress=seen.append)
    image, spread = check_spread_map(result.path, 2, seed=7)
    assert image.shape == (3, 448, 448)
    assert np.array_equal(image, read(plain.path)[0]), "sample 0 is not the output without --spread"
    assert (spread > 0).mean() > 0.9 and spread.max() < 1.0
    assert result.denoise_steps == 2 * plain.denoise_steps  # 2 samples x 4 windows x 1 step
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch left behind


def test_plan_of_generate_gsd_spread_counts_the_samples():
    joint = {"task": "generate", "model": "tiny", "bbox": JOINT_BBOX, "crs": UTM, "gsd": 2.0, "steps": 2}
    one, three = plan(parse_request(joint)), plan(parse_request({**joint, "spread": 3}))
    assert three["unet_evaluations"] == 3 * one["unet_evaluations"] == 3 * 4 * 2 * 2  # windows x steps x cfg
    assert three["work_mpx"] == pytest.approx(3 * one["work_mpx"]) and three["windows"] == 4


def test_split_run_with_spread_equals_one_process(tmp_path, models):
    """Two ranks (as accelerate launch runs them) write the same output and spread map as one process."""
    import json
    import os
    import subprocess
    import sys

    request = {**FAST, **superres_input(tmp_path), "spread": 2}
    single = run_task(parse_request(request), tmp_path / "single.tif", models=models)
    split_out = tmp_path / "split.tif"
    code = ("import json,sys; from engine.tasks import parse_request, run_task; "
            "from engine.parallel import RunContext; "
            f"r = run_task(parse_request(json.loads(sys.argv[1])), {str(split_out)!r}, "
            "context=RunContext.from_env('cpu')); print('REPORTS', r is not None)")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(request)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    image, spread = check_spread_map(split_out, 2)
    one_image, one_spread = check_spread_map(single.path, 2)
    assert np.array_equal(image, one_image) and np.array_equal(spread, one_spread)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch cleaned up


def test_generate_gsd_spread_failing_output_leaves_no_spread_map(tmp_path, models, monkeypatch):
    out = tmp_path / "fails.tif"
    finish = cog.CogWriter._finish
    published = []

    def fail_for_the_output(writer):
        if writer.dest == out:
            raise OSError("the disk went away")
        published.append(writer.dest)
        return finish(writer)

    monkeypatch.setattr(cog.CogWriter, "_finish", fail_for_the_output)
    joint = {"task": "generate", "model": "tiny", "bbox": JOINT_BBOX, "crs": UTM, "gsd": 2.0, "steps": 1, "seed": 7,
             "guidance": 1.0, "scheduler": "ddim", "spread": 2}
    with pytest.raises(Exception, match="disk went away"):
        run_task(parse_request(joint), out, models=models)
    assert published == [spread_path(out)]  # the map was written first, then removed with the failed output
    assert list(tmp_path.iterdir()) == []


def test_plain_generate_spread_counts_its_denoising_steps(tmp_path, models):
    """generate --spread (one window) reports "sample i/N: denoising"; the step meter counted none
    (denoise_steps 0: the plugin learned no rate from such jobs). Now samples x steps."""
    fields = {"task": "generate", "bbox": [288500.0, 4639300.0, 288628.0, 4639428.0], "crs": UTM, "width": 64,
              "height": 64, "guidance": 1.0}
    plain = run(tmp_path, models, fields, "plain")
    spread = run(tmp_path, models, fields, "spread", spread=3)
    assert plain.denoise_steps == FAST["steps"] and spread.denoise_steps == 3 * FAST["steps"]
    assert spread.denoise_seconds > 0
