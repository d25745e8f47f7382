"""What a server may open: input confinement by what a file *is*, not by its name.

The server checks the path strings of a request against its ``--allowed-root`` folders, but a
path string says little about what GDAL will read: a VRT (also one named ``.tif``) reads other
files, possibly outside the roots or over HTTP (``/vsicurl/``); a raw raster band maps any file's
bytes to pixels; a symlink in a ``.SAFE`` folder points anywhere. So every raster and vector the
engine opens goes through this module, and while an :class:`InputPolicy` is active (the server
activates one around each job and each ``/v1/plan``; the CLI does not) it:

* refuses GDAL special names (``/vsicurl/``, ``/vsizip/``, ``HDF5:...``, URLs): only plain files;
* resolves the path (symlinks followed) and requires it inside the allowed roots;
* sniffs the file's first bytes *before* GDAL parses it: XML (a VRT, whatever its name) is
  refused unless the policy allows VRTs, and then only when every source it names passes these
  same checks (no raw bands, no derived bands running code, no network, no nesting past 4 deep);
* opens rasters with an allow-list of plain formats only (GeoTIFF, JPEG 2000, PNG, JPEG,
  GeoPackage; VRT only when allowed), so no indirection driver can take over;
* checks every file the opened dataset reads (``ds.files``: sidecars such as ``.ovr``/``.msk``)
  against the roots, and closes it unread when one lies outside;
* admits vector masks only as GeoPackage, shapefile, GeoJSON or FlatGeobuf (recognised by their
  bytes), with a shapefile's sidecars confined too.

A refusal is :class:`~engine.errors.InputRefused` (HTTP 403) naming the file and the roots. With
no policy active every function here is the plain rasterio/pyogrio call.

The module also holds the output-side rules (:func:`check_output`): an output that is one of the
run's inputs is refused, an existing output kept unless overwriting was asked for.

Over 500 lines on purpose: this is the one security boundary for inputs, and a reviewer should
find every check a path goes through in one file.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import InputRefused, InvalidRequest

#: Raster drivers a server input may be opened with (plain formats that read no other file).
RASTER_DRIVERS = ("GTiff", "JP2OpenJPEG", "PNG", "JPEG", "GPKG")
#: How deep VRTs may nest when ``allow_vrt`` is on.
MAX_VRT_DEPTH = 4
#: Files of a folder input inspected at most (a Sentinel-2 SAFE has a few hundred).
MAX_FOLDER_ENTRIES = 20000
#: Bytes sniffed to recognise a format.
_SNIFF = 4096
#: ``NAME:`` prefixes GDAL treats as a driver or a protocol (``HDF5:``, ``http:``, ``SENTINEL2_L1C:``);
#: one letter is a Windows drive.
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_+.-]+:")


@dataclass(frozen=True)
class InputPolicy:
    """What may be opened: files under ``roots`` (all files when empty), VRTs only if ``allow_vrt``.

    ``uploads`` is the server's uploads folder: always readable, and shown to clients as
    ``upload:<id>`` (see :func:`display_name`).
    """

    roots: tuple[Path, ...] = ()
    allow_vrt: bool = False
    uploads: Optional[Path] = None
    _resolved: tuple[Path, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        roots = [Path(r).expanduser().resolve() for r in self.roots]
        if roots and self.uploads is not None:
            roots.append(Path(self.uploads).expanduser().resolve())
        object.__setattr__(self, "_resolved", tuple(roots))

    @property
    def confined(self) -> bool:
        return bool(self._resolved)

    def describe_roots(self) -> str:
        return ", ".join(str(r) for r in self._resolved) or "any folder"

    def within(self, path: Path) -> bool:
        return not self._resolved or any(path == r or r in path.parents for r in self._resolved)


_POLICY: contextvars.ContextVar[Optional[InputPolicy]] = contextvars.ContextVar("diffusionsat_input_policy",
                                                                                default=None)


def active_policy() -> Optional[InputPolicy]:
    """The policy in force in this thread/context, or None (the CLI: everything is allowed)."""
    return _POLICY.get()


@contextlib.contextmanager
def enforce(policy: Optional[InputPolicy]) -> Iterator[None]:
    """Run the block with ``policy`` in force (None: no policy)."""
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


def run_confined(policy: Optional[InputPolicy], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``policy`` in force."""
    with enforce(policy):
        return fn(*args, **kwargs)


