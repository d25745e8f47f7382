"""A tiled task split over processes (what ``accelerate launch`` / ``torchrun`` do on GPUs): wall
time, speedup and efficiency against one process, the merge of each rank's stripe (side by side),
the serial part (rank 0's publish of the COG), and the projection for more devices.

Each process is a rank of one split run (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment,
as a launcher sets them; the engine's :class:`engine.parallel.RunContext` reads them): it takes its
share of the tiles, writes a partial accumulator, then its stripe of output rows (summing the partials
that reach into it, overviews included), and rank 0 publishes the COG from the stripes.
Every rank is a fresh process running super-resolution of the synthetic 13-band scene of
``benchmarks/tasks_tiny.py`` with the real tiny model, its model loaded before the clock starts
(as the server keeps it); ``--threads`` torch threads per process (1: on a machine with C cores up
to C processes run side by side without sharing a core). A world of 1 is the ordinary,
unsplit run.

Measured per world size N: the run's wall time (the slowest rank's ``run_task``, rank 0's
including the publish), the tile phase of each rank, the slowest stripe merge, rank 0's publish (the
part that does not shrink with N), speedup T1 / TN and efficiency speedup / N; and whether the
merged COG equals the single-process output pixel for pixel. The projection for G devices is Amdahl's law with the
measured serial part: T(G) = (T1 - serial) / G + serial.

    python benchmarks/split_scaling.py                     # 2048² px output, worlds 1 and 2
    python benchmarks/split_scaling.py --size 4096 --worlds 1,2 --write
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._report import machine_description, software_versions, write_section  # noqa: E402
from benchmarks.tasks_tiny import FACTOR, make_s2  # noqa: E402

TITLE = "Split runs: super-resolution over N processes (tiny, cpu)"
#: output rows and columns of a whole Sentinel-2 tile (10,980 px at 10 m) super-resolved 4x
WHOLE_TILE_PX = 10980 * 4


def child(request: dict, out: str) -> dict:
    """One rank (from the environment) of the split run; prints its timings as JSON."""
    from engine.runtime import configure_process

    configure_process()
    from engine.models.cache import ModelCache
    from engine.parallel import RunContext
    from engine.tasks import parse_request, run_task

    req = parse_request(request)
    context = RunContext.from_env(device="cpu")
    models = ModelCache()
    models.get(req.model, device="cpu")  # loaded before the clock starts, as the server keeps it
    barrier = Path(os.environ["BENCH_BARRIER"])  # every rank starts its clock when all have loaded
    (barrier / f"ready-{context.rank}").touch()
    while len(list(barrier.glob("ready-*"))) < context.world_size:
        time.sleep(0.01)
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    # engine.parallel.run_tiled_distributed's messages after this rank's tiles, in order
    phases = {"waiting for the other ranks' tiles": "tiles", "merging": "merge", "wrote rows": "stripe",
              "publishing": "publish"}

    def progress(p):
        for prefix, name in phases.items():
            if p.message.startswith(prefix) and name not in marks:
                marks[name] = time.perf_counter() - t0

    run_task(req, out, models=models, context=context, progress=progress)
    seconds = time.perf_counter() - t0
    return {"rank": context.rank, "world": context.world_size, "seconds": seconds,
            "tiles_s": marks.get("tiles", seconds),
            "stripe_s": marks.get("stripe", seconds) - marks.get("merge", seconds),
            "publish_from_s": marks.get("publish", seconds)}


def run_world(request: dict, out: Path, world: int, threads: int) -> dict:
    """Start ``world`` ranks side by side and wait for them; their JSON lines, rank 0 first."""
    procs = []
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=out.parent))
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   BENCH_BARRIER=str(barrier))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        else:
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                env.pop(name, None)
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(request), str(out)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    ranks = []
    for rank, proc in enumerate(procs):
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"rank {rank} of {world} failed:\n{stderr[-3000:]}")
        ranks.append(json.loads(stdout.strip().splitlines()[-1]))
    # serial: rank 0 from the moment every rank's stripe is in (its wait is over) to the published COG
    return {"world": world, "seconds": max(r["seconds"] for r in ranks), "ranks": ranks,
            "stripe_s": max(r["stripe_s"] for r in ranks) if world > 1 else None,
            "serial_s": ranks[0]["seconds"] - ranks[0]["publish_from_s"] if world > 1 else None}


def same_pixels(a: Path, b: Path) -> bool:
    import numpy as np
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        return x.shape == y.shape and x.count == y.count and bool(np.array_equal(x.read(), y.read()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="output px, square (input size / factor 4)")
    p.add_argument("--worlds", default="1,2", help="process counts, comma-separated (1 first: the baseline)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--project", default="4,8,16", help="device counts to project to (Amdahl)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child[0]), args.child[1])), flush=True)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    if worlds[0] != 1:
        raise SystemExit("--worlds must start with 1 (the single-process baseline)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="split-scaling-") as tmp:
        folder = Path(tmp)
        request = {"task": "superres", "input": str(make_s2(folder, args.size)), "factor": FACTOR,
                   "model": "tiny", "steps": args.steps, "seed": 1, "device": "cpu"}
        base = folder / "world1.tif"
        for world in worlds:
            out = folder / f"world{world}.tif"
            started = time.time()
            row = run_world(request, out, world, args.threads)
            row["load"] = os.getloadavg()[0]
            row["equal"] = True if world == 1 else same_pixels(base, out)
            row["wall_clock_s"] = time.time() - started
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    t1 = rows[0]["seconds"]
    serial = max((r["serial_s"] for r in rows if r["serial_s"] is not None), default=0.0)
    lines = [
        f"`python benchmarks/split_scaling.py --size {args.size} --worlds {args.worlds} --steps {args.steps} "
        f"--threads {args.threads}{' --write' if args.write else ''}` ({time.strftime('%Y-%m-%d')}; "
        f"{machine_description()}; {software_versions()}). Super-resolution x{FACTOR} of the synthetic 13-band "
        f"scene to {args.size}² px, tiny model, {args.steps} steps, {args.threads} torch thread(s) per process, "
        "each rank a fresh process with RANK/WORLD_SIZE/LOCAL_RANK set as a launcher sets them, its model "
        "loaded before the clock starts. Wall: the slowest rank's run (rank 0's includes publishing the "
        "COG); stripe merge: the slowest rank's merge of its stripe of rows (summing the partials, encoding, "
        "overviews; the ranks side by side); serial: rank 0's publish (compressing the stripes into the COG, "
        "on every core), the one part no other rank shares.",
        "",
        "| processes | wall (s) | speedup | efficiency | slowest rank's tiles (s) | slowest stripe merge (s) "
        "| serial: publish (s) | equal to 1 process | 1-min load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value):
        return "-" if value is None else f"{value:.1f}"

    for r in rows:
        speedup = t1 / r["seconds"]
        tiles_s = max(x["tiles_s"] for x in r["ranks"])
        lines.append(f"| {r['world']} | {r['seconds']:.1f} | {speedup:.2f}x | {100 * speedup / r['world']:.0f} % "
                     f"| {tiles_s:.1f} | {cell(r['stripe_s'])} | {cell(r['serial_s'])} "
                     f"| {'yes' if r['equal'] else 'NO'} | {r['load']:.1f} |")
    projection = ", ".join(f"{g}: {t1 / ((t1 - serial) / g + serial):.1f}x"
                           for g in (int(x) for x in args.project.split(",")))
    mpx = args.size * args.size / 1e6
    widest = rows[-1]  # the most ranks: its slowest stripe merged mpx / world Mpx
    stripe_rate = (widest["stripe_s"] or 0.0) / (mpx / widest["world"])  # s per Mpx of one rank's stripe
    tile_mpx = WHOLE_TILE_PX ** 2 / 1e6
    lines += ["", f"Projection (Amdahl, serial part {serial:.2f} s of {t1:.1f} s): speedup for {projection}. "
              f"The serial part is {serial / mpx:.3f} s per output Mpx here; the stripe merges shrink with "
              "the number of ranks like the tiles do.",
              "",
              f"For a whole Sentinel-2 tile super-resolved 4x ({WHOLE_TILE_PX:,}² px, {tile_mpx:,.0f} Mpx) at these "
              f"rates, rank 0's publish after the last stripe takes {serial / mpx * tile_mpx / 60:.1f} min on "
              f"this machine's {os.cpu_count()} cores (GDAL compresses on every core), whatever the number of "
              f"GPUs; the stripe merges take {stripe_rate * tile_mpx / 60:.1f} min of CPU "
              f"time in all, shared by the ranks ({stripe_rate * tile_mpx / 60 / 8:.1f} min "
              "each on 8 GPUs). Before the stripes, rank 0 merged every partial and averaged the overviews "
              "alone: 0.38 s/Mpx on this machine, 12 min for the whole tile."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(TITLE, text)


if __name__ == "__main__":
    main()
