"""The ``diffusionsat`` command line.

Every user error ends in one line on stderr and exit code 2, with nothing written; ``--debug``
shows tracebacks. ``--json`` prints one JSON object on stdout (progress stays on stderr).

Over 500 lines because it is every command's parser with its examples (epilogs), the task options
generated from the request models, output and progress formatting, and the process frame (signals,
one-line errors, library logging); the commands' work lives in :mod:`engine.tasks`,
:mod:`engine.server` and :mod:`engine.models`, and training adds its commands by entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Literal,
    Optional,
    Sequence,
    Union,
    get_args,
    get_origin,
)

from . import __version__
from .errors import Cancelled, DiffusionSatError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM

EPILOG_GENERATE = """\
examples:
  # Rome, a 0.07 x 0.05 degree box, 512 x 488 px (--size is the longest side), mid-June 2021, 5 % cloud
  diffusionsat generate --bbox 12.45,41.88,12.52,41.93 --crs EPSG:4326 --date 2021-06-15 \\
      --cloud-cover 0.05 --prompt "a satellite image of a stadium" --size 512 --out rome.tif

  # the same ground in UTM zone 33N metres, with a fixed seed, machine-readable result
  diffusionsat generate --bbox 288500,4639300,294300,4644900 --crs EPSG:32633 \\
      --date 2021-06-15 --seed 7 --out rome_utm.tif --json

  # the same ground at 2 m per pixel (2904 x 2800 px): denoised jointly over overlapping windows,
  # each conditioned on its own centre
  diffusionsat generate --bbox 288500,4639300,294300,4644900 --crs EPSG:32633 --gsd 2 \\
      --date 2021-06-15 --out rome_2m.tif

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

    def format_help(self) -> str:
        if callable(self.epilog):  # an epilog that costs imports is built when help is shown
            self.epilog = self.epilog()
        return super().format_help()


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output GeoTIFF path (.tif); written atomically (required but with --dry-run, "
                   "which checks it when given)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    g.add_argument("--dry-run", action="store_true",
                   help="only check the request and print the plan (output grid, tiles, model calls); "
                   "loads no model and writes nothing")
    g.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Cheap: no torch, diffusers or rasterio import happens here."""
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
    _add_request_args(g, "generate")
    _add_output_args(g)
    g.set_defaults(func=cmd_generate)

    _add_conditional_parsers(sub)

    d = sub.add_parser("download", help="download and install a released DiffusionSat checkpoint",
                       description="Download a released checkpoint (Zenodo) into the models folder, verified "
                       "against its checksum and installed in one step (an interrupted download installs nothing).",
                       epilog=_releases_epilog,  # called by --help only (it imports torch)
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("name", help="the release to install (see below)")
    d.add_argument("--dest", help="models folder to install into (default: the first of DIFFUSIONSAT_MODELS, "
                   "else ~/.local/share/diffusionsat/models)")
    d.add_argument("--force", action="store_true", help="replace an installed copy")
    d.add_argument("--json", action="store_true", help="print the result as JSON")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_download)

    m = sub.add_parser("models", help="list installed models and where they are looked for")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_models)
    _add_serve_parser(sub)
    _add_registered_commands(sub)
    return parser


#: Entry-point group of the commands other packages add (``training`` adds train, evaluate and
#: prepare): each entry is a ``register(subparsers)`` function, so the engine imports none of them.
COMMANDS_GROUP = "diffusionsat.commands"


def _add_registered_commands(sub) -> None:
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(sub)


EPILOG_SUPERRES = """\
examples:
  diffusionsat superres --input S2_scene.tif --bands B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B10,B11,B12 \\
      --model <sr checkpoint> --out sr.tif
  diffusionsat superres --input S2B_MSIL2A_20210615T101029_N0300_R022_T33TTG.SAFE --factor 4 --out sr.tif

input radiometry (enforced):
  L1C and L2A digital numbers are read from the product; the +1000 offset of processing baseline
  >= 04.00 is removed (detected from the product, or give --baseline); each band is stretched as
  the fMoW-Sentinel checkpoint was trained (mean +/- 2 std, 8 bit); B1, B9, B10 are dropped and the
  bands ordered B4,B3,B2,B5,B6,B7,B8,B8A,B11,B12. 20 m and 60 m bands are resampled onto the 10 m
  grid. Nodata is filled for the model and written back as nodata (0) in the output.
