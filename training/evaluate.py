"""``diffusionsat evaluate``: generate each validation image from its metadata and compare.

For every validation sample (unshuffled, no dropout) the model generates an image from the
sample's full caption and metadata with a fixed seed (``seed + i``), and the metrics compare it
with the real image, both in [0, 1] at the model resolution:

- ``ssim``, ``psnr``: torchmetrics (data range 1; PSNR is the mean of per-image PSNRs, in dB);
- ``fid``: torchmetrics' FID on Inception features -- only with ``--fid-weights`` (the
  torch-fidelity Inception weights file, ``pt_inception-2015-12-05-*.pth``) and torch-fidelity
  installed; nothing is downloaded;
- ``lpips``: LPIPS (AlexNet) -- only with ``--lpips-weights``: one state-dict file holding the
  whole LPIPS network (backbone and linear layers, torchmetrics' ``_LPIPS`` names), and
  torchvision installed; nothing is downloaded.

Results are one JSON object: per metric the mean and the count, plus the model, data, steps and
seed, so that two runs can be compared.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from engine.atomic import write_json_atomic
from engine.errors import InvalidRequest

__all__ = ["evaluate", "METRICS"]

METRICS = ("ssim", "psnr", "fid", "lpips")


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise InvalidRequest(f"unknown metric {unknown[0] if unknown else '(none)'}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def _check_backbones(metrics: list[str], fid_weights: Optional[str], lpips_weights: Optional[str]) -> None:
    """Refuse FID/LPIPS without user-supplied weights, before anything slow happens."""
    if "fid" in metrics:
        if not fid_weights:
            raise InvalidRequest("FID needs the Inception weights: pass --fid-weights FILE (torch-fidelity's "
                                 "pt_inception-2015-12-05 .pth); nothing is downloaded")
        if not Path(fid_weights).is_file():
            raise InvalidRequest(f"--fid-weights {fid_weights} does not exist")
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise InvalidRequest("FID needs torch-fidelity: pip install torch-fidelity") from None
    if "lpips" in metrics:
        if not lpips_weights:
            raise InvalidRequest("LPIPS needs its network weights: pass --lpips-weights FILE (a state dict of the "
                                 "whole AlexNet LPIPS network); nothing is downloaded")
        if not Path(lpips_weights).is_file():
            raise InvalidRequest(f"--lpips-weights {lpips_weights} does not exist")
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise InvalidRequest("LPIPS needs torchvision: pip install torchvision") from None


def _metric_objects(metrics: list[str], fid_weights: Optional[str], lpips_weights: Optional[str]) -> dict[str, Any]:
    try:
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    except ImportError:
        raise InvalidRequest("evaluation needs torchmetrics: pip install 'diffusionsat-qgis[train]'") from None
    objects: dict[str, Any] = {}
    if "ssim" in metrics:
        objects["ssim"] = StructuralSimilarityIndexMeasure(data_range=1.0)
    if "psnr" in metrics:
        objects["psnr"] = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    if "fid" in metrics:
        from torchmetrics.image.fid import FrechetInceptionDistance

        objects["fid"] = FrechetInceptionDistance(feature=2048, normalize=True,
                                                  feature_extractor_weights_path=str(fid_weights))
    if "lpips" in metrics:
        objects["lpips"] = _LpipsFromFile(str(lpips_weights))
    return objects


class _LpipsFromFile:
    """LPIPS (AlexNet) with weights from a local file; the mean distance over all pairs."""

    def __init__(self, path: str):
        from torchmetrics.functional.image.lpips import _LPIPS

        from engine.models.weights import _read_file

        self.net = _LPIPS(pretrained=False, net="alex", pnet_rand=True).eval()
        state = _read_file(Path(path))
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing:
            raise InvalidRequest(f"--lpips-weights {path} lacks {len(missing)} LPIPS weights (e.g. {missing[0]})")
        self.total, self.count = 0.0, 0

    @torch.no_grad()
    def update(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        dist = self.net(fake * 2 - 1, real * 2 - 1).flatten()
        self.total += float(dist.sum())
        self.count += dist.numel()

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.total / max(1, self.count))


def evaluate(
    model: str,
    data: Sequence[str],
    metrics: Sequence[str] = ("ssim", "psnr"),
    *,
    steps: int = 20,
    seed: int = 0,
    guidance: float = 7.5,
    limit: int = 100,
    batch_size: int = 4,
    resolution: Optional[int] = None,
    fid_weights: Optional[str] = None,
    lpips_weights: Optional[str] = None,
    base: Optional[str] = None,
    device: str = "auto",
    dtype: str = "auto",
    out: Optional[str | os.PathLike] = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on the first ``limit`` samples of ``data``; see the module docstring.

    Returns the result dict (and writes it to ``out`` as JSON when given, atomically).
    """
    from engine.device import resolve
    from engine.models.loading import load_model
    from engine.models.tiny import build_tiny
    from engine.pipelines.text2img import DiffusionSatPipeline

    from .datasets import Transform, first_examples, open_source

    names = parse_metrics(metrics)
    _check_backbones(names, fid_weights, lpips_weights)
    objects = _metric_objects(names, fid_weights, lpips_weights)
    if steps < 1 or limit < 1 or batch_size < 1:
        raise InvalidRequest("--steps, --limit and --batch-size must be at least 1")
    started = time.perf_counter()
    bundle = build_tiny() if model == "tiny" else load_model(model, base=base)
    size = resolution or bundle.native_resolution
    if size % 8:
        raise InvalidRequest(f"--resolution {size} must be a multiple of 8")
    source = open_source(list(data), "image", crop_size=size)
    transform = Transform(resolution=size, metadata_dropout=0.0, caption_dropout=0.0)
    examples = first_examples(source, transform, limit, seed)
    if not examples:
        raise InvalidRequest(f"no validation samples in {', '.join(map(str, data))}")
    placement = resolve(device, dtype)
    bundle.to(placement.device, placement.torch_dtype)
    pipe = DiffusionSatPipeline.from_bundle(bundle)
    channels = bundle.unet.config.in_channels
    latent = size // pipe.vae_scale_factor
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        noise = torch.stack([
            torch.randn((channels, latent, latent), generator=torch.Generator("cpu").manual_seed(seed + start + i))
            for i in range(len(chunk))
        ])
        metadata = torch.stack([e["metadata"] for e in chunk]) if bundle.uses_metadata else None
        fake = pipe([e["caption"] for e in chunk], metadata, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=guidance, latents=noise, output_type="pt").images.float().cpu()
        real = torch.stack([(e["pixel_values"] + 1.0) / 2.0 for e in chunk]).float()
        for name, metric in objects.items():
            if name == "fid":
                metric.update(real, real=True)
                metric.update(fake, real=False)
            else:
                metric.update(fake, real)
    result = {
        "model": model,
        "data": [str(d) for d in data],
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "resolution": size,
        "count": len(examples),
        "metrics": {name: {"mean": _finite(metric.compute()), "count": len(examples)} for name, metric in objects.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
    return result


def _finite(value: Any) -> Any:
    number = float(value)
    # JSON has no infinity: identical images give PSNR = inf, written as null with a flag
    return number if number == number and abs(number) != float("inf") else None
