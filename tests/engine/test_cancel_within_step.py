"""A cancel stops the sampler inside a step (before the next UNet block), not at its end."""

from __future__ import annotations

import pytest
import torch

from engine.errors import Cancelled
from engine.pipelines.text2img import DiffusionSatPipeline
from engine.progress import CancelToken
from engine.schedulers import make_scheduler


@pytest.fixture()
def pipe(tiny_bundle):
    p = DiffusionSatPipeline.from_bundle(tiny_bundle)
    p.scheduler = make_scheduler("default", tiny_bundle.scheduler)
    return p


def test_cancel_during_the_first_unet_block_stops_before_the_next(pipe):
    token = CancelToken()
    ran = []
    first = pipe.unet.down_blocks[0]
    rest = [*pipe.unet.down_blocks[1:], pipe.unet.mid_block, *pipe.unet.up_blocks]
    # The user presses Cancel while the first block of the first step computes.
    def press_cancel(module, args, output):
        ran.append("first")
        token.cancel()

    def record(module, args, output):
        ran.append("later")

    hooks = [first.register_forward_hook(press_cancel)]
    hooks += [b.register_forward_hook(record) for b in rest]
    try:
        with pytest.raises(Cancelled):
            pipe(height=64, width=64, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 cancel=token)
    finally:
        for h in hooks:
            h.remove()
    assert ran == ["first"], "the UNet kept computing after the cancel"
    # The checks are removed afterwards: a later run without a token is unaffected.
    out = pipe(height=64, width=64, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.images.shape[0] == 1
    assert all(not b._forward_pre_hooks for b in [first, *rest])
