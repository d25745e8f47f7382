"""GPU throughput of the models behind the tiled tasks, and what it means for a whole Sentinel-2 tile.

Speed is a property of the architecture, not of the weights: this measures the SD-2.1-size
configuration (``engine/resources/sd21``) with random weights, so it runs anywhere.

    python benchmarks/gpu_throughput.py --device cuda                  # the full run on a GPU
    python benchmarks/gpu_throughput.py --device cuda --compile        # also torch.compile'd rows
    python benchmarks/gpu_throughput.py --config tiny --device cpu --batches 1,2 --dtypes fp32 --rounds 2
                                                                       # a CPU smoke run (seconds)
    ... --write                                                        # also update docs/benchmarks.md
    ... --json out.json                                                # the raw rows

What it measures, per dtype and batch size (batch = image evaluations per UNet call):
- the device's matmul peak (a large square matmul in that dtype), the reference for "achieved";
- one UNet evaluation at 512 px output (64x64 latents), and one UNet + metadata ControlNet
  evaluation with the Sentinel-2 super-resolution conditioning (10 channels at 256 px,
  ``conditioning_scale`` 2): ms per image-step and achieved TFLOP/s (FLOPs counted by
  ``torch.utils.flop_counter`` on one call, so they are the model's, not an estimate);
- VAE decoding per 512 px image;
- peak device memory of each row;
- the projection for one 110 km x 110 km Sentinel-2 tile (10,980 px at 10 m) super-resolved 4x
  to 2.5 m: the number of 512 px windows with the tiled tasks' default overlap, times the steps,
  at the best measured batch, plus one VAE decode per window. Reading, blending and writing are
  not in it: they are what ``benchmarks/tasks_tiny.py`` measures on the CPU.

Timing: warm-up calls first (and compilation, for compiled rows, is not timed); CUDA timings
synchronise before the clock is read; the median of ``--rounds`` calls is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine_description, write_section  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Stable Diffusion 2.1's VAE (the one every DiffusionSat checkpoint uses); the tiny preset's for --config tiny.
SD21_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 768,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

#: A Sentinel-2 tile: 109.8 km at 10 m; super-resolved 4x.
S2_TILE_PX = 10980
SR_FACTOR = 4


def _config(config_name: str, component: str) -> dict:
    root = Path(__file__).resolve().parent.parent / "engine" / "resources" / config_name
    path = root / f"{component}.json"
    if component == "vae" and not path.exists():
        return dict(SD21_VAE)
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, rounds: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def matmul_peak_tflops(device: str, dtype: torch.dtype, rounds: int) -> float:
    """The achieved rate of a large square matmul: what "achieved TFLOP/s" is compared with."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch.no_grad():
        seconds = _median_seconds(lambda: a @ b, device, max(rounds, 3), 2)
    return 2 * n**3 / seconds / 1e12