def confined_runner(runner: Optional[Callable[..., Any]], policy: InputPolicy) -> Callable[..., Any]:
    """A task runner (``engine.tasks.run_task`` when None) that runs every job under ``policy``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        fn = runner
        if fn is None:
            from ..tasks import run_task as fn
        return run_confined(policy, fn, *args, **kwargs)

    return run


# --------------------------------------------------------------------------------------------
# Checks


def _refuse(path: Any, why: str, policy: InputPolicy, fix: str = "") -> InputRefused:
    roots = policy.describe_roots()
    return InputRefused(
        f"{str(path)!r} {why} (this engine reads plain raster files under: {roots})"
        + (f"; {fix}" if fix else ""),
        path=str(path), roots=roots,
    )


def _plain_path(path: Any, policy: InputPolicy, what: str) -> Path:
    """``path`` resolved, refused if it is a GDAL special name or lies outside the roots."""
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if text.startswith("/vsi") or "://" in text or (_PREFIX.match(text) and not re.match(r"^[A-Za-z]:[\\/]", text)):
        raise _refuse(text, f"is a GDAL virtual file system or driver name, not a plain {what} file",
                      policy, "give the path of a file on the engine's machine, or upload it")
    resolved = Path(text).expanduser().resolve()
    if not policy.within(resolved):
        raise _refuse(text, f"resolves to {str(resolved)!r}, outside the folders this engine may read",
                      policy, "move the file into an allowed folder, upload it with POST /v1/uploads, "
                      "or start the engine with --allowed-root for its folder")
    return resolved


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(_SNIFF)
    except OSError:
        return b""  # missing or unreadable: the reader reports it as usual


def _is_xml(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<")


def _check_vrt(path: Path, head: bytes, policy: InputPolicy, depth: int, base: Path) -> None:
    """A VRT is admitted only when ``allow_vrt`` is on and all it names passes the same checks.

    ``base`` is the VRT's path with links followed, as GDAL takes it (it follows a linked VRT to
    its target before joining relative sources to the folder); sources are then resolved like
    any input.
    """
    if not policy.allow_vrt:
        raise _refuse(path, "is a VRT or another XML description that makes GDAL read other files",
                      policy, "give the raster files themselves (gdal_translate the VRT to a GeoTIFF), "
                      "or start the engine with --allow-vrt")
    if depth >= MAX_VRT_DEPTH:
        raise _refuse(path, f"nests VRTs more than {MAX_VRT_DEPTH} deep", policy)
    try:
        data = path.read_bytes()
        root = ET.fromstring(data)
    except (OSError, ET.ParseError) as err:
        raise _refuse(path, f"is XML that cannot be checked ({err})", policy) from None
    # GDAL reads VRT element and attribute names case-insensitively: so does this check.
    def attr(elem: ET.Element, name: str) -> Optional[str]:
        return next((v for k, v in elem.attrib.items() if k.lower() == name.lower()), None)

    if root.tag.lower() != "vrtdataset" or attr(root, "subClass"):
        raise _refuse(path, f"is a {attr(root, 'subClass') or root.tag} description, not a plain VRT of "
                      "raster sources", policy)
    lowered = data.lower()
    if b"/vsi" in lowered or b"://" in lowered:
        raise _refuse(path, "names a GDAL virtual file system or a URL", policy)
    for elem in root.iter():
        tag = elem.tag.lower() if isinstance(elem.tag, str) else ""
        sub = attr(elem, "subClass")
        if tag == "vrtrasterband" and (sub or "VRTSourcedRasterBand").lower() not in (
                "vrtsourcedrasterband", "vrtderivedrasterband"):
            raise _refuse(path, f"has a {sub} band (it maps a file's bytes to pixels)", policy)
        if tag in ("pixelfunctionlanguage", "pixelfunctioncode"):
            raise _refuse(path, "has a band computed by code", policy)
        if tag == "sourcedataset" or tag.endswith("filename"):
            name = (elem.text or "").strip()
            if not name:
                continue
            relative = (attr(elem, "relativeToVRT") or "0").strip() == "1"
            source = (base.parent / name) if relative and not os.path.isabs(name) else Path(name)
            try:
                checked = inspect_raster(source if not _PREFIX.match(name) else name, policy=policy,
                                         _depth=depth + 1)
                _check_vrt_source(checked, policy)
            except InputRefused as err:
                raise InputRefused(f"the VRT {str(path)!r} reads another file: {err}", path=str(path),
                                   roots=err.roots) from None


#: Formats a VRT's source may be (GDAL opens sources with any driver, so they are recognised by
#: their bytes; a GeoPackage may be a GDAL tile index reading other files, so it is not one).
_VRT_SOURCE_DRIVERS = ("GTiff", "JP2OpenJPEG", "PNG", "JPEG")


def _check_vrt_source(source: Optional[Path], policy: InputPolicy) -> None:
    """A VRT source that is not itself a (checked) VRT: a plain raster by its bytes whose side
    files, overview file and files pass as for an input, since GDAL opens it with any driver."""
    if source is None or not source.is_file():
        return  # missing: GDAL reports it when the VRT is read
    head = _head(source)
    if _is_xml(head):
        return  # a nested VRT, checked by inspect_raster already
    if _raster_driver(head) not in _VRT_SOURCE_DRIVERS:
        raise _refuse(source, "is not a GeoTIFF, JPEG 2000, PNG or JPEG file (a VRT's source is opened by "
                      "GDAL with any driver, e.g. a tile index reading other files)", policy)
    with enforce(policy), open_raster(source):
        pass


def inspect_raster(path: Any, *, policy: Optional[InputPolicy] = None, _depth: int = 0) -> Optional[Path]:
    """Check, without reading pixels, that ``path`` may be opened as a raster under the policy.

    Returns the resolved path (None when no policy is active). Raises :class:`InputRefused`.
    """
    policy = policy or active_policy()
    if policy is None:
        return None
    source = _trusted_source(path)
    if source is not None:  # the engine's own VRT over one input
        inspect_raster(source, policy=policy, _depth=_depth)
        return Path(os.fspath(path)).resolve()
    resolved = _plain_path(path, policy, "raster")
    if resolved.is_dir():
        raise _refuse(path, "is a folder, not a raster file", policy)
    head = _head(resolved)
    if _is_xml(head):
        _check_vrt(resolved, head, policy, _depth, resolved)
    return resolved


def _raster_driver(head: bytes) -> Optional[str]:
    """The one GDAL driver a file's first bytes call for, among :data:`RASTER_DRIVERS`."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "GTiff"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xffO\xffQ":
        return "JP2OpenJPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head.startswith(b"SQLite format 3\x00") and head[68:72] in (b"GPKG", b"GP10", b"GP11"):
        return "GPKG"
    return None


