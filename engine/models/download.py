"""Downloading the released DiffusionSat checkpoints (Zenodo records) into the models folder.

``diffusionsat download diffusionsat-512`` asks Zenodo's records API for the record's files,
streams each one to a temporary file, checks its MD5 against the record, unpacks zips (refusing
entries that would land outside the target), and moves the finished folder into
``models_dirs()[0]/<name>`` in one rename: an interrupted download leaves nothing half-installed.
The installed folder gets ``diffusionsat.json`` naming the manifest entry it came from
(:mod:`engine.models.releases`), which fixes its resolution, tasks and ControlNet pairing.
``DIFFUSIONSAT_ZENODO_API`` points at a mirror (or, in tests, a local server with the same layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ..atomic import publish_folder
from ..errors import DiffusionSatError, InvalidRequest, ModelNotFound
from . import releases
from .registry import describe_folder, models_dirs

ZENODO_API = "https://zenodo.org/api/records"


#: name -> Release: the manifest's entries (engine/resources/releases.json), the one list of releases
RELEASES = releases.releases()


class DownloadError(DiffusionSatError):
    """The download failed or did not verify; nothing was installed."""


def _get(url: str, timeout: float = 60):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                                      timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code}; check the release name or try again later") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"cannot reach {url} ({getattr(err, 'reason', err)}); check the network "
                            "or download the zip yourself and unzip it into the models folder") from None


def _record_files(api: str, record: str) -> list[dict]:
    with _get(f"{api.rstrip('/')}/{record}") as resp:
        try:
            data = json.loads(resp.read().decode("utf-8"))
        except ValueError as err:
            raise DownloadError(f"the record {record} is not valid JSON ({err})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not files:
        raise DownloadError(f"the record {record} lists no files")
    return files


def _fetch(url: str, dest: Path, size: Optional[int], checksum: Optional[str],
           progress: Optional[Callable[[int, Optional[int]], None]]) -> None:
    algo, _, expected = (checksum or "").partition(":")
    digest = hashlib.new(algo) if expected and algo in hashlib.algorithms_available else None
    done = 0
    with _get(url, timeout=300) as resp, open(dest, "wb") as fh:
        while chunk := resp.read(1 << 20):
            fh.write(chunk)
            done += len(chunk)
            if digest is not None:
                digest.update(chunk)
            if progress is not None:
                progress(done, size)
    if size is not None and done != size:
        raise DownloadError(f"{url} ended after {done} of {size} bytes; try again")
    if digest is not None and digest.hexdigest() != expected:
        raise DownloadError(f"{url} does not match its {algo} checksum: the download is corrupt; try again")


def _safe_extract(archive: Path, target: Path) -> None:
    """Unzip ``archive`` into ``target``, refusing absolute paths and '..' (zip slip)."""
    root = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            path = (target / member.filename).resolve()
            if path != root and root not in path.parents:
                raise DownloadError(f"{archive.name} holds an entry outside its folder ({member.filename}); refused")
        zf.extractall(target)


def _single_root(folder: Path) -> Path:
    """The zips hold one top-level folder: install its contents, not the wrapper."""
    entries = [p for p in folder.iterdir() if p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def download_release(
    name: str,
    *,
    dest_dir: Optional[Path] = None,
    force: bool = False,
    api: Optional[str] = None,
    progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> Path:
    """Install release ``name`` (see :data:`RELEASES`) as ``<models folder>/<name>``; returns its path."""
    if name not in RELEASES:
        raise InvalidRequest(f"unknown release {name!r}; choose one of {', '.join(RELEASES)}")
    release = RELEASES[name]
    dest_dir = Path(dest_dir) if dest_dir else models_dirs()[0]
    dest = dest_dir / name
    if dest.exists() and not force:
        raise InvalidRequest(f"{dest} exists already; remove it or pass --force to replace it")
    api = api or os.environ.get("DIFFUSIONSAT_ZENODO_API") or ZENODO_API
    files = _record_files(api, release.record)
    dest_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=dest_dir))
    try:
        unpacked = work / "unpacked"
        unpacked.mkdir()
        for entry in files:
            key = str(entry.get("key") or entry.get("filename") or "")
            url = (entry.get("links") or {}).get("self") or (entry.get("links") or {}).get("content")
            if not key or not url or "/" in key or key.startswith("."):
                raise DownloadError(f"the record {release.record} lists a file without a usable name or link")
            target = work / key
            _fetch(url, target, entry.get("size"), entry.get("checksum"), progress)
            if key.lower().endswith(".zip"):
                _safe_extract(target, unpacked)
                target.unlink()
            else:
                shutil.move(str(target), unpacked / key)
        root = _single_root(unpacked)
        # what was installed, so that the folder is known by its entry, not by guesses from its configs
        releases.write_record(root, releases.download_record(release))
        if describe_folder(root) is None:
            raise ModelNotFound(f"release {name} was downloaded but holds no model the engine recognises; "
                                "nothing was installed (report this)")
        publish_folder(root, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
