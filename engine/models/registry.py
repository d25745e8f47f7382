"""What ``--model`` designates, found on disk without loading weights.

Model sources (``--model``):

``tiny``
    Built in (:mod:`engine.models.tiny`), offline, random weights.
``auto`` (default)
    The best installed model (see :func:`installed_models`), else ``tiny`` with a notice.
a folder
    * an official DiffusionSat checkpoint root (``model_index.json``, ``vae``, ``text_encoder``,
      ``tokenizer``, ``scheduler`` and ``checkpoint-N/unet`` or ``unet``),
    * a checkpoint folder ``checkpoint-N`` or a bare UNet folder (``config.json`` +
      weights); the other components come from the folders above it or from ``base``,
    * a diffusers pipeline folder (e.g. SD 2.1) together with ``unet=`` pointing at a UNet folder.
``hf:owner/name[@revision]``
    Downloaded once (:mod:`engine.models.hub`), then loaded as a folder.

Missing root components of an official folder (the released zips can be incomplete) are taken
from ``base`` (an SD 2.1 folder), or the ``DIFFUSIONSAT_BASE`` environment variable.

What a folder is (native resolution, tasks, the UNet a ControlNet pairs with) comes from
:func:`model_facts`: the ``diffusionsat.json`` record beside the weights, else the manifest of
releases (:mod:`engine.models.releases`), else ``sample_size`` as a last resort.
:func:`locate_model` gives :func:`engine.models.loading.load_model` exactly those folders, and
:func:`request_resolution` gives the run and the ``--dry-run`` plan the same tile size.
Installed models (``diffusionsat models``, ``GET /v1/models``) are listed by :func:`installed_models`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelLoadError, ModelNotFound
from . import releases
from .configs import CONTROLNET_CLASS_NAMES, read_config, resource_path
from .hub import hub_repo, resolve_hub_id
from .resolution import (
    TINY_RESOLUTION,
    Resolution,
    folder_resolution,
    request_resolution,
)

COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
UNET_CLASSES = {"SatUNet", "UNet2DConditionModel"}


def missing_controlnet(name: str, task: str, have) -> ModelNotFound:
    """The refusal of a task whose ControlNet the model lacks (``have``: the tasks it has)."""
    listed = ", ".join(sorted(have)) or "none"
    return ModelNotFound(
        f"the model {name!r} has no ControlNet for {task} (it has: {listed}); pass --model "
        f"with a {task} ControlNet checkpoint folder (controlnet/ inside), or --model tiny to try the task"
    )


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


def models_dirs() -> list[Path]:
    """Folders searched for installed models: ``$DIFFUSIONSAT_MODELS`` (os.pathsep-separated),
    else ``$XDG_DATA_HOME/diffusionsat/models`` (``~/.local/share/diffusionsat/models``)."""
    env = os.environ.get("DIFFUSIONSAT_MODELS")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return [Path(data) / "diffusionsat" / "models"]


BUILT_IN = Resolution(TINY_RESOLUTION, "built-in")


def tiny_entry() -> dict:
    """The built-in tiny model as ``diffusionsat models --json`` and ``GET /v1/models`` list it."""
    return {"name": "tiny", "path": None, "resolution": TINY_RESOLUTION, "kind": "built-in",
            "resolution_source": "built-in", "conditioning_resolution": None, "release": None,
            "tasks": ["generate", "superres", "temporal", "inpaint", "extend"], "unet_checkpoint": None,
            "trained_against": None, "warning": None}


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    resolution: int
    kind: str  # "single-image", "controlnet-superres", "controlnet-temporal", "controlnet-control"
    resolution_source: str = "config"
    conditioning_resolution: Optional[int] = None
    release: Optional[str] = None
    #: single-image: the checkpoint a run uses; ControlNet: the UNet it pairs with
    unet_checkpoint: Optional[str] = None
    warning: Optional[str] = None

    @property
    def tasks(self) -> list[str]:
        rel = releases.release(self.release) if self.release else None
        if rel is not None:
            return list(rel.tasks)
        return {"single-image": ["generate", "inpaint", "extend"], "controlnet-superres": ["superres"],
                "controlnet-temporal": ["temporal", "inpaint"]}.get(self.kind, [])

    @property
    def trained_against(self) -> Optional[str]:
        """Which UNet a ControlNet was trained against (recorded by our training, else the manifest's)."""
        if not self.kind.startswith("controlnet"):
            return None
        record = releases.read_record(self.path)
        if record and record.get("trained_against_unet"):
            return str(record["trained_against_unet"])
        rel = releases.release(self.release) if self.release else None
        pair = rel.paired_unet if rel else "diffusionsat-512/checkpoint-100000"
        return f"{pair}/unet" if pair else None

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "resolution": self.resolution, "kind": self.kind,
                "resolution_source": self.resolution_source, "conditioning_resolution": self.conditioning_resolution,
                "release": self.release, "tasks": self.tasks, "unet_checkpoint": self.unet_checkpoint,
                "trained_against": self.trained_against, "warning": self.warning}


