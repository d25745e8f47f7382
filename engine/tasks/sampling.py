"""The model side of a tiled task: its model on this process's device, its pipeline, the noise of
each tile and the temporal ControlNet's conditioning. This is the torch half of what the tasks
share; :mod:`engine.tasks.common` is the half that checks and plans use too, without torch.
"""

from __future__ import annotations

import datetime as _dt
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..batching import BatchChoice, choose, is_cuda_oom
from ..errors import DeviceError
from ..geo.accumulate import batched
from ..geo.tiles import tile_progress
from ..metadata import SatMetadata
from ..models.registry import auto_model
from ..parallel import RunContext
from ..pipelines.controlnet import Control, DiffusionSatControlNetPipeline
from ..pipelines.inpaint import DiffusionSatInpaintPipeline
from ..schedulers import make_scheduler
from .common import spread_samples, tile_metadata, with_spread


def tile_generator(seed: int, tile_index: int):
    # Each tile gets its own reproducible noise; a split run draws the same noise per tile.
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + tile_index) % (2**63))


def tile_generators(seed: int, tiles: Sequence) -> Any:
    """The generators of a batch of tiles: each tile's own :func:`tile_generator` (one generator,
    not a list, for a single tile), so a tile's noise does not depend on the batch it is in."""
    generators = [tile_generator(seed, tile.index) for tile in tiles]
    return generators[0] if len(generators) == 1 else generators


def row_generators(seed: int, rows: Sequence) -> Any:
    """The generators of a batch of (tile, sample) rows: sample ``k`` of a tile draws from
    :func:`tile_generator` of seed ``seed + k`` (sample 0: the tile's own noise without
    ``--spread``), one generator per row (a single one for one row), whatever the batch."""
    generators = [tile_generator(seed + k, tile.index) for tile, k in rows]
    return generators[0] if len(generators) == 1 else generators


def rows_progress(progress, rows: Sequence, total_tiles: int, samples: int):
    """:func:`engine.geo.tiles.tile_progress` for a batch of (tile, sample) rows: each sample of a
    tile is one tile-sample of ``total_tiles x samples`` (the tile loop's own "tile i/n" updates
    land on the same fractions)."""
    if samples == 1:
        return tile_progress(progress, [tile for tile, _ in rows], total_tiles)
    virtual = [SimpleNamespace(index=tile.index * samples + k) for tile, k in rows]
    return tile_progress(progress, virtual, total_tiles * samples)


def sample_rows(tiles: Sequence, items: Sequence, samples: int) -> list:
    """(tile, item, sample) rows: every tile ``samples`` times, its samples one after another."""
    return [(tile, item, k) for tile, item in zip(tiles, items) for k in range(samples)]


def per_tile(outputs: Sequence, samples: int) -> list:
    """The rows' outputs back to one output per tile: as they are for one sample, else sample 0
    with the tile's spread as one more band (engine.tasks.common.with_spread)."""
    if samples == 1:
        return list(outputs)
    return [with_spread(outputs[i : i + samples]) for i in range(0, len(outputs), samples)]


