"""gRPC channels between services, and errors crossing them unchanged."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status

from libs.common.errors import EspError, Unavailable, error_from_parts, error_from_status

__all__ = [
    "BALANCING_OPTIONS",
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "balancing_options",
    "domain_errors",
    "open_channel",
    "to_domain_error",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest gRPC message a service of the mesh receives (``serve()``'s servers and these channels alike). The REST
gateway refuses larger unary bodies itself (413), since its upstream would refuse them anyway."""

BALANCING_OPTIONS = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
"""Calls spread over every address the target resolves to, one connection to each: the replicas an ``ipv4:`` list
names (the dev mesh), or the pods a headless Service's DNS name returns (Kubernetes). Behind a ``ClusterIP`` name
there is one address, so the policy changes nothing there and balancing is the service mesh's (per request) or
kube-proxy's (per connection). gRPC's default, ``pick_first``, would send every call to the first address.

Unlike ``pick_first``, which connects again only when a call comes, ``round_robin`` reconnects a lost address by
itself, waiting longer after each refusal (gRPC's default backoff grows to two minutes): a lone upstream that
restarted would be refused calls until the next attempt, long after it serves again. Attempts at most a second
apart bound that to a second; calls in it fail fast with UNAVAILABLE, as while the upstream was down."""

CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
)

_BALANCED_SCHEMES = ("ipv4:", "ipv6:", "dns:")


def balancing_options(addr: str) -> tuple[tuple[str, int | str], ...]:
    """``BALANCING_OPTIONS`` for a target that names its resolver — an ``ipv4:`` list of replicas (the dev mesh), or
    ``dns:///<headless Service>:<port>`` (Kubernetes) — and none for a plain ``host:port``: one address (a
    ``ClusterIP`` Service, a lone process) is served as well by gRPC's default ``pick_first``, which connects again
    the moment a call needs it, so a restarted upstream is used at once rather than after a reconnect attempt."""
    return BALANCING_OPTIONS if addr.startswith(_BALANCED_SCHEMES) else ()


def open_channel(addr: str) -> grpc.aio.Channel:
    """An insecure channel inside the mesh (mTLS is the service mesh's job in production), balancing round robin
    over every address ``addr`` resolves to when it names several (``balancing_options``)."""
    return grpc.aio.insecure_channel(addr, options=(*CHANNEL_OPTIONS, *balancing_options(addr)))


def to_domain_error(exc: grpc.aio.AioRpcError) -> EspError:
    """The domain error a failed call reports, with its details, so it can be re-raised to our own caller. When the
    details do not parse, or do not match the call's code and message (trailers cut on the way, a proxy that
    replaced the status), the call's own code and message are reported without them."""
    status = _status_of(exc)
    if status is not None:
        try:
            return error_from_status(status)
        except (DecodeError, ValueError, TypeError):
            log.warning("ignoring unreadable details of a %s status", exc.code().name, exc_info=True)
    # CANCELLED here was not our doing (had our caller cancelled, this code would not run): the upstream went away
    # with the call in flight, a replica shutting down, which passes like any other unavailability.
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"upstream unavailable: {exc.details()}", reason="UPSTREAM_UNAVAILABLE",
                           retry_after_s=1.0)
    return error_from_parts(exc.code().value[0], exc.details() or exc.code().name)


def _status_of(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` of the call's ``grpc-status-details-bin`` trailer; None when there is none, when it
    does not parse, or when its code or message differ from the call's (``rpc_status`` raises ValueError then)."""
    try:
        return rpc_status.from_call(exc)
    except (DecodeError, ValueError) as error:
        log.warning("ignoring the status details of a %s call: %s", exc.code().name, error)
        return None


@asynccontextmanager
async def domain_errors() -> AsyncIterator[None]:
    """Turn a failed RPC inside the block into the matching domain error."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise to_domain_error(exc) from exc
