"""Rate limits (GCRA per tenant and class, in Redis) and the daily send quota: over either, RESOURCE_EXHAUSTED
with RetryInfo and QuotaFailure, and nothing spent."""

from __future__ import annotations

import secrets

import grpc
from esp.v1 import common_pb2, credits_pb2, tenants_pb2

from libs.common.errors import EspError
from libs.common.suppressions import suppression_key_for_every_class
from services.ingest.limits import _ADMIT, AdmissionTicket, _Admitter
from services.ingest.model import EmailDraft, Mailbox
from tests.ingest.conftest import IngestHarness, refused, send_request

SLOW = 0.1
"""Emails per second: one every 10 s, a burst of one — the second email of a test is always over the rate."""


async def test_a_send_over_the_rate_is_resource_exhausted_with_retry_info_and_quota_failure(harness: IngestHarness):
    tenant = await harness.new_tenant(transactional_rate_per_second=SLOW)
    await harness.send(tenant, send_request())
    failed = await refused(harness.messages.SendEmail(send_request(), metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed.info.reason == "RATE_LIMITED"
    assert failed.info.metadata["message_class"] == "transactional"
    assert failed.retry is not None and 0 < failed.retry.retry_delay.ToMilliseconds() <= 10_000
    assert failed.quota is not None
    assert [v.subject for v in failed.quota.violations] == [f"tenants/{tenant.id}/transactional"]


async def test_a_rate_limited_send_spends_nothing(harness: IngestHarness):
    tenant = await harness.new_tenant(transactional_rate_per_second=SLOW)
    await harness.send(tenant, send_request())
    before = await harness.balance(tenant)
    await refused(harness.messages.SendEmail(send_request(request_id="limited"), metadata=tenant.auth))
    assert await harness.balance(tenant) == before
    assert await harness.message_rows(tenant) == 1
    assert await harness.parts.gate.used_today(tenant.id) == 1
    assert await harness.parts.gate.holder(tenant.id, "limited") is None


async def test_each_class_has_its_own_rate(harness: IngestHarness):
    tenant = await harness.new_tenant(bulk_rate_per_second=SLOW, otp_rate_per_second=SLOW)
    await harness.send(tenant, send_request(message_class=common_pb2.MESSAGE_CLASS_BULK))
    await refused(harness.messages.SendEmail(send_request(message_class=common_pb2.MESSAGE_CLASS_BULK),
                                             metadata=tenant.auth))
    otp = await harness.send(tenant, send_request(message_class=common_pb2.MESSAGE_CLASS_OTP))
    assert otp.message_class == common_pb2.MESSAGE_CLASS_OTP


async def test_each_tenant_has_its_own_rate(harness: IngestHarness):
    busy, quiet = (await harness.new_tenant(transactional_rate_per_second=SLOW),
                   await harness.new_tenant(transactional_rate_per_second=SLOW))
    await harness.send(busy, send_request())
    await refused(harness.messages.SendEmail(send_request(), metadata=busy.auth))
    await harness.send(quiet, send_request())


async def test_a_tenants_rate_is_configurable_and_a_change_applies_without_restart(harness: IngestHarness):
    tenant = await harness.new_tenant(transactional_rate_per_second=SLOW)
    await harness.send(tenant, send_request())
    await refused(harness.messages.SendEmail(send_request(), metadata=tenant.auth))
    current = await harness.tenants.GetTenant(tenants_pb2.GetTenantRequest(name=tenant.name), metadata=harness.admin)
    current.transactional_rate_per_second = 1000
    await harness.tenants.UpdateTenant(tenants_pb2.UpdateTenantRequest(tenant=current), metadata=harness.admin)
    for _ in range(5):  # a burst of a second's worth is allowed now
        await harness.send(tenant, send_request())


async def test_the_burst_is_a_seconds_worth_of_the_rate(harness: IngestHarness):
    tenant = await harness.new_tenant(otp_rate_per_second=3)
    outcomes = []
    for _ in range(4):
        try:
            await harness.send(tenant, send_request(message_class=common_pb2.MESSAGE_CLASS_OTP))
            outcomes.append("sent")
        except grpc.aio.AioRpcError as exc:
            outcomes.append(exc.code().name)
    # Three at once, then the limit — unless the test was so slow that a new token arrived meanwhile.
    assert outcomes[:3] == ["sent"] * 3
    assert outcomes[3] in ("RESOURCE_EXHAUSTED", "sent")


async def test_the_daily_quota_refuses_the_email_after_the_last_one_allowed(harness: IngestHarness):
    tenant = await harness.new_tenant(daily_quota=2)
    await harness.send(tenant, send_request())
    await harness.send(tenant, send_request())
    failed = await refused(harness.messages.SendEmail(send_request(), metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed.info.reason == "DAILY_QUOTA_EXCEEDED"
    assert failed.info.metadata["daily_quota"] == "2"
    assert failed.retry is not None and 0 < failed.retry.retry_delay.seconds <= 86_400
    assert failed.quota is not None and failed.quota.violations[0].subject == f"tenants/{tenant.id}"
    assert await harness.message_rows(tenant) == 2


async def test_the_daily_quota_counts_every_class_together(harness: IngestHarness):
    tenant = await harness.new_tenant(daily_quota=1)
    await harness.send(tenant, send_request(message_class=common_pb2.MESSAGE_CLASS_OTP))
    failed = await refused(harness.messages.SendEmail(send_request(message_class=common_pb2.MESSAGE_CLASS_BULK),
                                                      metadata=tenant.auth))
    assert failed.info.reason == "DAILY_QUOTA_EXCEEDED"


async def test_a_send_refused_for_lack_of_credits_gives_its_rate_token_and_quota_back(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0, daily_quota=1, transactional_rate_per_second=SLOW)
    failed = await refused(harness.messages.SendEmail(send_request(), metadata=tenant.auth))
    assert failed.info.reason == "INSUFFICIENT_CREDITS"
    assert await harness.parts.gate.used_today(tenant.id) == 0
    await harness.credits.TopUp(credits_pb2.TopUpRequest(tenant=tenant.name, amount=1000, request_id="top-up"),
                                metadata=harness.admin)
    await harness.send(tenant, send_request())  # neither the rate (burst 1) nor the quota (1) was spent


async def test_emails_decided_in_one_script_call_each_get_their_own_outcome(harness: IngestHarness):
    # The emails of one submission (and concurrent ones) share one call of the gate's script; each email must see
    # the ones before it in the batch (quota, rate, request_id claims) and get its own answer.
    tenant = await harness.new_tenant(daily_quota=2)
    await harness.parts.redis.sadd(suppression_key_for_every_class(harness.namespace, tenant.id), "blocked@example.net")
    gate = harness.parts.gate

    def draft(to: str, request_id: str = "") -> EmailDraft:
        return EmailDraft(message_class="transactional", sender=Mailbox("shop@example.com"), to=(Mailbox(to),),
                          text_body="hi", request_id=request_id)

    emails = [draft("Blocked@Example.net"), draft("a@example.net", "same"), draft("b@example.net", "same"),
              draft("c@example.net"), draft("d@example.net")]
    answers = await gate.admit_many(tenant.id, emails, rate_per_second=1000, daily_quota=2,
                                    claims=[f"claim-of-{e.request_id}" if e.request_id else "" for e in emails])
    outcomes = [a.reason if isinstance(a, EspError) else a for a in answers]
    assert outcomes[0] == "SUPPRESSED_RECIPIENT"
    assert isinstance(outcomes[1], AdmissionTicket)
    assert outcomes[2] == b"claim-of-same"  # the twin sees the claim its predecessor in the batch just took
    assert isinstance(outcomes[3], AdmissionTicket)
    assert outcomes[4] == "DAILY_QUOTA_EXCEEDED"
    assert await gate.used_today(tenant.id) == 2


async def test_the_gate_loads_its_script_again_when_redis_has_forgotten_it(harness: IngestHarness):
    # A script body Redis has never seen stands for one it forgot (restart, failover): the first call is answered
    # NOSCRIPT, and the gate loads the script and runs the batch again.
    admitter = _Admitter(harness.parts.redis, claim_ttl_s=60, script=f"{_ADMIT}\n-- {secrets.token_hex(8)}")
    keys = tuple(f"{harness.namespace}:noscript:{secrets.token_hex(4)}:{part}" for part in ("idem", "supp", "rl", "q"))
    try:
        [outcome] = await admitter.submit_many([(keys, ("", "1000.000", "0.000", 1, 0, 1, "a@example.net"), False)])
    finally:
        await admitter.close()
    assert outcome == [0, b"1"]
