"""The conditional tasks: super-resolution, temporal generation and in-painting over whole rasters.

Each task plans model-sized tiles over its output grid (``engine.geo.tiling``), feeds every tile
to the sampler with the conditioning the checkpoint was trained on, and blends the tiles into one
COG without seams, reading and writing window by window so that memory does not grow with the
raster. Under ``accelerate launch`` (or any launcher that sets ``RANK``/``WORLD_SIZE``) the tiles
are split over the processes and rank 0 merges them (no concurrent writes to one file).

The request models live in ``engine.tasks`` (shared with the CLI and the server); this module
holds the work.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import __version__
from .errors import InvalidRequest, RasterError
from .geo.guard import display_name, display_text
from .progress import CancelToken, ProgressCallback

# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@dataclass
class Grid:
    """An output pixel grid: CRS, transform (pixel corners, CRS units), size in pixels."""

    crs: Any
    transform: Any
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return west, south, east, north

    def window_bounds(self, window) -> tuple[float, float, float, float]:
        from rasterio.windows import bounds

        return bounds(window, self.transform)

    def subset(self, bbox: Optional[Sequence[float]], bbox_crs: Optional[str]) -> tuple["Grid", Any]:
        """The whole pixels of this grid covering ``bbox`` (in ``bbox_crs``, default the grid's CRS)."""
        from rasterio.windows import Window, from_bounds

        if bbox is None:
            return self, Window(0, 0, self.width, self.height)
        from .metadata import parse_crs, validate_bbox

        if not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
            raise InvalidRequest(f"--bbox {tuple(bbox)} is not minx, miny, maxx, maxy with min < max; "
                                 "give the lower-left corner first")
        if bbox_crs:
            validate_bbox(bbox, parse_crs(bbox_crs))
            from rasterio.warp import transform_bounds

            bbox = transform_bounds(bbox_crs, self.crs, *bbox, densify_pts=21)
        win = from_bounds(*bbox, transform=self.transform)
        eps = 1e-6  # a bbox on pixel edges must not gain a sliver pixel from rounding noise
        col0 = max(0, math.floor(win.col_off + eps))
        row0 = max(0, math.floor(win.row_off + eps))
        col1 = min(self.width, math.ceil(win.col_off + win.width - eps))
        row1 = min(self.height, math.ceil(win.row_off + win.height - eps))
        if col1 <= col0 or row1 <= row0:
            raise InvalidRequest(
                f"--bbox {tuple(round(v, 6) for v in bbox)} does not overlap the input raster "
                f"(bounds {tuple(round(v, 6) for v in self.bounds)} in its CRS); check the bbox and --crs"
            )
        win = Window(col0, row0, col1 - col0, row1 - row0)
        from rasterio.windows import transform as window_transform

        return Grid(self.crs, window_transform(win, self.transform), col1 - col0, row1 - row0), win


def _open(path: str):
    import rasterio

    p = Path(path).expanduser()
    if not p.exists():
        raise RasterError(f"input {str(path)!r} does not exist")
    from .geo.guard import open_raster

    try:
        return open_raster(p)
    except rasterio.errors.RasterioIOError as err:
        raise RasterError(f"cannot read {str(path)!r} as a raster: {str(err).splitlines()[0]}") from err


def _date_of(path: str, given: Optional[_dt.date]) -> Optional[_dt.date]:
    """``given``, else the acquisition date in the raster's tags or name (a folder: its name)."""
    if given is not None:
        return given
    from .metadata import _date_from_name, date_from_raster

    p = Path(path)
    if p.is_dir():
        return _date_from_name(p.name)
    found, _ = date_from_raster(p)
    return found


def _tile_metadata(grid: Grid, tile, model_px: int, date, cloud_cover):
    """Metadata of the model's view of one tile: its footprint's centre and its GSD as generated."""
    from rasterio.windows import Window

    from .metadata import derive_from_bbox

    window = Window(tile.out_valid.col_off, tile.out_valid.row_off, tile.out_window.width, tile.out_window.height)
    west, south, east, north = grid.window_bounds(window)
    return derive_from_bbox((west, south, east, north), grid.crs.to_wkt(), model_px, model_px,
                            date=date, cloud_cover=cloud_cover)


def _tile_generator(seed: int, tile_index: int):
    import torch

    # Each tile gets its own reproducible noise; a split run draws the same noise per tile.
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + tile_index) % (2**63))


