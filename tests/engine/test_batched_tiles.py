"""Batched tiles (--batch-size): several tiles (generate: samples) per pipeline call give exactly the
pixels of one at a time, on real GeoTIFFs with the tiny model (CPU); and fewer pipeline calls."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from engine import batching
from engine.errors import DeviceError
from engine.geo.tiles import plan_tiles, tile_progress
from engine.models.cache import ModelCache
from engine.pipelines.base import DiffusionSatBasePipeline
from engine.pipelines.rows import randn_rows
from engine.progress import Progress
from engine.tasks import parse_request, run_task
from engine.tasks.run import _DenoiseMeter
from engine.tasks.sampling import Batches

UTM = "EPSG:32633"
#: 64 px tiles (the smallest the model takes) keep these runs to seconds; guidance is on (its rows doubled)
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


def pixels(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.tags()


class CountCalls:
    """Counts the calls of a pipeline's ``generate`` (the one loop every pipeline call runs)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = DiffusionSatBasePipeline.generate

        def counted(pipe, prompt, *args, **kwargs):
            self.calls.append(1 if isinstance(prompt, str) else len(prompt))
            return original(pipe, prompt, *args, **kwargs)

        monkeypatch.setattr(DiffusionSatBasePipeline, "generate", counted)


def run_sizes(tmp_path, models, monkeypatch, sizes, **fields):
    """Run the request at each batch size: {size: (pixels, tags, calls, result)}."""
    out = {}
    for size in sizes:
        counter = CountCalls(monkeypatch)
        result = run_task(parse_request({**FAST, **fields, "batch_size": size}), tmp_path / f"b{size}.tif",
                          models=models)
        data, tags = pixels(result.path)
        out[size] = (data, tags, counter.calls, result)
        monkeypatch.undo()
    return out


def assert_same_pixels(runs):
    first = next(iter(runs.values()))
    for size, (data, tags, calls, result) in runs.items():
        assert np.array_equal(data, first[0]), f"--batch-size {size} changed pixels"
        assert tags["batch_size"] == str(size) and tags["batch_size_rule"].startswith("given")
        assert result.denoise_steps == first[3].denoise_steps  # steps x tiles whatever the batch


# ------------------------------------------------------------------------------------------------
# the tasks: --batch-size 1 and 2/3 give identical pixels


def test_superres_batches_equal_one_tile_at_a_time(tmp_path, models, monkeypatch):
    rng = np.random.default_rng(0)
    src = write(tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif",
                (rng.random((13, 30, 44)) * 2500 + 800).astype("uint16"))  # 3 x 2 tiles of 16 px
    # ddpm draws noise at every step: from each tile's own generator; the last batch is smaller (4 + 2)
    runs = run_sizes(tmp_path, models, monkeypatch, (1, 4), task="superres", input=src, factor=4, scheduler="ddpm")
    assert_same_pixels(runs)
    assert runs[1][2] == [1] * 6 and runs[4][2] == [4, 2]  # fewer pipeline calls, up to 4 tiles each
    assert runs[1][3].denoise_steps == 6 * 2


def test_temporal_batches_equal_one_tile_at_a_time(tmp_path, models, monkeypatch):
    rng = np.random.default_rng(1)
    dated = [write(tmp_path / f"rome_{y}-06-01.tif", (rng.random((3, 64, 176)) * 255).astype("uint8"))
             for y in (2019, 2020, 2021)]
    runs = run_sizes(tmp_path, models, monkeypatch, (1, 2), task="temporal", inputs=dated, date="2022-07-01")
    assert_same_pixels(runs)
    assert len(runs[2][2]) < len(runs[1][2])


@pytest.fixture()
def scene(tmp_path):
    rng = np.random.default_rng(2)
    image = (rng.random((3, 64, 176)) * 255).astype("uint8")  # 3 tiles of 64 px in a row
    mask = np.zeros((64, 176), "uint8")
    mask[::9, :] = 1  # every tile has something to fill
    return (write(tmp_path / "scene_2021-06-15.tif", image), write(tmp_path / "mask.tif", mask[None]), image)


