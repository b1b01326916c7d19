"""The suppression-list mirror in Redis, shared by its writer (reports) and its readers (ingest's accept path,
campaign expansion, the senders' re-check).

Each tenant has two sets for its suppressions of every topic:

- :func:`suppression_key` holds every address suppressed for every topic, whatever the reason: the addresses bulk
  mail must not reach (an unsubscribe stops marketing, and only marketing);
- :func:`suppression_key_for_every_class` holds the addresses no email of any class may reach: every suppressed
  address except those suppressed only because the recipient unsubscribed (hard bounces, complaints, manual
  suppressions). OTP codes and transactional mail check this one, so unsubscribing from a newsletter does not
  stop a password reset.

and one set per topic it has topic-scoped suppressions of (:func:`suppression_key_for_topic`): the addresses that
left that topic (a list such as ``weekly-deals``) and nothing else. Bulk mail of a topic checks it beside
:func:`suppression_key`; mail of other topics, of no topic, and of classes that do not honour unsubscribes never
does.

Which sets an email checks is its class's ``ClassPolicy.honours_unsubscribes`` and its topic
(:func:`suppression_keys_for`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from redis.asyncio import Redis

from libs.common.message_classes import MessageClass

__all__ = [
    "MAX_TOPIC_LENGTH",
    "is_topic",
    "normalise_email",
    "normalise_topic",
    "suppressed_among",
    "suppression_index_key",
    "suppression_key",
    "suppression_key_for_class",
    "suppression_key_for_every_class",
    "suppression_key_for_topic",
    "suppression_keys_for",
]

MAX_TOPIC_LENGTH = 64
"""Longest topic name."""

_TOPIC = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_TOPIC_LENGTH - 1}}}")


def normalise_email(email: str) -> str:
    """The form addresses are compared in: trimmed and lower-cased."""
    return email.strip().lower()


def normalise_topic(topic: str) -> str:
    """The form topics are compared and stored in: trimmed and lower-cased."""
    return topic.strip().lower()


def is_topic(topic: str) -> bool:
    """Whether ``topic`` (normalised) can name a topic: 1-64 characters of ``a-z``, ``0-9``, ``.``, ``_`` and ``-``,
    starting with a letter or digit. So a topic never holds ``~``, ``@``, ``:`` or ``/``, and
    ``suppressions/{address}~{topic}`` and the Redis keys stay unambiguous."""
    return _TOPIC.fullmatch(topic) is not None


def suppression_key(namespace: str, tenant_id: str) -> str:
    """The Redis set holding every (normalised) address the tenant suppresses for every topic, whatever the reason,
    unsubscribes included: what bulk mail checks."""
    return f"{namespace}:supp:{tenant_id}"


def suppression_key_for_every_class(namespace: str, tenant_id: str) -> str:
    """The Redis set holding the (normalised) addresses suppressed for every class of email: all of the tenant's
    suppressions of every topic except those whose reason is ``unsubscribe``. What OTP and transactional mail
    check."""
    return f"{namespace}:supp-every-class:{tenant_id}"


def suppression_key_for_topic(namespace: str, tenant_id: str, topic: str) -> str:
    """The Redis set holding the (normalised) addresses the tenant suppresses for ``topic`` only: what bulk mail of
    that topic checks beside :func:`suppression_key`. The topic is normalised here."""
    return f"{namespace}:supp-topic:{tenant_id}:{normalise_topic(topic)}"


def suppression_key_for_class(namespace: str, tenant_id: str, message_class: MessageClass) -> str:
    """The set of suppressions of every topic an email of ``message_class`` is checked against (its policy's
    ``honours_unsubscribes``)."""
    if message_class.policy.honours_unsubscribes:
        return suppression_key(namespace, tenant_id)
    return suppression_key_for_every_class(namespace, tenant_id)


def suppression_keys_for(namespace: str, tenant_id: str, message_class: MessageClass | None,
                         topic: str = "") -> list[str]:
    """Every set an email is checked against: its class's set (:func:`suppression_key_for_class`; every suppressed
    address when ``message_class`` is None) and, when it has a topic and its class honours unsubscribes, the
    topic's set. A topic-scoped suppression so never stops OTP or transactional mail, nor mail of another topic."""
    if message_class is None:
        keys = [suppression_key(namespace, tenant_id)]
    else:
        keys = [suppression_key_for_class(namespace, tenant_id, message_class)]
    if normalise_topic(topic) and (message_class is None or message_class.policy.honours_unsubscribes):
        keys.append(suppression_key_for_topic(namespace, tenant_id, topic))
    return keys


def suppression_index_key(namespace: str) -> str:
    """The Redis set naming every suppression set written, of every kind (so a resync finds stale ones without
    scanning the keyspace of a Redis that other meshes share)."""
    return f"{namespace}:supp-index"


async def suppressed_among(redis: Redis, namespace: str, tenant_id: str, emails: Sequence[str],
                           message_class: MessageClass | None = None, topic: str = "") -> set[str]:
    """The subset of ``emails`` (as given) that the tenant suppresses, in one round trip: for ``message_class``
    when given, else for any reason (suppressed for every topic); and, when ``topic`` is given and the class
    honours unsubscribes (or none is given), for that topic too (:func:`suppression_keys_for`: one ``SMISMEMBER``
    per set, pipelined)."""
    if not emails:
        return set()
    normalised = [normalise_email(e) for e in emails]
    keys = suppression_keys_for(namespace, tenant_id, message_class, topic)
    if len(keys) == 1:
        replies = [await redis.smismember(keys[0], normalised)]
    else:
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.smismember(key, normalised)
            replies = await pipe.execute()
    return {email for email, *flags in zip(emails, *replies, strict=True) if any(flags)}
