"""Rasters on the ground: grids, readers, masks, tiles and the COG writer (rasterio, no torch).

- :mod:`.grid`: :class:`~engine.geo.grid.Grid` (CRS, transform, width, height), the one raster
  grid every module below takes and returns; :mod:`.windows`: pixel windows as callers give them.
- Reading: :mod:`.sources` (the tiled tasks' RGB, Sentinel-2 and mask sources, read by window),
  :mod:`.sentinel2` (products, .SAFE folders and band files onto one grid) with
  :mod:`.sentinel2_bands` (band table, levels, baselines, the model's radiometry), :mod:`.assign`
  (CRS, nodata and band names QGIS assigned an input), :mod:`.guard` (what the server will open),
  :mod:`.raster_metadata` (a raster's acquisition date and its 7 metadata fields).
- Masks: :mod:`.masks` (QA rasters, vectors, nodata; dilation, feathering) and :mod:`.mask_rules`
  (the ``--mask-rule`` grammar and presets).
- Tiling: :mod:`.tiles` (tile plans and blend weights, pure) and :mod:`.accumulate` (the on-disk
  accumulator and the tile loop); splitting a run over processes is :mod:`engine.parallel`.
- Writing: :mod:`.cog` (window-by-window Cloud-Optimized GeoTIFFs, atomic) with :mod:`.overviews`
  (their overviews averaged in one pass, the COG options), :mod:`.run_folders` (the hidden folder of
  a write's scratch) and :mod:`.stripes` (a split run's bands of output rows, written apart).
"""
