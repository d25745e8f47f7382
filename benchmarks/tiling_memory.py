"""Tiling benchmark: peak memory and time vs raster size (CPU).

Target (the issue): peak RSS flat (within 10 %) from 1k^2 to 16k^2 px, time linear in area.

For each size a fresh subprocess writes a synthetic 3-band uint8 GeoTIFF window by window (never
the whole raster in RAM), and a second fresh subprocess runs the engine's tiling over it
(tile 512, overlap 64, a 3x3 box blur standing in for the model) into a COG with overviews. Only
the second process is measured: wall time of the tiling and of the COG publication, and its peak
resident memory (``VmHWM``, i.e. ``ru_maxrss``).

GDAL keeps a block cache of up to ``GDAL_CACHEMAX`` (by default 5 % of RAM) in the process; a
cache that large holds the whole output of a mid-sized raster and would show as RSS growing with
the raster. The benchmark caps it (``--gdal-cache-mb``, default 8) the way a memory-conscious
engine run should; ``--gdal-cache-mb 0`` leaves GDAL's default to show the difference.

Usage::

    python benchmarks/tiling_memory.py                       # 1024..8192
    python benchmarks/tiling_memory.py --sizes 1024,16384    # any subset
    python benchmarks/tiling_memory.py --write               # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Tiling: peak memory vs raster size (CPU)"


# ---- child processes ------------------------------------------------------------------------


def make_input(size: int, path: str, compress: str = "NONE") -> None:
    """Write a size x size 3-band uint8 GeoTIFF in 512-row strips (bounded memory); ``compress``: its
    GDAL codec (benchmarks/overlap_io.py reads a DEFLATE one, as real inputs are)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(
        driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(500000.0, 4600000.0, 10.0, 10.0), tiled=True,
        blockxsize=512, blockysize=512, compress=compress, bigtiff="IF_SAFER",
    )
    cols = np.arange(size, dtype=np.float32)
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as ds:
        for y in range(0, size, 512):
            h = min(512, size - y)
            rows = np.arange(y, y + h, dtype=np.float32)[:, None]
            base = 127 + 60 * np.sin(cols / 97.0) + 60 * np.cos(rows / 131.0)
            noise = rng.integers(-8, 9, size=(3, h, size))
            strip = np.clip(base[None] + noise, 0, 255).astype(np.uint8)
            ds.write(strip, window=Window(0, y, size, h))


