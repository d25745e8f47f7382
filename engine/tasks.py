"""The user-level tasks: typed requests in, georeferenced rasters out.

The CLI parses flags into these request models and the server validates JSON into the same
models, so both accept exactly the same inputs with the same messages. Each task derives the
metadata in one place (``engine.metadata``), runs a pipeline and writes a COG atomically.
"""

from __future__ import annotations

import datetime as _dt
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidRequest
from .progress import CancelToken, ProgressCallback

DEFAULT_PROMPT = "a satellite image"
MAX_PIXELS = 4096 * 4096  # a single generated image; larger areas need tiling (conditional tasks)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("auto", description="'auto', 'tiny', a model folder, or hf:owner/name")
    unet: Optional[str] = Field(None, description="a UNet folder to use with --model's other components")
    base: Optional[str] = Field(None, description="an SD 2.1 folder supplying missing components")
    controlnet: Optional[str] = Field(None, description="a ControlNet folder for the conditional tasks")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: str = Field("auto", description="auto, fp32, fp16 or bf16")

    def input_paths(self) -> list[str]:
        """Paths of input files this request reads (the server confines them to allowed roots)."""
        return []


class GenerateRequest(_Request):
    """Generate an image for a place and a date (the main job)."""

    task: Literal["generate"] = "generate"
    bbox: tuple[float, float, float, float] = Field(..., description="minx, miny, maxx, maxy in `crs` units")
    crs: str = Field("EPSG:4326", description="EPSG code, WKT or PROJ string of the bbox and output")
    date: Optional[_dt.date] = Field(None, description="acquisition date to condition on (ISO)")
    cloud_cover: Optional[float] = Field(None, description="cloud cover fraction 0..1")
    width: Optional[int] = Field(None, description="output width in px (multiple of 8); default: size")
    height: Optional[int] = Field(None, description="output height in px (multiple of 8); default: size")
    size: Optional[int] = Field(None, description="output width and height in px; default: the model's native size")
    prompt: str = Field(DEFAULT_PROMPT, max_length=1000)
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0.0, le=50.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="random seed; default: a fresh one, recorded")
    scheduler: str = Field("default", description="default (the checkpoint's), ddim, dpm++, unipc, euler, pndm")
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
        w = self.width or self.size or 512
        h = self.height or self.size or 512
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} px is more than {MAX_PIXELS} pixels for one generated image")
        return self


class _ConditionalRequest(_Request):
    """Fields shared by the tasks that tile a model over input rasters."""

    date: Optional[_dt.date] = Field(None, description="acquisition date to condition on (default: from the input)")
    cloud_cover: Optional[float] = Field(None, ge=0.0, le=1.0, description="cloud cover fraction 0..1")
    bbox: Optional[tuple[float, float, float, float]] = Field(
        None, description="only this part of the input (minx, miny, maxx, maxy in `crs`)")
    crs: Optional[str] = Field(None, description="CRS of bbox (default: the input's)")
    prompt: str = Field(DEFAULT_PROMPT, max_length=1000)
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(1.0, ge=0.0, le=50.0, description="CFG scale (1 = off, as the reference's ControlNet samples)")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    scheduler: str = Field("default")
    conditioning_scale: float = Field(1.0, ge=0.0, le=5.0, description="ControlNet residual scale")
    overlap: Optional[int] = Field(None, ge=0, description="tile overlap in input px (default: tile/8)")
    max_pixels: Optional[int] = Field(64 * 1024 * 1024, ge=1, description="refuse outputs larger than this")


class SuperresRequest(_ConditionalRequest):
    """Super-resolve a Sentinel-2 product (10 m, L1C or L2A) to RGB."""

    task: Literal["superres"] = "superres"
    input: str = Field(..., description="a multiband Sentinel-2 file, a .SAFE folder, or a folder of band files")
    bands: Optional[str] = Field(None, description="the input file's band names in order, e.g. B01,B02,...,B12")
    level: Optional[Literal["L1C", "L2A"]] = None
    baseline: Optional[str] = Field(None, description="processing baseline, e.g. 04.00 (default: from the product)")
    factor: int = Field(4, ge=1, le=64, description="output GSD = input GSD / factor")

    def input_paths(self) -> list[str]:
        return [self.input]


class TemporalRequest(_ConditionalRequest):
    """Generate a place for a new date from dated images of it."""

    task: Literal["temporal"] = "temporal"
    inputs: list[str] = Field(..., min_length=1, max_length=8, description="dated RGB images of the same place")
    input_dates: Optional[list[_dt.date]] = Field(None, description="one date per input (default: from each input)")
    date: _dt.date = Field(..., description="the date to generate")

    def input_paths(self) -> list[str]:
        return list(self.inputs)


