"""generate --gsd: the grid at a ground resolution, the joint-denoising layout, its plan, the noise
canvas, and runs with the real tiny model (batch invariance; one window = the ordinary generate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio

from engine.errors import InvalidRequest
from engine.metadata import derive_from_bbox, ground_pixel_size
from engine.tasks import MAX_PIXELS, GenerateRequest, parse_request
from engine.tasks.checks import plan
from engine.tasks.extent import extent_grid, extent_layout, window_metadata
from engine.tasks.extent.grid import EXTENT_MAX_PIXELS, windows_metadata

UTM = "EPSG:32633"
ROME_UTM = (288500.0, 4639300.0, 294300.0, 4644900.0)


# ---- the grid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bbox,crs,gsd", [(ROME_UTM, UTM, 2.0), ((12.45, 41.88, 12.52, 41.93), "EPSG:4326", 1.0),
                                          ((1380000, 5140000, 1400000, 5160000), "EPSG:3857", 10.0)])
def test_grid_covers_the_bbox_at_the_gsd_centred_multiple_of_8(bbox, crs, gsd):
    grid_bbox, width, height = extent_grid(bbox, crs, gsd)
    assert width % 8 == 0 and height % 8 == 0
    gx, gy = ground_pixel_size(grid_bbox, crs, width, height)
    assert gx == pytest.approx(gsd, rel=1e-6) and gy == pytest.approx(gsd, rel=1e-6)  # square, at the gsd
    # covers the bbox, grown by less than 8 px per axis, evenly on both sides
    assert grid_bbox[0] <= bbox[0] and grid_bbox[1] <= bbox[1] and grid_bbox[2] >= bbox[2] and grid_bbox[3] >= bbox[3]
    px_x = (grid_bbox[2] - grid_bbox[0]) / width
    px_y = (grid_bbox[3] - grid_bbox[1]) / height
    assert (bbox[0] - grid_bbox[0]) == pytest.approx(grid_bbox[2] - bbox[2])
    assert 0 <= (bbox[0] - grid_bbox[0]) / px_x < 4 and 0 <= (bbox[1] - grid_bbox[1]) / px_y < 4


def test_degrees_are_converted_at_the_bbox_latitude():
    # the same 0.01 x 0.01 degree box: at 60 N a degree of longitude is half as long as at the equator
    _, w0, h0 = extent_grid((10.0, 0.0, 10.01, 0.01), "EPSG:4326", 1.0)
    _, w60, h60 = extent_grid((10.0, 60.0, 10.01, 60.01), "EPSG:4326", 1.0)
    assert w0 == 8 * math.ceil(1113.19 / 8 - 1e-6)  # 1113 m of longitude at the equator -> 1120 px
    assert abs(w60 / w0 - 0.5) < 0.01 and abs(h60 / h0 - 1.0) < 0.01


def test_an_exact_multiple_is_not_grown():
    # 2048 m of UTM easting at ~the central meridian scale: the ground width is measured, so build the
    # bbox from the measured metres per CRS unit
    gx, _ = ground_pixel_size(ROME_UTM, UTM, 1, 1)
    scale = gx / (ROME_UTM[2] - ROME_UTM[0])  # ground metres per CRS unit along x
    bbox = (ROME_UTM[0], ROME_UTM[1], ROME_UTM[0] + 2048 / scale, ROME_UTM[1] + 1000)
    _, width, _ = extent_grid(bbox, UTM, 1.0)
    assert width == 2048


# ---- the request -------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"size": 512}, {"width": 256}, {"width": 256, "height": 256}])
def test_gsd_excludes_size_width_height(extra):
    with pytest.raises(InvalidRequest, match="either --gsd or"):
        parse_request({"task": "generate", "bbox": ROME_UTM, "crs": UTM, "gsd": 2.0, **extra})


def test_a_large_extent_is_not_refused_as_one_image_but_has_its_own_limit():
    # 8 x 6 km at 1 m: 5808 x 5608 px, over one generated image's MAX_PIXELS, accepted as an extent
    request = parse_request({"task": "generate", "bbox": ROME_UTM, "crs": UTM, "gsd": 1.0})
    _, w, h = extent_grid(ROME_UTM, UTM, 1.0)
    assert w * h > MAX_PIXELS and request.gsd == 1.0
    with pytest.raises(InvalidRequest, match="for one generated image"):  # the same size as one image is refused
        parse_request({"task": "generate", "bbox": ROME_UTM, "crs": UTM, "width": w, "height": h})
    with pytest.raises(InvalidRequest, match="over the limit"):
        parse_request({"task": "generate", "bbox": (0, 0, 10, 10), "gsd": 1.0})
    assert EXTENT_MAX_PIXELS >= 16384 * 16384
    with pytest.raises(InvalidRequest, match="gsd"):
        parse_request({"task": "generate", "bbox": ROME_UTM, "crs": UTM, "gsd": 0})


# ---- the layout, the metadata and the plan ----------------------------------------------------


def test_layout_windows_cover_the_canvas_with_overlap():
    layout = extent_layout(ROME_UTM, UTM, 4.0, 256)  # 1452 x 1400 px: 182 x 175 latent cells
    assert (layout.canvas_w, layout.canvas_h) == (layout.width // 8, layout.height // 8)
    covered = np.zeros((layout.canvas_h, layout.canvas_w), int)
    for w in layout.windows:
        assert (w.window.width, w.window.height) == (32, 32)  # the model's native latent size
        covered[int(w.window.row_off):int(w.window.row_off) + 32, int(w.window.col_off):int(w.window.col_off) + 32] += 1
    assert covered.min() >= 1
    assert layout.overlap == 8  # a quarter of a window
    # a narrow output: the canvas grows to one window, the output stays as asked
    narrow = extent_layout((288500, 4639300, 289500, 4639400), UTM, 2.0, 256)
    assert narrow.canvas_h == 32 and narrow.height < 256 and narrow.width > 256


def test_every_window_is_conditioned_on_its_own_centre():
    layout = extent_layout((12.3, 41.8, 12.6, 42.0), "EPSG:4326", 10.0, 256)
    fast = windows_metadata(layout, None, 0.1)
    assert len(fast) == len(layout.windows) > 20
    for i in (0, len(fast) // 2, len(fast) - 1):
        slow = window_metadata(layout, layout.windows[i], None, 0.1)
        assert fast[i].lon_deg == pytest.approx(slow.lon_deg, abs=1e-6)
        assert fast[i].lat_deg == pytest.approx(slow.lat_deg, abs=1e-6)
        assert fast[i].gsd_m == pytest.approx(slow.gsd_m, rel=1e-6)
        assert fast[i].cloud_cover == 0.1
    lons = {round(m.lon_deg, 6) for m in fast}
    lats = {round(m.lat_deg, 6) for m in fast}
    assert len(lons) > 3 and len(lats) > 3
    whole = derive_from_bbox(layout.bbox, "EPSG:4326", layout.width, layout.height)
    assert min(m.lon_deg for m in fast) < whole.lon_deg < max(m.lon_deg for m in fast)


def test_plan_shows_the_grid_windows_and_evaluations():
    p = plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=4.0, steps=5))
    layout = extent_layout(ROME_UTM, UTM, 4.0, 256)
    assert (p["width"], p["height"]) == (layout.width, layout.height)
    assert p["windows"] == p["tiles"] == len(layout.windows)
    assert p["unet_evaluations"] == len(layout.windows) * 5 * 2  # windows x steps x guidance
    assert p["gsd_m"] == pytest.approx(4.0, rel=1e-6) and p["joint_denoising"] is True
    assert p["mpx_per_step"] == pytest.approx(256 * 256 * 2 / 1e6)
    assert p["bbox"] == pytest.approx(list(layout.bbox))
    small = plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=40.0, guidance=1.0))
    assert small["tiles"] == 1 and "windows" not in small and small["unet_evaluations"] == 20


def test_plan_takes_spread_over_windows():  # it was refused before --spread ran over windows
    p = plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=4.0, spread=2))
    assert p["unet_evaluations"] == p["windows"] * 20 * 2 * 2  # windows x steps x guidance x samples


# ---- the noise --------------------------------------------------------------------------------


def test_noise_depends_on_the_seed_and_position_only():
    from engine.tasks.extent.joint import NOISE_BLOCK, canvas_noise

    whole = canvas_noise(5, 150, 140)
    assert whole.shape == (1, 4, 150, 140)
    # a smaller canvas is the top-left of a larger one; a chunk of rows is those rows
    assert np.array_equal(canvas_noise(5, 70, 90).numpy(), whole[..., :70, :90].numpy())
    assert np.array_equal(canvas_noise(5, 150, 140, rows=slice(37, 101)).numpy(), whole[..., 37:101, :].numpy())
    assert not np.array_equal(canvas_noise(6, 70, 90).numpy(), whole[..., :70, :90].numpy())
    a, b = whole[..., :NOISE_BLOCK, :NOISE_BLOCK], whole[..., :NOISE_BLOCK, NOISE_BLOCK:2 * NOISE_BLOCK]
    assert not np.allclose(a.numpy(), b[..., : a.shape[-1]].numpy())  # blocks differ
    assert abs(float(whole.mean())) < 0.02 and abs(float(whole.std()) - 1) < 0.02


# ---- runs with the real tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    from engine.models.cache import ModelCache

    return ModelCache()


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.tags(), ds.transform, ds.width, ds.height


# 448 x 448 px at 2 m: a canvas of 56 x 56 latent cells, 2 x 2 windows of 32 cells overlapping by 8
JOINT_BBOX = (288500.0, 4639300.0, 288500.0 + 896.0, 4639300.0 + 896.0)


def test_joint_run_writes_the_grid_and_batch_does_not_change_it(tmp_path, models):

    from engine.tasks import run_task

    outs = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}.tif"
        request = GenerateRequest(model="tiny", bbox=JOINT_BBOX, crs=UTM, gsd=2.0, steps=2, seed=11, batch_size=batch,
                                  guidance=1.0)
        result = run_task(request, out, models=models)
        outs.append(_read(out))
    # the measured denoising steps are window steps (4 windows x 2 steps), as the plan's work counts them
    assert result.denoise_steps == 8 and result.denoise_seconds > 0
    (a, tags, transform, width, height), (b, *_) = outs
    # the same image: the UNet's batched convolutions differ from single ones only in the last float
    # bits, which move a pixel across a rounding boundary here and there (measured: max 1, 0.02 %)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    layout = extent_layout(JOINT_BBOX, UTM, 2.0, 256)
    assert (width, height) == (layout.width, layout.height) == (result.width, result.height)
    assert len(layout.windows) == 4 and tags["windows"] == "4"
    assert transform.a == pytest.approx((layout.bbox[2] - layout.bbox[0]) / width)
    assert tags["gsd"] == "2.0" and "each window was conditioned on its own centre" in tags["metadata_note"]
    assert tags["synthetic"] == "true" and tags["seed"] == "11"
    assert tags["batch_size"] == "1" and tags["batch_size_rule"] == "given (--batch-size)"  # as every tiled task
    assert a.std() > 5  # an image, not a constant


def test_at_or_below_the_window_it_is_the_ordinary_generate(tmp_path, models):
    from engine.tasks.generate import generate

    bbox = (288500.0, 4639300.0, 289500.0, 4640000.0)  # 1000 x 700 m at 5 m: 200 x 144 px, one window
    via_gsd = generate(GenerateRequest(model="tiny", bbox=bbox, crs=UTM, gsd=5.0, steps=2, seed=4),
                       tmp_path / "gsd.tif", models=models)
    grid_bbox, w, h = extent_grid(bbox, UTM, 5.0)
    assert (via_gsd.width, via_gsd.height) == (w, h) and w <= 256 and h <= 256
    via_size = generate(GenerateRequest(model="tiny", bbox=grid_bbox, crs=UTM, width=w, height=h, steps=2, seed=4),
                        tmp_path / "size.tif", models=models)
    a, b = _read(tmp_path / "gsd.tif"), _read(tmp_path / "size.tif")
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]
    assert via_gsd.metadata == via_size.metadata


def test_cancel_leaves_nothing(tmp_path, models):
    from engine.errors import Cancelled
    from engine.progress import CancelToken
    from engine.tasks.generate import generate

    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p)
        if p.message == "denoising" and p.step >= 2:
            token.cancel()

    with pytest.raises(Cancelled):
        generate(GenerateRequest(model="tiny", bbox=JOINT_BBOX, crs=UTM, gsd=2.0, steps=2, seed=1, batch_size=1,
                                 guidance=1.0), tmp_path / "c.tif", models=models, progress=progress, cancel=token)
    assert not (tmp_path / "c.tif").exists() and [p.name for p in tmp_path.iterdir()] == []
    assert seen[-1].step == 2 and seen[-1].total_steps == 4  # stopped within the window batches of step 1


def test_a_multistep_scheduler_keeps_the_canvas_in_ram(tmp_path, models):
    """DPM++ keeps canvas-sized state between steps: the in-RAM canvas (not the band-by-band files)."""
    from engine.tasks.extent.canvas import streams
    from engine.tasks.generate import generate

    request = GenerateRequest(model="tiny", bbox=JOINT_BBOX, crs=UTM, gsd=2.0, steps=2, seed=11, guidance=1.0,
                              scheduler="dpm++")
    generate(request, tmp_path / "dpm.tif", models=models)
    image = _read(tmp_path / "dpm.tif")[0]
    assert image.shape == (3, 448, 448) and image.std() > 5
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert streams(DDIMScheduler()) and not streams(DPMSolverMultistepScheduler())
    assert [p.name for p in tmp_path.iterdir()] == ["dpm.tif"]


def test_the_default_sampler_keeps_large_canvases_on_disk(tmp_path, models, monkeypatch):
    """``auto`` is DPM-Solver++, whose canvas-sized state lives in RAM; above a size the extent is
    sampled with DDIM instead, stepped band by band from files, and the output says so."""
    from engine.tasks.extent import joint
    from engine.tasks.generate import generate

    request = GenerateRequest(model="tiny", bbox=JOINT_BBOX, crs=UTM, gsd=2.0, steps=2, seed=11, guidance=1.0)
    assert request.scheduler == "auto"
    small = generate(request, tmp_path / "small.tif", models=models)
    assert _read(tmp_path / "small.tif")[1]["scheduler"] == "dpm++"
    assert not any("DDIM" in w for w in small.warnings)
    monkeypatch.setattr(joint, "AUTO_IN_RAM_LATENTS", 1)  # every canvas counts as large
    large = generate(request, tmp_path / "large.tif", models=models)
    assert _read(tmp_path / "large.tif")[1]["scheduler"] == "ddim"
    assert any("sampled with DDIM" in w and "--scheduler dpm++" in w for w in large.warnings)


def test_progress_never_goes_back_when_decoding_starts(tmp_path, models):
    """The decode after the joint steps is the job's last part: its fraction continues from the
    steps' (it restarted at 0, so the CLI's ETA jumped to hours and the plugin's bar went back),
    and the CLI's line names it (``decoding k/N``, not a step)."""
    import io

    from engine.progress import ProgressLines
    from engine.tasks.generate import generate

    seen = []
    generate(GenerateRequest(model="tiny", bbox=JOINT_BBOX, crs=UTM, gsd=2.0, steps=2, seed=3, guidance=1.0),
             tmp_path / "p.tif", models=models, progress=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {p.message for p in seen} >= {"denoising", "decoding"}
    decoding = [p for p in seen if p.message == "decoding"]
    assert decoding[0].fraction >= max(p.fraction for p in seen if p.message == "denoising")
    window_step = next(p for p in seen if p.message == "denoising" and p.tile == 1 and p.step == 3)
    stream = io.StringIO()
    ProgressLines(stream, label="generate", interval=0)(window_step)  # step 2 of 2, its third window of 4
    assert "step 2/2, window 3/4" in stream.getvalue() and "tile" not in stream.getvalue()
    stream = io.StringIO()
    ProgressLines(stream, label="generate", interval=0)(decoding[1])
    assert f"decoding {decoding[1].step}/{decoding[1].total_steps}" in stream.getvalue()
    assert "tile" not in stream.getvalue()
    tags = _read(tmp_path / "p.tif")[1]
    assert tags["batch_size"] == "4" and "default" in tags["batch_size_rule"]


def test_dry_run_shows_the_note_when_the_default_sampler_becomes_ddim(monkeypatch):
    """``--dry-run`` shows "the notes the run will print": above 8192² px that includes the switch
    of ``auto`` to DDIM (the plan's notices were empty while the run warned)."""
    from engine.tasks.extent import grid

    large = plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=0.5, steps=2))
    assert large["width"] * large["height"] > 8192 ** 2
    assert any("sampled with DDIM" in n and "--scheduler dpm++" in n for n in large["notices"])
    assert not any("DDIM" in n for n in plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=0.5,
                                                               scheduler="dpm++"))["notices"])
    assert not any("DDIM" in n for n in plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=4.0))["notices"])
    monkeypatch.setattr(grid, "AUTO_IN_RAM_LATENTS", 1)  # the plan follows the same rule as the run
    assert any("DDIM" in n for n in plan(GenerateRequest(model="tiny", bbox=ROME_UTM, crs=UTM, gsd=4.0))["notices"])

