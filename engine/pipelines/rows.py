"""The batch plumbing of the pipelines' loop: rows of one image in a guided batch, noise drawn
row by row from one generator per tile, one row shared by all prompts, and the forward pre-hooks
that poll a cancel token between UNet blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Optional, Sequence

import torch

from ..errors import InvalidRequest
from ..progress import CancelToken


@contextlib.contextmanager
def cancel_between_blocks(cancel: Optional[CancelToken], *models: Any):
    """Poll ``cancel`` before each down/mid/up block of ``models`` (forward pre-hooks), so a
    cancelled job stops within one block, not at the end of a (possibly minutes-long) step."""
    handles = []
    if cancel is not None:
        owner = threading.get_ident()  # the models may be shared: another thread's run is not ours

        def check(module, args):
            if threading.get_ident() == owner:
                cancel.raise_if_cancelled()

        for model in models:
            if model is None:
                continue
            blocks = [*(getattr(model, "down_blocks", None) or []), getattr(model, "mid_block", None),
                      *(getattr(model, "up_blocks", None) or [])]
            for block in blocks:
                if isinstance(block, torch.nn.Module):
                    handles.append(block.register_forward_pre_hook(check))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cfg_rows(i: int, batch: int, do_cfg: bool) -> list[int]:
    """The rows of image ``i`` of ``batch`` in a run's conditioning: ``[i, batch + i]`` (its
    unconditional and conditional rows) with guidance, else ``[i]``."""
    return [i, batch + i] if do_cfg else [i]


def control_rows(control: Any, i: int, idx: list[int]) -> Any:
    """Image ``i``'s part of an expanded ControlNet conditioning (its image row, its metadata rows)."""
    cond_md = None if control is None else control.cond_metadata
    return None if control is None else dataclasses.replace(
        control, image=control.image[i : i + 1], cond_metadata=None if cond_md is None else cond_md[idx])


def randn_rows(shape: Sequence[int], generator: Any) -> torch.Tensor:
    """Standard normal noise of ``shape``, fp32 on the CPU, from one ``torch.Generator`` (or None), or
    from a list of one per row: row i drawn from the i-th as a batch of one, so each tile (or seed) of
    a batch gets its noise alone (diffusers' ``randn_tensor`` does so for the schedulers' noise)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise InvalidRequest(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def rows(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``x`` with one row per prompt (a single row is shared by all prompts)."""
    x = torch.as_tensor(x)
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    if x.shape[0] != batch:
        raise InvalidRequest(f"{x.shape[0]} rows of {what} for {batch} prompts")
    return x
