"""GPU throughput of the models behind the tiled tasks, and what it means for a whole Sentinel-2 tile.

Speed is a property of the architecture, not of the weights: this measures the SD-2.1-size
configuration (``engine/resources/sd21``) with random weights, so it runs anywhere.

    python benchmarks/gpu_throughput.py --write       # THE prepared GPU run (< ~8 min on an H200), into the docs
    python benchmarks/gpu_throughput.py --quick       # the CPU smoke run CI and tests use (tiny model, seconds)
    ... --no-compile / --no-e2e / --budget-s 300      # fewer rows; --json out.json: the raw rows

On CUDA the defaults are the issue's list: fp16 and bf16; batch 1/2/4/8/16 eager; compiled (what
``--compile`` does: the UNet and ControlNet blocks, engine.models.bundle.compile_blocks) at batch
1 and 8 (each batch shape is its own compilation, ~a minute each); the same with CUDA graphs
(``DIFFUSIONSAT_COMPILE_MODE=reduce-overhead``) at batch 8, to tell whether they are worth enabling;
then the end-to-end super-resolution. A time budget (``--budget-s``, default 420 s) skips what is
left rather than run past the device's lease; skipped rows are listed.

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

- end to end: tiles/s of super-resolution of a synthetic 13-band Sentinel-2 scene through the real
  engine task (``engine.tasks.run_task``, as the CLI and the server run it: reading, radiometry,
  the ControlNet sampler at 20 steps, blending, COG writing) with ``batch_size``, with an SD-2.1-size
  model of random weights saved as a model folder (its text encoder is a 2-layer CLIP of SD 2.1's
  width: one prompt encoding per tile, not a measurable share);

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


class Budget:
    """Wall-clock seconds the run may take (rows left when it is spent are skipped, not run)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def exhausted(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


def measure(config_name: str, device: str, dtype_name: str, batches: list[int], rounds: int, warmup: int,
            compile_: bool, out_px: int = 512, compile_batches: tuple = (1, 8), cudagraph_batches: tuple = (8,),
            budget: Budget | None = None) -> list[dict]:
    dtype = DTYPES[dtype_name]
    unet, controlnet, vae = build_models(config_name, device, dtype)
    unet_cfg = unet.config
    latent = out_px // 8
    cond_px = out_px // 2  # the super-resolution ControlNet's conditioning: 256 px for 512 px output
    peak = matmul_peak_tflops(device, dtype, rounds)
    rows = []
    variants = [("eager", batches)]
    if compile_:
        variants += [("compiled", [b for b in compile_batches if b in batches] or batches[:1])]
        if device.startswith("cuda") and cudagraph_batches:
            variants += [("compiled+cudagraphs", cudagraph_batches)]
    for mode, mode_batches in variants:
        if mode != "eager":
            import os

            from engine.models.bundle import compile_blocks

            if mode == "compiled+cudagraphs":  # fresh blocks: the compiled ones are compiled in place
                unet, controlnet, vae = build_models(config_name, device, dtype)
                os.environ["DIFFUSIONSAT_COMPILE_MODE"] = "reduce-overhead"
            try:
                compile_blocks(unet)
                compile_blocks(controlnet)
            finally:
                os.environ.pop("DIFFUSIONSAT_COMPILE_MODE", None)
        u, cn, v = unet, controlnet, vae
        for batch in mode_batches:
            if budget is not None and budget.exhausted():
                rows.append({"what": "*", "mode": mode, "dtype": dtype_name, "batch": batch, "skipped": True})
                continue
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
                return v.decode(z).sample

            # (the VAE is not compiled by --compile: its decode rows are measured eagerly only)
            what = (("UNet", unet_step), ("UNet+ControlNet", unet_cn_step), ("VAE decode", vae_decode))
            for name, fn in what if mode == "eager" else what[:2]:
                with torch.no_grad():
                    try:
                        flops = _count_flops(fn) if mode == "eager" else None
                        _reset_peak(device)
                        seconds = _median_seconds(fn, device, rounds, warmup)
                    except torch.OutOfMemoryError:  # (also raised on the CPU build; only CUDA gets there)
                        rows.append({"what": name, "mode": mode, "dtype": dtype_name, "batch": batch, "oom": True})
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                if flops is None:  # the same computation as the eager row of this batch
                    flops = next((r["flops"] for r in rows
                                  if r["what"] == name and r["batch"] == batch and r["dtype"] == dtype_name
                                  and r["mode"] == "eager" and not r.get("oom") and not r.get("skipped")), None)
                    if flops is None:
                        flops = _count_flops(fn)
                rows.append({
                    "what": name, "mode": mode, "dtype": dtype_name, "batch": batch, "out_px": out_px,
                    "ms_per_call": seconds * 1e3, "ms_per_image": seconds * 1e3 / batch,
                    "flops": flops, "tflops": flops / seconds / 1e12, "peak_tflops": peak,
                    "peak_mib": _peak_mib(device),
                })
    return rows


def save_random_model(config_name: str, folder: Path) -> str:
    """A model folder the engine loads like a checkpoint: the ``config_name`` UNet and a super-resolution
    ControlNet with random weights (fp16 on disk), SD 2.1's VAE, a 2-layer CLIP text encoder of SD 2.1's
    width, the tiny preset's tokenizer and scheduler. ``tiny`` is the built-in preset itself."""
    if config_name == "tiny":
        return "tiny"
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.bundle import ModelBundle
    from engine.models.controlnet import SatControlNet
    from engine.models.loading import save_bundle
    from engine.models.tiny import build_tiny
    from engine.models.unet import SatUNet

    tiny = build_tiny()
    torch.manual_seed(0)
    unet = SatUNet(**_config(config_name, "unet"))
    cn = SatControlNet.from_unet(unet, conditioning_in_channels=10, conditioning_scale=2)
    width = unet.config.cross_attention_dim
    text_cfg = tiny.text_encoder.config.to_dict()
    text_cfg.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
                    projection_dim=width, num_hidden_layers=2)
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items() if not k.startswith("_")}))
    vae = AutoencoderKL(**_config(config_name, "vae"))
    for m in (unet, cn, vae, text):
        m.half()
    bundle = ModelBundle(name=f"{config_name}-random", source="random weights", unet=unet, vae=vae,
                         text_encoder=text, tokenizer=tiny.tokenizer, scheduler=tiny.scheduler,
                         native_resolution=512, controlnets={"superres": cn})
    return str(save_bundle(bundle, folder / f"{config_name}-random", controlnet="superres"))