def _controlnet_kind(config: dict) -> str:
    if config.get("_class_name") in ("ControlNetModel3D", "SatControlNet3D"):
        return "controlnet-temporal"
    if config.get("conditioning_in_channels") == 10:
        return "controlnet-superres"
    return "controlnet-control"


def describe_folder(path: Path) -> Optional[InstalledModel]:
    """What an installed model folder holds, or None if it is not a loadable model."""
    cn_folder = _controlnet_folder(path)
    if cn_folder is not None:
        try:
            config = read_config(cn_folder)
        except (ModelNotFound, ModelLoadError):
            return None
        kind = _controlnet_kind(config)
        res, rel = folder_resolution(cn_folder, config, kind)
        model = InstalledModel(name=path.name, path=path, resolution=res.px, kind=kind,
                               resolution_source=res.source, conditioning_resolution=res.conditioning_px,
                               release=rel.name if rel else None, warning=res.warning)
        return replace(model, unet_checkpoint=model.trained_against)  # the UNet it pairs with
    try:
        unet_folder = find_unet_folder(path)
        config = read_config(unet_folder)
    except (ModelNotFound, ModelLoadError):
        return None
    res, rel = folder_resolution(unet_folder, config, "single-image")
    checkpoint = unet_folder.parent.name if unet_folder.parent.name.startswith("checkpoint-") else None
    return InstalledModel(name=path.name, path=path, resolution=res.px, kind="single-image",
                          resolution_source=res.source, release=rel.name if rel else None,
                          unet_checkpoint=checkpoint, warning=res.warning)


def installed_models() -> list[InstalledModel]:
    """Installed models, best first (highest native resolution, then name)."""
    found = []
    for folder in models_dirs():
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                info = describe_folder(child)
                if info is not None:
                    found.append(info)
    return sorted(found, key=lambda m: (-m.resolution, m.name))


def _installed_singles() -> list[InstalledModel]:
    return [m for m in installed_models() if m.kind == "single-image"]


@dataclass
class ModelFacts:
    """What ``--model`` (+ ``--unet``, ``--controlnet``) designates, found on disk without loading
    weights: the folders, their resolutions and the notices for rules the user did not ask for.
    :func:`~engine.models.loading.load_model` loads exactly these folders and :func:`plan_resolution`
    reads the same facts."""

    root: Optional[Path]
    unet_folder: Optional[Path]
    cn_folder: Optional[Path]
    unet_resolution: Resolution
    controlnet_resolution: Optional[Resolution] = None
    notices: list[str] = field(default_factory=list)


