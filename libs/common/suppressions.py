"""The suppression-list mirror in Redis, shared by its writer (reports) and its reader (ingest's accept path).

Each tenant has two sets:

- :func:`suppression_key` holds every suppressed address, whatever the reason: the addresses bulk mail must not
  reach (an unsubscribe stops marketing, and only marketing);
- :func:`suppression_key_for_every_class` holds the addresses no email of any class may reach: every suppressed
  address except those suppressed only because the recipient unsubscribed (hard bounces, complaints, manual
  suppressions). OTP codes and transactional mail check this one, so unsubscribing from a newsletter does not
  stop a password reset.

Which set a class checks is its ``ClassPolicy.honours_unsubscribes`` (:func:`suppression_key_for_class`).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from libs.common.message_classes import MessageClass

__all__ = [
    "normalise_email",
    "suppressed_among",
    "suppression_index_key",
    "suppression_key",
    "suppression_key_for_class",
    "suppression_key_for_every_class",
]


def normalise_email(email: str) -> str:
    """The form addresses are compared in: trimmed and lower-cased."""
    return email.strip().lower()


def suppression_key(namespace: str, tenant_id: str) -> str:
    """The Redis set holding every (normalised) address the tenant suppresses, whatever the reason, unsubscribes
    included: what bulk mail checks."""
    return f"{namespace}:supp:{tenant_id}"


def suppression_key_for_every_class(namespace: str, tenant_id: str) -> str:
    """The Redis set holding the (normalised) addresses suppressed for every class of email: all of the tenant's
    suppressions except those whose reason is ``unsubscribe``. What OTP and transactional mail check."""
    return f"{namespace}:supp-every-class:{tenant_id}"


def suppression_key_for_class(namespace: str, tenant_id: str, message_class: MessageClass) -> str:
    """The set an email of ``message_class`` is checked against (its policy's ``honours_unsubscribes``)."""
    if message_class.policy.honours_unsubscribes:
        return suppression_key(namespace, tenant_id)
    return suppression_key_for_every_class(namespace, tenant_id)


def suppression_index_key(namespace: str) -> str:
    """The Redis set naming every suppression set written, of both kinds (so a resync finds stale ones without
    scanning the keyspace of a Redis that other meshes share)."""
    return f"{namespace}:supp-index"


async def suppressed_among(redis: Redis, namespace: str, tenant_id: str, emails: Sequence[str],
                           message_class: MessageClass | None = None) -> set[str]:
    """The subset of ``emails`` (as given) that the tenant suppresses, in one round trip (``SMISMEMBER``): for
    ``message_class`` when given, else for any reason at all (on the list)."""
    if not emails:
        return set()
    key = (suppression_key(namespace, tenant_id) if message_class is None
           else suppression_key_for_class(namespace, tenant_id, message_class))
    flags = await redis.smismember(key, [normalise_email(e) for e in emails])
    return {email for email, flag in zip(emails, flags, strict=True) if flag}