output: RGB on the input's CRS at input GSD / --factor, tiled with overlap and blended.
"""

EPILOG_TEMPORAL = """\
examples:
  diffusionsat temporal --input 2019-06-30.tif --input 2020-07-02.tif --input 2021-06-28.tif --date 2022-07-01 --out 2022.tif
  diffusionsat temporal --input a.tif --input b.tif --input-date 2019-05-02 --input-date 2020-06-11 \\
      --date 2022-07-01 --out c.tif

Every input must show the same place; dates come from each file's tags or name unless given.
The output is on the first input's grid (or --bbox of it).
"""

EPILOG_INPAINT = """\
examples:
  diffusionsat inpaint --input scene.tif --mask qa.tif --mask-rule "bits:14-15=3" --out filled.tif
  diffusionsat inpaint --input scene.tif --mask clouds.gpkg --out filled.tif
  diffusionsat inpaint --input scene.tif --mask nodata --out filled.tif
  diffusionsat inpaint --input cloudy.tif --mask scl.tif --mask-rule s2-scl-cloud \\
      --reference clear_2021-05.tif --reference clear_2021-07.tif --out filled.tif

mask rules: bits:LO-HI=N, bit:B, values:3,8,9, gt:0.4, nonzero, nodata, presets (landsat-cloud,
s2-scl-cloud, fmask ...), combined with |. Pixels outside the (dilated) mask are written back
bit for bit; only masked pixels are synthetic.
"""

EPILOG_EXTEND = """\
examples:
  diffusionsat extend --input layer.tif --bbox 288000,4639000,295000,4646000 --out bigger.tif
  diffusionsat extend --input layer.tif --bbox 12.45,41.88,12.52,41.93 --crs EPSG:4326 --out bigger.tif

