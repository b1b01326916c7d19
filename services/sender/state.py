"""What the sender remembers about one email between deliveries, in Redis (shared by every sender replica).

Per email, one hash ``<ns>:msg:<id>``: the sent marker (provider and its message id — a redelivered email that
was already sent is announced again, never sent again), the providers that failed it (excluded from its next
attempt), its failure count (the retry budget) and its attempt count (event numbering). Next to it a short
lease ``<ns>:lease:<id>`` that one sender holds while working on the email, so two replicas never send the same
email at once even if JetStream redelivers it early.

A delivery touches Redis twice for its whole batch: ``claim`` (take the leases, read the memories) and
``commit`` (write what changed, give the leases back), each one script call for up to ``SCRIPT_CHUNK`` emails.
A larger batch goes as several script calls pipelined together (one round trip after the client's check that the
script is loaded): Redis runs one script at a time and nothing else meanwhile, and a bulk batch of 255 in one
script held it for 2-3 ms, during which every OTP's admission, claim and placement waited behind it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

_REFUSED_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class SentMarker:
    """Proof that an email was handed to a provider, with the recipients it refused meanwhile (so a delivery that
    died before announcing them announces them again, as it does the SENT)."""

    provider: str
    provider_message_id: str
    ambiguous: bool = False
    refused: Mapping[str, str] = field(default_factory=dict)
    """Recipient → the provider's reason, for recipients refused while the others were taken."""

    def encode(self) -> str:
        """The hash field's value."""
        value = f"{self.provider}|{self.provider_message_id}|{int(self.ambiguous)}"
        if self.refused:
            value += _REFUSED_SEPARATOR + json.dumps(dict(self.refused), separators=(",", ":"))
        return value

    @classmethod
    def decode(cls, raw: str) -> SentMarker:
        """A marker from its field value."""
        raw, _, refused_json = raw.partition(_REFUSED_SEPARATOR)
        refused = {str(k): str(v) for k, v in json.loads(refused_json).items()} if refused_json else {}
        parts = raw.split("|")
        if len(parts) < 3:  # written without the ambiguity flag
            return cls(parts[0], parts[1] if len(parts) > 1 else "", refused=refused)
        return cls(parts[0], "|".join(parts[1:-1]), parts[-1] == "1", refused)


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
    """What a delivery learned about one email."""

    message_id: str
    sent: SentMarker | None = None
    excluded: frozenset[str] | None = None
    """The new excluded set (None: unchanged)."""
    failures: int | None = None
    attempts: int | None = None

    def fields(self) -> dict[str, str]:
        """The hash fields to write."""
        values: dict[str, str] = {}
        if self.sent is not None:
            values["sent"] = self.sent.encode()
        if self.excluded is not None:
            values["excluded"] = ",".join(sorted(self.excluded))
        if self.failures is not None:
            values["failures"] = str(self.failures)
        if self.attempts is not None:
            values["attempts"] = str(self.attempts)
        return values


# KEYS: lease, state for each email. ARGV: owner, lease_ms. Returns {leased (1/0), {field, value, ...}} per email.
_CLAIM = """
local out = {}
for i = 1, #KEYS, 2 do
  local leased = 1
  if not redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    if redis.call('GET', KEYS[i]) ~= ARGV[1] then leased = 0 end
  end
  out[#out + 1] = leased
  out[#out + 1] = redis.call('HGETALL', KEYS[i + 1])
end
return out
"""

# KEYS: lease, state for each email. ARGV: owner, ttl_s, then per email: release (1/0), n, n field/value pairs.
# Only our own lease is given back: after a long stall another sender may hold it by now.
_COMMIT = """
local a = 3
for i = 1, #KEYS, 2 do
  local release = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  if n > 0 then
    redis.call('HSET', KEYS[i + 1], unpack(ARGV, a, a + 2 * n - 1))
    redis.call('EXPIRE', KEYS[i + 1], ARGV[2])
    a = a + 2 * n
  end
  if release == '1' and redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return 1
"""


SCRIPT_CHUNK = 32
"""Emails per claim or commit script call: well under a millisecond of Redis's time each."""


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[start:start + SCRIPT_CHUNK] for start in range(0, len(items), SCRIPT_CHUNK)]


class MessageStateStore:
    """Reads, writes and leases the per-email state."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *, ttl_s: int = 7 * 86400,
                 lease_s: float = 60.0) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.lease_ms = int(lease_s * 1000)
        self._claim = redis.register_script(_CLAIM)
        self._commit = redis.register_script(_COMMIT)

    def key(self, message_id: str) -> str:
        """The email's state hash."""
        return f"{self.namespace}:msg:{message_id}"

    def lease_key(self, message_id: str) -> str:
        """The email's work lease."""
        return f"{self.namespace}:lease:{message_id}"

    def _keys(self, message_ids: Sequence[str]) -> list[str]:
        return [k for mid in message_ids for k in (self.lease_key(mid), self.key(mid))]

    async def claim(self, message_ids: Sequence[str], owner: str) -> list[MessageState]:
        """Take the lease of each email (when free or already ours) and read its state."""
        if not message_ids:
            return []
        args: list[str | int] = [owner, self.lease_ms]
        parts = await self._call_in_chunks(self._claim, message_ids, lambda _chunk: args)
        reply = [item for part in parts for item in part]
        states = []
        for i, message_id in enumerate(message_ids):
            leased, flat = reply[2 * i], reply[2 * i + 1]
            values = {flat[j].decode(): flat[j + 1].decode() for j in range(0, len(flat), 2)}
            state = MessageState(message_id, leased=bool(leased))
            if "sent" in values:
                state.sent = SentMarker.decode(values["sent"])
            state.excluded = {p for p in values.get("excluded", "").split(",") if p}
            state.failures = int(values.get("failures", 0))
            state.attempts = int(values.get("attempts", 0))
            states.append(state)
        return states

    async def commit(self, changes: Sequence[StateChange], released: Sequence[str], owner: str) -> None:
        """Write the changes and give back the leases of ``released`` emails, in one script call."""
        by_id = {c.message_id: c for c in changes}
        ids = list(dict.fromkeys([*by_id, *released]))
        if not ids:
            return
        let_go = set(released)

        def arguments(chunk: Sequence[str]) -> list[str | int]:
            args: list[str | int] = [owner, self.ttl_s]
            for message_id in chunk:
                change = by_id.get(message_id)
                values = change.fields() if change is not None else {}
                args += ["1" if message_id in let_go else "0", len(values)]
                for name, value in values.items():
                    args += [name, value]
            return args

        await self._call_in_chunks(self._commit, ids, arguments)

    async def _call_in_chunks(self, script: AsyncScript, message_ids: Sequence[str],
                              arguments: Callable[[Sequence[str]], list[str | int]]) -> list[Any]:
        """``script`` over the emails, ``SCRIPT_CHUNK`` at a time: one reply per chunk. A single chunk is a plain
        call (an OTP's delivery: one round trip); several are pipelined."""
        chunks = _chunks(message_ids)
        if len(chunks) == 1:
            return [await script(keys=self._keys(chunks[0]), args=arguments(chunks[0]))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                await script(keys=self._keys(chunk), args=arguments(chunk), client=pipe)
            return list(await pipe.execute())
