"""What the tasks share: results, provenance tags, seeds, the tiled job, pixel checks and dated frames.

The tiled tasks (super-resolution, temporal generation, in-painting) plan model-sized tiles over
their output grid (``engine.geo.tiles``), feed every tile to the sampler with the conditioning the
checkpoint was trained on, and blend the tiles into one COG without seams, reading and writing
window by window so that memory does not grow with the raster. In a split run (a
:class:`engine.parallel.RunContext` of several processes, which the CLI reads from what
``accelerate launch`` sets) the tiles are split over the processes and rank 0 merges them (no
concurrent writes to one file). No torch here: checks and plans use this module too; the model
side is :mod:`engine.tasks.sampling`.

Task modules import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from rasterio.windows import Window

from .. import __version__
from ..errors import InvalidRequest
from ..geo.accumulate import encode, encoding, run_tiled
from ..geo.cog import CogWriter
from ..geo.stripes import Stripe
from ..geo.grid import Grid
from ..geo.guard import display_text
from ..geo.raster_metadata import date_from_name, date_from_raster
from ..geo.sources import footprint_overlap
from ..metadata import derive_from_bbox
from ..parallel import RunContext, run_tiled_distributed, split_run_id
from ..progress import CancelToken, ProgressCallback
from ..split_sync import SplitRunBusy, split_timeout
from ..schedulers import resolve_scheduler_name, scheduler_label

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """What a task produced, for the CLI's ``--json`` and the server's job record."""

    path: Path
    task: str
    seed: int
    model: str
    width: int
    height: int
    crs: str
    bbox: tuple[float, float, float, float]
    metadata: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: measured by run_task: denoising steps actually run (summed over tiles; skipped tiles run
    #: none) and the seconds they took, for time estimates (seconds / (steps x plan's mpx_per_step))
    denoise_steps: Optional[int] = None
    denoise_seconds: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "task": self.task,
            "seed": self.seed,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
            "bbox": list(self.bbox),
            "metadata": self.metadata,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "denoise_steps": self.denoise_steps,
            "denoise_seconds": None if self.denoise_seconds is None else round(self.denoise_seconds, 3),
        }


@dataclass
class Outcome:
    """What a tiled task reports back (turned into a TaskResult by engine.tasks.run)."""

    grid: Grid
    seed: int
    model: str
    metadata: dict
    warnings: list[str] = field(default_factory=list)


def spread_path(out: Path) -> Path:
    """Where ``--spread`` writes the spread map: beside the output."""
    return out.with_name(out.stem + ".spread.tif")


def output_sidecars(request, out: Path) -> list[Path]:
    """The files a run writes beside ``out`` (the spread map of ``--spread``): the output checks
    guard them as they guard ``out`` itself."""
    return [spread_path(Path(out))] if getattr(request, "spread", None) else []


def spread_samples(request) -> int:
    """The samples per tile (window, image) of ``request``: its ``spread``, else 1."""
    return int(getattr(request, "spread", None) or 1)


#: the output's tags that describe its bands or values, not the one-band float32 spread map's
_IMAGE_ONLY = frozenset({"spread_file", "nodata_note", "generated_bands", "other_bands", "other_bands_r2",
                         "other_bands_rule"})


def spread_tags(tags: dict, seed: int, samples: int) -> dict:
    """The spread map's tags: the output's (less its description), the samples and their seeds."""
    out = {k: v for k, v in tags.items() if not k.startswith("TIFFTAG_IMAGEDESCRIPTION") and k not in _IMAGE_ONLY}
    if "nodata_note" in tags:  # the output's nodata pixels: NaN in the map (no samples there)
        out["nodata_note"] = "NaN = no input data (the output's nodata pixels)"
    out.update(spread_samples=samples, spread_seeds=f"{seed}..{seed + samples - 1}",
               TIFFTAG_IMAGEDESCRIPTION="per-pixel spread (std of brightness, 0..1) over "
               f"{samples} DiffusionSat samples: high = the model is guessing")
    return out


def welford_step(mean, m2, value, k: int) -> None:
    """Add sample ``k`` (0-based, in sample order) to the running ``mean`` and ``M2`` (float64
    arrays, updated in place; both start at zeros, so sample 0 makes mean = value, M2 = 0 exactly):
    Welford's update, the one every spread map is accumulated with (std = sqrt(M2 / N))."""
    delta = value - mean
    mean += delta / (k + 1)
    m2 += delta * (value - mean)