The output is the input's grid (CRS, pixel size, pixel edges) grown to cover --bbox; every input
pixel is written back bit for bit (all bands); only the new pixels are synthetic. Sampled with DDIM.
"""

_CONDITIONAL = {
    "superres": ("super-resolve a Sentinel-2 product to RGB",
                 "Super-resolve Sentinel-2 (L1C/L2A) to RGB with the metadata ControlNet.", EPILOG_SUPERRES),
    "temporal": ("generate a place for a new date from dated images of it",
                 "Generate an image for --date from dated images of the same place (ControlNet3D).", EPILOG_TEMPORAL),
    "inpaint": ("fill cloud-masked or missing pixels of an image",
                "Fill the masked pixels of an image; all other pixels are kept bit for bit.", EPILOG_INPAINT),
    "extend": ("extend (outpaint) a raster layer to a larger extent",
               "Make a larger raster around an existing one: its pixels are kept bit for bit, the new ones "
               "are generated to continue them.", EPILOG_EXTEND),
}


def _add_conditional_parsers(sub) -> None:
    for task, (help_, description, epilog) in _CONDITIONAL.items():
        p = sub.add_parser(task, help=help_, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_request_args(p, task)
        _add_output_args(p)
        p.set_defaults(func=cmd_task)


# ------------------------------------------------------------------------------------------------
# Task options, derived from the request models (engine.tasks): one source for names, defaults,
# help, ranges and choices, shared with the server's JSON and its OpenAPI document.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """How one request field is spelled on the command line and turned back into a value."""

    field: str
    flag: str
    convert: Callable[[Any], Any]


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _constraint(info: Any, name: str) -> Any:
    for item in info.metadata:
        value = getattr(item, name, None)
        if value is not None:
            return value
    return None


def _default_text(value: Any) -> Optional[str]:
    if value is None or value == []:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and value >= 1 << 20 and value & (value - 1) == 0:
        return f"{value} = 2^{value.bit_length() - 1}"
    if isinstance(value, str) and " " in value:
        return f'"{value}"'
    return str(value)


def _add_request_args(p: argparse.ArgumentParser, task: str) -> None:
    """One option per field of the task's request model (``task`` excepted)."""
    import datetime as dt

    from .tasks.requests import REQUEST_MODELS, _Request

    model = REQUEST_MODELS[task]
    groups = {"request": p.add_argument_group(f"{task} request (the same fields as the server's JSON)"),
              "model": p.add_argument_group("model and device")}
    options = []
    own = set(vars(model).get("__annotations__", {}))
    # the task's own fields first (required ones leading), then the shared sampling and model fields
    order = sorted(model.model_fields.items(),
                   key=lambda item: (not item[1].is_required(), item[0] not in own, item[0] in _Request.model_fields))
    for name, info in order:
        if name == "task" or (info.json_schema_extra or {}).get("cli") is False:
            continue
        kind = _unwrap(info.annotation)
        origin, args = get_origin(kind), get_args(kind)
        kw: dict[str, Any] = {"dest": name}
        flag = "--" + name.replace("_", "-")
        convert: Callable[[Any], Any] = lambda v: v  # noqa: E731
        if origin is list and args and args[0] is int:
            kw["metavar"] = "N,N,N" if _constraint(info, "max_length") == 3 else "N,..."
            convert = _int_list(flag)
        elif origin is list:  # repeatable: --input a --input b
            flag = "--" + name.removesuffix("s").replace("_", "-") if name.endswith("s") else flag
            kw["action"] = "append"
            kw["metavar"] = flag[2:].upper().replace("-", "_")
            if args and args[0] is dt.date:
                kw["metavar"] = "YYYY-MM-DD"
                convert = _dates
        elif origin is tuple:
            kw["metavar"] = "MINX,MINY,MAXX,MAXY"
            convert = _bbox
        elif origin is Literal:
            kw["choices"] = list(args)
        elif kind is dt.date:
            kw["metavar"] = "YYYY-MM-DD"
            convert = _date
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction  # --x / --no-x
        elif kind is int:
            kw["type"] = _int
        elif kind is float:
            kw["type"] = _float
        lo, hi = _constraint(info, "ge"), _constraint(info, "le")
        if kind is float and lo is not None and hi is not None:
            kw["metavar"] = f"{lo:g}..{hi:g}"
        notes = []
        if hi is not None and hi >= 2**62:  # "any non-negative number"
            hi = None
        if lo is not None and hi is not None and kind in (int, float):
            notes.append(f"{lo:g}..{hi:g}")
        elif lo is not None and kind in (int, float):
            notes.append(f">= {lo:g}")
        elif _constraint(info, "gt") is not None and kind in (int, float):
            notes.append(f"> {_constraint(info, 'gt'):g}")
        upto = _constraint(info, "max_length")
        if kw.get("action") == "append" and upto:
            notes.append(f"repeat, up to {upto}")
        if info.is_required():
            kw["required"] = True
        else:
            default = _default_text(info.get_default(call_default_factory=True))
            if default is not None:
                notes.append(f"default {default}")
        text = (info.description or name.replace("_", " ")).replace("%", "%%")
        kw["help"] = text + (f" ({'; '.join(notes)})" if notes else "")
        where = "model" if name in _Request.model_fields else "request"
        groups[where].add_argument(flag, **kw)
        options.append(_Option(name, flag, convert))
    p.set_defaults(task=task, request_options=tuple(options))


