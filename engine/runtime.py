"""Process-wide settings for the engine's entry points (CLI, server): memory that stays flat.

Tiled jobs stream rasters window by window; two defaults outside our code would otherwise make
peak memory grow with the raster (measured in benchmarks/tiling_memory.py):

* GDAL's block cache, 5 % of RAM by default, fills with blocks a streaming job never re-reads;
* glibc raises its mmap threshold after large frees, so later tile-sized temporaries come from
  a heap that fragments instead of going back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: MiB of GDAL block cache: the tile loop reads and writes window by window and needs little; a
#: bigger cache fills with input and scratch blocks as the raster grows (128 MiB made peak RSS grow
#: by 11 % from 1 to 16.8 Mpx of super-resolution, 16 MiB by 1.6 %: docs/benchmarks.md).
GDAL_CACHE_MB = 32
#: Allocations above this many bytes are mmapped and returned to the system when freed.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def configure_process() -> None:
    """Apply the settings above (an explicit user environment wins); safe to call twice."""
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # the user chose; glibc read it at start-up
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows, musl): nothing to tune
