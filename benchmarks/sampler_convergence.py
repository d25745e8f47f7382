"""Sampler convergence on the tiny model (CPU): the distances tests/engine/test_samplers.py bounds.

ddim, dpm++ and unipc from the same initial latents (tiny model, random weights, 64 px, guidance 1,
one thread); RMS distance of the decoded images in [0, 1], between the samplers and to a 200-step
DDIM image (the converged reference), at 5/10/20/50 steps; and the wall time of a seeded tiny
``generate`` at 20 steps with ``--scheduler default`` (the checkpoint's DDIM, the old default) and
``auto`` (DPM-Solver++, the new default), model loaded once, median of 3 warm runs alternated.

    python benchmarks/sampler_convergence.py [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine_description, write_section  # noqa: E402

PX = 64
SAMPLERS = ("ddim", "dpm++", "unipc")


def distances(steps_list=(5, 10, 20, 50)) -> list[dict]:
    from engine.models.tiny import build_tiny
    from engine.pipelines.text2img import DiffusionSatPipeline
    from engine.schedulers import make_scheduler

    bundle = build_tiny()
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    latents = torch.randn(1, 4, PX // 8, PX // 8, generator=torch.Generator().manual_seed(0))

    def run(name, steps):
        pipe.scheduler = make_scheduler(name, bundle.scheduler)
        return pipe("a satellite image", None, height=PX, width=PX, num_inference_steps=steps, guidance_scale=1.0,
                    latents=latents.clone(), generator=torch.Generator().manual_seed(1),
                    output_type="pt").images.double()

    rms = lambda a, b: float((a - b).pow(2).mean().sqrt())  # noqa: E731
    reference = run("ddim", 200)
    rows = []
    for steps in steps_list:
        x = {n: run(n, steps) for n in SAMPLERS}
        between = max(rms(x[a], x[b]) for i, a in enumerate(SAMPLERS) for b in SAMPLERS[i + 1:])
        rows.append({"steps": steps, "between": between, **{n: rms(x[n], reference) for n in SAMPLERS}})
    return rows


def generate_seconds(schedulers=("default", "auto"), rounds: int = 3) -> dict:
    """Median wall time per scheduler, the runs alternated (A B A B ...) so that drift in machine
    load hits both alike; one warm-up run each first."""
    from engine.models.cache import ModelCache
    from engine.tasks.generate import generate
    from engine.tasks.requests import GenerateRequest

    models = ModelCache()
    times = {s: [] for s in schedulers}
    with tempfile.TemporaryDirectory() as d:
        for i in range(rounds + 1):
            for s in schedulers:
                req = GenerateRequest(bbox=(10, 50, 10.01, 50.01), model="tiny", seed=7, steps=20, scheduler=s)
                t = time.perf_counter()
                generate(req, f"{d}/{s}{i}.tif", models=models)
                if i:
                    times[s].append(time.perf_counter() - t)
    return {s: statistics.median(v) for s, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = distances()
    torch.set_num_threads(threads)
    timing = generate_seconds()
    body = ("| steps | largest distance between ddim, dpm++, unipc | ddim to the 200-step DDIM image | dpm++ | unipc |\n"
            "|---|---|---|---|---|\n")
    for r in rows:
        body += f"| {r['steps']} | {r['between']:.4f} | {r['ddim']:.4f} | {r['dpm++']:.4f} | {r['unipc']:.4f} |\n"
    body += (f"\nSeeded tiny `generate` (256 px, 20 steps, guidance 7.5, {threads} threads): "
             f"`--scheduler default` (DDIM, the old default) {timing['default']:.2f} s, "
             f"`auto` (DPM-Solver++, the new default) {timing['auto']:.2f} s (median of 3 warm runs, alternated; the cost per "
             "step is the UNet's, the same for both: the gain is in the steps a given quality needs).\n"
             f"\nLoad average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the wall times "
             "are the load's as much as the samplers'; the distances do not depend on it). On a loaded machine "
             "torch's OpenMP threads spin-wait: the tiny UNet at 8x8 latents took 0.46 s per step with 2 threads "
             "and 0.026 s with 1 (load average ~6 on 2 cores), hence one thread for the distances here, in "
             "tests/engine/test_samplers.py and in `gpu_throughput.py --quick`.\n")
    print(body)
    if args.write:
        write_section("Samplers: convergence and the default (tiny, cpu)",
                      "Command: `python benchmarks/sampler_convergence.py --write`\n\n"
                      f"Machine: {machine_description('cpu')}\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