def _distributed() -> tuple[int, int]:
    """(rank, world_size) when launched by accelerate/torchrun, else (0, 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)


def _device_for_rank(device: str) -> str:
    """Each process of a multi-GPU launch takes its own GPU."""
    if device == "auto" and _distributed()[1] > 1:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


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


def run_job(job: TiledJob, progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
    """Run a tiled job in this process, or this rank's share of a split run."""
    from .geo.cog import CogWriter
    from .geo.tiling import run_tiled, run_tiled_distributed

    @contextlib.contextmanager
    def open_target():
        """The COG writer (wrapped, e.g. for in-painting's compositing), published on success."""
        with CogWriter(
            job.out, width=job.grid.width, height=job.grid.height, count=job.out_bands or job.bands, dtype=job.dtype,
            crs=job.grid.crs, transform=job.grid.transform, tags=job.tags, nodata=job.nodata,
            band_descriptions=list(job.band_descriptions), colorinterp=list(job.colorinterp or []),
        ) as writer:
            yield job.wrap_writer(writer) if job.wrap_writer else writer

    rank, world = _distributed()
    if world == 1:
        with open_target() as target:
            return run_tiled(job.read, job.process, target, job.tiles, scale=job.scale, offset=job.offset,
                             fill_nodata=job.fill_nodata, scratch_dir=job.out.parent, progress=progress,
                             cancel=cancel)
    run_id = hashlib.sha256(f"{job.out.resolve()}|{job.run_key}".encode()).hexdigest()[:32]
    folder = job.out.parent / f".diffusionsat-split-{run_id}"
    folder.mkdir(exist_ok=True)
    stats = run_tiled_distributed(
        job.read, job.process, job.tiles, bands=job.bands, folder=folder, rank=rank, world_size=world,
        run_id=run_id, open_writer=open_target, scale=job.scale, offset=job.offset, fill_nodata=job.fill_nodata,
        progress=progress, cancel=cancel,
    )
    if rank == 0:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return stats


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
        "scheduler": request.scheduler if request.scheduler != "default" else type(bundle.scheduler).__name__,
        "device": placement.device,
        "dtype": placement.dtype,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "TIFFTAG_SOFTWARE": f"diffusionsat {__version__}",
    }


def request_resolution(bundle, request) -> int:
    """The tile size: --resolution, else what the task's model was trained at (engine.models.loading)."""
    from .models.resolution import request_resolution as resolution

    return resolution(bundle, request)


def _bundle_for(models, request):
    """The request's model (cached), on this process's device."""
    from .models.registry import auto_model

    return models.get(auto_model(request), unet=request.unet, base=request.base, controlnet=request.controlnet,
                      device=_device_for_rank(request.device), dtype=request.dtype)


def _frames_control(frames: np.ndarray, dates: Sequence[_dt.date], md, scale: float):
    """ControlNet3D conditioning: (3*T, H, W) frames in [0, 1], stacked frame-major, each with its
    own date and the tile's place and GSD -> a Control of (1, 3, T, H, W) and (1, 7, T)."""
    import torch

    from .metadata import SatMetadata
    from .pipelines.controlnet import Control

    t = len(dates)
    image = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).reshape(t, 3, *frames.shape[1:])
    frame_md = [SatMetadata(md.lon_deg, md.lat_deg, md.gsd_m, None, d).normalised() for d in dates]
    return Control(image=image.permute(1, 0, 2, 3)[None],
                   cond_metadata=torch.tensor(frame_md, dtype=torch.float32).T[None], scale=scale)


def _pipeline(bundle, request, controlnet=None):
    from .pipelines.controlnet import DiffusionSatControlNetPipeline
    from .pipelines.inpaint import DiffusionSatInpaintPipeline
    from .schedulers import make_scheduler

    cls = DiffusionSatInpaintPipeline if request.task == "inpaint" else DiffusionSatControlNetPipeline
    pipe = cls.from_bundle(bundle, controlnet=controlnet)
    pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler)
    return pipe


@dataclass
class Outcome:
    """What a conditional task reports back (turned into a TaskResult by engine.tasks)."""

    grid: Grid
    seed: int
    model: str
    metadata: dict
    warnings: list[str] = field(default_factory=list)


