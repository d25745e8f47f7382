"""What a loaded model is: :class:`ModelBundle`, the components a pipeline needs and where they
came from (its resolutions are :class:`~engine.models.resolution.Resolution`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .registry import missing_controlnet
from .resolution import Resolution
from .unet import SatUNet


@dataclass
class ModelBundle:
    """Everything a pipeline needs, plus what the user should be told about where it came from."""

    name: str
    source: str
    unet: SatUNet
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    native_resolution: int
    is_tiny: bool = False
    root: Optional[Path] = None
    notices: list[str] = field(default_factory=list)
    #: task name ("superres", "temporal", "control") -> ControlNet trained for it
    controlnets: dict[str, Any] = field(default_factory=dict)
    #: where ``native_resolution`` came from, and the ControlNet's own
    #: (see :func:`~engine.models.resolution.task_resolution`)
    unet_resolution: Optional["Resolution"] = None
    controlnet_resolution: Optional["Resolution"] = None
    #: True once :meth:`compile` ran (its blocks compiled, or compile found unavailable)
    compiled: bool = False

    def __post_init__(self) -> None:
        if self.unet_resolution is None:
            self.unet_resolution = Resolution(self.native_resolution, "built-in" if self.is_tiny else "config")

    @property
    def tasks(self) -> list[str]:
        """The tasks this bundle can run."""
        tasks = ["generate", "inpaint"]
        for task in ("superres", "temporal"):
            if task in self.controlnets:
                tasks.append(task)
        return tasks + ["extend"]

    def controlnet_for(self, task: str) -> Any:
        if task not in self.controlnets:
            raise missing_controlnet(self.name, task, self.controlnets)
        return self.controlnets[task]

    def to(self, device: str, dtype: torch.dtype) -> "ModelBundle":
        """Move every network to ``device`` in ``dtype``, for inference. On CUDA also the fast path:
        the convolutional networks (UNet, ControlNets, VAE) in ``channels_last`` memory format (the
        layout cuDNN's fp16/bf16 tensor-core convolutions use; NCHW would be transposed at every
        convolution) and SDPA attention everywhere (:func:`use_sdpa`). On the CPU nothing else
        changes: its results stay byte-identical."""
        cuda = str(device).startswith("cuda")
        for module in (self.unet, self.vae, self.text_encoder, *self.controlnets.values()):
            # only cast when needed: diffusers logs a warning on every dtype cast
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
            module.to(device=device)
            module.eval()
            module.requires_grad_(False)
        if cuda:
            for module in (self.unet, self.vae, *self.controlnets.values()):
                module.to(memory_format=torch.channels_last)
                use_sdpa(module)
        return self

    def compile(self) -> list[str]:
        """``torch.compile`` the UNet's and the ControlNets' blocks in place (see :func:`compile_blocks`);
        once per bundle (the cache keeps a compiled bundle apart from an eager one). Returns notices."""
        if self.compiled:
            return []
        notices = []
        reason = compile_unavailable(next(self.unet.parameters()).device)
        if reason:
            notices.append(f"--compile ignored: {reason}; the model runs eagerly")
        else:
            for model in (self.unet, *self.controlnets.values()):
                compile_blocks(model)
        self.compiled = True
        self.notices.extend(notices)
        return notices

    @property
    def uses_metadata(self) -> bool:
        return bool(self.unet.config.get("use_metadata", False)) and self.unet.metadata_embedding is not None


def vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


#: torch.compile's mode for the blocks. Inductor's default: fused kernels, no CUDA graphs. CUDA
#: graphs ("reduce-overhead") replay fixed buffers, and our cancel hooks, the ControlNet residuals
#: and the multistep samplers hold block outputs between calls: unproven without a GPU, so off
#: (benchmarks/gpu_throughput.py measures what they would add). ``DIFFUSIONSAT_COMPILE_MODE``
#: overrides it (e.g. ``max-autotune-no-cudagraphs``).
COMPILE_MODE = "default"
#: compiled variants kept per block code: each block class is shared by several blocks (3 down
#: blocks, the ControlNet's copies) and each batch shape is its own variant (dynamic=False); past
#: torch's default of 8 it would silently run eagerly
RECOMPILE_LIMIT = 64


def compile_unavailable(device: Any) -> Optional[str]:
    """Why ``torch.compile`` cannot run for a model on ``device`` (None when it can)."""
    import shutil

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if torch.device(device).type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler found (torch.compile's CPU backend needs one)"
    if torch.device(device).type == "mps":
        return "torch.compile is not supported on MPS here"
    return None


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile each down, mid and up block of ``model`` (a UNet or a ControlNet) in place, as
    regional compilation: the block's ``forward`` is replaced by its compiled version while the
    module itself stays (so its forward pre-hooks still run eagerly around it: the within-step
    cancel of :func:`engine.pipelines.rows.cancel_between_blocks` keeps working, and hooks added
    per run cause no recompilation). The small layers around the blocks (time and metadata
    embeddings, conv_in/conv_out) stay eager. ``dynamic=False``: one specialised kernel set per
    shape (a tiled job has one shape, plus its last, smaller batch); compilation happens at the
    first call of each shape and is reused by every later tile and job. Returns the blocks compiled."""
    import os

    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly, not the job fails
    mode = os.environ.get("DIFFUSIONSAT_COMPILE_MODE", COMPILE_MODE)
    # torch.compile's backend: inductor; "aot_eager"/"eager" trace without generating kernels (debugging, tests)
    backend = os.environ.get("DIFFUSIONSAT_COMPILE_BACKEND", "inductor")
    options = {"mode": mode} if backend == "inductor" else {}
    blocks = [*(getattr(model, "down_blocks", None) or []), getattr(model, "mid_block", None),
              *(getattr(model, "up_blocks", None) or [])]
    count = 0
    for block in blocks:
        if isinstance(block, torch.nn.Module) and not getattr(block, "_diffusionsat_compiled", False):
            block.forward = torch.compile(block.forward, dynamic=False, backend=backend, **options)
            block._diffusionsat_compiled = True
            count += 1
    return count


def use_sdpa(model: torch.nn.Module) -> int:
    """Make every attention layer of ``model`` use PyTorch's fused ``scaled_dot_product_attention``
    (flash / memory-efficient kernels on CUDA). diffusers already picks ``AttnProcessor2_0`` when
    torch has SDPA (torch >= 2.0); this replaces the classic ``AttnProcessor`` (the same
    computation, unfused) where something set it, keeps every other (specialised) processor, and
    returns how many it replaced."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(model, "attn_processors", None)
    if not processors:
        return 0
    plain = [k for k, p in processors.items() if type(p) is AttnProcessor]
    if plain:
        model.set_attn_processor({k: AttnProcessor2_0() if k in plain else p for k, p in processors.items()})
    return len(plain)