# VRTs the engine itself writes (engine.geo.assign: a CRS/nodata the file lacks, given by the
# client) -> the one input file each reads. They may be opened under any policy: their source is
# checked as an input instead, and they live in the run's own scratch folder.
_TRUSTED: dict[Path, Path] = {}
_TRUSTED_LOCK = threading.Lock()


@contextlib.contextmanager
def trusted_vrt(vrt: Any, source: Any) -> Iterator[None]:
    """While the block runs, ``vrt`` (written by the engine, reading only ``source``) may be opened
    under a policy; ``source`` is checked as an input whenever it is."""
    key = Path(os.fspath(vrt)).resolve()
    with _TRUSTED_LOCK:
        _TRUSTED[key] = Path(os.fspath(source))
    try:
        yield
    finally:
        with _TRUSTED_LOCK:
            _TRUSTED.pop(key, None)


def _trusted_source(path: Any) -> Optional[Path]:
    try:
        key = Path(os.fspath(path)).resolve()
    except (TypeError, OSError):
        return None
    with _TRUSTED_LOCK:
        return _TRUSTED.get(key)


def _check_files(ds: Any, path: Any, policy: InputPolicy, own: Optional[Path] = None) -> None:
    for name in ds.files or []:
        if str(name).startswith("/vsi") or "://" in str(name):
            raise _refuse(path, f"makes GDAL read {name!r}", policy)
        resolved = Path(name).resolve()
        if own is not None and resolved == own:
            continue  # the engine's own VRT (its source is checked)
        if not policy.within(resolved):
            raise _refuse(path, f"makes GDAL read {str(resolved)!r}, outside the folders this engine may read",
                          policy, "copy the files it needs into an allowed folder")


#: Files GDAL opens beside a raster by itself, with any driver (external overviews and masks).
_RASTER_SIDECARS = (".ovr", ".OVR", ".msk", ".MSK")