def brightness_spread(images: Sequence[Any]):
    """The per-pixel standard deviation over ``images`` ((3, h, w) in 0..1, in sample order) of
    their brightness (the mean of R, G, B), float64 (h, w): Welford's running mean and M2, in
    sample order (as ``generate --spread`` accumulates its samples)."""
    mean = m2 = None
    for i, image in enumerate(images):
        b = np.asarray(image).mean(axis=0, dtype=np.float64)
        if mean is None:
            mean, m2 = np.zeros_like(b), np.zeros_like(b)
        welford_step(mean, m2, b, i)
    return np.sqrt(m2 / len(images))


def with_spread(images: Sequence[Any]):
    """Sample 0 of one tile's samples with their :func:`brightness_spread` as one more band
    ((4, h, w) float64): what a tiled task's ``process`` returns per tile with ``--spread``."""
    first = np.asarray(images[0], dtype=np.float64)
    return np.concatenate([first, brightness_spread(images)[None]])


class SpreadSplit:
    """The writer the tiling writes to with ``--spread``: the blended tiles carry one more band (the
    spread), all as float64 (``profile``: the output's, one band more, float64, no nodata); each
    window's output bands are encoded exactly as the tiling would have encoded them into the output
    (``enc``: the output's :class:`~engine.geo.accumulate.Encoding`) and written to ``target``, and
    the last band goes to ``spread`` (float32; NaN where the output is nodata). ``keep(window)``
    (in-painting: the mask) says where the output is generated: elsewhere the spread is 0."""

    def __init__(self, target, spread, enc, keep: Optional[Callable] = None) -> None:
        self.target, self.spread, self.enc, self.keep = target, spread, enc, keep
        self.profile = {**target.profile, "count": int(target.profile["count"]) + 1, "dtype": "float64",
                        "nodata": None}

    def write(self, data, window=None) -> None:
        values = np.array(data[:-1], dtype=np.float64)
        valid = np.isfinite(values).all(axis=0)
        values[:, ~valid] = 0.0  # as the tiling leaves pixels without a contribution
        self.target.write(encode(values, valid, self.enc), window)
        spread = np.asarray(data[-1], dtype=np.float32).copy()
        if self.keep is not None:
            spread[valid & ~np.asarray(self.keep(window), dtype=bool)] = 0.0
        spread[~valid] = np.nan
        self.spread.write(spread[None], window)


# --------------------------------------------------------------------------------------------
# Provenance, seeds, processes
# --------------------------------------------------------------------------------------------


def provenance_tags(task: str, bundle, placement, request, seed: int) -> dict:
    """The tags every output carries: synthetic=true, the model, seed, prompt and sampling settings."""
    return {
        "synthetic": True,
        "software": f"diffusionsat {__version__}",
        "task": task,
        "model": bundle.name,
        "model_source": display_text(bundle.source),
        "seed": seed,
        "prompt": request.prompt,
        "steps": request.steps,
        "guidance": request.guidance,
        "scheduler": scheduler_label(request.scheduler, bundle.scheduler, getattr(request, "resample", 0)),
        "device": placement.device,
        "dtype": placement.dtype,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "TIFFTAG_SOFTWARE": f"diffusionsat {__version__}",
        **compile_tags(bundle, request),
    }


def compile_tags(bundle, request) -> dict:
    """``compile``: what ``--compile`` did (its kernels may move a pixel by one level against an
    eager run, so the output says which ran); nothing without ``--compile``."""
    if not getattr(request, "compile", False):
        return {}
    ignored = [n for n in getattr(bundle, "notices", ()) if str(n).startswith("--compile ignored")]
    return {"compile": ignored[0] if ignored else "torch.compile (UNet and ControlNet blocks)"}


def new_seed() -> int:
    return secrets.randbelow(2**31)


def seed_for(request, context: RunContext) -> int:
    """The request's seed, or a fresh one; in a split run every process must draw the same, so it
    is derived from the request itself there (all ranks see the same request)."""
    if request.seed is not None:
        return request.seed
    if context.distributed:
        return int(hashlib.sha256(request.model_dump_json().encode()).hexdigest()[:8], 16) % (2**31)
    return secrets.randbelow(2**31)


def check_resample(request, scheduler_class: Optional[str]) -> None:
    """RePaint resampling re-noises latents, which only the stateless schedulers allow."""
    if not request.resample:
        return
    name = resolve_scheduler_name(request.scheduler, request.resample)  # auto -> ddim here
    if name != "default":  # the sampler asked for, else the checkpoint's own
        scheduler_class = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}.get(name, name)
    if scheduler_class is not None and scheduler_class not in ("DDIMScheduler", "DDPMScheduler"):
        raise InvalidRequest("--resample needs a stateless scheduler: add --scheduler ddim")