def tiles_per_call(choice: BatchChoice, samples: int) -> int:
    """Tiles handed to ``process`` at once: the batch's rows are tiles x samples, so with ``--spread``
    about one model call's rows (at least one tile)."""
    return max(1, choice.size // samples)


def batch_choice(request, bundle, placement, model_px: int, controlnet: bool,
                 free_bytes: Optional[int] = None) -> BatchChoice:
    """The run's tiles per model call: ``request.batch_size`` or the automatic rule (engine.batching;
    ``free_bytes`` stands in for the device's free memory)."""
    return choose(request.batch_size, placement.device, unet_channels=bundle.unet.config.block_out_channels,
                  vae_channels=bundle.vae.config.block_out_channels, model_px=model_px, dtype=placement.dtype,
                  guidance=request.guidance > 1.0, controlnet=controlnet, free_bytes=free_bytes)


class Batches:
    """Runs ``fn(items) -> outputs`` over items in batches of at most ``choice.size``. At an
    automatic size a CUDA out-of-memory error halves the batch and retries it (down to 1), once
    noted in ``notices``; at a size the user gave it fails with a message naming ``--batch-size``."""

    def __init__(self, choice: BatchChoice, notices: list, what: str = "tiles") -> None:
        self.size = max(1, choice.size)
        self.auto = choice.auto
        self.notices = notices
        self.what = what

    def __call__(self, fn: Callable[[list], list], items: Sequence) -> list:
        items, out, start = list(items), [], 0
        while start < len(items):
            chunk = items[start : start + self.size]
            try:
                out.extend(fn(chunk))
            except Exception as err:  # noqa: BLE001 - only CUDA OOM is handled; the rest re-raised
                if not is_cuda_oom(err) or len(chunk) == 1:
                    raise
                if not self.auto:
                    raise DeviceError(
                        f"the GPU ran out of memory at --batch-size {len(chunk)} ({self.what} per model call): "
                        "give a smaller --batch-size, or leave it out to choose it from the free memory") from err
                _free_cuda_cache()
                self.size = max(1, len(chunk) // 2)
                self.notices.append(f"the GPU ran out of memory at {len(chunk)} {self.what} per model call: "
                                    f"retried at {self.size} (an automatic --batch-size)")
                continue
            start += len(chunk)
        return out


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bundle_for(models, request, context: RunContext):
    """The request's model (cached), on this process's device (its own GPU in a split run)."""
    device = context.device if context.distributed else request.device
    return models.get(auto_model(request), unet=request.unet, base=request.base, controlnet=request.controlnet,
                      device=device, dtype=request.dtype, compile=request.compile)


def pipeline(bundle, request, controlnet=None):
    cls = DiffusionSatInpaintPipeline if request.task == "inpaint" else DiffusionSatControlNetPipeline
    pipe = cls.from_bundle(bundle, controlnet=controlnet)
    pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler, getattr(request, "resample", 0))
    return pipe


def frames_control(frames: np.ndarray, dates: Sequence[_dt.date], md, scale: float):
    """ControlNet3D conditioning: (3*T, H, W) frames in [0, 1], stacked frame-major, each with its
    own date and the tile's place and GSD -> a Control of (1, 3, T, H, W) and (1, 7, T)."""
    t = len(dates)
    image = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)).reshape(t, 3, *frames.shape[1:])
    frame_md = [SatMetadata(md.lon_deg, md.lat_deg, md.gsd_m, None, d).normalised() for d in dates]
    return Control(image=image.permute(1, 0, 2, 3)[None],
                   cond_metadata=torch.tensor(frame_md, dtype=torch.float32).T[None], scale=scale)


def frames_controls(frames: Sequence[np.ndarray], dates: Sequence[_dt.date], mds: Sequence, scale: float):
    """:func:`frames_control` of a batch of tiles (each its own frames and metadata): a Control of
    (b, 3, T, H, W) and (b, 7, T)."""
    controls = [frames_control(f, dates, md, scale) for f, md in zip(frames, mds)]
    return Control(image=torch.cat([c.image for c in controls]),
                   cond_metadata=torch.cat([c.cond_metadata for c in controls]), scale=scale)


def controlnet_process(pipe, request, batches: Batches, control_of: Callable, *, grid, model_px: int, date, seed: int,
                       total_tiles: int, progress=None, cancel=None) -> Callable:
    """The ``@batched`` process function of a ControlNet task (super-resolution, temporal): each
    batch of tiles through one pipeline call (``batches``: the size, the halving on CUDA OOM), every
    tile with its own metadata (its footprint's centre), its own generator, and its conditioning
    from ``control_of(arrays, metadata)``; one (3, h, w) output per tile. With ``--spread`` N
    every tile is N rows (sample k: seed + k), and each tile's output is sample 0 with the
    samples' spread as a 4th band."""

    samples = spread_samples(request)

    def sample(batch):  # (tile, array, sample) rows
        rows = [(tile, k) for tile, _, k in batch]
        mds = [tile_metadata(grid, tile, model_px, date, request.cloud_cover) for tile, _ in rows]
        result = pipe([request.prompt] * len(batch), mds, height=model_px, width=model_px,
                      num_inference_steps=request.steps, guidance_scale=request.guidance,
                      generator=row_generators(seed, rows), control=control_of([a for _, a, _ in batch], mds),
                      callback=rows_progress(progress, rows, total_tiles, samples), cancel=cancel)
        return [image.transpose(2, 0, 1) for image in result.images]

    @batched
    def process(chunk, arrays):
        return per_tile(batches(sample, sample_rows(chunk, arrays, samples)), samples)

    return process
