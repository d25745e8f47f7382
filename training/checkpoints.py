"""The run folder: pipeline components, numbered checkpoints, resuming, pruning.

Layout (so ``diffusionsat generate --model RUN``, the server and the plugin load a run directly
with :func:`engine.models.loading.load_model`):

```
RUN/
  model_index.json vae/ text_encoder/ tokenizer/ scheduler/   copied from the base at the start
  training_config.json                                         the options of the run
  losses.jsonl                                                 {"step", "loss", "lr"} per step
  validation/step-000100-0.png ...                             fixed-seed samples
  logs/                                                        TensorBoard (or W&B) logs
  checkpoint-N/
    unet/ unet_ema/            single image: SatUNet weights (safetensors, diffusers layout)
    controlnet/                ControlNet runs: the ControlNet only (the UNet is frozen)
    state/                     accelerate's optimizer, LR scheduler, scaler and RNG states
    training_state.json        step, batches consumed, seed; written last
  unet/ controlnet/ diffusionsat.json                          ControlNet runs: the frozen UNet
                                                               and the latest ControlNet
```

Each checkpoint is written into ``.checkpoint-N.partial`` and renamed into place when complete,
so a process killed at any moment leaves the previous checkpoints intact; ``.partial`` folders
are removed at the next start. ``load_model`` picks the highest ``checkpoint-N/unet``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from engine.atomic import atomic_folder, write_json_atomic, write_text_atomic
from engine.errors import InvalidRequest

__all__ = [
    "TrainingState",
    "list_checkpoints",
    "find_resume",
    "write_components",
    "export_model",
    "prune_checkpoints",
    "clean_partials",
    "STATE_FILE",
]

STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingState:
    """Where a run stands; the last file written into a checkpoint (its presence = complete)."""

    global_step: int  #: optimizer steps done
    batches_consumed: int  #: micro-batches each process has drawn from its stream
    seed: int
    num_processes: int
    batch_size: int
    gradient_accumulation_steps: int
    kind: str
    task: str
    ema_updates: int = 0

    def write(self, folder: Path) -> None:
        write_json_atomic(folder / STATE_FILE, asdict(self))

    @classmethod
    def read(cls, folder: Path) -> "TrainingState":
        try:
            data = json.loads((folder / STATE_FILE).read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError) as err:
            raise InvalidRequest(f"{folder} is not a usable checkpoint ({err}); give another --resume") from None


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``run`` as (step, folder), oldest first."""
    if not run.is_dir():
        return []
    found = []
    for child in run.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_resume(run: Path, spec: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` (None if the run has none yet) or a folder."""
    if spec is None:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(run)
        return checkpoints[-1][1] if checkpoints else None
    folder = Path(spec).expanduser()
    if not (folder / STATE_FILE).is_file():
        raise InvalidRequest(f"--resume {spec} is not a complete checkpoint folder (no {STATE_FILE}); "
                             "give 'latest' or a checkpoint-N folder of the run")
    return folder


def clean_partials(run: Path) -> None:
    """Remove folders a killed process left half-written."""
    if run.is_dir():
        for child in run.iterdir():
            if child.name.endswith(".partial") and child.name.startswith("."):
                shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(run: Path, limit: Optional[int]) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit``; returns what was deleted."""
    if not limit:
        return []
    checkpoints = list_checkpoints(run)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - limit)]]
    for path in doomed:
        # rename first: a kill during rmtree must not leave a half-deleted "checkpoint-N"
        trash = path.with_name(f".{path.name}.deleted.partial")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def export_model(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``config.json`` (the model's own, official class names kept) and safetensors weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def write_components(bundle: Any, run: Path) -> None:
    """Copy the pipeline components (vae, text encoder, tokenizer, scheduler) into the run root.

    Skipped when the run already has them (a resumed run). Each component is written atomically.
    """
    from engine.models.loading import model_index_json
    run.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "text_encoder"):
        if not (run / name / "config.json").is_file():
            with atomic_folder(run / name) as tmp:
                getattr(bundle, name).save_pretrained(tmp, safe_serialization=True)
    if not (run / "tokenizer").is_dir():
        with atomic_folder(run / "tokenizer") as tmp:
            bundle.tokenizer.save_pretrained(tmp)
    if not (run / "scheduler" / "scheduler_config.json").is_file():
        with atomic_folder(run / "scheduler") as tmp:
            bundle.scheduler.save_pretrained(tmp)
    index = run / "model_index.json"
    if not index.is_file():
        write_text_atomic(index, model_index_json(bundle.scheduler))
