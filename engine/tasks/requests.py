"""The request models: the one schema of every task's inputs.

The CLI builds its options from these models and parses flags into them; the server validates
JSON into the same models, so both accept exactly the same inputs with the same messages. Light
to import (pydantic only): the CLI's ``--help`` and the server's OpenAPI schema come from here.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..device import DTYPE_NAMES
from ..errors import InvalidRequest
from ..schedulers import SCHEDULER_NAMES

DEFAULT_PROMPT = "a satellite image"
Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
Dtype = Literal[DTYPE_NAMES]  # type: ignore[valid-type]
PROMPT = Field(DEFAULT_PROMPT, max_length=1000, description="text prompt")
SEED = Field(None, ge=0, le=2**63 - 1, description="random seed (default: a fresh one, recorded in the output)")
SCHEDULER = Field("auto", description="sampler: auto = dpm++ (DPM-Solver++ 2M; ddim with --resample); default = "
                  "the checkpoint's own (DDIM for the released ones, what the reference used at 50-100 steps)")
# At most 999: with 1000 training timesteps and SD 2.1's steps_offset of 1 (the released scheduler
# configs), 1000 DDIM/PNDM/DDPM steps would ask for timestep 1000, which does not exist.
STEPS = Field(20, ge=1, le=999, description="denoising steps")
SPREAD = Field(
    None, ge=2, le=16,
    description="sample this many seeds in all (seed, seed+1, ...; the output is the first, unchanged) and "
    "write their per-pixel spread (std, 0..1) beside the output as <name>.spread.tif: where it is high the "
    "model is guessing; N times the time (default: off, one sample)")
MAX_PIXELS = 4096 * 4096  # a single generated image; larger areas need tiling (conditional tasks)
MAX_RESOLUTION = 4096  # px, the largest tile (model window) side: one tile is at most MAX_PIXELS


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
        None, description="px the model runs at (tile size; generate's default size), a multiple of 8 in 64..4096; "
        "default: what the model was trained at for this task (see `diffusionsat models`)")

    batch_size: Optional[int] = Field(
        None, ge=1, le=64, strict=True, description="tiles (with --spread: tile samples; generate --spread: samples; generate --gsd: "
        "windows) per model call; "
        "on the CPU the pixels equal those of 1 (generate --gsd: within 1 level; on CUDA up to rounding); default: "
        "4 on the CPU for generate --gsd and extend, else 1 on the CPU; on CUDA chosen from the free GPU memory and the model's size at the "
        "task's resolution, at most 16, halved if the GPU runs out of memory")
    compile: bool = Field(False, strict=True, description="torch.compile the UNet and ControlNet blocks (once per shape, "
                          "reused across tiles and jobs): slower start, faster large jobs on CUDA; ignored with "
                          "a notice where it cannot run (no C compiler on the CPU)")

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and (v < 64 or v % 8):
            raise ValueError(f"{v} px is not a multiple of 8 of at least 64 (the model works on 8x8 latent cells)")
        if v is not None and v > MAX_RESOLUTION:  # a tile's side: 8192 ran the model on 8192^2 px for a 600 px input
            raise ValueError(f"{v} px is more than {MAX_RESOLUTION} px per tile side; leave --resolution out (the "
                             f"model's own size) or give at most {MAX_RESOLUTION}")
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
    gsd: Optional[float] = Field(
        None, gt=0.0, le=100_000.0, allow_inf_nan=False, description="ground resolution in metres per pixel: the output is the "
        "bbox at this GSD, of any size (instead of size/width/height); larger than the model's window, it is "
        "denoised jointly over overlapping windows, each conditioned on its own place")
    prompt: str = PROMPT
    steps: int = STEPS
    guidance: float = Field(7.5, ge=0.0, le=50.0, allow_inf_nan=False, description="classifier-free guidance scale (<= 1 turns it off)")
    seed: Optional[int] = SEED
    scheduler: Scheduler = SCHEDULER
    spread: Optional[int] = SPREAD

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
        # engine.metadata (pyproj) is imported here, not at the top: this module must stay light
        from ..errors import DiffusionSatError
        from ..metadata import output_size

        if self.gsd is not None:
            return self._extent_pixels()
        try:
            w, h = output_size(self.bbox, self.crs, self.size, self.width, self.height, 512)
        except DiffusionSatError:  # a bad bbox or CRS: check() refuses it with its own message
            return self
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} px is more than {MAX_PIXELS} pixels for one generated image")
        return self

    def _extent_pixels(self) -> "GenerateRequest":
        """``gsd`` sets the size: not with size/width/height; a large extent has its own limit
        (engine.tasks.extent.EXTENT_MAX_PIXELS), not MAX_PIXELS (it is not one window)."""
        from ..errors import DiffusionSatError
        from .extent.grid import EXTENT_MAX_PIXELS, extent_grid

        given = [f"--{n}" for n in ("size", "width", "height") if getattr(self, n) is not None]
        if given:
            raise ValueError(f"gsd sets the output size from the bbox: give either --gsd or {'/'.join(given)}, "
                             "not both")
        try:
            _, w, h = extent_grid(self.bbox, self.crs, self.gsd)
        except DiffusionSatError:  # a bad bbox or CRS: check() refuses it with its own message
            return self
        if w * h > EXTENT_MAX_PIXELS:
            raise ValueError(f"at {self.gsd:g} m/px the output would be {w}x{h} px ({w * h / 1e6:.0f} Mpx), over "
                             f"the limit of {EXTENT_MAX_PIXELS / 1e6:.0f} Mpx; choose a coarser gsd or a smaller bbox")
        return self


class _ConditionalRequest(_Request):
    """Fields shared by the tasks that tile a model over input rasters."""

    date: Optional[_dt.date] = Field(None, description="acquisition date YYYY-MM-DD (default: from the input)")
    cloud_cover: Optional[float] = Field(None, ge=0.0, le=1.0, description="cloud cover fraction to condition on")
    prompt: str = PROMPT
    steps: int = STEPS
    guidance: float = Field(1.0, ge=0.0, le=50.0, allow_inf_nan=False, description="classifier-free guidance scale (<= 1 turns it off, "
                            "as the reference's ControlNet samples)")
    seed: Optional[int] = SEED
    scheduler: Scheduler = SCHEDULER
    spread: Optional[int] = SPREAD
    conditioning_scale: float = Field(1.0, ge=0.0, le=5.0, allow_inf_nan=False, description="ControlNet residual scale")
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
    guidance: float = Field(7.5, ge=0.0, le=50.0, allow_inf_nan=False, description="classifier-free guidance scale (<= 1 turns it off)")
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


class ExtendRequest(_Request):
    """Extend (outpaint) a raster layer to a larger extent: its pixels kept, the new ones generated."""

    task: Literal["extend"] = "extend"
    input: str = Field(..., description="the raster layer to extend (its RGB bands: rgb_bands)")
    bbox: tuple[float, float, float, float] = Field(
        ..., description="the extent to cover: minx,miny,maxx,maxy in crs; the output is the input's grid grown "
        "to cover it (snapped outward to the input's pixels)")
    crs: Optional[str] = Field(None, description="CRS of bbox (default: the input's)")
    date: Optional[_dt.date] = Field(None, description="acquisition date YYYY-MM-DD (default: from the input)")
    cloud_cover: Optional[float] = Field(None, ge=0.0, le=1.0, description="cloud cover fraction to condition on")
    prompt: str = PROMPT
    steps: int = STEPS
    guidance: float = Field(7.5, ge=0.0, le=50.0, allow_inf_nan=False, description="classifier-free guidance scale (<= 1 turns it off)")
    seed: Optional[int] = SEED
    scheduler: Scheduler = Field("auto", description="sampler: auto = ddim (the known region is put back at "
                                 "every step, which needs a stateless sampler: ddim, or default for DDIM checkpoints)")
    rgb_bands: list[int] = Field([1, 2, 3], min_length=3, max_length=3, description="input bands used as R,G,B")
    max_pixels: Optional[int] = Field(64 * 1024 * 1024, ge=1, description="refuse outputs with more pixels than this")
    input_crs: Optional[str] = Field(None, description="CRS of inputs whose file has none (e.g. assigned in QGIS)")
    input_nodata: Optional[float] = Field(None, description="nodata value of inputs whose file declares none")
    band_names: Optional[list[str]] = Field(None, description="band names of inputs whose file has no band descriptions")

    @field_validator("rgb_bands", mode="before")
    @classmethod
    def _bands_text(cls, v: Any) -> Any:
        return InpaintRequest._bands_text(v)

    @field_validator("rgb_bands")
    @classmethod
    def _bands_from_1(cls, v: list[int]) -> list[int]:
        return InpaintRequest._bands_from_1(v)

    def input_paths(self) -> list[str]:
        return [self.input]


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
        if e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg += _range_hint(err.title, e["loc"], e.get("input"))
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _range_hint(model_name: str, loc, value) -> str:
    """" (got 1; allowed 2..16)": the field's whole range, where the message names one bound."""
    model = next((m for m in REQUEST_MODELS.values() if m.__name__ == model_name), None)
    info = model.model_fields.get(str(loc[0])) if model is not None and len(loc) == 1 else None
    if info is None:
        return ""
    lo = next(((a, getattr(m, a)) for m in info.metadata for a in ("ge", "gt") if hasattr(m, a)), None)
    hi = next(((a, getattr(m, a)) for m in info.metadata for a in ("le", "lt") if hasattr(m, a)), None)
    if lo is None or hi is None:
        return ""
    def num(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if lo[0] == "ge" and hi[0] == "le":
        return f" (got {num(value)}; allowed {num(lo[1])}..{num(hi[1])})"
    return (f" (got {num(value)}; allowed {'>=' if lo[0] == 'ge' else '>'} {num(lo[1])} and "
            f"{'<=' if hi[0] == 'le' else '<'} {num(hi[1])})")


#: task name -> request model; the CLI, the server and the plugin's request builders use these names.
REQUEST_MODELS: dict[str, type[_Request]] = {
    "generate": GenerateRequest,
    "superres": SuperresRequest,
    "temporal": TemporalRequest,
    "inpaint": InpaintRequest,
    "extend": ExtendRequest,
}
