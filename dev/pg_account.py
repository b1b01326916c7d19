"""The account a dev PostgreSQL server runs as when we are root: PostgreSQL refuses to run as root.

It is ``postgres`` (``ESP_DEV_PG_ACCOUNT`` names another). When the machine has no such account (a fresh container,
where PostgreSQL came from the wheel rather than a package), it is created as a system account: no login shell, no
home, its own group, as the PostgreSQL packages create it, so that a package installed later takes the account over
(Debian's ``adduser --system`` leaves an existing system account alone). Not ``nobody``: that identity is shared by
every unprivileged daemon and NFS's unmapped users, and should own no files, while this one owns the data directory.

Not root: the server runs as ourselves and none of this applies.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

ACCOUNT_VARIABLE = "ESP_DEV_PG_ACCOUNT"
DEFAULT_ACCOUNT = "postgres"


def _system_tool(name: str) -> str:
    # PATH may lack the sbin directories (a non-login root shell, the clean-PATH test): look there too.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise RuntimeError(f"{name} not found: it is needed to run PostgreSQL as another account than root")
    return found


def postgres_account() -> str | None:
    """The account PostgreSQL runs as, created when missing; None when we are not root."""
    if os.geteuid() != 0:
        return None
    account = os.environ.get(ACCOUNT_VARIABLE) or DEFAULT_ACCOUNT
    if not _exists(account):
        result = subprocess.run([_system_tool("useradd"), "--system", "--user-group", "--no-create-home",
                                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                                 "--comment", "PostgreSQL administrator", account],
                                capture_output=True, text=True)
        if not _exists(account):  # a run beside us may have created it first: then useradd's failure is moot
            raise RuntimeError(f"could not create the {account} account PostgreSQL runs as under root "
                               f"(useradd exited with {result.returncode}: {result.stderr.strip()})")
    return account


def _exists(account: str) -> bool:
    try:
        pwd.getpwnam(account)
    except KeyError:
        return False
    return True


def run_as(account: str | None) -> list[str]:
    """The command prefix that runs a program as ``account`` (nothing when None)."""
    return [_system_tool("runuser"), "-u", account, "--"] if account is not None else []


def hand_over(data_dir: Path, account: str) -> None:
    """Give the new, empty ``data_dir`` to ``account`` (mode 0700, as initdb wants it) and check that the account
    can reach it: a directory under one closed to others (such as /root) cannot hold its data."""
    entry = pwd.getpwnam(account)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)
    reachable = subprocess.run([*run_as(account), _system_tool("test"), "-w", str(data_dir)], capture_output=True)
    if reachable.returncode != 0:
        raise RuntimeError(f"PostgreSQL runs as {account} (we are root) and that account cannot reach {data_dir}: "
                           f"a parent directory is closed to it. Put the data elsewhere (make run: ESP_DEV_DIR)")