def _paired_unet(cn_folder: Path, root: Path, notices: list[str]) -> Path:
    """The UNet a ControlNet without ``--unet`` runs with: the one its training recorded, else the
    one the manifest names (the released ControlNets: the 512 model's checkpoint-100000)."""
    record = releases.read_record(root) or releases.read_record(cn_folder) or {}
    recorded = record.get("trained_against_unet")
    if recorded and recorded != "tiny" and Path(recorded).is_dir():
        notices.append(f"the ControlNet {root.name} runs with the UNet it was trained against, {recorded} "
                       "(pass --unet to change)")
        return find_unet_folder(Path(recorded))
    config = read_config(cn_folder)
    kind = _controlnet_kind(config)
    _, rel = folder_resolution(cn_folder, config, kind)
    pair = (rel.pairs_with if rel else None) or {"release": "diffusionsat-512", "checkpoint": "checkpoint-100000"}
    singles = _installed_singles()
    if not singles:
        raise ModelNotFound(
            f"{root} is a ControlNet checkpoint without a UNet: give the single-image model it was "
            f"trained against with --unet ({pair['release']}'s {pair['checkpoint']}/unet; "
            f"`diffusionsat download {pair['release']}` installs it)"
        )
    wanted = [m for m in singles if m.release == pair["release"]]
    for model in wanted:
        folder = model.path / pair["checkpoint"] / "unet"
        if (folder / "config.json").is_file():
            notices.append(f"the ControlNet {root.name} runs with {model.name}/{pair['checkpoint']}/unet, "
                           "the UNet it was trained against (pass --unet to change)")
            return folder
    fallback = (wanted or singles)[0]
    folder = find_unet_folder(fallback.path)
    notices.append(f"the ControlNet was trained against {pair['release']}'s {pair['checkpoint']}, which is not "
                   f"installed; using {folder} instead (outputs will differ; pass --unet)")
    return folder


def model_facts(spec: str = "auto", *, unet: Optional[str | os.PathLike] = None,
                controlnet: Optional[str | os.PathLike] = None, resolve_hub: bool = True) -> ModelFacts:
    """Resolve ``--model``/``--unet``/``--controlnet`` to folders and resolutions (no weights).

    ``spec`` "tiny" gives the built-in facts; "auto" the best installed single-image model (None
    folders and tiny's facts when nothing is installed); ``resolve_hub=False`` answers the
    default 512 px for an ``hf:`` id instead of downloading it (plans)."""
    spec = (spec or "auto").strip()
    notices: list[str] = []
    if spec == "auto":
        singles = _installed_singles()
        if not singles:
            if unet is not None or controlnet is not None:
                raise ModelNotFound("--unet/--controlnet need --model: no installed model to combine them with")
            return ModelFacts(None, None, None, BUILT_IN, BUILT_IN)
        spec = str(singles[0].path)
        notices.append(f"using the installed model {singles[0].name} ({singles[0].path})")
    if spec == "tiny":
        if unet is not None or controlnet is not None:
            raise ModelNotFound("--unet/--controlnet cannot be combined with --model tiny; use --model <folder>")
        return ModelFacts(None, None, None, BUILT_IN, BUILT_IN)
    if spec.startswith("hf:") and not resolve_hub:
        default = Resolution(512, "default")
        return ModelFacts(None, None, None, default, default)
    root = resolve_hub_id(spec) if spec.startswith("hf:") else _existing_folder(spec, "--model")
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
            unet_folder = _paired_unet(cn_folder, root, notices)
    unet_res, _ = folder_resolution(unet_folder, read_config(unet_folder), "single-image")
    cn_res = None
    if cn_folder is not None:
        cn_config = read_config(cn_folder)
        cn_res, _ = folder_resolution(cn_folder, cn_config, _controlnet_kind(cn_config))
        task = {"controlnet-superres": "superres", "controlnet-temporal": "temporal"}.get(
            _controlnet_kind(cn_config), "control")
        cond_px = cn_res.conditioning_px if cn_res.conditioning_px not in (None, cn_res.px) else None
        if cn_res.px != unet_res.px or cond_px:
            cond = f" with {cond_px} px conditioning" if cond_px else ""
            notices.append(f"{task} tiles at {cn_res.px} px{cond}, the resolution its ControlNet was trained at "
                           f"({cn_res.source}); pass --resolution to change it")
    for res in (unet_res, cn_res):
        if res is not None and res.warning and res.warning not in notices:
            notices.append(res.warning)
    return ModelFacts(root, unet_folder, cn_folder, unet_res, cn_res, notices)


