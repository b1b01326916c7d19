"""The history checker: everything a chaos phase recorded, held against the promises.

Sources: what each client was told (``ClientRecord``), what the mesh stored (``ingest.messages``, the source of
truth of acceptance), where each email ended (``reports.messages``), the ledger's holds and journal, and the
provider simulator's request log (which requests reached a provider and what it answered).

Promises checked, each a violation when broken:

- ``lost``: an email the client was told was accepted is not stored, or a stored email never reaches a final state
  (sent, delivered, bounced, complained, failed, cancelled) or its credit hold is never resolved;
- ``double_charge``: a hold committed more than once, or for more than it held;
- ``charge_mismatch``: an email that reached a provider whose hold was released, or one that never did whose hold
  was committed;
- ``balance``: the tenant's balances differ from the sums of the journal;
- ``duplicate``: an email taken by a provider more than once where nothing ambiguous allowed it — allowed (and
  counted) after an ambiguous timeout (the provider took it and the answer never came), or when the phase killed a
  process or a dependency between a provider's answer and its recording;
- ``idempotency``: one request (same ``request_id``) stored twice;
- ``silent_accept``: a request the client was told was refused is stored;
- ``sent_after_cancel``: an email whose cancel was acknowledged (answered CANCELLED) reached a provider after that,
  or ended in another state than cancelled (a cancel answered with another state only asks senders to drop the
  email, which they do unless a provider call for it is under way);
- ``internal_error``: a client was told INTERNAL or UNKNOWN (or HTTP 500) rather than a status it can act on;
- ``routing_burst``: in the seconds after a fault that left every provider healthy ended, more than
  ``BURST_SHARE`` of the mail went to providers dearer than the cheapest (routing state lost with Redis, say,
  must be re-learned without paying premium prices meanwhile).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from esp.internal.v1 import queue_pb2

from dev.chaos.cluster import CHEAPEST_PROVIDER, TENANT
from dev.chaos.load import CampaignRecord, ClientRecord

SENT_STATES = frozenset({"sent", "delivered", "bounced", "complained"})
FINAL_STATES = SENT_STATES | {"failed", "cancelled"}
BURST_WINDOW_S = 3.0
BURST_SHARE = 0.2
BURST_MIN_TAKES = 10
TOOK_IT = frozenset({"accepted", "hung"})
"""Simulator results meaning the provider took the email (``hung``: took it, answered too late)."""


@dataclass
class PhaseHistory:
    """What the checker reads for one phase."""

    phase: str
    faults: Sequence[str]
    crash_window: bool
    """Whether the phase's faults can interrupt a delivery between the provider's answer and its recording
    (a killed sender, a dependency restart): at-least-once then allows a second send."""
    clients: Sequence[ClientRecord]
    stored: dict[str, StoredEmail]
    provider_takes: dict[str, list[dict[str, Any]]]
    balance: tuple[int, int, int]
    journal_sums: tuple[int, int, int]
    campaigns: Sequence[CampaignRecord] = ()
    campaign_recipients: dict[str, int] = field(default_factory=dict)
    """Distinct recipients of each campaign's stored emails, by campaign key."""
    healed_at: float | None = None
    """When the phase's faults ended (epoch seconds); None for a phase without faults."""
    cheapest_healthy: bool = True
    """Whether the cheapest provider was healthy after the faults ended (no provider fault in the phase)."""


@dataclass
class StoredEmail:
    message_id: str
    key: str
    request_id: str
    message_class: str
    credits: int
    state: str = ""
    hold_state: str = ""
    hold_amount: int = 0
    commits: int = 0
    committed: int = 0


@dataclass
class PhaseVerdict:
    """Figures and violations of one phase."""

    phase: str
    faults: Sequence[str]
    emails: int = 0
    accepted: int = 0
    in_flight: int = 0
    sent: int = 0
    failed: int = 0
    cancelled: int = 0
    unknown_told: int = 0
    unknown_stored: int = 0
    refused: int = 0
    lost: int = 0
    double_charges: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    recover_s: float = 0.0
    dearer_after_recovery: tuple[int, int] = (0, 0)
    """(emails to dearer providers, emails in all) taken in the ``BURST_WINDOW_S`` after the faults ended."""
    violations: list[str] = field(default_factory=list)
    told: Counter[str] = field(default_factory=Counter)

    @property
    def delivered_ratio(self) -> float:
        """Emails a provider took per stored email the client did not cancel."""
        wanted = self.accepted - self.cancelled
        return self.sent / wanted if wanted else 1.0

    def as_row(self) -> dict[str, Any]:
        return {
            "phase": self.phase, "faults": "+".join(self.faults), "emails": self.emails, "accepted": self.accepted,
            "in_flight": self.in_flight, "lost": self.lost, "double_charges": self.double_charges,
            "duplicates": sum(self.duplicates.values()),
            "duplicate_reasons": dict(self.duplicates), "recover_s": round(self.recover_s, 2),
            "delivered_ratio": round(self.delivered_ratio, 6),
            "dearer_after_recovery": f"{self.dearer_after_recovery[0]}/{self.dearer_after_recovery[1]}",
            "failed": self.failed, "cancelled": self.cancelled,
            "unknown_told": self.unknown_told, "unknown_stored": self.unknown_stored, "refused": self.refused,
            "told": dict(self.told), "violations": list(self.violations),
        }


