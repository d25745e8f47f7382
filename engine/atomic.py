"""Atomic writes: a file or folder appears at its destination complete, or not at all.

Every output the engine and the trainer write (rasters, uploads, job records, downloaded models,
checkpoints, state and metrics files) goes through one of these:

* :func:`atomic_path` yields a temporary path beside the destination (same folder, so the final
  rename cannot cross file systems); when the block succeeds the file is flushed to disk
  (``fsync``) and renamed over the destination with :func:`os.replace`. On any exception,
  ``KeyboardInterrupt`` included, the temporary file is removed and the destination is left as it
  was: absent, or the previous complete file.
* :func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`write_json_atomic`: one call each.
* :func:`atomic_folder`: the same for a folder (a model component, a checkpoint).

A full disk or quota (``ENOSPC``, ``EDQUOT``, ``EFBIG``) becomes :class:`~engine.errors.DiskFull`
naming the folder and the space needed, with nothing left behind (:func:`disk_full`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import DiskFull

#: errno values that mean "no room": the disk, the user's quota, or the file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Marks every temporary name, so that a sweep (or a person) can tell scratch from results.
PARTIAL = ".partial"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{max(1, round(n / 1024))} KiB"


def disk_full(folder: Path, needed: Optional[int], what: str) -> DiskFull:
    """The :class:`DiskFull` error for ``folder``: the space needed and the space free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"about {_mib(needed)} needed" if needed else "more space needed"
    have = f", {_mib(free)} free" if free is not None else ""
    return DiskFull(f"no space left in {str(folder)!r} to write {what} ({need}{have}); free some space "
                    "or write to another folder (--out); nothing was written")


def is_disk_full(err: BaseException, folder: Optional[Path] = None, needed: Optional[int] = None) -> bool:
    """Whether ``err`` (an OSError or a GDAL error) comes from a full disk or quota."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    text = str(err).lower()
    if "no space left" in text or "disk full" in text or "quota exceeded" in text:
        return True
    if folder is not None and needed:  # GDAL often words a failed write differently
        try:
            return shutil.disk_usage(folder).free < needed
        except OSError:
            return False
    return False


def _folder_of(dest: Path) -> Path:
    return dest.parent if str(dest.parent) else Path(".")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; best effort (not every OS or file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: Optional[str] = None, *, tmp_dir: Optional[Path] = None,
                exclusive: bool = False, what: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path for ``dest``; rename it onto ``dest`` if the block succeeds.

    The temporary path, ``.<name>.<random>.partial<suffix>`` beside ``dest`` (or in ``tmp_dir``,
    which must be on the same file system), does not exist yet: whoever writes it creates it, with
    the user's umask. ``suffix`` defaults to ``dest``'s own (GDAL picks drivers by it). On success
    the file is published with :func:`publish_file`; on any exception it is removed and ``dest`` is
    left as it was. An ``OSError`` for a full disk, raised in the block or while publishing,
    becomes :class:`DiskFull` naming ``what`` (default: ``dest``'s name). ``exclusive``: never
    replace an existing ``dest`` (:class:`FileExistsError` instead, the temporary file removed).
    """
    dest = Path(dest)
    suffix = dest.suffix if suffix is None else suffix
    tmp = (tmp_dir or _folder_of(dest)) / f".{dest.stem}.{secrets.token_hex(4)}{PARTIAL}{suffix}"
    try:
        try:
            yield tmp
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(_folder_of(dest), None, what or repr(dest.name)) from None
            raise
        publish_file(tmp, dest, exclusive=exclusive, what=what)
    except BaseException:
        _remove(tmp)
        raise


def publish_file(tmp: str | os.PathLike, dest: str | os.PathLike, *, exclusive: bool = False,
                 what: Optional[str] = None) -> Path:
    """Flush the complete file ``tmp`` to disk and rename it onto ``dest`` (same file system).

    ``exclusive``: fail with :class:`FileExistsError` if ``dest`` exists (a hard link, then the
    temporary name is removed) instead of replacing it. A full disk becomes :class:`DiskFull`.
    Returns ``dest``.
    """
    tmp, dest = Path(tmp), Path(dest)
    folder = _folder_of(dest)
    try:
        if tmp.is_file():
            _fsync_file(tmp)
        if exclusive:
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: a check, then the rename
                if dest.exists():
                    raise FileExistsError(errno.EEXIST, "File exists", str(dest)) from None
                os.replace(tmp, dest)
            else:
                os.unlink(tmp)
        else:
            os.replace(tmp, dest)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(folder, None, what or repr(dest.name)) from None
        raise
    _fsync_folder(folder)
    return dest


def write_bytes_atomic(dest: str | os.PathLike, data: bytes, *, mode: Optional[int] = None,
                       exclusive: bool = False, what: Optional[str] = None) -> Path:
    """Write ``data`` to ``dest`` atomically (see :func:`atomic_path`); returns ``dest``.

    ``mode``: the new file's permissions (default 0o666 less the umask, as ``open`` gives);
    ``exclusive``: refuse to replace an existing ``dest`` (:class:`FileExistsError`).
    """
    dest = Path(dest)
    with atomic_path(dest, exclusive=exclusive, what=what) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return dest


def write_text_atomic(dest: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      mode: Optional[int] = None, exclusive: bool = False, what: Optional[str] = None) -> Path:
    """Write ``text`` to ``dest`` atomically (see :func:`write_bytes_atomic`); returns ``dest``."""
    return write_bytes_atomic(dest, text.encode(encoding), mode=mode, exclusive=exclusive, what=what)


def write_json_atomic(dest: str | os.PathLike, value: Any, *, indent: Optional[int] = 2,
                      sort_keys: bool = False, default: Any = None, what: Optional[str] = None) -> Path:
    """Write ``value`` as JSON (and a final newline) to ``dest`` atomically; returns ``dest``."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    return write_text_atomic(dest, text, what=what)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` in one rename.

    A crash while writing leaves ``dest`` untouched (the previous complete folder, or none). A
    previous ``dest`` is moved aside first and removed after the new one is in place. A full disk
    becomes :class:`DiskFull`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=PARTIAL, dir=dest.parent))
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(dest.parent, None, repr(dest.name)) from None
        raise
    try:
        yield tmp
        publish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Rename the complete folder ``src`` onto ``dest`` (same file system), replacing a previous
    ``dest``: that one is moved aside first and removed once the new one is in place, so at every
    moment ``dest`` is either the old complete folder or the new one. Returns ``dest``."""
    src, dest = Path(src), Path(dest)
    try:
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old" + PARTIAL, dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
            try:
                os.replace(src, dest)
            except BaseException:
                os.replace(old, dest)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dest)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(dest.parent, None, repr(dest.name)) from None
        raise
    _fsync_folder(dest.parent)
    return dest