def controlnet_task_of(request: Any) -> Optional[str]:
    """The ControlNet task a request needs: superres, temporal (also in-painting with references,
    which condition through the temporal ControlNet), or None."""
    if request.task in ("superres", "temporal"):
        return request.task
    if request.task == "inpaint" and getattr(request, "references", None):
        return "temporal"
    return None


def auto_model(request: Any) -> str:
    """The ``model`` a request runs with. ``auto`` for a ControlNet task (superres, temporal,
    in-painting with references) without ``--controlnet`` is the installed ControlNet for that
    task, when there is one (the best, as :func:`installed_models` orders them): the single-image
    model ``auto`` otherwise picks has no ControlNet and would be refused. Anything else is kept."""
    spec = (getattr(request, "model", None) or "auto").strip()
    if spec != "auto" or getattr(request, "controlnet", None):
        return spec
    task = controlnet_task_of(request)
    if task is None:
        return spec
    kind = f"controlnet-{task}"
    for model in installed_models():
        if model.kind == kind:
            return str(model.path)
    return spec


def plan_resolution(request: Any) -> int:
    """:func:`request_resolution` for ``request`` without loading weights or downloading."""
    if getattr(request, "resolution", None):
        return int(request.resolution)
    facts = model_facts(auto_model(request), unet=request.unet, controlnet=getattr(request, "controlnet", None),
                        resolve_hub=False)
    return request_resolution(facts, request)


def native_resolution(spec: str = "auto", unet: Optional[str] = None) -> int:
    """The generate resolution (px) of ``--model`` without loading weights (for plans and estimates)."""
    try:
        return model_facts(spec, unet=unet, resolve_hub=False).unet_resolution.px
    except (ModelNotFound, ModelLoadError):
        return 512


def _controlnet_folder(path: Path) -> Optional[Path]:
    """``path`` itself or ``path/controlnet`` when it is a ControlNet folder, else None."""
    for folder in (path, path / "controlnet"):
        config = folder / "config.json"
        if config.is_file():
            try:
                if json.loads(config.read_text()).get("_class_name") in CONTROLNET_CLASS_NAMES:
                    return folder
            except ValueError:
                continue
    return None


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
    facts: Optional["ModelFacts"] = None  #: the resolutions and pairing (:func:`model_facts`)

    def controlnet_tasks(self) -> Optional[list[str]]:
        """The tasks of the model's ControlNet (as :func:`~engine.models.loading.controlnet_task` names
        them); None: unknown."""
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
        return [_controlnet_kind(config).removeprefix("controlnet-")]

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
    :func:`~engine.models.loading.load_model` would refuse before it reads weights. Reads config files only; an ``hf:``
    id is downloaded only with ``download=True``."""
    spec = (spec or "auto").strip()
    if spec.startswith("hf:") and not download:
        hub_repo(spec)  # the id's form is checked; the download waits for the real run
        return LocatedModel(hub=spec)
    facts = model_facts(spec, unet=unet, controlnet=controlnet)
    notices = list(facts.notices)
    if facts.root is None:
        if spec == "auto":
            notices.append(
                "no DiffusionSat weights are installed, so the built-in tiny model (random weights) "
                f"is used: install one with 'diffusionsat download diffusionsat-512' (into {models_dirs()[0]}; "
                "'diffusionsat download --help' lists the releases) or pass --model <folder>"
            )
        return LocatedModel(tiny=True, notices=notices, facts=facts)
    base_path = Path(base).expanduser() if base else None
    components = find_components(facts.unet_folder, facts.root, base_path)
    return LocatedModel(root=facts.root, unet_folder=facts.unet_folder, cn_folder=facts.cn_folder,
                        components=components, notices=notices, facts=facts)


def _existing_folder(spec: str, flag: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        hint = " (hub ids are written hf:owner/name)" if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) else ""
        raise ModelNotFound(f"{flag} folder {spec!r} does not exist{hint}; use --model tiny or a folder path")
    if not path.is_dir():
        raise ModelNotFound(f"{flag} {spec!r} is a file; give the model's folder")
    return path
