"""Inputs never destroyed, nothing half-written: real CLI runs, real signals, a real full disk."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.cli import main

REPO = Path(__file__).resolve().parents[2]
UTM = "EPSG:32633"
FAST = ["--model", "tiny", "--steps", "1", "--seed", "3"]
GEN = ["generate", "--bbox", "300000,4649360,300640,4650000", "--crs", UTM, "--size", "64", *FAST]


def write(path, array, nodata=None):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=str(array.dtype), crs=UTM, transform=from_origin(300000, 4650000, 10, 10),
                       nodata=nodata) as ds:
        ds.write(array)
    return path


def rgb(path, size=64, hole=True):
    image = np.full((3, size, size), 120, dtype="uint8")
    if hole:
        image[:, 10:30, 10:30] = 0
    return write(path, image, nodata=0)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------
# inputs never destroyed


def test_output_that_is_an_input_is_refused_before_any_work(tmp_path, capsys):
    a = rgb(tmp_path / "a.tif")
    m = write(tmp_path / "m.tif", np.zeros((64, 64), "uint8"))
    s2 = write(tmp_path / "s2.tif", np.full((13, 32, 32), 1000, "uint16"))
    b = rgb(tmp_path / "b_2021-06-01.tif", hole=False)
    (tmp_path / "alias.tif").symlink_to(a)
    before = {p: p.read_bytes() for p in (a, m, s2, b)}
    cases = [
        (["inpaint", "--input", a, "--out", a], "a.tif"),
        (["inpaint", "--input", a, "--out", tmp_path / "alias.tif"], "a.tif"),
        (["inpaint", "--input", a, "--mask", m, "--out", m], "m.tif"),
        (["inpaint", "--input", a, "--reference", b, "--out", b], "b_2021-06-01.tif"),
        (["superres", "--input", s2, "--out", s2], "s2.tif"),
        (["temporal", "--input", b, "--input", a, "--input-date", "2021-06-01", "--input-date", "2021-06-02",
          "--date", "2021-07-01", "--out", a], "a.tif"),
    ]
    for argv, name in cases:
        code, err = cli(capsys, *argv, *FAST, "--overwrite")
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and name in err and "input" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert hidden(tmp_path) == []


def _vrt_of(path: Path, source: Path, size: int = 64) -> Path:
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{i}"><SimpleSource><SourceFilename relativeToVRT="1">'
        f"{source.name}</SourceFilename><SourceBand>{i}</SourceBand></SimpleSource></VRTRasterBand>"
        for i in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{UTM}</SRS>'
                    f"<GeoTransform>300000,10,0,4650000,0,-10</GeoTransform>{bands}</VRTDataset>")
    return path


def test_output_that_is_a_file_a_vrt_input_reads_is_refused(tmp_path, capsys):
    """A VRT input's source file is an input too: ``extend --input v.vrt --out src.tif --overwrite``
    (or the output's spread map landing on it) rewrote the source the VRT reads."""
    src = rgb(tmp_path / "src.tif")
    vrt = _vrt_of(tmp_path / "v.vrt", src)
    inner = _vrt_of(tmp_path / "outer.vrt", vrt)  # a VRT of a VRT: the source two levels down
    before = src.read_bytes()
    bbox = "299680,4649040,300640,4650000"
    cases = [
        ["extend", "--input", vrt, "--bbox", bbox, "--out", src],
        ["extend", "--input", inner, "--bbox", bbox, "--out", src],
        ["extend", "--input", vrt, "--bbox", bbox, "--out", tmp_path / "." / "src.tif"],
        ["inpaint", "--input", vrt, "--out", src],
        ["inpaint", "--input", vrt, "--out", tmp_path / "x.tif", "--spread", "2"],
    ]
    (tmp_path / "x.spread.tif").symlink_to(src)  # the spread map of x.tif would land on the source
    for argv in cases:
        code, err = cli(capsys, *argv, *FAST, "--overwrite")
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "src.tif" in err and "reads" in err, err
        assert src.read_bytes() == before
    assert not (tmp_path / "x.tif").exists() and hidden(tmp_path) == []


def test_existing_output_kept_unless_overwrite_and_umask_respected(tmp_path, capsys):
    out = tmp_path / "x.tif"
    out.write_bytes(b"the user's earlier result")
    code, err = cli(capsys, *GEN, "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err and "x.tif" in err
    assert out.read_bytes() == b"the user's earlier result"
    old = os.umask(0o027)
    try:
        code, err = cli(capsys, *GEN, "--out", out, "--overwrite")
        code2, _ = cli(capsys, *GEN, "--out", tmp_path / "y.tif")
    finally:
        os.umask(old)
    assert code == 0 and code2 == 0, err
    with rasterio.open(out) as src:
        assert src.count == 3
    for name in ("x.tif", "y.tif"):  # the user's umask, not mkstemp's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
    assert hidden(tmp_path) == []


def test_spread_sidecar_counts_as_an_output(tmp_path, capsys):
    (tmp_path / "g.spread.tif").write_bytes(b"keep me")
    code, err = cli(capsys, *GEN, "--spread", "2", "--out", tmp_path / "g.tif")
    assert code == 2 and "g.spread.tif" in err and "already exists" in err
    assert (tmp_path / "g.spread.tif").read_bytes() == b"keep me" and not (tmp_path / "g.tif").exists()


# ------------------------------------------------------------------------------------------------
# nothing half-written, nothing left behind (subprocesses: real signals)


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["DIFFUSIONSAT_MODELS"] = str(REPO / "tests" / "_no_models_here")
    return env


def _long_inpaint(tmp_path: Path) -> list[str]:
    data = tmp_path / "data"
    data.mkdir()
    a = rgb(data / "big.tif", size=512)
    image = np.full((3, 512, 512), 120, dtype="uint8")
    image[:, ::7, ::5] = 0  # holes in every tile: every tile runs the model
    write(a, image, nodata=0)
    out = tmp_path / "out"
    out.mkdir()
    return [sys.executable, "-m", "engine.cli", "inpaint", "--input", str(a), "--out", str(out / "filled.tif"),
            "--model", "tiny", "--steps", "200", "--seed", "1", "--overlap", "16"]


def _wait_for_scratch(folder: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [p for p in folder.glob(f".diffusionsat-run-{proc.pid}-*") if (p / "acc.bin").exists()]
        if runs:
            return runs[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the run never reached its tiles")


def test_sigkill_leftovers_swept_and_sigterm_leaves_nothing(tmp_path):
    argv = _long_inpaint(tmp_path)
    out_dir = tmp_path / "out"
    killed = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stale = _wait_for_scratch(out_dir, killed)
    assert (stale / "pid").read_text().split()[0] == str(killed.pid)
    killed.kill()
    killed.wait(30)
    assert (stale / "acc.bin").exists()  # SIGKILL cannot clean up...
    alive = out_dir / f".diffusionsat-run-{os.getpid()}-keep"  # ...and a live process's folder is not touched
    alive.mkdir()

    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = _wait_for_scratch(out_dir, proc)
    assert run != stale and not stale.exists()  # the next run in the same place removed the dead one's
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].endswith("terminated (SIGTERM); nothing was written"), err
    assert [p.name for p in out_dir.iterdir()] == [alive.name]  # no output, no scratch


# ------------------------------------------------------------------------------------------------
# a full disk: a real, small tmpfs in a private mount namespace


def _in_small_tmpfs(tmp_path: Path, size_k: int, cli_args: list[str]) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode()[:200]}")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    args = " ".join(f"'{a}'" for a in cli_args)
    script = (f"mount -t tmpfs -o size={size_k}k tmpfs {mnt} && cd {REPO} && "
              f"{sys.executable} -m engine.cli {args} --out {mnt}/out.tif; echo \"rc=$?\"; "
              f"ls -A {mnt}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _check_disk_full(proc: subprocess.CompletedProcess, what: str) -> None:
    lines = proc.stdout.strip().splitlines()
    assert "rc=2" in lines, (proc.stdout, proc.stderr)
    assert lines[-1] == "rc=2", f"files left on the full disk: {lines}"
    # stderr is not a terminal here: plain progress lines come first; the error is one line, no traceback
    progress = re.compile(r"^diffusionsat \w+: (tile \d+/\d+, )?step \d+/\d+")
    err = [line for line in proc.stderr.strip().splitlines()
           if line.strip() and not line.startswith("model: ") and not progress.match(line)]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no space left in" in err[0] and "/disk" in err[0] and "needed" in err[0] and what in err[0], err[0]


def test_full_disk_in_the_cog_writer(tmp_path):
    proc = _in_small_tmpfs(tmp_path, 48, GEN[:-6] + ["--size", "256", *FAST])
    _check_disk_full(proc, "out.tif")


def test_full_disk_in_the_tiling_accumulator(tmp_path):
    a = rgb(tmp_path / "a.tif", size=320)
    proc = _in_small_tmpfs(tmp_path, 512, ["inpaint", "--input", str(a), *FAST])
    _check_disk_full(proc, "tiling accumulator")
