"""The grid of a bbox at a ground resolution, and the joint-denoising windows over it (no torch).

The grid (:func:`extent_grid`): pixels are square on the ground, ``gsd`` metres on a side along
the bbox's mid-lines (the geodesic lengths :func:`engine.metadata.ground_pixel_size` measures, so
degrees are converted at the bbox's latitude, as the metadata's GSD is). Width and height are
rounded *up* to multiples of 8 (the VAE's factor: one latent cell is 8x8 px), so the grid covers
the whole bbox; the few extra pixels (fewer than 8 per axis) are split evenly on both sides, so the
grid is centred on the bbox. Its bbox (the output's) is therefore the requested one grown by less
than 4 px on each side.

The layout (:func:`extent_layout`): a latent canvas of the whole output (height/8 x width/8 cells),
grown to at least one window along each axis when the output is narrower than the model (the
extra cells are denoised but never decoded), covered by windows of the model's native latent size
(``engine.geo.tiles.plan_tiles`` in latent units, ``factor=8`` so ``out_window`` is in output px)
overlapping by a quarter of a window. Each window is conditioned on its own footprint
(:func:`window_metadata`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import InvalidRequest

#: Output px per latent cell (the VAE's downsampling factor).
LATENT_FACTOR = 8
#: Windows overlap by this fraction of their side (latent cells), a quarter: stride 3/4 of a window.
WINDOW_OVERLAP = 0.25
#: The largest --gsd extent: 32768 x 32768 px (the latent canvas is then 4096^2 x 4 floats, 256 MiB).
EXTENT_MAX_PIXELS = 32768 * 32768
#: Latent values (4 x the canvas's latent px) above which the default sampler (``auto``) is DDIM,
#: whose steps run band by band from files (memory flat in the extent), rather than DPM-Solver++,
#: whose multistep state is canvas-sized and lives in RAM (about 5 canvas copies): 8192² px output.
AUTO_IN_RAM_LATENTS = 4 * 1024 * 1024


def extent_sampler(scheduler: str, width: int, height: int, canvas_h: int, canvas_w: int,
                   limit: Optional[int] = None) -> tuple[str, Optional[str]]:
    """The sampler a joint run over a ``width`` x ``height`` px output uses for ``scheduler``, and
    the note the run prints (and ``--dry-run`` shows) when ``auto`` becomes DDIM for its size."""
    limit = AUTO_IN_RAM_LATENTS if limit is None else limit
    if scheduler == "auto" and 4 * canvas_h * canvas_w > limit:
        return "ddim", (f"{width}x{height} px is sampled with DDIM (the default sampler for extents this large: "
                        "its canvas stays on disk, memory flat in the extent); --scheduler dpm++ keeps "
                        "DPM-Solver++ with the canvas in RAM")
    return scheduler, None


def extent_grid(bbox: Any, crs: Any, gsd: float, multiple: int = LATENT_FACTOR
                ) -> tuple[tuple[float, float, float, float], int, int]:
    """``(grid_bbox, width, height)`` of ``bbox`` (in ``crs``) at ``gsd`` metres per pixel.

    ``width = multiple * ceil(ground width / gsd / multiple)`` (likewise ``height``): the grid
    covers the bbox and is centred on it (see the module docstring). Raises InvalidRequest for a
    bad bbox or CRS, or a grid that would leave the CRS's valid range.
    """
    from ...metadata import ground_pixel_size, parse_crs, validate_bbox

    if not (isinstance(gsd, (int, float)) and math.isfinite(gsd) and gsd > 0):
        raise InvalidRequest(f"gsd must be a positive number of metres per pixel, got {gsd!r}")
    minx, miny, maxx, maxy = validate_bbox(bbox, crs)
    ground_w, ground_h = ground_pixel_size((minx, miny, maxx, maxy), crs, 1, 1)
    if not (ground_w > 0 and ground_h > 0):
        raise InvalidRequest("the bbox has no extent on the ground; give a larger bbox")

    def side(ground: float) -> int:
        # a tolerance of 1e-6 px: a bbox exactly N*gsd wide is N px, not N+8 after rounding noise
        return max(multiple, multiple * math.ceil(ground / gsd / multiple - 1e-6))

    width, height = side(ground_w), side(ground_h)
    sx = (maxx - minx) * gsd / ground_w  # CRS units per px along x, y
    sy = (maxy - miny) * gsd / ground_h
    cx, cy = (minx + maxx) / 2.0, (miny + maxy) / 2.0
    grid_bbox = (cx - width * sx / 2.0, cy - height * sy / 2.0, cx + width * sx / 2.0, cy + height * sy / 2.0)
    if parse_crs(crs).is_geographic and (grid_bbox[0] < -180 or grid_bbox[2] > 180
                                         or grid_bbox[1] < -90 or grid_bbox[3] > 90):
        raise InvalidRequest(
            f"at {gsd:g} m/px the grid covering the bbox reaches outside -180..180 x -90..90 "
            "(it grows by up to 4 px per side to a multiple of 8 px); move the bbox off the edge")
    return grid_bbox, width, height


def is_joint(width: int, height: int, model_px: int) -> bool:
    """Whether a ``width`` x ``height`` px output needs joint denoising over windows (it is larger
    than the model's native ``model_px`` window along an axis); else one ordinary window."""
    return width > model_px or height > model_px


@dataclass(frozen=True)
class ExtentLayout:
    """The output grid and the joint-denoising windows of one ``generate --gsd`` job."""

    bbox: tuple[float, float, float, float]  #: the output grid's bbox (CRS units)
    crs: str
    width: int  #: output px
    height: int
    gsd: float  #: m/px asked for
    model_px: int  #: the model's native window, px
    windows: tuple  #: engine.geo.tiles.Tile in latent cells (out_* in output px), row-major
    canvas_w: int  #: latent canvas cells (>= one window per axis; >= width/8)
    canvas_h: int
    overlap: int  #: overlap of neighbouring windows, latent cells (:func:`window_overlap`)

    @property
    def latent_w(self) -> int:
        return self.width // LATENT_FACTOR

    @property
    def latent_h(self) -> int:
        return self.height // LATENT_FACTOR

    @property
    def window(self) -> int:
        """Window side, latent cells."""
        return self.model_px // LATENT_FACTOR

    def canvas_grid(self):
        """The :class:`engine.geo.grid.Grid` of the whole canvas in output px (the output grid,
        grown right and down where the canvas is wider than the output)."""
        from rasterio.crs import CRS
        from rasterio.transform import from_bounds

        from ...geo.grid import Grid

        transform = from_bounds(*self.bbox, self.width, self.height)
        return Grid(CRS.from_user_input(self.crs), transform, self.canvas_w * LATENT_FACTOR,
                    self.canvas_h * LATENT_FACTOR)

    def plan(self) -> dict:
        """What ``--dry-run`` shows of the layout."""
        return {"windows": len(self.windows), "window_px": self.model_px,
                "window_overlap_px": self.overlap * LATENT_FACTOR,
                "window_grid": [max(t.row for t in self.windows) + 1, max(t.col for t in self.windows) + 1],
                "latent_canvas": [self.canvas_h, self.canvas_w], "joint_denoising": True}


def window_overlap(window: int) -> int:
    """The overlap of windows of ``window`` latent cells: a quarter of a window (at least 1)."""
    return max(1, int(window * WINDOW_OVERLAP))


def extent_layout(bbox: Any, crs: str, gsd: float, model_px: int) -> ExtentLayout:
    """The grid of ``bbox`` at ``gsd`` and the windows of the ``model_px`` model over its canvas."""
    from ...geo.tiles import plan_tiles

    if model_px % LATENT_FACTOR:
        raise InvalidRequest(f"the model's window {model_px} px is not a multiple of {LATENT_FACTOR}")
    grid_bbox, width, height = extent_grid(bbox, crs, gsd)
    window = model_px // LATENT_FACTOR
    canvas_w, canvas_h = max(width // LATENT_FACTOR, window), max(height // LATENT_FACTOR, window)
    overlap = window_overlap(window)
    windows = plan_tiles(canvas_w, canvas_h, window, overlap, factor=LATENT_FACTOR)
    return ExtentLayout(grid_bbox, crs, width, height, float(gsd), model_px, tuple(windows), canvas_w, canvas_h,
                        overlap)


def window_metadata(layout: ExtentLayout, tile, date, cloud_cover, grid=None):
    """The metadata one window is conditioned on: its own footprint's centre, its GSD (the
    output's), the date and cloud cover (``engine.metadata.derive_from_bbox`` on the window)."""
    from ...metadata import derive_from_bbox

    grid = grid if grid is not None else layout.canvas_grid()
    bounds = grid.window_bounds(tile.out_window)
    return derive_from_bbox(bounds, grid.crs.to_wkt(), layout.model_px, layout.model_px,
                            date=date, cloud_cover=cloud_cover)


def windows_metadata(layout: ExtentLayout, date, cloud_cover) -> list:
    """:func:`window_metadata` of every window, vectorised (one transform for all windows, not
    the densified rings of ``derive_from_bbox``: thousands of windows in milliseconds). The centre
    is the window's centre point, the GSD the geometric mean of the geodesic lengths of its two
    mid-lines over its pixels; for a window a few hundred pixels wide this agrees with
    ``derive_from_bbox`` on its footprint to far below what the metadata's normalisation resolves
    (tests/engine/test_extent.py compares them)."""
    import numpy as np
    import pyproj

    from ...metadata import SatMetadata, _horizontal, _to_lonlat, parse_crs

    grid = layout.canvas_grid()
    t = grid.transform
    px = layout.model_px
    cols = np.array([float(w.out_window.col_off) for w in layout.windows])
    rows = np.array([float(w.out_window.row_off) for w in layout.windows])
    # centre, left-mid, right-mid, top-mid, bottom-mid of each window, in pixel coordinates
    offsets = [(0.5, 0.5), (0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0)]
    to_ll = _to_lonlat(_horizontal(parse_crs(layout.crs)))
    lon, lat = [], []
    for dc, dr in offsets:
        x, y = t * (cols + dc * px, rows + dr * px)
        lo, la = to_ll.transform(np.asarray(x), np.asarray(y))
        lon.append(np.asarray(lo, dtype=np.float64))
        lat.append(np.asarray(la, dtype=np.float64))
    geod = pyproj.Geod(ellps="WGS84")

    def length(a: int, b: int) -> np.ndarray:
        return np.asarray(geod.inv(lon[a], lat[a], lon[b], lat[b])[2], dtype=np.float64)

    gsd_x = (length(1, 0) + length(0, 2)) / px
    gsd_y = (length(3, 0) + length(0, 4)) / px
    gsd = np.sqrt(gsd_x * gsd_y)
    centre_lon = (lon[0] + 180.0) % 360.0 - 180.0
    return [SatMetadata(lon_deg=float(lo), lat_deg=float(la), gsd_m=float(g), cloud_cover=cloud_cover, date=date)
            for lo, la, g in zip(centre_lon, lat[0], gsd)]


def whole_metadata(layout: ExtentLayout, date, cloud_cover):
    """The metadata of the whole output (its centre and GSD), for its tags and the result."""
    from ...metadata import derive_from_bbox

    return derive_from_bbox(layout.bbox, layout.crs, layout.width, layout.height, date=date,
                            cloud_cover=cloud_cover)


def check_extent(width: int, height: int, limit: Optional[int] = EXTENT_MAX_PIXELS) -> None:
    """Refuse an extent over ``limit`` px (one line naming the fix)."""
    if limit is not None and width * height > limit:
        raise InvalidRequest(
            f"at this --gsd the output would be {width}x{height} px ({width * height / 1e6:.0f} Mpx), over the "
            f"limit of {limit / 1e6:.0f} Mpx; choose a coarser --gsd or a smaller --bbox")