def _check_sidecar(sidecar: Path, path: Any, policy: InputPolicy, depth: int) -> None:
    """A file GDAL opens for ``path`` on its own (an overview or mask file): a plain GeoTIFF inside
    the roots, else refused before GDAL sees it (a VRT there would read other files or the network)."""
    try:
        resolved = _plain_path(sidecar, policy, "raster")
    except InputRefused as err:
        raise InputRefused(f"{str(path)!r} has a side file GDAL would open: {err}", path=str(path),
                           roots=err.roots) from None
    if _raster_driver(_head(resolved)) != "GTiff":
        raise _refuse(path, f"has a side file {str(sidecar)!r} that is not a GeoTIFF (GDAL would open it "
                      "with any driver, e.g. as a VRT reading other files)", policy,
                      "remove the side file or convert the raster with gdal_translate")
    _check_sidecars(resolved, path, policy, depth + 1)


def _check_sidecars(resolved: Path, path: Any, policy: InputPolicy, depth: int = 0) -> None:
    """The overview/mask files GDAL would open beside ``resolved``, checked before it opens them."""
    if depth >= MAX_VRT_DEPTH:
        raise _refuse(path, f"chains side files more than {MAX_VRT_DEPTH} deep", policy)
    for suffix in _RASTER_SIDECARS:
        sidecar = resolved.with_name(resolved.name + suffix)
        if sidecar.exists() or sidecar.is_symlink():
            _check_sidecar(sidecar, path, policy, depth)


def _check_overview_file(ds: Any, resolved: Path, path: Any, policy: InputPolicy) -> None:
    """GDAL opens the file named by the ``OVERVIEW_FILE`` item of the ``OVERVIEWS`` metadata domain
    (set in the GeoTIFF's own metadata tag or its ``.aux.xml``) with any driver, also a URL: it must
    pass as a side file before anything asks for the dataset's overviews or files."""
    try:
        name = (ds.tags(ns="OVERVIEWS") or {}).get("OVERVIEW_FILE")
    except Exception:  # noqa: BLE001 - a driver without the domain
        name = None
    if not name:
        return
    if name[:10].upper() == ":::BASE:::":
        name = str(resolved.parent / name[10:])
    _check_sidecar(Path(name) if not (name.startswith("/vsi") or "://" in name) else name, path, policy, 0)


def open_raster(path: Any, *args: Any, **kwargs: Any):
    """``rasterio.open(path, ...)`` for reading, confined by the active policy (if any).

    Under a policy the file is inspected first (:func:`inspect_raster`), opened with the allowed
    drivers only, and closed again when it would read a file outside the roots.
    """
    import rasterio

    policy = active_policy()
    if policy is None:
        return rasterio.open(path, *args, **kwargs)
    if args and args[0] != "r" or kwargs.get("mode", "r") != "r":
        raise InvalidRequest("open_raster opens rasters for reading only")
    source = _trusted_source(path)
    if source is not None:  # a VRT the engine wrote over one input: that input is what is checked
        inspect_raster(source, policy=policy)
        with open_raster(source):  # its side files and overview file too, as GDAL may open them via the VRT
            pass
        own = Path(os.fspath(path)).resolve()
        ds = rasterio.open(own, *args, driver="VRT", **{k: v for k, v in kwargs.items() if k != "driver"})
        try:
            _check_files(ds, source, policy, own=own)
        except BaseException:
            ds.close()
            raise
        return ds
    resolved = inspect_raster(path, policy=policy)
    head = _head(resolved)
    # GDAL is given exactly one driver, chosen from the file's bytes: no other driver (VRT, the
    # network or container ones) gets a chance to interpret the file.
    driver = "VRT" if _is_xml(head) else _raster_driver(head)
    if driver is None:
        raise rasterio.errors.RasterioIOError(
            f"{str(path)!r} is not a GeoTIFF, JPEG 2000, PNG, JPEG or GeoPackage raster (the raster formats "
            "this engine reads for a client); convert it with gdal_translate -of GTiff")
    kwargs["driver"] = driver
    _check_sidecars(resolved, path, policy)
    ds = rasterio.open(resolved, *args, **kwargs)
    try:
        _check_overview_file(ds, resolved, path, policy)
        _check_files(ds, path, policy)
    except BaseException:
        ds.close()
        raise
    return ds


def inspect_file(path: Any, *, what: str = "file") -> Path:
    """A file read by Python (metadata XML): inside the roots under a policy; resolved."""
    policy = active_policy()
    if policy is None:
        return Path(path)
    return _plain_path(path, policy, what)


# Vector masks ------------------------------------------------------------------------------

_SHAPEFILE_SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")


def _vector_kind(head: bytes) -> Optional[str]:
    if head.startswith(b"SQLite format 3\x00") and head[68:72] in (b"GPKG", b"GP10", b"GP11"):
        return "GeoPackage"
    if head[:4] == b"\x00\x00\x27\x0a":
        return "shapefile"
    if head[:3] == b"fgb":
        return "FlatGeobuf"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        return "GeoJSON"
    return None


