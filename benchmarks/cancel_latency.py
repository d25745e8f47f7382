"""Cancel latency of the sampler: seconds from a cancel to the stop, against one step's time.

The cancel is pressed while the first UNet block of step 2 computes (the worst moment for a
check only between steps: the rest of the step would still run). With the checks before every
UNet/ControlNet/VAE block the sampler stops before the next block.

    python benchmarks/cancel_latency.py [--size 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.errors import Cancelled  # noqa: E402
from engine.models.tiny import build_tiny  # noqa: E402
from engine.pipelines.text2img import DiffusionSatPipeline  # noqa: E402
from engine.schedulers import make_scheduler  # noqa: E402
from engine.progress import CancelToken  # noqa: E402


def once(pipe, size: int) -> tuple[float, float]:
    token, state = CancelToken(), {}

    def on_progress(p):
        if p.step == 1:
            state["armed"], state["t1"] = True, time.perf_counter()

    def press_cancel(module, args, output):
        if state.get("armed") and "pressed" not in state:
            state["pressed"] = time.perf_counter()
            token.cancel()

    hook = pipe.unet.down_blocks[0].register_forward_hook(press_cancel)
    try:
        pipe(height=size, width=size, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
             cancel=token, callback=on_progress)
    except Cancelled:
        stopped = time.perf_counter()
    finally:
        hook.remove()
    return stopped - state["pressed"], state["t1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bundle = build_tiny()
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    pipe.scheduler = make_scheduler("default", bundle.scheduler)
    t0 = time.perf_counter()
    pipe(height=args.size, width=args.size, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
         output_type="latent")
    step = time.perf_counter() - t0
    latencies = [once(pipe, args.size)[0] for _ in range(args.rounds)]
    print(f"tiny, {args.size} px, cpu: one step {step:.2f} s; cancel -> stop median "
          f"{statistics.median(latencies) * 1000:.1f} ms (max {max(latencies) * 1000:.1f} ms, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
