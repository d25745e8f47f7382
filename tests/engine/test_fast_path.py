"""The GPU fast path and ``--compile``: what placement does on each device, and that a compiled model
gives the eager model's image, is compiled once and reused across jobs, and still cancels within a step.

Without CUDA the CUDA rows skip; the compile rows run on the CPU (inductor needs a C compiler).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from engine.device import Placement, configure_backends
from engine.errors import Cancelled
from engine.models.bundle import compile_blocks, use_sdpa
from engine.models.cache import ModelCache
from engine.pipelines.text2img import DiffusionSatPipeline
from engine.progress import CancelToken
from engine.schedulers import make_scheduler

PX = 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="torch.compile's CPU backend (inductor) needs a C compiler")


def latents():
    return torch.randn(1, 4, PX // 8, PX // 8, generator=torch.Generator().manual_seed(0))


def sample(bundle, steps=2, cancel=None, guidance=7.5):
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    pipe.scheduler = make_scheduler("auto", bundle.scheduler)
    return pipe("a satellite image", None, height=PX, width=PX, num_inference_steps=steps, guidance_scale=guidance,
                latents=latents(), output_type="pt", cancel=cancel).images


def blocks(model):
    return [*model.down_blocks, model.mid_block, *model.up_blocks]


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------

def test_cpu_placement_changes_nothing(tiny_bundle):
    """On the CPU the fast path is off: the placed model's image is byte-identical to the unplaced
    model's, its weights stay contiguous NCHW, and no process-wide backend switch is touched."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    assert configure_backends(Placement("cpu", "fp32")) == []
    cache = ModelCache()
    placed, placement = cache.get("tiny", device="cpu")
    assert placement == Placement("cpu", "fp32")
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
    conv = placed.unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(sample(placed), sample(tiny_bundle))  # tiny_bundle: built, never placed


def test_attention_is_sdpa_everywhere(tiny_bundle):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cache = ModelCache()
    bundle, _ = cache.get("tiny", device="cpu")
    for model in (bundle.unet, bundle.vae, *bundle.controlnets.values()):
        assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    # a classic (unfused) processor set by someone is replaced; the image does not change
    reference = sample(bundle, steps=1)
    bundle.unet.set_attn_processor(AttnProcessor())
    assert use_sdpa(bundle.unet) == len(bundle.unet.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in bundle.unet.attn_processors.values())
    assert torch.allclose(sample(bundle, steps=1), reference, atol=1e-5)


@cuda
def test_cuda_placement_is_channels_last_with_tf32():
    cache = ModelCache()
    bundle, placement = cache.get("tiny", device="cuda", dtype="fp16")
    assert placement.dtype == "fp16"
    for model in (bundle.unet, bundle.vae, *bundle.controlnets.values()):
        w = model.conv_in.weight
        assert w.is_cuda and w.dtype == torch.float16 and w.is_contiguous(memory_format=torch.channels_last)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark
    image = sample(bundle, steps=2)
    assert torch.isfinite(image).all()


