"""An authoritative DNS server on loopback (NSD, from Debian's ``nsd`` package) serving zones a test writes.

Sending-domain verification reads TXT records through a real resolver path, so its tests run it against a real
server: :class:`AuthoritativeDns` starts ``nsd`` in the foreground on a free port (UDP and TCP), without dropping
privileges, with its state in a directory of its own; :meth:`AuthoritativeDns.publish` rewrites a zone and has the
server reload it (SIGHUP: NSD reads zone files whose modification time changed), and :meth:`answers` asks the
server directly until it serves the new serial. ``make test`` installs the package (``scripts/dns-tools.sh``).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from dev.mesh import Process, free_port, spawn

__all__ = ["AuthoritativeDns", "Record", "nsd_binary"]


@dataclass(frozen=True)
class Record:
    """One resource record of a zone: ``name`` relative to the zone ("@" for its apex)."""

    name: str
    type: str
    value: str

    def line(self) -> str:
        value = self.value
        if self.type == "TXT":
            # A TXT value longer than 255 bytes is several strings in one record (RFC 7208 3.3); quotes escaped.
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            value = " ".join(f'"{escaped[i:i + 255]}"' for i in range(0, max(len(escaped), 1), 255))
        return f"{self.name}\t300\tIN\t{self.type}\t{value}"


def nsd_binary() -> str:
    """The ``nsd`` binary; RuntimeError naming the package when it is not installed."""
    found = shutil.which("nsd") or ("/usr/sbin/nsd" if Path("/usr/sbin/nsd").exists() else None)
    if found is None:
        raise RuntimeError("NSD is not installed (make dns-tools; Debian package nsd)")
    return found


class AuthoritativeDns:
    """NSD serving ``zones`` on ``127.0.0.1:<port>``; each zone starts with its SOA and NS records only."""

    def __init__(self, directory: Path, zones: Sequence[str]) -> None:
        self.directory = directory
        self.zones = [zone.rstrip(".").lower() for zone in zones]
        self.port = free_port()
        self._serials = dict.fromkeys(self.zones, 1)
        self._process: Process | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it answers (UDP and TCP)."""
        return "127.0.0.1", self.port

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for zone in self.zones:
            self._write(zone, [])
        config = self.directory / "nsd.conf"
        zones = "".join(f'zone:\n  name: "{z}"\n  zonefile: "{self.directory / (z + ".zone")}"\n'
                        for z in self.zones)
        config.write_text(
            f'server:\n  ip-address: 127.0.0.1@{self.port}\n  username: ""\n  chroot: ""\n'
            f'  zonesdir: "{self.directory}"\n  pidfile: "{self.directory / "nsd.pid"}"\n'
            f'  xfrdfile: "{self.directory / "xfrd.state"}"\n  zonelistfile: "{self.directory / "zone.list"}"\n'
            f'  database: ""\n  server-count: 1\n  verbosity: 1\n  hide-version: yes\n'
            f'remote-control:\n  control-enable: no\n{zones}')
        self._process = spawn("nsd", [nsd_binary(), "-d", "-c", str(config)], self.directory)
        for zone in self.zones:
            self._wait_for_serial(zone, 1, timeout_s=30)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def __enter__(self) -> AuthoritativeDns:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def publish(self, zone: str, records: Sequence[Record]) -> None:
        """Serve ``records`` (and only them, besides SOA and NS) in ``zone`` from now on; returns once the
        server answers with the new zone."""
        zone = zone.rstrip(".").lower()
        self._serials[zone] += 1
        self._write(zone, records)
        assert self._process is not None, "start the server first"
        os.kill(self._process.popen.pid, signal.SIGHUP)
        self._wait_for_serial(zone, self._serials[zone], timeout_s=30)

    def _write(self, zone: str, records: Sequence[Record]) -> None:
        path = self.directory / f"{zone}.zone"
        lines = [f"$ORIGIN {zone}.", "$TTL 300",
                 f"@\tIN\tSOA\tns1.{zone}. hostmaster.{zone}. {self._serials[zone]} 3600 600 86400 300",
                 f"@\tIN\tNS\tns1.{zone}.", "ns1\tIN\tA\t127.0.0.1", *(r.line() for r in records)]
        previous = path.stat().st_mtime_ns if path.exists() else 0
        path.write_text("\n".join(lines) + "\n")
        # NSD reloads a zone whose file's mtime changed: make sure it did, even within one clock tick.
        now = max(time.time_ns(), previous + 1_000_000_000)
        os.utime(path, ns=(now, now))

    def _wait_for_serial(self, zone: str, serial: int, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen: object = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.popen.poll() is not None:
                raise RuntimeError(f"nsd exited:\n{self._process.log_tail()}")
            try:
                answer = dns.query.udp(dns.message.make_query(f"{zone}.", dns.rdatatype.SOA), self.address[0],
                                       port=self.port, timeout=1)
                seen = [rrset.to_text() for rrset in answer.answer]
                if any(rd.serial >= serial for rrset in answer.answer for rd in rrset
                       if rrset.rdtype == dns.rdatatype.SOA):
                    return
            except (OSError, dns.exception.Timeout) as exc:
                seen = exc
            time.sleep(0.05)
        log = self._process.log_tail() if self._process is not None else ""
        raise RuntimeError(f"nsd did not serve {zone} at serial {serial} within {timeout_s} s (last: {seen})\n{log}")
