"""Writing benchmark results into docs/benchmarks.md, each under its own heading, with the machine."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Speed and memory targets live here, not in unit tests. Each section names the command that\n"
    "produced it and the machine it ran on; re-run the command to refresh it.\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description(device: str = "cpu") -> str:
    import torch

    parts = [f"{cpu_model()}, {os.cpu_count()} cores", f"{platform.system()} {platform.release()}",
             f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name(torch.device(device)))
    return "; ".join(parts)


def software_versions() -> str:
    """The versions a CPU figure depends on (Python, torch, diffusers, numpy, rasterio/GDAL)."""
    import importlib.metadata as md

    parts = [f"Python {platform.python_version()}"]
    for name in ("torch", "diffusers", "transformers", "numpy", "rasterio"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    try:
        import rasterio

        parts.append(f"GDAL {rasterio.__gdal_version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def write_section(title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md with ``body``."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    section = f"## {title}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    tmp = doc.with_suffix(".md.partial")
    tmp.write_text(text.rstrip() + "\n")
    os.replace(tmp, doc)