def read_history(dsn: str, phase: str, faults: Sequence[str], crash_window: bool, clients: Sequence[ClientRecord],
                 simulator_requests: Iterable[dict[str, Any]], since: datetime,
                 campaigns: Sequence[CampaignRecord] = ()) -> PhaseHistory:
    """Everything the mesh and the simulator recorded about ``phase``'s emails (stored since ``since``); a
    campaign's emails are queued by the campaigns service, not ingest, and found by their campaign's metadata."""
    stored: dict[str, StoredEmail] = {}
    campaign_recipients: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for message_id, request_id, message_class, task_bytes, credits in conn.execute(
                "SELECT id::text, coalesce(request_id, ''), message_class, task, credits FROM ingest.messages "
                "WHERE tenant_id = %s AND created_at >= %s", (TENANT, since)):
            task = queue_pb2.SendTask.FromString(task_bytes)
            if task.metadata.get("chaos_phase") != phase:
                continue
            stored[message_id] = StoredEmail(message_id, task.metadata.get("chaos_key", ""), request_id,
                                             message_class, int(credits))
        for campaign in campaigns:
            recipients: set[str] = set()
            for message_id, to_addrs in conn.execute(
                    "SELECT message_id, to_addrs FROM reports.messages WHERE tenant_id = %s "
                    "AND metadata->>'chaos_key' = %s", (TENANT, campaign.key)):
                stored[message_id] = StoredEmail(message_id, campaign.key, "", "bulk", 0)
                recipients.update(str(a.get("email", "")) for a in to_addrs)
            campaign_recipients[campaign.key] = len(recipients)
        ids = list(stored)
        for message_id, state in conn.execute(
                "SELECT message_id, state FROM reports.messages WHERE message_id = ANY(%s)", (ids,)):
            stored[message_id].state = state
        for hold_id, state, amount in conn.execute(
                "SELECT hold_id, state, amount FROM ledger.holds WHERE hold_id = ANY(%s)", (ids,)):
            stored[hold_id].hold_state, stored[hold_id].hold_amount = state, int(amount)
        for hold_id, commits, committed in conn.execute(
                "SELECT hold_id, count(*), sum(amount) FROM ledger.entries WHERE hold_id = ANY(%s) "
                "AND kind = 'commit' GROUP BY hold_id", (ids,)):
            stored[hold_id].commits, stored[hold_id].committed = int(commits), int(committed)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = conn.execute("SELECT available, held, spent FROM ledger.tenant_balances WHERE tenant_id = %s",
                               (TENANT,)).fetchone()
            balance = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
            sums = conn.execute(
                "SELECT coalesce(sum(CASE WHEN credit_account = a THEN amount ELSE -amount END), 0) "
                "FROM unnest(ARRAY['available', 'held', 'spent']) WITH ORDINALITY AS accounts(a, n) "
                "LEFT JOIN ledger.entries e ON e.tenant_id = %s AND a IN (e.debit_account, e.credit_account) "
                "GROUP BY n ORDER BY n", (TENANT,)).fetchall()
            journal = (int(sums[0][0]), int(sums[1][0]), int(sums[2][0]))
    takes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in simulator_requests:
        for message in record.get("messages", []):
            message_id = message.get("esp_message_id")
            if message_id in stored:
                takes[message_id].append({"result": record["result"], "personality": record["personality"],
                                          "at": record.get("arrived_at") or record["received_at"],
                                          "rejected": bool(message.get("rejection"))})
    return PhaseHistory(phase, faults, crash_window, clients, stored, dict(takes), balance, journal,
                        campaigns=campaigns, campaign_recipients=campaign_recipients)


