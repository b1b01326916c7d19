"""Which campaigns are halted (paused or cancelled), as every sender replica sees them within a fraction of a second.

The campaigns service is the truth (its Postgres row); it mirrors each halt into one Redis hash, field = campaign
id, value = ``paused`` or ``cancelled``, and removes the field when the campaign resumes. Senders read the whole
hash every ``REFRESH_S`` (it holds only halted campaigns: small) and check an email's campaign against that
snapshot just before calling a provider, so a pause costs no round trip per email. A paused campaign's queued
emails are parked on the held stream (``Topology.held_subject``) and put back in their SEND stream on resume; a
cancelled campaign's are dropped with a final ``CANCELLED`` event, which releases their credit hold.
"""

from __future__ import annotations

from enum import StrEnum

from redis.asyncio import Redis

__all__ = ["HALTED_CAMPAIGNS_KEY", "REFRESH_S", "Halt", "clear_halt", "read_halts", "set_halt"]

HALTED_CAMPAIGNS_KEY = "esp:campaigns:halted"
"""The Redis hash of halted campaigns (campaign id → ``Halt`` value)."""

REFRESH_S = 0.2
"""How often a sender reads the hash: a pause reaches every replica within this, plus the provider calls already
under way (the 1 s promise of ``PauseCampaign``)."""


class Halt(StrEnum):
    """Why a campaign's queued emails must not be handed to a provider."""

    PAUSED = "paused"
    """Park them until the campaign resumes."""
    CANCELLED = "cancelled"
    """Drop them: final ``CANCELLED`` event, credits released."""


def _key(namespace: str) -> str:
    return f"{namespace}:{HALTED_CAMPAIGNS_KEY}" if namespace else HALTED_CAMPAIGNS_KEY


async def set_halt(redis: Redis, campaign_id: str, halt: Halt, *, namespace: str = "") -> None:
    """Halt ``campaign_id`` on every sender (within ``REFRESH_S``)."""
    await redis.hset(_key(namespace), campaign_id, halt.value)


async def clear_halt(redis: Redis, campaign_id: str, *, namespace: str = "") -> None:
    """Let ``campaign_id``'s emails go to providers again."""
    await redis.hdel(_key(namespace), campaign_id)


async def read_halts(redis: Redis, *, namespace: str = "") -> dict[str, Halt]:
    """Every halted campaign; unknown values (a newer writer) are read as paused, the safe side."""
    raw = await redis.hgetall(_key(namespace))
    halts: dict[str, Halt] = {}
    for campaign_id, value in raw.items():
        cid = campaign_id.decode() if isinstance(campaign_id, bytes) else str(campaign_id)
        text = value.decode() if isinstance(value, bytes) else str(value)
        halts[cid] = Halt(text) if text in Halt._value2member_map_ else Halt.PAUSED
    return halts