def _request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request of a task command: the options given, converted; the model supplies the rest."""
    fields: dict[str, Any] = {"task": args.task}
    for option in args.request_options:
        value = getattr(args, option.field, None)
        if value is not None:
            fields[option.field] = option.convert(value)
    return fields


def _int_list(flag: str) -> Callable[[str], list[int]]:
    def convert(text: str) -> list[int]:
        from .errors import InvalidRequest

        try:
            return [int(b) for b in text.split(",")]
        except ValueError:
            raise InvalidRequest(f"{flag} {text!r} must be band numbers like 4,3,2") from None

    return convert


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


def _progress(args: argparse.Namespace) -> tuple[Optional[Callable], Callable[[], None]]:
    """A progress bar on a terminal; plain lines at a bounded rate when stderr is a log or a pipe."""
    if args.quiet:
        return None, lambda: None
    from .parallel import RunContext, split_progress

    split = RunContext.from_env("cpu")  # a split run's rank: its share of the tiles, its steps after them
    label = f"diffusionsat {args.command}" + (f" [rank {split.rank}/{split.world_size}]" if split.distributed else "")
    if sys.stderr.isatty():
        update, close = _progress_bar()
    else:
        from .progress import ProgressLines

        update = ProgressLines(sys.stderr, label=label)
        close = update.close
    if split.distributed:
        update = split_progress(update, lambda phase: print(f"{label}: {phase}", file=sys.stderr, flush=True))
    return update, close


def _progress_bar() -> tuple[Optional[Callable], Callable[[], None]]:
    """A tqdm bar on stderr in percent of the whole job (tiles x steps)."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(p) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=100, unit="%", file=sys.stderr, dynamic_ncols=True, leave=False,
                              bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        label = f"tile {p.tile + 1}/{p.total_tiles}" if p.total_tiles > 1 else "denoising"
        label = "decoding" if p.message == "decoding" else label
        label = f"step {min(p.tile + 1, max(1, p.total_tiles - 1))}/{max(1, p.total_tiles - 1)}" if p.windows else label
        bar["bar"].set_description_str(label, refresh=False)
        bar["bar"].update(round(p.fraction * 100, 1) - bar["bar"].n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def _notify(args, lines: Sequence[str]) -> None:
    if getattr(args, "quiet", False):
        return
    for line in lines:
        print(f"note: {line}", file=sys.stderr)


def _run(args: argparse.Namespace, fields: dict) -> int:
    """Validate ``fields`` as a task request, run it with a progress bar, report the result."""
    from .tasks import parse_request  # run_task after the checks: it imports torch

    request = parse_request(fields)
    _check_out(args, request)  # before --dry-run too: it refuses what the run refuses
    if args.dry_run:
        return _print_plan(args, request)
    from .parallel import RunContext
    from .tasks import run_task

    update, close = _progress(args)
    try:
        # the one place a launcher's RANK/WORLD_SIZE are read: a split run's context, given to the task
        result = run_task(request, args.out, progress=update, context=RunContext.from_env(request.device))
    finally:
        close()
    if result is None:  # a non-zero rank of a split run: rank 0 reports
        return 0
    _notify(args, result.warnings)
    if args.json:
        print(json.dumps(result.as_dict()))
    elif not args.quiet:
        print(f"wrote {result.path} ({result.width}x{result.height} px, {result.crs}, seed {result.seed}) "
              f"in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def _check_out(args: argparse.Namespace, request) -> None:
    """Before any work: --out is no input (nor mask, reference), and exists only with --overwrite."""
    from .geo.guard import check_output
    from .tasks.common import output_sidecars

    if args.out is None:  # --dry-run without --out: nothing to check
        return
    check_output(args.out, request.input_paths(), overwrite=args.overwrite,
                 sidecars=output_sidecars(request, args.out))


def _print_plan(args: argparse.Namespace, request) -> int:
    from .tasks import plan

    p = plan(request, args.out)  # the run's own checks, the output path included
    _notify(args, p["notices"])  # the notes the run would print about its model
    if args.json:
        print(json.dumps(p))
    else:
        print(f"{p['task']}: {p['width']}x{p['height']} px ({p['output_megapixels']} Mpx) in {p['crs']}, "
              f"GSD {p['gsd_m']:.2f} m; {p['tiles']} {'jointly denoised window(s)' if p.get('joint_denoising') else 'tile(s)'} "
              f"of {p['model_px']} px{_skipped_text(p)}, {p['steps']} steps{_samples_text(p)}, "
              f"{p['unet_evaluations']} UNet evaluations, model {p['model']}; nothing written (--dry-run)")
    return 0


def _samples_text(p: dict) -> str:
    """--spread's plan: every sample is a full run (the evaluations count them)."""
    n = p.get("spread_samples")
    return f" x {n} samples (--spread)" if n else ""


def _skipped_text(p: dict) -> str:
    """extend's plan: the windows inside the input, which make no UNet call."""
    skipped = p.get("windows_skipped")
    return f" ({skipped} of {p['windows']} inside the input, skipped)" if skipped else ""


def _dates(values: Optional[Sequence[str]]):
    from .metadata import parse_date

    return [parse_date(v) for v in values] if values else None


def _date(text: str):
    from .metadata import parse_date

    return parse_date(text)


def _bbox(text: Optional[str]):
    from .metadata import parse_bbox

    return parse_bbox(text) if text else None


def cmd_task(args: argparse.Namespace) -> int:
    """superres, temporal, inpaint: the request from the options, run with progress."""
    return _run(args, _request_fields(args))


def cmd_generate(args: argparse.Namespace) -> int:
    from .tasks import parse_request  # run_task after the checks: it imports torch

    request = parse_request(_request_fields(args))
    _check_out(args, request)  # before --dry-run too: it refuses what the run refuses
    if args.dry_run:
        return _print_plan(args, request)
    from .tasks import run_task

    update, close = _progress(args)

    def loaded(bundle, placement) -> None:
        if not args.quiet:
            compiling = request.compile and not any(str(n).startswith("--compile ignored") for n in bundle.notices)
            note = "; --compile: the first step of each batch shape compiles first (minutes on a CPU)" if compiling else ""
            print(f"model: {bundle.name} on {placement.device} ({placement.dtype}){note}", file=sys.stderr)

    try:
        result = run_task(request, args.out, progress=update, on_model_loaded=loaded)  # measures the steps
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


def _releases_epilog() -> str:
    from .models.download import RELEASES

    lines = ["releases:"] + [f"  {r.name:<22}{r.what} (Zenodo record {r.record})" for r in RELEASES.values()]
    return "\n".join(lines) + "\n"


def cmd_download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .models.download import download_release

    last = {"pct": -1}

    def show(done: int, total: Optional[int]) -> None:
        if args.quiet or not total:
            return
        pct = int(done * 100 / total)
        if pct != last["pct"] and pct % 5 == 0:
            last["pct"] = pct
            print(f"\rdownloading {args.name}: {pct}%", end="", file=sys.stderr, flush=True)

    path = download_release(args.name, dest_dir=Path(args.dest).expanduser() if args.dest else None,
                            force=args.force, progress=show)
    if not args.quiet:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({"name": args.name, "path": str(path)}))
    elif not args.quiet:
        print(f"installed {args.name} in {path}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.registry import installed_models, models_dirs, tiny_entry

    models = installed_models()
    if args.json:
        print(json.dumps({"search_path": [str(p) for p in models_dirs()],
                          "models": [tiny_entry()] + [m.as_dict() for m in models]}))
        return 0
    print("tiny (built-in): random weights, 256 px; tasks generate, inpaint, superres, temporal "
          "(for trying the tool and for tests)")
    for m in models:
        print(f"{m.name} ({m.kind}{', release ' + m.release if m.release else ''}): {m.resolution} px"
              + (f", conditioning {m.conditioning_resolution} px" if m.conditioning_resolution else "")
              + f" (from the {m.resolution_source}); tasks {', '.join(m.tasks) or 'none'}; {m.path}")
        if m.kind == "single-image" and m.unet_checkpoint:
            print(f"    UNet: {m.unet_checkpoint}/unet")
        if m.trained_against:
            print(f"    pairs with UNet {m.trained_against} (trained against it; --unet overrides)")
        if m.warning:
            print(f"    warning: {m.warning}")
    if not models:
        print(f"no installed models in {os.pathsep.join(str(p) for p in models_dirs())}; "
              "install the released checkpoints with 'diffusionsat download NAME' ('diffusionsat download --help' "
              "lists them)")
    return 0


# ------------------------------------------------------------------------------------------------
# serve: the engine server for the QGIS plugin
# ------------------------------------------------------------------------------------------------

EPILOG_SERVE = """\
examples:
  diffusionsat serve                      # 127.0.0.1, a free port, token in a user-only file
  diffusionsat serve --port 8765 --token-file tok --model tiny      # tests and CI
  diffusionsat serve --host 0.0.0.0 --port 8765 --token-file ~/.config/diffusionsat/token

When ready, one JSON line goes to stdout: {"url": ..., "token_file": ..., "pid": ..., "version": ...};
logs go to stderr. Clients send "Authorization: Bearer <the token file's content>".
SIGTERM or Ctrl-C stops the server (a running job is cancelled).
"""


def _add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="run the engine server (jobs over HTTP) for the QGIS plugin",
        description="Serve generation jobs over HTTP with progress and cancellation; every endpoint "
        "but /v1/health needs the token stored in --token-file.",
        epilog=EPILOG_SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = s.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=_int, default=0, help="TCP port (default 0: a free one, printed)")
    net.add_argument("--token-file", help="file holding the token; created (mode 0600) with a random "
                     "token if missing (default ~/.config/diffusionsat/token)")
    net.add_argument("--allowed-root", action="append", default=[], metavar="FOLDER",
                     help="only read input files and model folders under FOLDER (repeatable; "
                     "default: any path the server can read)")
    net.add_argument("--allow-vrt", action="store_true",
                     help="read VRT inputs whose sources all lie under the allowed roots (default: refuse VRTs)")
    net.add_argument("--allow-hf", action="store_true",
                     help="let requests name hf:owner/name models, downloaded from the Hugging Face hub")
    net.add_argument("--max-upload-mb", type=_float, default=512.0, help="largest upload in MiB (default 512)")
    from .tasks import MAX_PIXELS

    net.add_argument("--max-pixels", type=_int, default=MAX_PIXELS,
                     help=f"largest output of one job in pixels, spread samples counted (default {MAX_PIXELS}, "
                     "4096 x 4096)")
    lim = s.add_argument_group("limits per job and per client (denial of service)")
    lim.add_argument("--max-queue", type=_int, default=32,
                     help="jobs waiting behind the running one; more are refused with 429 (default 32)")
    lim.add_argument("--max-steps", type=_int, default=200,
                     help="denoising steps one job may ask for (default 200)")
    lim.add_argument("--max-job-seconds", type=_float, default=3600.0,
                     help="wall-clock limit of one job; it then fails with code time_limit (default 3600)")
    lim.add_argument("--max-connections", type=_int, default=64,
                     help="open HTTP connections; past it requests get 503 (default 64)")
    lim.add_argument("--header-timeout", type=_float, default=10.0,
                     help="seconds a client may take to send a request head (default 10)")
    mdl = s.add_argument_group("model and device")
    mdl.add_argument("--model", default="auto",
                     help="model for jobs that name none: auto (default), tiny, a folder, hf:owner/name")
    mdl.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:N")
    mdl.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="precision; auto = fp16 on CUDA, fp32 on the CPU")
    mdl.add_argument("--max-models", type=_int, default=1,
                     help="models kept loaded at once (the memory budget; default 1)")
    st = s.add_argument_group("storage")
    st.add_argument("--workdir", help="folder for uploads and results (default ~/.cache/diffusionsat/server)")
    st.add_argument("--retention-hours", type=_float, default=24.0,
                    help="delete results and uploads older than this (default 24)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--debug", action="store_true", help="show tracebacks for start-up errors")
    s.set_defaults(func=cmd_serve)


