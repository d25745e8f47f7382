"""Generate any extent at a chosen ground resolution (``generate --gsd``), seamlessly.

- :mod:`.grid` (no torch, used by the request checks and the plan): the output grid of a bbox at a
  GSD, and the layout of the joint-denoising windows over its latent canvas, with each window's
  own metadata.
- :mod:`.joint` (torch): MultiDiffusion-style joint denoising of one latent canvas (every step
  blends the windows' noise predictions with smooth weights, then takes one scheduler step on the
  whole canvas), the VAE decoded in overlapping blended tiles into the COG.
- :mod:`.canvas` (torch): the latent canvas in files, stepped band by band for a stateless
  scheduler (DDIM), so memory does not grow with the extent.
- :mod:`.spread` (numpy; joint.py imports it): ``--spread N`` over windows, the N joint runs one
  after another, their brightness accumulated (Welford) in a file the size of the output.

Importing this package stays light (pyproj and rasterio, no torch).
"""

from .grid import (
    EXTENT_MAX_PIXELS,
    ExtentLayout,
    extent_grid,
    extent_layout,
    is_joint,
    window_metadata,
)

__all__ = ["EXTENT_MAX_PIXELS", "ExtentLayout", "extent_grid", "extent_layout", "is_joint", "window_metadata"]