#: A CRS URL GDAL parses itself, without fetching it.
_OGC_CRS_URL = "http://www.opengis.net/def/crs/"


def _check_json_crs(resolved: Path, path: Any, policy: InputPolicy) -> None:
    """A GeoJSON ``crs`` member of type ``link`` makes OGR fetch its ``href`` (and a ``name`` may be a
    URL or a file name for GDAL's CRS parser): only named CRSs (EPSG codes, URNs) are admitted."""
    import json

    try:
        stack = [json.loads(resolved.read_bytes())]
    except (OSError, ValueError, RecursionError) as err:
        raise _refuse(path, f"is JSON that cannot be checked ({str(err)[:80]})", policy) from None
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if str(key).lower() == "crs" and isinstance(value, dict):
                kind = str(value.get("type", "name")).lower()
                props = value.get("properties")
                texts = [str(v) for v in props.values()] if isinstance(props, dict) else []
                bad = [t for t in texts if ("://" in t and not t.startswith(_OGC_CRS_URL)) or "/vsi" in t.lower()
                       or t.startswith(("/", ".", "~")) or "\\" in t]
                if kind not in ("name", "epsg", "ogc") or bad:
                    raise _refuse(path, f"has a CRS of type {kind!r} ({(bad or texts or [''])[0][:80]!r}) that GDAL "
                                  "would fetch or read from elsewhere", policy,
                                  'name the CRS instead, e.g. "crs": {"type": "name", "properties": '
                                  '{"name": "EPSG:32618"}}, or leave it out for WGS 84')
            elif isinstance(value, (dict, list)):
                stack.append(value)


def inspect_vector(path: Any) -> Any:
    """The path to hand pyogrio for a vector mask, checked under the active policy.

    Under a policy only GeoPackage, shapefile, GeoJSON and FlatGeobuf files are read (recognised
    by their first bytes: an OGR VRT, a KML with network links or a database connection string is
    refused), and a shapefile's sidecars must lie inside the roots too.
    """
    policy = active_policy()
    if policy is None:
        return path
    resolved = _plain_path(path, policy, "vector")
    if resolved.is_dir():
        raise _refuse(path, "is a folder; give the vector file itself (.gpkg, .shp, .geojson, .fgb)", policy)
    kind = _vector_kind(_head(resolved))
    if kind is None:
        raise _refuse(path, "is not a GeoPackage, shapefile, GeoJSON or FlatGeobuf file (the vector formats "
                      "this engine reads for a client)", policy, "convert the mask with ogr2ogr -f GPKG")
    if kind == "GeoJSON":
        _check_json_crs(resolved, path, policy)
    if kind == "shapefile":
        # The sidecars are found next to the name given, as GDAL does.
        given = Path(os.fspath(path)).expanduser()
        for suffix in _SHAPEFILE_SIDECARS:
            for cand in (given.with_suffix(suffix), given.with_suffix(suffix.upper())):
                if cand.exists() or cand.is_symlink():
                    _plain_path(cand, policy, "vector")
    return str(resolved) if kind != "shapefile" else str(Path(os.fspath(path)).expanduser())


# Whole inputs (at submit time) ------------------------------------------------------------------


def inspect_input(path: Any, policy: InputPolicy) -> None:
    """Check one input of a request (a raster, a vector mask, or a folder such as a .SAFE).

    A folder is walked (links not followed): every member must resolve inside the roots and every
    XML-like member that GDAL could open as a raster (a ``.vrt``) passes the VRT rule. Files that
    turn out not to be readable at all are left to the task, which reports them as usual.
    """
    resolved = _plain_path(path, policy, "input")
    if resolved.is_dir():
        seen = 0
        for dirpath, dirnames, filenames in os.walk(resolved, followlinks=False):
            for name in dirnames + filenames:
                seen += 1
                if seen > MAX_FOLDER_ENTRIES:
                    raise _refuse(path, f"holds more than {MAX_FOLDER_ENTRIES} files", policy,
                                  "give the band files or a smaller folder")
                member = Path(dirpath) / name
                target = _plain_path(member, policy, "input")
                if name.lower().endswith(".vrt") and target.is_file():
                    inspect_raster(member, policy=policy)
        return
    head = _head(resolved)
    if _vector_kind(head) is not None and not head.startswith(b"SQLite"):
        with enforce(policy):
            inspect_vector(path)
        return
    inspect_raster(path, policy=policy)
    if not _is_xml(head) or policy.allow_vrt:
        import rasterio

        try:
            with enforce(policy), open_raster(path):
                pass
        except rasterio.errors.RasterioError:
            pass  # not a raster this engine opens; the task says so with its own message


