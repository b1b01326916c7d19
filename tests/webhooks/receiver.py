"""A webhook receiver for tests: a real HTTP server (threads, stdlib) that records every request and answers as
each path is told to: a list of scripted answers consumed in order, then the default (200)."""

from __future__ import annotations

import http.server
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Answer:
    """How to answer one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay_s: float = 0.0
    endless_body: bool = False
    """Stream body bytes until the client goes away."""


@dataclass(frozen=True)
class Received:
    """One request as received."""

    path: str
    headers: dict[str, str]
    body: bytes
    time: float


class Receiver:
    """Records requests per path; ``script(path, answers)`` sets the answers of the next requests to ``path``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: dict[str, list[Received]] = defaultdict(list)
        self._scripts: dict[str, list[Answer]] = defaultdict(list)
        self._defaults: dict[str, Answer] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                answer = receiver._record(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                   body, time.monotonic()))
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    if answer.endless_body:
                        self.send_header("content-length", str(50 * 1024 * 1024))
                        self.end_headers()
                        chunk = b"x" * 65536
                        for _ in range(800):
                            self.wfile.write(chunk)
                        return
                    self.send_header("content-length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _record(self, request: Received) -> Answer:
        with self._lock:
            self._received[request.path].append(request)
            script = self._scripts[request.path]
            return script.pop(0) if script else self._defaults.get(request.path, Answer())

    def script(self, path: str, *answers: Answer, default: Answer | None = None) -> None:
        with self._lock:
            self._scripts[path].extend(answers)
            if default is not None:
                self._defaults[path] = default

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return list(self._received[path])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def running_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
