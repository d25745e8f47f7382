"""A COG's overviews, averaged by the engine: the COG options, the overview factors, and one
streaming pass over the uncompressed scratch that writes every level (exact block means, nodata
and NaN left out), declared to GDAL's COG driver through a VRT so that it only copies and
compresses them (GDAL's own overview pass re-read the full resolution and cost more CPU than
compressing it: docs/benchmarks.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


#: DEFLATE level of published COGs. libdeflate (GDAL's DEFLATE) at level 1 compresses ~3.5x
#: faster than at the default 6, for files ~6 % larger (measured on tiling outputs; docs/benchmarks.md).
DEFLATE_LEVEL = 1

#: Bytes of sums one overview chunk may take (bounds the publish's RAM; the chunk is at
#: least one block of the coarsest overview level).
_OVERVIEW_CHUNK_BYTES = 8 << 20


def cog_options(blocksize: int, overviews: bool) -> dict[str, Any]:
    return {
        "driver": "COG",
        "compress": "DEFLATE",
        "level": DEFLATE_LEVEL,
        "predictor": "2",
        "blocksize": blocksize,
        "overviews": "AUTO" if overviews else "NONE",
        "overview_resampling": "AVERAGE",
        "bigtiff": "IF_SAFER",
        # compress blocks on every core: with one thread the publish of a large result took as
        # long as its whole tiling (benchmarks/tiling_memory.py)
        "num_threads": "ALL_CPUS",
    }


def overview_factors(width: int, height: int, blocksize: int) -> list[int]:
    """Decimation factors 2, 4, ... until the coarsest level fits in one block (the levels GDAL's
    COG driver makes); an overview of factor ``f`` is ``ceil(width / f)`` x ``ceil(height / f)`` px
    (rounded up, as gdaladdo's; the COG driver's own round down)."""
    factors: list[int] = []
    f = 1
    while math.ceil(width / f) > blocksize or math.ceil(height / f) > blocksize:
        f *= 2
        factors.append(f)
    return factors


def _valid_mask(block: np.ndarray, nodata: Optional[float]) -> Optional[np.ndarray]:
    """Where ``block`` holds data (None: everywhere)."""
    valid = None
    if block.dtype.kind == "f":
        valid = ~np.isnan(block)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        not_nodata = block != block.dtype.type(nodata)
        valid = not_nodata if valid is None else valid & not_nodata
    return valid


def _halve(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of 2x2 blocks (an odd last row or column is a block of its own)."""
    out = []
    for a in (sums, counts):
        h, w = a.shape[-2:]
        if h % 2 or w % 2:
            a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2)))
        out.append(a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2])
    return out[0], out[1]


def _means(sums: np.ndarray, counts: np.ndarray, dtype: np.dtype, nodata: Optional[float]) -> np.ndarray:
    """Averages as ``dtype`` (integers rounded half up), ``nodata`` where nothing was valid."""
    empty = counts == 0
    any_empty = bool(empty.any())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / (np.maximum(counts, 1) if any_empty else counts)
    if dtype.kind in "iu":
        mean += 0.5
        np.floor(mean, out=mean)  # a mean of valid values is within the type's range
    out = mean.astype(dtype)
    if any_empty:
        fill = nodata if nodata is not None else (np.nan if dtype.kind == "f" else 0)
        out[np.broadcast_to(empty, out.shape)] = fill
    return out


def build_overviews(src: Any, levels: Sequence[Any], factors: Sequence[int], nodata: Optional[float]) -> None:
    """Fill the open datasets ``levels`` with the AVERAGE overviews of ``src`` at ``factors``.

    One streaming pass over ``src`` in chunks aligned to the coarsest factor, so each chunk gives
    whole pixels at every level: every overview pixel is the exact mean of the valid (not
    ``nodata``, not NaN) pixels of its ``f`` x ``f`` block, ``nodata`` where there is none. RAM: one
    chunk (about :data:`_OVERVIEW_CHUNK_BYTES`), whatever the raster size.
    """
    from rasterio.windows import Window

    top = max(factors)
    width, height, bands = src.width, src.height, src.count
    dtype = np.dtype(src.dtypes[0])
    # float32 sums are exact for bytes up to 256 x 256 blocks (255 * 256**2 < 2**24) and 2-3x faster
    acc = np.float32 if dtype.kind in "iu" and dtype.itemsize == 1 and top <= 256 else np.float64
    by = src.block_shapes[0][0] if src.block_shapes else 256
    rows = top * max(1, by // top)
    cols = top * max(1, _OVERVIEW_CHUNK_BYTES // (np.dtype(acc).itemsize * bands * rows * top))
    for y in range(0, height, rows):
        h = min(rows, height - y)
        for x in range(0, width, cols):
            w = min(cols, width - x)
            block = src.read(window=Window(x, y, w, h))
            valid = _valid_mask(block, nodata)
            if valid is None:
                sums, counts = block.astype(acc), np.ones((1, h, w), acc)
            else:
                sums, counts = np.where(valid, block, 0).astype(acc), valid.astype(acc)
            done = 1
            for ds, f in zip(levels, factors):
                while done < f:
                    sums, counts = _halve(sums, counts)
                    done *= 2
                # a float32 quotient rounds half up exactly while blocks have <= 64 x 64 px
                s, c = (sums, counts) if f <= 64 else (sums.astype(np.float64), counts.astype(np.float64))
                ds.write(_means(s, c, dtype, nodata), window=Window(x // f, y // f, s.shape[2], s.shape[1]))


def with_overviews(vrt_text: str, overview_paths: Sequence[Path]) -> str:
    """A GDAL VRT of the scratch (as GDAL wrote it) declaring ``overview_paths`` as its overviews."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(vrt_text)
    for band in root.iter("VRTRasterBand"):
        for path in overview_paths:
            ov = ET.SubElement(band, "Overview")
            name = ET.SubElement(ov, "SourceFilename", relativeToVRT="1")
            name.text = path.name
            ET.SubElement(ov, "SourceBand").text = band.get("band")
    return ET.tostring(root, encoding="unicode")
