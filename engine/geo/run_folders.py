"""The hidden run folders that hold all scratch of one write, beside its destination.

All scratch of one write (the temporary output, the tiled scratch GeoTIFF, the tiling
accumulator) lives in one hidden run folder beside the destination, ``.diffusionsat-run-<pid>-*``,
removed on every exit path; the process id in its name (and in its ``pid`` file) lets the next run
in the same folder remove the folders of runs that were killed (SIGKILL, power loss).
:func:`atomic_path` gives a write its temporary path in such a folder and renames it onto the
destination only when the write succeeded (:mod:`engine.geo.cog` writes every output through it).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..atomic import atomic_path as atomic_file
from ..atomic import disk_full, is_disk_full
from ..errors import RasterError

#: Hidden run folders beside outputs: ``.diffusionsat-run-<pid>-<random>``.
RUN_PREFIX = ".diffusionsat-run-"
_RUN_NAME = re.compile(r"^\.diffusionsat-run-(\d+)-")
_RUN_DIR: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("diffusionsat_run_dir", default=None)


def active_run_dir() -> Optional[Path]:
    """The run folder of the innermost write in progress in this thread, if any (tiling puts its
    accumulator there, so one folder holds all scratch of a run)."""
    return _RUN_DIR.get()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or unknown: keep its folder
    return True


def sweep_stale_runs(folder: str | os.PathLike) -> int:
    """Remove run folders in ``folder`` left by processes of this machine that are gone.

    The pid comes from the folder name (and the host from its ``pid`` file, so that a folder on a
    shared file system is only removed by the machine that made it). Returns how many were removed.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    host = socket.gethostname()
    for entry in entries:
        m = _RUN_NAME.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        try:
            owner = (Path(entry.path) / "pid").read_text().split()
        except (OSError, UnicodeDecodeError):
            owner = []
        if len(owner) >= 2 and owner[1] != host:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def run_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden run folder in ``folder`` (made after removing stale ones), removed on exit."""
    folder = Path(folder)
    sweep_stale_runs(folder)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(folder, None, "a scratch folder") from None
        raise RasterError(f"cannot create a scratch folder in {str(folder)!r} ({err.strerror}); choose "
                          "another --out") from None
    token = _RUN_DIR.set(path)
    try:
        try:
            (path / "pid").write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(folder, None, "a scratch folder") from None
            raise
        yield path
    finally:
        _RUN_DIR.reset(token)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tif") -> Iterator[Path]:
    """Yield a temporary path (in a hidden run folder in ``dest``'s folder); rename it onto
    ``dest`` if the block succeeds.

    The temporary path does not exist yet: whoever writes it creates it, with the user's umask.
    On any exception (including KeyboardInterrupt) the run folder is removed and ``dest`` is left
    as it was (absent, or the previous complete file).
    """
    dest = Path(dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise RasterError(
            f"output folder {str(folder)!r} does not exist; create it or choose another --out"
        )
    if not os.access(folder, os.W_OK):
        raise RasterError(f"output folder {str(folder)!r} is not writable; choose another --out")
    with run_folder(folder) as run, atomic_file(dest, suffix, tmp_dir=run) as tmp_path:
        yield tmp_path