# ---------------------------------------------------------------------------------------------
# --compile
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced_cache():
    """A cache holding the tiny model eager and compiled. The compiled one traces its blocks with
    torch.compile's "eager" backend (dynamo's capture, no generated kernels: seconds, not minutes,
    on 2 cores); test_inductor_block_matches_eager checks inductor's kernels."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFUSIONSAT_COMPILE_BACKEND", "eager")
    cache = ModelCache(max_models=2)
    eager, _ = cache.get("tiny", device="cpu")
    compiled, _ = cache.get("tiny", device="cpu", compile=True)
    mp.undo()
    return cache, eager, compiled


def test_compile_is_cached_apart_and_reused(traced_cache):
    cache, eager, compiled = traced_cache
    assert compiled is not eager and compiled.compiled and not eager.compiled
    assert all(getattr(b, "_diffusionsat_compiled", False) for b in blocks(compiled.unet))
    assert not any(getattr(b, "_diffusionsat_compiled", False) for b in blocks(eager.unet))
    for cn in compiled.controlnets.values():
        assert all(getattr(b, "_diffusionsat_compiled", False) for b in [*cn.down_blocks, cn.mid_block])
    loads = cache.loads
    assert cache.get("tiny", device="cpu", compile=True)[0] is compiled  # the next job: the same compiled model
    assert cache.loads == loads


def test_compiled_image_equals_eager_and_is_compiled_once(traced_cache):
    _, eager, compiled = traced_cache
    reference = sample(eager)
    first = sample(compiled)  # compiles each block at its first call
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    second = sample(compiled)  # a second job: no recompilation
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.allclose(first, reference, atol=1e-5)
    assert torch.equal(first, second)


def test_cancel_within_a_step_still_works_when_compiled(traced_cache):
    _, _, compiled = traced_cache
    sample(compiled)  # compiled already
    token, ran = CancelToken(), []
    first, rest = compiled.unet.down_blocks[0], blocks(compiled.unet)[1:]

    def press_cancel(module, args, output):
        ran.append("first")
        token.cancel()

    hooks = [first.register_forward_hook(press_cancel)]
    hooks += [b.register_forward_hook(lambda *a: ran.append("later")) for b in rest]
    try:
        with pytest.raises(Cancelled):
            sample(compiled, steps=3, cancel=token)
    finally:
        for h in hooks:
            h.remove()
    assert ran == ["first"], "the compiled UNet kept computing after the cancel"


def test_compile_without_a_c_compiler_falls_back_with_a_notice(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # the machine's compilers, hidden
    cache = ModelCache()
    bundle, _ = cache.get("tiny", device="cpu", compile=True)
    assert any("--compile ignored" in n and "C compiler" in n for n in bundle.notices)
    assert not any(getattr(b, "_diffusionsat_compiled", False) for b in blocks(bundle.unet))


@needs_cc
def test_inductor_block_matches_eager(tiny_bundle):
    """inductor's generated kernels (what --compile uses) on one block of the tiny UNet: the eager
    block's output within float tolerance (the whole model on 2 cores would take minutes)."""
    from engine.models.tiny import build_tiny

    block = build_tiny().unet.mid_block.eval()
    channels = tiny_bundle.unet.config.block_out_channels[-1]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, channels, 4, 4, generator=g)
    temb = torch.randn(2, tiny_bundle.unet.config.block_out_channels[0] * 4, generator=g)
    text = torch.randn(2, 77, tiny_bundle.unet.config.cross_attention_dim, generator=g)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch._dynamo.config.patch(suppress_errors=False):  # a failed compile must fail here
        eager = block(hidden, temb, encoder_hidden_states=text)
        holder = torch.nn.Module()
        holder.mid_block = block
        assert compile_blocks(holder) == 1
        compiled = block(hidden, temb, encoder_hidden_states=text)
    assert counters["stats"]["unique_graphs"] > graphs  # it was compiled, not run eagerly
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)


def test_outputs_say_whether_compile_ran(tmp_path, monkeypatch):
    """``--compile`` can move a pixel by one level against an eager run: the output's tags say which
    ran (they were identical), and a fallback says why."""
    import rasterio

    from engine.tasks import GenerateRequest
    from engine.tasks.generate import generate

    monkeypatch.setenv("DIFFUSIONSAT_COMPILE_BACKEND", "eager")  # dynamo's capture, no kernels: seconds
    cache = ModelCache(max_models=2)
    bbox = (288500.0, 4639300.0, 288756.0, 4639556.0)
    for name, compile_ in (("eager", False), ("compiled", True)):
        generate(GenerateRequest(model="tiny", bbox=bbox, crs="EPSG:32633", width=64, height=64, steps=1, seed=1,
                                 compile=compile_), tmp_path / f"{name}.tif", models=cache)
    tags = {name: rasterio.open(tmp_path / f"{name}.tif").tags() for name in ("eager", "compiled")}
    assert "compile" not in tags["eager"]
    assert tags["compiled"]["compile"] == "torch.compile (UNet and ControlNet blocks)"
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C compiler: the fallback's reason
    generate(GenerateRequest(model="tiny", bbox=bbox, crs="EPSG:32633", width=64, height=64, steps=1, seed=1,
                             compile=True), tmp_path / "fallback.tif", models=ModelCache())
    assert rasterio.open(tmp_path / "fallback.tif").tags()["compile"].startswith("--compile ignored: no C compiler")
