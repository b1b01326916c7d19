"""The Redis gate of the accept path: idempotency claim, suppression check, per-class rate limit (GCRA) and the
daily quota, decided together in one Lua script; the emails of concurrent requests share one call of it (one
round trip, one command to encode and one reply to read for the whole batch).

The script changes nothing unless it admits the email, so a refused email leaves no trace (no rate token, no
quota, no claim). An admitted email that is refused later (not enough credits ...) is given everything back by
:meth:`RedisGate.undo`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from libs.common.batching import BatchingOptions, GroupCommitter
from libs.common.errors import FailedPrecondition, FieldViolation, QuotaViolation, ResourceExhausted
from libs.common.message_classes import MessageClass
from libs.common.suppressions import normalise_email, suppression_key_for_class
from services.ingest.model import URGENT_CLASSES, YIELD_EVERY, EmailDraft

DAY_S = 86_400
_COUNTER_TTL_S = DAY_S + 3600
"""A day's counter outlives its day by an hour, so a refund that crosses midnight still finds it."""


@dataclass(frozen=True)
class RateDefaults:
    """Platform defaults, used where a tenant has no setting of its own."""

    otp_per_second: float = 200.0
    transactional_per_second: float = 500.0
    bulk_per_second: float = 2000.0
    burst_seconds: float = 1.0
    """How many seconds' worth of sends may arrive at once (at least one email always may)."""

    def for_class(self, message_class: str) -> float:
        """The default rate of ``message_class``."""
        return {"otp": self.otp_per_second, "transactional": self.transactional_per_second,
                "bulk": self.bulk_per_second}[message_class]


# Admits a batch of emails, in order, as if each ran alone (one script call reads and encodes far cheaper than a
# pipeline of one call per email). KEYS, 4 per email: idempotency claim, suppression set (the one of the email's
# class: libs.common.suppressions.suppression_key_for_class), rate (GCRA theoretical
# arrival time, µs), daily counter. ARGV: 1 claim TTL s, 2 counter TTL s, then per email: claim value ('' = the
# request has no request_id), emission interval µs, burst tolerance µs, cost, daily quota (0 = none), n, and its n
# recipients (normalised).
# Returns, per email, {0, used today} admitted | {1, holder} request_id claimed already | {2, {recipient indexes}}
# suppressed | {3, retry µs} over the rate | {4, used today} over the daily quota. Only the admitting branch writes.
_ADMIT = """
local claim_ttl = tonumber(ARGV[1])
local counter_ttl = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function admit(claim_key, suppression_key, rate_key, counter_key, claim, interval, tolerance, cost, quota,
                     first_recipient, last_recipient)
  if claim ~= '' then
    local holder = redis.call('GET', claim_key)
    if holder then return {1, holder} end
  end
  local suppressed = {}
  for i = first_recipient, last_recipient do
    if redis.call('SISMEMBER', suppression_key, ARGV[i]) == 1 then
      suppressed[#suppressed + 1] = i - first_recipient
    end
  end
  if #suppressed > 0 then return {2, suppressed} end
  local tat = tonumber(redis.call('GET', rate_key) or now)
  -- A debt larger than the current rate can build up dates from a slower rate the tenant has since raised: forgive it.
  if tat < now or tat > now + tolerance + interval * cost then tat = now end
  if tat + interval * (cost - 1) - tolerance > now then
    return {3, tostring(math.ceil(tat + interval * (cost - 1) - tolerance - now))}
  end
  local used = tonumber(redis.call('GET', counter_key) or '0')
  if quota > 0 and used + cost > quota then return {4, tostring(used)} end
  local new_tat = tat + interval * cost
  redis.call('SET', rate_key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
  used = redis.call('INCRBY', counter_key, cost)
  if used == cost then redis.call('EXPIRE', counter_key, counter_ttl) end
  if claim ~= '' then redis.call('SET', claim_key, claim, 'EX', claim_ttl) end
  return {0, tostring(used)}
end
local results = {}
local a = 3
for e = 0, #KEYS / 4 - 1 do
  local k = e * 4
  local n = tonumber(ARGV[a + 5])
  results[e + 1] = admit(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], ARGV[a], tonumber(ARGV[a + 1]),
                         tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), a + 6, a + 5 + n)
  a = a + 6 + n
end
return results
"""

