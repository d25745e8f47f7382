"""The user-level tasks: typed requests in, georeferenced rasters out.

The CLI parses flags into these request models and the server validates JSON into the same
models, so both accept exactly the same inputs with the same messages. Each task derives the
metadata in one place (``engine.metadata``), runs a pipeline and writes a COG atomically.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .device import DTYPE_NAMES
from .errors import InvalidRequest, RasterError
from .progress import CancelToken, Progress, ProgressCallback

DEFAULT_PROMPT = "a satellite image"
#: the samplers: default = the checkpoint's own (engine.pipelines.text2img.make_scheduler builds them)
SCHEDULER_NAMES = ("default", "ddim", "dpm++", "unipc", "euler", "pndm", "ddpm")
Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
Dtype = Literal[DTYPE_NAMES]  # type: ignore[valid-type]
PROMPT = Field(DEFAULT_PROMPT, max_length=1000, description="text prompt")
SEED = Field(None, ge=0, le=2**63 - 1, description="random seed (default: a fresh one, recorded in the output)")
SCHEDULER = Field("default", description="sampler: default = the checkpoint's own; dpm++ and unipc need fewer steps")
# At most 999: with 1000 training timesteps and SD 2.1's steps_offset of 1 (the released scheduler
# configs), 1000 DDIM/PNDM/DDPM steps would ask for timestep 1000, which does not exist.
STEPS = Field(20, ge=1, le=999, description="denoising steps")
MAX_PIXELS = 4096 * 4096  # a single generated image; larger areas need tiling (conditional tasks)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("auto", description="auto (the best installed model, else tiny), tiny, a model folder, "
                       "or hf:owner/name")
    unet: Optional[str] = Field(None, description="a UNet folder to combine with the model's other components")
    base: Optional[str] = Field(None, description="a Stable Diffusion 2.1 folder for components the model lacks")
    controlnet: Optional[str] = Field(None, description="a ControlNet folder (superres, temporal) to use with the model")
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N")
    dtype: Dtype = Field("auto", description="precision; auto = fp16 on CUDA, fp32 on the CPU")
    resolution: Optional[int] = Field(
        None, description="px the model runs at (tile size; generate's default size), a multiple of 8; "
        "default: what the model was trained at for this task (see `diffusionsat models`)")

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and (v < 64 or v % 8):
            raise ValueError(f"{v} px is not a multiple of 8 of at least 64 (the model works on 8x8 latent cells)")
        return v

    def input_paths(self) -> list[str]:
        """Paths of input files this request reads (the server confines them to allowed roots)."""
        return []


class GenerateRequest(_Request):
    """Generate an image for a place and a date (the main job)."""

    task: Literal["generate"] = "generate"
    bbox: tuple[float, float, float, float] = Field(
        ..., description="extent minx,miny,maxx,maxy in the units of crs (degrees for EPSG:4326, metres for UTM)")
    crs: str = Field("EPSG:4326", description="CRS of the bbox and of the output: EPSG code, WKT or PROJ string")
    date: Optional[_dt.date] = Field(None, description="acquisition date YYYY-MM-DD to condition on (default: unknown)")
    cloud_cover: Optional[float] = Field(
        None, description="cloud cover fraction 0..1 to condition on (default: unknown, as training's dropped value)")
    width: Optional[int] = Field(None, description="output width in px, a multiple of 8 (overrides size)")
    height: Optional[int] = Field(None, description="output height in px, a multiple of 8 (overrides size)")
    size: Optional[int] = Field(None, description="longest side of the output in px, a multiple of 8; the "
                                "other side follows the bbox's shape on the ground (default: the model's "
                                "native size)")
    prompt: str = PROMPT
    steps: int = STEPS
    guidance: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale (<= 1 turns it off)")
    seed: Optional[int] = SEED
    scheduler: Scheduler = SCHEDULER
    spread: Optional[int] = Field(
        None, ge=2, le=16,
        description="also sample this many seeds and write their per-pixel spread (std, 0..1) beside the "
        "output as <name>.spread.tif: where it is high the model is guessing")

    @field_validator("width", "height", "size")
    @classmethod
    def _multiple_of_8(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and (v <= 0 or v % 8):
            raise ValueError(f"{v} px is not a positive multiple of 8 (the model works on 8x8 latent cells)")
        return v

    @field_validator("cloud_cover")
    @classmethod
    def _cloud(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not (0.0 <= v <= 1.0):
            hint = f"; did you mean {v / 100:g}?" if 1.0 < v <= 100.0 else ""
            raise ValueError(f"cloud cover is a fraction 0..1, got {v}{hint}")
        return v

    @model_validator(mode="after")
    def _pixels(self) -> "GenerateRequest":
        from .errors import DiffusionSatError
        from .metadata import output_size

        try:
            w, h = output_size(self.bbox, self.crs, self.size, self.width, self.height, 512)
        except DiffusionSatError:  # a bad bbox or CRS: check() refuses it with its own message
            return self
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} px is more than {MAX_PIXELS} pixels for one generated image")
        return self


class _ConditionalRequest(_Request):
    """Fields shared by the tasks that tile a model over input rasters."""

    date: Optional[_dt.date] = Field(None, description="acquisition date YYYY-MM-DD (default: from the input)")
    cloud_cover: Optional[float] = Field(None, ge=0.0, le=1.0, description="cloud cover fraction to condition on")
    prompt: str = PROMPT
    steps: int = STEPS
    guidance: float = Field(1.0, ge=0.0, le=50.0, description="classifier-free guidance scale (<= 1 turns it off, "
                            "as the reference's ControlNet samples)")
    seed: Optional[int] = SEED
    scheduler: Scheduler = SCHEDULER
    conditioning_scale: float = Field(1.0, ge=0.0, le=5.0, description="ControlNet residual scale")
    overlap: Optional[int] = Field(None, ge=0, description="tile overlap in input px (default: an eighth of a tile)")
    max_pixels: Optional[int] = Field(64 * 1024 * 1024, ge=1, description="refuse outputs with more pixels than this")
    # What QGIS knows of the inputs (used only where a file lacks it; see engine.geo.assign).
    input_crs: Optional[str] = Field(None, description="CRS of inputs whose file has none (e.g. assigned in QGIS)")
    input_nodata: Optional[float] = Field(None, description="nodata value of inputs whose file declares none")
    band_names: Optional[list[str]] = Field(None, description="band names of inputs whose file has no band descriptions")


class _SubsetRequest(_ConditionalRequest):
    """Conditional tasks that can work on a part of their input."""

    bbox: Optional[tuple[float, float, float, float]] = Field(
        None, description="only this part of the input: minx,miny,maxx,maxy in crs (default: all of it)")
    crs: Optional[str] = Field(None, description="CRS of bbox (default: the input's)")


class SuperresRequest(_SubsetRequest):
    """Super-resolve a Sentinel-2 product (10 m, L1C or L2A) to RGB."""

    task: Literal["superres"] = "superres"
    input: str = Field(..., description="a multiband Sentinel-2 GeoTIFF/JP2, a .SAFE folder, or a folder of band files")
    bands: Optional[str] = Field(None, description="the file's band names in order, e.g. B01,...,B12 "
                                 "(default: from the file)")
    level: Optional[Literal["L1C", "L2A"]] = Field(None, description="product level (default: detected)")
    baseline: Optional[str] = Field(None, description="processing baseline, e.g. 04.00 (default: detected)")
    factor: int = Field(4, ge=1, le=64, description="output GSD = input GSD / factor")

    def input_paths(self) -> list[str]:
        return [self.input]


class TemporalRequest(_SubsetRequest):
    """Generate a place for a new date from dated images of it."""

    task: Literal["temporal"] = "temporal"
    inputs: list[str] = Field(..., min_length=1, max_length=8, description="a dated RGB image of the place "
                              "(one per input)")
    input_dates: Optional[list[_dt.date]] = Field(None, description="the date of each input, in order "
                                                  "(default: from the files' tags or names)")
    date: _dt.date = Field(..., description="the date to generate, YYYY-MM-DD")

    def input_paths(self) -> list[str]:
        return list(self.inputs)


class InpaintRequest(_ConditionalRequest):
    """Fill the masked (cloudy, missing) pixels of an image."""

    task: Literal["inpaint"] = "inpaint"
    input: str = Field(..., description="the image to fill (its RGB bands: rgb_bands)")
    mask: str = Field("nodata", description="a mask raster, a vector file (any OGR format), or nodata")
    mask_rule: Optional[str] = Field(None, description="how a raster mask selects pixels, e.g. bits:14-15=3 "
                                     "(default: nonzero)")
    dilate: int = Field(2, ge=0, le=256, description="grow the mask by this many px, with a soft edge")
    rgb_bands: list[int] = Field([1, 2, 3], min_length=3, max_length=3, description="input bands used as R,G,B")
    references: list[str] = Field([], max_length=8, description="a cloud-free image of the same place (one per "
                                  "reference); uses the temporal ControlNet")
    reference_dates: Optional[list[_dt.date]] = Field(None, description="the date of each reference, in order")
    resample: int = Field(0, ge=0, le=20, description="RePaint resampling passes per step (needs scheduler ddim)")
    guidance: float = Field(7.5, ge=0.0, le=50.0, description="classifier-free guidance scale (<= 1 turns it off)")
    # Accepted (the plugin sends its extent) but not used: in-painting fills the whole input.
    bbox: Optional[tuple[float, float, float, float]] = Field(
        None, description="ignored: in-painting fills the whole input", json_schema_extra={"cli": False})
    crs: Optional[str] = Field(None, description="ignored (see bbox)", json_schema_extra={"cli": False})

    @field_validator("rgb_bands", mode="before")
    @classmethod
    def _bands_text(cls, v: Any) -> Any:
        if isinstance(v, str):  # the CLI's "4,3,2"
            try:
                return [int(b) for b in v.split(",")]
            except ValueError:
                raise ValueError(f"{v!r} must be three band numbers like 4,3,2 (the first band is 1)") from None
        return v

    @field_validator("rgb_bands")
    @classmethod
    def _bands_from_1(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"{','.join(map(str, v))}: band numbers start at 1 (e.g. 1,2,3 or 4,3,2)")
        return v

    def input_paths(self) -> list[str]:
        paths = [self.input, *self.references]
        return paths + ([self.mask] if self.mask != "nodata" else [])


def parse_request(data: dict[str, Any]) -> _Request:
    """Validate a request dict (CLI or JSON) into its request model; errors name the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("a request is a JSON object with a 'task' field")
    task = data.get("task", "generate")
    if task not in REQUEST_MODELS:
        raise InvalidRequest(f"unknown task {task!r}; choose one of {', '.join(REQUEST_MODELS)}")
    try:
        return REQUEST_MODELS[task].model_validate(data)
    except ValidationError as err:
        raise InvalidRequest(format_validation_error(err)) from None


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "request"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


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