def _resize(array: np.ndarray, size: int):
    """(C, h, w) float -> (1, C, size, size) tensor, bilinear with antialiasing (the reference's resize)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Super-resolution
# --------------------------------------------------------------------------------------------


class _S2Source:
    """A Sentinel-2 product (one multiband file, or band files / a SAFE folder) read by window."""

    def __init__(self, request) -> None:
        from .geo import sentinel2 as s2

        self.path = request.input
        self.request = request
        p = Path(request.input).expanduser()
        if not p.exists():
            raise RasterError(f"input {request.input!r} does not exist")
        self.is_folder = p.is_dir()
        if self.is_folder:
            crs, transform, width, height = s2.band_files_grid(p, 10, bands=s2.MODEL_BANDS)
        else:
            with _open(request.input) as src:
                crs, transform, width, height = src.crs, src.transform, src.width, src.height
                if src.count < 10 and request.bands is None:
                    raise InvalidRequest(
                        f"{request.input!r} has {src.count} band(s); super-resolution needs the Sentinel-2 bands "
                        f"{', '.join(s2.MODEL_BANDS)} (a 12/13-band file, or name the file's bands with --bands)"
                    )
        if crs is None:
            raise RasterError(f"{request.input!r} has no CRS; assign one (gdal_edit.py -a_srs) and retry")
        self.grid = Grid(crs, transform, width, height)

    def read(self, window):
        from .geo import sentinel2 as s2

        if self.is_folder:
            return s2.read_band_files(self.path, 10, bands=s2.MODEL_BANDS, window=window,
                                      level=self.request.level, baseline=self.request.baseline)
        return s2.read_multiband(self.path, self.request.bands, window=window, level=self.request.level,
                                 baseline=self.request.baseline)


@dataclass
class Layout:
    """Where a tiled task reads and writes, known before any model is loaded."""

    out_grid: Grid  #: the output raster's grid
    tiles: list  #: model windows (engine.geo.tiling.Tile), in input pixels
    model_px: int  #: output pixels per tile side
    in_grid: Optional[Grid] = None  #: the input grid (or its --bbox subset)
    window: Any = None  #: that subset's window in the whole input
    source: Any = None  #: the opened input (super-resolution)
    frames: list = field(default_factory=list)  #: (path, date) of conditioning frames, in time order
    mask: Any = None  #: in-painting: the mask source, already checked against the whole input


def _overlap(request, tile_px: int) -> int:
    overlap = request.overlap if request.overlap is not None else max(1, tile_px // 8)
    if 2 * overlap >= tile_px:
        raise InvalidRequest(f"--overlap {overlap} px must be less than half the {tile_px} px input tile")
    return overlap


def superres_layout(request, model_px: int) -> Layout:
    """Input tiles of model_px / factor Sentinel-2 pixels, output at input GSD / factor."""
    from .geo.tiling import output_grid, plan_tiles

    factor = request.factor
    if model_px % factor:
        raise InvalidRequest(f"--factor {factor} must divide the model's {model_px} px output tile (e.g. 2, 4, 8)")
    in_tile = model_px // factor
    source = _S2Source(request)
    in_grid, window = source.grid.subset(request.bbox, request.crs)
    tiles = plan_tiles(in_grid.width, in_grid.height, in_tile, _overlap(request, in_tile), factor)
    transform, width, height = output_grid(in_grid.transform, in_grid.width, in_grid.height, factor)
    _check_pixels(width, height, request.max_pixels, "a smaller --bbox or --factor")
    return Layout(Grid(in_grid.crs, transform, width, height), tiles, model_px, in_grid, window, source)


def temporal_layout(request, model_px: int) -> Layout:
    """The first input's grid (or its --bbox subset); every input must cover it."""
    from .geo.tiling import plan_tiles

    frames = _dated_frames(request.inputs, request.input_dates, "inputs")
    grid, window = _grid_of(request.inputs[0]).subset(request.bbox, request.crs)
    _check_same_place([p for p, _ in frames], grid)
    _check_pixels(grid.width, grid.height, request.max_pixels)
    tiles = plan_tiles(grid.width, grid.height, model_px, _overlap(request, model_px), 1)
    return Layout(grid, tiles, model_px, grid, window, frames=frames)


def inpaint_layout(request, model_px: int) -> Layout:
    """The input's grid; references (if any) must cover it."""
    from .geo.tiling import plan_tiles

    grid = _grid_of(request.input)
    _check_rgb_bands(request.input, request.rgb_bands)
    frames = []
    if request.references:
        frames = _dated_frames(request.references, request.reference_dates, "references")
        _check_same_place([p for p, _ in frames], grid)
    _check_pixels(grid.width, grid.height, request.max_pixels,
                  "a smaller input (crop it first, e.g. gdal_translate -projwin)")
    tiles = plan_tiles(grid.width, grid.height, model_px, _overlap(request, model_px), 1)
    mask = _MaskSource(request, grid)  # a mask that misses the whole input fails here, before any model call
    return Layout(grid, tiles, model_px, grid, frames=frames, mask=mask)


def _check_rgb_bands(path: str, bands: Sequence[int]) -> None:
    with _open(path) as src:
        count = src.count
    if any(not 1 <= b <= count for b in bands):
        raise InvalidRequest(
            f"--rgb-bands {','.join(map(str, bands))}: {path!r} has {count} band(s), numbered 1..{count}; "
            f"name three of them as R,G,B (e.g. {','.join(map(str, range(1, min(count, 3) + 1)))}"
            f"{',1' * max(0, 3 - count)})"
        )


LAYOUTS = {"superres": superres_layout, "temporal": temporal_layout, "inpaint": inpaint_layout}