def test_inpaint_with_a_reference_batches_equal_one_tile_at_a_time(tmp_path, models, monkeypatch, scene):
    src, mask, image = scene
    ref = write(tmp_path / "clear_2021-05-01.tif", np.roll(image, 3, axis=2))
    runs = run_sizes(tmp_path, models, monkeypatch, (1, 3), task="inpaint", input=src, mask=mask,
                     references=[ref], dilate=2)
    assert_same_pixels(runs)
    assert len(runs[3][2]) < len(runs[1][2])


def test_inpaint_resampling_batches_equal_one_tile_at_a_time(tmp_path, models, monkeypatch, scene):
    src, mask, _ = scene
    # RePaint's resampling re-noises at every step: from each tile's own generator
    runs = run_sizes(tmp_path, models, monkeypatch, (1, 2), task="inpaint", input=src, mask=mask, dilate=0,
                     resample=1, scheduler="ddim")
    assert_same_pixels(runs)
    assert len(runs[2][2]) < len(runs[1][2])


def test_inpaint_tiles_without_mask_skip_the_model_in_a_batch(tmp_path, models, monkeypatch, scene):
    src, _, image = scene
    m = np.zeros((64, 176), "uint8")
    m[5:10, 5:10] = 1  # the top-left tiles only
    mask = write(tmp_path / "corner.tif", m[None])
    runs = run_sizes(tmp_path, models, monkeypatch, (1, 4), task="inpaint", input=src, mask=mask, dilate=0)
    assert_same_pixels(runs)
    assert runs[4][2] == runs[1][2] == [1]  # of 3 tiles, only the one with masked pixels reaches the model
    assert np.array_equal(runs[4][0][:, m == 0], image[:, m == 0])


