"""Finding and loading models: official DiffusionSat folders, diffusers pipelines, hub ids, `tiny`.

Model sources (``--model``):

``tiny``
    Built in, offline, random weights (seeded), every component each task needs. For tests,
    smoke runs and a fresh machine. Its images are noise-like: it proves the plumbing, not quality.
``auto`` (default)
    The best installed model (see :func:`installed_models`), else ``tiny`` with a notice.
a folder
    * an official DiffusionSat checkpoint root (``model_index.json``, ``vae``, ``text_encoder``,
      ``tokenizer``, ``scheduler`` and ``checkpoint-N/unet`` or ``unet``),
    * a checkpoint folder ``checkpoint-N`` or a bare UNet folder (``config.json`` +
      weights); the other components come from the folders above it or from ``base``,
    * a diffusers pipeline folder (e.g. SD 2.1) together with ``unet=`` pointing at a UNet folder.
``hf:owner/name[@revision]``
    Downloaded once with ``huggingface_hub.snapshot_download`` into the hub cache, then loaded as
    a folder. (Real download code; the tests exercise it only on local folders of the same layout.)

Missing root components of an official folder (the released zips can be incomplete) are taken
from ``base`` (an SD 2.1 folder), or the ``DIFFUSIONSAT_BASE`` environment variable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelLoadError, ModelNotFound
from .controlnet import CONTROLNET_CLASSES, SatControlNet, SatControlNet3D
from .unet import SatUNet, init_metadata_embedding
from .weights import read_config, read_state_dict

log = logging.getLogger(__name__)

COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
UNET_CLASSES = {"SatUNet", "UNet2DConditionModel"}
TINY_SEED = 20240101
TINY_RESOLUTION = 256  # tiny's UNet sample_size 32 x the VAE's factor 8


def resource_path(*parts: str) -> Path:
    return Path(str(resources.files("engine") / "resources" / Path(*parts)))


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

    @property
    def tasks(self) -> list[str]:
        """The tasks this bundle can run."""
        tasks = ["generate", "inpaint"]
        for task in ("superres", "temporal"):
            if task in self.controlnets:
                tasks.append(task)
        return tasks

    def controlnet_for(self, task: str) -> Any:
        if task not in self.controlnets:
            raise missing_controlnet(self.name, task, self.controlnets)
        return self.controlnets[task]

    def to(self, device: str, dtype: torch.dtype) -> "ModelBundle":
        for module in (self.unet, self.vae, self.text_encoder, *self.controlnets.values()):
            # only cast when needed: diffusers logs a warning on every dtype cast
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
            module.to(device=device)
            module.eval()
            module.requires_grad_(False)
        return self

    @property
    def uses_metadata(self) -> bool:
        return bool(self.unet.config.get("use_metadata", False)) and self.unet.metadata_embedding is not None


def missing_controlnet(name: str, task: str, have) -> ModelNotFound:
    """The refusal of a task whose ControlNet the model lacks (``have``: the tasks it has)."""
    listed = ", ".join(sorted(have)) or "none"
    return ModelNotFound(
        f"the model {name!r} has no ControlNet for {task} (it has: {listed}); pass --model "
        f"with a {task} ControlNet checkpoint folder (controlnet/ inside), or --model tiny to try the task"
    )


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Other components
# --------------------------------------------------------------------------------------------


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


def scheduler_from_config(config: dict) -> Any:
    import diffusers

    class_name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not class_name.endswith("Scheduler"):
        raise ModelLoadError(f"unknown scheduler class {class_name!r} in the scheduler config")
    return cls.from_config(config)


def _has_component(folder: Path, name: str) -> bool:
    probe = {
        "vae": "config.json",
        "text_encoder": "config.json",
        "tokenizer": "tokenizer_config.json",
        "scheduler": "scheduler_config.json",
    }[name]
    sub = folder / name
    if not (sub / probe).is_file():
        return name == "tokenizer" and (sub / "vocab.json").is_file()
    return True


def find_unet_folder(path: Path) -> Path:
    """The UNet folder that ``path`` designates (see the module docstring for the layouts)."""
    config = path / "config.json"
    if config.is_file():
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except ValueError as err:
            raise ModelLoadError(f"{config} is not valid JSON ({err}); re-download or repair it") from err
        if class_name in UNET_CLASSES:
            return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if (p / "unet" / "config.json").is_file()),
        key=lambda p: int(re.sub(r"\D", "", p.name) or 0),
    )
    if checkpoints:
        # The notebooks load checkpoint-N/unet (the non-EMA weights) of the last checkpoint.
        return checkpoints[-1] / "unet"
    raise ModelNotFound(
        f"no UNet found in {path}: expected config.json of a UNet, a unet/ folder, or "
        "checkpoint-N/unet/ (the official DiffusionSat layout)"
    )


def find_components(unet_folder: Path, model_root: Path, base: Optional[Path]) -> dict[str, Path]:
    """Where each of vae/text_encoder/tokenizer/scheduler comes from.

    Search order: the model root and the folders between it and the UNet folder, then ``base``
    (or ``$DIFFUSIONSAT_BASE``).
    """
    search: list[Path] = []
    for candidate in [model_root, *unet_folder.parents]:
        if candidate not in search:
            search.append(candidate)
        if candidate == model_root.parent:
            break
    search = [p for p in search if p.is_dir()][:4]
    env_base = os.environ.get("DIFFUSIONSAT_BASE")
    bases = [b for b in (base, Path(env_base) if env_base else None) if b is not None]
    for b in bases:
        if not b.is_dir():
            raise ModelNotFound(f"the base model folder {b} does not exist")
    found: dict[str, Path] = {}
    for name in COMPONENTS:
        for folder in search + bases:
            if _has_component(folder, name):
                found[name] = folder / name
                break
    missing = [n for n in COMPONENTS if n not in found]
    if missing:
        raise ModelNotFound(
            f"{model_root} lacks {', '.join(missing)}: give the Stable Diffusion 2.1 folder they "
            "come from with --base (or set DIFFUSIONSAT_BASE)"
        )
    return found


# --------------------------------------------------------------------------------------------
# The tiny preset
# --------------------------------------------------------------------------------------------


def build_tiny(seed: int = TINY_SEED) -> ModelBundle:
    """The built-in tiny model: SD-shaped components, a few MB, random weights from ``seed``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def cfg(name: str) -> dict:
        return json.loads(resource_path("tiny", f"{name}.json").read_text())

    # fork_rng: building the tiny model must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = SatUNet.from_config(cfg("unet"))
        init_metadata_embedding(unet.metadata_embedding)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(cfg("vae"))
        torch.manual_seed(seed + 2)
        text_config = {k: v for k, v in cfg("text_encoder").items() if k not in ("architectures", "model_type")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        torch.manual_seed(seed + 3)
        controlnets = {
            # Sentinel-2 (10 bands) at half the output resolution, as the released SR checkpoint
            "superres": _randomise_zero_convs(
                SatControlNet.from_unet(unet, conditioning_in_channels=10, conditioning_scale=2)),
            "temporal": _randomise_zero_convs(SatControlNet3D.from_unet(
                unet, conditioning_in_channels=3, first_temporal_heads=2, first_temporal_head_dim=16)),
        }
    tokenizer = CLIPTokenizer.from_pretrained(resource_path("tiny", "tokenizer"))
    scheduler = scheduler_from_config(cfg("scheduler"))
    return ModelBundle(
        controlnets=controlnets,
        name="tiny",
        source="built-in tiny model (random weights: noise-like images, for tests and smoke runs)",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        native_resolution=unet.config.sample_size * vae_scale_factor(vae),
        is_tiny=True,
    )


def _randomise_zero_convs(controlnet: Any) -> Any:
    """Give a tiny ControlNet's zero-initialised outputs small random weights.

    A trained ControlNet's output convolutions are not zero; a freshly initialised one's are, and
    would make the tiny model ignore its conditioning. The tiny preset stands in for trained
    weights, so its conditioning must reach the output (tests rely on it).
    """
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.5)
            conv.bias.zero_()
        for alpha in getattr(controlnet, "mixing_attns", []):
            alpha.fill_(0.5)
        # He-initialised conditioning convolutions without bias, so that differences between
        # conditioning images survive the stack (default init lets the biases dominate).
        embedding = controlnet.controlnet_cond_embedding
        for conv in [embedding.conv_in, *embedding.blocks]:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
    return controlnet