def superres(request, out: Path, *, models, progress=None, cancel=None) -> Outcome:
    """Sentinel-2 (10 m, L1C/L2A) -> RGB at ``factor`` times the resolution, tiled over the input."""
    from rasterio.windows import Window

    from .geo.sentinel2 import to_model_input
    from .geo.tiling import tile_progress
    from .pipelines.controlnet import Control

    bundle, placement = _bundle_for(models, request)
    controlnet = bundle.controlnet_for("superres")
    model_px = request_resolution(bundle, request)
    factor = request.factor
    cond_px = model_px // int(controlnet.config.conditioning_scale)
    layout = superres_layout(request, model_px)
    source, in_grid, window, tiles, out_grid = (layout.source, layout.in_grid, layout.window, layout.tiles,
                                                layout.out_grid)
    width, height = out_grid.width, out_grid.height
    gsd_in = abs(in_grid.transform.a)
    date = _date_of(request.input, request.date)
    seed = _seed_for(request)
    pipe = _pipeline(bundle, request, controlnet)
    warnings: list[str] = list(bundle.notices)
    if date is None:
        warnings.append("no acquisition date found in the input; the date is left unknown (give --date)")

    def read(tile):
        win = Window(window.col_off + tile.valid.col_off, window.row_off + tile.valid.row_off,
                     tile.valid.width, tile.valid.height)
        model_input = to_model_input(source.read(win))
        for w in model_input.warnings:
            if w not in warnings and "nodata" not in w:
                warnings.append(w)
        return model_input.array, model_input.valid

    def process(tile, array):
        import torch

        md = _tile_metadata(out_grid, tile, model_px, date, request.cloud_cover)
        cond_md = md.with_gsd(10.0)  # the conditioning's metadata: the target's, at 10 m
        control = Control(
            image=_resize(array, cond_px),
            cond_metadata=torch.tensor([cond_md.normalised()], dtype=torch.float32),
            scale=request.conditioning_scale,
        )
        result = pipe(request.prompt, md, height=model_px, width=model_px, num_inference_steps=request.steps,
                      guidance_scale=request.guidance, generator=_tile_generator(seed, tile.index),
                      control=control, callback=tile_progress(progress, tile, len(tiles)), cancel=cancel)
        return result.images[0].transpose(2, 0, 1)

    tags = provenance_tags("superres", bundle, placement, request, seed)
    tags.update(input=display_name(request.input), factor=factor, input_gsd=f"{gsd_in:g}", output_gsd=f"{gsd_in / factor:g}",
                conditioning_scale=request.conditioning_scale, nodata_note="0 = no input data (values 1..255)")
    centre = _whole_metadata(out_grid, date, request.cloud_cover)
    tags.update(_metadata_tags(centre))
    tags["conditioning_gsd_m"] = 10.0  # the ControlNet's metadata: the target's, with the Sentinel-2 GSD
    job = TiledJob(out=out, grid=out_grid, tiles=tiles, bands=3, dtype="uint8", read=read, process=process,
                   tags=tags, scale=254.0, offset=1.0, nodata=0, run_key=request.model_dump_json())
    run_job(job, progress, cancel)
    warnings += centre.out_of_range_warnings("superres")
    return Outcome(grid=out_grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


def _whole_metadata(grid: Grid, date, cloud_cover):
    """The metadata of the whole output: its centre, its pixel size, the date and cloud cover the tiles
    were conditioned on (each tile's own longitude and latitude are those of its footprint)."""
    from .metadata import derive_from_bbox

    return derive_from_bbox(grid.bounds, grid.crs.to_wkt(), grid.width, grid.height, date=date,
                            cloud_cover=cloud_cover)


def _metadata_tags(md) -> dict:
    """The 7 metadata values as tags (as ``generate`` writes them), plus TIFFTAG_DATETIME for a known date."""
    tags = {**md.to_tags(), "metadata_note": "the whole output's centre; each tile was conditioned on its own centre"}
    if md.date is not None:
        tags["TIFFTAG_DATETIME"] = md.date.strftime("%Y:%m:%d 00:00:00")
    return tags


def _mpx(pixels: int) -> str:
    """A pixel count people can read: '67 Mpx', '0.016 Mpx (16384 px)', never '0 Mpx'."""
    return f"{pixels / 1e6:.0f} Mpx" if pixels >= 10**7 else f"{pixels / 1e6:.3g} Mpx ({pixels} px)"


def _check_pixels(width: int, height: int, limit: Optional[int], fix: str = "a smaller --bbox") -> None:
    if limit is not None and width * height > limit:
        raise InvalidRequest(
            f"the output would be {width}x{height} px ({_mpx(width * height)}), over the limit of "
            f"{_mpx(limit)}; choose {fix}"
        )


def _seed_for(request) -> int:
    """The request's seed, or a fresh one; in a split run every process must draw the same, so it
    is derived from the request itself there (all ranks see the same request)."""
    if request.seed is not None:
        return request.seed
    if _distributed()[1] > 1:
        return int(hashlib.sha256(request.model_dump_json().encode()).hexdigest()[:8], 16) % (2**31)
    import secrets

    return secrets.randbelow(2**31)


# --------------------------------------------------------------------------------------------
# RGB inputs (temporal frames, in-painting)
# --------------------------------------------------------------------------------------------


class _RGBSource:
    """An RGB(-ish) raster read onto a target grid (reprojected when needed), scaled to [0, 1].

    8-bit data is divided by 255; other types are stretched between the 2nd and 98th percentiles
    of the whole raster (measured once on a decimated read, so every tile uses the same stretch).
    """

    def __init__(self, path: str, grid: Grid, bands: Sequence[int] = (1, 2, 3)) -> None:
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        self.path = path
        self.src = _open(path)
        if self.src.crs is None:
            raise RasterError(f"{path!r} has no CRS; assign one (gdal_edit.py -a_srs) and retry")
        if self.src.count < max(bands) or min(bands) < 1:
            raise InvalidRequest(
                f"{path!r} has {self.src.count} band(s); an RGB image (bands {', '.join(map(str, bands))}) is needed"
            )
        self.bands = list(bands)
        same = (self.src.crs == grid.crs and self.src.transform == grid.transform
                and self.src.width == grid.width and self.src.height == grid.height)
        self.ds = self.src if same else WarpedVRT(self.src, crs=grid.crs, transform=grid.transform,
                                                  width=grid.width, height=grid.height,
                                                  resampling=Resampling.bilinear)
        self.dtype = self.src.dtypes[self.bands[0] - 1]
        if self.dtype == "uint8":
            self.lo, self.hi = 0.0, 255.0
        else:
            self.lo, self.hi = self._percentiles()

    def _percentiles(self) -> tuple[float, float]:
        step = max(1, max(self.src.width, self.src.height) // 1024)
        data = self.src.read(self.bands, out_shape=(len(self.bands), max(1, self.src.height // step),
                                                    max(1, self.src.width // step)), masked=True)
        values = data.compressed() if np.ma.is_masked(data) else np.asarray(data).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise InvalidRequest(f"{self.path!r} holds no valid pixels")
        lo, hi = np.percentile(values, [2, 98])
        return float(lo), float(hi if hi > lo else lo + 1)

    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        """(3, h, w) float32 in [0, 1] and a (h, w) validity mask."""
        data = self.ds.read(self.bands, window=window, out_dtype="float32", boundless=False)
        valid = (self.ds.read_masks(self.bands, window=window) > 0).all(axis=0) & np.isfinite(data).all(axis=0)
        return np.clip((data - self.lo) / (self.hi - self.lo), 0, 1), valid

    def close(self) -> None:
        if self.ds is not self.src:
            self.ds.close()
        self.src.close()


def _footprint_overlap(path: str, grid: Grid) -> float:
    """Fraction of ``grid``'s area that ``path``'s footprint covers (both in the grid's CRS)."""
    from rasterio.warp import transform_bounds

    own = _grid_of(path)
    west, south, east, north = transform_bounds(own.crs, grid.crs, *own.bounds, densify_pts=21)
    gw, gs, ge, gn = grid.bounds
    inter = max(0.0, min(east, ge) - max(west, gw)) * max(0.0, min(north, gn) - max(south, gs))
    area = (ge - gw) * (gn - gs)
    return inter / area if area > 0 else 0.0


def _grid_of(path: str) -> Grid:
    with _open(path) as src:
        if src.crs is None:
            raise RasterError(f"{path!r} has no CRS; assign one (gdal_edit.py -a_srs) and retry")
        return Grid(src.crs, src.transform, src.width, src.height)


def _dated_frames(paths: Sequence[str], dates: Optional[Sequence[_dt.date]], what: str) -> list[tuple[str, _dt.date]]:
    if dates is not None and len(dates) != len(paths):
        raise InvalidRequest(f"{len(dates)} dates given for {len(paths)} {what}; give one date per {what[:-1]}")
    frames = []
    for i, path in enumerate(paths):
        date = _date_of(path, dates[i] if dates is not None else None)
        if date is None:
            raise InvalidRequest(
                f"no acquisition date found for {path!r} (tags or file name); give the dates in input order "
                f"with --input-date"
            )
        frames.append((path, date))
    # The model sees frame order only through its temporal convolutions: keep time order.
    return sorted(frames, key=lambda f: f[1])


def _check_same_place(paths: Sequence[str], grid: Grid, minimum: float = 0.5) -> None:
    for path in paths:
        cover = _footprint_overlap(path, grid)
        if cover < minimum:
            raise InvalidRequest(
                f"{path!r} covers only {cover:.0%} of the output extent: temporal inputs must show the same "
                "place (check that every input covers the first one, or give --bbox inside all of them)"
            )


def temporal(request, out: Path, *, models, progress=None, cancel=None) -> Outcome:
    """Generate the image of a place for a new date from dated images of it (ControlNet3D)."""
    from .geo.tiling import tile_progress

    bundle, placement = _bundle_for(models, request)
    controlnet = bundle.controlnet_for("temporal")
    model_px = request_resolution(bundle, request)
    layout = temporal_layout(request, model_px)
    frames, grid, tiles = layout.frames, layout.out_grid, layout.tiles
    sources = [_RGBSource(p, grid) for p, _ in frames]
    seed = _seed_for(request)
    pipe = _pipeline(bundle, request, controlnet)

    def read(tile):
        arrays, valid = [], None
        for s in sources:
            a, v = s.read(tile.valid)
            arrays.append(a)
            valid = v if valid is None else valid & v
        return np.concatenate(arrays), valid

    def process(tile, array):
        md = _tile_metadata(grid, tile, model_px, request.date, request.cloud_cover)
        control = _frames_control(array, [d for _, d in frames], md, request.conditioning_scale)
        result = pipe(request.prompt, md, height=model_px, width=model_px, num_inference_steps=request.steps,
                      guidance_scale=request.guidance, generator=_tile_generator(seed, tile.index),
                      control=control, callback=tile_progress(progress, tile, len(tiles)), cancel=cancel)
        return result.images[0].transpose(2, 0, 1)

    tags = provenance_tags("temporal", bundle, placement, request, seed)
    tags.update(inputs=";".join(display_name(p) for p, _ in frames), input_dates=";".join(d.isoformat() for _, d in frames),
                metadata_date=request.date.isoformat(), TIFFTAG_DATETIME=request.date.strftime("%Y:%m:%d 00:00:00"),
                conditioning_scale=request.conditioning_scale)
    centre = _whole_metadata(grid, request.date, request.cloud_cover)
    tags.update(_metadata_tags(centre))
    job = TiledJob(out=out, grid=grid, tiles=tiles, bands=3, dtype="uint8", read=read, process=process, tags=tags,
                   run_key=request.model_dump_json())
    try:
        run_job(job, progress, cancel)
    finally:
        for s in sources:
            s.close()
    warnings = list(bundle.notices) + centre.out_of_range_warnings("temporal")
    return Outcome(grid=grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


# --------------------------------------------------------------------------------------------
# In-painting
# --------------------------------------------------------------------------------------------


class _MaskSource:
    """The in-painting mask of any window of the input grid: raster rule, vector, or nodata.

    Whether the mask meets the input at all is checked once, here, for the whole raster (before
    any model is loaded); windows the mask does not reach are simply unmasked.
    """

    def __init__(self, request, grid: Grid) -> None:
        from .geo.masks import TargetGrid, check_raster_overlap, parse_mask_rule, vector_geometries, vector_no_overlap

        self.request = request
        self.grid = TargetGrid(grid.crs, grid.transform, grid.width, grid.height)
        self.kind = "nodata" if request.mask == "nodata" else None
        self.geoms = None
        if self.kind is None:
            path = Path(request.mask).expanduser()
            if not path.exists():
                raise InvalidRequest(f"mask {request.mask!r} does not exist; give a raster, a vector file or 'nodata'")
            self.kind = "raster" if _is_raster(path) else "vector"
            if self.kind == "raster":
                self.rule = parse_mask_rule(request.mask_rule or "nonzero")
                check_raster_overlap(path, self.grid)
            else:
                if request.mask_rule:
                    raise InvalidRequest("--mask-rule applies to raster masks; a vector mask masks its polygons")
                # read once, in the input's CRS; every window is rasterized from these
                self.geoms = vector_geometries(path, self.grid)
                if not len(self.geoms):
                    raise vector_no_overlap(path, self.grid)
        self.pad = request.dilate

    def on(self, target) -> np.ndarray:
        """Bool mask on any target grid (e.g. a decimated view of the input), without dilation."""
        from .geo.masks import mask_from_nodata, mask_from_raster, rasterize_geometries

        if self.kind == "nodata":
            if target.shape == self.grid.shape:
                return mask_from_nodata(self.request.input)
            return np.zeros(target.shape, bool)  # callers read nodata themselves on other grids
        if self.kind == "raster":
            return mask_from_raster(self.request.mask, self.rule, target, outside_ok=True)
        return rasterize_geometries(self.geoms, target)

    def read(self, window) -> np.ndarray:
        """Bool (h, w): True = in-paint. Dilation looks ``dilate`` px beyond the window."""
        from rasterio.windows import Window

        from .geo.masks import dilate, mask_from_nodata, mask_from_raster, rasterize_geometries

        p = self.pad
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        gr0, gc0 = max(0, r0 - p), max(0, c0 - p)
        gr1, gc1 = min(self.grid.height, r0 + h + p), min(self.grid.width, c0 + w + p)
        grown = Window(gc0, gr0, gc1 - gc0, gr1 - gr0)
        if self.kind == "nodata":
            m = mask_from_nodata(self.request.input, window=grown)
        elif self.kind == "raster":
            m = mask_from_raster(self.request.mask, self.rule, self.grid, window=grown, outside_ok=True)
        else:
            m = rasterize_geometries(self.geoms, self.grid, window=grown)
        if p:
            m = dilate(m, p)
        return m[r0 - gr0:r0 - gr0 + h, c0 - gc0:c0 - gc0 + w]


def _is_raster(path: Path) -> bool:
    import rasterio

    if path.suffix.lower() in (".gpkg", ".shp", ".geojson", ".json", ".kml", ".gml", ".fgb", ".sqlite"):
        return False
    from .geo.guard import open_raster

    try:
        with open_raster(path):
            return True
    except rasterio.errors.RasterioIOError:
        return False


#: How in-painting fills the masked pixels of the bands the model does not generate (documented in
#: the README's In-painting section and written into the output's tags).
OTHER_BANDS_RULE = ("each band the model does not generate is fitted, once for the whole raster, as a linear "
                    "function of the R,G,B bands over the unmasked pixels (least squares on a decimated read); "
                    "its masked pixels get that function of the generated R,G,B; alpha bands become opaque")


class _OtherBands:
    """The bands of the input beyond ``rgb_bands``: their masked pixels, from the generated R,G,B.

    The model only knows R,G,B. For every other band ``k`` a linear fit
    ``band_k ~ c0 + c1 R + c2 G + c3 B`` is made once, over the input's unmasked, valid pixels (a
    decimated read of at most ~512 px a side, so the fit is the same for every window: no seams),
    and applied to the generated R,G,B of the masked pixels. Its R² is reported, so users see how
    much of a band (e.g. near-infrared) the visible bands explain. Alpha bands become opaque.
    """

    def __init__(self, src, rgb_bands: Sequence[int], mask: "_MaskSource") -> None:
        from rasterio.enums import ColorInterp

        self.rgb = list(rgb_bands)
        self.bands = [b for b in range(1, src.count + 1) if b not in self.rgb]
        self.dtype = np.dtype(src.dtypes[0])
        self.coef: dict[int, Optional[np.ndarray]] = {}
        self.r2: dict[int, Optional[float]] = {}
        self.alpha = {b for b in self.bands if src.colorinterp[b - 1] == ColorInterp.alpha}
        fitted = [b for b in self.bands if b not in self.alpha]
        if not fitted:
            return
        from affine import Affine

        from .geo.masks import TargetGrid

        step = max(1, math.ceil(max(src.width, src.height) / 512))
        h, w = max(1, src.height // step), max(1, src.width // step)
        data = src.read(self.rgb + fitted, out_shape=(len(self.rgb) + len(fitted), h, w), masked=True)
        valid = ~np.ma.getmaskarray(data).any(axis=0)
        values = np.ma.getdata(data).astype(np.float64)
        valid &= np.isfinite(values).all(axis=0)
        coarse = TargetGrid(src.crs, src.transform * Affine.scale(src.width / w, src.height / h), w, h)
        valid &= ~mask.on(coarse)
        x = values[:3, valid].T
        design = np.column_stack([np.ones(len(x)), x])
        for i, b in enumerate(fitted):
            y = values[3 + i, valid]
            if len(y) < 16:
                self.coef[b], self.r2[b] = None, None
                continue
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            resid = y - design @ coef
            var = float(np.var(y))
            self.coef[b] = coef
            self.r2[b] = 1.0 - float(np.mean(resid ** 2)) / var if var > 0 else 1.0

    def warnings(self, descriptions: Sequence[Optional[str]], nodata) -> list[str]:
        out = []
        for b in self.bands:
            name = f"band {b}" + (f" ({descriptions[b - 1]})" if descriptions[b - 1] else "")
            if b in self.alpha:
                out.append(f"{name} is an alpha band: its in-painted pixels are set opaque")
            elif self.coef.get(b) is None:
                left = f"left as nodata ({nodata:g})" if nodata is not None else "set to 0 (the input has no nodata value)"
                out.append(f"{name} is not generated by the model and too few unmasked pixels were found to "
                           f"estimate it: its masked pixels are {left}")
            else:
                out.append(f"{name} is not generated by the model (it makes R,G,B from --rgb-bands): its masked "
                           f"pixels are estimated from the generated R,G,B by a linear fit over the unmasked pixels "
                           f"(R² {self.r2[b]:.2f}; see the README, In-painting)")
        return out

    def fill(self, out: np.ndarray, rgb: np.ndarray, m: np.ndarray, nodata) -> None:
        """Set the masked pixels of the other bands in ``out`` (all bands, in place)."""
        if not m.any():
            return
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        x = rgb[:, m].astype(np.float64)
        for b in self.bands:
            if b in self.alpha:
                value: Any = info.max if info is not None else 1.0
            elif self.coef.get(b) is None:
                value = nodata if nodata is not None else 0
            else:
                c = self.coef[b]
                value = c[0] + c[1:] @ x
                if info is not None:
                    value = np.clip(np.rint(value), info.min, info.max)
            out[b - 1][m] = value


class _CompositeWriter:
    """Writes ``where(mask, generated, input)`` over all the input's bands, so unmasked pixels are the
    input's, bit for bit; the tiles give R,G,B (3 bands), the other bands are filled by ``others``."""

    def __init__(self, writer, source, mask: _MaskSource, bands: Sequence[int], others: _OtherBands) -> None:
        self.writer = writer
        self.profile = {**writer.profile, "count": 3}  # what the tiling writes: R, G, B
        self.source = source
        self.mask = mask
        self.bands = list(bands)
        self.others = others
        self.masked_pixels = 0

    def write(self, data: np.ndarray, window=None) -> None:
        original = self.source.read(window=window)
        m = self.mask.read(window)
        self.masked_pixels += int(m.sum())
        out = original.copy()
        if m.any():
            data = data.astype(np.float64)
            for b in set(self.bands):  # a band named twice (e.g. 1,1,1 for grey) gets the channels' mean
                channels = [i for i, x in enumerate(self.bands) if x == b]
                value = data[channels].mean(axis=0)
                if original.dtype.kind in "iu":
                    value = np.rint(value)
                out[b - 1][m] = value[m].astype(original.dtype)
            self.others.fill(out, data, m, self.writer.profile.get("nodata"))
        self.writer.write(out, window)


def inpaint(request, out: Path, *, models, progress=None, cancel=None) -> Outcome:
    """Fill the masked pixels of a raster; every other pixel is written back unchanged."""
    import torch

    from .geo.masks import feather
    from .geo.tiling import tile_progress
    from .pipelines.inpaint import Inpaint

    bundle, placement = _bundle_for(models, request)
    model_px = request_resolution(bundle, request)
    controlnet = bundle.controlnet_for("temporal") if request.references else None
    layout = inpaint_layout(request, model_px)
    grid, tiles, refs, mask = layout.out_grid, layout.tiles, layout.frames, layout.mask
    bands = request.rgb_bands
    source = _RGBSource(request.input, grid, bands)
    ref_sources = [_RGBSource(p, grid) for p, _ in refs]
    date = _date_of(request.input, request.date)
    seed = _seed_for(request)
    pipe = _pipeline(bundle, request, controlnet)
    warnings = list(bundle.notices)
    _check_resample(request, type(bundle.scheduler).__name__)

    def read(tile):
        image, valid = source.read(tile.valid)
        m = mask.read(tile.valid)
        extra = [s.read(tile.valid)[0] for s in ref_sources]
        # channel 3 carries the mask so process() sees exactly the tile's mask, padded alike
        return np.concatenate([image, m[None].astype(np.float32), *extra]), valid | m

    def process(tile, array):
        image, m = array[:3], array[3] > 0.5
        if not m.any():
            return image  # nothing to fill in this tile: the input, unchanged
        soft = feather(m, max(1, request.dilate)) if request.dilate else m.astype(np.float32)
        md = _tile_metadata(grid, tile, model_px, date, request.cloud_cover)
        control = None
        if ref_sources:
            control = _frames_control(array[4:], [d for _, d in refs], md, request.conditioning_scale)
        spec = Inpaint(image=torch.from_numpy(np.ascontiguousarray(image))[None],
                       mask=torch.from_numpy(m.astype(np.float32))[None, None], resample=request.resample)
        result = pipe(request.prompt, md, height=model_px, width=model_px, num_inference_steps=request.steps,
                      guidance_scale=request.guidance, generator=_tile_generator(seed, tile.index),
                      control=control, inpaint=spec, callback=tile_progress(progress, tile, len(tiles)),
                      cancel=cancel)
        generated = result.images[0].transpose(2, 0, 1)
        # soft edge inside the mask: the generated pixels fade into the original ones
        return soft * generated + (1 - soft) * image

    src = source.src
    dtype, nodata, count = src.dtypes[0], src.nodata, src.count
    descriptions = list(src.descriptions)
    colorinterp = [c.name for c in src.colorinterp]
    if "palette" in colorinterp:
        colorinterp = None  # the colour table is not copied, so neither is its interpretation
    others = _OtherBands(src, bands, mask)
    warnings += others.warnings(descriptions, nodata)
    tags = provenance_tags("inpaint", bundle, placement, request, seed)
    tags.update(input=display_name(request.input), mask=display_name(request.mask), mask_rule=request.mask_rule or "",
                dilate_px=request.dilate, resample=request.resample, synthetic_pixels="masked pixels only",
                references=";".join(display_name(p) for p, _ in refs))
    if others.bands:
        tags.update(generated_bands=",".join(map(str, bands)), other_bands=",".join(map(str, others.bands)),
                    other_bands_rule=OTHER_BANDS_RULE,
                    other_bands_r2=",".join("" if others.r2.get(b) is None else f"{others.r2[b]:.3f}"
                                            for b in others.bands))
    centre = _whole_metadata(grid, date, request.cloud_cover)
    tags.update(_metadata_tags(centre))
    scale = 255.0 if dtype == "uint8" else (source.hi - source.lo)
    offset = 0.0 if dtype == "uint8" else source.lo
    holder: dict[str, _CompositeWriter] = {}

    def wrap(writer):
        holder["w"] = _CompositeWriter(writer, source.src, mask, bands, others)
        return holder["w"]

    job = TiledJob(out=out, grid=grid, tiles=tiles, bands=3, dtype=dtype, read=read, process=process,
                   tags=tags, scale=scale, offset=offset, nodata=nodata, band_descriptions=[d or "" for d in descriptions],
                   colorinterp=colorinterp, wrap_writer=wrap, run_key=request.model_dump_json(), out_bands=count)
    try:
        run_job(job, progress, cancel)
    finally:
        source.close()
        for s in ref_sources:
            s.close()
    if "w" in holder and holder["w"].masked_pixels == 0:
        warnings.append("the mask selects no pixel of the input: the output equals the input")
    warnings += centre.out_of_range_warnings("inpaint")
    return Outcome(grid=grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


# --------------------------------------------------------------------------------------------
# Checks before the first model call (engine.tasks.check: the run, --dry-run and the server)
# --------------------------------------------------------------------------------------------


def _check_resample(request, scheduler_class: Optional[str]) -> None:
    """RePaint resampling re-noises latents, which only the stateless schedulers allow."""
    if not request.resample:
        return
    if request.scheduler != "default":  # the sampler asked for, else the checkpoint's own
        scheduler_class = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}.get(request.scheduler, request.scheduler)
    if scheduler_class is not None and scheduler_class not in ("DDIMScheduler", "DDPMScheduler"):
        raise InvalidRequest("--resample needs a stateless scheduler: add --scheduler ddim")


def check_inputs(request, model_px: int, located=None) -> Layout:
    """Open every input of a conditional request as its run will, and read one pixel of each:
    what would fail on the first tile fails here, before any model is loaded. ``located`` is the
    :class:`engine.models.loading.LocatedModel` of the request's model (for its scheduler)."""
    from rasterio.windows import Window

    from .metadata import SatMetadata

    layout = LAYOUTS[request.task](request, model_px)
    grid = layout.out_grid
    first = Window(0, 0, 1, 1)
    # the metadata values the tiles will be conditioned on (dates 1980..2100, cloud cover 0..1)
    own = request.date if request.task == "temporal" else _date_of(request.input, request.date)
    SatMetadata(date=own, cloud_cover=request.cloud_cover)
    for _, day in layout.frames:
        SatMetadata(date=day)
    if request.task == "superres":
        from .geo.sentinel2 import to_model_input

        win = layout.window
        to_model_input(layout.source.read(Window(win.col_off, win.row_off, 1, 1)))
        return layout
    sources = []
    try:
        if request.task == "inpaint":
            _check_resample(request, located.scheduler_class() if located is not None else None)
            _MaskSource(request, grid)
            sources.append(_RGBSource(request.input, grid, request.rgb_bands))
        sources += [_RGBSource(p, grid) for p, _ in layout.frames]
        for source in sources:
            source.read(first)
    finally:
        for source in sources:
            source.close()
    return layout