def test_generate_spread_batches_equal_one_sample_at_a_time(tmp_path, models, monkeypatch):
    rome = {"task": "generate", "bbox": (12.45, 41.88, 12.52, 41.93), "crs": "EPSG:4326", "date": "2021-06-15",
            "model": "tiny", "steps": 2, "size": 64, "seed": 1}
    got, seen = {}, []
    for size in (1, 2, 3):
        counter = CountCalls(monkeypatch)
        result = run_task(parse_request({**rome, "spread": 3, "batch_size": size}), tmp_path / f"s{size}.tif",
                          models=models, progress=seen.append if size == 2 else None)
        monkeypatch.undo()
        with rasterio.open(result.path) as a, rasterio.open(tmp_path / f"s{size}.spread.tif") as s:
            got[size] = (a.read(), s.read(), a.tags(), counter.calls)
    single = run_task(parse_request(rome), tmp_path / "one.tif", models=models)
    one, _ = pixels(single.path)
    for size, (image, spread, tags, calls) in got.items():
        assert np.array_equal(image, one), f"sample 0 at --batch-size {size} is not the single-seed image"
        assert np.array_equal(spread, got[1][1]), f"the spread map changed at --batch-size {size}"
        assert tags["batch_size"] == str(size)
        assert len(calls) == -(-3 // size)  # ceil(3 samples / batch) pipeline calls
    assert 0 < got[1][1].mean()
    fractions = [p.fraction for p in seen]  # per sample, in order, through the batches of 2 + 1
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [p.message for p in seen if p.step == 2] == [f"sample {i}/3: denoising" for i in (1, 2, 3)]


# ------------------------------------------------------------------------------------------------
# the pieces


def test_randn_rows_draws_each_row_as_a_batch_of_one():
    rows = randn_rows((3, 4, 2, 2), [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    for i, s in enumerate((7, 8, 9)):
        assert torch.equal(rows[i : i + 1], torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(s)))
    one = randn_rows((2, 4, 2, 2), torch.Generator().manual_seed(7))
    assert torch.equal(one, torch.randn((2, 4, 2, 2), generator=torch.Generator().manual_seed(7)))


def test_tile_progress_of_a_batch_counts_steps_times_tiles_in_order():
    tiles = plan_tiles(200, 60, 64, 8, 1)[:3]
    seen = []
    meter = _DenoiseMeter(seen.append)
    cb = tile_progress(meter, tiles, 10)
    for step in range(0, 5):
        cb(Progress(step, 4, message="denoising"))
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx((tiles[-1].index + 1) / 10)
    assert meter.steps == 3 * 4  # 4 steps of a batch of 3 tiles
    assert [p.tile for p in seen[1:]] == [tiles[0].index] * 4 + [tiles[1].index] * 4 + [tiles[2].index] * 4
    single = []
    tile_progress(single.append, tiles[1], 10)(Progress(2, 4, message="denoising"))
    assert single == [Progress(2, 4, tiles[1].index, 10, "denoising")]


def test_automatic_batch_size_from_free_memory():
    sd21 = dict(unet_channels=(320, 640, 1280, 1280), vae_channels=(128, 256, 512, 512), model_px=512,
                dtype="fp16", guidance=True, controlnet=True)
    per_tile = batching.tile_bytes(**{k: v for k, v in sd21.items()})
    assert batching.choose(None, "cpu", **sd21) == batching.BatchChoice(1, auto=True)
    assert batching.choose(3, "cpu", **sd21).size == 3 and not batching.choose(3, "cpu", **sd21).auto
    free = int(batching.RESERVE_BYTES + 5 * per_tile / batching.MEMORY_SHARE) + 1
    assert batching.choose(None, "cuda:0", free_bytes=free, **sd21).size == 5
    assert batching.choose(None, "cuda:0", free_bytes=10**15, **sd21).size == batching.CAP
    assert batching.choose(None, "cuda:0", free_bytes=batching.RESERVE_BYTES, **sd21).size == 1
    # guidance doubles the UNet's rows; a ControlNet and fp32 need more; a larger tile much more
    assert batching.tile_bytes(**{**sd21, "guidance": False}) < per_tile
    assert batching.tile_bytes(**{**sd21, "dtype": "fp32"}) > per_tile
    assert batching.tile_bytes(**{**sd21, "model_px": 1024}) > 3 * per_tile
    assert batching.choose(None, "cuda:0", free_bytes=free, **sd21).tags()["batch_size_rule"] == batching.RULE


class OutOfMemoryError(RuntimeError):
    """What torch raises when CUDA runs out of memory (matched by name, as engine.cli does)."""


def test_out_of_memory_halves_an_automatic_batch_and_refuses_a_given_one():
    seen = []

    def fn(items):  # a model that fits at most 2 items per call
        seen.append(len(items))
        if len(items) > 2:
            raise OutOfMemoryError("CUDA out of memory")
        return [i * 10 for i in items]

    notices = []
    auto = Batches(batching.BatchChoice(8, auto=True), notices)
    assert auto(fn, range(7)) == [i * 10 for i in range(7)]
    assert seen == [7, 3, 1, 1, 1, 1, 1, 1, 1] and auto.size == 1  # 7 -> 3 -> 1 (halved, rounded down)
    assert len(notices) == 2 and "retried at 3" in notices[0] and "retried at 1" in notices[1]
    seen.clear()
    assert Batches(batching.BatchChoice(8, auto=True), [])(fn, range(8)) == [i * 10 for i in range(8)]
    assert seen == [8, 4, 2, 2, 2, 2]
    given = Batches(batching.BatchChoice(4, auto=False), [])
    with pytest.raises(DeviceError, match="--batch-size 4"):
        given(fn, range(4))
    with pytest.raises(ValueError):  # anything else is not retried
        Batches(batching.BatchChoice(4, auto=True), [])(lambda items: int("x"), range(3))


def test_batch_size_help_states_the_default_rule():
    from engine.tasks.requests import SuperresRequest

    help_text = SuperresRequest.model_fields["batch_size"].description
    assert "1 on the CPU" in help_text and "free" in help_text and "16" in help_text
