"""A dependency that is down, as the caller hears it: UNAVAILABLE with ``RetryInfo``, never INTERNAL.

A lost or refused connection to Redis, Postgres or S3 (the server restarting, a failover, a pool with no connection to
give) is not a bug and not the caller's fault: a client following gRPC's retry rules retries UNAVAILABLE after the
``RetryInfo`` delay, and gives up on INTERNAL. Domain code lets these errors propagate (it cannot do anything
better with them); :func:`dependency_unavailable` recognises them, so that the one place where errors become a
``google.rpc.Status`` (:mod:`libs.common.grpc_server`) answers every service's outages the same way.
"""

from __future__ import annotations

import botocore.exceptions
import psycopg
import redis.exceptions
from psycopg import errors as pg_errors

from libs.common.errors import Unavailable

__all__ = [
    "DEPENDENCY_RETRY_AFTER_S",
    "DEPENDENCY_UNAVAILABLE",
    "dependency_of",
    "dependency_unavailable",
]

DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
"""The ``ErrorInfo.reason`` of a call refused because a dependency is down; ``metadata["dependency"]`` names it."""
DEPENDENCY_RETRY_AFTER_S = 1.0
"""The ``RetryInfo`` delay: a restarted Redis or Postgres takes about a second to accept connections again, and
the pools reconnect on the next call (no connection is kept broken), so a client retrying after this is served
once the dependency is back."""

_S3_UNREACHABLE = (
    # boto3 (libs/common/s3.py), after its own retries: the connection refused or its timeout
    # (EndpointConnectionError, ConnectTimeoutError and the other ConnectionError subclasses), or the server gone
    # mid-request: the connection closed or reset, no answer within the read timeout, a response body cut short.
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
)
"""botocore's errors for an S3 that cannot be reached; an answer S3 gave (``ClientError``: access denied, no such
key) is not one of them."""


def dependency_of(exc: BaseException) -> str | None:
    """The dependency whose unavailability ``exc`` reports (``"redis"``, ``"postgres"``, ``"s3"``), or None when it
    reports something else. Only ``exc`` itself is looked at, not its causes."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        # ConnectionError covers refused and reset connections, an exhausted pool and a Redis still loading its data.
        return "redis"
    if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, pg_errors.TransactionRollback):
        # OperationalError: a connection refused, lost or closed, a pool timeout (psycopg_pool.PoolTimeout), the
        # server shutting down or starting up, out of connections. A serialization failure or a deadlock
        # (TransactionRollback) is a conflict between transactions, not an outage.
        return "postgres"
    if isinstance(exc, _S3_UNREACHABLE):
        return "s3"
    return None


def dependency_unavailable(exc: BaseException) -> Unavailable | None:
    """The UNAVAILABLE error (reason ``DEPENDENCY_UNAVAILABLE``, the dependency named in the metadata, RetryInfo of
    ``DEPENDENCY_RETRY_AFTER_S``) that ``exc`` stands for when it, or an error it was raised from (``raise ... from``),
    is a dependency being unavailable; None otherwise. An error merely raised while handling one (its
    ``__context__``) is not followed: that is a bug of its own, and stays INTERNAL."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        dependency = dependency_of(current)
        if dependency is not None:
            # The server's own words (host names, ports) stay in the log: the caller learns what, not where.
            return Unavailable(f"{dependency} is unavailable; retry shortly", reason=DEPENDENCY_UNAVAILABLE,
                               metadata={"dependency": dependency}, retry_after_s=DEPENDENCY_RETRY_AFTER_S)
        current = current.__cause__
    return None
