"""What a newcomer reads before a run: the plan's counts (--dry-run, POST /v1/plan) and the
--spread help, checked against real GeoTIFFs and the CLI's own main() (no model is loaded)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.tasks import parse_request, plan


def _scene(path, nodata_patch=True):
    data = np.random.default_rng(0).integers(1, 255, (3, 96, 96)).astype("uint8")
    if nodata_patch:
        data[:, 20:40, 20:40] = 0
    with rasterio.open(path, "w", driver="GTiff", width=96, height=96, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4600000, 10, 10), nodata=0) as dst:
        dst.write(data)
    return str(path)


def test_inpaint_resample_passes_are_counted_as_unet_evaluations(tmp_path):
    """--resample R runs the UNet 1 + R times a step (engine.pipelines.inpaint): the plan's
    evaluations counted one (while its work_mpx counted them all)."""
    src = _scene(tmp_path / "scene.tif")
    base = {"task": "inpaint", "input": src, "model": "tiny", "steps": 4, "scheduler": "ddim", "resolution": 64}
    one, three = plan(parse_request(base)), plan(parse_request({**base, "resample": 2}))
    assert one["tiles"] == three["tiles"] >= 1
    assert one["unet_evaluations"] == one["tiles"] * 4 * 2  # guidance 7.5: two a step
    assert three["unet_evaluations"] == 3 * one["unet_evaluations"]
    assert three["work_mpx"] == pytest.approx(3 * one["work_mpx"])


def test_dry_run_text_names_the_spread_samples(tmp_path, capsys):
    """The one-line plan: with --spread the evaluations are tiles x steps x samples, and the line
    says where the factor comes from."""
    from engine.cli import main

    src = _scene(tmp_path / "scene.tif")
    common = ["inpaint", "--input", src, "--model", "tiny", "--steps", "2", "--resolution", "64", "--dry-run",
              "--quiet"]
    assert main([*common, "--spread", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert "2 steps x 3 samples (--spread)" in line
    tiles = int(line.split("; ")[1].split(" tile")[0])
    assert f"{tiles * 2 * 2 * 3} UNet evaluations" in line
    assert main(common) == 0
    assert "samples" not in capsys.readouterr().out


def test_spread_help_says_the_output_is_one_of_the_n_samples(capsys):
    """--spread N samples N seeds in all (the output is sample 0), not N more."""
    from engine.cli import main

    try:
        main(["superres", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    part = text[text.index("--spread SPREAD "):][:400]
    assert "also sample" not in part.lower()
    assert "in all" in part and "the output is the first" in part and "default: off" in part


def test_the_spread_map_does_not_inherit_the_images_value_notes(tmp_path):
    """superres tags its output "0 = no input data (values 1..255)"; the float32 spread map has
    NaN there, and its tags must say so, not copy the image's note (nor in-painting's band notes)."""
    from engine.tasks import run_task

    dn = (np.random.default_rng(0).random((13, 16, 16)) * 2500 + 800).astype("uint16")
    dn[:, :4, :4] = 0  # S2 no-data corner
    src = tmp_path / "S2A_MSIL1C_20210615T101031_N0301_R022_T33TTG.tif"
    with rasterio.open(src, "w", driver="GTiff", width=16, height=16, count=13, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(290000, 4640000, 10, 10)) as dst:
        dst.write(dn)
    request = parse_request({"task": "superres", "input": str(src), "model": "tiny", "steps": 1, "seed": 2,
                             "resolution": 64, "spread": 2})
    out = tmp_path / "sr.tif"
    run_task(request, out)
    with rasterio.open(out) as image, rasterio.open(tmp_path / "sr.spread.tif") as spread:
        assert image.tags()["nodata_note"].startswith("0 = no input data")
        values, tags = spread.read(1), spread.tags()
    assert np.isnan(values[:16, :16]).all() and np.isfinite(values[20:, 20:]).all()
    assert tags["nodata_note"].startswith("NaN = no input data") and "1..255" not in tags["nodata_note"]
    assert tags["spread_samples"] == "2" and tags["spread_seeds"] == "2..3"


@pytest.mark.parametrize("value", ["1", "17"])
def test_spread_out_of_range_names_the_allowed_range(tmp_path, capsys, value):
    """--spread 1 (one sample has no spread) or 17: one line that says what is allowed, exit 2."""
    from engine.cli import main

    src = _scene(tmp_path / "scene.tif")
    code = main(["inpaint", "--input", src, "--model", "tiny", "--spread", value, "--dry-run"])
    lines = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("note:")]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("diffusionsat inpaint: error: spread:") and f"got {value}; allowed 2..16" in lines[0]


def test_exclusive_and_wide_bounds_read_plainly():
    from engine.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=r"got 0; allowed > 0 and <= 100000\)"):
        parse_request({"task": "generate", "bbox": [0, 0, 1, 1], "crs": "EPSG:4326", "gsd": 0})
    with pytest.raises(InvalidRequest, match=r"allowed 0\.\.9223372036854775807\)"):
        parse_request({"task": "generate", "bbox": [0, 0, 1, 1], "crs": "EPSG:4326", "seed": -1})
