"""The response shapes the server publishes in its OpenAPI document (``GET /v1/openapi.json``).

The request shapes are the task request models (:mod:`engine.tasks`), the single schema of the
CLI, the server and the plugin.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    detail: str = Field(..., description="what went wrong and what to do about it")
    code: str = Field(..., description="machine code: invalid_request, model_not_found, unauthorized, "
                                       "forbidden, not_found, not_ready, gone, too_large, ...")


class HealthOut(BaseModel):
    status: str
    version: str
    device: str
    dtype: str
    cuda: bool
    free_vram_mb: Optional[int]
    total_vram_mb: Optional[int]
    queue: int = Field(..., description="jobs waiting (not counting the running one)")
    running: bool
    models_loaded: int = Field(..., description="models held in memory now")
    model_loads: int = Field(..., description="models loaded since the engine started (a reused one does not "
                                              "count)")


class ModelOut(BaseModel):
    name: str
    tasks: list[str]
    resolution: int = Field(..., description="native output size in px")
    kind: str
    path: Optional[str]
    trained_against: Optional[str] = Field(None, description="for a ControlNet: the UNet it was trained against")
    resolution_source: Optional[str] = Field(
        None, description="where `resolution` comes from: manifest, recorded by training, config, default, built-in")
    conditioning_resolution: Optional[int] = Field(None, description="for a ControlNet: px of its conditioning")
    release: Optional[str] = Field(None, description="the released checkpoint this is (see `diffusionsat download`)")
    unet_checkpoint: Optional[str] = Field(
        None, description="single-image: the checkpoint-N used; ControlNet: the UNet it pairs with")
    warning: Optional[str] = Field(None, description="a guess the engine had to make about this model")


class ModelsOut(BaseModel):
    models: list[ModelOut]
    default: str


class SubmitOut(BaseModel):
    id: str
    state: str


class JobResultOut(BaseModel):
    task: str
    seed: int
    model: str
    width: int
    height: int
    crs: str
    bbox: list[float]
    metadata: dict[str, Any]
    warnings: list[str]
    seconds: float
    denoise_steps: Optional[int] = Field(None, description="denoising steps run, summed over tiles (skipped tiles run none)")
    denoise_seconds: Optional[float] = Field(None, description="seconds those steps took")
    result_url: Optional[str]
    spread_url: Optional[str] = Field(None, description="the per-pixel spread map (float32 COG, std of "
                                      "brightness over the seeds, 0..1) of a job submitted with spread")


class PlanOut(BaseModel):
    task: str
    width: int = Field(..., description="output width, px")
    height: int = Field(..., description="output height, px")
    crs: str
    bbox: list[float] = Field(..., description="output bounds in crs units")
    gsd_m: float = Field(..., description="output ground sample distance, metres per pixel")
    tiles: int
    model_px: int = Field(..., description="model window side, output px")
    steps: int
    unet_evaluations: int
    output_megapixels: float
    mpx_per_step: Optional[float] = Field(None, description="megapixels through the UNet per step of one tile")
    work_mpx: Optional[float] = Field(None, description="megapixels through the UNet over the job (time scales with it)")
    model: Optional[str] = Field(None, description="the model the job would run (what auto picks)")
    notices: list[str] = Field(default_factory=list, description="one-line notes on rules applied to the model")
    # generate --gsd over several windows (joint denoising; tiles = windows)
    windows: Optional[int] = Field(None, description="generate --gsd: jointly denoised windows of model_px")
    window_overlap_px: Optional[int] = Field(None, description="overlap of neighbouring windows, output px")
    joint_denoising: Optional[bool] = Field(None, description="one latent canvas denoised over the windows")
    gsd_requested: Optional[float] = Field(None, description="the gsd asked for, metres per pixel")
    # extend (outpaint a layer; its windows are jointly denoised too, tiles = windows_run)
    windows_skipped: Optional[int] = Field(None, description="extend: windows wholly inside the input (no UNet call)")
    windows_run: Optional[int] = Field(None, description="extend: windows denoised (windows - windows_skipped)")
    new_pixels: Optional[int] = Field(None, description="extend: output pixels outside the input (generated)")
    known_pixels: Optional[int] = Field(None, description="extend: the input's pixels (kept bit for bit)")
    extended_from: Optional[list[float]] = Field(None, description="extend: the input's bounds in crs units")
    input_offset_px: Optional[list[int]] = Field(None, description="extend: the input's column, row in the output")


class JobOut(BaseModel):
    id: str
    task: str
    state: str = Field(..., description="queued, running, done, failed or cancelled")
    progress: float = Field(..., ge=0.0, le=1.0)
    step: int
    total_steps: int
    tile: int
    total_tiles: int
    eta_s: Optional[float]
    message: str
    error: Optional[str]
    error_code: Optional[str]
    created: Optional[str]
    started: Optional[str]
    finished: Optional[str] = Field(..., description="set when the job has stopped for good")
    result: Optional[JobResultOut]
    expired: bool
    warnings: list[str]


class JobListOut(BaseModel):
    jobs: list[JobOut]


class UploadOut(BaseModel):
    upload_id: str
    path_ref: str = Field(..., description="use this string in a job request's path fields")
    width: int
    height: int
    count: int
    crs: Optional[str]
    dtype: str
    bounds: list[float]
    size_bytes: int


#: The error answers every endpoint documents (the body is :class:`ErrorOut`).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (401, 403, 404, 409, 410, 413, 415, 422, 429, 507)
}