def end_to_end(model: str, device: str, dtype_name: str, batch_sizes: list[int], steps: int, out_px: int,
               tiles_side: int, compile_: bool, folder: Path, budget: Budget | None = None) -> list[dict]:
    """Super-resolution tiles/s through ``engine.tasks.run_task`` on a synthetic 13-band scene of about
    ``tiles_side``² windows, per ``batch_size``: one warm-up run (loading, compiling every batch shape),
    then one timed run of the same scene with the model cached (as the server's next job)."""
    from benchmarks.tasks_tiny import make_request
    from engine.models.cache import ModelCache
    from engine.tasks import parse_request, plan, run_task

    scene = make_request("superres", folder, tiles_side * out_px)
    cache = ModelCache()
    rows = []
    for batch_size in batch_sizes:
        if budget is not None and budget.exhausted():
            rows.append({"what": "superres end to end", "batch_size": batch_size, "skipped": True})
            continue
        req = parse_request({**scene, "model": model, "device": device, "dtype": dtype_name, "steps": steps,
                             "seed": 1, "resolution": out_px, "batch_size": batch_size, "compile": compile_})
        tiles = plan(req)["tiles"]
        out = folder / f"sr-{batch_size}.tif"
        warm_start = time.perf_counter()
        run_task(req, out, models=cache)
        warm = time.perf_counter() - warm_start
        _sync(device)
        _reset_peak(device)
        start = time.perf_counter()
        run_task(req.model_copy(update={"seed": 2}), out, models=cache)
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append({"what": "superres end to end", "batch_size": batch_size, "dtype": dtype_name,
                     "compiled": compile_, "steps": steps, "tiles": tiles, "seconds": seconds,
                     "first_run_seconds": warm, "tiles_per_s": tiles / seconds, "out_px": out_px,
                     "peak_mib": _peak_mib(device)})
    return rows


