"""Loading models: the folders :func:`engine.models.registry.locate_model` found, read into a
:class:`~engine.models.bundle.ModelBundle` (UNet, VAE, text encoder, tokenizer, scheduler, ControlNet),
and written back in the official layout (:func:`save_bundle`).

Weights are read with safetensors or ``torch.load(weights_only=True)`` (:mod:`engine.models.weights`)
into models built on the meta device; a mismatch between weights and config is refused with the
counts of missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_folder
from ..errors import ModelLoadError, ModelNotFound
from ..schedulers import normalise_scheduler, scheduler_from_config
from .bundle import ModelBundle
from .configs import read_config
from .controlnet import CONTROLNET_CLASSES, SatControlNet3D
from .registry import UNET_CLASSES, locate_model
from .tiny import build_tiny
from .unet import SatUNet, init_metadata_embedding
from .weights import read_state_dict

log = logging.getLogger(__name__)


def load_model(
    spec: str = "auto",
    *,
    unet: Optional[str | os.PathLike] = None,
    base: Optional[str | os.PathLike] = None,
    controlnet: Optional[str | os.PathLike] = None,
    use_metadata: Optional[bool] = None,
) -> ModelBundle:
    """Resolve ``--model`` (+ ``--unet``, ``--base``, ``--controlnet``) into a :class:`ModelBundle`.

    ``--model`` may also be a ControlNet checkpoint root (``controlnet/`` beside the pipeline
    components, as released): its UNet then comes from ``--unet``, a UNet inside the root, the
    UNet its training recorded, or the one the manifest names (the released ControlNets: the 512
    model's checkpoint-100000). The bundle is on the CPU in fp32.
    """
    located = locate_model(spec, unet=unet, base=base, controlnet=controlnet, download=True)
    notices = list(located.notices)
    if located.tiny:
        bundle = build_tiny()
        bundle.notices.extend(notices)
        return bundle
    facts = located.facts
    root, unet_folder, cn_folder, components = located.root, located.unet_folder, located.cn_folder, located.components
    unet_model = load_unet(unet_folder, use_metadata=use_metadata)
    parts = {name: _load_component(name, path) for name, path in components.items()}
    note = normalise_scheduler(parts["scheduler"])
    if note:
        notices.append(f"{components['scheduler']}: {note}")
    if not unet_model.config.get("use_metadata"):
        notices.append(f"{unet_folder} has no metadata embeddings: metadata is ignored (SD baseline)")
    text_dim = parts["text_encoder"].config.hidden_size
    if unet_model.config.cross_attention_dim != text_dim:
        raise ModelLoadError(
            f"the UNet expects text embeddings of size {unet_model.config.cross_attention_dim} but the "
            f"text encoder in {components['text_encoder']} gives {text_dim}: they belong to different models"
        )
    controlnets = {}
    if cn_folder is not None:
        cn = load_controlnet(cn_folder)
        if list(cn.config.block_out_channels) != list(unet_model.config.block_out_channels):
            raise ModelLoadError(f"the ControlNet in {cn_folder} does not match the UNet {unet_folder} (block channels)")
        if cn.config.get("controlnet_conditioning_channel_order") == "bgr":
            notices.append(f"{cn_folder} expects BGR conditioning: its channels are flipped, as the official code does")
        controlnets[controlnet_task(cn)] = cn
    return ModelBundle(
        name=root.name,
        source=f"UNet {unet_folder}; " + ", ".join(f"{k} {v}" for k, v in components.items())
        + (f"; ControlNet {cn_folder}" if cn_folder else ""),
        unet=unet_model,
        native_resolution=facts.unet_resolution.px,
        root=root,
        notices=notices,
        controlnets=controlnets,
        unet_resolution=facts.unet_resolution,
        controlnet_resolution=facts.controlnet_resolution,
        **parts,
    )


def load_unet(folder: str | os.PathLike, *, use_metadata: Optional[bool] = None) -> SatUNet:
    """Load a SatUNet (official layout) or a plain SD UNet folder as a :class:`SatUNet`.

    ``use_metadata``: None keeps the folder's setting (a plain SD UNet has none: False);
    True on a plain SD UNet adds freshly initialised metadata MLPs (to fine-tune from SD 2.1);
    False on a SatUNet drops its metadata MLPs (with a warning).
    """
    folder = Path(folder)
    config = read_config(folder)
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name not in UNET_CLASSES:
        raise ModelLoadError(
            f"{folder} holds a {class_name}, not a UNet; point --model/--unet at a UNet folder"
        )
    folder_has_metadata = bool(config.get("use_metadata", class_name == "SatUNet"))
    if use_metadata is None:
        use_metadata = folder_has_metadata
    config = dict(config, use_metadata=use_metadata, _class_name="SatUNet")
    config.setdefault("num_metadata", 7)
    state = read_state_dict(folder)
    unet = _empty_model(SatUNet, config, folder, "UNet")
    if not use_metadata:
        dropped = [k for k in state if k.startswith("metadata_embedding.")]
        if dropped:
            log.warning("use_metadata=False: ignoring %d metadata weights of %s", len(dropped), folder)
            state = {k: v for k, v in state.items() if not k.startswith("metadata_embedding.")}
    _load_into(unet, state, folder, allow_missing_prefix="metadata_embedding." if not folder_has_metadata else None)
    if use_metadata and not folder_has_metadata:
        init_metadata_embedding(unet.metadata_embedding)
    return unet


def _empty_model(cls: type, config: dict, folder: Path, what: str) -> Any:
    """``cls`` built from ``config`` on the meta device (no memory, no init): weights come next."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_config(config)
    except Exception as err:
        raise ModelLoadError(f"{folder}/config.json does not describe a valid {what}: {err}") from err


def _load_into(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    folder: Path,
    allow_missing_prefix: Optional[str] = None,
) -> None:
    """Assign ``state`` into a module built on the meta device; materialise allowed gaps."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    not_allowed = [k for k in missing if not (allow_missing_prefix and k.startswith(allow_missing_prefix))]
    if not_allowed or unexpected or bad_shape:
        parts = []
        if not_allowed:
            parts.append(f"{len(not_allowed)} missing (e.g. {not_allowed[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} with the wrong shape (e.g. {bad_shape[0]})")
        raise ModelLoadError(
            f"the weights in {folder} do not match its config.json: {', '.join(parts)}; "
            "the folder is incomplete or its config belongs to another model"
        )
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    module.load_state_dict(state, strict=False, assign=True)
    if missing:
        # Parameters the file did not provide are still on the meta device: give them memory.
        for name, sub in module.named_modules():
            if any(p.is_meta for p in sub.parameters(recurse=False)):
                sub.to_empty(device="cpu", recurse=False)
                sub.to(dtype)
    for name, buf in module.named_buffers():
        if buf.is_meta:
            raise ModelLoadError(f"buffer {name} of {folder} was not loaded; the model class is incompatible")


def _load_component(name: str, folder: Path) -> Any:
    """Load one pipeline component from its folder with diffusers/transformers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "vae":
                from diffusers import AutoencoderKL

                return AutoencoderKL.from_pretrained(folder)
            if name == "text_encoder":
                from transformers import CLIPTextModel

                return CLIPTextModel.from_pretrained(folder)
            if name == "tokenizer":
                from transformers import CLIPTokenizer

                return CLIPTokenizer.from_pretrained(folder)
            if name == "scheduler":
                return scheduler_from_config(read_config(folder, "scheduler_config.json"))
    except (ModelLoadError, ModelNotFound):
        raise
    except Exception as err:
        raise ModelLoadError(f"could not load the {name} from {folder}: {str(err).splitlines()[0][:200]}") from err
    raise ValueError(name)


def load_controlnet(folder: str | os.PathLike) -> Any:
    """Load a ControlNet folder (official ``ControlNetModel``/``ControlNetModel3D`` or ours)."""
    folder = Path(folder)
    config = read_config(folder)
    class_name = config.get("_class_name", "ControlNetModel")
    cls = CONTROLNET_CLASSES.get(class_name)
    if cls is None:
        raise ModelLoadError(f"{folder} holds a {class_name}, not a DiffusionSat ControlNet")
    state = read_state_dict(folder)
    model = _empty_model(cls, config, folder, "ControlNet")
    for key in [k for k in state if k.startswith("mixing_attns.") and state[k].ndim == 0]:
        state[key] = state[key].reshape(1)
    _load_into(model, state, folder)
    return model


def controlnet_task(controlnet: Any) -> str:
    """The task a ControlNet serves: temporal (3D), superres (10-band Sentinel-2), else control."""
    if isinstance(controlnet, SatControlNet3D):
        return "temporal"
    if controlnet.config.conditioning_in_channels == 10:
        return "superres"
    return "control"


def save_bundle(bundle: ModelBundle, dest: str | os.PathLike, *, unet_subfolder: Optional[str] = "unet",
                controlnet: Optional[str] = None) -> Path:
    """Write a bundle in the official layout: root components + ``<unet_subfolder>/``.

    ``unet_subfolder="checkpoint-0/unet"`` reproduces the released checkpoints' nesting; None
    leaves the UNet out (a ControlNet root). ``controlnet`` names the task whose ControlNet is
    written to ``controlnet/``.
    """
    with atomic_folder(dest) as tmp:
        bundle.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        bundle.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        bundle.tokenizer.save_pretrained(tmp / "tokenizer")
        bundle.scheduler.save_pretrained(tmp / "scheduler")
        if unet_subfolder:
            bundle.unet.save_pretrained(tmp / unet_subfolder, safe_serialization=True)
        if controlnet:
            bundle.controlnet_for(controlnet).save_pretrained(tmp / "controlnet", safe_serialization=True)
        (tmp / "model_index.json").write_text(model_index_json(bundle.scheduler))
    return Path(dest)


def model_index_json(scheduler: Any) -> str:
    """``model_index.json`` of a DiffusionSat root (what diffusers writes for a pipeline folder)."""
    import diffusers

    index = {
        "_class_name": "DiffusionSatPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["engine.models.unet", "SatUNet"],
    }
    return json.dumps(index, indent=2) + "\n"
