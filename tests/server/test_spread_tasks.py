"""--spread for a tiled task through the real server: a superres job with "spread" serves its spread
map at GET /v1/jobs/{id}/result/spread, on the result's grid."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.transform import from_bounds

from .conftest import call, download_spread, wait_for


def test_superres_job_with_spread_serves_its_spread_map(server, tmp_path):
    path = tmp_path / "s2.tif"
    bounds = (583000, 4507000, 583160, 4507160)  # 16 x 16 px at 10 m: one 64 px tile at factor 4
    rng = np.random.default_rng(4)
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=13, dtype="uint16",
                       crs="EPSG:32618", transform=from_bounds(*bounds, 16, 16)) as dst:
        dst.write((rng.random((13, 16, 16)) * 2500 + 800).astype("uint16"))
    ref = call(server, "POST", "/v1/uploads", data=path.read_bytes(),
               headers={"Content-Type": "image/tiff"}).json["path_ref"]
    reply = call(server, "POST", "/v1/jobs", json_body={"task": "superres", "input": ref, "level": "L1C",
                                                          "date": "2021-06-15", "factor": 4, "resolution": 64,
                                                          "steps": 1, "seed": 3, "spread": 2})
    assert reply.status == 202, reply.body
    job = wait_for(server, reply.json["id"], timeout=120)
    assert job["state"] == "done", job
    spread_path, result_path = download_spread(server, job, tmp_path)
    with rasterio.open(spread_path) as spread, rasterio.open(result_path) as image:
        assert (spread.width, spread.height) == (image.width, image.height) == (64, 64)
        assert spread.dtypes == ("float32",) and (spread.transform, spread.crs) == (image.transform, image.crs)
        values = spread.read(1)
        assert np.isfinite(values).all() and (values >= 0).all() and values.max() > 0
        assert spread.tags()["spread_samples"] == "2" and spread.tags()["spread_seeds"] == "3..4"
        assert image.tags()["spread_file"] == "superres.spread.tif"