def rasterio_crs(crs: Any):
    """The rasterio CRS of a pyproj CRS (authority codes kept where there is one)."""
    from rasterio.crs import CRS

    authority = crs.to_authority()
    if authority is not None:
        return CRS.from_user_input(":".join(authority))
    return CRS.from_wkt(crs.to_wkt())


def spread_path(out: Path) -> Path:
    """Where ``generate --spread`` writes the spread map: beside the output."""
    return out.with_name(out.stem + ".spread.tif")


def new_seed() -> int:
    return secrets.randbelow(2**31)


def generate(
    request: GenerateRequest,
    out: str | Path,
    *,
    models=None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_model_loaded=None,
) -> TaskResult:
    """Generate the image for ``request`` and write it as a COG at ``out`` (atomically).

    ``models`` is a :class:`engine.models.cache.ModelCache` (a fresh one if None).
    """
    import numpy as np
    import torch

    from .conditional import provenance_tags
    from .geo.cog import write_cog
    from .metadata import derive_from_bbox, grid_transform, output_size, parse_crs
    from .models.cache import ModelCache
    from .pipelines.text2img import DiffusionSatPipeline, make_scheduler

    started = time.perf_counter()
    out = check(request, out).out  # everything refusable is refused before the model is loaded
    crs = parse_crs(request.crs)
    if models is None:  # not `models or ...`: an empty cache is falsy (it has __len__) yet shared
        models = ModelCache()
    bundle, placement = models.get(
        request.model, unet=request.unet, base=request.base, controlnet=request.controlnet,
        device=request.device, dtype=request.dtype,
    )
    if on_model_loaded is not None:
        on_model_loaded(bundle, placement)
    from .models.loading import request_resolution

    model_px = request_resolution(bundle, request)
    width, height = output_size(request.bbox, crs, request.size, request.width, request.height, model_px)
    metadata = derive_from_bbox(
        request.bbox, crs, width, height, date=request.date, cloud_cover=request.cloud_cover
    )
    warnings = list(bundle.notices) + metadata.out_of_range_warnings()
    if max(width, height) > 2 * model_px:
        warnings.append(
            f"{width}x{height} px is far above the model's native {model_px} px: "
            "expect repeated structures; generate at the native size and tile, or lower --size"
        )
    seed = request.seed if request.seed is not None else new_seed()

    pipe = DiffusionSatPipeline.from_bundle(bundle)
    samples = request.spread or 1
    # One sample at a time, so peak memory is one image's whatever the spread: each sample has its
    # own seed (seed, seed+1, ...), so sample 0 is exactly the single-seed image; the spread map is
    # accumulated on the way (Welford), not from a stack of all the samples.
    first = mean = m2 = None
    for i in range(samples):
        pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler)
        sample_progress = progress
        if progress is not None and samples > 1:
            def sample_progress(p, _i=i):
                progress(Progress(step=p.step, total_steps=p.total_steps, tile=_i, total_tiles=samples,
                                  message=f"sample {_i + 1}/{samples}: {p.message}"))
        latents = (pipe.prepare_latents(1, height, width, torch.Generator("cpu").manual_seed(seed + i)).cpu().float()
                   / pipe.scheduler.init_noise_sigma)
        generator = torch.Generator("cpu").manual_seed(seed + i)  # the scheduler's own noise, if it draws any
        images = pipe(
            request.prompt,
            metadata if bundle.uses_metadata else None,
            height=height,
            width=width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            num_images_per_prompt=1,
            generator=generator,
            latents=latents,
            callback=sample_progress,
            cancel=cancel,
        ).images
        if first is None:
            first = images[0]
        if samples > 1:
            brightness = images[0].mean(axis=-1, dtype=np.float64)
            if mean is None:
                mean, m2 = brightness.copy(), np.zeros_like(brightness)
            else:
                delta = brightness - mean
                mean += delta / (i + 1)
                m2 += delta * (brightness - mean)
        del images
    image = np.clip(np.rint(first * 255.0), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    tags = {
        **provenance_tags("generate", bundle, placement, request, seed),
        "TIFFTAG_IMAGEDESCRIPTION": f"AI-generated (synthetic) image: DiffusionSat {bundle.name}, seed {seed}",
        **metadata.to_tags(),
    }
    if request.date is not None:
        tags["TIFFTAG_DATETIME"] = request.date.strftime("%Y:%m:%d 00:00:00")
    if cancel is not None:
        cancel.raise_if_cancelled()
    transform = grid_transform(request.bbox, width, height)
    if samples > 1:
        # per-pixel standard deviation over the samples of the mean of R, G, B (0..1)
        spread = np.sqrt(m2 / samples).astype(np.float32)
        spread_tags = {k: v for k, v in tags.items() if not k.startswith("TIFFTAG_IMAGEDESCRIPTION")}
        spread_tags.update(spread_samples=samples, spread_seeds=f"{seed}..{seed + samples - 1}",
                           TIFFTAG_IMAGEDESCRIPTION="per-pixel spread (std of brightness, 0..1) over "
                           f"{samples} DiffusionSat samples: high = the model is guessing")
        tags["spread_file"] = spread_path(out).name
        write_cog(spread_path(out), spread, crs=rasterio_crs(crs), transform=transform, tags=spread_tags,
                  band_descriptions=["spread"])
    try:
        write_cog(
            out,
            image,
            crs=rasterio_crs(crs),
            transform=transform,
            tags=tags,
            band_descriptions=["red", "green", "blue"],
            colorinterp=["red", "green", "blue"],
        )
    except BaseException:
        if samples > 1:  # no orphan spread map without its image
            spread_path(out).unlink(missing_ok=True)
        raise
    return TaskResult(
        path=out,
        task="generate",
        seed=seed,
        model=bundle.name,
        width=width,
        height=height,
        crs=request.crs,
        bbox=tuple(request.bbox),
        metadata=metadata.as_dict(),
        warnings=warnings,
        seconds=time.perf_counter() - started,
    )


#: task name -> request model; the CLI, the server and the plugin's request builders use these names.
REQUEST_MODELS: dict[str, type[_Request]] = {
    "generate": GenerateRequest,
    "superres": SuperresRequest,
    "temporal": TemporalRequest,
    "inpaint": InpaintRequest,
}


def _conditional(name: str):
    def run(request, out, *, models=None, progress=None, cancel=None) -> Optional[TaskResult]:
        from . import conditional
        from .models.cache import ModelCache

        from .geo.assign import assigned_inputs

        started = time.perf_counter()
        out = check(request, out).out  # everything refusable is refused before the model is loaded
        if models is None:  # not `models or ...`: an empty shared cache is falsy (it has __len__)
            models = ModelCache()
        with assigned_inputs(request, out.parent) as request:
            outcome = getattr(conditional, name)(request, out, models=models, progress=progress, cancel=cancel)
        if conditional._distributed()[0] != 0:
            return None  # a non-zero rank of a split run: rank 0 wrote the COG and reports
        grid = outcome.grid
        return TaskResult(
            path=out, task=name, seed=outcome.seed, model=outcome.model, width=grid.width, height=grid.height,
            crs=grid.crs.to_string(), bbox=tuple(grid.bounds), metadata=outcome.metadata,
            warnings=outcome.warnings, seconds=time.perf_counter() - started,
        )

    run.__name__ = name
    run.__doc__ = f"Run the {name} task (see engine.conditional.{name})."
    return run


def _check_out(out, request=None) -> Path:
    """The output path: a .tif in an existing, writable folder (the writer's own conditions), and
    never one of the run's inputs (an existing output is the caller's call: --overwrite)."""
    out = Path(out)
    if out.is_dir():
        raise InvalidRequest(f"output {str(out)!r} is a folder; name a file in it, e.g. {str(out / 'out.tif')!r}")
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InvalidRequest(f"output {str(out)!r} must end in .tif (a Cloud-Optimized GeoTIFF is written)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise RasterError(f"output folder {str(folder)!r} does not exist; create it or choose another --out")
    if not os.access(folder, os.W_OK):
        raise RasterError(f"output folder {str(folder)!r} is not writable; choose another --out")
    if request is not None:  # never write over one of the run's inputs (an existing output is the caller's call)
        from .geo.guard import check_output

        sidecars = [spread_path(out)] if getattr(request, "spread", None) else []
        check_output(out, request.input_paths(), sidecars=sidecars)
    return out


superres = _conditional("superres")
temporal = _conditional("temporal")
inpaint = _conditional("inpaint")

#: task name -> function(request, out, *, models, progress, cancel) -> TaskResult
RUNNERS = {"generate": generate, "superres": superres, "temporal": temporal, "inpaint": inpaint}


@dataclass
class Checked:
    """A request that passed every check its run makes before the first model call."""

    request: _Request
    out: Optional[Path]  #: the output path (None: chosen later, e.g. by the server)
    model_px: int  #: the model's output tile size, from its config files
    width: int
    height: int
    crs: str
    bbox: tuple[float, float, float, float]
    tiles: int
    gsd_m: float
    model: str = ""  #: the model's name (what ``auto`` picked)
    notices: tuple[str, ...] = ()  #: the one-line notes the run will print about the model (pairing, tile size)


def check(request: _Request, out: Optional[str | Path] = None) -> Checked:
    """Refuse now whatever the run of ``request`` would refuse before producing anything.

    The one validation of a request after its fields: the run calls it before loading the model,
    and ``--dry-run``, ``POST /v1/plan`` and the server's check before accepting a job (202) call it
    too, so they refuse exactly the same requests with the same messages. It reads headers, config
    files and one pixel of each input; it loads no model and writes nothing. ``out`` is checked
    when given (the server picks its own).
    """
    from .device import resolve
    from .metadata import SatMetadata, derive_from_bbox, ground_pixel_size, output_size, parse_crs, validate_bbox
    from .models.loading import (
        auto_model,
        controlnet_task_of,
        locate_model,
        missing_controlnet,
        plan_resolution,
        request_resolution,
    )

    if request.task == "generate":  # the request's own values first: no file is needed to refuse them
        crs = parse_crs(request.crs)
        validate_bbox(request.bbox, crs)
    else:
        SatMetadata(date=request.date, cloud_cover=request.cloud_cover)
        for day in (getattr(request, "input_dates", None) or []) + (getattr(request, "reference_dates", None) or []):
            SatMetadata(date=day)
    path = _check_out(out, request) if out is not None else None
    resolve(request.device, request.dtype)
    located = locate_model(auto_model(request), unet=request.unet, base=request.base, controlnet=request.controlnet)
    # the same rules as the real run (request_resolution), on the facts just located; an hf: id
    # not yet downloaded has none (plan_resolution answers the released models' size)
    model_px = request_resolution(located.facts, request) if located.facts is not None else plan_resolution(request)
    needs = controlnet_task_of(request)
    have = located.controlnet_tasks()
    if needs is not None and have is not None and needs not in have:
        raise missing_controlnet(located.root.name, needs, have)
    if request.task == "generate":
        width, height = output_size(request.bbox, crs, request.size, request.width, request.height, model_px)
        derive_from_bbox(request.bbox, crs, width, height, date=request.date, cloud_cover=request.cloud_cover)
        gsd = ground_pixel_size(request.bbox, crs, width, height)
        return Checked(request, path, model_px, width, height, request.crs, tuple(request.bbox), 1,
                       (gsd[0] * gsd[1]) ** 0.5, *_model_notes(located))
    from .conditional import check_inputs

    from .geo.assign import assigned_inputs

    with assigned_inputs(request) as assigned:
        layout = check_inputs(assigned, model_px, located)
    grid = layout.out_grid
    gsd = ground_pixel_size(grid.bounds, grid.crs.to_wkt(), grid.width, grid.height)
    return Checked(request, path, model_px, grid.width, grid.height, grid.crs.to_string(), tuple(grid.bounds),
                   len(layout.tiles), (gsd[0] * gsd[1]) ** 0.5, *_model_notes(located))


def _model_notes(located) -> tuple[str, tuple[str, ...]]:
    """The model's name and the notes about it that the run prints, for plans."""
    name = "tiny" if located.tiny else located.hub if located.hub else located.root.name
    return name, tuple(located.notices)


def plan(request: _Request, out: Optional[str | Path] = None) -> dict[str, Any]:
    """What ``request`` would do, after :func:`check`: the output grid, the number of tiles and of
    UNet evaluations. Loads no model and writes nothing. For ``--dry-run``, ``POST /v1/plan`` and the
    plugin's pre-flight."""
    c = check(request, out)
    cfg = 2 if request.guidance > 1.0 else 1
    samples = (getattr(request, "spread", None) or 1) if request.task == "generate" else 1
    plan = {"width": c.width, "height": c.height, "crs": c.crs, "bbox": list(c.bbox), "tiles": c.tiles,
            "gsd_m": c.gsd_m, "task": request.task, "model_px": c.model_px, "steps": request.steps,
            "unet_evaluations": c.tiles * request.steps * cfg * samples,
            "output_megapixels": round(c.width * c.height / 1e6, 3), "model": c.model, "notices": list(c.notices)}
    # The work, in megapixels through the UNet: a generate runs the whole image at once, the other
    # tasks one model_px window per tile (a time estimate scales with this, not with evaluations).
    eval_px = c.width * c.height if request.task == "generate" else c.model_px * c.model_px
    passes = 1 + int(getattr(request, "resample", 0) or 0)
    plan["mpx_per_step"] = round(eval_px * cfg * samples * passes / 1e6, 6)
    plan["work_mpx"] = round(plan["mpx_per_step"] * c.tiles * request.steps, 6)
    return plan


class _DenoiseMeter:
    """Wraps a progress callback: counts the denoising steps run and times them (model loading,
    reading, decoding and writing are left out)."""

    def __init__(self, progress: Optional[ProgressCallback]) -> None:
        self.progress = progress
        self.steps = 0
        self.seconds = 0.0
        self._last: Optional[float] = None

    def __call__(self, p) -> None:
        if p.message == "denoising":
            now = time.perf_counter()
            if p.step > 0 and self._last is not None:
                self.steps += 1
                self.seconds += now - self._last
            self._last = now
        if self.progress is not None:
            self.progress(p)


def run_task(
    request: _Request,
    out: str | Path,
    *,
    models=None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    on_model_loaded=None,
) -> TaskResult:
    """Run any task request, writing its COG at ``out``. ``on_model_loaded(bundle, placement)``
    (generate only) is called once the model is loaded."""
    meter = _DenoiseMeter(progress)
    extra = {"on_model_loaded": on_model_loaded} if on_model_loaded is not None else {}
    result = RUNNERS[request.task](request, out, models=models, progress=meter, cancel=cancel, **extra)
    if result is not None:
        result.denoise_steps, result.denoise_seconds = meter.steps, meter.seconds
    return result
