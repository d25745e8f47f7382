"""engine.atomic: a destination holds the old complete file or the new one, never a half-written
one, and no temporary file outlives the write; a full disk is DiskFull."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from engine.atomic import (
    atomic_folder,
    atomic_path,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from engine.errors import DiskFull


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    dest = tmp_path / "state.json"
    write_json_atomic(dest, {"step": 1})
    write_json_atomic(dest, {"step": 2}, sort_keys=True)
    assert json.loads(dest.read_text()) == {"step": 2}
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert _names(tmp_path) == ["a.txt", "state.json"]


@pytest.mark.parametrize("crash", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_write_keeps_the_old_file_and_no_temporary(tmp_path, crash):
    dest = tmp_path / "out.tif"
    dest.write_bytes(b"old complete file")
    with pytest.raises(crash):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".tif" and not tmp.exists()
            with open(tmp, "wb") as fh:
                fh.write(b"half of the new")
            raise crash()
    assert dest.read_bytes() == b"old complete file"
    assert _names(tmp_path) == ["out.tif"]


def test_crash_before_anything_was_written_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.json"):
            raise RuntimeError("killed")
    assert _names(tmp_path) == []


def test_a_real_full_device_is_disk_full(tmp_path):
    """/dev/full answers every write with the kernel's own ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DiskFull, match="no space left in .* to write 'out.bin'"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            with open("/dev/full", "wb", buffering=0) as full:
                full.write(b"x" * 4096)
    assert dest.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_no_space_at_write_is_disk_full(tmp_path, monkeypatch, code):
    dest = tmp_path / "record.json"
    dest.write_text("{}\n")
    real_write = os.write

    def full_write(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    with pytest.raises(DiskFull, match="record.json"):
        with atomic_path(dest) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                monkeypatch.setattr(os, "write", full_write)
                os.write(fd, b'{"a": 1}\n')
            finally:
                monkeypatch.setattr(os, "write", real_write)
                os.close(fd)
    assert dest.read_text() == "{}\n"
    assert _names(tmp_path) == ["record.json"]


def test_no_space_at_fsync_is_disk_full(tmp_path, monkeypatch):
    """A file system that only reports a full disk when the data is flushed (NFS, quotas)."""
    dest = tmp_path / "training_state.json"
    dest.write_text('{"step": 1}\n')

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(DiskFull, match=r"training_state.json.*nothing was written"):
        write_json_atomic(dest, {"step": 2})
    monkeypatch.undo()
    assert json.loads(dest.read_text()) == {"step": 1}
    assert _names(tmp_path) == ["training_state.json"]


def test_other_errors_stay_what_they_are(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "x.txt"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert _names(tmp_path) == []


def test_exclusive_never_replaces_and_mode_is_kept(tmp_path):
    token = tmp_path / "token"
    write_text_atomic(token, "first\n", mode=0o600, exclusive=True)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_text_atomic(token, "second\n", mode=0o600, exclusive=True)
    assert token.read_text() == "first\n"
    assert _names(tmp_path) == ["token"]


def test_default_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_bytes_atomic(tmp_path / "out.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_folder_crash_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "unet"
    with atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as tmp:
            (tmp / "config.json").write_text("new, half")
            raise RuntimeError("killed")
    assert (dest / "config.json").read_text() == "old"
    assert _names(tmp_path) == ["unet"]
    with atomic_folder(dest) as tmp:
        (tmp / "weights.safetensors").write_text("new")
    assert _names(dest) == ["weights.safetensors"]
    assert _names(tmp_path) == ["unet"]
