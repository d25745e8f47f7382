"""Extend (outpaint) a raster layer: a larger raster around it, its pixels kept bit for bit.

The output grid is the input's (its CRS, pixel size and pixel edges) grown to cover the request's
bbox: the bbox, snapped outward to the input's pixel grid, united with the input's own extent.

The new pixels come from joint denoising of one latent canvas over the whole output
(engine.tasks.extent: the windows of the model's native size, each conditioned on its own centre at
the input's GSD, blended at every step; the canvas in files, stepped band by band), with the input
as a constraint (blended latent diffusion, RePaint's known-region step without resampling passes):

- the input's R,G,B (``rgb_bands``, scaled to 0..1 as in-painting reads them) is encoded with the
  VAE, in tiles with context, into the *known latents* of the latent cells the input covers whole
  (kept in a file beside the canvas);
- at every step the canvas inside that region is replaced by the known latents noised to the step's
  level (with the canvas's own initial noise, so a perfect model's DDIM trajectory is unchanged),
  with a soft mask :data:`FEATHER_CELLS` cells wide inside the region's open borders, so the new
  content and the old meet half way rather than at a hard latent edge;
- windows that lie wholly where the mask is 1 make no UNet call: a large layer extended by a
  margin costs only the windows along its border;
- the canvas is decoded in overlapping blended tiles (those wholly inside the input skipped) and
  composited: every input pixel (all bands, dtype, nodata) is the input's, bit for bit; the new
  pixels' R,G,B are the model's, their other bands filled as in-painting fills them (a linear fit
  on R,G,B, alpha opaque; engine.tasks.inpaint).

The replacement needs a stateless sampler: ``auto`` is DDIM here (as with in-painting's
``--resample``), and the canvas then stays on disk (memory flat in the extent).

The module is over 500 lines because it is one task's whole path, in the order it runs: the grid
and the layout (no torch, for the checks and the plan), the known latents, the replacement at
every step, the decode and the composite, then the run that ties them together; the joint
machinery it builds on is engine.tasks.extent's, the compositing in-painting's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from affine import Affine
from rasterio.windows import Window

from ..errors import InvalidRequest
from ..geo.grid import EDGE_EPS_PX, Grid
from ..geo.guard import display_name
from ..geo.sources import grid_of
from .common import Layout, check_pixels
from .extent.grid import LATENT_FACTOR, ExtentLayout, window_overlap
from .run import tiled_runner

#: Width of the soft latent mask inside the known region's open borders, latent cells: the
#: outermost whole known cell is held at 1/(F+1), the next at 2/(F+1), ... then 1.
FEATHER_CELLS = 2
#: The new pixels this close to the input (px) cross-fade from the input's edge into the generated
#: ones (a smoothstep of the distance): the decoder's reconstruction of the edge is not the input.
FEATHER_PX = 8
#: The one sampler the known-region replacement runs with (stateless: the canvas in files).
SAMPLER = "DDIMScheduler"

# --------------------------------------------------------------------------------------------
# The grid and the layout (no torch: the checks and the plan use these)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtendLayout:
    """The output grid of an extend job, where the input lies in it, and the joint layout."""

    in_grid: Grid
    out_grid: Grid
    col_off: int  #: the input's first column in the output grid
    row_off: int
    extent: ExtentLayout  #: the windows over the latent canvas (engine.tasks.extent)
    known: tuple[int, int, int, int]  #: latent cells the input covers whole: row0, row1, col0, col1
    open_sides: tuple[bool, bool, bool, bool]  #: (top, bottom, left, right): canvas cells beyond the known region
    skipped: frozenset  #: windows wholly inside the fully known cells (no UNet call)

    @property
    def input_window(self) -> Window:
        return Window(self.col_off, self.row_off, self.in_grid.width, self.in_grid.height)

    def cell_weights(self, axis: int) -> np.ndarray:
        """The known mask's profile along rows (axis 0) or columns (1) of the canvas: 0 outside the
        known cells, ramping up over :data:`FEATHER_CELLS` cells from each open side, then 1; the
        mask of cell (r, c) is ``min(rows[r], cols[c])``."""
        n = self.extent.canvas_h if axis == 0 else self.extent.canvas_w
        lo, hi = (self.known[0], self.known[1]) if axis == 0 else (self.known[2], self.known[3])
        first_open, last_open = (self.open_sides[0], self.open_sides[1]) if axis == 0 else \
            (self.open_sides[2], self.open_sides[3])
        out = np.zeros(n, np.float32)
        if hi <= lo:
            return out
        idx = np.arange(lo, hi)
        d = np.full(len(idx), np.inf)
        if first_open:
            d = np.minimum(d, idx - lo)
        if last_open:
            d = np.minimum(d, hi - 1 - idx)
        out[lo:hi] = np.minimum(1.0, (d + 1) / (FEATHER_CELLS + 1))
        return out

    def plan(self) -> dict:
        """What ``--dry-run`` and ``POST /v1/plan`` show of the job."""
        e = self.extent
        new = self.out_grid.width * self.out_grid.height - self.in_grid.width * self.in_grid.height
        return {**e.plan(), "windows": len(e.windows), "windows_skipped": len(self.skipped),
                "windows_run": len(e.windows) - len(self.skipped), "new_pixels": new,
                "known_pixels": self.in_grid.width * self.in_grid.height,
                "extended_from": list(self.in_grid.bounds), "input_offset_px": [self.col_off, self.row_off]}


def _bbox_in_input_crs(request, grid: Grid) -> tuple[float, float, float, float]:
    """The request's bbox in the input's CRS (one line naming the problem when it cannot be)."""
    from rasterio.warp import transform_bounds

    from ..metadata import parse_crs, validate_bbox

    crs = parse_crs(request.crs) if request.crs else None
    src_crs = crs if crs is not None else grid.crs
    bbox = validate_bbox(request.bbox, src_crs)
    if crs is None:
        return bbox
    from rasterio.crs import CRS

    try:
        target = CRS.from_user_input(grid.crs)
        source = CRS.from_wkt(crs.to_wkt())
        if source == target:
            return bbox
        out = transform_bounds(source, target, *bbox, densify_pts=21)
    except Exception as err:  # noqa: BLE001 - PROJ/GDAL errors of many kinds: one line
        raise InvalidRequest(f"the bbox in {request.crs!r} cannot be transformed to the input's CRS "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); give the bbox "
                             "in the input's CRS (leave --crs out)") from None
    if not all(math.isfinite(v) for v in out) or out[2] <= out[0] or out[3] <= out[1]:
        raise InvalidRequest(f"the bbox in {request.crs!r} cannot be transformed to the input's CRS (it falls "
                             "outside that CRS's area of use); give the bbox in the input's CRS (leave --crs out)")
    return tuple(float(v) for v in out)


def _coords(b) -> str:
    """A bbox for a message: whole metres as such (4599040, not 4.59904e+06), degrees to 1e-7."""
    return ",".join(f"{round(float(v), 7):.12g}" for v in b)


def _check_touches(request, in_grid: Grid, bbox) -> None:
    """A bbox apart from the layer (a gap between them) is refused: the output would be the whole
    hull of both, mostly far from any input pixel (often a bbox in the wrong CRS or place)."""
    b = in_grid.bounds
    gap = 0.5 * min(abs(in_grid.transform.a), abs(in_grid.transform.e))  # less than half a pixel: touching
    if bbox[0] > b[2] + gap or bbox[2] < b[0] - gap or bbox[1] > b[3] + gap or bbox[3] < b[1] - gap:
        raise InvalidRequest(
            f"the bbox ({_coords(bbox)} in the input's CRS) does not touch "
            f"{display_name(request.input)}'s extent ({_coords(b)}): extend grows the "
            "layer, so give a --bbox that overlaps or adjoins it (check --crs and the coordinates' order)")


def extend_grid(request, in_grid: Grid) -> tuple[Grid, int, int]:
    """The output grid (the input's grown to cover the bbox) and the input's offset in it."""
    t = in_grid.transform
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise InvalidRequest(f"{request.input!r} is not on a north-up grid (rotated or flipped); warp it north-up "
                             "first (gdalwarp) and extend that")
    minx, miny, maxx, maxy = _bbox_in_input_crs(request, in_grid)
    _check_touches(request, in_grid, (minx, miny, maxx, maxy))
    inv = ~t
    c_a, r_a = inv * (minx, maxy)
    c_b, r_b = inv * (maxx, miny)
    c0 = min(0, math.floor(min(c_a, c_b) + EDGE_EPS_PX))
    r0 = min(0, math.floor(min(r_a, r_b) + EDGE_EPS_PX))
    c1 = max(in_grid.width, math.ceil(max(c_a, c_b) - EDGE_EPS_PX))
    r1 = max(in_grid.height, math.ceil(max(r_a, r_b) - EDGE_EPS_PX))
    width, height = c1 - c0, r1 - r0
    if (width, height) == (in_grid.width, in_grid.height):
        b = in_grid.bounds
        raise InvalidRequest(
            f"the bbox lies within {display_name(request.input)}'s extent ({_coords(b)} "
            "in its CRS): nothing to extend; give a --bbox that reaches beyond the layer")
    check_pixels(width, height, request.max_pixels,
                 "a smaller --bbox (or raise --max-pixels)")
    from .extent.grid import EXTENT_MAX_PIXELS

    check_pixels(width, height, EXTENT_MAX_PIXELS, "a smaller --bbox")
    out = Grid(in_grid.crs, t * Affine.translation(c0, r0), width, height)
    return out, -c0, -r0


def extend_layout(request, model_px: int) -> ExtendLayout:
    """The grid, the input's place in it, the windows over its latent canvas and which of them
    lie wholly inside the input (skipped)."""
    from ..geo.tiles import plan_tiles
    from .inpaint import _check_rgb_bands

    if model_px % LATENT_FACTOR:
        raise InvalidRequest(f"the model's window {model_px} px is not a multiple of {LATENT_FACTOR}")
    in_grid = grid_of(request.input)
    _check_rgb_bands(request.input, request.rgb_bands)
    out, col_off, row_off = extend_grid(request, in_grid)
    window = model_px // LATENT_FACTOR
    canvas_w = max(math.ceil(out.width / LATENT_FACTOR), window)
    canvas_h = max(math.ceil(out.height / LATENT_FACTOR), window)
    overlap = window_overlap(window)
    windows = plan_tiles(canvas_w, canvas_h, window, overlap, factor=LATENT_FACTOR)
    res = abs(in_grid.transform.a)
    extent = ExtentLayout(tuple(out.bounds), out.crs.to_wkt(), out.width, out.height, float(res), model_px,
                          tuple(windows), canvas_w, canvas_h, overlap)
    f = LATENT_FACTOR
    known = (math.ceil(row_off / f), (row_off + in_grid.height) // f,
             math.ceil(col_off / f), (col_off + in_grid.width) // f)
    open_sides = (known[0] > 0, known[1] < canvas_h, known[2] > 0, known[3] < canvas_w)
    partial = ExtendLayout(in_grid, out, col_off, row_off, extent, known, open_sides, frozenset())
    rows, cols = partial.cell_weights(0), partial.cell_weights(1)
    skipped = set()
    for k, w in enumerate(windows):
        r0, c0 = int(w.window.row_off), int(w.window.col_off)
        if rows[r0:r0 + window].min() >= 1.0 and cols[c0:c0 + window].min() >= 1.0:
            skipped.add(k)
    return ExtendLayout(in_grid, out, col_off, row_off, extent, known, open_sides, frozenset(skipped))


def layout(request, model_px: int) -> Layout:
    """The output grid and the windows (engine.tasks.LAYOUTS); the input's grid as ``in_grid``."""
    e = extend_layout(request, model_px)
    return Layout(e.out_grid, list(e.extent.windows), model_px, e.in_grid, window=e.input_window)


def check_sampler(request, scheduler_class: Optional[str]) -> None:
    """The known-region replacement needs DDIM (``auto`` is DDIM here)."""
    from ..schedulers import resolve_scheduler_name

    name = resolve_scheduler_name(request.scheduler, 1)  # auto -> ddim, as with --resample
    cls = scheduler_class if name == "default" else {"ddim": SAMPLER}.get(name, name)
    if cls is not None and cls != SAMPLER:
        raise InvalidRequest(f"extend puts the input back at every step, which needs the DDIM sampler: use "
                             f"--scheduler ddim (or auto), not {request.scheduler}")


def check_extend(request, path, model_px: int, located):
    """engine.tasks.check for extend: the layout, the sampler, the input opened and one pixel read."""
    from ..geo.assign import assigned_inputs
    from ..geo.sources import RGBSource
    from ..metadata import SatMetadata, ground_pixel_size
    from .checks import Checked, _model_notes
    from .common import date_of

    with assigned_inputs(request) as assigned:
        e = extend_layout(assigned, model_px)
        check_sampler(assigned, located.scheduler_class() if located is not None else None)
        SatMetadata(date=date_of(assigned.input, assigned.date), cloud_cover=assigned.cloud_cover)
        source = RGBSource(assigned.input, e.in_grid, assigned.rgb_bands)
        try:
            source.read(Window(0, 0, 1, 1))
        finally:
            source.close()
    grid = e.out_grid
    gsd = ground_pixel_size(grid.bounds, grid.crs.to_wkt(), grid.width, grid.height)
    name, notices = _model_notes(located)
    if request.scheduler == "auto":
        notices = (*notices, _AUTO_NOTE)
    plan = e.plan()
    return Checked(request, path, model_px, grid.width, grid.height, grid.crs.to_string(), tuple(grid.bounds),
                   plan["windows_run"], (gsd[0] * gsd[1]) ** 0.5, name, notices, extent=plan)


_AUTO_NOTE = ("extend samples with DDIM (the default sampler here: the input is put back at every step, which "
              "needs a stateless sampler, and the canvas stays on disk)")

# --------------------------------------------------------------------------------------------
# The known latents (torch from here on)
# --------------------------------------------------------------------------------------------


class _Known:
    """The known region of the canvas: its latents in a file, the soft mask, the replacement
    (the ``known=`` hook of engine.tasks.extent.canvas.streamed_denoise)."""

    def __init__(self, e: ExtendLayout, file, scheduler, seed: int) -> None:
        self.e, self.file, self.seed = e, file, seed
        self.rows, self.cols = e.cell_weights(0), e.cell_weights(1)
        timesteps = [int(t) for t in scheduler.timesteps]
        acp = scheduler.alphas_cumprod
        # the noise level of the canvas before step 0 and after each step i
        self.first = float(acp[timesteps[0]])
        # (after the last step: the known latents themselves)
        self.after = [float(acp[timesteps[i + 1]]) for i in range(len(timesteps) - 1)] + [1.0]

    def skip(self, k: int) -> bool:
        return k in self.e.skipped

    def _blend(self, y0: int, x: np.ndarray, level: float) -> np.ndarray:
        """``x`` (4, rows, width) canvas rows y0.. with the known region put back at ``level``
        (the cumulative alpha): ``m * noised(known) + (1 - m) * x``."""
        from .extent.joint import canvas_noise

        r0, r1, c0, c1 = self.e.known
        y1 = y0 + x.shape[1]
        a, b = max(y0, r0), min(y1, r1)
        if b <= a or c1 <= c0:
            return x
        e = self.e.extent
        known = self.file.read(a - r0, b - r0)  # (4, rows, kw)
        m = np.minimum(self.rows[a:b, None], self.cols[None, c0:c1])[None]
        if level < 1.0:
            noise = canvas_noise(self.seed, e.canvas_h, e.canvas_w, rows=slice(a, b))[0, :, :, c0:c1].numpy()
            known = math.sqrt(level) * known + math.sqrt(1.0 - level) * noise
        out = x.copy()
        part = out[:, a - y0:b - y0, c0:c1]
        out[:, a - y0:b - y0, c0:c1] = m * known + (1.0 - m) * part
        return out

    def start(self, y0: int, block: np.ndarray) -> np.ndarray:
        return self._blend(y0, block, self.first)

    def replace(self, y0: int, stepped, i: int):
        import torch

        x = stepped[0].numpy()
        return torch.from_numpy(self._blend(y0, x, self.after[i]).astype(np.float32))[None]


def encode_known(pipe, e: ExtendLayout, source, folder: Path, *, cancel=None):
    """The VAE latents of the input's whole latent cells, into a CanvasFile (known rows x known
    columns): encoded in tiles of the model's window, each keeping the core of its cells (a
    quarter-window of context on every side, within the input), so no tile edge shows."""
    import torch

    from .extent.canvas import CanvasFile

    r0, r1, c0, c1 = e.known
    kh, kw = max(0, r1 - r0), max(0, c1 - c0)
    file = CanvasFile(folder / "known.f32", max(1, kh), max(1, kw))
    if not kh or not kw:
        return file
    f = LATENT_FACTOR
    window = e.extent.window
    margin = e.extent.overlap
    core = max(1, window - 2 * margin)
    try:
        for y in range(r0, r1, core):
            ye = min(r1, y + core)
            band = np.zeros((4, ye - y, kw), np.float32)
            for x in range(c0, c1, core):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                xe = min(c1, x + core)
                # context: a margin of cells around the core, inside the known cells
                cy0, cy1 = max(r0, y - margin), min(r1, ye + margin)
                cx0, cx1 = max(c0, x - margin), min(c1, xe + margin)
                win = Window(cx0 * f - e.col_off, cy0 * f - e.row_off, (cx1 - cx0) * f, (cy1 - cy0) * f)
                image, valid = source.read(win)
                if not valid.all():  # nodata inside the input: the tile's mean (its pixels stay nodata)
                    fill = image[:, valid].mean(axis=1) if valid.any() else np.full(3, 0.5, np.float32)
                    image = np.where(valid[None], image, fill[:, None, None]).astype(np.float32)
                latents = pipe.encode_image(torch.from_numpy(np.ascontiguousarray(image))[None]).float().cpu()
                band[:, :, x - c0:xe - c0] = latents[0, :, y - cy0:ye - cy0, x - cx0:xe - cx0].numpy()
            file.write_rows(y - r0, band)
    except BaseException:
        file.close()
        Path(file.path).unlink(missing_ok=True)
        raise
    return file


# --------------------------------------------------------------------------------------------
# Decoding and compositing
# --------------------------------------------------------------------------------------------


class _Placed:
    """The input read onto the output grid (all bands, its dtype); outside it: zeros."""

    def __init__(self, src, e: ExtendLayout) -> None:
        self.src, self.e = src, e

    def read(self, window) -> np.ndarray:
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        out = np.zeros((self.src.count, h, w), dtype=self.src.dtypes[0])
        e = self.e
        a, b = max(r0, e.row_off), min(r0 + h, e.row_off + e.in_grid.height)
        c, d = max(c0, e.col_off), min(c0 + w, e.col_off + e.in_grid.width)
        if b > a and d > c:
            out[:, a - r0:b - r0, c - c0:d - c0] = self.src.read(
                window=Window(c - e.col_off, a - e.row_off, d - c, b - a))
        return out


class _NewPixels:
    """The "mask" of the compositing (engine.tasks.inpaint's): True outside the input."""

    def __init__(self, e: ExtendLayout) -> None:
        self.e = e

    def read(self, window) -> np.ndarray:
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        rows = np.arange(r0, r0 + h)
        cols = np.arange(c0, c0 + w)
        e = self.e
        inside_r = (rows >= e.row_off) & (rows < e.row_off + e.in_grid.height)
        inside_c = (cols >= e.col_off) & (cols < e.col_off + e.in_grid.width)
        return ~(inside_r[:, None] & inside_c[None, :])

    def on(self, target) -> np.ndarray:  # the other bands' fit: every input pixel is known
        return np.zeros(target.shape, bool)


class _Cropped:
    """What the canvas decode writes to: canvas-sized for the tile loop, cropped to the output,
    the new pixels within :data:`FEATHER_PX` of the input cross-faded from the input's edge
    pixels, then composited over the input (engine.tasks.inpaint._CompositeWriter)."""

    def __init__(self, composite, e: ExtendLayout, src, rgb_bands, canvas_w: int, canvas_h: int) -> None:
        self.composite, self.e, self.src, self.rgb = composite, e, src, list(rgb_bands)
        self.profile = {**composite.profile, "width": canvas_w, "height": canvas_h}
        self.width, self.height = e.out_grid.width, e.out_grid.height

    def write(self, data: np.ndarray, window=None) -> None:
        r0, c0 = int(window.row_off), int(window.col_off)
        h = min(int(window.height), self.height - r0)
        w = min(int(window.width), self.width - c0)
        if h <= 0 or w <= 0:
            return
        data = self._feather(np.ascontiguousarray(data[:, :h, :w]), r0, c0)
        self.composite.write(data, Window(c0, r0, w, h))

    def _feather(self, data: np.ndarray, r0: int, c0: int) -> np.ndarray:
        """The new pixels near the input: ``s * generated + (1 - s) * edge``, ``edge`` the input's
        nearest pixel (its border pixel, extended outward), ``s`` a smoothstep of the distance
        over FEATHER_PX: the decoder's version of the input's edge differs from the input by its
        reconstruction error, which would otherwise show as a step at the border."""
        e = self.e
        _, h, w = data.shape
        rows, cols = np.arange(r0, r0 + h), np.arange(c0, c0 + w)
        top, left = e.row_off, e.col_off
        bottom, right = top + e.in_grid.height - 1, left + e.in_grid.width - 1
        cr, cc = np.clip(rows, top, bottom), np.clip(cols, left, right)
        d = np.hypot((rows - cr)[:, None].astype(np.float64), (cols - cc)[None, :].astype(np.float64))
        near = (d > 0) & (d < FEATHER_PX)
        if not near.any():
            return data
        y0, x0 = int(cr.min()), int(cc.min())
        win = Window(x0 - left, y0 - top, int(cc.max()) - x0 + 1, int(cr.max()) - y0 + 1)
        block = self.src.read(self.rgb, window=win).astype(np.float64)
        valid = (self.src.read_masks(self.rgb, window=win) > 0).all(axis=0)
        edge = block[:, cr - y0][:, :, cc - x0]
        near &= valid[cr - y0][:, cc - x0]
        t = np.clip(d / FEATHER_PX, 0.0, 1.0)
        soft = t * t * (3.0 - 2.0 * t)
        mixed = soft * data.astype(np.float64) + (1.0 - soft) * edge
        dtype = data.dtype
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            mixed = np.clip(np.rint(mixed), info.min, info.max)
            nodata = self.src.nodata
            if nodata is not None and info.min <= nodata <= info.max:  # as the tile loop: no pixel becomes nodata
                mixed[mixed == nodata] += 1 if nodata < info.max else -1
        out = data.copy()
        out[:, near] = mixed[:, near].astype(dtype)
        return out


def decode_composite(pipe, canvas, e: ExtendLayout, writer, *, scale: float, offset: float, batch_size: int,
                     progress=None, cancel=None):
    """Decode the canvas in overlapping blended tiles (those wholly inside the input skipped: the
    input replaces them) through the engine's tile loop into ``writer`` (a _Cropped)."""
    import torch

    from ..geo.accumulate import batched, run_tiled
    from ..geo.tiles import plan_tiles
    from .extent.joint import _view

    x = e.extent
    size = x.window
    tiles = plan_tiles(x.canvas_w, x.canvas_h, size, max(1, size // 4), factor=LATENT_FACTOR)
    inside = e.input_window

    def covered(tile) -> bool:
        w = tile.out_window
        return (w.col_off >= inside.col_off and w.row_off >= inside.row_off
                and w.col_off + w.width <= inside.col_off + inside.width
                and w.row_off + w.height <= inside.row_off + inside.height)

    def read(tile) -> np.ndarray:
        r, c = _view(tile)
        return canvas.read(r.start, r.stop, c.start, c.stop)

    @batched
    def process(batch_tiles, arrays) -> list:
        if cancel is not None:
            cancel.raise_if_cancelled()
        out: list = [None] * len(arrays)
        todo = [i for i, t in enumerate(batch_tiles) if not covered(t)]
        px = size * LATENT_FACTOR
        for i, t in enumerate(batch_tiles):
            if covered(t):
                out[i] = np.zeros((3, px, px), np.float32)
        if todo:
            z = torch.from_numpy(np.stack([arrays[i] for i in todo])).to(pipe._execution_device)
            for i, image in zip(todo, pipe.decode(z).cpu().numpy()):
                out[i] = image
        return out

    # scratch: the open CogWriter's run folder (run_tiled's default while one is open)
    return run_tiled(read, process, writer, tiles, scale=scale, offset=offset, progress=progress, cancel=cancel,
                     batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def extend(request, out: Path, *, models, context=None, progress=None, cancel=None):
    """Extend the input to the bbox (module docstring); returns an Outcome."""
    from ..geo.cog import CogWriter
    from ..geo.run_folders import run_folder
    from ..geo.sources import RGBSource
    from ..models.resolution import request_resolution
    from ..parallel import RunContext
    from ..pipelines.inpaint import DiffusionSatInpaintPipeline
    from ..schedulers import make_scheduler
    from .common import Outcome, date_of, new_seed, whole_metadata
    from .extent.grid import windows_metadata
    from .extent.joint import denoise_to_file, joint_progress, window_batch
    from .inpaint import _CompositeWriter, _OtherBands
    from .sampling import bundle_for

    context = context or RunContext()
    if context.rank != 0:  # a split run (accelerate launch): one canvas, denoised by rank 0 alone
        grid = grid_of(request.input)
        return Outcome(grid=grid, seed=request.seed or 0, model="", metadata={})
    bundle, placement = bundle_for(models, request, context)
    model_px = request_resolution(bundle, request)
    e = extend_layout(request, model_px)
    check_sampler(request, type(bundle.scheduler).__name__)
    warnings = list(bundle.notices)
    if request.scheduler == "auto":
        # and the tags say so (sampler_note); the plan's notice too. Not a warning: every extend job
        # samples so, and the dock showed the note as a yellow warning on each one
        request = request.model_copy(update={"scheduler": "ddim"})
    seed = request.seed if request.seed is not None else new_seed()
    date = date_of(request.input, request.date)
    grid = e.out_grid
    centre = whole_metadata(grid, date, request.cloud_cover)
    per_window = windows_metadata(e.extent, date, request.cloud_cover)
    pipe = DiffusionSatInpaintPipeline.from_bundle(bundle)
    pipe.scheduler = make_scheduler(request.scheduler, bundle.scheduler)
    batch, batch_rule = window_batch(request, bundle, placement, e.extent.model_px, what="extend")

    source = RGBSource(request.input, e.in_grid, request.rgb_bands)
    src = source.src
    new = _NewPixels(e)
    others = _OtherBands(src, request.rgb_bands, new)
    warnings += [w.replace("its masked pixels", "its new pixels").replace("unmasked pixels", "input's pixels")
                 .replace("its in-painted pixels", "its new pixels").replace("In-painting", "Extend")
                 for w in others.warnings(list(src.descriptions), src.nodata)]
    tags = _tags(request, bundle, placement, seed, e, centre, batch, others)
    tags.update(input_provenance(src.tags(), bundle.name, seed))
    tags["batch_size_rule"] = batch_rule
    dtype = src.dtypes[0]
    scale = 255.0 if dtype == "uint8" else (source.hi - source.lo)
    offset = 0.0 if dtype == "uint8" else source.lo
    colorinterp = [c.name for c in src.colorinterp]
    if "palette" in colorinterp:
        colorinterp = []

    # progress: the denoising steps, then the decode as one more step (as generate --gsd)
    denoising, decoding = joint_progress(progress, request.steps)

    try:
        with run_folder(out.parent) as scratch:
            known_file = encode_known(pipe, e, source, scratch, cancel=cancel)
            try:
                known = _LazyKnown(e, known_file, pipe, seed)
                canvas = denoise_to_file(pipe, e.extent, scratch, prompt=request.prompt,
                                         metadata=per_window if bundle.uses_metadata else None, steps=request.steps,
                                         guidance=request.guidance, seed=seed, batch_size=batch,
                                         progress=denoising if progress else None, cancel=cancel, known=known)
            finally:
                known_file.close()
            try:
                with CogWriter(out, width=grid.width, height=grid.height, count=src.count, dtype=dtype,
                               crs=grid.crs, transform=grid.transform, tags=tags, nodata=src.nodata,
                               band_descriptions=[d or "" for d in src.descriptions],
                               colorinterp=colorinterp) as writer:
                    composite = _CompositeWriter(writer, _Placed(src, e), new, request.rgb_bands, others)
                    target = _Cropped(composite, e, src, request.rgb_bands, e.extent.canvas_w * LATENT_FACTOR,
                                      e.extent.canvas_h * LATENT_FACTOR)
                    decode_composite(pipe, canvas, e, target, scale=scale, offset=offset, batch_size=batch,
                                     progress=decoding if progress else None, cancel=cancel)
            finally:
                canvas.close()
    finally:
        source.close()
    warnings += centre.out_of_range_warnings("extend")
    return Outcome(grid=grid, seed=seed, model=bundle.name, metadata=centre.as_dict(), warnings=warnings)


class _LazyKnown:
    """:class:`_Known`, built on first use: the scheduler's timesteps are set by the denoising
    (engine.tasks.extent.joint.prepare_steps), after this hook is handed over."""

    def __init__(self, e, file, pipe, seed) -> None:
        self.e, self.file, self.pipe, self.seed = e, file, pipe, seed
        self._known: Optional[_Known] = None

    def _get(self) -> _Known:
        if self._known is None:
            self._known = _Known(self.e, self.file, self.pipe.scheduler, self.seed)
        return self._known

    def skip(self, k: int) -> bool:
        return k in self.e.skipped

    def start(self, y0, block):
        return self._get().start(y0, block)

    def replace(self, y0, stepped, i):
        return self._get().replace(y0, stepped, i)


def input_provenance(t: dict, model: str, seed: int) -> dict:
    """Tags for an input that is itself AI-generated (``synthetic=true``, e.g. an earlier extend's
    output): which of the output's pixels are synthetic is then more than "outside extended_from".
    ``original_extent`` carries the real pixels' bounds down a chain of extends."""
    if str(t.get("synthetic", "")).lower() != "true":
        return {}
    out = {"input_synthetic": "true",
           "input_provenance": f"{t.get('task', 'unknown task')} by {t.get('model', 'unknown model')}, "
                               f"seed {t.get('seed', 'unknown')}"}
    real = t.get("original_extent")
    if real is None and t.get("task") == "extend" and t.get("input_synthetic") != "true":
        real = t.get("extended_from")
    if real:
        out["original_extent"] = real
        out["synthetic_pixels"] = ("outside original_extent (the input was itself extended from there; its pixels "
                                   "are kept bit for bit)")
        where = "outside original_extent"
    else:
        out["synthetic_pixels"] = "all (the input is itself AI-generated; its pixels are kept bit for bit)"
        where = "all"
    out["TIFFTAG_IMAGEDESCRIPTION"] = (f"Extended by DiffusionSat {model} (seed {seed}) from an AI-generated "
                                       f"input: the pixels {where} are AI-generated (synthetic)")
    return out


def _tags(request, bundle, placement, seed, e: ExtendLayout, centre, batch, others) -> dict:
    """The output's tags: provenance, the input and where it lies, the joint layout, the other
    bands' fill, the whole output's metadata."""
    from .common import metadata_tags, provenance_tags
    from .inpaint import OTHER_BANDS_RULE as rule

    b = e.in_grid.bounds
    tags = {
        **provenance_tags("extend", bundle, placement, request, seed),
        "TIFFTAG_IMAGEDESCRIPTION": f"Extended by DiffusionSat {bundle.name} (seed {seed}): the pixels outside "
                                    "extended_from are AI-generated (synthetic)",
        "input": display_name(request.input),
        "extended_from": f"{b[0]!r},{b[1]!r},{b[2]!r},{b[3]!r}",
        "extended_from_window": f"{e.col_off},{e.row_off},{e.in_grid.width},{e.in_grid.height}",
        "synthetic_pixels": "outside extended_from only (the input's pixels are kept bit for bit)",
        "joint_denoising": "MultiDiffusion-style: overlapping windows blended at every step; the input's latents "
                           f"put back at every step (blended latent diffusion, a {FEATHER_CELLS}-cell soft edge)",
        "windows": len(e.extent.windows),
        "windows_skipped": len(e.skipped),
        "window_px": e.extent.model_px,
        "window_overlap_px": e.extent.overlap * LATENT_FACTOR,
        "batch_size": batch,
        "sampler_note": "DDIM: the known region's replacement needs a stateless sampler",
        **metadata_tags(centre),
    }
    tags["metadata_note"] = ("the whole output's centre; each window was conditioned on its own centre at the "
                             "input's GSD")
    if others.bands:
        tags.update(generated_bands=",".join(map(str, request.rgb_bands)),
                    other_bands=",".join(map(str, others.bands)), other_bands_rule=rule.replace("unmasked", "input's")
                    .replace("masked pixels", "new pixels"),
                    other_bands_r2=",".join("" if others.r2.get(k) is None else f"{others.r2[k]:.3f}"
                                            for k in others.bands))
    return tags


#: the task's runner (engine.tasks.RUNNERS): check, assigned inputs, then :func:`extend`
run = tiled_runner("extend", extend)
