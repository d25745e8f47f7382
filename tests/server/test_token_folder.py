"""The token file's folder must not let other users swap the token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.server.errors import ServerConfigError
from engine.server.security import ensure_token_file

from .conftest import REPO


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_token_in_a_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ServerConfigError, match="chmod go-w"):
        ensure_token_file(shared / "token")  # not created there
    assert not (shared / "token").exists()
    os.chmod(shared, 0o770)
    (shared / "token").write_text("z" * 43 + "\n")
    os.chmod(shared / "token", 0o600)
    with pytest.raises(ServerConfigError, match="written by other users"):
        ensure_token_file(shared / "token")  # an existing token there is refused too
    os.chmod(shared, 0o755)
    assert ensure_token_file(shared / "token") == "z" * 43


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_token_file_that_is_a_link_is_refused(tmp_path):
    real = tmp_path / "real"
    real.write_text("w" * 43 + "\n")
    os.chmod(real, 0o600)
    (tmp_path / "token").symlink_to(real)
    with pytest.raises(ServerConfigError, match="symbolic link"):
        ensure_token_file(tmp_path / "token")


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_serve_refuses_a_shared_token_folder(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--token-file", str(shared / "token"),
                           "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "chmod go-w" in done.stderr
