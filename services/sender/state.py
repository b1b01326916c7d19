"""What the sender remembers about one email between deliveries, in Redis (shared by every sender replica).

Per email, one hash ``<ns>:msg:<id>``: the sent marker (provider and its message id — a redelivered email that
was already sent is announced again, never sent again), the providers that failed it (excluded from its next
attempt), its failure count (the retry budget) and its attempt count (event numbering). Next to it a short
lease ``<ns>:lease:<id>`` that one sender holds while working on the email, so two replicas never send the same
email at once even if JetStream redelivers it early. All reads for a batch of emails are one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis


@dataclass(frozen=True)
class SentMarker:
    """Proof that an email was handed to a provider."""

    provider: str
    provider_message_id: str
    ambiguous: bool = False

    def encode(self) -> str:
        """The hash field's value."""
        return f"{self.provider}|{self.provider_message_id}|{int(self.ambiguous)}"

    @classmethod
    def decode(cls, raw: str) -> SentMarker:
        """A marker from its field value."""
        parts = raw.split("|")
        if len(parts) < 3:  # written without the ambiguity flag
            return cls(parts[0], parts[1] if len(parts) > 1 else "")
        return cls(parts[0], "|".join(parts[1:-1]), parts[-1] == "1")


@dataclass
class MessageState:
    """One email's memory, as read at the start of a delivery and updated through it."""

    message_id: str
    leased: bool = True
    """False when another sender holds the email right now."""
    sent: SentMarker | None = None
    excluded: set[str] = field(default_factory=set)
    failures: int = 0
    attempts: int = 0


@dataclass(frozen=True)
class StateChange:
    """What a delivery learned about one email, written back in one round trip for the batch."""

    message_id: str
    sent: SentMarker | None = None
    excluded: frozenset[str] | None = None
    """The new excluded set (None: unchanged)."""
    failures: int | None = None
    attempts: int | None = None


class MessageStateStore:
    """Reads, writes and leases the per-email state."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *, ttl_s: int = 7 * 86400,
                 lease_s: float = 60.0) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.lease_ms = int(lease_s * 1000)

    def key(self, message_id: str) -> str:
        """The email's state hash."""
        return f"{self.namespace}:msg:{message_id}"

    def lease_key(self, message_id: str) -> str:
        """The email's work lease."""
        return f"{self.namespace}:lease:{message_id}"

    async def claim(self, message_ids: Sequence[str], owner: str) -> list[MessageState]:
        """Take the lease of each email (when free or already ours) and read its state."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in message_ids:
                pipe.set(self.lease_key(message_id), owner, nx=True, px=self.lease_ms)
                pipe.get(self.lease_key(message_id))
                pipe.hgetall(self.key(message_id))
            replies = await pipe.execute()
        states = []
        for i, message_id in enumerate(message_ids):
            taken, holder, fields = replies[3 * i: 3 * i + 3]
            state = MessageState(message_id, leased=bool(taken) or holder == owner.encode())
            values = {k.decode(): v.decode() for k, v in fields.items()}
            if "sent" in values:
                state.sent = SentMarker.decode(values["sent"])
            state.excluded = {p for p in values.get("excluded", "").split(",") if p}
            state.failures = int(values.get("failures", 0))
            state.attempts = int(values.get("attempts", 0))
            states.append(state)
        return states

    async def save(self, changes: Sequence[StateChange], released: Sequence[str], owner: str) -> None:
        """Write the changes and give back the leases of ``released`` emails, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for change in changes:
                values: dict[str, str | int] = {}
                if change.sent is not None:
                    values["sent"] = change.sent.encode()
                if change.excluded is not None:
                    values["excluded"] = ",".join(sorted(change.excluded))
                if change.failures is not None:
                    values["failures"] = change.failures
                if change.attempts is not None:
                    values["attempts"] = change.attempts
                if values:
                    pipe.hset(self.key(change.message_id), mapping=values)
                    pipe.expire(self.key(change.message_id), self.ttl_s)
            for message_id in released:
                # Only our own lease: after a long stall another sender may hold it by now.
                pipe.eval(_RELEASE_LEASE, 1, self.lease_key(message_id), owner)
            await pipe.execute()


_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
