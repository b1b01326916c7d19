"""The suppression-list mirror in Redis, shared by its writer (reports) and its reader (ingest's accept path)."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

__all__ = [
    "normalise_email",
    "suppressed_among",
    "suppression_index_key",
    "suppression_key",
]


def normalise_email(email: str) -> str:
    """The form addresses are compared in: trimmed and lower-cased."""
    return email.strip().lower()


def suppression_key(namespace: str, tenant_id: str) -> str:
    """The Redis set holding a tenant's suppressed (normalised) addresses."""
    return f"{namespace}:supp:{tenant_id}"


def suppression_index_key(namespace: str) -> str:
    """The Redis set naming every suppression set written (so a resync finds stale ones without scanning the
    keyspace of a Redis that other meshes share)."""
    return f"{namespace}:supp-index"


async def suppressed_among(redis: Redis, namespace: str, tenant_id: str, emails: Sequence[str]) -> set[str]:
    """The subset of ``emails`` (as given) that the tenant suppresses, in one round trip (``SMISMEMBER``)."""
    if not emails:
        return set()
    flags = await redis.smismember(suppression_key(namespace, tenant_id), [normalise_email(e) for e in emails])
    return {email for email, flag in zip(emails, flags, strict=True) if flag}