def controlnet_task(controlnet: Any) -> str:
    """The task a ControlNet serves: temporal (3D), superres (10-band Sentinel-2), else control."""
    if isinstance(controlnet, SatControlNet3D):
        return "temporal"
    if controlnet.config.conditioning_in_channels == 10:
        return "superres"
    return "control"


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


def vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def save_bundle(bundle: ModelBundle, dest: str | os.PathLike, *, unet_subfolder: Optional[str] = "unet",
                controlnet: Optional[str] = None) -> Path:
    """Write a bundle in the official layout: root components + ``<unet_subfolder>/``.

    ``unet_subfolder="checkpoint-0/unet"`` reproduces the released checkpoints' nesting; None
    leaves the UNet out (a ControlNet root). ``controlnet`` names the task whose ControlNet is
    written to ``controlnet/``.
    """
    from .weights import atomic_folder

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


# --------------------------------------------------------------------------------------------
# Resolution of --model
# --------------------------------------------------------------------------------------------


def models_dirs() -> list[Path]:
    """Folders searched for installed models: ``$DIFFUSIONSAT_MODELS`` (os.pathsep-separated),
    else ``$XDG_DATA_HOME/diffusionsat/models`` (``~/.local/share/diffusionsat/models``)."""
    env = os.environ.get("DIFFUSIONSAT_MODELS")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return [Path(data) / "diffusionsat" / "models"]


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    resolution: int
    kind: str  # "single-image", "controlnet-superres", "controlnet-temporal", "controlnet-control"

    @property
    def tasks(self) -> list[str]:
        return {"single-image": ["generate", "inpaint"], "controlnet-superres": ["superres"],
                "controlnet-temporal": ["temporal", "inpaint"]}.get(self.kind, [])

    @property
    def trained_against(self) -> Optional[str]:
        """Which UNet a ControlNet was trained against (recorded by our training, else the reference's)."""
        if not self.kind.startswith("controlnet"):
            return None
        record = self.path / "diffusionsat.json"
        if record.is_file():
            try:
                return json.loads(record.read_text()).get("trained_against_unet")
            except ValueError:
                return None
        return "DiffusionSat 512 checkpoint-100000/unet (the released ControlNets)"

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "resolution": self.resolution, "kind": self.kind,
                "tasks": self.tasks, "trained_against": self.trained_against}