def display_name(path: Any) -> str:
    """How a result's tags name an input: the path itself on the CLI; on a server the client's
    name for it (``upload:<id>`` for an upload, else the file's base name), never the server's
    folders."""
    if path is None:
        return ""
    text = str(path)
    policy = active_policy()
    if policy is None or text == "nodata":
        return text
    p = Path(text)
    if policy.uploads is not None:
        try:
            if p.resolve().parent == Path(policy.uploads).resolve():
                return f"upload:{p.stem}"
        except OSError:
            pass
    return p.name


def display_text(text: Any) -> str:
    """``text`` with every absolute path in it shown by :func:`display_name` (on a server: base
    names; e.g. a model's source, "UNet /srv/models/x/unet; vae /srv/models/x/vae")."""
    text = "" if text is None else str(text)
    if active_policy() is None:
        return text
    return re.sub(r"(?<![\w:])/[^\s;,]+", lambda m: display_name(m.group(0)), text)


# --------------------------------------------------------------------------------------------
# Outputs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _files_read(inp: Path, depth: int = 0) -> list[Path]:
    """The other files GDAL reads to open raster ``inp`` (a VRT's sources, nested VRTs'): an output
    must not be one of them either. Nothing for files GDAL cannot open as a raster (vectors)."""
    if depth > 4 or not inp.is_file():
        return []
    try:
        import rasterio
        from rasterio.errors import RasterioError

        with rasterio.Env(), rasterio.open(inp) as ds:
            names = list(ds.files or [])
    except (ImportError, RasterioError, OSError, ValueError, TypeError):
        return []
    found: list[Path] = []
    own = inp.resolve()
    for name in names:
        if str(name).startswith("/vsi") or "://" in str(name):
            continue
        path = Path(name)
        if path.resolve() == own:
            continue
        found.append(path)
        found += _files_read(path, depth + 1)
    return found


def check_output(out: Any, inputs: Sequence[Any] = (), *, overwrite: bool = True,
                 sidecars: Sequence[Any] = ()) -> None:
    """Refuse an output that would destroy an input, and (unless ``overwrite``) any existing file.

    ``out`` and its ``sidecars`` (e.g. the ``.spread.tif`` map) must not be, or resolve to, any of
    ``inputs`` (files, hard links, symlinks), nor lie inside an input folder (a .SAFE product).
    Raises :class:`InvalidRequest` naming the file, before any work is done.
    """
    targets = [Path(os.fspath(out)).expanduser()] + [Path(os.fspath(s)).expanduser() for s in sidecars]
    for target in targets:
        if target.is_dir():
            raise InvalidRequest(f"output {str(target)!r} is a folder; name a file in it, e.g. "
                                 f"{str(target / 'out.tif')!r}")
        resolved = target.resolve()
        for given in inputs:
            if given is None or str(given) == "nodata":
                continue
            inp = Path(os.fspath(given)).expanduser()
            if inp.is_dir():
                if inp.resolve() in resolved.parents:
                    raise InvalidRequest(f"the output {str(target)!r} lies inside the input folder {str(given)!r}; "
                                         "write it somewhere else (--out)")
                continue
            if resolved == inp.resolve() or (target.exists() and _same_file(target, inp)):
                raise InvalidRequest(f"the output {str(target)!r} is the input {str(given)!r}: it would be "
                                     "destroyed; give another --out")
            for source in _files_read(inp) if target.exists() or target.is_symlink() else []:
                if resolved == source.resolve() or _same_file(target, source):
                    raise InvalidRequest(f"the output {str(target)!r} is {str(source)!r}, a file the input "
                                         f"{str(given)!r} reads: it would be destroyed; give another --out")
        if not overwrite and (target.exists() or target.is_symlink()):
            raise InvalidRequest(f"the output {str(target)!r} already exists; give another --out, or "
                                 "--overwrite to replace it")


__all__ = [
    "InputPolicy",
    "RASTER_DRIVERS",
    "active_policy",
    "check_output",
    "confined_runner",
    "display_name",
    "display_text",
    "enforce",
    "inspect_file",
    "inspect_input",
    "inspect_raster",
    "inspect_vector",
    "open_raster",
    "run_confined",
]
