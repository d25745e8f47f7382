"""The ``diffusionsat`` command line.

Every user error ends in one line on stderr and exit code 2, with nothing written; ``--debug``
shows tracebacks. ``--json`` prints one JSON object on stdout (progress stays on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .errors import Cancelled, DiffusionSatError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EPILOG_GENERATE = """\
examples:
  # Rome, a 0.07 x 0.05 degree box, 512 x 512 px, mid-June 2021, 5 % cloud
  diffusionsat generate --bbox 12.45,41.88,12.52,41.93 --crs EPSG:4326 --date 2021-06-15 \\
      --cloud-cover 0.05 --prompt "a satellite image of a stadium" --size 512 --out rome.tif

  # the same ground in UTM zone 33N metres, with a fixed seed, machine-readable result
  diffusionsat generate --bbox 288500,4639300,294300,4644900 --crs EPSG:32633 \\
      --date 2021-06-15 --seed 7 --out rome_utm.tif --json

how the model is conditioned:
  The centre longitude/latitude and the ground sample distance (metres per pixel, measured
  on the ground, so any CRS gives the same answer for the same extent) come from --bbox,
  --crs and the output size; with --date and --cloud-cover they form the 7 metadata values
  DiffusionSat was trained with. Unknown values are left out, as in training.
  The output is a Cloud-Optimized GeoTIFF exactly on the requested grid, tagged
  synthetic=true with the model, seed, prompt and metadata.