@pytest.mark.parametrize("flag,value", [("--gsd", "nan"), ("--gsd", "inf"), ("--guidance", "nan")])
def test_cli_non_finite_gsd_or_guidance_says_finite_in_one_line(tmp_path, capsys, flag, value):
    """NaN/inf slipped past gt/le as "Input should be less than or equal to 100000", which names
    the wrong problem: the one line now says the number must be finite (exit 2, no traceback)."""
    from engine.cli import main

    code = main(["generate", "--model", "tiny", "--bbox", ",".join(map(str, ROME_UTM)), "--crs", UTM, flag, value,
                 "--dry-run", "--out", str(tmp_path / "x.tif")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [f"diffusionsat generate: error: {flag[2:]}: Input should be a finite number"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("task_args", [
    ["generate", "--bbox", ",".join(map(str, ROME_UTM)), "--crs", UTM],
    ["inpaint", "--input", "IN", "--mask", "nodata"],
], ids=["generate", "inpaint"])
def test_cli_resolution_is_at_most_4096(tmp_path, capsys, task_args):
    """--resolution had no upper bound: inpaint --resolution 8192 planned one 8192 px tile (the
    model on 67 Mpx) for a 600 px input, 2**40 a bogus "no space left"; now one line, exit 2."""
    from engine.cli import main

    src = tmp_path / "in.tif"
    with rasterio.open(src, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs=UTM,
                       transform=rasterio.transform.from_origin(288500, 4639364, 10, 10)) as ds:
        ds.write(np.full((3, 64, 64), 100, np.uint8))
    args = [str(src) if a == "IN" else a for a in task_args]
    code = main([*args, "--model", "tiny", "--resolution", "8192", "--dry-run", "--out", str(tmp_path / "x.tif")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "8192 px is more than 4096 px per tile side" in err[0]
    assert main([*args, "--model", "tiny", "--resolution", "64", "--dry-run", "--out", str(tmp_path / "x.tif")]) == 0


def test_window_batch_is_4_on_the_cpu_given_when_given_and_from_memory_on_cuda():
    """generate --gsd and extend: 4 windows per UNet call on the CPU, the request's when given, and on
    CUDA engine.batching's rule from the free memory (it was 4 on an H200 too)."""
    import types

    from engine.batching import auto_batch_size, tile_bytes
    from engine.device import Placement
    from engine.tasks.extent.joint import DEFAULT_BATCH, window_batch

    channels = types.SimpleNamespace(block_out_channels=(320, 640, 1280, 1280))
    vae = types.SimpleNamespace(block_out_channels=(128, 256, 512, 512))
    bundle = types.SimpleNamespace(unet=types.SimpleNamespace(config=channels),
                                   vae=types.SimpleNamespace(config=vae))
    cpu, cuda = Placement("cpu", "fp32"), Placement("cuda:0", "fp16")  # where the model runs, without a GPU here

    request = types.SimpleNamespace(batch_size=None, guidance=7.5)
    assert window_batch(request, bundle, cpu, 512) == (DEFAULT_BATCH, "generate --gsd's default on the CPU: 4 "
                                                                      "windows per UNet call")
    assert window_batch(types.SimpleNamespace(batch_size=2, guidance=1.0), bundle, cpu, 512)[0] == 2
    free = 100 * 2**30
    size, rule = window_batch(request, bundle, cuda, 512, what="extend", free_bytes=free)
    per = tile_bytes(channels.block_out_channels, vae.block_out_channels, 512, "fp16", True, False)
    assert size == auto_batch_size(free, per) > DEFAULT_BATCH and "free GPU memory" in rule
    assert window_batch(request, bundle, cuda, 512, free_bytes=2 * 2**30)[0] < size
