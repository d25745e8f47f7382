"""Models loaded once per process and reused: the explicit cache the CLI and the server share.

A model is placed once per (model, device, dtype, compile): on CUDA with the GPU fast path
(:meth:`ModelBundle.to`, :func:`engine.device.configure_backends`), and with ``compile`` its UNet and
ControlNet blocks compiled (:meth:`ModelBundle.compile`); a compiled bundle stays cached, so its
kernels are built once and reused by every later tile and job of the process (the server's jobs)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from ..device import Placement, configure_backends, resolve
from .bundle import ModelBundle
from .loading import load_model


@dataclass(frozen=True)
class ModelKey:
    model: str
    unet: Optional[str]
    base: Optional[str]
    controlnet: Optional[str]
    device: str
    dtype: str
    compile: bool = False


class ModelCache:
    """Keeps up to ``max_models`` loaded bundles, least recently used evicted first."""

    def __init__(self, max_models: int = 1) -> None:
        self.max_models = max(1, int(max_models))
        self._items: "OrderedDict[ModelKey, ModelBundle]" = OrderedDict()
        self._lock = threading.RLock()
        #: models loaded since the cache was made (a reused one does not count): for /v1/health
        self.loads = 0

    def get(
        self,
        model: str = "auto",
        *,
        unet: Optional[str] = None,
        base: Optional[str] = None,
        controlnet: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
    ) -> tuple[ModelBundle, Placement]:
        """The bundle for these arguments, loaded and placed on first use. ``compile``: the
        request's ``--compile`` (a compiled bundle is cached apart from the eager one)."""
        placement = resolve(device, dtype)
        key = ModelKey(model, unet, base, controlnet, placement.device, placement.dtype, bool(compile))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], placement
            while len(self._items) >= self.max_models:
                self._items.popitem(last=False)
                _free_device_memory()
            bundle = load_model(model, unet=unet, base=base, controlnet=controlnet)
            configure_backends(placement)
            bundle.to(placement.device, placement.torch_dtype)
            if compile:
                bundle.compile()
            self._items[key] = bundle
            self.loads += 1
            return bundle, placement

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            _free_device_memory()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        # An empty cache is still a cache: without this, `models or ModelCache()` would silently
        # replace a shared, still-empty cache by a private one and every job would reload its model.
        return True


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
