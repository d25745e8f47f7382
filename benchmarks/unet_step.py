"""UNet step time: SatUNet vs. the stock diffusers UNet2DConditionModel of the same configuration.

The stock model has the same weights minus the metadata MLPs, so the ratio is the cost of the
metadata path (7 small MLPs and one batched sinusoidal projection per step). Target: <= 1.03x
on the CPU with the tiny configuration.

    python benchmarks/unet_step.py                       # tiny, CPU, fp32
    python benchmarks/unet_step.py --config sd21 --device cuda --dtype bf16   # on a GPU
    python benchmarks/unet_step.py --write               # also update docs/benchmarks.md

Timing: warm-up first; then the two models are timed in alternation (A B A B ...) so that drift
in machine load hits both equally; the median of the per-round ratios is reported. CUDA timings
synchronise before reading the clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._report import machine_description, write_section  # noqa: E402
from engine.models.configs import resource_path  # noqa: E402
from engine.models.unet import SatUNet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(config_name: str, device: str, dtype: torch.dtype):
    config = json.loads(resource_path(config_name, "unet.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    ours = SatUNet(**config).to(device, dtype).eval()
    stock_cfg = {k: v for k, v in config.items() if k not in ("use_metadata", "num_metadata")}
    stock = UNet2DConditionModel(**stock_cfg).to(device, dtype).eval()
    stock.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("metadata_embedding.")})
    return ours, stock, config


def time_once(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(config_name: str, device: str, dtype_name: str, batch: int, latent: int, rounds: int, warmup: int,
        precomputed: bool = False) -> dict:
    dtype = DTYPES[dtype_name]
    ours, stock, config = build(config_name, device, dtype)
    sample = torch.randn(batch, config["in_channels"], latent, latent, device=device, dtype=dtype)
    text = torch.randn(batch, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    t = torch.tensor([500] * batch, device=device)
    md = torch.rand(batch, 7, device=device) * 1000

    with torch.no_grad():
        embeds = ours.embed_metadata(md, batch, dtype)

        def step_ours():
            if precomputed:  # as the pipeline runs it: metadata embedded once per image
                ours(sample, t, text, metadata_embeds=embeds)
            else:
                ours(sample, t, text, metadata=md)

        def step_stock():
            stock(sample, t, encoder_hidden_states=text)

        for _ in range(warmup):
            step_ours()
            step_stock()
        ours_t, stock_t, ratios = [], [], []
        for i in range(rounds):
            # alternate which goes first so neither always runs on a warmer cache
            if i % 2:
                b = time_once(step_stock, device)
                a = time_once(step_ours, device)
            else:
                a = time_once(step_ours, device)
                b = time_once(step_stock, device)
            ours_t.append(a)
            stock_t.append(b)
            ratios.append(a / b)
    return {
        "config": config_name,
        "device": device,
        "dtype": dtype_name,
        "batch": batch,
        "latent": latent,
        "rounds": rounds,
        "satunet_ms": statistics.median(ours_t) * 1e3,
        "stock_ms": statistics.median(stock_t) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_iqr": _iqr(ratios),
        "threads": torch.get_num_threads(),
        "mode": "metadata embedded once per image (pipeline)" if precomputed else "metadata embedded every step",
    }


def _iqr(values):
    q = statistics.quantiles(values, n=4)
    return (q[0], q[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=["tiny", "sd21"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    p.add_argument("--latent", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args()
    latent = args.latent or json.loads(resource_path(args.config, "unet.json").read_text())["sample_size"]
    rows = [run(args.config, args.device, args.dtype, args.batch, latent, args.rounds, args.warmup, pre)
            for pre in (False, True)]
    table = (
        "| config | device | dtype | batch x latent | mode | SatUNet ms/step | stock ms/step | ratio (median, IQR) | target <= 1.03 |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        verdict = "meets" if r["ratio"] <= 1.03 else "MISSES"
        table += (
            f"| {r['config']} | {r['device']} ({r['threads']} threads) | {r['dtype']} | {r['batch']} x {r['latent']}x{r['latent']} "
            f"| {r['mode']} | {r['satunet_ms']:.2f} | {r['stock_ms']:.2f} | {r['ratio']:.3f} "
            f"({r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f}) | {verdict} |\n"
        )
    print(table)
    if args.write:
        body = (
            f"Command: `python benchmarks/unet_step.py --config {args.config} --device {args.device} "
            f"--dtype {args.dtype} --rounds {args.rounds} --write`\n\n"
            f"Machine: {machine_description(args.device)}\n\n" + table
        )
        write_section(f"UNet step: SatUNet vs stock UNet2DConditionModel ({args.config}, {args.device}, {args.dtype})", body)


if __name__ == "__main__":
    main()
