"""Conditional tasks end to end with the real (tiny) model: tiles/s and peak RSS vs raster size.

benchmarks/tiling_memory.py measures the tiling machinery with a stand-in model up to 16k px;
this runs the actual tasks (reading, radiometry, the ControlNet sampler, blending, COG writing)
through ``engine.tasks.run_task`` as the CLI does, each size in a fresh process.

    python benchmarks/tasks_tiny.py                  # superres and inpaint at a few sizes
    python benchmarks/tasks_tiny.py --write          # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine_description, write_section  # noqa: E402

STEPS = 4


def make_inputs(folder: Path, size: int) -> dict:
    """A 13-band Sentinel-2-like scene (size/4 px at 10 m) and an RGB scene + mask (size px)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    s2 = folder / f"S2A_MSIL1C_20210615T101031_N0301_{size}.tif"
    n = size // 4
    with rasterio.open(s2, "w", driver="GTiff", width=n, height=n, count=13, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(300000, 4650000, 10, 10), tiled=True) as ds:
        ds.write((rng.random((13, n, n)) * 2500 + 800).astype("uint16"))
    rgb, mask = folder / f"scene_2021-06-15_{size}.tif", folder / f"mask_{size}.tif"
    profile = dict(driver="GTiff", width=size, height=size, crs="EPSG:32633", tiled=True,
                   transform=from_origin(300000, 4650000, 2.5, 2.5))
    with rasterio.open(rgb, "w", count=3, dtype="uint8", **profile) as ds:
        ds.write((rng.random((3, size, size)) * 255).astype("uint8"))
    m = np.zeros((size, size), "uint8")
    m[::128, :] = 1  # thin cloud stripes: every tile has something to fill
    with rasterio.open(mask, "w", count=1, dtype="uint8", **profile) as ds:
        ds.write(m[None])
    return {"superres": {"task": "superres", "input": str(s2), "factor": 4},
            "inpaint": {"task": "inpaint", "input": str(rgb), "mask": str(mask), "dilate": 2}}


def child(request: dict, out: str) -> dict:
    from engine.runtime import configure_process

    configure_process()
    from engine.models.cache import ModelCache
    from engine.tasks import parse_request, plan, run_task

    req = parse_request(request)
    tiles = plan(req)["tiles"]
    models = ModelCache()
    models.get("tiny")  # load outside the timing
    t0 = time.perf_counter()
    run_task(req, out, models=models)
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    return {"tiles": tiles, "seconds": seconds, "peak_rss_mib": hwm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024,2048", help="output sizes in px (square)")
    p.add_argument("--tasks", default="superres,inpaint")
    p.add_argument("--write", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child[0]), args.child[1])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            requests = make_inputs(Path(tmp), size)
            for task in args.tasks.split(","):
                request = {**requests[task], "model": "tiny", "steps": STEPS, "seed": 1, "device": "cpu"}
                out = str(Path(tmp) / f"{task}-{size}.tif")
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(request), out],
                                      capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r.update(task=task, size=size)
                rows.append(r)
                print(f"{task} {size}²: {r['tiles']} tiles in {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr)
    table = ("| task | output (px) | tiles | seconds | tiles/s | s per output Mpx | peak RSS (MiB) |\n"
             "|---|---|---|---|---|---|---|\n")
    for r in rows:
        table += (f"| {r['task']} | {r['size']}² | {r['tiles']} | {r['seconds']:.1f} | {r['tiles'] / r['seconds']:.2f} "
                  f"| {r['seconds'] / (r['size'] ** 2 / 1e6):.1f} | {r['peak_rss_mib']:.0f} |\n")
    print(table)
    if args.write:
        body = (f"Command: `python benchmarks/tasks_tiny.py --sizes {args.sizes}` (tiny model, {STEPS} steps, CPU, "
                "each run in a fresh process, model loaded before timing; superres from a 13-band L1C-like "
                "scene at factor 4, inpaint of a 3-band scene with a mask in every tile)\n\n"
                f"Machine: {machine_description('cpu')}\n\n" + table)
        write_section("Conditional tasks with the tiny model: tiles/s and peak RSS (CPU)", body)


if __name__ == "__main__":
    main()
