"""DiffusionSat engine: metadata-conditioned latent diffusion for satellite imagery.

This package knows nothing of Qt or QGIS. Heavy modules (torch, diffusers, rasterio) are imported
by the submodules that need them, so ``import engine`` stays cheap.
"""

__version__ = "0.1.0"