def build_models(config_name: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from engine.models.controlnet import SatControlNet
    from engine.models.unet import SatUNet

    torch.manual_seed(0)
    unet = SatUNet(**_config(config_name, "unet"))
    controlnet = SatControlNet.from_unet(unet, conditioning_in_channels=10, conditioning_scale=2)
    vae = AutoencoderKL(**_config(config_name, "vae"))
    models = []
    for m in (unet, controlnet, vae):
        m = m.to(device, dtype).eval()
        if device.startswith("cuda"):
            m = m.to(memory_format=torch.channels_last)
        models.append(m)
    return models


def measure(config_name: str, device: str, dtype_name: str, batches: list[int], rounds: int, warmup: int,
            compile_: bool, out_px: int = 512) -> list[dict]:
    dtype = DTYPES[dtype_name]
    unet, controlnet, vae = build_models(config_name, device, dtype)
    unet_cfg = unet.config
    latent = out_px // 8
    cond_px = out_px // 2  # the super-resolution ControlNet's conditioning: 256 px for 512 px output
    peak = matmul_peak_tflops(device, dtype, rounds)
    rows = []
    variants = [("eager", unet, controlnet, vae)]
    if compile_:
        variants.append(("compiled", torch.compile(unet), torch.compile(controlnet), torch.compile(vae.decoder)))
    for mode, u, cn, v in variants:
        for batch in batches:
            sample = torch.randn(batch, unet_cfg.in_channels, latent, latent, device=device, dtype=dtype)
            text = torch.randn(batch, 77, unet_cfg.cross_attention_dim, device=device, dtype=dtype)
            t = torch.full((batch,), 500, device=device)
            md = torch.rand(batch, 7, device=device) * 1000
            cond = torch.rand(batch, 10, cond_px, cond_px, device=device, dtype=dtype)
            cond_md = torch.rand(batch, 7, device=device) * 1000

            def unet_step():
                return u(sample, t, text, metadata=md).sample

            def unet_cn_step():
                down, mid = cn(sample, t, encoder_hidden_states=text, controlnet_cond=cond, metadata=md,
                               cond_metadata=cond_md, return_dict=False)
                return u(sample, t, text, metadata=md, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

            z = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)

            def vae_decode():
                return v(vae.post_quant_conv(z)) if mode == "compiled" else vae.decode(z).sample

            for name, fn in (("UNet", unet_step), ("UNet+ControlNet", unet_cn_step), ("VAE decode", vae_decode)):
                with torch.no_grad():
                    try:
                        flops = _count_flops(fn) if mode == "eager" else None
                        _reset_peak(device)
                        seconds = _median_seconds(fn, device, rounds, warmup)
                    except torch.OutOfMemoryError:
                        rows.append({"what": name, "mode": mode, "dtype": dtype_name, "batch": batch, "oom": True})
                        torch.cuda.empty_cache()
                        continue
                if flops is None:  # the same computation as the eager row of this batch
                    flops = next(r["flops"] for r in rows
                                 if r["what"] == name and r["batch"] == batch and r["dtype"] == dtype_name
                                 and r["mode"] == "eager" and not r.get("oom"))
                rows.append({
                    "what": name, "mode": mode, "dtype": dtype_name, "batch": batch, "out_px": out_px,
                    "ms_per_call": seconds * 1e3, "ms_per_image": seconds * 1e3 / batch,
                    "flops": flops, "tflops": flops / seconds / 1e12, "peak_tflops": peak,
                    "peak_mib": _peak_mib(device),
                })
    return rows


def windows_per_tile(out_px: int = 512, overlap: int | None = None) -> int:
    """512 px windows over one super-resolved Sentinel-2 tile, with the tiled tasks' default overlap
    (tile / 8 in input px, i.e. 64 output px at 512)."""
    overlap = out_px // 8 if overlap is None else overlap
    side = S2_TILE_PX * SR_FACTOR
    per_side = math.ceil((side - overlap) / (out_px - overlap))
    return per_side * per_side


def projection(rows: list[dict], steps: int) -> dict | None:
    """Minutes for a whole super-resolved tile at the best measured UNet+ControlNet batch (guidance 1,
    the super-resolution default, so one evaluation per step) plus one VAE decode per window."""
    cn = [r for r in rows if r["what"] == "UNet+ControlNet" and not r.get("oom")]
    dec = [r for r in rows if r["what"] == "VAE decode" and not r.get("oom")]
    if not cn or not dec:
        return None
    best = min(cn, key=lambda r: r["ms_per_image"])
    best_dec = min(dec, key=lambda r: r["ms_per_image"])
    windows = windows_per_tile(best["out_px"])
    # (at another --out-px the per-window times are for that window size: the projection scales with it)
    seconds = windows * (steps * best["ms_per_image"] + best_dec["ms_per_image"]) / 1e3
    return {"windows": windows, "steps": steps, "best": best, "best_decode": best_dec, "minutes": seconds / 60}


def table(rows: list[dict]) -> str:
    out = ("| what | mode | dtype | batch | ms / call | ms / image | GFLOP / image | achieved TFLOP/s | "
           "of matmul peak | peak memory MiB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if r.get("oom"):
            out += f"| {r['what']} | {r['mode']} | {r['dtype']} | {r['batch']} | out of memory | | | | | |\n"
            continue
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        out += (f"| {r['what']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['ms_per_call']:.2f} | "
                f"{r['ms_per_image']:.2f} | {r['flops'] / r['batch'] / 1e9:.2f} | {r['tflops']:.3g} | "
                f"{100 * r['tflops'] / r['peak_tflops']:.0f} % of {r['peak_tflops']:.3g} | {mem} |\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd21", choices=["sd21", "tiny"],
                   help="model architecture (random weights): SD 2.1 size, or the tiny preset for a smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--batches", default="1,2,4,8,16", help="image evaluations per call, comma-separated")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-px", type=int, default=512, help="output window side in px (the model's native 512)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for the whole-tile projection")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--json", type=Path, help="write the raw rows here")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for dtype_name in args.dtypes.split(","):
        rows += measure(args.config, args.device, dtype_name, batches, args.rounds, args.warmup, args.compile,
                        args.out_px)
    body = table(rows)
    proj = projection(rows, args.steps)
    if proj is not None:
        b = proj["best"]
        body += (
            f"\nProjection for one 110 km Sentinel-2 tile super-resolved {SR_FACTOR}x ({S2_TILE_PX * SR_FACTOR}^2 px "
            f"output, {proj['windows']} windows of {b['out_px']} px): {proj['steps']} steps x {b['ms_per_image']:.2f} ms "
            f"(UNet+ControlNet, {b['mode']} {b['dtype']}, batch {b['batch']}) + "
            f"{proj['best_decode']['ms_per_image']:.2f} ms VAE decode per window = "
            f"**{proj['minutes']:.1f} min** of model time on one device (reading, blending and writing not included).\n"
        )
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "projection": proj}, indent=1, default=str))
    if args.write:
        cmd = "python benchmarks/gpu_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(f"GPU throughput ({args.config}, {args.device})",
                      f"Command: `{cmd.replace(' --write', '')}`\n\nMachine: {machine_description(args.device)}\n\n"
                      + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