def describe_folder(path: Path) -> Optional[InstalledModel]:
    """What an installed model folder holds, or None if it is not a loadable model."""
    cn_folder = _controlnet_folder(path)
    if cn_folder is not None:
        try:
            config = read_config(cn_folder)
        except (ModelNotFound, ModelLoadError):
            return None
        if config.get("_class_name") in ("ControlNetModel3D", "SatControlNet3D"):
            kind = "controlnet-temporal"
        elif config.get("conditioning_in_channels") == 10:
            kind = "controlnet-superres"
        else:
            kind = "controlnet-control"
        return InstalledModel(name=path.name, path=path, resolution=int(config.get("sample_size") or 64) * 8, kind=kind)
    try:
        unet_folder = find_unet_folder(path)
        config = read_config(unet_folder)
    except (ModelNotFound, ModelLoadError):
        return None
    sample = int(config.get("sample_size") or 64)
    vae_cfg = path / "vae" / "config.json"
    factor = 8
    if vae_cfg.is_file():
        try:
            factor = 2 ** (len(json.loads(vae_cfg.read_text()).get("block_out_channels", [0] * 4)) - 1)
        except ValueError:
            pass
    return InstalledModel(name=path.name, path=path, resolution=sample * factor, kind="single-image")


def installed_models() -> list[InstalledModel]:
    """Installed single-image models, best first (highest native resolution, then name)."""
    found = []
    for folder in models_dirs():
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if child.is_dir():
                info = describe_folder(child)
                if info is not None:
                    found.append(info)
    return sorted(found, key=lambda m: (-m.resolution, m.name))


