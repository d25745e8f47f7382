"""Fixtures for the training tests: small GeoTIFFs with known metadata, shards, a tiny run.

Every model here is the built-in tiny one on the CPU, at 32 px. Torch runs single-threaded:
on a small, shared machine its thread pool spends more time waiting than computing.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import torch

#: Known truth of the fixture rasters.
UTM = {"name": "utm_S2_20210615T101031.tif", "crs": "EPSG:32633", "west": 290_000.0, "north": 4_640_000.0,
       "pixel": 2.0, "size": 64, "date": dt.date(2021, 6, 15)}
GEO = {"name": "geo_scene.tif", "crs": "EPSG:4326", "west": 12.40, "north": 41.95, "pixel": 0.0001, "size": 64,
       "date": dt.date(2019, 3, 2), "caption": "a satellite image of farmland"}
QA = {"name": "qa_2020-07-04.tif", "crs": "EPSG:32633", "west": 300_000.0, "north": 4_650_000.0, "pixel": 10.0,
      "size": 32, "cloudy_rows": 8}

FAST = ["--base", "tiny", "--resolution", "32", "--batch-size", "2", "--lr", "1e-4", "--num-workers", "0",
        "--report-to", "none", "--validation-steps", "2", "--validation-samples", "1"]


def write_rasters(folder: Path) -> Path:
    """Three rasters: UTM uint8 (date in the name), lon/lat uint16 (date and caption in a sidecar),
    UTM uint8 with an SCL band whose top ``cloudy_rows`` rows are cloud (class 9)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    s = UTM["size"]
    with rasterio.open(folder / UTM["name"], "w", driver="GTiff", width=s, height=s, count=3, dtype="uint8",
                       crs=UTM["crs"], transform=from_origin(UTM["west"], UTM["north"], UTM["pixel"], UTM["pixel"])) as ds:
        ds.write((rng.random((3, s, s)) * 255).astype(np.uint8))
    s = GEO["size"]
    with rasterio.open(folder / GEO["name"], "w", driver="GTiff", width=s, height=s, count=3, dtype="uint16",
                       crs=GEO["crs"], transform=from_origin(GEO["west"], GEO["north"], GEO["pixel"], GEO["pixel"])) as ds:
        ds.write((rng.random((3, s, s)) * 3000 + 500).astype(np.uint16))
    (folder / "geo_scene.json").write_text(json.dumps({"date": GEO["date"].isoformat(), "caption": GEO["caption"]}))
    s = QA["size"]
    with rasterio.open(folder / QA["name"], "w", driver="GTiff", width=s, height=s, count=4, dtype="uint8",
                       crs=QA["crs"], transform=from_origin(QA["west"], QA["north"], QA["pixel"], QA["pixel"])) as ds:
        ds.write((rng.random((3, s, s)) * 255).astype(np.uint8), [1, 2, 3])
        scl = np.full((s, s), 4, np.uint8)  # vegetation
        scl[: QA["cloudy_rows"]] = 9  # cloud high probability
        ds.write(scl, 4)
        ds.set_band_description(4, "SCL")
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded torch for these tests only (restored afterwards for other test folders)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def geotiffs(tmp_path_factory) -> Path:
    return write_rasters(tmp_path_factory.mktemp("geotiffs"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, geotiffs) -> Path:
    """A 4-step tiny run at 32 px with checkpoints at 2 and 4 (validation images at 4)."""
    from engine.cli import main

    run = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "image", "--data", str(geotiffs), "--out", str(run), *FAST, "--max-steps", "4",
                 "--checkpoint-every", "2", "--validation-every", "4"])
    assert code == 0
    return run
