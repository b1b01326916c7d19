"""Suppressions: a send to an address on the tenant's suppression list is refused before anything is spent."""

from __future__ import annotations

import grpc
from esp.v1 import common_pb2, reports_pb2, reports_pb2_grpc

from tests.ingest.conftest import IngestHarness, TenantHandle, refused, send_request


async def _suppress(harness: IngestHarness, tenant: TenantHandle, email: str,
                    reason: reports_pb2.SuppressionReason.ValueType = reports_pb2.SUPPRESSION_REASON_MANUAL) -> None:
    """Suppress ``email`` through the public API (the reports service mirrors the list into Redis)."""
    await reports_pb2_grpc.SuppressionServiceStub(harness.channel).CreateSuppression(
        reports_pb2.CreateSuppressionRequest(suppression=reports_pb2.Suppression(
            email=email, reason=reason)), metadata=tenant.auth)


_CLASSES = (common_pb2.MESSAGE_CLASS_OTP, common_pb2.MESSAGE_CLASS_TRANSACTIONAL, common_pb2.MESSAGE_CLASS_BULK)


async def test_a_send_to_a_suppressed_address_is_refused_and_costs_nothing(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "gone@example.net")
    before = await harness.balance(tenant)
    failed = await refused(harness.messages.SendEmail(send_request(to=[
        common_pb2.EmailAddress(email="fine@example.net"), common_pb2.EmailAddress(email="gone@example.net")]),
        metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.info.reason == "SUPPRESSED_RECIPIENT"
    assert failed.info.metadata["recipients"] == "gone@example.net"
    assert failed.fields == ["to[1].email"]
    assert await harness.balance(tenant) == before
    assert await harness.message_rows(tenant) == 0
    assert await harness.parts.gate.used_today(tenant.id) == 0


async def test_suppression_matching_ignores_the_case_of_the_address(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "Gone@Example.NET")
    failed = await refused(harness.messages.SendEmail(send_request(to=[
        common_pb2.EmailAddress(email="GONE@example.net")]), metadata=tenant.auth))
    assert failed.info.reason == "SUPPRESSED_RECIPIENT"


async def test_cc_and_bcc_recipients_are_checked_too(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "cc@example.net")
    await _suppress(harness, tenant, "bcc@example.net")
    failed = await refused(harness.messages.SendEmail(send_request(
        cc=[common_pb2.EmailAddress(email="cc@example.net")], bcc=[common_pb2.EmailAddress(email="bcc@example.net")]),
        metadata=tenant.auth))
    assert failed.fields == ["cc[0].email", "bcc[0].email"]


async def test_another_tenants_suppression_list_does_not_apply(harness: IngestHarness):
    tenant, other = await harness.new_tenant(), await harness.new_tenant()
    await _suppress(harness, other, "rcpt@example.net")
    sent = await harness.send(tenant, send_request(to=[common_pb2.EmailAddress(email="rcpt@example.net")]))
    assert sent.id


async def test_a_lifted_suppression_lets_the_address_receive_again(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "back@example.net")
    await reports_pb2_grpc.SuppressionServiceStub(harness.channel).DeleteSuppression(
        reports_pb2.DeleteSuppressionRequest(name="suppressions/back@example.net"), metadata=tenant.auth)
    sent = await harness.send(tenant, send_request(to=[common_pb2.EmailAddress(email="back@example.net")]))
    assert sent.id


async def test_an_unsubscribed_address_is_refused_bulk_mail(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "reader@example.net", reports_pb2.SUPPRESSION_REASON_UNSUBSCRIBE)
    failed = await refused(harness.messages.SendEmail(send_request(
        message_class=common_pb2.MESSAGE_CLASS_BULK, to=[common_pb2.EmailAddress(email="reader@example.net")]),
        metadata=tenant.auth))
    assert failed.info.reason == "SUPPRESSED_RECIPIENT"


async def test_an_unsubscribed_address_still_receives_otp_and_transactional_mail(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "reader@example.net", reports_pb2.SUPPRESSION_REASON_UNSUBSCRIBE)
    for message_class in (common_pb2.MESSAGE_CLASS_OTP, common_pb2.MESSAGE_CLASS_TRANSACTIONAL):
        sent = await harness.send(tenant, send_request(
            message_class=message_class, to=[common_pb2.EmailAddress(email="Reader@Example.net")]))
        assert sent.id


async def test_a_hard_bounced_or_manually_suppressed_address_is_refused_every_class(harness: IngestHarness):
    tenant = await harness.new_tenant()
    await _suppress(harness, tenant, "bounced@example.net", reports_pb2.SUPPRESSION_REASON_HARD_BOUNCE)
    await _suppress(harness, tenant, "manual@example.net", reports_pb2.SUPPRESSION_REASON_MANUAL)
    for address in ("bounced@example.net", "manual@example.net"):
        for message_class in _CLASSES:
            failed = await refused(harness.messages.SendEmail(send_request(
                message_class=message_class, to=[common_pb2.EmailAddress(email=address)]), metadata=tenant.auth))
            assert failed.info.reason == "SUPPRESSED_RECIPIENT", (address, message_class)
    assert await harness.message_rows(tenant) == 0
