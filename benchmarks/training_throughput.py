"""Training throughput (samples/s) of the single-image loop, end to end.

Everything a real step does is timed: reading GeoTIFF crops, VAE encoding, text encoding, the
SatUNet forward and backward with min-SNR weighting, AdamW, gradient clipping and the EMA update.
The first ``--warmup`` steps are not timed; checkpoints and validation fall outside the window.

    python benchmarks/training_throughput.py                      # tiny, CPU, batch 4, 64 px, 20 steps
    python benchmarks/training_throughput.py --config sd21        # SD-2.1-size on a GPU: the reference
                                                                  # recipe's batch 16, 512 px, fp16,
                                                                  # gradient checkpointing
    python benchmarks/training_throughput.py --write              # also update docs/benchmarks.md

The sd21 configuration builds randomly initialised SD 2.1-shaped components (SatUNet from
``engine/resources/sd21/unet.json``, the SD 2.1 VAE and OpenCLIP ViT-H text encoder shapes): the
speed of a step does not depend on the weights, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine_description, write_section  # noqa: E402
from engine.models.tiny import build_tiny  # noqa: E402
from engine.models.configs import resource_path  # noqa: E402

# SD 2.1's VAE and text encoder shapes (stabilityai/stable-diffusion-2-1 configs).
SD21_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "sample_size": 768, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_TEXT = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
}


def sd21_bundle():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.unet import SatUNet, init_metadata_embedding

    tiny = build_tiny()
    config = {k: v for k, v in json.loads(resource_path("sd21", "unet.json").read_text()).items()
              if not k.startswith("_")}
    torch.manual_seed(0)
    tiny.unet = SatUNet(**config)
    init_metadata_embedding(tiny.unet.metadata_embedding)
    tiny.vae = AutoencoderKL(**SD21_VAE)
    tiny.text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
    tiny.controlnets = {}
    tiny.name, tiny.is_tiny = "sd21-shaped", False
    return tiny


def write_data(folder: Path, resolution: int, crops: int) -> Path:
    """uint8 UTM GeoTIFFs holding at least ``crops`` grid crops of ``resolution`` px."""
    import rasterio
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = resolution * 2
    for i in range(max(1, -(-crops // 4))):
        with rasterio.open(folder / f"bench_2021-06-{i % 28 + 1:02d}.tif", "w", driver="GTiff", width=side,
                           height=side, count=3, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(290_000 + 5_000 * i, 4_640_000, 1.0, 1.0)) as ds:
            ds.write((rng.random((3, side, side)) * 255).astype(np.uint8))
    return folder


def run(args) -> dict:
    from training.config import TrainConfig
    from training.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="diffusionsat-bench-"))
    try:
        data = write_data(work / "data", args.resolution, args.batch * args.accumulation * (args.warmup + args.steps))
        bundle = sd21_bundle() if args.config == "sd21" else build_tiny()
        stamps: list[float] = []
        config = TrainConfig(
            kind="image", data=[str(data)], out=work / "run", base=args.config, resolution=args.resolution,
            batch_size=args.batch, gradient_accumulation_steps=args.accumulation, lr=1e-5,
            max_steps=args.warmup + args.steps, checkpoint_every=10**9, validation_every=0,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            num_workers=args.workers, report_to="none", log_every=10**9, cpu=args.device == "cpu", seed=0,
        )
        cuda = args.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def on_step(step: int, loss: float) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        train(config, log=lambda _: None, bundle=bundle, on_step=on_step)
        timed = stamps[args.warmup:]
        seconds = timed[-1] - stamps[args.warmup - 1] if args.warmup else timed[-1] - stamps[0]
        steps = len(timed) if args.warmup else len(timed) - 1
        samples = steps * args.batch * args.accumulation
        return {
            "config": args.config, "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "batch": args.batch, "accumulation": args.accumulation, "resolution": args.resolution,
            "precision": args.mixed_precision, "checkpointing": args.gradient_checkpointing, "steps": steps,
            "seconds_per_step": seconds / steps, "samples_per_second": samples / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "machine": machine_description("cuda" if cuda else "cpu"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict]) -> str:
    out = ("| config | device | batch x accum | px | precision | grad. checkpointing | timed steps | s/step "
           "| samples/s | peak GPU memory |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        out += (f"| {r['config']} | {r['device']} | {r['batch']} x {r['accumulation']} | {r['resolution']} "
                f"| {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {r['steps']} "
                f"| {r['seconds_per_step']:.3f} | {r['samples_per_second']:.2f} | {peak} |\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=["tiny", "sd21"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu for tiny, cuda for sd21)")
    p.add_argument("--batch", type=int, help="per step (default: tiny 4, sd21 16 as the reference)")
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--resolution", type=int, help="px (default: tiny 64, sd21 512)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: tiny no, sd21 fp16")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    p.add_argument("--workers", type=int, help="data loader processes (default: tiny 0, sd21 4)")
    p.add_argument("--threads", type=int, action="append",
                   help="torch CPU threads; repeat to compare (default: torch's choice)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    sd = args.config == "sd21"
    args.device = args.device or ("cuda" if sd else "cpu")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error("no CUDA device here: run --config sd21 on a GPU machine, or pass --device cpu")
    args.batch = args.batch or (16 if sd else 4)
    args.resolution = args.resolution or (512 if sd else 64)
    args.mixed_precision = args.mixed_precision or ("fp16" if sd and args.device != "cpu" else "no")
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = sd
    args.workers = args.workers if args.workers is not None else (4 if sd else 0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for threads in args.threads or [None]:
        args_threads = argparse.Namespace(**vars(args))
        args_threads.threads = threads
        rows.append(run(args_threads))
    text = table(rows)
    print(text)
    if args.write:
        command = " ".join(["python benchmarks/training_throughput.py", *sys.argv[1:]]).replace(" --write", "")
        body = (f"Command: `{command}`\n\nMachine: {rows[0]['machine']}\n\n"
                "End-to-end optimizer steps of `training.trainer.train` (GeoTIFF crops, VAE and text encoding, "
                "SatUNet forward/backward with min-SNR weighting, AdamW, clipping, EMA); "
                f"{args.warmup} warm-up steps untimed. 1-minute load average at the start: {load:.1f} "
                "(on a small shared machine, multi-threaded CPU timings swing with the load: torch's "
                "threads wait on each other when a core is taken).\n\n" + text)
        write_section(f"Training throughput ({args.config}, {args.device})", body)


if __name__ == "__main__":
    main()