class _Stop(Exception):
    """SIGTERM, turned into an exception so the server's shutdown ends in a clean exit."""


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from .errors import InvalidRequest
    from .server.config import ServerConfig, default_token_file, default_workdir
    from .server.security import ensure_token_file

    if not 0 <= args.port <= 65535:
        raise InvalidRequest(f"--port {args.port} is not a TCP port; give 0..65535 (0: a free port)")
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-pixels", args.max_pixels),
                        ("--max-models", args.max_models), ("--retention-hours", args.retention_hours),
                        ("--max-queue", args.max_queue), ("--max-steps", args.max_steps),
                        ("--max-job-seconds", args.max_job_seconds), ("--max-connections", args.max_connections),
                        ("--header-timeout", args.header_timeout)):
        if not value > 0:
            raise InvalidRequest(f"{flag} must be more than 0, got {value}")
    for root in args.allowed_root:
        if not os.path.isdir(os.path.expanduser(root)):
            raise InvalidRequest(f"--allowed-root {root!r} is not a folder")
    token_file = os.path.abspath(os.path.expanduser(args.token_file)) if args.token_file else str(default_token_file())
    # Before the heavy imports: a bad token file is refused in a fraction of a second.
    token = ensure_token_file(token_file)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise InvalidRequest(f"the server needs {err.name}: pip install 'diffusionsat-qgis[server]'") from None
    from .server.run import main_serve

    config = ServerConfig(
        token=token,
        token_file=token_file,
        host=args.host,
        port=args.port,
        workdir=args.workdir or default_workdir(),
        default_model=args.model,
        device=args.device,
        dtype=args.dtype,
        retention_hours=args.retention_hours,
        allowed_roots=tuple(args.allowed_root),
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_models=args.max_models,
        max_queue=args.max_queue,
        max_steps=args.max_steps,
        max_job_seconds=args.max_job_seconds,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        allow_vrt=args.allow_vrt,
        allow_hf=args.allow_hf,
    )

    def _terminate(signum, frame):
        raise _Stop()

    # uvicorn handles SIGTERM itself (graceful shutdown) and re-raises it afterwards: this handler
    # then ends the process with exit code 0 instead of a signal death.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main_serve(config, log_level=args.log_level)
    except (_Stop, KeyboardInterrupt):
        print("diffusionsat serve: stopped", file=sys.stderr)
        return 0


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, config notes) is noise for a CLI user."""
    import logging
    import warnings

    from .runtime import configure_process

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_process()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub", "rasterio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # GDAL's own error lines (e.g. "_tiffWriteProc: No space left on device") come with an
    # exception the CLI turns into its one line; they would only repeat it in GDAL's words.
    logging.getLogger("rasterio").setLevel(logging.CRITICAL)
    # diffusers and transformers reset their loggers' level and keep their own progress-bar switch
    # when they configure themselves, so they are quieted through their own logging modules, but
    # only once a command imports them: an error in the arguments costs no 3 s import.
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        _when_imported(module, _quiet_hf_logging)


def _quiet_hf_logging(module: types.ModuleType) -> None:
    module.set_verbosity_error()
    module.disable_progress_bar()


def _when_imported(name: str, action: Callable[[types.ModuleType], None]) -> None:
    """Call ``action(module)`` once module ``name`` has been imported: now if it is already, else
    right after its import (a one-shot finder in ``sys.meta_path``). Best effort: an ``action``
    that fails (a library change) is logged at debug level, never breaks the command."""
    import importlib.abc
    import importlib.util
    import logging

    def run(module: types.ModuleType) -> None:
        try:
            action(module)
        except Exception:  # noqa: BLE001 - quieting is best effort; a library change must not break the CLI
            logging.getLogger(__name__).debug("could not quiet %s", name, exc_info=True)

    if name in sys.modules:
        run(sys.modules[name])
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            exec_module = loader.exec_module

            def exec_then_act(module: types.ModuleType) -> None:
                exec_module(module)
                run(module)

            loader.exec_module = exec_then_act  # this file's own loader instance
            return spec

    sys.meta_path.insert(0, _Finder())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command's own parser: "diffusionsat extend: ... (see diffusionsat extend --help)"
            commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
            (commands.get(getattr(args, "command", None)) or parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version and usage errors (already printed)
        return int(exit_.code or 0)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "dry_run", None) is False and getattr(args, "out", "") is None:  # a task without --out
        print(f"diffusionsat {args.command}: error: the following arguments are required: --out "
              f"(see diffusionsat {args.command} --help)", file=sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    _quiet_libraries()
    _terminate_like_ctrl_c()
    try:
        return int(args.func(args) or 0)
    except Cancelled as err:
        print(f"diffusionsat {args.command}: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffusionSatError as err:
        if debug:
            raise
        print(f"diffusionsat {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        if isinstance(err, _Terminated):
            print(f"diffusionsat {args.command}: terminated (SIGTERM); nothing was written", file=sys.stderr)
            return EXIT_TERMINATED
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, ``kill``): unwound like Ctrl-C, so every write's scratch
    is removed and nothing is published."""


def _terminate_like_ctrl_c() -> None:
    import signal

    def handler(signum, frame):
        # Once: a second SIGTERM must not interrupt the clean-up the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a thread): leave it as it is
        pass


def _one_line(err: BaseException) -> str:
    """The first line of a message; longer explanations (e.g. a grammar) are in --help."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0] + (" (see --help)" if len(lines) > 1 else "")


def _is_cuda_oom(err: BaseException) -> bool:
    return type(err).__name__ == "OutOfMemoryError"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
