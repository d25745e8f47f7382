"""In-painting: fill the masked (cloudy, missing) pixels of a raster; every other pixel is written back
unchanged, in every band (the model makes R,G,B; the other bands are estimated from them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from affine import Affine
from rasterio.enums import ColorInterp

from ..errors import InvalidRequest
from ..geo.accumulate import batched
from ..geo.grid import Grid
from ..geo.guard import display_name
from ..geo.masks import feather
from ..geo.sources import MaskSource, RGBSource, grid_of, open_input
from ..geo.tiles import plan_tiles
from ..models.resolution import request_resolution
from ..parallel import RunContext
from ..pipelines.inpaint import DiffusionSatInpaintPipeline, Inpaint
from .common import (
    Layout,
    Outcome,
    TiledJob,
    check_pixels,
    check_resample,
    check_same_place,
    date_of,
    dated_frames,
    metadata_tags,
    provenance_tags,
    run_job,
    seed_for,
    spread_samples,
    tile_metadata,
    tile_overlap,
    whole_metadata,
)
from .run import tiled_runner
from .sampling import (
    Batches,
    batch_choice,
    bundle_for,
    frames_controls,
    per_tile,
    pipeline,
    row_generators,
    rows_progress,
    sample_rows,
    tiles_per_call,
)


def layout(request, model_px: int) -> Layout:
    """The input's grid; references (if any) must cover it."""
    grid = grid_of(request.input)
    _check_rgb_bands(request.input, request.rgb_bands)
    frames = []
    if request.references:
        frames = dated_frames(request.references, request.reference_dates, "references")
        check_same_place([p for p, _ in frames], grid)
    check_pixels(grid.width, grid.height, request.max_pixels,
                 "a smaller input (crop it first, e.g. gdal_translate -projwin)")
    tiles = plan_tiles(grid.width, grid.height, model_px, tile_overlap(request, model_px), 1)
    mask = MaskSource(request, grid)  # a mask that misses the whole input fails here, before any model call
    return Layout(grid, tiles, model_px, grid, frames=frames, mask=mask)


def _check_rgb_bands(path: str, bands: Sequence[int]) -> None:
    with open_input(path) as src:
        count = src.count
    if any(not 1 <= b <= count for b in bands):
        raise InvalidRequest(
            f"--rgb-bands {','.join(map(str, bands))}: {path!r} has {count} band(s), numbered 1..{count}; "
            f"name three of them as R,G,B (e.g. {','.join(map(str, range(1, min(count, 3) + 1)))}"
            f"{',1' * max(0, 3 - count)})"
        )


#: How in-painting fills the masked pixels of the bands the model does not generate (documented in
#: the README's In-painting section and written into the output's tags).
OTHER_BANDS_RULE = ("each band the model does not generate is fitted, once for the whole raster, as a linear "
                    "function of the R,G,B bands over the unmasked pixels (least squares on a decimated read); "
                    "its masked pixels get that function of the generated R,G,B; alpha bands become opaque")


