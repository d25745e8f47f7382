"""Joint denoising of one latent canvas over overlapping windows, decoded into one COG.

MultiDiffusion-style (Bar-Tal et al. 2023): the latent canvas covers the whole output; at every
step each window of the model's native size predicts its noise (classifier-free guidance as in
``generate``), conditioned on its *own* metadata (its centre, its GSD, the date and cloud cover);
the predictions are blended into one canvas-sized prediction with the tiles' smooth weights
(``engine.geo.tiles.blend_weights``, normalised by the weight sum), and the scheduler takes ONE
step on the whole canvas (DDIM/DPM++ steps are elementwise given the timestep; a multistep
scheduler's state is canvas-sized). Neighbouring windows therefore never disagree about a latent:
there is one canvas, and where they overlap their predictions are cross-faded.

The initial noise does not depend on the layout of the windows nor on the batch: it is drawn
block by block (:data:`NOISE_BLOCK` latent cells, each block from its own generator seeded from
the seed and the block's position), so a canvas held in chunks later draws the same noise.
Windows go through the UNet ``batch_size`` at a time; the blend sums them in window order whatever
the batch, so the batch does not change the result.

The VAE decodes the final canvas in overlapping tiles with blending through the engine's tile
loop (``engine.geo.accumulate.run_tiled`` into a ``CogWriter``): memory for decoding is one tile's.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...geo.accumulate import batched, run_tiled
from ...geo.cog import CogWriter
from ...geo.run_folders import run_folder
from ...geo.tiles import blend_weights, plan_tiles
from ...metadata import parse_crs
from ...pipelines.text2img import DiffusionSatPipeline
from ...progress import CancelToken, Progress, ProgressCallback, report
from ...schedulers import make_scheduler, set_timesteps
from ..common import (
    TaskResult,
    metadata_tags,
    new_seed,
    provenance_tags,
    spread_path,
    spread_samples,
)
from .canvas import streams
from .grid import AUTO_IN_RAM_LATENTS as GRID_AUTO_IN_RAM_LATENTS
from .grid import (
    LATENT_FACTOR,
    ExtentLayout,
    extent_layout,
    extent_sampler,
    is_joint,
    whole_metadata,
    windows_metadata,
)
from .spread import generate_spread, sampled_progress

#: Side of the blocks the initial noise is drawn in, latent cells (independent of the windows).
NOISE_BLOCK = 64
#: Windows per UNet call when the request does not say (CPU: small; the result does not depend on it).
DEFAULT_BATCH = 4
#: (engine.tasks.extent.grid's; a name here too, which tests set)
AUTO_IN_RAM_LATENTS = GRID_AUTO_IN_RAM_LATENTS


def joint_progress(progress: Optional[ProgressCallback], steps: int):
    """The ``(denoising, decoding)`` callbacks of a joint run (generate --gsd, extend): the steps
    report windows (``Progress.windows``), then the decode comes as one more step of the job, so
    its fraction never goes back to 0 when decoding starts (a CLI ETA of hours, a plugin bar
    jumping back)."""
    seen = {"n": steps}

    def denoising(p: Progress) -> None:
        seen["n"] = p.total_tiles
        report(progress, Progress(step=p.step, total_steps=p.total_steps, tile=p.tile, total_tiles=p.total_tiles + 1,
                                  message=p.message, windows=True))

    def decoding(p: Progress) -> None:
        n = seen["n"]
        report(progress, Progress(step=p.tile, total_steps=p.total_tiles, tile=n, total_tiles=n + 1,
                                  message="decoding"))

    return denoising, decoding


def window_batch(request, bundle, placement, model_px: int, *, what: str = "generate --gsd",
                 free_bytes: Optional[int] = None) -> tuple[int, str]:
    """Windows per UNet call and the rule that chose it (the ``batch_size``/``batch_size_rule``
    tags): the request's; on the CPU :data:`DEFAULT_BATCH`; on CUDA the tiled tasks' rule
    (:func:`engine.tasks.sampling.batch_choice`: free GPU memory over one window's estimated
    activations, 1..16). ``free_bytes`` stands in for the device's free memory (tests)."""
    from ...batching import RULE
    from ..sampling import batch_choice

    if request.batch_size:
        return int(request.batch_size), "given (--batch-size)"
    if not str(placement.device).startswith("cuda"):
        return DEFAULT_BATCH, f"{what}'s default on the CPU: {DEFAULT_BATCH} windows per UNet call"
    choice = batch_choice(request, bundle, placement, model_px, controlnet=False, free_bytes=free_bytes)
    return choice.size, RULE.replace("1 on the CPU", f"{DEFAULT_BATCH} on the CPU")


