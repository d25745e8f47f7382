"""What the user told QGIS about an input that its file does not say: CRS, nodata, band names.

A request may carry ``input_crs``, ``input_nodata`` and ``band_names`` (the plugin sends the
layer's, e.g. a CRS assigned in *Layer Properties → Source*). They are used only where the file
lacks them: the input is then read through a VRT beside it in a scratch folder that adds them
(the input itself is never modified). Tags and the file's base name are kept, so a date in
either is still found.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InvalidRequest
from .guard import trusted_vrt


def _needs(path: str, crs: str | None, nodata: float | None, names: Sequence[str] | None) -> dict:
    from rasterio.errors import RasterioError

    from .guard import open_raster

    try:
        with open_raster(path) as src:
            change = {}
            if crs and src.crs is None:
                change["crs"] = crs
            if nodata is not None and src.nodata is None:
                change["nodata"] = float(nodata)
            if names and all(not d for d in src.descriptions):
                if len(names) != src.count:
                    raise InvalidRequest(
                        f"band_names has {len(names)} names but {path!r} has {src.count} bands; "
                        "give one name per band")
                change["names"] = [str(n) for n in names]
            return change
    except (RasterioError, OSError):
        return {}  # not a raster we can open here: the task reports it with its own message


def _safe_crs(text: str):
    """The rasterio CRS of ``text`` as PROJ reads it: GDAL's own parser would also take a file name
    (reading a file anywhere) or a URL (fetching it), which a server's client must not get."""
    from rasterio.crs import CRS

    from ..metadata import parse_crs

    crs = parse_crs(text)
    authority = crs.to_authority()
    return CRS.from_user_input(":".join(authority)) if authority else CRS.from_wkt(crs.to_wkt())


def assign_vrt(path: str, folder: Path, *, crs: str | None = None, nodata: float | None = None,
               names: Sequence[str] | None = None) -> str:
    """``path``, or a VRT in ``folder`` that adds what ``path`` lacks of crs/nodata/names."""
    change = _needs(path, crs, nodata, names)
    if not change:
        return path
    import rasterio
    import rasterio.shutil
    from rasterio.errors import CRSError

    sub = Path(tempfile.mkdtemp(prefix="in", dir=folder))
    vrt = sub / (Path(path).stem + ".vrt")
    rasterio.shutil.copy(os.path.abspath(path), str(vrt), driver="VRT")
    with rasterio.open(vrt, "r+") as dst:
        if "crs" in change:
            try:
                dst.crs = _safe_crs(change["crs"])
            except (CRSError, InvalidRequest) as err:
                raise InvalidRequest(f"input_crs {change['crs'][:80]!r} is not a CRS: {err}") from None
        if "nodata" in change:
            dst.nodata = change["nodata"]
        for i, name in enumerate(change.get("names", []), start=1):
            dst.set_band_description(i, name)
    return str(vrt)


@contextlib.contextmanager
def assigned_inputs(request, workdir: Path | None = None) -> Iterator:
    """``request`` with its input rasters (``input``, ``inputs``, ``references``) completed by
    ``input_crs``/``input_nodata``/``band_names``; the VRTs are removed afterwards."""
    crs = getattr(request, "input_crs", None)
    nodata = getattr(request, "input_nodata", None)
    names = getattr(request, "band_names", None)
    if not (crs or nodata is not None or names):
        yield request
        return
    folder = Path(tempfile.mkdtemp(prefix=".assigned-", dir=str(workdir) if workdir else None))
    try:
        with contextlib.ExitStack() as trusted:
            def assign(path: str) -> str:
                vrt = assign_vrt(path, folder, crs=crs, nodata=nodata, names=names)
                if vrt != path:  # the engine's own VRT: a server's input policy checks `path` instead
                    trusted.enter_context(trusted_vrt(vrt, path))
                return vrt

            update = {}
            for field in ("input", "inputs", "references"):
                value = getattr(request, field, None)
                if isinstance(value, str):
                    update[field] = assign(value)
                elif isinstance(value, list) and value:
                    update[field] = [assign(v) for v in value]
            yield request.model_copy(update=update)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
