"""--spread N for every task (super-resolution, in-painting, temporal, generate --gsd): the spread map
beside the output on its grid, the main output unchanged by --spread, the batch size without effect,
in-painting's kept pixels at spread 0, no orphan spread map; real GeoTIFFs, the tiny model (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.geo import cog
from engine.models.cache import ModelCache
from engine.tasks import parse_request, run_task, spread_path
from engine.tasks.checks import plan

UTM = "EPSG:32633"
#: 64 px tiles (the smallest the model takes), 2 steps: seconds per run
FAST = {"model": "tiny", "steps": 2, "seed": 5, "resolution": 64}


@pytest.fixture(scope="module")
def models():
    return ModelCache()


def write(path, array, res=10.0):
    array = np.asarray(array)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=str(array.dtype), crs=UTM, transform=from_origin(300000.0, 4650000.0, res, res)) as ds:
        ds.write(array)
    return str(path)


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.tags(), ds.profile, ds.transform, ds.crs, ds.descriptions


def superres_input(tmp_path):
    rng = np.random.default_rng(0)
    return {"task": "superres", "factor": 4,
            "input": write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif",
                           (rng.random((13, 30, 44)) * 2500 + 800).astype("uint16"))}  # 3 x 2 tiles of 16 px


def temporal_input(tmp_path):
    rng = np.random.default_rng(1)
    return {"task": "temporal", "date": "2022-07-01",
            "inputs": [write(tmp_path / f"rome_{y}-06-01.tif", (rng.random((3, 64, 120)) * 255).astype("uint8"))
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
    spread_runs = {size: run(tmp_path, models, fields, f"spread{size}", spread=3, batch_size=size) for size in (1, 2)}
    spreads = {}
    for size, result in spread_runs.items():
        image, spreads[size] = check_spread_map(result.path, 3)
        # sample 0 is the output without --spread, bit for bit
        assert np.array_equal(image, read(plain.path)[0]), f"--spread changed the output (batch {size})"
    assert np.array_equal(spreads[1], spreads[2]), "the spread map depends on --batch-size"
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