def e2e_table(rows: list[dict]) -> str:
    out = ("| batch_size | dtype | compiled | steps | windows | seconds | windows/s | first run (load, compile) s | "
           "peak memory MiB |\n|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if r.get("skipped"):
            out += f"| {r['batch_size']} | skipped: time budget spent | | | | | | | |\n"
            continue
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        out += (f"| {r['batch_size']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {r['steps']} | "
                f"{r['tiles']} | {r['seconds']:.2f} | {r['tiles_per_s']:.3g} | {r['first_run_seconds']:.1f} | {mem} |\n")
    return out


def versions(device: str) -> str:
    import diffusers

    text = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return text


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
    cn = [r for r in rows if r["what"] == "UNet+ControlNet" and "ms_per_image" in r]
    dec = [r for r in rows if r["what"] == "VAE decode" and "ms_per_image" in r]
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
        if r.get("skipped"):
            out += f"| (all) | {r['mode']} | {r['dtype']} | {r['batch']} | skipped: time budget spent | | | | | |\n"
            continue
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
    p.add_argument("--quick", action="store_true",
                   help="the CPU smoke run (CI, tests): tiny model, fp32, batches 1,2, 64 px, one round, one "
                        "thread, compiled rows traced without generated kernels, a small end-to-end run at 2 steps")
    p.add_argument("--config", default=None, choices=["sd21", "tiny"],
                   help="model architecture (random weights): SD 2.1 size (default), or the tiny preset")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated: fp32, fp16, bf16 (default fp16,bf16)")
    p.add_argument("--batches", default=None, help="image evaluations per call (default 1,2,4,8,16)")
    p.add_argument("--compile-batches", default="1,8", help="batches also measured compiled")
    p.add_argument("--cudagraph-batches", default="8", help="batches also measured compiled with CUDA graphs "
                   "(CUDA only; empty: none)")
    p.add_argument("--rounds", type=int, default=None, help="timed calls per row (median; default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3)")
    p.add_argument("--out-px", type=int, default=None, help="output window side in px (default: 512)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (projection and end to end)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the compiled models (--compile's path)")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="also run super-resolution end to end through the engine task")
    p.add_argument("--e2e-batch-sizes", default=None, help="batch_size values end to end (default 1,8)")
    p.add_argument("--e2e-tiles", type=int, default=None, help="scene side in windows end to end (default 4)")
    p.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    p.add_argument("--json", type=Path, help="write the raw rows here")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    quick = args.quick
    pick = lambda value, full, smoke: value if value is not None else (smoke if quick else full)  # noqa: E731
    config = pick(args.config, "sd21", "tiny")
    device = pick(args.device, "cuda" if torch.cuda.is_available() else "cpu", "cpu")
    dtypes = pick(args.dtypes, "fp16,bf16", "fp32").split(",")
    batches = [int(b) for b in pick(args.batches, "1,2,4,8,16", "1,2").split(",")]
    rounds, warmup, out_px = pick(args.rounds, 10, 1), pick(args.warmup, 3, 0), pick(args.out_px, 512, 64)
    e2e_sizes = [int(b) for b in pick(args.e2e_batch_sizes, "1,8", "2").split(",")]
    e2e_tiles = pick(args.e2e_tiles, 4, 1)
    compile_batches = tuple(int(b) for b in args.compile_batches.split(",") if b)
    cudagraph_batches = tuple(int(b) for b in args.cudagraph_batches.split(",") if b)
    steps = 2 if quick and args.steps == 20 else args.steps
    threads = torch.get_num_threads()
    if quick:  # the compile path traced by dynamo, without inductor's code generation (minutes on 2 cores)
        import os

        os.environ.setdefault("DIFFUSIONSAT_COMPILE_BACKEND", "eager")
        torch.set_num_threads(1)  # tiny tensors: OpenMP's spin-waits cost more than a second thread gains
    try:
        return _run(args, quick, config, device, dtypes, batches, rounds, warmup, out_px, e2e_sizes, e2e_tiles,
                    compile_batches, cudagraph_batches, steps, argv)
    finally:
        torch.set_num_threads(threads)
        if quick:
            os.environ.pop("DIFFUSIONSAT_COMPILE_BACKEND", None)


