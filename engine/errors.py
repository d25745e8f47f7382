"""The engine's exception hierarchy.

Every error a user can cause derives from :class:`DiffusionSatError` and carries a message that
names the problem and the fix. The CLI maps these to one line and exit code 2 (``engine/cli.py``);
the server maps them to 4xx JSON responses (the one table of statuses and codes is in
``engine/server/errors.py``: these classes know nothing of HTTP). Anything else is a bug in the engine.
"""

from __future__ import annotations


class DiffusionSatError(Exception):
    """Base class: an error the user can act on. ``str(err)`` is the whole message."""


class InvalidRequest(DiffusionSatError, ValueError):
    """A request field is out of range, malformed or inconsistent with another field."""


class InvalidMetadata(InvalidRequest):
    """A metadata value (longitude, latitude, GSD, cloud cover, date) is not usable."""


class ModelNotFound(DiffusionSatError, FileNotFoundError):
    """A model name, folder or hub id does not resolve to loadable weights."""


class ModelLoadError(DiffusionSatError):
    """Weights or configuration exist but cannot be loaded (corrupt, incompatible, partial)."""


class RasterError(DiffusionSatError):
    """An input raster cannot be read, or an output raster cannot be written."""


class DiskFull(RasterError):
    """No space left where an output, a scratch file or an upload is written. The message names the
    folder and the space needed. Nothing half-written is left behind."""


class InputRefused(DiffusionSatError):
    """An input the engine may not open here: outside the allowed folders, or a file that makes
    GDAL read other files (a VRT, a raw band, a GDAL network path). Nothing was read from it.
    ``path`` and ``roots`` name the file and the folders the engine may read."""

    def __init__(self, message: str, *, path: str = "", roots: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.roots = roots


class DeviceError(DiffusionSatError):
    """The requested device or precision is not available on this machine."""


class Cancelled(DiffusionSatError):
    """The user cancelled a running job. Not a failure: nothing is written."""
