"""The model side of a tiled task: its model on this process's device, its pipeline, the noise of
each tile and the temporal ControlNet's conditioning. This is the torch half of what the tasks
share; :mod:`engine.tasks.common` is the half that checks and plans use too, without torch.
"""

from __future__ import annotations

import datetime as _dt
from typing import Sequence

import numpy as np
import torch

from ..metadata import SatMetadata
from ..models.registry import auto_model
from ..parallel import RunContext
from ..pipelines.controlnet import Control, DiffusionSatControlNetPipeline
from ..pipelines.inpaint import DiffusionSatInpaintPipeline
from ..schedulers import make_scheduler


def tile_generator(seed: int, tile_index: int):
    # Each tile gets its own reproducible noise; a split run draws the same noise per tile.
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + tile_index) % (2**63))


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
