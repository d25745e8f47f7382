"""Tiled tasks end to end with the real (tiny) model on the CPU: tiles/s, the share of wall time
outside the model, and peak RSS vs output size, optionally against another revision in one run.

benchmarks/tiling_memory.py measures the tiling machinery with a stand-in model up to 16k px;
this runs the actual tasks (reading, radiometry, the ControlNet sampler, blending, COG writing
and publishing) through ``engine.tasks.run_task`` as the CLI does, each run in a fresh process
(the model loaded before the clock starts).

The scene: there is no real Sentinel-2 product on the development machine, so super-resolution
reads a synthetic 13-band L1C-like GeoTIFF (uint16 reflectances x 10000, 10 m, an S2 product
name so the metadata is read as for a real one: smooth fields plus noise). Output sizes run from
~1 Mpx to ~60 Mpx at factor 4 (input 256² .. 1936² px).

Measured per run:

* wall time of ``run_task`` and tiles/s;
* time inside the model: forward hooks on the UNet, the ControlNet(s), the VAE (its encoder and
  decoder are hooked too, as ``decode()`` is not ``forward``) and the text encoder, nested calls
  counted once; "outside the model" is wall minus that (read, prepare, blend, write, publish,
  the sampler's own arithmetic), target <= 15 % at 4 steps;
* the COG publish (``CogWriter._finish``) on its own;
* peak RSS (``VmHWM``) of the fresh process, target flat within +-10 % from 1 to 60 Mpx.

``--against REV`` runs the same measurements, in the same invocation, on a temporary ``git
worktree`` of REV (removed afterwards) with the same interpreter and ``PYTHONPATH`` pointing
there, and prints both rows per size: a before/after comparison on one machine under one load.

    python benchmarks/tasks_tiny.py                          # superres 1..60 Mpx (~10 min on 2 cores)
    python benchmarks/tasks_tiny.py --against HEAD~1 --write # and the previous commit; docs/benchmarks.md
    python benchmarks/tasks_tiny.py --quick                  # smoke run: two small sizes, seconds
    python benchmarks/tasks_tiny.py --tasks superres,inpaint --sizes 512,1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._report import machine_description, software_versions, write_section  # noqa: E402

TITLE = "Tiled tasks with the tiny model: tiles/s, time outside the model, peak RSS (CPU)"
STEPS = 4
FACTOR = 4
#: output sizes (px, square) of the full run: 1.0, 4.2, 16.8 and 60.0 Mpx
FULL_SIZES = "1024,2048,4096,7744"
QUICK_SIZES = "256,512"


# ---- inputs ---------------------------------------------------------------------------------


def make_s2(folder: Path, size: int) -> Path:
    """A 13-band Sentinel-2 L1C-like scene giving a ``size`` px output at factor 4, written in
    strips (bounded memory)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    n = size // FACTOR
    path = folder / f"S2A_MSIL1C_20210615T101031_N0301_R022_T32TQM_{size}.tif"
    rng = np.random.default_rng(0)
    cols = np.arange(n, dtype=np.float32)
    level = np.linspace(900, 2600, 13, dtype=np.float32)[:, None, None]  # per-band brightness
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=13, dtype="uint16",
                       crs="EPSG:32632", transform=from_origin(600000, 5100000, 10, 10), tiled=True,
                       blockxsize=256, blockysize=256, compress="NONE") as ds:
        for y in range(0, n, 256):
            h = min(256, n - y)
            rows = np.arange(y, y + h, dtype=np.float32)[:, None]
            fields = 1 + 0.35 * np.sin(cols / 37.0) * np.cos(rows / 53.0)  # parcels
            strip = level * fields[None] + rng.normal(0, 60, (13, h, n)).astype(np.float32)
            ds.write(np.clip(strip, 1, 10000).astype("uint16"), window=Window(0, y, n, h))
    return path