def native_resolution(spec: str = "auto", unet: Optional[str] = None) -> int:
    """The output tile size (px) of ``--model`` without loading weights (for plans and estimates)."""
    spec = (spec or "auto").strip()
    if spec == "tiny":
        return TINY_RESOLUTION
    if spec == "auto" and not unet:
        singles = [m for m in installed_models() if m.kind == "single-image"]
        return singles[0].resolution if singles else TINY_RESOLUTION
    for candidate in (unet, None if spec in ("auto",) or spec.startswith("hf:") else spec):
        if candidate:
            info = describe_folder(Path(candidate).expanduser())
            if info is not None and info.kind == "single-image":
                return info.resolution
            try:  # a bare UNet folder or a ControlNet root with a UNet inside
                return int(read_config(find_unet_folder(Path(candidate).expanduser())).get("sample_size") or 64) * 8
            except (ModelNotFound, ModelLoadError):
                continue
    return 512  # the released models' size: hub ids and ControlNet roots without a UNet


def _hub_repo(spec: str) -> str:
    repo = spec[3:].partition("@")[0]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ModelNotFound(f"{spec!r} is not a hub id; write hf:owner/name or hf:owner/name@revision")
    return repo


def resolve_hub_id(spec: str) -> Path:
    """Download ``hf:owner/name[@revision]`` (weights, configs, tokenizer) and return the local folder."""
    repo, _, revision = spec[3:].partition("@")
    _hub_repo(spec)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=repo,
            revision=revision or None,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "*/*.json", "*/*.txt",
                            "*/*.safetensors", "*/*/*.json", "*/*/*.safetensors", "*.bin", "*/*.bin",
                            "*/*/*.bin"],
        )
    except Exception as err:
        raise ModelNotFound(
            f"could not download {repo!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}); check the name and your network, or download the "
            "folder yourself and pass its path"
        ) from err
    return Path(local)


def _controlnet_folder(path: Path) -> Optional[Path]:
    """``path`` itself or ``path/controlnet`` when it is a ControlNet folder, else None."""
    for folder in (path, path / "controlnet"):
        config = folder / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") in CONTROLNET_CLASSES:
                    return folder
            except ValueError:
                continue
    return None


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
    components, as released): its UNet then comes from ``--unet``, a UNet inside the root, or the
    best installed single-image model (the released ControlNets were trained against the 512
    model's checkpoint-100000 UNet). The bundle is on the CPU in fp32.
    """
    located = locate_model(spec, unet=unet, base=base, controlnet=controlnet, download=True)
    notices = list(located.notices)
    if located.tiny:
        bundle = build_tiny()
        bundle.notices.extend(notices)
        return bundle
    root, unet_folder, cn_folder, components = located.root, located.unet_folder, located.cn_folder, located.components
    unet_model = load_unet(unet_folder, use_metadata=use_metadata)
    parts = {name: _load_component(name, path) for name, path in components.items()}
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
        controlnets[controlnet_task(cn)] = cn
    return ModelBundle(
        name=root.name,
        source=f"UNet {unet_folder}; " + ", ".join(f"{k} {v}" for k, v in components.items())
        + (f"; ControlNet {cn_folder}" if cn_folder else ""),
        unet=unet_model,
        native_resolution=unet_model.config.sample_size * vae_scale_factor(parts["vae"]),
        root=root,
        notices=notices,
        controlnets=controlnets,
        **parts,
    )


@dataclass
class LocatedModel:
    """Where a model's parts are, found without reading any weights (see :func:`locate_model`)."""

    tiny: bool = False
    hub: Optional[str] = None  #: an hf: id not yet downloaded
    root: Optional[Path] = None
    unet_folder: Optional[Path] = None
    cn_folder: Optional[Path] = None
    components: dict[str, Path] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def controlnet_tasks(self) -> Optional[list[str]]:
        """The tasks of the model's ControlNet (as :func:`controlnet_task` names them); None: unknown."""
        if self.tiny:
            return ["superres", "temporal"]
        if self.hub is not None:
            return None
        if self.cn_folder is None:
            return []
        try:
            config = read_config(self.cn_folder)
        except (ModelNotFound, ModelLoadError):
            return None  # the load reports it
        if config.get("_class_name") in ("ControlNetModel3D", "SatControlNet3D"):
            return ["temporal"]
        return ["superres" if config.get("conditioning_in_channels") == 10 else "control"]

    def scheduler_class(self) -> Optional[str]:
        """The checkpoint's own scheduler class name (``--scheduler default``), if known."""
        if self.tiny:
            config = resource_path("tiny", "scheduler.json")
        elif "scheduler" in self.components:
            config = self.components["scheduler"] / "scheduler_config.json"
        else:
            return None
        try:
            return json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError):
            return None


