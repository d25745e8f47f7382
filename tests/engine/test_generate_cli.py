"""`diffusionsat generate` end to end (tiny model, CPU): the GeoTIFF, atomic writes, every CLI error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from engine.cli import main
from engine.errors import Cancelled
from engine.progress import CancelToken
from engine.tasks import GenerateRequest
from engine.tasks.generate import generate

ROME = ["--bbox", "12.45,41.88,12.52,41.93", "--crs", "EPSG:4326", "--date", "2021-06-15"]
FAST = ["--model", "tiny", "--steps", "2", "--size", "64", "--seed", "1", "--quiet"]


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_a_cog_on_the_requested_grid(tmp_path, capsys):
    out = tmp_path / "rome.tif"
    code, stdout, _ = cli(capsys, "generate", *ROME, "--cloud-cover", "0.05", "--prompt",
                          "a satellite image of a stadium", "--width", "96", "--height", "64",
                          "--model", "tiny", "--steps", "2", "--seed", "7", "--out", str(out), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["seed"] == 7 and result["width"] == 96 and result["height"] == 64
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.width == 96 and ds.height == 64 and ds.count == 3 and ds.dtypes[0] == "uint8"
        assert ds.bounds == pytest.approx((12.45, 41.88, 12.52, 41.93), abs=1e-12)
        assert ds.res == pytest.approx((0.07 / 96, 0.05 / 64))
        tags = ds.tags()
        assert ds.profile["tiled"] and ds.compression.name.lower() == "deflate"
        assert ds.colorinterp[0].name == "red"
        data = ds.read()
    assert tags["synthetic"] == "true"
    assert tags["model"] == "tiny" and tags["seed"] == "7" and tags["steps"] == "2"
    assert tags["prompt"] == "a satellite image of a stadium" and tags["guidance"] == "7.5"
    assert tags["metadata_date"] == "2021-06-15" and float(tags["metadata_cloud_cover"]) == 0.05
    normalised = [float(v) for v in tags["metadata_normalised"].split(",")]
    assert normalised[:2] == pytest.approx([(12.485 + 180) / 360 * 1000, (41.905 + 90) / 180 * 1000], abs=0.05)
    assert data.std() > 0
    assert not [p for p in os.listdir(tmp_path) if p != "rome.tif"]  # no temp files left


def test_cog_layout_is_valid(tmp_path, capsys):
    out = tmp_path / "big.tif"
    assert cli(capsys, "generate", *ROME, "--model", "tiny", "--steps", "1", "--size", "512",
               "--seed", "1", "--quiet", "--out", str(out))[0] == 0
    with rasterio.open(out) as ds:
        assert ds.overviews(1), "a COG of 512 px carries overviews"
        assert ds.block_shapes[0] == (256, 256)
        # GDAL's own marker that the file was written by the COG driver (IFDs before data)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_same_ground_in_utm_gives_same_metadata(tmp_path, capsys):
    code, out, _ = cli(capsys, "generate", "--bbox", "288500,4639300,294300,4644900", "--crs", "EPSG:32633",
                       *FAST, "--out", str(tmp_path / "a.tif"), "--json")
    utm = json.loads(out)["metadata"]
    with rasterio.open(tmp_path / "a.tif") as ds:
        assert ds.crs.to_epsg() == 32633
        assert ds.bounds == pytest.approx((288500, 4639300, 294300, 4644900))
    assert utm["gsd_m"] == pytest.approx(np.sqrt(5800 * 5600) / 64, rel=0.01)


def test_seed_reproducible_and_recorded(tmp_path, capsys):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    for path in (a, b):
        assert cli(capsys, "generate", *ROME, *FAST, "--out", str(path))[0] == 0
    with rasterio.open(a) as da, rasterio.open(b) as db:
        assert np.array_equal(da.read(), db.read())
    code, out, _ = cli(capsys, "generate", *ROME, "--model", "tiny", "--steps", "1", "--size", "64",
                       "--quiet", "--json", "--out", str(tmp_path / "c.tif"))
    seed = json.loads(out)["seed"]
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert ds.tags()["seed"] == str(seed)


def test_cancel_and_failure_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "x.tif"
    token = CancelToken()

    def cancel_at_step_one(p):
        if p.step == 1:
            token.cancel()

    request = GenerateRequest(bbox=(12.45, 41.88, 12.52, 41.93), model="tiny", steps=5, size=64, seed=1)
    with pytest.raises(Cancelled):
        generate(request, out, progress=cancel_at_step_one, cancel=token)
    assert list(tmp_path.iterdir()) == []

    # A failure while the COG is being written (disk full, killed) leaves no partial file either.
    import engine.geo.cog as cog
    from engine.errors import DiskFull

    def broken_copy(src, dst, **kw):
        Path(dst).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr("rasterio.shutil.copy", broken_copy)
    with pytest.raises(DiskFull, match="no space left in"):
        generate(request, out)
    assert list(tmp_path.iterdir()) == []
    # ...and an existing good file at the destination survives a failed overwrite.
    out.write_bytes(b"previous result")
    with pytest.raises(DiskFull, match="no space left in"):
        generate(request, out)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"]
    assert cog  # imported for the monkeypatch target's module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bbox", "12.52,41.88,12.45,41.93"], "inverted"),
        (["--bbox", "12.45,41.88,12.45,41.93"], "empty"),
        (["--bbox", "12.45,41.88,12.52"], "give 4"),
        (["--bbox", "12.45,41.88,200,41.93"], "longitude"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--crs", "EPSG:99999"], "unknown CRS"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--crs", "EPSG:32633"], "area of use"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--date", "2021-13-01"], "date"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--date", "1975-01-01"], "1980"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--size", "100"], "multiple of 8"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--cloud-cover", "5"], "0..1"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--steps", "0"], "steps"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--model", "/nonexistent/model"], "does not exist"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--device", "tpu"], "unknown device"),
        (["--bbox", "12.45,41.88,12.52,41.93", "--size", "abc"], "not a whole number"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "out.tif"
    base = ["--model", "tiny", "--steps", "1", "--size", "64", "--quiet"]
    # later flags win in argparse, so the case's own --model/--size override the defaults above
    code, stdout, stderr = cli(capsys, "generate", *base, *args, "--out", str(out))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert message.lower() in lines[0].lower()
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_corrupt_weights_and_bad_output_folder(tmp_path, capsys, tiny_folder):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_folder, bad)
    weights = bad / "checkpoint-0" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, stderr = cli(capsys, "generate", *ROME, "--model", str(bad), "--size", "64", "--steps", "1",
                          "--quiet", "--out", str(out_dir / "x.tif"))
    assert code == 2 and "corrupt" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == []
    code, _, stderr = cli(capsys, "generate", *ROME, *FAST, "--out", str(tmp_path / "no" / "such" / "x.tif"))
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = cli(capsys, "generate", *ROME, *FAST, "--out", str(tmp_path / "x.png"))
    assert code == 2 and ".tif" in stderr


def test_official_folder_through_the_cli(tmp_path, capsys, tiny_folder):
    out = tmp_path / "o.tif"
    code, stdout, _ = cli(capsys, "generate", *ROME, "--model", str(tiny_folder), "--size", "64",
                          "--steps", "2", "--seed", "1", "--quiet", "--json", "--out", str(out))
    assert code == 0
    ref = tmp_path / "t.tif"
    assert cli(capsys, "generate", *ROME, *FAST, "--out", str(ref))[0] == 0
    with rasterio.open(out) as a, rasterio.open(ref) as b:
        assert np.array_equal(a.read(), b.read())  # same weights, same seed -> same pixels


def test_auto_falls_back_to_tiny_with_a_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSIONSAT_MODELS", str(tmp_path / "empty"))
    code = main(["generate", *ROME, "--steps", "1", "--size", "64", "--out", str(tmp_path / "a.tif"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert result["model"] == "tiny"
    assert any("tiny model" in w for w in result["warnings"])
    assert "tiny model" in err


def test_auto_prefers_an_installed_model(tmp_path, capsys, monkeypatch, tiny_folder):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_folder, models / "my-diffusionsat")
    monkeypatch.setenv("DIFFUSIONSAT_MODELS", str(models))
    code, stdout, _ = cli(capsys, "generate", *ROME, "--steps", "1", "--size", "64", "--quiet", "--json",
                          "--out", str(tmp_path / "a.tif"))
    assert code == 0 and json.loads(stdout)["model"] == "my-diffusionsat"
    code, stdout, _ = cli(capsys, "models", "--json")
    names = [m["name"] for m in json.loads(stdout)["models"]]
    assert names == ["tiny", "my-diffusionsat"]


def test_console_script_help_and_error(tmp_path):
    exe = Path(sys.executable).with_name("diffusionsat")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    help_text = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("--bbox", "--crs", "--date", "--cloud-cover", "--prompt", "--size", "--width", "--height",
                 "--model", "--steps", "--guidance", "--seed", "--scheduler", "--device", "--out", "--json"):
        assert flag in help_text
    assert "examples:" in help_text and "ground sample distance" in help_text
    proc = subprocess.run([exe, "generate", "--bbox", "1,2,3", "--out", str(tmp_path / "x.tif")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_spread_over_seeds(tmp_path, capsys):
    out = tmp_path / "s.tif"
    assert cli(capsys, "generate", *ROME, *FAST, "--spread", "3", "--out", str(out))[0] == 0
    single = tmp_path / "one.tif"
    assert cli(capsys, "generate", *ROME, *FAST, "--out", str(single))[0] == 0
    with rasterio.open(out) as a, rasterio.open(single) as b, rasterio.open(tmp_path / "s.spread.tif") as s:
        # sample 0 is the single-seed image (up to rounding: batched CPU kernels sum in another order)
        diff = np.abs(a.read().astype(int) - b.read().astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05
        spread = s.read(1)
        assert s.transform == a.transform and s.crs == a.crs and s.dtypes[0] == "float32"
        assert s.tags()["spread_seeds"] == "1..3" and a.tags()["spread_file"] == "s.spread.tif"
    assert 0 < spread.mean() < 0.5 and spread.min() >= 0


def test_hub_ids_resolve_to_a_local_folder_of_the_same_layout(tmp_path, capsys, monkeypatch, tiny_folder):
    """hf:owner/name goes through snapshot_download (stubbed at the network edge) to a folder."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision))
        return str(tiny_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    code, stdout, _ = cli(capsys, "generate", *ROME, "--model", "hf:someone/diffusionsat-512@v1", "--size", "64",
                          "--steps", "1", "--seed", "1", "--quiet", "--json", "--out", str(tmp_path / "h.tif"))
    assert code == 0 and calls == [("someone/diffusionsat-512", "v1")]
    code, _, err = cli(capsys, "generate", *ROME, "--model", "hf:not a repo", "--out", str(tmp_path / "x.tif"))
    assert code == 2 and "hf:owner/name" in err
