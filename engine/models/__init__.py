"""The networks and how a ``--model`` becomes loaded weights.

- Networks: :mod:`.unet` (``SatUNet``: the SD 2.1 UNet with metadata embeddings), :mod:`.controlnet`
  (the metadata ControlNet and ControlNet3D), :mod:`._config` (config keys added to a diffusers
  model subclass).
- Finding, without torch: :mod:`.registry` (what ``--model`` designates; installed models),
  :mod:`.configs` (config files and shipped resources), :mod:`.resolution` (native resolutions),
  :mod:`.releases` (the manifest of released checkpoints), :mod:`.hub` (``hf:`` ids).
- Loading: :mod:`.loading` (weights into a :class:`~engine.models.bundle.ModelBundle`, defined in
  :mod:`.bundle`), :mod:`.weights` (safetensors / ``weights_only`` reads), :mod:`.tiny` (the
  built-in tiny preset), :mod:`.cache` (models kept loaded per process).
- :mod:`.download`: ``diffusionsat download``.
"""
