"""Training DiffusionSat models: datasets, the accelerate training loops, checkpoints, evaluation.

- :mod:`training.datasets`: webdataset shards in the reference layouts and GeoTIFF folders with
  metadata derived from georeferencing; deterministic, resumable batch streams; ``prepare``.
- :mod:`training.config`: :class:`~training.config.TrainConfig`, the options and recipe defaults.
- :mod:`training.trainer`: :func:`~training.trainer.train`, single-image and ControlNet loops.
- :mod:`training.checkpoints`: the run folder layout, atomic checkpoints, resuming.
- :mod:`training.evaluate`: :func:`~training.evaluate.evaluate` (SSIM, PSNR, FID, LPIPS).
- :mod:`training.cli`: the ``train``, ``evaluate`` and ``prepare`` commands.

This package imports :mod:`engine`; the engine never imports it: :mod:`training.cli` adds the
``train``, ``evaluate`` and ``prepare`` commands to ``diffusionsat`` through the
``diffusionsat.commands`` entry point. See ``docs/training.md``.
"""