class _OtherBands:
    """The bands of the input beyond ``rgb_bands``: their masked pixels, from the generated R,G,B.

    The model only knows R,G,B. For every other band ``k`` a linear fit
    ``band_k ~ c0 + c1 R + c2 G + c3 B`` is made once, over the input's unmasked, valid pixels (a
    decimated read of at most ~512 px a side, so the fit is the same for every window: no seams),
    and applied to the generated R,G,B of the masked pixels. Its R² is reported, so users see how
    much of a band (e.g. near-infrared) the visible bands explain. Alpha bands become opaque.
    """

    def __init__(self, src, rgb_bands: Sequence[int], mask: MaskSource) -> None:
        self.rgb = list(rgb_bands)
        self.bands = [b for b in range(1, src.count + 1) if b not in self.rgb]
        self.dtype = np.dtype(src.dtypes[0])
        self.coef: dict[int, Optional[np.ndarray]] = {}
        self.r2: dict[int, Optional[float]] = {}
        self.alpha = {b for b in self.bands if src.colorinterp[b - 1] == ColorInterp.alpha}
        fitted = [b for b in self.bands if b not in self.alpha]
        if not fitted:
            return
        step = max(1, math.ceil(max(src.width, src.height) / 512))
        h, w = max(1, src.height // step), max(1, src.width // step)
        data = src.read(self.rgb + fitted, out_shape=(len(self.rgb) + len(fitted), h, w), masked=True)
        valid = ~np.ma.getmaskarray(data).any(axis=0)
        values = np.ma.getdata(data).astype(np.float64)
        valid &= np.isfinite(values).all(axis=0)
        coarse = Grid(src.crs, src.transform * Affine.scale(src.width / w, src.height / h), w, h)
        valid &= ~mask.on(coarse)
        x = values[:3, valid].T
        design = np.column_stack([np.ones(len(x)), x])
        for i, b in enumerate(fitted):
            y = values[3 + i, valid]
            if len(y) < 16:
                self.coef[b], self.r2[b] = None, None
                continue
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            resid = y - design @ coef
            var = float(np.var(y))
            self.coef[b] = coef
            self.r2[b] = 1.0 - float(np.mean(resid ** 2)) / var if var > 0 else 1.0

    def warnings(self, descriptions: Sequence[Optional[str]], nodata) -> list[str]:
        out = []
        for b in self.bands:
            name = f"band {b}" + (f" ({descriptions[b - 1]})" if descriptions[b - 1] else "")
            if b in self.alpha:
                out.append(f"{name} is an alpha band: its in-painted pixels are set opaque")
            elif self.coef.get(b) is None:
                left = f"left as nodata ({nodata:g})" if nodata is not None else "set to 0 (the input has no nodata value)"
                out.append(f"{name} is not generated by the model and too few unmasked pixels were found to "
                           f"estimate it: its masked pixels are {left}")
            else:
                out.append(f"{name} is not generated by the model (it makes R,G,B from --rgb-bands): its masked "
                           f"pixels are estimated from the generated R,G,B by a linear fit over the unmasked pixels "
                           f"(R² {self.r2[b]:.2f}; see the README, In-painting)")
        return out

    def fill(self, out: np.ndarray, rgb: np.ndarray, m: np.ndarray, nodata) -> None:
        """Set the masked pixels of the other bands in ``out`` (all bands, in place)."""
        if not m.any():
            return
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        x = rgb[:, m].astype(np.float64)
        for b in self.bands:
            if b in self.alpha:
                value: Any = info.max if info is not None else 1.0
            elif self.coef.get(b) is None:
                value = nodata if nodata is not None else 0
            else:
                c = self.coef[b]
                value = c[0] + c[1:] @ x
                if info is not None:
                    value = np.clip(np.rint(value), info.min, info.max)
            out[b - 1][m] = value


class _CompositeWriter:
    """Writes ``where(mask, generated, input)`` over all the input's bands, so unmasked pixels are the
    input's, bit for bit; the tiles give R,G,B (3 bands), the other bands are filled by ``others``."""

    def __init__(self, writer, source, mask: MaskSource, bands: Sequence[int], others: _OtherBands) -> None:
        self.writer = writer
        self.profile = {**writer.profile, "count": 3}  # what the tiling writes: R, G, B
        self.source = source
        self.mask = mask
        self.bands = list(bands)
        self.others = others
        self.masked_pixels = 0

    def write(self, data: np.ndarray, window=None) -> None:
        original = self.source.read(window=window)
        m = self.mask.read(window)
        self.masked_pixels += int(m.sum())
        out = original.copy()
        if m.any():
            data = data.astype(np.float64)
            for b in set(self.bands):  # a band named twice (e.g. 1,1,1 for grey) gets the channels' mean
                channels = [i for i, x in enumerate(self.bands) if x == b]
                value = data[channels].mean(axis=0)
                if original.dtype.kind in "iu":
                    value = np.rint(value)
                out[b - 1][m] = value[m].astype(original.dtype)
            self.others.fill(out, data, m, self.writer.profile.get("nodata"))
        self.writer.write(out, window)


@dataclass
class _Tiles:
    """The per-tile steps of an in-painting run: what :func:`engine.geo.accumulate.run_tiled` calls."""

    request: Any
    pipe: DiffusionSatInpaintPipeline
    grid: Grid
    tiles: list
    model_px: int
    source: RGBSource
    mask: MaskSource
    refs: list  #: (path, date) of the references, in time order
    ref_sources: list
    date: Any
    seed: int
    progress: Optional[Callable]
    cancel: Any

    def read(self, tile):
        image, valid = self.source.read(tile.valid)
        m = self.mask.read(tile.valid)
        extra = [s.read(tile.valid)[0] for s in self.ref_sources]
        # channel 3 carries the mask so process() sees exactly the tile's mask, padded alike
        return np.concatenate([image, m[None].astype(np.float32), *extra]), valid | m

    batches: Any = None  #: engine.tasks.sampling.Batches: the run's tiles per model call

    @batched
    def process(self, tiles, arrays):
        """The filled R,G,B of each tile; the tiles with masked pixels go to the model together."""
        samples = spread_samples(self.request)
        # a tile with nothing to fill: the input, unchanged (and with --spread, a spread of 0)
        out: list = [array[:3] if samples == 1 else np.concatenate([array[:3], np.zeros_like(array[:1])])
                     for array in arrays]
        todo = [(i, tile, array) for i, (tile, array) in enumerate(zip(tiles, arrays)) if (array[3] > 0.5).any()]
        if todo:
            rows = sample_rows([t for _, t, _ in todo], [a for _, _, a in todo], samples)
            for (i, _, _), filled in zip(todo, per_tile(self.batches(self._fill, rows), samples)):
                out[i] = filled
        return out

    def _fill(self, batch):
        """One pipeline call for a batch of (tile, array, sample) rows with masked pixels -> their
        blended R,G,B (sample k: seed + k)."""
        request = self.request
        rows = [(t, k) for t, _, k in batch]
        images = [a[:3] for _, a, _ in batch]
        masks = [a[3] > 0.5 for _, a, _ in batch]
        mds = [tile_metadata(self.grid, t, self.model_px, self.date, request.cloud_cover) for t, _ in rows]
        control = None
        if self.ref_sources:
            control = frames_controls([a[4:] for _, a, _ in batch], [d for _, d in self.refs], mds,
                                      request.conditioning_scale)
        spec = Inpaint(image=torch.from_numpy(np.ascontiguousarray(np.stack(images))),
                       mask=torch.from_numpy(np.stack(masks).astype(np.float32))[:, None],
                       resample=request.resample)
        result = self.pipe([request.prompt] * len(batch), mds, height=self.model_px, width=self.model_px,
                           num_inference_steps=request.steps, guidance_scale=request.guidance,
                           generator=row_generators(self.seed, rows), control=control, inpaint=spec,
                           callback=rows_progress(self.progress, rows, len(self.tiles), spread_samples(request)),
                           cancel=self.cancel)
        filled = []
        for image, m, generated in zip(images, masks, result.images):
            soft = feather(m, max(1, request.dilate)) if request.dilate else m.astype(np.float32)
            # soft edge inside the mask: the generated pixels fade into the original ones
            filled.append(soft * generated.transpose(2, 0, 1) + (1 - soft) * image)
        return filled


def inpaint(request, out: Path, *, models, context: RunContext, progress=None, cancel=None) -> Outcome:
    """Fill the masked pixels of a raster; every other pixel is written back unchanged."""
    bundle, placement = bundle_for(models, request, context)
    model_px = request_resolution(bundle, request)
    controlnet = bundle.controlnet_for("temporal") if request.references else None
    tiling = layout(request, model_px)
    grid, refs, mask = tiling.out_grid, tiling.frames, tiling.mask
    source = RGBSource(request.input, grid, request.rgb_bands)
    ref_sources = [RGBSource(p, grid) for p, _ in refs]
    date = date_of(request.input, request.date)
    seed = seed_for(request, context)
    pipe = pipeline(bundle, request, controlnet)
    warnings = list(bundle.notices)
    check_resample(request, type(bundle.scheduler).__name__)
    choice = batch_choice(request, bundle, placement, model_px, controlnet=controlnet is not None)
    steps = _Tiles(request, pipe, grid, tiling.tiles, model_px, source, mask, refs, ref_sources, date, seed,
                   progress, cancel, Batches(choice, warnings))
    others = _OtherBands(source.src, request.rgb_bands, mask)
    warnings += others.warnings(list(source.src.descriptions), source.src.nodata)
    centre = whole_metadata(grid, date, request.cloud_cover)
    tags = _tags(request, provenance_tags("inpaint", bundle, placement, request, seed), refs, others, centre)
    tags.update(choice.tags())
    writers: list[_CompositeWriter] = []
    job = _job(request, out, steps, tags, others, writers)
    try:
        run_job(job, context, progress, cancel)
    finally:
        source.close()
        for s in ref_sources:
            s.close()
    # a rank of a split run composites only its own stripe: it cannot tell that the whole mask is empty
    if writers and writers[-1].masked_pixels == 0 and not context.distributed:
        warnings.append("the mask selects no pixel of the input: the output equals the input")
    warnings += centre.out_of_range_warnings("inpaint")
    return Outcome(grid=grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


def _tags(request, tags: dict, refs, others: _OtherBands, centre) -> dict:
    """The output's tags: provenance, the input, mask and references, how the other bands were filled,
    the whole output's metadata."""
    tags.update(input=display_name(request.input), mask=display_name(request.mask), mask_rule=request.mask_rule or "",
                dilate_px=request.dilate, resample=request.resample, synthetic_pixels="masked pixels only",
                references=";".join(display_name(p) for p, _ in refs))
    if others.bands:
        tags.update(generated_bands=",".join(map(str, request.rgb_bands)),
                    other_bands=",".join(map(str, others.bands)),
                    other_bands_rule=OTHER_BANDS_RULE,
                    other_bands_r2=",".join("" if others.r2.get(b) is None else f"{others.r2[b]:.3f}"
                                            for b in others.bands))
    tags.update(metadata_tags(centre))
    return tags


def _job(request, out: Path, steps: _Tiles, tags: dict, others: _OtherBands,
         writers: list[_CompositeWriter]) -> TiledJob:
    """The tiled job: R,G,B tiles in the input's scale, composited over all the input's bands (each
    composite writer opened is appended to ``writers``, for its count of masked pixels)."""
    source = steps.source
    src = source.src
    dtype = src.dtypes[0]
    colorinterp = [c.name for c in src.colorinterp]
    if "palette" in colorinterp:
        colorinterp = None  # the colour table is not copied, so neither is its interpretation
    scale = 255.0 if dtype == "uint8" else (source.hi - source.lo)
    offset = 0.0 if dtype == "uint8" else source.lo

    def wrap(writer):
        writers.append(_CompositeWriter(writer, src, steps.mask, request.rgb_bands, others))
        return writers[-1]

    return TiledJob(out=out, grid=steps.grid, tiles=steps.tiles, bands=3, dtype=dtype, read=steps.read,
                    process=steps.process, tags=tags, scale=scale, offset=offset, nodata=src.nodata,
                    band_descriptions=[d or "" for d in src.descriptions], colorinterp=colorinterp,
                    wrap_writer=wrap, run_key=request.model_dump_json(), out_bands=src.count,
                    batch_size=tiles_per_call(steps.batches, spread_samples(request)),
                    spread=spread_samples(request), spread_keep=steps.mask.read)


#: the task's runner (engine.tasks.RUNNERS): check, assigned inputs, then :func:`inpaint`
run = tiled_runner("inpaint", inpaint)
