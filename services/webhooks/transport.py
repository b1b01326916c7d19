"""One HTTP attempt to a customer's endpoint, bounded in time and memory, to allowed addresses only.

httpcore rather than httpx: its network backend is the one place every connection is made, so the SSRF check runs
on the addresses actually connected to (the name is resolved here, each address checked, then connected by IP;
TLS still verifies the certificate against the host name). Redirects are never followed (httpcore does not), at
most ``excerpt_bytes`` of the response are read (a 50 MB body costs nothing), and the whole attempt is bounded
by one timeout (a receiver that never answers or never closes costs that, once). Each endpoint has a connection
pool of its own, as small as its lane: a pool looks over all of its connections whenever a request starts or ends,
so hundreds hanging on dead receivers would otherwise slow every request to a healthy one (even a shared origin's
endpoints get a pool each: a few connections more, never a quadratic scan).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore

from services.webhooks.destinations import DestinationPolicy, RefusedDestination

__all__ = ["AttemptResult", "WebhookTransport"]

USER_AGENT = b"esp-mesh-webhooks/1"
IDLE_POOL_S = 300.0


@dataclass(frozen=True)
class AttemptResult:
    """How one HTTP attempt ended."""

    status_code: int
    """0 when no response was received (see ``error``)."""
    latency_ms: int
    excerpt: bytes = b""
    error: str = ""
    retry_after: str = ""
    refused: bool = False
    """The destination is refused (SSRF rule): no connection was made."""
    unreachable: bool = False
    """No connection could be made or no answer came in time (not a transient hiccup on a reused connection)."""

    @property
    def success(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status_code < 300


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the policy allows, resolving names itself."""

    def __init__(self, policy: DestinationPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore)
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        addresses = await self._policy.check_host(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109 (httpcore)
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise RefusedDestination("unix sockets are not webhook destinations")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class WebhookTransport:
    """Sends webhook POSTs through one connection pool."""

    def __init__(self, policy: DestinationPolicy, *, timeout_s: float, max_connections: int,
                 excerpt_bytes: int = 1024, ssl_context: ssl.SSLContext | None = None) -> None:
        self._timeout_s = timeout_s
        self._excerpt_bytes = excerpt_bytes
        self._policy = policy
        self._max_connections = max_connections
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._backend = _CheckedBackend(policy)
        self._pools: dict[str, tuple[httpcore.AsyncConnectionPool, float]] = {}

    def _pool(self, key: str) -> httpcore.AsyncConnectionPool:
        """The pool of ``key`` (an endpoint), made on first use; pools unused for ``IDLE_POOL_S`` are dropped on the
        way."""
        now = time.monotonic()
        found = self._pools.get(key)
        if found is None:
            if len(self._pools) >= 256:
                self._close_idle(now)
            pool = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl_context, max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections, keepalive_expiry=30.0,
                network_backend=self._backend)
        else:
            pool = found[0]
        self._pools[key] = (pool, now)
        return pool

    def _close_idle(self, now: float) -> None:
        for key, (pool, used) in list(self._pools.items()):
            if now - used > IDLE_POOL_S and not pool.connections:
                del self._pools[key]

    async def post(self, url: str, headers: Sequence[tuple[str, str]], body: bytes, *,
                   pool_key: str = "") -> AttemptResult:
        """POST ``body`` to ``url`` through the connections of ``pool_key`` (the endpoint; default: the URL's
        origin); never raises for what the receiver or the network does."""
        started = time.monotonic()

        def elapsed() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            self._policy.check_url(url)
            async with asyncio.timeout(self._timeout_s):
                return await self._exchange(url, headers, body, elapsed, pool_key or _origin(url))
        except RefusedDestination as exc:
            return AttemptResult(0, elapsed(), error=f"refused destination: {exc}", refused=True, unreachable=True)
        except TimeoutError:
            return AttemptResult(0, elapsed(), error=f"timed out after {self._timeout_s:g}s", unreachable=True)
        except ssl.SSLError as exc:
            return AttemptResult(0, elapsed(), error=f"TLS: {exc}")
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            return AttemptResult(0, elapsed(), error=f"connection failed: {exc or type(exc).__name__}",
                                 unreachable=True)
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.TimeoutException, OSError) as exc:
            return AttemptResult(0, elapsed(), error=f"{type(exc).__name__}: {exc}")

    async def _exchange(self, url: str, headers: Sequence[tuple[str, str]], body: bytes,
                        elapsed: Any, pool_key: str) -> AttemptResult:
        timeouts = {"connect": self._timeout_s, "read": self._timeout_s, "write": self._timeout_s,
                    "pool": self._timeout_s}
        request_headers = [(b"content-type", b"application/json"), (b"user-agent", USER_AGENT),
                           *((k.encode(), v.encode()) for k, v in headers)]
        async with self._pool(pool_key).stream("POST", url, headers=request_headers, content=body,
                                     extensions={"timeout": timeouts}) as response:
            excerpt = bytearray()
            async for chunk in response.aiter_stream():
                excerpt += chunk
                if len(excerpt) >= self._excerpt_bytes:
                    break  # the rest is not read: closing the stream drops the connection
            retry_after = ""
            for name, value in response.headers:
                if name.lower() == b"retry-after":
                    retry_after = value.decode("latin-1")
            return AttemptResult(response.status, elapsed(), bytes(excerpt[:self._excerpt_bytes]),
                                 retry_after=retry_after)

    async def close(self) -> None:
        """Close every pooled connection."""
        pools = [pool for pool, _ in self._pools.values()]
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}"
