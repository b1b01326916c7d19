"""The ledger's way into Postgres: a connection pool, and one runner of transactions that retries the ones
Postgres aborted for a deadlock, a serialization failure or a racing insert of the same key."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

T = TypeVar("T")

RETRYABLE = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    # Two transactions inserting the same new hold id or outcome event id race on its primary key; the retry
    # finds the winner's row and answers from it.
    psycopg.errors.UniqueViolation,
)
"""Errors after which running the whole transaction again from the start is correct and likely to succeed."""


class Database:
    """The pool the ledger's operations run on (it belongs to the caller, who closes it): reads take a connection
    from ``pool``, changes go through :meth:`transaction`."""

    def __init__(self, pool: AsyncConnectionPool, max_transaction_attempts: int = 5) -> None:
        if max_transaction_attempts < 1:
            raise ValueError("max_transaction_attempts must be at least 1")
        self.pool = pool
        self.max_transaction_attempts = max_transaction_attempts

    async def transaction(self, work: Callable[[AsyncConnection], Awaitable[T]], *, pipeline: bool = False,
                          synchronous_commit: bool = True) -> T:
        """Run ``work`` in one transaction, again from the start when Postgres aborted it for a deadlock,
        serialization failure or a racing insert of the same key (bounded attempts).

        With ``pipeline``, statements whose results ``work`` does not fetch are sent without waiting, together
        with the commit; their errors surface when the pipeline syncs at the end, and abort the transaction.
        Without ``synchronous_commit`` the commit does not wait for the WAL flush (this transaction only).
        """
        attempts = self.max_transaction_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self.pool.connection() as conn:
                    async with conn.pipeline() if pipeline else contextlib.nullcontext(), conn.transaction():
                        if not synchronous_commit:
                            await conn.execute("SET LOCAL synchronous_commit = off")
                        result = await work(conn)
                    return result  # only now: in a pipeline, errors surface when the transaction block syncs
            except RETRYABLE:
                if attempt == attempts:
                    raise
                # Jitter so that two replicas that collided do not collide again in lockstep.
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
        raise AssertionError("unreachable")