def check(history: PhaseHistory) -> PhaseVerdict:
    """The phase's figures and every broken promise."""
    verdict = PhaseVerdict(history.phase, history.faults, emails=len(history.clients),
                           accepted=len(history.stored))
    bad = verdict.violations
    by_key: dict[str, list[StoredEmail]] = defaultdict(list)
    for email in history.stored.values():
        by_key[email.key].append(email)
    for client in history.clients:
        verdict.told[client.code or "none"] += 1
        stored = by_key.get(client.key, [])
        if client.code in ("INTERNAL", "UNKNOWN", "500"):
            bad.append(f"internal_error: {client.key} was told {client.errors[-1] if client.errors else client.code}")
        if client.outcome == "accepted" and client.message_id not in history.stored:
            verdict.lost += 1
            bad.append(f"lost: {client.key} was accepted as {client.message_id}, which is not stored")
        elif client.outcome == "refused":
            verdict.refused += 1
            if stored:
                bad.append(f"silent_accept: {client.key} was refused ({client.code}) but stored")
        elif client.outcome == "unknown":
            verdict.unknown_told += 1
            verdict.unknown_stored += bool(stored)
        if len(stored) > 1:
            bad.append(f"idempotency: {client.key} (request_id {client.request_id or 'none'}) stored "
                       f"{len(stored)} times")
        if client.cancel == "acknowledged":
            for email in stored:
                if email.state != "cancelled":
                    bad.append(f"sent_after_cancel: {client.key}'s cancel was acknowledged but it ended "
                               f"{email.state or 'in no state'}")
                late = [t for t in history.provider_takes.get(email.message_id, [])
                        if t["at"] > client.cancel_acked_at]
                if late:
                    bad.append(f"sent_after_cancel: {client.key} reached {late[0]['personality']} after its "
                               f"cancel was acknowledged")
    for campaign in history.campaigns:
        emails = sum(email.key == campaign.key for email in history.stored.values())
        reached = history.campaign_recipients.get(campaign.key, 0)
        if emails != campaign.recipients or reached != campaign.recipients:
            verdict.lost += max(0, campaign.recipients - reached)
            bad.append(f"lost: campaign {campaign.key} has {emails} emails to {reached} distinct recipients, "
                       f"not one to each of its {campaign.recipients}")
    for email in history.stored.values():
        takes = [t for t in history.provider_takes.get(email.message_id, [])
                 if t["result"] in TOOK_IT and not t["rejected"]]
        if email.state not in FINAL_STATES or email.hold_state not in ("committed", "released"):
            verdict.lost += 1
            bad.append(f"lost: {email.message_id} ({email.key}) ended in state {email.state or 'unknown'} with "
                       f"its hold {email.hold_state or 'missing'}")
            continue
        verdict.sent += email.state in SENT_STATES
        verdict.failed += email.state == "failed"
        verdict.cancelled += email.state == "cancelled"
        if email.commits > 1 or email.committed > email.hold_amount:
            verdict.double_charges += 1
            bad.append(f"double_charge: {email.message_id} committed {email.commits} times "
                       f"({email.committed} of a {email.hold_amount} hold)")
        if email.state in SENT_STATES and email.hold_state != "committed":
            bad.append(f"charge_mismatch: {email.message_id} is {email.state} but its hold was {email.hold_state}")
        if email.state in ("failed", "cancelled") and email.hold_state != "released":
            bad.append(f"charge_mismatch: {email.message_id} is {email.state} but its hold was {email.hold_state}")
        if email.state in SENT_STATES and not takes:
            bad.append(f"phantom_send: {email.message_id} is {email.state} but no provider took it")
        if len(takes) > 1:
            if any(t["result"] == "hung" for t in takes[:-1]):
                verdict.duplicates["ambiguous_timeout"] += len(takes) - 1
            elif history.crash_window:
                verdict.duplicates["crash_window"] += len(takes) - 1
            else:
                verdict.duplicates["unexplained"] += len(takes) - 1
                bad.append(f"duplicate: {email.message_id} taken {len(takes)} times by "
                           f"{', '.join(t['personality'] for t in takes)} with nothing ambiguous")
    if history.healed_at is not None and history.cheapest_healthy:
        window = [t for takes in history.provider_takes.values() for t in takes
                  if t["result"] in TOOK_IT and history.healed_at <= t["at"] < history.healed_at + BURST_WINDOW_S]
        dearer = sum(t["personality"] != CHEAPEST_PROVIDER for t in window)
        verdict.dearer_after_recovery = (dearer, len(window))
        if len(window) >= BURST_MIN_TAKES and dearer > BURST_SHARE * len(window):
            bad.append(f"routing_burst: {dearer} of {len(window)} emails went to dearer providers in the "
                       f"{BURST_WINDOW_S:.0f} s after the faults ended, the cheapest being healthy")
    if history.balance != history.journal_sums:
        bad.append(f"balance: (available, held, spent) {history.balance} but the journal sums to "
                   f"{history.journal_sums}")
    return verdict
