"""generate --gsd with the tiny model: peak RSS and wall time vs output size (CPU).

Target (issue 14): peak RSS flat (within 15 %) from 2k^2 to 16k^2 px. Each size runs in a fresh
process (``generate --gsd`` through the engine's task API, the real tiny model, joint denoising
over 256 px windows, the VAE decoding in blended tiles into a COG); the child reports its peak
resident memory (``ru_maxrss``) and the seconds of the run. ``--steps`` (default 1) and guidance
1 keep a 16k^2 run feasible on 2 cores: the model work is windows x steps, the canvas memory is
the same at any step count.

Usage::

    python benchmarks/extent_memory.py                        # 2048, 4096
    python benchmarks/extent_memory.py --sizes 2048,8192      # any subset
    python benchmarks/extent_memory.py --write                # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "generate --gsd: joint denoising, peak memory and time vs extent (tiny, cpu)"
GSD = 2.0
ORIGIN = (288500.0, 4639300.0)  # UTM 33N, Rome


def child(size: int, steps: int, out: str) -> None:
    """One run in this process; prints a JSON line with the measurements."""
    import resource

    from engine.runtime import configure_process

    configure_process()  # as the CLI and the server do: GDAL's block cache and malloc kept bounded
    from engine.tasks import GenerateRequest
    from engine.tasks.generate import generate

    side = size * GSD  # metres; the grid is exactly size px (a multiple of 8) up to rounding noise
    bbox = (ORIGIN[0], ORIGIN[1], ORIGIN[0] + side, ORIGIN[1] + side)
    # the UTM grid scale near 12.5 E: shrink the metres so the ground width is size * GSD
    from engine.metadata import ground_pixel_size

    gx, gy = ground_pixel_size(bbox, "EPSG:32633", 1, 1)
    bbox = (ORIGIN[0], ORIGIN[1], ORIGIN[0] + side * side / gx, ORIGIN[1] + side * side / gy)
    request = GenerateRequest(model="tiny", bbox=bbox, crs="EPSG:32633", gsd=GSD, steps=steps, guidance=1.0,
                              seed=1)
    started = time.perf_counter()
    marks = {}

    def progress(p):
        if p.message == "decoding" and "decode" not in marks:
            marks["decode"] = time.perf_counter() - started

    result = generate(request, out, progress=progress)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from engine.tasks.extent import extent_layout

    layout = extent_layout(bbox, "EPSG:32633", GSD, 256)
    print(json.dumps({"size": size, "width": result.width, "height": result.height, "windows": len(layout.windows),
                      "steps": steps, "seconds": round(seconds, 1), "denoise_s": round(marks.get("decode", 0.0), 1),
                      "peak_rss_mb": round(peak_mb, 1)}))


def child_stand_in(size: int, steps: int, out: str, spread: int = 1) -> None:
    """The engine's machinery of a --gsd job (layout, per-window metadata, the canvas files stepped
    band by band, the blended VAE tiles into the COG) with a stand-in model (a cheap function for
    the UNet and for the decoder): the memory of everything but the model, at sizes the tiny
    model's CPU time rules out here. ``spread`` > 1: ``--spread`` over windows (the samples one
    after another, their spread accumulated in a file: engine.tasks.extent.spread)."""
    import resource
    from types import SimpleNamespace

    from engine.runtime import configure_process

    configure_process()
    import torch
    from diffusers import DDIMScheduler

    from engine.geo.run_folders import run_folder
    from engine.tasks.extent import extent_layout
    from engine.tasks.extent.grid import windows_metadata
    from engine.tasks.extent.joint import decode_to_cog, denoise_to_file
    from engine.tasks.extent.spread import generate_spread

    bbox = (ORIGIN[0], ORIGIN[1], ORIGIN[0] + size * GSD, ORIGIN[1] + size * GSD)
    started = time.perf_counter()
    layout = extent_layout(bbox, "EPSG:32633", GSD, 256)
    windows_metadata(layout, None, None)

    def decode(x):
        return torch.sigmoid(x[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)

    pipe = SimpleNamespace(scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   clip_sample=False), _execution_device="cpu", decode=decode)
    args = dict(prompt="", metadata=None, steps=steps, guidance=1.0, seed=1, predict=lambda x, t, index: x * 0.1)
    if spread > 1:
        generate_spread(pipe, layout, Path(out), {"synthetic": True, "seed": 1}, args, {"batch_size": 4},
                        {"k": 0, "n": spread})
        denoise_s = 0.0  # the samples' denoising and decoding alternate
    else:
        with run_folder(Path(out).parent) as scratch:
            canvas = denoise_to_file(pipe, layout, scratch, **args)
            denoise_s = time.perf_counter() - started
            try:
                decode_to_cog(pipe, canvas, layout, Path(out), {"synthetic": True}, batch_size=4)
            finally:
                canvas.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": size, "width": layout.width, "height": layout.height, "windows": len(layout.windows),
                      "steps": steps, "seconds": round(time.perf_counter() - started, 1),
                      "denoise_s": round(denoise_s, 1), "peak_rss_mb": round(peak_mb, 1), "stand_in": True,
                      "spread": spread}))


GDAL_CACHE_MB = 8  #: GDAL_CACHEMAX of the measured process (--gdal-cache-mb; 0: the engine's default, engine.runtime.GDAL_CACHE_MB)


def measure(size: int, steps: int, stand_in: bool = False, spread: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if GDAL_CACHE_MB:  # as benchmarks/tiling_memory.py: GDAL's block cache would hold the output's blocks
            env["GDAL_CACHEMAX"] = str(GDAL_CACHE_MB)
        proc = subprocess.run([sys.executable, __file__, "--child", str(size), "--steps", str(steps),
                               "--out", str(Path(tmp) / "out.tif"), *(["--stand-in"] if stand_in else []),
                               "--spread", str(spread)],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--stand-in", action="store_true", help="a cheap stand-in for the UNet and the decoder: "
                        "the memory of the canvas, blending and COG machinery alone, at any size")
    parser.add_argument("--gdal-cache-mb", type=int, default=8, help="GDAL_CACHEMAX of the measured process, "
                        "MiB (default 8, as benchmarks/tiling_memory.py); 0 = the engine's default (engine.runtime.GDAL_CACHE_MB, 32)")
    parser.add_argument("--spread", type=int, default=1, help="with --stand-in: --spread N over windows (N samples)")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.stand_in:
            child_stand_in(args.child, args.steps, args.out, args.spread)
        else:
            child(args.child, args.steps, args.out)
        return
    if args.spread > 1 and not args.stand_in:
        raise SystemExit("--spread is measured with --stand-in only (the tiny model's N runs take hours here)")
    global GDAL_CACHE_MB
    GDAL_CACHE_MB = args.gdal_cache_mb
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        row = measure(size, args.steps, args.stand_in, args.spread)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.write:
        sys.path.insert(0, str(ROOT))
        from benchmarks._report import machine_description, write_section

        mode = (" --stand-in" if args.stand_in else "") + (f" --spread {args.spread}" if args.spread > 1 else "")
        lines = [f"`python benchmarks/extent_memory.py --sizes {args.sizes} --steps {args.steps}{mode} --write` "
                 f"({machine_description()}). Fresh process per size; {'' if args.stand_in else 'tiny model, '}"
                 f"{GSD:g} m/px, guidance 1, "
                 "256 px windows overlapping by 64 px, batch 4; GDAL_CACHEMAX = "
                 f"{GDAL_CACHE_MB or 'the engine default, 32'} MiB (a bigger block cache fills with output blocks "
                 "up to its size). Peak RSS is ru_maxrss.", "",
                 "| output px | windows | steps | peak RSS (MB) | denoise (s) | total (s) |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['width']}x{r['height']} | {r['windows']} | {r['steps']} | {r['peak_rss_mb']} | "
                         f"{r['denoise_s']} | {r['seconds']} |")
        if args.stand_in:
            lines[0] += " Stand-in model (`--stand-in`): a cheap function for the UNet and for the decoder."
        title = SECTION.replace("time vs extent (tiny, cpu)", "vs extent (stand-in model, cpu)") if args.stand_in \
            else SECTION
        if args.spread > 1:
            title = title.replace("joint denoising,", f"--spread {args.spread} over windows,").replace("and vs", "vs")
            lines[0] += (f" `--spread {args.spread}`: the samples run one after another, their brightness accumulated "
                         "(Welford mean and M2) in a float64 file the size of the output; denoise (s) is not "
                         "separated (0).")
        write_section(title, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
