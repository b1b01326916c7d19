"""What the DKIM signing tests share: a real SMTP relay storing what it receives byte for byte, the signatures of
a received message, and dkimpy's verification of them with keys looked up in a real DNS server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import dkim as dkimpy
import dns.resolver

from dev.dns_server import AuthoritativeDns
from dev.smtp_sink import serve as serve_smtp_sink
from libs.common.domain_records import resolver_at
from tests.conftest import free_port

__all__ = ["received", "relay_at", "signature_tags", "verify_through_dns"]


@asynccontextmanager
async def relay_at(maildir: Path) -> AsyncIterator[str]:
    """``dev.smtp_sink`` (no TLS, no AUTH) storing into ``maildir`` while the context lasts: its ``host:port``."""
    port, stop = free_port(), asyncio.Event()
    server = asyncio.create_task(serve_smtp_sink("127.0.0.1", port, maildir, stop))
    try:
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            break
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        await server


def received(maildir: Path) -> bytes:
    """The one message the relay stored, without the envelope lines the sink puts before it."""
    (stored,) = sorted(maildir.glob("*.eml"))
    lines = stored.read_bytes().split(b"\r\n")
    while lines[0].startswith(b"X-Sink-"):
        lines.pop(0)
    return b"\r\n".join(lines)


def signature_tags(raw: bytes) -> list[dict[str, str]]:
    """The tags of each ``DKIM-Signature`` field of ``raw``, in order (whitespace removed from values)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(r"^DKIM-Signature:(.*?)(?=\r\n(?![ \t]))", head, re.M | re.S | re.I)
    return [{k.strip(): re.sub(r"\s+", "", v) for k, _, v in (t.partition("=") for t in f.split(";") if "=" in t)}
            for f in fields]


async def verify_through_dns(raw: bytes, server: AuthoritativeDns) -> list[bool]:
    """Whether each DKIM signature of ``raw`` verifies with dkimpy, its keys looked up in ``server``."""
    resolver = resolver_at(f"127.0.0.1:{server.port}")
    loop = asyncio.get_running_loop()

    async def lookup(name: str) -> bytes | None:
        try:
            answer = await resolver.resolve(name, "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        if answer.rrset is None:
            return None
        return b"".join(next(iter(answer.rrset)).strings)

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        # dkimpy asks synchronously from its thread; the resolver runs on the test's loop.
        return asyncio.run_coroutine_threadsafe(lookup(name.decode()), loop).result(timeout)

    def verify_each() -> list[bool]:
        verifier = dkimpy.DKIM(raw)
        return [bool(verifier.verify(idx=i, dnsfunc=txt)) for i in range(len(signature_tags(raw)))]

    return await asyncio.to_thread(verify_each)