# KEYS: 1 idempotency claim, 2 rate key, 3 daily counter. ARGV: 1 claim value to drop ('' = none), 2 emission
# interval µs, 3 cost. Gives back what _ADMIT took; the claim only if it is still this request's.
_UNDO = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
local tat = tonumber(redis.call('GET', KEYS[2]))
if tat then
  redis.call('SET', KEYS[2], string.format('%.0f', tat - tonumber(ARGV[2]) * tonumber(ARGV[3])), 'KEEPTTL')
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('DECRBY', KEYS[3], tonumber(ARGV[3])) < 0 then redis.call('SET', KEYS[3], 0, 'KEEPTTL') end
end
return 1
"""


@dataclass(frozen=True)
class AdmissionTicket:
    """What the gate took for one admitted email, so that it can be given back exactly."""

    claim_key: str
    claim: str
    rate_key: str
    counter_key: str
    interval_us: float
    cost: int


class _RedisPipeliner:
    """Concurrent commands go to Redis as one pipeline: one round trip (and one socket read) for all of them."""

    def __init__(self, redis: aioredis.Redis, scripts: Sequence[str], *, batch_interval_s: float = 0.0) -> None:
        self.redis = redis
        self.sources = {self.sha(s): s for s in scripts}
        self._batcher: GroupCommitter[tuple[Any, ...], Any] = GroupCommitter(
            self._flush, BatchingOptions(max_batch_size=1000, workers=1, shards=1, min_interval_s=batch_interval_s),
            name="ingest-redis")

    @staticmethod
    def sha(source: str) -> str:
        """The name Redis gives a script (its SHA-1)."""
        return hashlib.sha1(source.encode()).hexdigest()

    async def call(self, *command: Any) -> Any:
        return await self._batcher.submit(command)

    async def _flush(self, batch: Sequence[tuple[Any, ...]]) -> list[Any]:
        results = await self._execute(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted (or failed over) and forgot the scripts: load them, run those again
            for source in self.sources.values():
                await self.redis.script_load(source)
            again = await self._execute([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _execute(self, batch: Sequence[tuple[Any, ...]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in batch:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        await self._batcher.close()


_Admission = tuple[tuple[str, ...], tuple[str | int, ...], bool]
"""One email's keys and arguments of the admit script, and whether it is urgent (its class's policy says so)."""


class _Admitter:
    """Concurrent admits go to Redis as one call of the batch script, encoded by hiredis (C) and sent on a pooled
    connection. Through redis-py's pipeline each email's script call cost ≈ 50 µs of Python (every argument encoded
    in Python, one reply read under its own timeout per call): a good part of a core at a few thousand emails/s."""

    def __init__(self, redis: aioredis.Redis, *, claim_ttl_s: int, batch_interval_s: float = 0.0,
                 script: str = _ADMIT) -> None:
        self.redis = redis
        self.script = script
        self.sha = _RedisPipeliner.sha(script)
        self._head = (claim_ttl_s, _COUNTER_TTL_S)
        # An OTP's admission has a lane of its own: it never waits behind a campaign's emails.
        self._batcher: GroupCommitter[_Admission, Any] = GroupCommitter(
            self._flush, BatchingOptions(max_batch_size=1000, workers=1, shards=1, min_interval_s=batch_interval_s),
            urgent=lambda admission: admission[2], name="ingest-redis-admit")

    async def submit_many(self, admissions: Sequence[_Admission]) -> list[Any]:
        """Each email's outcome (its keys and arguments as _ADMIT takes them for one email), or the exception that
        failed its batch."""
        return await self._batcher.submit_many(admissions)

    async def _flush(self, batch: Sequence[_Admission]) -> list[Any]:
        keys: list[str] = []
        argv: list[str | int] = [*self._head]
        for email_keys, email_args, _urgent in batch:
            keys += email_keys
            argv += email_args
        # hiredis' stub types a command as a 1-tuple; it takes any number of arguments.
        packed = hiredis.pack_command(("EVALSHA", self.sha, len(keys), *keys, *argv))  # type: ignore[arg-type]
        try:
            results = await self._call(packed)
        except NoScriptError:  # Redis restarted (or failed over) and forgot the script
            await self.redis.script_load(self.script)
            results = await self._call(packed)
        return list(results)

    async def _call(self, packed: bytes) -> Any:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()

        async def send_and_read() -> Any:
            await conn.send_packed_command(packed)
            return await conn.read_response()

        async def drop(error: Exception) -> None:
            await conn.disconnect(error=error)

        try:
            # Retried on connection errors as redis-py retries its own commands (and pipelines).
            return await conn.retry.call_with_retry(send_and_read, drop)
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        await self._batcher.close()


class RedisGate:
    """Admits emails (or refuses them with the right error) in one Redis round trip each."""

    def __init__(self, redis: aioredis.Redis, namespace: str, defaults: RateDefaults | None = None, *,
                 claim_ttl_s: int = DAY_S, batch_interval_s: float = 0.0) -> None:
        self.redis = redis
        self.namespace = namespace
        self.defaults = defaults or RateDefaults()
        self.claim_ttl_s = claim_ttl_s
        self._pipe = _RedisPipeliner(redis, [_UNDO], batch_interval_s=batch_interval_s)
        self._admitter = _Admitter(redis, claim_ttl_s=claim_ttl_s, batch_interval_s=batch_interval_s)
        self._undo_sha = self._pipe.sha(_UNDO)

    # -- keys ------------------------------------------------------------------------------------------------
    def claim_key(self, tenant_id: str, request_id: str) -> str:
        """The Redis key of a request_id's claim (idempotency), scoped to its tenant."""
        return f"{self.namespace}:idem:{tenant_id}:{request_id}"

    def rate_key(self, tenant_id: str, message_class: str) -> str:
        """The Redis key of a tenant's GCRA rate state for one message class."""
        return f"{self.namespace}:rl:{tenant_id}:{message_class}"

    def counter_key(self, tenant_id: str, day: str | None = None) -> str:
        """The tenant's send counter of a UTC day (``YYYYMMDD``; today when omitted)."""
        return f"{self.namespace}:quota:{tenant_id}:{day or time.strftime('%Y%m%d', time.gmtime())}"

    def rate_of(self, message_class: str, tenant_rate: float) -> float:
        """The rate that applies: the tenant's own when it set one (> 0), else the class's default."""
        return tenant_rate if tenant_rate > 0 else self.defaults.for_class(message_class)

    # -- the gate --------------------------------------------------------------------------------------------
    async def admit_many(self, tenant_id: str, drafts: Sequence[EmailDraft], *, rate_per_second: float,
                         daily_quota: int, claims: Sequence[str] = ()) -> list[AdmissionTicket | bytes | Exception]:
        """Admit each of ``drafts`` (emails of one tenant, in one submission, each as if it ran alone after the ones
        before it): claim its request_id (when ``claims[i]`` is given; "" for none), refuse suppressed recipients,
        spend a rate token and count it towards today's quota — all or nothing.

        Returns, per email, the ticket of what was taken, the value already holding its request_id (an earlier
        request with that id is being, or was, accepted), or the error that refused it: FAILED_PRECONDITION for
        suppressed recipients, RESOURCE_EXHAUSTED (RetryInfo + QuotaFailure) over the rate or the daily quota.
        """
        tickets_and_admissions = []
        for index, draft in enumerate(drafts):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            claim = claims[index] if claims else ""
            tickets_and_admissions.append(self._admission(tenant_id, draft, rate_per_second, daily_quota, claim, 1))
        replies = await self._admitter.submit_many([admission for _, admission in tickets_and_admissions])
        results: list[AdmissionTicket | bytes | Exception] = []
        for draft, (ticket, _), reply in zip(drafts, tickets_and_admissions, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(reply)
                continue
            try:
                results.append(self._verdict(tenant_id, draft, ticket, rate_per_second, daily_quota, *reply))
            except Exception as exc:
                results.append(exc)
        return results

    def _admission(self, tenant_id: str, draft: EmailDraft, rate_per_second: float, daily_quota: int, claim: str,
                   cost: int) -> tuple[AdmissionTicket, _Admission]:
        """What admitting ``draft`` takes (its ticket) and asks of the admit script (its keys and arguments)."""
        rate = self.rate_of(draft.message_class, rate_per_second)
        interval_us = 1_000_000 / rate
        tolerance_us = interval_us * max(0.0, rate * self.defaults.burst_seconds - 1)
        recipients = draft.recipients
        ticket = AdmissionTicket(
            claim_key=self.claim_key(tenant_id, draft.request_id) if claim else "", claim=claim,
            rate_key=self.rate_key(tenant_id, draft.message_class), counter_key=self.counter_key(tenant_id),
            interval_us=interval_us, cost=cost)
        return ticket, (
            # The suppression set of the draft's class: bulk honours unsubscribes, otp and transactional do not.
            (ticket.claim_key or f"{self.namespace}:idem:-",
             suppression_key_for_class(self.namespace, tenant_id, MessageClass(draft.message_class)),
             ticket.rate_key, ticket.counter_key),
            (claim, f"{interval_us:.3f}", f"{tolerance_us:.3f}", cost, daily_quota, len(recipients),
             *(normalise_email(r.email) for r in recipients)),
            draft.message_class in URGENT_CLASSES)

    def _verdict(self, tenant_id: str, draft: EmailDraft, ticket: AdmissionTicket, rate_per_second: float,
                 daily_quota: int, outcome: int, detail: Any) -> AdmissionTicket | bytes:
        if outcome == 0:
            return ticket
        if outcome == 1:
            return bytes(detail)
        if outcome == 2:
            raise _suppressed(draft, [int(i) for i in detail])
        if outcome == 3:
            rate = self.rate_of(draft.message_class, rate_per_second)
            raise _rate_limited(tenant_id, draft.message_class, rate, int(detail) / 1_000_000)
        raise _over_quota(tenant_id, daily_quota, int(detail))

    async def undo(self, ticket: AdmissionTicket) -> None:
        """Give back the rate token, the quota count and the claim of an email that was refused after all."""
        await self._pipe.call("EVALSHA", self._undo_sha, 3, ticket.claim_key or f"{self.namespace}:idem:-",
                              ticket.rate_key, ticket.counter_key, ticket.claim, f"{ticket.interval_us:.3f}",
                              ticket.cost)

    async def remember(self, tenant_id: str, request_id: str, value: str) -> None:
        """Record the outcome of a request_id (the fast path for its retries)."""
        await self._pipe.call("SET", self.claim_key(tenant_id, request_id), value, "EX", self.claim_ttl_s)

    async def holder(self, tenant_id: str, request_id: str) -> bytes | None:
        """What holds a request_id now, if anything."""
        value = await self._pipe.call("GET", self.claim_key(tenant_id, request_id))
        return None if value is None else bytes(value)

    async def used_today(self, tenant_id: str) -> int:
        """Emails counted towards the tenant's quota today."""
        return int(await self._pipe.call("GET", self.counter_key(tenant_id)) or 0)

    async def close(self) -> None:
        """Flush the batched Redis calls still waiting and stop batching."""
        await self._admitter.close()
        await self._pipe.close()


def _suppressed(draft: EmailDraft, indexes: Sequence[int]) -> FailedPrecondition:
    fields = [(f"to[{i}]", b) for i, b in enumerate(draft.to)] + [(f"cc[{i}]", b) for i, b in enumerate(draft.cc)]
    fields += [(f"bcc[{i}]", b) for i, b in enumerate(draft.bcc)]
    hits = [fields[i] for i in indexes]
    return FailedPrecondition(
        f"{len(hits)} recipient(s) are on the suppression list; nothing was sent or charged",
        reason="SUPPRESSED_RECIPIENT", metadata={"recipients": ",".join(box.email for _, box in hits)},
        field_violations=[FieldViolation(f"{where}.email", f"{box.email} is on the suppression list",
                                         "SUPPRESSED_RECIPIENT") for where, box in hits])


def _rate_limited(tenant_id: str, message_class: str, rate: float, retry_s: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"rate limit of {rate:g} {message_class} emails/s exceeded", reason="RATE_LIMITED",
        metadata={"limit_per_second": f"{rate:g}", "message_class": message_class},
        retry_after_s=max(0.001, retry_s),
        quota_violations=[QuotaViolation(f"tenants/{tenant_id}/{message_class}", f"{rate:g} emails per second")])


def _over_quota(tenant_id: str, daily_quota: int, used: int) -> ResourceExhausted:
    seconds_to_midnight = DAY_S - int(time.time()) % DAY_S
    return ResourceExhausted(
        f"daily quota of {daily_quota} emails reached", reason="DAILY_QUOTA_EXCEEDED",
        metadata={"daily_quota": str(daily_quota), "used": str(used)}, retry_after_s=float(seconds_to_midnight),
        quota_violations=[QuotaViolation(f"tenants/{tenant_id}", f"{daily_quota} emails per UTC day")])