models (--model):
  auto     the best installed model (DIFFUSIONSAT_MODELS or ~/.local/share/diffusionsat/models),
           else the built-in tiny model, with a notice
  tiny     built-in, random weights: noise-like images, for trying the tool and tests
  FOLDER   an official DiffusionSat checkpoint folder (checkpoint-N/unet inside), a UNet folder,
           or a diffusers SD 2.1 folder with --unet; --base supplies missing components
  hf:OWNER/NAME[@REV]  downloaded from the Hugging Face hub
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default="auto", help="auto (default), tiny, a model folder, or hf:owner/name")
    g.add_argument("--unet", help="a UNet folder to combine with --model's other components")
    g.add_argument("--base", help="a Stable Diffusion 2.1 folder for components --model lacks")
    g.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="precision; auto = fp16 on CUDA, fp32 on the CPU")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output GeoTIFF path (.tif); written atomically")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    g.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def build_parser() -> argparse.ArgumentParser:
    from .pipelines.text2img import SCHEDULERS

    parser = _Parser(
        prog="diffusionsat",
        description="Generate and transform satellite imagery with DiffusionSat, a diffusion model "
        "conditioned on text and on where, when and at what resolution an image was taken.",
    )
    parser.add_argument("--version", action="version", version=f"diffusionsat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser(
        "generate",
        help="generate an image for an extent and a date",
        description="Generate a synthetic satellite image covering exactly --bbox in --crs.",
        epilog=EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = g.add_argument_group("where and when")
    where.add_argument("--bbox", required=True, metavar="MINX,MINY,MAXX,MAXY",
                       help="extent in --crs units (degrees for EPSG:4326, metres for UTM)")
    where.add_argument("--crs", default="EPSG:4326", help="CRS of --bbox and of the output (default EPSG:4326)")
    where.add_argument("--date", help="acquisition date YYYY-MM-DD to condition on (default: unknown)")
    where.add_argument("--cloud-cover", type=_float, metavar="0..1",
                       help="cloud cover fraction 0..1 (default: unknown, as training's dropped value)")
    what = g.add_argument_group("image")
    what.add_argument("--prompt", default="a satellite image", help='text prompt (default "a satellite image")')
    what.add_argument("--size", type=_int, help="width and height in px, a multiple of 8 (default: the model's native size)")
    what.add_argument("--width", type=_int, help="width in px (overrides --size)")
    what.add_argument("--height", type=_int, help="height in px (overrides --size)")
    what.add_argument("--steps", type=_int, default=20, help="denoising steps (default 20)")
    what.add_argument("--guidance", type=_float, default=7.5, help="classifier-free guidance scale (default 7.5; <= 1 turns it off)")
    what.add_argument("--seed", type=_int, help="random seed (default: a fresh one, recorded in the output)")
    what.add_argument("--scheduler", default="default", choices=SCHEDULERS,
                      help="sampler: default = the checkpoint's own; dpm++ and unipc need fewer steps")
    _add_model_args(g)
    _add_output_args(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list installed models and where they are looked for")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_models)
    return parser


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def _progress_bar(enabled: bool) -> tuple[Optional[Callable], Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(p) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=p.total_steps * p.total_tiles, unit="step", desc="denoising",
                              file=sys.stderr, dynamic_ncols=True, leave=False)
        done = p.tile * p.total_steps + p.step
        bar["bar"].update(done - bar["bar"].n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def _notify(args, lines: Sequence[str]) -> None:
    if getattr(args, "quiet", False):
        return
    for line in lines:
        print(f"note: {line}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from .metadata import parse_bbox, parse_date
    from .tasks import generate, parse_request

    request = parse_request(
        {
            "task": "generate",
            "bbox": parse_bbox(args.bbox),
            "crs": args.crs,
            "date": parse_date(args.date) if args.date else None,
            "cloud_cover": args.cloud_cover,
            "size": args.size,
            "width": args.width,
            "height": args.height,
            "prompt": args.prompt,
            "steps": args.steps,
            "guidance": args.guidance,
            "seed": args.seed,
            "scheduler": args.scheduler,
            "model": args.model,
            "unet": args.unet,
            "base": args.base,
            "device": args.device,
            "dtype": args.dtype,
        }
    )
    show_bar = not args.quiet and sys.stderr.isatty()
    update, close = _progress_bar(show_bar)

    def loaded(bundle, placement) -> None:
        if not args.quiet:
            print(f"model: {bundle.name} on {placement.device} ({placement.dtype})", file=sys.stderr)

    try:
        result = generate(request, args.out, progress=update, on_model_loaded=loaded)
    finally:
        close()
    _notify(args, result.warnings)
    if args.json:
        print(json.dumps(result.as_dict()))
    elif not args.quiet:
        md = result.metadata
        print(
            f"wrote {result.path} ({result.width}x{result.height} px, seed {result.seed}, "
            f"gsd {md.get('gsd_m') or 0:.2f} m, centre {md.get('lon_deg') or 0:.5f},{md.get('lat_deg') or 0:.5f}) "
            f"in {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.loading import installed_models, models_dirs

    models = installed_models()
    if args.json:
        print(json.dumps({
            "search_path": [str(p) for p in models_dirs()],
            "models": [{"name": "tiny", "path": None, "resolution": 256, "kind": "built-in"}]
            + [m.as_dict() for m in models],
        }))
        return 0
    print("built-in:  tiny (random weights, 256 px; every task; for tests and smoke runs)")
    for m in models:
        print(f"installed: {m.name} ({m.kind}, {m.resolution} px) {m.path}")
    if not models:
        print(f"no installed models in {os.pathsep.join(str(p) for p in models_dirs())}")
    return 0


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, config notes) is noise for a CLI user."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub", "rasterio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieting is best effort; a library change must not break the CLI
        logging.getLogger(__name__).debug("could not quiet library logging", exc_info=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors (already printed)
        return int(exit_.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except Cancelled as err:
        print(f"diffusionsat {args.command}: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffusionSatError as err:
        if debug:
            raise
        print(f"diffusionsat {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"diffusionsat {args.command}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"diffusionsat {args.command}: error: out of memory; lower --size or use a GPU", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one line instead of a traceback; --debug shows it
        if debug:
            raise
        if _is_cuda_oom(err):
            print(f"diffusionsat {args.command}: error: the GPU ran out of memory; lower --size, "
                  "use --dtype fp16, or --device cpu", file=sys.stderr)
            return 1
        print(f"diffusionsat {args.command}: internal error: {type(err).__name__}: {err} "
              "(rerun with --debug and report it)", file=sys.stderr)
        return 1


def _is_cuda_oom(err: BaseException) -> bool:
    return type(err).__name__ == "OutOfMemoryError"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