class InpaintRequest(_ConditionalRequest):
    """Fill the masked (cloudy, missing) pixels of an image."""

    task: Literal["inpaint"] = "inpaint"
    input: str = Field(..., description="the image to fill (RGB bands, see rgb_bands)")
    mask: str = Field("nodata", description="a mask raster, an OGR vector file, or 'nodata'")
    mask_rule: Optional[str] = Field(None, description="how a raster mask selects pixels, e.g. bits:14-15=3")
    dilate: int = Field(2, ge=0, le=256, description="grow the mask by this many px (soft edge inside)")
    rgb_bands: list[int] = Field([1, 2, 3], min_length=3, max_length=3, description="input bands used as R,G,B")
    references: list[str] = Field([], max_length=8, description="cloud-free acquisitions of the same place")
    reference_dates: Optional[list[_dt.date]] = None
    resample: int = Field(0, ge=0, le=20, description="RePaint resampling passes per step")
    guidance: float = Field(7.5, ge=0.0, le=50.0)

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
    from .metadata import derive_from_bbox, grid_transform, parse_crs, validate_bbox
    from .models.cache import ModelCache
    from .pipelines.text2img import DiffusionSatPipeline, make_scheduler

    started = time.perf_counter()
    crs = parse_crs(request.crs)
    validate_bbox(request.bbox, crs)
    out = _check_out(out, request)
    models = models or ModelCache()
    bundle, placement = models.get(
        request.model, unet=request.unet, base=request.base, controlnet=request.controlnet,
        device=request.device, dtype=request.dtype,
    )
    if on_model_loaded is not None:
        on_model_loaded(bundle, placement)
    width = request.width or request.size or bundle.native_resolution
    height = request.height or request.size or bundle.native_resolution
    metadata = derive_from_bbox(
        request.bbox, crs, width, height, date=request.date, cloud_cover=request.cloud_cover
    )
    warnings = list(bundle.notices) + metadata.out_of_range_warnings()
    if max(width, height) > 2 * bundle.native_resolution:
        warnings.append(
            f"{width}x{height} px is far above the model's native {bundle.native_resolution} px: "
            "expect repeated structures; generate at the native size and tile, or lower --size"
        )
    seed = request.seed if request.seed is not None else new_seed()

    pipe = DiffusionSatPipeline.from_bundle(bundle)
    pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler)
    generator = torch.Generator("cpu").manual_seed(seed)
    samples = request.spread or 1
    # Each sample has its own seed (seed, seed+1, ...) so sample 0 is exactly the single-seed image.
    latents = torch.cat([
        pipe.prepare_latents(1, height, width, torch.Generator("cpu").manual_seed(seed + i)).cpu().float()
        / pipe.scheduler.init_noise_sigma
        for i in range(samples)
    ])
    result = pipe(
        request.prompt,
        metadata if bundle.uses_metadata else None,
        height=height,
        width=width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        num_images_per_prompt=samples,
        generator=generator,
        latents=latents,
        callback=progress,
        cancel=cancel,
    )
    image = np.clip(np.rint(result.images[0] * 255.0), 0, 255).astype(np.uint8).transpose(2, 0, 1)
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
        spread = result.images.mean(axis=-1).std(axis=0).astype(np.float32)
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

        started = time.perf_counter()
        out = _check_out(out, request)
        outcome = getattr(conditional, name)(request, out, models=models or ModelCache(), progress=progress,
                                             cancel=cancel)
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
    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InvalidRequest(f"output {str(out)!r} must end in .tif (a Cloud-Optimized GeoTIFF is written)")
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


def plan(request: _Request) -> dict[str, Any]:
    """What ``request`` would do, without loading a model or writing anything: the output grid,
    the number of tiles and of UNet evaluations. For ``--dry-run`` and the plugin's pre-flight."""
    from .models.loading import native_resolution

    model_px = native_resolution(request.model, request.unet)
    cfg = 2 if request.guidance > 1.0 else 1
    if request.task == "generate":
        from .metadata import ground_pixel_size, parse_crs, validate_bbox

        crs = parse_crs(request.crs)
        validate_bbox(request.bbox, crs)
        width = request.width or request.size or model_px
        height = request.height or request.size or model_px
        gsd = ground_pixel_size(request.bbox, crs, width, height)
        out = {"width": width, "height": height, "crs": request.crs, "bbox": list(request.bbox), "tiles": 1,
               "gsd_m": (gsd[0] * gsd[1]) ** 0.5}
        samples = request.spread or 1
    else:
        from .conditional import LAYOUTS
        from .metadata import ground_pixel_size

        layout = LAYOUTS[request.task](request, model_px)
        grid = layout.out_grid
        crs = grid.crs.to_wkt()
        gsd = ground_pixel_size(grid.bounds, crs, grid.width, grid.height)
        out = {"width": grid.width, "height": grid.height, "crs": grid.crs.to_string(), "bbox": list(grid.bounds),
               "tiles": len(layout.tiles), "gsd_m": (gsd[0] * gsd[1]) ** 0.5}
        samples = 1
    out.update(task=request.task, model_px=model_px, steps=request.steps,
               unet_evaluations=out["tiles"] * request.steps * cfg * samples,
               output_megapixels=round(out["width"] * out["height"] / 1e6, 3))
    return out


def run_task(
    request: _Request,
    out: str | Path,
    *,
    models=None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> TaskResult:
    """Run any task request, writing its COG at ``out``."""
    return RUNNERS[request.task](request, out, models=models, progress=progress, cancel=cancel)
