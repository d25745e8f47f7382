"""Webdataset-style tar shards: reading (streaming, local paths or URLs) and writing.

A shard is a plain POSIX tar file. Members whose names share a *key* (the basename up to its
first dot, with the folder) form one sample, and the rest of the name is the field:
``000123.input.npy``, ``000123.metadata.json``, ``000123.output.cls`` -> sample ``000123`` with
fields ``input.npy``, ``metadata.json``, ``output.cls``. Members of one sample must be adjacent
(webdataset's rule; every writer, ours included, does that).

Why not the ``webdataset`` package: reading this layout takes ~100 lines on top of
:mod:`tarfile`, and a reader of our own gives a deterministic, resumable order (see
:mod:`training.datasets.stream`) without a dependency.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

import numpy as np

from engine.atomic import atomic_path
from engine.errors import InvalidRequest

__all__ = ["expand_braces", "shard_list", "open_shard", "iter_tar_samples", "decode_field", "ShardWriter"]

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALT = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` ranges (zero padding kept) and ``{a,b}`` alternatives, left to right
    as bash does."""
    matches = [m for m in (_BRACE.search(pattern), _ALT.search(pattern)) if m is not None]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())
    head, tail = pattern[: match.start()], pattern[match.end():]
    if match.re is _BRACE:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        start, stop = int(lo), int(hi)
        step = 1 if stop >= start else -1
        items = [str(n).zfill(width) for n in range(start, stop + step, step)]
    else:
        items = match.group(1).split(",")
    out: list[str] = []
    for item in items:
        out += expand_braces(head + item + tail)
    return out


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def shard_list(specs: Sequence[str]) -> list[str]:
    """Shard paths/URLs from ``--data`` values: brace patterns, .tar files, folders of .tar files.

    Local shards must exist (a missing one is named); URLs are checked when read.
    """
    shards: list[str] = []
    for spec in specs:
        for item in expand_braces(str(spec)):
            if is_url(item):
                shards.append(item)
                continue
            path = Path(item).expanduser()
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise InvalidRequest(f"the folder {item} holds no .tar shards")
                shards += found
            elif path.is_file():
                shards.append(str(path))
            else:
                raise InvalidRequest(f"shard {item} does not exist; check --data (brace ranges like "
                                     "shards/{000..099}.tar are expanded)")
    return shards


def open_shard(spec: str, retries: int = 3, timeout_s: float = 60.0) -> IO[bytes]:
    """A binary stream over a local shard or an http(s) URL (streamed, never saved to disk)."""
    if not is_url(spec):
        return open(spec, "rb")
    last: Optional[Exception] = None
    for attempt in range(retries):
        try:
            return urllib.request.urlopen(spec, timeout=timeout_s)  # noqa: S310 - user-given URL
        except OSError as err:  # network errors are often transient: back off and retry
            last = err
            time.sleep(2.0 ** attempt)
    raise InvalidRequest(f"cannot open shard {spec} ({last}); check the URL and the network")


def _split_name(name: str) -> tuple[str, str]:
    """``"dir/000123.input.npy"`` -> (``"dir/000123"``, ``"input.npy"``)."""
    folder, _, base = name.rpartition("/")
    key, dot, field = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{key}" if folder else key), field


def iter_tar_samples(spec: str) -> Iterator[dict[str, Any]]:
    """Stream a shard's samples as ``{"__key__": key, "__shard__": spec, field: bytes, ...}``.

    Only regular files are read; names starting with ``.`` or ``_`` (metadata of tools) are
    skipped. Fields are raw bytes; decode them with :func:`decode_field`.
    """
    try:
        with open_shard(spec) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            current: Optional[dict[str, Any]] = None
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rpartition("/")[2]
                if base.startswith((".", "_")):
                    continue
                key, field = _split_name(member.name)
                if not field:
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__shard__": spec}
                current[field] = data
            if current is not None:
                yield current
    except tarfile.ReadError as err:
        raise InvalidRequest(f"{spec} is not a readable tar shard ({err})") from None


def decode_field(field: str, data: bytes) -> Any:
    """Decode one field by its extension: .npy -> array, .json -> object, .cls/.txt -> str/int."""
    ext = field.rpartition(".")[2].lower()
    if ext == "npy":
        # allow_pickle=False: a shard from the internet must not run code
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext in ("cls", "cls2", "index"):
        text = data.decode("utf-8").strip()
        return int(text) if text.lstrip("-").isdigit() else text
    if ext in ("txt", "text"):
        return data.decode("utf-8")
    return data


def encode_field(field: str, value: Any) -> bytes:
    ext = field.rpartition(".")[2].lower()
    if ext == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return buf.getvalue()
    if ext == "json":
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


class ShardWriter:
    """Write samples into numbered shards ``<prefix>-000000.tar``, ``maxcount`` samples each.

    Each shard is written to a temporary file beside it (:func:`engine.atomic.atomic_path`) and
    renamed when complete, so a crash leaves only whole shards behind.
    """

    def __init__(self, folder: str | os.PathLike, maxcount: int = 1000, prefix: str = "shard"):
        if maxcount < 1:
            raise InvalidRequest(f"--shard-size must be at least 1, got {maxcount}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.maxcount = maxcount
        self.prefix = prefix
        self.shards: list[Path] = []
        self.count = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._publish: Optional[contextlib.ExitStack] = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._publish = contextlib.ExitStack()
        tmp = self._publish.enter_context(atomic_path(self.folder / name))
        self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
        self.shards.append(self.folder / name)
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._publish.close()  # fsync and rename into place

    def write(self, key: str, fields: dict[str, Any]) -> None:
        """Add one sample; ``key`` must not contain dots (the key ends at the first dot)."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self._in_shard >= self.maxcount:
            self._close()
            self._open()
        for field, value in fields.items():
            data = encode_field(field, value)
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mtime = 0  # reproducible shards: the same input gives the same bytes
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.count += 1

    def close(self) -> list[Path]:
        self._close()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tar = None
            self._publish.__exit__(exc_type, exc, tb)  # removes the temporary file
            self.shards.pop()