def block_seed(seed: int, by: int, bx: int) -> int:
    """The generator seed of noise block (``by``, ``bx``): a hash, so no two blocks share noise."""
    digest = hashlib.sha256(f"diffusionsat-extent:{seed}:{by}:{bx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def canvas_noise(seed: int, height: int, width: int, channels: int = 4, rows: Optional[slice] = None) -> torch.Tensor:
    """The initial noise of a ``height`` x ``width`` latent canvas (1, channels, h, w) fp32 (CPU),
    or of its rows ``rows`` (a chunk: the same values as those rows of the whole canvas)."""
    r0, r1 = (rows.start or 0, rows.stop if rows.stop is not None else height) if rows is not None else (0, height)
    out = torch.empty((1, channels, r1 - r0, width), dtype=torch.float32)
    for by in range(r0 // NOISE_BLOCK, (r1 - 1) // NOISE_BLOCK + 1):
        for bx in range((width - 1) // NOISE_BLOCK + 1):
            g = torch.Generator("cpu").manual_seed(block_seed(seed, by, bx))
            block = torch.randn((channels, NOISE_BLOCK, NOISE_BLOCK), generator=g, dtype=torch.float32)
            y0, x0 = by * NOISE_BLOCK, bx * NOISE_BLOCK
            ys, ye = max(y0, r0), min(y0 + NOISE_BLOCK, r1)
            xe = min(x0 + NOISE_BLOCK, width)
            out[0, :, ys - r0:ye - r0, x0:xe] = block[:, ys - y0:ye - y0, :xe - x0]
    return out


def _rows(values: torch.Tensor, index: list[int]) -> torch.Tensor:
    return values[index] if values.shape[0] > 1 else values.expand(len(index), *values.shape[1:])


def make_predict(pipe, layout: ExtentLayout, prompt: str, metadata: Optional[list], guidance: float):
    """``predict(latents, t, index)``: the UNet's guided noise prediction for the windows ``index``
    (one metadata row each), latents (b, 4, h, w) in, fp32 CPU out."""
    cfg = guidance > 1.0
    device = pipe._execution_device
    n = len(layout.windows)
    text = pipe.encode_prompt([prompt])
    uncond = pipe.encode_prompt([""]) if cfg else None
    md = pipe.prepare_metadata(metadata if metadata is not None else None, n if metadata is not None else 1)

    def predict(latents: torch.Tensor, t, index: list[int]) -> torch.Tensor:
        b = len(index)
        rows = _rows(md, index)
        txt = text.expand(b, -1, -1)
        if cfg:
            txt = torch.cat([uncond.expand(b, -1, -1), txt])
            rows = torch.cat([torch.zeros_like(rows), rows])
        embeds = pipe.embed_metadata(rows)
        return pipe.predict_noise(latents.to(device, pipe.dtype), t, txt, rows, guidance,
                                  metadata_embeds=embeds).float().cpu()

    return predict


def prepare_steps(pipe, steps: int, seed: int) -> dict:
    """Set the scheduler's timesteps (on the CPU: the scheduler steps the CPU canvas; t goes to
    the UNet's device itself) and return its step arguments."""
    import inspect

    pipe.scheduler = set_timesteps(pipe.scheduler, steps, "cpu")
    accepted = set(inspect.signature(pipe.scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted:  # the scheduler's own noise (DDPM, ancestral samplers), canvas-sized
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    return kwargs


def window_weights(layout: ExtentLayout) -> list:
    """Each window's blend weights (latent cells), numpy float32; windows on the same edges share
    one array (at most 16 distinct ones, whatever the number of windows)."""
    shared: dict = {}
    for w in layout.windows:
        if w.touches not in shared:
            shared[w.touches] = blend_weights(layout.window, layout.window, layout.overlap, w.touches)
    return [shared[w.touches] for w in layout.windows]


def joint_denoise(pipe, layout: ExtentLayout, *, prompt: str, metadata: Optional[list], steps: int,
                  guidance: float, seed: int, batch_size: int = DEFAULT_BATCH,
                  predict=None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> torch.Tensor:
    """The denoised latent canvas (1, 4, canvas_h, canvas_w) fp32 on the CPU, held in RAM (any
    scheduler; :mod:`.canvas` steps a file band by band for the stateless ones).

    ``metadata``: one :class:`~engine.metadata.SatMetadata` per window (None: unconditioned, the
    model has no metadata). ``predict(latents, t, index)`` replaces the UNet (tests: a stand-in
    model); it returns one noise prediction per window in ``index``. Progress: one ``"denoising"``
    update per window and step (``tile`` = steps done, ``step`` = windows done in this step, so a
    run's measured denoising steps are window steps, as the plan's work counts them); ``cancel``
    is polled before every window batch.
    """
    windows = list(layout.windows)
    n = len(windows)
    if predict is None:
        predict = make_predict(pipe, layout, prompt, metadata, guidance)
    step_kwargs = prepare_steps(pipe, steps, seed)
    timesteps = pipe.scheduler.timesteps
    latents = canvas_noise(seed, layout.canvas_h, layout.canvas_w) * pipe.scheduler.init_noise_sigma
    weights = [torch.from_numpy(w) for w in window_weights(layout)]  # views: shared arrays stay shared
    batch_size = max(1, int(batch_size))
    total = len(timesteps)
    report(progress, Progress(step=0, total_steps=n, tile=0, total_tiles=total, message="denoising"))
    for i, t in enumerate(timesteps):
        eps_sum = torch.zeros_like(latents)
        w_sum = torch.zeros((1, 1, layout.canvas_h, layout.canvas_w), dtype=torch.float32)
        for start in range(0, n, batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            index = list(range(start, min(start + batch_size, n)))
            views = [_view(windows[k]) for k in index]
            x = torch.stack([latents[0, :, r, c] for r, c in views])
            eps = predict(x, t, index)
            for j, k in enumerate(index):  # window order, whatever the batch: the same sums
                r, c = views[j]
                eps_sum[0, :, r, c] += eps[j] * weights[k]
                w_sum[0, :, r, c] += weights[k]
            for k in index:  # one "denoising" update per window step (the run's meter counts them)
                report(progress, Progress(step=k + 1, total_steps=n, tile=i, total_tiles=total, message="denoising"))
        noise = eps_sum / w_sum
        del eps_sum
        latents = pipe.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
    if cancel is not None:
        cancel.raise_if_cancelled()
    return latents


def denoise_to_file(pipe, layout: ExtentLayout, folder: Path, *, prompt: str, metadata: Optional[list], steps: int,
                    guidance: float, seed: int, batch_size: int = DEFAULT_BATCH, predict=None,
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                    known=None):
    """:func:`joint_denoise` with the canvas in files in ``folder``, memory flat in the extent
    (:mod:`.canvas`; a stateless scheduler only); returns the open CanvasFile of the result.
    ``known``: latents held to a known region (``extend``; :func:`engine.tasks.extent.canvas.streamed_denoise`)."""
    from .canvas import streamed_denoise

    if predict is None:
        predict = make_predict(pipe, layout, prompt, metadata, guidance)
    step_kwargs = prepare_steps(pipe, steps, seed)
    return streamed_denoise(pipe, layout, predict, steps_kwargs=step_kwargs, seed=seed, folder=folder,
                            batch_size=max(1, int(batch_size)), weights=window_weights(layout), progress=progress,
                            cancel=cancel, known=known)


def _view(tile) -> tuple[slice, slice]:
    w = tile.window
    return slice(int(w.row_off), int(w.row_off + w.height)), slice(int(w.col_off), int(w.col_off + w.width))


def decode_to_cog(pipe, canvas: torch.Tensor, layout: ExtentLayout, out: Path, tags: dict, *,
                  batch_size: int = 1, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None):
    """Decode the output's part of ``canvas`` with the VAE in overlapping, blended tiles of the
    model's window, into a COG at ``out`` (published atomically): the engine's tile loop."""
    with output_writer(layout, out, tags) as writer:
        return decode_tiles(pipe, canvas, layout, writer, scratch_dir=out.parent, batch_size=batch_size,
                            progress=progress, cancel=cancel)


def output_writer(layout: ExtentLayout, out: Path, tags: dict) -> CogWriter:
    """The (not yet entered) CogWriter of the output: RGB uint8 on the layout's grid."""
    from ..generate import rasterio_crs

    crs = rasterio_crs(parse_crs(layout.crs))
    return CogWriter(out, width=layout.width, height=layout.height, count=3, dtype="uint8", crs=crs,
                     transform=layout.canvas_grid().transform, tags=tags, band_descriptions=["red", "green", "blue"],
                     colorinterp=["red", "green", "blue"])


def decode_tiles(pipe, canvas, layout: ExtentLayout, writer, *, scratch_dir: Path, batch_size: int = 1,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
    """:func:`decode_to_cog`'s tile loop into any tiling writer (``generate --spread``: one that
    also accumulates the samples' spread, engine.tasks.extent.spread)."""
    size = layout.window
    tiles = plan_tiles(layout.latent_w, layout.latent_h, size, max(1, size // 4), factor=LATENT_FACTOR)

    def read(tile) -> np.ndarray:  # the canvas is at least one window per axis: windows fit in it
        r, c = _view(tile)
        if isinstance(canvas, torch.Tensor):
            return canvas[0, :, r, c].numpy()
        return canvas.read(r.start, r.stop, c.start, c.stop)  # a CanvasFile

    @batched
    def process(batch_tiles, arrays) -> list:
        if cancel is not None:
            cancel.raise_if_cancelled()
        x = torch.from_numpy(np.stack(arrays)).to(pipe._execution_device)
        images = pipe.decode(x).cpu().numpy()
        return list(images)

    return run_tiled(read, process, writer, tiles, scratch_dir=scratch_dir, progress=progress, cancel=cancel,
                     batch_size=batch_size)


def generate_extent(request, out, *, models=None, progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None, on_model_loaded=None) -> TaskResult:
    """``generate --gsd``: the bbox at the request's GSD. At or below the model's native window it
    is the ordinary one-window generate on that grid (the same pixels as ``--width/--height`` on
    the grid's bbox); larger, joint denoising over windows (module docstring)."""
    from ...models.cache import ModelCache
    from ...models.resolution import request_resolution
    from ..checks import check
    from ..generate import generate

    started = time.perf_counter()
    checked = check(request, out)
    out = checked.out
    if not is_joint(checked.width, checked.height, checked.model_px):
        one = request.model_copy(update={"gsd": None, "bbox": checked.bbox, "width": checked.width,
                                         "height": checked.height, "size": None})
        return generate(one, out, models=models, progress=progress, cancel=cancel, on_model_loaded=on_model_loaded)
    if models is None:
        models = ModelCache()
    bundle, placement = models.get(request.model, unet=request.unet, base=request.base,
                                   controlnet=request.controlnet, device=request.device, dtype=request.dtype,
                                   compile=request.compile)
    if on_model_loaded is not None:
        on_model_loaded(bundle, placement)
    model_px = request_resolution(bundle, request)
    layout = extent_layout(request.bbox, request.crs, request.gsd, model_px)
    whole = whole_metadata(layout, request.date, request.cloud_cover)
    per_window = windows_metadata(layout, request.date, request.cloud_cover)
    warnings = list(bundle.notices) + whole.out_of_range_warnings()
    scheduler, note = extent_sampler(request.scheduler, layout.width, layout.height, layout.canvas_h,
                                     layout.canvas_w, AUTO_IN_RAM_LATENTS)
    if note:
        request = request.model_copy(update={"scheduler": scheduler})  # and the tags say so
        warnings.append(note)
    seed = request.seed if request.seed is not None else new_seed()
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler)
    batch, rule = window_batch(request, bundle, placement, layout.model_px)
    tags = extent_tags(request, bundle, placement, seed, whole, layout)
    tags.update(batch_size=batch, batch_size_rule=rule)
    sample = {"k": 0, "n": spread_samples(request)}  # --spread: the samples run one after another
    if sample["n"] > 1:
        progress = sampled_progress(progress, sample)
        tags["spread_file"] = spread_path(out).name
    denoising, decoding = joint_progress(progress, request.steps)

    args = dict(prompt=request.prompt, metadata=per_window if bundle.uses_metadata else None, steps=request.steps,
                guidance=request.guidance, seed=seed, batch_size=batch, progress=denoising if progress else None,
                cancel=cancel)

    decode = dict(batch_size=batch, progress=decoding if progress else None, cancel=cancel)
    if sample["n"] > 1:  # N joint runs, their spread accumulated in a file (engine.tasks.extent.spread)
        generate_spread(pipe, layout, out, tags, args, decode, sample)
    elif streams(pipe.scheduler):  # the canvas in files, stepped band by band: memory flat in the extent
        with run_folder(out.parent) as scratch:
            canvas = denoise_to_file(pipe, layout, scratch, **args)
            try:
                decode_to_cog(pipe, canvas, layout, out, tags, **decode)
            finally:
                canvas.close()
    else:  # a multistep scheduler keeps canvas-sized state: the canvas in RAM
        decode_to_cog(pipe, joint_denoise(pipe, layout, **args), layout, out, tags, **decode)
    return TaskResult(path=out, task="generate", seed=seed, model=bundle.name, width=layout.width,
                      height=layout.height, crs=request.crs, bbox=tuple(layout.bbox), metadata=whole.as_dict(),
                      warnings=warnings, seconds=time.perf_counter() - started)


def extent_tags(request, bundle, placement, seed: int, whole, layout: ExtentLayout) -> dict:
    """generate's tags (provenance, the whole output's metadata) and the joint layout's."""
    tags = {
        **provenance_tags("generate", bundle, placement, request, seed),
        "TIFFTAG_IMAGEDESCRIPTION": f"AI-generated (synthetic) image: DiffusionSat {bundle.name}, seed {seed}",
        **metadata_tags(whole),
        "metadata_note": "the whole output's centre; each window was conditioned on its own centre",
        "gsd": request.gsd,
        "joint_denoising": "MultiDiffusion-style: overlapping windows blended at every step",
        "windows": len(layout.windows),
        "window_px": layout.model_px,
        "window_overlap_px": layout.overlap * LATENT_FACTOR,
    }
    return tags


__all__ = ["block_seed", "canvas_noise", "decode_to_cog", "denoise_to_file", "extent_layout", "generate_extent",
           "joint_denoise"]
