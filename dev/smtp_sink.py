"""A local SMTP sink (dev/test only): accepts every message and stores it as an .eml file.

``python -m dev.smtp_sink --port 2525 --maildir .dev/mail``. Each message is written atomically as
``<n>.eml`` with the envelope in ``X-Sink-Mail-From``/``X-Sink-Rcpt-To`` headers prepended.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class MaildirHandler:
    """Writes each accepted message to the folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count(len(list(folder.glob("*.eml"))) + 1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        prefix = (f"X-Sink-Mail-From: {envelope.mail_from}\r\n"
                  f"X-Sink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n").encode()
        name = f"{next(self._seq):08d}-{os.getpid()}.eml"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(prefix + content)
        tmp.rename(self.folder / name)
        return "250 OK: queued as " + name


async def serve(host: str, port: int, folder: Path, stop: asyncio.Event) -> None:
    handler = MaildirHandler(folder)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(handler, hostname="sink.local", data_size_limit=200 * 1024 * 1024, decode_data=False,
                    enable_SMTPUTF8=True)

    server = await loop.create_server(factory, host=host, port=port)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--maildir", type=Path, default=Path(".dev/mail"))
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, args.maildir, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
