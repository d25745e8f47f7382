"""A split run's stripes of one output: each process of the run writes its own band of rows.

:class:`Stripe` names one band of output rows and its files; :func:`stripe_alignment` is the row
multiple a stripe starts on (so its overviews are the whole raster's); :func:`mosaic_vrt` stacks
the stripes' files into one VRT for the publish. :class:`engine.geo.cog.CogWriter` writes a stripe
(``stripe=``) and publishes them (``stripes=``); :mod:`engine.parallel` plans them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import RasterError
from .overviews import overview_factors


@dataclass(frozen=True)
class Stripe:
    """Rows ``row0..row1`` of an output, written by one process of a split run into its own files in
    ``folder`` (a folder every process reaches); ``index`` tells the stripes of one output apart."""

    folder: Path
    index: int
    row0: int
    row1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    def file(self, dest: str | os.PathLike, factor: int = 1) -> Path:
        """This stripe's scratch of the output ``dest`` (``factor`` 1), or of its overview of ``factor``."""
        level = "" if factor == 1 else f".ovr{factor}"
        return Path(self.folder) / f"{Path(dest).name}.stripe{self.index}{level}.tif"


def stripe_alignment(width: int, height: int, blocksize: int = 256) -> int:
    """The multiple of rows a :class:`Stripe` of a ``width`` x ``height`` output must start on: a whole
    block, and a whole block of the coarsest overview (so each stripe's overview pixels are the
    whole raster's)."""
    return max([blocksize, *overview_factors(width, height, blocksize)])


def mosaic_vrt(vrt: Path, parts: Sequence[tuple[Path, int]], width: int, height: int, transform: Any) -> None:
    """Write ``vrt``: a ``width`` x ``height`` raster on ``transform`` made of ``parts`` (a GeoTIFF
    of the full width, the row it starts on), stacked; the files are named relative to the VRT."""
    import copy as copy_module
    import xml.etree.ElementTree as ET

    import rasterio
    from rasterio.shutil import copy as rio_copy

    first = parts[0][0]
    rio_copy(first, vrt, driver="VRT")  # GDAL's own VRT of one part: SRS, data types, nodata, sources
    root = ET.fromstring(vrt.read_text())
    root.set("rasterYSize", str(height))
    if transform is not None:
        gt = root.find("GeoTransform")
        if gt is None:
            gt = ET.SubElement(root, "GeoTransform")
        gt.text = ", ".join(repr(float(v)) for v in transform.to_gdal())
    sizes = {}
    for path, _ in parts:
        with rasterio.open(path) as ds:
            if ds.width != width:
                raise RasterError(f"the part {path.name} is {ds.width} px wide, the output {width}")
            sizes[path] = ds.height
    for band in root.iter("VRTRasterBand"):
        sources = [e for e in band if e.tag.endswith("Source")]
        template = sources[0]
        for e in sources:
            band.remove(e)
        for path, row0 in parts:
            h = sizes[path]
            src = copy_module.deepcopy(template)
            name = src.find("SourceFilename")
            name.set("relativeToVRT", "1")
            name.text = os.path.relpath(path, vrt.parent)
            props = src.find("SourceProperties")
            if props is not None:
                props.set("RasterYSize", str(h))
            for rect, y in (("SrcRect", 0), ("DstRect", row0)):
                el = src.find(rect)
                el.set("yOff", str(y))
                el.set("ySize", str(h))
            band.append(src)
    vrt.write_text(ET.tostring(root, encoding="unicode"))