def _run(args, quick, config, device, dtypes, batches, rounds, warmup, out_px, e2e_sizes, e2e_tiles,
         compile_batches, cudagraph_batches, steps, argv) -> int:
    from engine.device import Placement, configure_backends

    if device.startswith("cuda"):
        configure_backends(Placement(device, dtypes[0]))  # what the engine sets when it places a model
    budget = Budget(args.budget_s)
    started = time.perf_counter()
    rows = []
    for dtype_name in dtypes:  # eager and compiled first: the rows the issue asks for
        rows += measure(config, device, dtype_name, batches, rounds, warmup, args.compile, out_px,
                        compile_batches, (), budget)
    e2e, failures = [], []
    if args.e2e:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model = save_random_model(config, Path(tmp))
            runs = [(e2e_sizes, False)] + ([(e2e_sizes[-1:], True)] if args.compile and device.startswith("cuda") else [])
            for sizes, compiled in runs:
                try:
                    e2e += end_to_end(model, device, dtypes[0], sizes, steps, out_px, e2e_tiles, compiled, Path(tmp),
                                      budget)
                except Exception as err:
                    if quick:
                        raise
                    failures.append(f"end to end (compiled={compiled}): {type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:300]}")
    if args.compile and device.startswith("cuda") and cudagraph_batches:  # last: the optional question
        try:
            rows += [r for r in measure(config, device, dtypes[-1], cudagraph_batches, rounds, warmup, True, out_px,
                                        (), cudagraph_batches, budget) if r["mode"] == "compiled+cudagraphs"]
        except Exception as err:  # noqa: BLE001 (an answer too: keep the rows measured so far)
            failures.append(f"compiled+cudagraphs: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    body = table(rows)
    proj = projection(rows, steps)
    if proj is not None:
        b = proj["best"]
        body += (
            f"\nProjection for one 110 km Sentinel-2 tile super-resolved {SR_FACTOR}x ({S2_TILE_PX * SR_FACTOR}^2 px "
            f"output, {proj['windows']} windows of {b['out_px']} px): {proj['steps']} steps x {b['ms_per_image']:.2f} ms "
            f"(UNet+ControlNet, {b['mode']} {b['dtype']}, batch {b['batch']}) + "
            f"{proj['best_decode']['ms_per_image']:.2f} ms VAE decode per window = "
            f"**{proj['minutes']:.1f} min** of model time on one device (reading, blending and writing not included).\n"
        )
    if e2e:
        body += ("\nEnd to end: super-resolution (factor 4) of a synthetic 13-band scene through `engine.tasks.run_task` "
                 f"(model folder of random weights, {steps} steps, the sampler default), timed on the second run "
                 "with the model cached:\n\n" + e2e_table(e2e))
        done = [r for r in e2e if "tiles_per_s" in r]
        if done:
            best = max(done, key=lambda r: r["tiles_per_s"])
            windows = windows_per_tile(best["out_px"])
            body += (f"\nAt the best end-to-end rate ({best['tiles_per_s']:.3g} windows/s, batch_size "
                     f"{best['batch_size']}) a whole tile's {windows} windows take "
                     f"**{windows / best['tiles_per_s'] / 60:.1f} min** (reading, blending and writing included).\n")
    for failure in failures:
        body += f"\nFailed: {failure}\n"
    body += f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.\n"
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "projection": proj, "e2e": e2e, "failures": failures},
                                        indent=1, default=str))
    if args.write:
        cmd = "python benchmarks/gpu_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(f"GPU throughput ({config}, {device})",
                      f"Command: `{cmd.replace(' --write', '')}`\n\nMachine: {machine_description(device)}; "
                      f"{versions(device)}\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