def locate_model(
    spec: str = "auto",
    *,
    unet: Optional[str | os.PathLike] = None,
    base: Optional[str | os.PathLike] = None,
    controlnet: Optional[str | os.PathLike] = None,
    download: bool = False,
) -> LocatedModel:
    """Resolve ``--model`` (+ ``--unet``, ``--base``, ``--controlnet``) to folders, refusing what
    :func:`load_model` would refuse before it reads weights. Reads config files only; an ``hf:``
    id is downloaded only with ``download=True``."""
    spec = (spec or "auto").strip()
    notices: list[str] = []
    if spec == "auto":
        models = [m for m in installed_models() if m.kind == "single-image"]
        if not models:
            if unet is not None or controlnet is not None:
                raise ModelNotFound("--unet/--controlnet need --model: no installed model to combine them with")
            return LocatedModel(tiny=True, notices=[
                "no DiffusionSat weights are installed, so the built-in tiny model (random weights) "
                f"is used: install a model into {models_dirs()[0]} or pass --model <folder>"
            ])
        spec = str(models[0].path)
        notices.append(f"using the installed model {models[0].name} ({models[0].path})")
    if spec == "tiny":
        if unet is not None or controlnet is not None:
            raise ModelNotFound("--unet/--controlnet cannot be combined with --model tiny; use --model <folder>")
        return LocatedModel(tiny=True)
    if spec.startswith("hf:") and not download:
        _hub_repo(spec)  # the id's form is checked; the download waits for the real run
        return LocatedModel(hub=spec)
    root = resolve_hub_id(spec) if spec.startswith("hf:") else _existing_folder(spec, "--model")
    base_path = Path(base).expanduser() if base else None
    cn_folder = _controlnet_folder(_existing_folder(str(controlnet), "--controlnet")) if controlnet else None
    if controlnet and cn_folder is None:
        raise ModelNotFound(f"{controlnet} is not a ControlNet folder (no controlnet/config.json)")
    if cn_folder is None:
        cn_folder = _controlnet_folder(root)
    if unet:
        unet_folder = find_unet_folder(_existing_folder(str(unet), "--unet"))
    else:
        try:
            unet_folder = find_unet_folder(root)
        except ModelNotFound:
            if cn_folder is None:
                raise
            singles = [m for m in installed_models() if m.kind == "single-image"]
            if not singles:
                raise ModelNotFound(
                    f"{root} is a ControlNet checkpoint without a UNet: give the single-image model it was "
                    "trained against with --unet (the released ControlNets: the 512 model's "
                    "checkpoint-100000/unet)"
                ) from None
            unet_folder = find_unet_folder(singles[0].path)
            notices.append(f"the ControlNet's UNet comes from the installed model {singles[0].name}; "
                           "the released ControlNets were trained against the 512 model's checkpoint-100000")
    components = find_components(unet_folder, root, base_path)
    return LocatedModel(root=root, unet_folder=unet_folder, cn_folder=cn_folder, components=components,
                        notices=notices)


def _existing_folder(spec: str, flag: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        hint = " (hub ids are written hf:owner/name)" if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) else ""
        raise ModelNotFound(f"{flag} folder {spec!r} does not exist{hint}; use --model tiny or a folder path")
    if not path.is_dir():
        raise ModelNotFound(f"{flag} {spec!r} is a file; give the model's folder")
    return path
