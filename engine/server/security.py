"""The bearer token: created once in a user-only file, compared in constant time.

Whoever can read the token file can use the engine (run jobs, read results, read files under
the allowed roots), so the file must be readable by its owner only; the server refuses to start
with a token that other users could have read.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Optional

from ..atomic import write_text_atomic
from ..errors import DiskFull
from .errors import Forbidden, ServerConfigError, Unauthorized

#: A shorter token is refused: it could be guessed by trying.
MIN_TOKEN_CHARS = 16


def _check_folder(folder: Path) -> None:
    """The token's folder must not be writable by others: whoever can write there can swap the
    file for their own token (or a link) and then use the engine, or read the real one later."""
    if os.name == "nt":
        return
    try:
        st = folder.stat()
    except OSError as err:
        raise ServerConfigError(f"cannot check the token folder {folder} ({err.strerror}); choose another "
                                "place with --token-file") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise ServerConfigError(
            f"the token file's folder {folder} can be written by other users (mode {mode:04o}); "
            f"run `chmod go-w {folder}` or choose a private folder with --token-file, and start again"
        )
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
        raise ServerConfigError(f"the token file's folder {folder} belongs to another user; choose a folder "
                                "of your own with --token-file")


def _check_private(path: Path) -> None:
    if os.name == "nt":  # POSIX modes do not describe Windows ACLs; the user profile is private
        return
    _check_folder(path.parent)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ServerConfigError(f"the token file {path} is a symbolic link; give the file itself with --token-file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ServerConfigError(
            f"the token file {path} can be read by other users (mode {mode:04o}); "
            f"run `chmod 600 {path}` (or delete it to get a new token) and start again"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ServerConfigError(f"the token file {path} belongs to another user; delete it or give your own "
                                "with --token-file")


def ensure_token_file(path: str | os.PathLike) -> str:
    """Return the token stored in ``path``, creating the file (mode 0600) on first use.

    A new file gets ``secrets.token_urlsafe(32)`` (256 random bits); missing parent folders are
    created with mode 0700. An existing file is reused, but refused when group- or
    world-readable, or when it holds no usable token.
    """
    path = Path(path).expanduser()
    if not path.exists():
        parent = path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.name != "nt":
            _check_folder(parent)
        token = secrets.token_urlsafe(32)
        try:
            # exclusive: two servers starting at once must not overwrite each other's token;
            # atomic: a crash while writing leaves no empty token file behind.
            write_text_atomic(path, token + "\n", mode=0o600, exclusive=True)
        except FileExistsError:
            return read_token_file(path)
        except (OSError, DiskFull) as err:
            reason = err.strerror if isinstance(err, OSError) else "no space left on its disk"
            raise ServerConfigError(f"cannot create the token file {path}: {reason}; "
                                    "choose another place with --token-file") from None
        return token
    return read_token_file(path)


def read_token_file(path: str | os.PathLike) -> str:
    """Read a token file, refusing files other users can read and files without a token."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ServerConfigError(f"the token file {path} is not a file; give a file path with --token-file")
    _check_private(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ServerConfigError(f"cannot read the token file {path} ({err}); fix it or delete it "
                                "to get a new token") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ServerConfigError(
            f"the token file {path} does not hold a usable token (one line of at least "
            f"{MIN_TOKEN_CHARS} characters); delete it to get a new one"
        )
    return token


def check_bearer(header: Optional[str], token: str) -> None:
    """Raise :class:`Unauthorized` (no token) or :class:`Forbidden` (wrong token) for a header."""
    if not header:
        raise Unauthorized(
            "this endpoint needs the engine's token: send 'Authorization: Bearer <token>' "
            "(the token is in the file `diffusionsat serve` printed as token_file)"
        )
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("the Authorization header must read 'Bearer <token>'")
    # compare_digest on bytes: the time taken does not reveal how much of the token matched.
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        raise Forbidden(
            "the token is not this engine's: copy it again from the engine's token file "
            "(a new token is made when the file is deleted)"
        )