# --------------------------------------------------------------------------------------------
# Layouts and pixel checks
# --------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where a tiled task reads and writes, known before any model is loaded."""

    out_grid: Grid  #: the output raster's grid
    tiles: list  #: model windows (engine.geo.tiles.Tile), in input pixels
    model_px: int  #: output pixels per tile side
    in_grid: Optional[Grid] = None  #: the input grid (or its --bbox subset)
    window: Any = None  #: that subset's window in the whole input
    source: Any = None  #: the opened input (super-resolution)
    frames: list = field(default_factory=list)  #: (path, date) of conditioning frames, in time order
    mask: Any = None  #: in-painting: the mask source, already checked against the whole input


def tile_overlap(request, tile_px: int) -> int:
    """The request's tile overlap in input px (default an eighth of a tile), less than half a tile."""
    overlap = request.overlap if request.overlap is not None else max(1, tile_px // 8)
    if 2 * overlap >= tile_px:
        raise InvalidRequest(f"--overlap {overlap} px must be less than half the {tile_px} px input tile")
    return overlap


def _mpx(pixels: int) -> str:
    """A pixel count people can read: '67 Mpx', '0.016 Mpx (16384 px)', never '0 Mpx'."""
    return f"{pixels / 1e6:.0f} Mpx" if pixels >= 10**7 else f"{pixels / 1e6:.3g} Mpx ({pixels} px)"


def check_pixels(width: int, height: int, limit: Optional[int], fix: str = "a smaller --bbox") -> None:
    if limit is not None and width * height > limit:
        raise InvalidRequest(
            f"the output would be {width}x{height} px ({_mpx(width * height)}), over the limit of "
            f"{_mpx(limit)}; choose {fix}"
        )


# --------------------------------------------------------------------------------------------
# Metadata of tiles and of the whole output
# --------------------------------------------------------------------------------------------


def tile_metadata(grid: Grid, tile, model_px: int, date, cloud_cover):
    """Metadata of the model's view of one tile: its footprint's centre and its GSD as generated."""
    window = Window(tile.out_valid.col_off, tile.out_valid.row_off, tile.out_window.width, tile.out_window.height)
    west, south, east, north = grid.window_bounds(window)
    return derive_from_bbox((west, south, east, north), grid.crs.to_wkt(), model_px, model_px,
                            date=date, cloud_cover=cloud_cover)


def whole_metadata(grid: Grid, date, cloud_cover):
    """The metadata of the whole output: its centre, its pixel size, the date and cloud cover the tiles
    were conditioned on (each tile's own longitude and latitude are those of its footprint)."""
    return derive_from_bbox(grid.bounds, grid.crs.to_wkt(), grid.width, grid.height, date=date,
                            cloud_cover=cloud_cover)


def metadata_tags(md) -> dict:
    """The 7 metadata values as tags (as ``generate`` writes them), plus TIFFTAG_DATETIME for a known date."""
    tags = {**md.to_tags(), "metadata_note": "the whole output's centre; each tile was conditioned on its own centre"}
    if md.date is not None:
        tags["TIFFTAG_DATETIME"] = md.date.strftime("%Y:%m:%d 00:00:00")
    return tags


# --------------------------------------------------------------------------------------------
# Dated frames (temporal inputs, in-painting references)
# --------------------------------------------------------------------------------------------


def date_of(path: str, given: Optional[_dt.date]) -> Optional[_dt.date]:
    """``given``, else the acquisition date in the raster's tags or name (a folder: its name)."""
    if given is not None:
        return given
    p = Path(path)
    if p.is_dir():
        return date_from_name(p.name)
    found, _ = date_from_raster(p)
    return found


def dated_frames(paths: Sequence[str], dates: Optional[Sequence[_dt.date]], what: str) -> list[tuple[str, _dt.date]]:
    if dates is not None and len(dates) != len(paths):
        raise InvalidRequest(f"{len(dates)} dates given for {len(paths)} {what}; give one date per {what[:-1]}")
    frames = []
    for i, path in enumerate(paths):
        date = date_of(path, dates[i] if dates is not None else None)
        if date is None:
            raise InvalidRequest(
                f"no acquisition date found for {path!r} (tags or file name); give the dates in input order "
                f"with --input-date"
            )
        frames.append((path, date))
    # The model sees frame order only through its temporal convolutions: keep time order.
    return sorted(frames, key=lambda f: f[1])


def check_same_place(paths: Sequence[str], grid: Grid, minimum: float = 0.5) -> None:
    for path in paths:
        cover = footprint_overlap(path, grid)
        if cover < minimum:
            raise InvalidRequest(
                f"{path!r} covers only {cover:.0%} of the output extent: temporal inputs must show the same "
                "place (check that every input covers the first one, or give --bbox inside all of them)"
            )


# --------------------------------------------------------------------------------------------
# The tiled job
# --------------------------------------------------------------------------------------------


@dataclass
class TiledJob:
    """Everything :func:`run_job` needs to tile a task over its output grid."""

    out: Path
    grid: Grid  #: output grid
    tiles: list
    bands: int
    dtype: str
    read: Callable
    process: Callable
    tags: dict
    scale: Optional[float] = None
    offset: float = 0.0
    nodata: Optional[float] = None
    band_descriptions: Sequence[str] = ("red", "green", "blue")
    colorinterp: Optional[Sequence[str]] = ("red", "green", "blue")
    wrap_writer: Optional[Callable] = None
    fill_nodata: bool = True
    run_key: str = ""
    out_bands: Optional[int] = None  #: bands of the written file, when wrap_writer widens the tiles' ``bands``
    batch_size: int = 1  #: tiles per model call (``process`` marked with engine.geo.accumulate.batched)
    #: ``--spread``'s samples per tile: ``process`` then returns one more band per tile (the spread,
    #: :func:`with_spread`), written beside the output (:class:`SpreadSplit`, :func:`spread_path`)
    spread: int = 1
    spread_keep: Optional[Callable] = None  #: ``SpreadSplit``'s ``keep`` (in-painting: the mask)


def run_job(job: TiledJob, context: RunContext, progress: Optional[ProgressCallback],
            cancel: Optional[CancelToken]):
    """Run a tiled job in this process, or this rank's share of a split run (``context``)."""

    spread = job.spread > 1
    tags = {**job.tags, "spread_file": spread_path(job.out).name} if spread else job.tags
    bands = job.bands + 1 if spread else job.bands
    # with --spread the tiling writes float64 values; SpreadSplit encodes them as it would have
    scale, offset = (1.0, 0.0) if spread else (job.scale, job.offset)

    @contextlib.contextmanager
    def open_target(part=None):
        """The COG writer (wrapped, e.g. for in-painting's compositing), published on success; with
        ``spread``, the spread map's too, published just before the output (removed if that fails).
        In a split run ``part`` is this rank's stripe to write, or (rank 0) all of them to publish
        (:func:`engine.parallel.run_tiled_distributed`)."""
        layout = {} if part is None else {"stripe": part} if isinstance(part, Stripe) else {"stripes": part}
        published = False
        try:
            with CogWriter(
                job.out, width=job.grid.width, height=job.grid.height, count=job.out_bands or job.bands,
                dtype=job.dtype, crs=job.grid.crs, transform=job.grid.transform, tags=tags, nodata=job.nodata,
                band_descriptions=list(job.band_descriptions), colorinterp=list(job.colorinterp or []), **layout,
            ) as writer:
                # the publish of a split run writes no pixel: nothing to wrap
                target = job.wrap_writer(writer) if job.wrap_writer and "stripes" not in layout else writer
                if not spread:
                    yield target
                    return
                with CogWriter(spread_path(job.out), width=job.grid.width, height=job.grid.height, count=1,
                               dtype="float32", crs=job.grid.crs, transform=job.grid.transform,
                               tags=spread_tags(job.tags, int(job.tags["seed"]), job.spread), nodata=float("nan"),
                               band_descriptions=["spread"], **layout) as spread_writer:
                    yield SpreadSplit(target, spread_writer, encoding(target, job.scale, job.offset),
                                      job.spread_keep)
                published = "stripe" not in layout
        except BaseException:
            if published:  # no spread map without its output
                spread_path(job.out).unlink(missing_ok=True)
            raise

    rank, world = context.rank, context.world_size
    if not context.distributed:
        with open_target() as target:
            return run_tiled(job.read, job.process, target, job.tiles, scale=scale, offset=offset,
                             fill_nodata=job.fill_nodata, scratch_dir=job.out.parent, progress=progress,
                             cancel=cancel, batch_size=job.batch_size)
    timeout_s = split_timeout()  # before any file: a bad value is a one-line error, not a failed run
    run_id = split_run_id(job.out, job.run_key)
    folder = job.out.parent / f".diffusionsat-split-{run_id}"
    folder.mkdir(exist_ok=True)
    owner = True
    try:
        return run_tiled_distributed(
            job.read, job.process, job.tiles, bands=bands, folder=folder, rank=rank, world_size=world,
            run_id=run_id, open_writer=open_target, scale=scale, offset=offset, fill_nodata=job.fill_nodata,
            progress=progress, cancel=cancel, batch_size=job.batch_size, timeout_s=timeout_s,
        )
    except SplitRunBusy:
        owner = False  # the folder is another launch's, at work: leave it alone
        raise
    finally:
        if rank == 0 and owner:  # the run's shared folder, whatever the outcome (its stripes included)
            shutil.rmtree(folder, ignore_errors=True)
