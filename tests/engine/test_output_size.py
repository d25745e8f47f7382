"""`size` is the longest side; the other follows the bbox's shape on the ground (engine.metadata.output_size),
the same rule for the CLI, --dry-run, the server's plan and the plugin (which sends `size`)."""

from __future__ import annotations

import json

import pytest
import rasterio

from engine.cli import main
from engine.errors import InvalidRequest
from engine.metadata import ground_pixel_size, output_size
from engine.tasks import parse_request, plan

ROME = (12.45, 41.88, 12.52, 41.93)  # 5.8 x 5.6 km on the ground, 0.07 x 0.05 degrees
UTM = (289000.0, 4639000.0, 294000.0, 4644600.0)  # 5.0 x 5.6 km
TALL = (289000.0, 4639000.0, 290000.0, 4649000.0)  # 1 x 10 km


def _ground(bbox, crs):
    return ground_pixel_size(bbox, crs, 1, 1)


@pytest.mark.parametrize("bbox, crs", [(ROME, "EPSG:4326"), (UTM, "EPSG:32633"), (TALL, "EPSG:32633")])
@pytest.mark.parametrize("size", [64, 256, 512])
def test_size_is_the_longest_side_and_pixels_are_square_on_the_ground(bbox, crs, size):
    width, height = output_size(bbox, crs, size)
    assert max(width, height) == size and width % 8 == 0 and height % 8 == 0
    gx, gy = ground_pixel_size(bbox, crs, width, height)
    shorter = min(width, height)
    assert abs(gx / gy - 1) <= 4 / shorter + 1e-9  # within half a latent cell of the rounding
    ground_w, ground_h = _ground(bbox, crs)
    assert (width >= height) == (ground_w >= ground_h)


def test_width_and_height_override_and_one_side_keeps_the_shape():
    assert output_size(ROME, "EPSG:4326", 512, 96, 64) == (96, 64)
    width, height = output_size(UTM, "EPSG:32633", 512, width=128)
    assert width == 128 and height > 128 and height % 8 == 0
    width, height = output_size(UTM, "EPSG:32633", None, height=128)
    assert height == 128 and width < 128
    assert output_size(UTM, "EPSG:32633", None, default=64) == output_size(UTM, "EPSG:32633", 64)


def test_the_short_side_is_at_least_8_px():
    sliver = (289000.0, 4639000.0, 289010.0, 4649000.0)  # 10 m x 10 km
    assert output_size(sliver, "EPSG:32633", 64) == (8, 64)
    with pytest.raises(InvalidRequest):
        output_size(UTM, "EPSG:32633", 0, default=0)


def test_plan_and_dry_run_use_it(capsys):
    request = parse_request({"task": "generate", "bbox": list(ROME), "crs": "EPSG:4326", "size": 512,
                             "model": "tiny"})
    p = plan(request)
    assert (p["width"], p["height"]) == output_size(ROME, "EPSG:4326", 512) != (512, 512)
    code = main(["generate", "--bbox", ",".join(map(str, ROME)), "--model", "tiny", "--size", "512",
                 "--dry-run", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    dry = json.loads(out)
    assert (dry["width"], dry["height"]) == (p["width"], p["height"])


def test_cli_generate_over_a_non_square_bbox_gives_square_pixels(tmp_path, capsys):
    # It gave 256 x 256 over Rome's 5.8 x 5.6 km: 22.7 x 21.9 m pixels.
    out = tmp_path / "rome.tif"
    assert main(["generate", "--bbox", ",".join(map(str, ROME)), "--crs", "EPSG:4326", "--model", "tiny",
                 "--size", "256", "--steps", "1", "--seed", "1", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    with rasterio.open(out) as ds:
        width, height = ds.width, ds.height
        assert ds.bounds == pytest.approx(ROME, abs=1e-12)
    assert width == 256 and height < 256
    gx, gy = ground_pixel_size(ROME, "EPSG:4326", width, height)
    assert abs(gx / gy - 1) <= 4 / height


def test_too_many_pixels_counts_the_side_that_follows_the_shape():
    # width 4096 over a 1 x 10 km bbox makes a 4096 x 40960 image: over the pixel limit at once
    with pytest.raises(ValueError, match="more than"):
        parse_request({"task": "generate", "bbox": list(TALL), "crs": "EPSG:32633", "width": 4096})
    parse_request({"task": "generate", "bbox": list(TALL), "crs": "EPSG:32633", "size": 4096})