def make_inpaint(folder: Path, size: int) -> tuple[Path, Path]:
    """An RGB scene and a mask with thin cloud stripes (every tile has something to fill)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rgb, mask = folder / f"scene_2021-06-15_{size}.tif", folder / f"mask_{size}.tif"
    profile = dict(driver="GTiff", width=size, height=size, crs="EPSG:32633", tiled=True,
                   transform=from_origin(300000, 4650000, 2.5, 2.5))
    rng = np.random.default_rng(0)
    with rasterio.open(rgb, "w", count=3, dtype="uint8", **profile) as a, \
            rasterio.open(mask, "w", count=1, dtype="uint8", **profile) as m:
        for y in range(0, size, 256):
            h = min(256, size - y)
            a.write((rng.random((3, h, size)) * 255).astype("uint8"), window=Window(0, y, size, h))
            rows = np.zeros((1, h, size), "uint8")
            rows[:, (np.arange(y, y + h) % 128) == 0, :] = 1
            m.write(rows, window=Window(0, y, size, h))
    return rgb, mask


def make_request(task: str, folder: Path, size: int) -> dict:
    if task == "superres":
        return {"task": "superres", "input": str(make_s2(folder, size)), "factor": FACTOR}
    if task == "inpaint":
        rgb, mask = make_inpaint(folder, size)
        return {"task": "inpaint", "input": str(rgb), "mask": str(mask), "dilate": 2}
    raise SystemExit(f"unknown task {task!r}; choose superres or inpaint")


# ---- the measured child process -------------------------------------------------------------


class ModelClock:
    """Seconds spent inside the model's forward calls (nested calls counted once)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.seconds = 0.0
        self.calls = 0  #: outermost calls
        self._clock = clock
        self._depth = 0
        self._t0 = 0.0

    def _pre(self, *_args) -> None:
        if self._depth == 0:
            self._t0 = self._clock()
        self._depth += 1

    def _post(self, *_args) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += self._clock() - self._t0
            self.calls += 1

    def watch(self, bundle) -> list:
        import torch

        tops = [getattr(bundle, name, None) for name in ("unet", "vae", "text_encoder")]
        tops += list(getattr(bundle, "controlnets", {}).values())
        handles = []
        for top in tops:
            if not isinstance(top, torch.nn.Module):
                continue
            # the module and its direct children: vae.decode()/encode() call decoder/encoder, not forward
            for module in (top, *top.children()):
                handles.append(module.register_forward_pre_hook(self._pre))
                handles.append(module.register_forward_hook(self._post))
        return handles


def child(request: dict, out: str) -> dict:
    root = os.environ.get("BENCH_ENGINE_ROOT")
    if root:
        sys.path.insert(0, root)  # the revision under test, ahead of this checkout
    from engine.runtime import configure_process

    configure_process()
    import engine
    from engine.geo.cog import CogWriter
    from engine.models.cache import ModelCache
    from engine.tasks import parse_request, plan, run_task

    req = parse_request(request)
    tiles = plan(req)["tiles"]
    models = ModelCache()
    bundle, _ = models.get(request.get("model", "tiny"), device=request.get("device", "auto"))  # load outside the timing
    clock = ModelClock()
    clock.watch(bundle)
    publish = [0.0]
    finish = CogWriter._finish

    def timed_finish(self):
        t = time.perf_counter()
        try:
            return finish(self)
        finally:
            publish[0] += time.perf_counter() - t

    CogWriter._finish = timed_finish
    t0 = time.perf_counter()
    run_task(req, out, models=models)
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    return {"tiles": tiles, "seconds": seconds, "model_s": clock.seconds, "model_calls": clock.calls,
            "publish_s": publish[0], "peak_rss_mib": hwm, "engine": str(Path(engine.__file__).parent.parent)}


# ---- the parent -----------------------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def describe(root: Path) -> str:
    rev = git("rev-parse", "--short", "HEAD", cwd=root)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "engine"], cwd=root).returncode != 0
    return rev + (" + uncommitted engine changes" if dirty else "")