def box_blur_3x3(tile, array):
    """Stand-in model: a 3x3 mean filter (cheap, and it uses the neighbours like a model does)."""
    import numpy as np

    padded = np.pad(array, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = array.shape[-2:]
    out = np.zeros_like(array, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy : dy + h, dx : dx + w]
    return out / 9.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_job(src: str, dest: str, tile: int, overlap: int) -> dict:
    """Tile ``src`` into a COG at ``dest``; returns timings and peak RSS."""
    import rasterio

    from engine.geo.accumulate import raster_reader, run_tiled
    from engine.geo.cog import CogWriter
    from engine.geo.grid import Grid
    from engine.geo.tiles import plan_tiles

    if not os.environ.get("BENCH_GLIBC_DEFAULTS"):
        from engine.runtime import configure_process

        configure_process()  # as the CLI and the server run (GDAL cache, glibc mmap threshold)
    baseline = peak_rss_mib()  # after imports: the constant part

    def cpu() -> float:
        t = os.times()
        return t.user + t.system

    with rasterio.open(src) as ds:
        tiles = plan_tiles(ds.width, ds.height, tile, overlap)
        t0, c0 = time.perf_counter(), cpu()
        writer = CogWriter(dest, grid=Grid.of(ds), count=3, dtype="uint8")
        with writer as out:
            stats = run_tiled(raster_reader(ds, scale=1 / 255), box_blur_3x3, out, tiles)
            t1, c1 = time.perf_counter(), cpu()
            tiling_peak = peak_rss_mib()
        t2, c2 = time.perf_counter(), cpu()
    return dict(
        tiles=len(tiles),
        tiling_s=t1 - t0,
        publish_s=t2 - t1,
        tiling_cpu_s=c1 - c0,  # CPU seconds of all threads: the work, whatever the machine's load
        publish_cpu_s=c2 - c1,
        total_s=t2 - t0,
        baseline_rss_mib=baseline,
        tiling_peak_rss_mib=tiling_peak,
        peak_rss_mib=peak_rss_mib(),
        processed=stats.tiles,
    )


# ---- parent ---------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}; `{' '.join(os.uname())}`"


def versions() -> str:
    import numpy
    import rasterio

    return (
        f"Python {platform.python_version()}, numpy {numpy.__version__}, rasterio "
        f"{rasterio.__version__}, GDAL {rasterio.__gdal_version__}"
    )


def child(args: list[str], env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        sys.exit(f"child {args} failed:\n{proc.stderr}")
    return proc.stdout


def table(rows: list[dict]) -> str:
    first = rows[0]
    base_rate = first["total_s"] / first["mpx"]
    fixed = "fixed_peak_rss_mib" in first
    head = (
        "| raster (px) | Mpx | tiles | tiling (s) | COG publish (s) | publish / tiling | same in CPU s | total (s) | tiles/s "
        "| s per Mpx (vs first) | peak RSS, MiB (vs first) |"
    )
    if fixed:
        head += " peak RSS with glibc defaults, MiB (vs first) |"
    lines = [head, "|---" * head.count(" |") + "|"]

    def rss(r: dict, key: str) -> str:
        return f"{r[key]:.0f} ({100 * (r[key] / first[key] - 1):+.1f} %)"

    for r in rows:
        rate = r["total_s"] / r["mpx"]
        line = (
            f"| {r['size']}² | {r['mpx']:.1f} | {r['tiles']} | {r['tiling_s']:.1f} "
            f"| {r['publish_s']:.1f} | {100 * r['publish_s'] / r['tiling_s']:.0f} % "
            f"| {r['publish_cpu_s']:.1f} / {r['tiling_cpu_s']:.1f} = {100 * r['publish_cpu_s'] / r['tiling_cpu_s']:.0f} % "
            f"| {r['total_s']:.1f} "
            f"| {r['tiles'] / r['tiling_s']:.1f} "
            f"| {rate:.3f} ({rate / base_rate:.2f}x) | {rss(r, 'peak_rss_mib')} |"
        )
        if fixed:
            line += f" {rss(r, 'fixed_peak_rss_mib')} |"
        lines.append(line)
    return "\n".join(lines)


def write_doc(body: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1 :])
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192",
                        help="comma-separated square sizes in px (16384 takes a few minutes)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--gdal-cache-mb", type=int, default=8,
                        help="GDAL_CACHEMAX for the measured process, MiB; 0 = GDAL's default")
    parser.add_argument("--no-malloc-variant", action="store_true",
                        help="skip the second measurement with glibc's default allocator settings")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: system temp)")
    parser.add_argument("--engine-root", default=None,
                        help="import the engine from this checkout (e.g. a git worktree of an older "
                             "commit) to compare before and after")
    parser.add_argument("--write", action="store_true", help=f"update {DOC.relative_to(ROOT)}")
    parser.add_argument("--make-input", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--run", nargs=2, metavar=("SRC", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.make_input:
        make_input(int(args.make_input[0]), args.make_input[1])
        return
    if args.run:
        print(json.dumps(run_job(args.run[0], args.run[1], args.tile, args.overlap)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    env = dict(os.environ)
    if args.engine_root:
        env["PYTHONPATH"] = str(Path(args.engine_root).resolve())
    if args.gdal_cache_mb > 0:
        env["GDAL_CACHEMAX"] = str(args.gdal_cache_mb)  # MiB when the value is below 100000
    else:
        env.pop("GDAL_CACHEMAX", None)
    # glibc raises its mmap threshold after large frees, so later tile-sized temporaries come
    # from the heap and fragment it; a fixed threshold returns them to the system at once. The
    # second run shows how much of any growth is that allocator effect rather than the tiling.
    fixed_env = dict(env, BENCH_GLIBC_DEFAULTS="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tiling-bench-", dir=args.workdir) as tmp:
        for size in sizes:
            src, dest = Path(tmp) / f"in-{size}.tif", Path(tmp) / f"out-{size}.tif"
            child(["--make-input", str(size), str(src)], env)
            run = ["--run", str(src), str(dest), "--tile", str(args.tile), "--overlap", str(args.overlap)]
            result = json.loads(child(run, env).strip().splitlines()[-1])
            result.update(size=size, mpx=size * size / 1e6)
            note = ""
            if not args.no_malloc_variant:
                dest.unlink()
                fixed = json.loads(child(run, fixed_env).strip().splitlines()[-1])
                result["fixed_peak_rss_mib"] = fixed["peak_rss_mib"]
                note = f"; glibc defaults: {fixed['peak_rss_mib']:.0f} MiB"
            rows.append(result)
            print(
                f"{size}²: {result['tiles']} tiles, {result['total_s']:.1f} s (tiling "
                f"{result['tiling_s']:.1f} s / {result['tiling_cpu_s']:.1f} s CPU, publish "
                f"{result['publish_s']:.1f} s / {result['publish_cpu_s']:.1f} s CPU), "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB "
                f"(tiling {result['tiling_peak_rss_mib']:.0f} MiB){note}", file=sys.stderr, flush=True,
            )
            src.unlink()
            dest.unlink()

    cache = f"{args.gdal_cache_mb} MiB" if args.gdal_cache_mb > 0 else "GDAL default (5 % of RAM)"
    body = "\n".join([
        f"Machine: {machine()}.",
        f"Software: {versions()}.",
        "",
        f"`python benchmarks/tiling_memory.py --sizes {args.sizes}"
        f"{' --no-malloc-variant' if args.no_malloc_variant else ''}` ({time.strftime('%Y-%m-%d')}): "
        f"synthetic 3-band uint8 input, tile {args.tile} px, overlap {args.overlap} px, 3x3 box "
        "blur as the model, uint8 COG (DEFLATE level 1 with the horizontal predictor, AVERAGE "
        "overviews) as the output, each size in a fresh process; "
        f"GDAL_CACHEMAX = {cache}. Peak RSS is the process's VmHWM (includes Python, "
        "numpy, rasterio/GDAL: "
        f"{rows[0]['baseline_rss_mib']:.0f} MiB after imports). \"tiling\" is reading, the model, "
        "blending and writing the scratch GeoTIFF; \"COG publish\" is averaging the overviews "
        "(engine.geo.cog.build_overviews, one pass over the scratch) and the COG driver's CreateCopy "
        "(compression on every core); target: publish <= 25 % of tiling at 16k². 1-minute load "
        f"average at the end: {os.getloadavg()[0]:.1f} (shared machine: compare ratios, not seconds "
        "across runs). The RSS column is the process as the CLI and server run it "
        "(engine.runtime.configure_process: glibc mmap threshold 128 KiB, so tile-sized "
        "temporaries go back to the system)"
        + ("; the last repeats the run with glibc's defaults: the difference is allocator "
           "behaviour, not data held." if not args.no_malloc_variant else "."),
        "",
        table(rows),
    ])
    print(body)
    if args.write:
        write_doc(body)
        print(f"\nwrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
