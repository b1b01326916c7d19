"""Which campaigns are halted (paused or cancelled), as every sender replica sees them within a fraction of a second.

The campaigns service is the truth (its Postgres row); it mirrors each halt into one Redis hash, field = campaign
id, value = ``paused`` or ``cancelled``, and removes the field when the campaign resumes. Senders read the whole
hash every ``REFRESH_S`` (it holds only halted campaigns: small) and check an email's campaign against that
snapshot just before calling a provider, so a pause costs no round trip per email. A paused campaign's queued
emails are parked on the held stream (``Topology.held_subject``) and put back in their SEND stream on resume; a
cancelled campaign's are dropped with a final ``CANCELLED`` event, which releases their credit hold.

Single messages are halted the same way (``CancelMessage``, once the message's SEND task is queued): ingest adds
the message id to one Redis sorted set, scored with the time the entry may be forgotten, and senders read the
live entries with the campaign hash in the same round trip, dropping those messages like a cancelled campaign's.
An entry lives as long as its message could still reach a sender (its class's useful life, after which the sender
fails it anyway), so the set holds only recent cancellations; each new one prunes the expired ones (a hash field
cannot expire on its own before Redis 7.4).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, NamedTuple

from redis.asyncio import Redis

__all__ = ["CANCELLED_MESSAGES_KEY", "HALTED_CAMPAIGNS_KEY", "REFRESH_S", "Halt", "HaltSnapshot", "cancel_message",
           "clear_halt", "read_halts", "read_snapshot", "set_halt"]

HALTED_CAMPAIGNS_KEY = "esp:campaigns:halted"
"""The Redis hash of halted campaigns (campaign id → ``Halt`` value)."""
CANCELLED_MESSAGES_KEY = "esp:messages:cancelled"
"""The Redis sorted set of cancelled messages (message id, scored with the Unix time it may be forgotten)."""

REFRESH_S = 0.2
"""How often a sender reads the hash: a pause reaches every replica within this, plus the provider calls already
under way (the 1 s promise of ``PauseCampaign``)."""


class Halt(StrEnum):
    """Why a campaign's queued emails must not be handed to a provider."""

    PAUSED = "paused"
    """Park them until the campaign resumes."""
    CANCELLED = "cancelled"
    """Drop them: final ``CANCELLED`` event, credits released."""


def _key(namespace: str, key: str = HALTED_CAMPAIGNS_KEY) -> str:
    return f"{namespace}:{key}" if namespace else key


async def set_halt(redis: Redis, campaign_id: str, halt: Halt, *, namespace: str = "") -> None:
    """Halt ``campaign_id`` on every sender (within ``REFRESH_S``)."""
    await redis.hset(_key(namespace), campaign_id, halt.value)


async def clear_halt(redis: Redis, campaign_id: str, *, namespace: str = "") -> None:
    """Let ``campaign_id``'s emails go to providers again."""
    await redis.hdel(_key(namespace), campaign_id)


async def read_halts(redis: Redis, *, namespace: str = "") -> dict[str, Halt]:
    """Every halted campaign; unknown values (a newer writer) are read as paused, the safe side."""
    return _halts(await redis.hgetall(_key(namespace)))


def _halts(raw: Mapping[Any, Any]) -> dict[str, Halt]:
    halts: dict[str, Halt] = {}
    for campaign_id, value in raw.items():
        cid = campaign_id.decode() if isinstance(campaign_id, bytes) else str(campaign_id)
        text = value.decode() if isinstance(value, bytes) else str(value)
        halts[cid] = Halt(text) if text in Halt._value2member_map_ else Halt.PAUSED
    return halts


class HaltSnapshot(NamedTuple):
    """Everything a sender must hold back, as read at one moment."""

    campaigns: dict[str, Halt]
    """Halted campaigns: campaign id → why."""
    messages: frozenset[str]
    """Cancelled messages (ids) whose entries are still live."""


async def cancel_message(redis: Redis, message_id: str, *, lifetime_s: float, namespace: str = "",
                         now: float | None = None) -> None:
    """Have every sender drop ``message_id`` (within ``REFRESH_S``) for the next ``lifetime_s``; forget the entries
    that expired (one atomic round trip)."""
    at = time.time() if now is None else now
    key = _key(namespace, CANCELLED_MESSAGES_KEY)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zadd(key, {message_id: at + lifetime_s})
        pipe.zremrangebyscore(key, "-inf", at)
        await pipe.execute()


async def read_snapshot(redis: Redis, *, namespace: str = "", now: float | None = None) -> HaltSnapshot:
    """The halted campaigns and the live cancelled messages, in one round trip."""
    at = time.time() if now is None else now
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(_key(namespace))
        pipe.zrangebyscore(_key(namespace, CANCELLED_MESSAGES_KEY), f"({at}", "+inf")
        campaigns, messages = await pipe.execute()
    return HaltSnapshot(_halts(campaigns),
                        frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in messages))