@contextlib.contextmanager
def worktree(rev: str):
    """A temporary detached ``git worktree`` of ``rev``, removed afterwards."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.mkdtemp(prefix="tasks-tiny-against-"))
    git("worktree", "add", "--detach", "--force", str(path), commit)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def measure(request: dict, out: Path, engine_root: Path, threads: int | None = None) -> dict:
    env = dict(os.environ, BENCH_ENGINE_ROOT=str(engine_root), PYTHONPATH=str(engine_root))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(request), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the run of {request['task']} in {engine_root} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(r["engine"]).resolve() != engine_root.resolve():
        raise SystemExit(f"the child imported the engine from {r['engine']}, not {engine_root}")
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    return r


def table(rows: list[dict]) -> str:
    lines = ["| revision | task | output (px) | Mpx | tiles | wall (s) | tiles/s | in the model (s) "
             "| outside the model | of which COG publish (s) | peak RSS, MiB (vs smallest) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict = {}
    for r in rows:
        key = (r["rev"], r["task"])
        first.setdefault(key, r["peak_rss_mib"])
        outside = r["seconds"] - r["model_s"]
        lines.append(
            f"| {r['rev']} | {r['task']} | {r['size']}² | {r['size'] ** 2 / 1e6:.1f} | {r['tiles']} "
            f"| {r['seconds']:.1f} | {r['tiles'] / r['seconds']:.2f} | {r['model_s']:.1f} "
            f"| {outside:.1f} s ({100 * outside / r['seconds']:.1f} %) | {r['publish_s']:.1f} "
            f"| {r['peak_rss_mib']:.0f} ({100 * (r['peak_rss_mib'] / first[key] - 1):+.1f} %) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help=f"output sizes in px, square (default {FULL_SIZES}; "
                   f"--quick: {QUICK_SIZES})")
    p.add_argument("--tasks", default="superres", help="comma-separated: superres, inpaint")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=None,
                   help="passed on as the request's batch_size (omitted: the engine's default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads of each run (default: torch's, one per core); on a shared "
                        "machine 1 keeps OpenMP's waiting threads from multiplying the time under load")
    p.add_argument("--against", metavar="REV", default=None,
                   help="also run on a temporary git worktree of REV (e.g. HEAD~1, main) and print both")
    p.add_argument("--quick", action="store_true", help=f"smoke run: sizes {QUICK_SIZES}")
    p.add_argument("--workdir", default=None, help="scratch folder (default: system temp)")
    p.add_argument("--json", default=None, help="also keep every row in this JSON file, rewritten after each run")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child[0]), args.child[1])))
        return
    sizes = [int(s) for s in (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        revisions = [(describe(ROOT), ROOT)]
        if args.against:
            other = stack.enter_context(worktree(args.against))
            label = describe(other)
            revisions.insert(0, (label if label.startswith(args.against) else f"{args.against} = {label}", other))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tasks-tiny-", dir=args.workdir)))
        for size in sizes:
            for task in tasks:
                request = {**make_request(task, tmp, size), "model": "tiny", "steps": args.steps, "seed": 1,
                           "device": "cpu"}
                if args.batch_size is not None:
                    request["batch_size"] = args.batch_size
                for rev, root in revisions:  # the revisions back to back, under the same load
                    r = measure(request, tmp / f"{task}-{size}.tif", root, args.threads)
                    r.update(task=task, size=size, rev=rev)
                    rows.append(r)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))
                    outside = 100 * (r["seconds"] - r["model_s"]) / r["seconds"]
                    print(f"[{rev}] {task} {size}²: {r['tiles']} tiles in {r['seconds']:.1f} s "
                          f"({r['tiles'] / r['seconds']:.2f} tiles/s), {outside:.1f} % outside the model, "
                          f"publish {r['publish_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                          file=sys.stderr, flush=True)
            for f in tmp.iterdir():
                f.unlink()
    rows.sort(key=lambda r: (r["task"], r["rev"] != revisions[0][0], r["size"]))
    body = table(rows)
    print(body)
    if args.write:
        command = "python benchmarks/tasks_tiny.py" + "".join(
            f" {flag} {value}" for flag, value in (("--sizes", args.sizes), ("--tasks", args.tasks),
                                                   ("--steps", args.steps), ("--batch-size", args.batch_size),
                                                   ("--threads", args.threads),
                                                   ("--against", args.against)) if value is not None)
        load = os.getloadavg()[0]
        threads = f"{args.threads} torch thread(s)" if args.threads else "torch's default threads"
        text = (f"Command: `{command} --write` ({time.strftime('%Y-%m-%d')}; tiny model, random weights, "
                f"{args.steps} steps, CPU, {threads}, each run in a fresh process, model loaded before "
                "timing).\n\n"
                f"Machine: {machine_description('cpu')}; 1-minute load average at the end: {load:.1f} "
                "(2 shared cores: compare rows of one run, not runs).\n\n"
                f"Software: {software_versions()}.\n\n"
                "super-resolution: a synthetic 13-band Sentinel-2 L1C-like GeoTIFF (no real scene on this "
                "machine), factor 4; inpaint: a 3-band scene with a mask in every tile. \"in the model\": "
                "forward calls of the UNet, ControlNet, VAE and text encoder (forward hooks); \"outside the "
                "model\": the rest of the wall time (read, prepare, blend, write, the COG publish, the "
                "sampler's arithmetic); target <= 15 % at 4 steps. Peak RSS: the process's VmHWM, target "
                "flat within +-10 % from 1 to 60 Mpx.\n\n" + body)
        write_section(TITLE, text)
        print("\nwrote docs/benchmarks.md", file=sys.stderr)


if __name__ == "__main__":
    main()
