"""The samplers as ``diffusers.DiffusionPipeline`` subclasses (use them from a notebook as any
diffusers pipeline: ``DiffusionSatPipeline.from_pretrained("tiny")``; see docs/models.md).

- :mod:`.base`: what they share (prompt, metadata, latents, the denoising loop, decode, cancel);
- :mod:`.rows`: the batch plumbing (one image's rows of a guided batch, noise row by row from one
  generator per tile, the cancel hooks between UNet blocks);
- :mod:`.text2img`: ``DiffusionSatPipeline``, text + metadata -> image;
- :mod:`.controlnet`: ``DiffusionSatControlNetPipeline`` with ``Control`` (super-resolution,
  temporal generation);
- :mod:`.inpaint`: ``DiffusionSatInpaintPipeline`` with ``Inpaint`` (optionally with the
  temporal ControlNet).

Samplers come from :func:`engine.schedulers.make_scheduler`.
"""
