"""One email through every service, as separate processes, to the SMTP sink; and the edge's first refusals."""

from __future__ import annotations

import hashlib
import uuid

import grpc
import pytest
from esp.v1 import (
    attachments_pb2,
    attachments_pb2_grpc,
    common_pb2,
    credits_pb2,
    credits_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
)
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.conftest import STALL_S, RunningMesh
from tests.progress import wait_for_progress

pytestmark = pytest.mark.e2e


def _send_request(**overrides: object) -> messages_pb2.SendEmailRequest:
    fields: dict[str, object] = {
        "message_class": common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
        "to": [common_pb2.EmailAddress(email="rcpt@example.net", name="Zoë Rcpt")],
        "subject": "Your receipt ✓", "text_body": "Thanks for your order.", "html_body": "<p>Thanks!</p>",
        "from": common_pb2.EmailAddress(email="shop@example.com", name="Shop"),
    }
    fields.update(overrides)
    return messages_pb2.SendEmailRequest(**fields)  # type: ignore[arg-type]


def _details(exc: grpc.RpcError) -> list[object]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status details"
    found: list[object] = []
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                value = cls()
                detail.Unpack(value)
                found.append(value)
    return found


def _balance(mesh: RunningMesh, tenant: str = "acme") -> credits_pb2.Balance:
    with mesh.channel() as channel:
        return credits_pb2_grpc.CreditServiceStub(channel).GetBalance(
            credits_pb2.GetBalanceRequest(tenant=f"tenants/{tenant}"), metadata=mesh.auth(), timeout=10)


def test_an_email_with_an_attachment_reaches_the_smtp_sink_and_moves_the_balance(running_mesh: RunningMesh):
    mesh = running_mesh
    before = _balance(mesh)
    payload = b"%PDF-1.4 invoice " + uuid.uuid4().bytes * 1000
    with mesh.channel() as channel:
        frames = [attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="invoice.pdf", content_type="application/pdf", size_bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest()))]
        frames += [attachments_pb2.UploadAttachmentRequest(chunk=payload[i:i + 4096])
                   for i in range(0, len(payload), 4096)]
        attachment = attachments_pb2_grpc.AttachmentServiceStub(channel).UploadAttachment(
            iter(frames), metadata=mesh.auth(), timeout=30)
        reply = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(
            _send_request(attachment_ids=[attachment.id], tags=["receipt"]), metadata=mesh.auth(), timeout=10)
    message_id = reply.message.id
    assert reply.message.state == messages_pb2.MESSAGE_STATE_ACCEPTED

    mail = mesh.wait_for_mail(lambda msg: msg["X-ESP-Message-Id"] == message_id)
    assert mail["Subject"] == "Your receipt ✓"
    assert mail["From"].addresses[0].addr_spec == "shop@example.com"
    assert mail["To"].addresses[0].display_name == "Zoë Rcpt"
    parts = {part.get_content_type(): part for part in mail.walk()}
    assert parts["text/plain"].get_content().strip() == "Thanks for your order."
    assert "<p>Thanks!</p>" in parts["text/html"].get_content()
    attached = [p for p in mail.iter_attachments() if p.get_filename() == "invoice.pdf"]
    assert len(attached) == 1 and attached[0].get_content() == payload

    sent = mesh.wait_state(f"messages/{message_id}", messages_pb2.MESSAGE_STATE_SENT)
    assert sent.provider == "sink"
    after = wait_for_progress(lambda: _balance(mesh), lambda b: b.held == before.held, what="the hold settled",
                              stall_s=STALL_S, describe=lambda b: f"spent {b.spent}, held {b.held} (before: "
                                                                  f"spent {before.spent}, held {before.held})")
    assert reply.message.credits > 0
    assert after.spent - before.spent == reply.message.credits
    assert before.available - after.available == reply.message.credits
    assert after.held == before.held


def test_status_lists_the_accepted_and_sent_events(running_mesh: RunningMesh):
    mesh = running_mesh
    with mesh.channel() as channel:
        stub = messages_pb2_grpc.MessageServiceStub(channel)
        reply = stub.SendEmail(_send_request(message_class=common_pb2.MESSAGE_CLASS_OTP, subject="Code 1234"),
                               metadata=mesh.auth(), timeout=10)
        mesh.wait_state(reply.message.name, messages_pb2.MESSAGE_STATE_SENT)
        events = stub.ListMessageEvents(messages_pb2.ListMessageEventsRequest(parent=reply.message.name),
                                        metadata=mesh.auth(), timeout=10).events
    types = [e.type for e in events]
    assert types[0] == messages_pb2.MESSAGE_EVENT_TYPE_ACCEPTED
    assert messages_pb2.MESSAGE_EVENT_TYPE_SENT in types


def test_a_send_without_an_api_key_is_unauthenticated(running_mesh: RunningMesh):
    with running_mesh.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        messages_pb2_grpc.MessageServiceStub(channel).SendEmail(_send_request(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_send_with_an_unknown_api_key_is_unauthenticated(running_mesh: RunningMesh):
    forged = "esp_live_abcdefabcdef_" + "x" * 32
    with running_mesh.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        messages_pb2_grpc.MessageServiceStub(channel).SendEmail(
            _send_request(), metadata=running_mesh.auth(forged), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = next(d for d in _details(caught.value) if isinstance(d, error_details_pb2.ErrorInfo))
    assert info.reason == "INVALID_API_KEY"


def test_a_malformed_address_is_invalid_argument_with_a_field_violation(running_mesh: RunningMesh):
    before = _balance(running_mesh)
    with running_mesh.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        messages_pb2_grpc.MessageServiceStub(channel).SendEmail(
            _send_request(to=[common_pb2.EmailAddress(email="no-at-sign.example.net")]),
            metadata=running_mesh.auth(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = next(d for d in _details(caught.value) if isinstance(d, error_details_pb2.BadRequest))
    assert [v.field for v in bad.field_violations] == ["to[0].email"]
    assert _balance(running_mesh).available == before.available


def test_not_enough_credits_is_failed_precondition_with_the_shortfall(running_mesh: RunningMesh):
    poor_key = running_mesh.new_tenant(credits=0)
    with running_mesh.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        messages_pb2_grpc.MessageServiceStub(channel).SendEmail(
            _send_request(), metadata=running_mesh.auth(poor_key), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = next(d for d in _details(caught.value) if isinstance(d, error_details_pb2.ErrorInfo))
    assert info.reason == "INSUFFICIENT_CREDITS"
    assert int(info.metadata["shortfall"]) > 0
