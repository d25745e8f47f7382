"""The ``diffusionsat train``, ``evaluate`` and ``prepare`` commands.

The engine's command line knows nothing of training: it calls :func:`register` through the
``diffusionsat.commands`` entry point (pyproject.toml), which adds these subcommands. Building the
parser stays cheap: the trainer, torch and the data loaders are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from engine.cli import _float, _int
from engine.errors import InvalidRequest
from engine.tasks import GenerateRequest

EPILOG_TRAIN = """\
examples:
  diffusionsat train image --data shards/{000..099}.tar --base <SD 2.1 or DiffusionSat folder> --out runs/md7
  diffusionsat train image --data my_geotiffs/ --base <folder> --resolution 256 --out runs/mine
  diffusionsat train image --data geotiffs/ --base tiny --resolution 64 --max-steps 4 --checkpoint-every 2 \\
      --batch-size 2 --lr 1e-4 --out run/        # a CPU smoke run; then: diffusionsat generate --model run/ ...
  diffusionsat train controlnet --task superres --unet runs/md7 --data s2_pairs/ --out runs/sr
  accelerate launch --multi_gpu -m engine.cli train image ...      # many GPUs / nodes (accelerate config)
  diffusionsat train image ... --resume latest

Defaults follow the reference recipe (docs/training.md): AdamW 0.9/0.999, weight decay 1e-2, constant
LR 2e-6 (512 px) / 4e-6 (256 px), min-SNR-5 weighting, EMA, metadata and caption dropout 0.1.
"""


def register(sub) -> None:
    """Add train, evaluate and prepare to the ``diffusionsat`` subparsers ``sub`` (the entry point
    ``diffusionsat.commands: training`` in pyproject.toml)."""
    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="train a single-image model or a ControlNet (accelerate)",
                           description="Train DiffusionSat models on shards or GeoTIFF folders.")
    kinds = train.add_subparsers(dest="train_kind", metavar="KIND", parser_class=type(train), required=True)
    for kind in ("image", "controlnet"):
        p = kinds.add_parser(kind, help="the SatUNet" if kind == "image" else "a ControlNet beside a frozen SatUNet",
                             epilog=EPILOG_TRAIN, formatter_class=fmt)
        g = p.add_argument_group("data and model")
        g.add_argument("--data", action="append", required=True,
                       help="shards (shards/{000..099}.tar, a folder, URLs), a GeoTIFF folder, or a .txt list (repeat)")
        g.add_argument("--out", required=True, help="run folder (checkpoints, logs, validation images)")
        if kind == "image":
            g.add_argument("--base", required=True, help="tiny, an SD 2.1 folder, a DiffusionSat folder, or hf:owner/name")
            g.add_argument("--no-metadata", dest="use_metadata", action="store_false",
                           help="train without metadata embeddings (the SD baseline)")
        else:
            g.add_argument("--task", required=True, help="superres (Sentinel-2 -> RGB), temporal (ControlNet3D) or control")
            g.add_argument("--unet", required=True, help="the frozen UNet: a training run, a model folder, or tiny")
            g.add_argument("--controlnet", dest="controlnet_init", help="continue from this ControlNet folder")
            g.add_argument("--conditioning-resolution", type=_int, help="px of the conditioning (superres: resolution/2)")
            g.add_argument("--frames", type=_int, default=3, help="temporal conditioning frames (default 3)")
        g.add_argument("--components", help="an SD 2.1 folder for components the model lacks")
        g.add_argument("--resolution", type=_int, help="px, a multiple of 8 (default 512; temporal 256)")
        g.add_argument("--crop-size", type=_int, help="GeoTIFF crop in native px (default: --resolution)")
        g.add_argument("--crop", default="grid", choices=["grid", "random"], help="GeoTIFF crops (default grid)")
        g.add_argument("--crops-per-image", type=_int, default=1, help="random crops per GeoTIFF and epoch")
        g.add_argument("--rgb-bands", help="GeoTIFF bands used as R,G,B, e.g. 4,3,2 (default: from the file)")
        g.add_argument("--fmow-csv", help="fMoW metadata CSV for centre lon/lat when metadata.json has none")
        o = p.add_argument_group("optimisation (defaults: the reference recipe)")
        o.add_argument("--batch-size", type=_int, default=16, help="per process (default 16)")
        o.add_argument("--gradient-accumulation-steps", type=_int, default=1)
        o.add_argument("--max-steps", type=_int, help="optimizer steps")
        o.add_argument("--lr", type=_float, help="learning rate (default from the recipe and --resolution)")
        o.add_argument("--lr-scheduler", default="constant", help="constant (default), linear, cosine, ...")
        o.add_argument("--lr-warmup-steps", type=_int, default=0)
        o.add_argument("--adam-weight-decay", type=_float, default=1e-2)
        o.add_argument("--max-grad-norm", type=_float, default=1.0, help="0 turns clipping off (default 1)")
        o.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
        o.add_argument("--gradient-checkpointing", action="store_true")
        o.add_argument("--snr-weighting", choices=["reference", "v", "none"],
                       help="reference: min(SNR,5)/SNR as the released models (image default); v; none (ControlNet)")
        o.add_argument("--no-ema", dest="ema", action="store_const", const=False, help="no EMA copy (image)")
        o.add_argument("--metadata-dropout", type=_float, default=0.1)
        o.add_argument("--caption-dropout", type=_float, default=0.1)
        o.add_argument("--seed", type=_int, default=0)
        r = p.add_argument_group("checkpoints, validation, logging")
        r.add_argument("--checkpoint-every", type=_int, help="steps (default 10000; ControlNet 5000)")
        r.add_argument("--checkpoints-total-limit", type=_int, help="keep only the newest N checkpoints")
        r.add_argument("--resume", help="latest, or a checkpoint-N folder")
        r.add_argument("--validation-every", type=_int, help="steps (default: --checkpoint-every; 0: off)")
        r.add_argument("--validation-samples", type=_int, default=2)
        r.add_argument("--validation-steps", type=_int, default=20)
        r.add_argument("--validation-prompt", help="prompt for validation images (default: the samples' captions)")
        r.add_argument("--num-workers", type=_int, default=2, help="data loader processes (default 2)")
        r.add_argument("--log-every", type=_int, default=10, help="a progress line every N steps (default 10)")
        r.add_argument("--report-to", help="tensorboard (default when installed), wandb, all, none")
        r.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is available")
        r.add_argument("--json", action="store_true", help="print the result as one JSON object")
        r.add_argument("--debug", action="store_true", help="show tracebacks for errors")
        p.set_defaults(func=cmd_train, kind=kind)

    e = sub.add_parser("evaluate", help="compare generated images with a validation set (SSIM, PSNR, FID, LPIPS)")
    e.add_argument("--model", required=True, help="a training run, a model folder, or tiny")
    e.add_argument("--data", action="append", required=True, help="validation GeoTIFFs or shards (repeat)")
    e.add_argument("--metrics", default="ssim,psnr", help="comma-separated: ssim,psnr,fid,lpips (default ssim,psnr)")
    e.add_argument("--fid-weights", help="Inception weights file for FID (never downloaded)")
    e.add_argument("--lpips-weights", help="LPIPS network weights file (never downloaded)")
    sampling = GenerateRequest.model_fields  # evaluation samples as generate does
    e.add_argument("--steps", type=_int, default=sampling["steps"].default,
                   help=f"denoising steps (default {sampling['steps'].default}, as generate)")
    e.add_argument("--guidance", type=_float, default=sampling["guidance"].default,
                   help=f"guidance scale (default {sampling['guidance'].default:g}, as generate)")
    e.add_argument("--seed", type=_int, default=0)
    e.add_argument("--limit", type=_int, default=100, help="at most N samples (default 100)")
    e.add_argument("--batch-size", type=_int, default=4)
    e.add_argument("--resolution", type=_int, help="px (default: the model's)")
    e.add_argument("--base", help="an SD 2.1 folder for components the model lacks")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    e.add_argument("--out", help="write the results JSON here (always printed on stdout)")
    e.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("prepare", help="cut GeoTIFFs into training shards")
    r.add_argument("--data", action="append", required=True, help="a GeoTIFF folder, files or a .txt list (repeat)")
    r.add_argument("--out", required=True, help="folder for the shards")
    r.add_argument("--resolution", type=_int, default=256, help="stored px (default 256)")
    r.add_argument("--crop-size", type=_int, help="crop in native px (default: --resolution)")
    r.add_argument("--shard-size", type=_int, default=1000, help="samples per shard (default 1000)")
    r.add_argument("--rgb-bands", help="bands used as R,G,B (default: from the file)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    r.set_defaults(func=cmd_prepare)


def _bands(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise InvalidRequest(f"--rgb-bands {text!r} must be band numbers like 4,3,2") from None


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .trainer import train

    names = set(TrainConfig.__dataclass_fields__) - {"rgb_bands", "extra"}
    fields = {k: v for k, v in vars(args).items() if k in names and v is not None}
    result = train(TrainConfig(**fields, rgb_bands=_bands(args.rgb_bands)))
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    result = evaluate(args.model, args.data, args.metrics, steps=args.steps, seed=args.seed, guidance=args.guidance,
                      limit=args.limit, batch_size=args.batch_size, resolution=args.resolution,
                      fid_weights=args.fid_weights, lpips_weights=args.lpips_weights, base=args.base,
                      device=args.device, dtype=args.dtype, out=args.out)
    print(json.dumps(result))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .datasets.prepare import prepare_shards

    result = prepare_shards(args.data, args.out, resolution=args.resolution, crop_size=args.crop_size,
                            shard_size=args.shard_size, rgb_bands=_bands(args.rgb_bands))
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"wrote {result.samples} samples in {len(result.shards)} shards to {args.out} "
              f"in {result.seconds:.1f} s", file=sys.stderr)
    return 0
