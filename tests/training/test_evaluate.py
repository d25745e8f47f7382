"""`diffusionsat evaluate`: SSIM/PSNR as JSON; FID and LPIPS refused without local weights."""

from __future__ import annotations

import json

import pytest

from engine.cli import main

from .conftest import UTM


def test_evaluate_ssim_psnr_json(tmp_path, tiny_run, geotiffs, capsys):
    out = tmp_path / "eval" / "results.json"
    code = main(["evaluate", "--model", str(tiny_run), "--data", str(geotiffs / UTM["name"]), "--metrics", "ssim,psnr",
                 "--steps", "2", "--limit", "3", "--batch-size", "2", "--seed", "5", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved == printed
    assert saved["count"] == 3 and saved["steps"] == 2 and saved["seed"] == 5 and saved["resolution"] == 32
    assert set(saved["metrics"]) == {"ssim", "psnr"}
    assert -1.0 <= saved["metrics"]["ssim"]["mean"] <= 1.0 and saved["metrics"]["ssim"]["count"] == 3
    assert 0.0 < saved["metrics"]["psnr"]["mean"] < 60.0
    # fixed seeds: the same evaluation gives the same numbers
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(geotiffs / UTM["name"]), "--steps", "2",
                 "--limit", "3", "--batch-size", "2", "--seed", "5"]) == 0
    again = json.loads(capsys.readouterr().out)
    for name in ("ssim", "psnr"):
        assert again["metrics"][name]["mean"] == pytest.approx(saved["metrics"][name]["mean"], rel=1e-6)


@pytest.mark.parametrize("metric, flag", [("fid", "--fid-weights"), ("lpips", "--lpips-weights")])
def test_fid_and_lpips_need_user_weights(tmp_path, geotiffs, capsys, metric, flag):
    code = main(["evaluate", "--model", "tiny", "--data", str(geotiffs), "--metrics", f"ssim,{metric}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert flag in err and "nothing is downloaded" in err
    code = main(["evaluate", "--model", "tiny", "--data", str(geotiffs), "--metrics", "ssim,sharpness"])
    assert code == 2 and "unknown metric sharpness" in capsys.readouterr().err
