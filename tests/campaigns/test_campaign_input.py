"""Bad input to the campaign RPCs gets a clear status with details, and loses nothing already accepted; recipients
come in by stream or by import of an uploaded file."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
from esp.v1 import (
    attachments_pb2,
    attachments_pb2_grpc,
    campaigns_pb2,
    common_pb2,
    messages_pb2,
    messages_pb2_grpc,
)
from google.rpc import error_details_pb2, status_pb2

from dev.mesh import DEV_UNSUBSCRIBE_KEYS
from libs.common.unsubscribe import UnsubscribeTarget, UnsubscribeTokens, unsubscribe_url
from services.campaigns.expansion import campaign_message_id
from tests.campaigns.conftest import CampaignMesh, campaign, create_and_fill, progress, wait_until


def _details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest]:
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(info.DESCRIPTOR):
                    detail.Unpack(info)
                elif detail.Is(bad.DESCRIPTOR):
                    detail.Unpack(bad)
    return info, bad


def test_a_template_syntax_error_is_refused_with_its_line_and_column(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign(
            "syntax", text_body="Hello\n{% if vip %}gold")), metadata=campaign_mesh.auth(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = _details(refused.value)
    violation = next(v for v in bad.field_violations if v.field == "campaign.text_body")
    assert "line 2" in violation.description


def test_an_otp_campaign_and_a_bulk_campaign_without_unsubscribe_are_refused(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    c = campaign("bad-fields", message_class=common_pb2.MESSAGE_CLASS_OTP)
    c.unsubscribe.mode = campaigns_pb2.UNSUBSCRIBE_MODE_NONE
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=c), metadata=campaign_mesh.auth(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in _details(refused.value)[1].field_violations}
    assert "campaign.message_class" in fields


def test_malformed_rows_are_reported_by_row_and_the_others_added(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    with channel:
        created = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("rows")), metadata=auth,
                                      timeout=10)

        def frames() -> Iterator[campaigns_pb2.AddCampaignRecipientsRequest]:
            yield campaigns_pb2.AddCampaignRecipientsRequest(campaign=created.name, recipients=[
                campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="a@example.org")),
                campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="not an address")),
                campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="A@example.org")),
                campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="b@example.org",
                                                                                name="B\r\nBcc: x@evil.test")),
                campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="c@example.org")),
            ])

        added = stub.AddCampaignRecipients(frames(), metadata=auth, timeout=10)
        assert (added.added_count, added.duplicate_count, added.rejected_count) == (2, 1, 2)
        assert [e.row for e in added.errors] == [2, 4]
        c = progress(stub, auth, created.name)
        assert (c.progress.recipients, c.progress.duplicates, c.progress.invalid) == (2, 1, 2)


def test_starting_without_recipients_or_credits_is_refused(campaign_mesh: CampaignMesh) -> None:
    _, broke = campaign_mesh.new_tenant(0)
    channel, stub = campaign_mesh.campaigns()
    with channel:
        empty = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("empty")),
                                    metadata=campaign_mesh.auth(), timeout=10)
        with pytest.raises(grpc.RpcError) as no_recipients:
            stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=empty.name), metadata=campaign_mesh.auth(),
                               timeout=10)
        assert no_recipients.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _details(no_recipients.value)[0].reason == "NO_RECIPIENTS"
        poor = create_and_fill(stub, campaign_mesh.auth(broke), campaign("poor"), 5)
        with pytest.raises(grpc.RpcError) as no_credits:
            stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=poor.name), metadata=campaign_mesh.auth(broke),
                               timeout=10)
        assert no_credits.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _details(no_credits.value)[0].reason == "INSUFFICIENT_CREDITS"
        assert progress(stub, campaign_mesh.auth(broke), poor.name).progress.recipients == 5


def test_a_recipient_missing_a_variable_fails_alone(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    with channel:
        created = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("missing-var")),
                                      metadata=auth, timeout=10)
        stub.AddCampaignRecipients(iter([campaigns_pb2.AddCampaignRecipientsRequest(campaign=created.name, recipients=[
            campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="full@example.org"),
                                            variables={"first_name": "Ann", "code": "1"}),
            campaigns_pb2.CampaignRecipient(address=common_pb2.EmailAddress(email="partial@example.org"),
                                            variables={"first_name": "Bob"}),
        ])]), metadata=auth, timeout=10)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        done = wait_until(lambda: (c := progress(stub, auth, created.name)).state ==
                          campaigns_pb2.CAMPAIGN_STATE_COMPLETED and c, 30, "completed")
        assert (done.progress.sent, done.progress.failed) == (1, 1)
        assert [m["to"][0] for m in campaign_mesh.delivered("missing-var")] == ["full@example.org"]
        # The failed recipient is a message the customer can look up, with the reason.
        failed_id = campaign_message_id(created.id, 2)
        message = messages_pb2_grpc.MessageServiceStub(channel).GetMessage(
            messages_pb2.GetMessageRequest(name=f"messages/{failed_id}"), metadata=auth, timeout=10)
        assert message.state == messages_pb2.MESSAGE_STATE_FAILED
        assert message.campaign == created.name
        events = messages_pb2_grpc.MessageServiceStub(channel).ListMessageEvents(
            messages_pb2.ListMessageEventsRequest(parent=message.name), metadata=auth, timeout=10).events
        assert any("MISSING_VARIABLE" in e.reason and "code" in e.reason for e in events)


def test_another_tenants_campaign_is_not_found(campaign_mesh: CampaignMesh) -> None:
    _, other = campaign_mesh.new_tenant(0)
    channel, stub = campaign_mesh.campaigns()
    with channel:
        mine = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("mine")),
                                   metadata=campaign_mesh.auth(), timeout=10)
        for call in (lambda: stub.GetCampaign(campaigns_pb2.GetCampaignRequest(name=mine.name),
                                              metadata=campaign_mesh.auth(other), timeout=10),
                     lambda: stub.CancelCampaign(campaigns_pb2.CancelCampaignRequest(name=mine.name),
                                                 metadata=campaign_mesh.auth(other), timeout=10)):
            with pytest.raises(grpc.RpcError) as hidden:
                call()
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


def test_recipients_import_from_an_uploaded_csv(campaign_mesh: CampaignMesh) -> None:
    body = "email,name,first_name,code\n" + "".join(f"i{i}@example.org,I {i},Imp{i},X{i}\n" for i in range(50))
    body += "broken-address,Nobody,N,0\n"
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    with channel:
        uploads = attachments_pb2_grpc.AttachmentServiceStub(channel)
        attachment = uploads.UploadAttachment(iter([
            attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
                filename="list.csv", content_type="text/csv")),
            attachments_pb2.UploadAttachmentRequest(chunk=body.encode()),
        ]), metadata=auth, timeout=30)
        created = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("import")),
                                      metadata=auth, timeout=10)
        imported = stub.ImportCampaignRecipients(campaigns_pb2.ImportCampaignRecipientsRequest(
            campaign=created.name, attachment_id=attachment.id), metadata=auth, timeout=60)
        assert (imported.added_count, imported.rejected_count) == (50, 1)
        assert imported.errors[0].row == 52  # the header is row 1
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        delivered = wait_until(lambda: len(d := campaign_mesh.delivered("import")) == 50 and d, 30, "50 sent")
        assert {m["subject"] for m in delivered} == {f"Hello Imp{i}" for i in range(50)}


def _one_click(url: str) -> httpx.Response:
    """The POST a mail client sends for RFC 8058 one-click unsubscribe."""
    return httpx.post(url, content=b"List-Unsubscribe=One-Click",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)


def test_a_one_click_unsubscribe_stops_the_rest_of_the_campaign_to_that_address(
        campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    with channel:
        created = create_and_fill(stub, auth, campaign("unsubscribe", send_rate=10.0), 40)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        first = wait_until(lambda: campaign_mesh.delivered("unsubscribe"), 30, "a first email")[0]
        header = first["headers"]["List-Unsubscribe"]
        assert first["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert _one_click(header.strip("<>")).status_code == 200
        # The last recipient's own link, as its email would carry it (signed with the mesh's key).
        tokens = UnsubscribeTokens.from_entries([DEV_UNSUBSCRIBE_KEYS])
        last = "r39@example.org"
        url = unsubscribe_url(f"http://127.0.0.1:{campaign_mesh.config.webhook_port}",
                              tokens.sign(UnsubscribeTarget(campaign_mesh.tenant, last, created.id)))
        assert _one_click(url).status_code == 200
        done = wait_until(lambda: (c := progress(stub, auth, created.name)).state ==
                          campaigns_pb2.CAMPAIGN_STATE_COMPLETED and c, 60, "completed",
                          progress=campaign_mesh.provider_calls)
        delivered = [m["to"][0] for m in campaign_mesh.delivered("unsubscribe")]
        assert last not in delivered
        assert len(delivered) == 39
        assert done.progress.suppressed + done.progress.failed == 1


def test_a_topic_unsubscribe_stops_that_topic_only(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    tokens = UnsubscribeTokens.from_entries([DEV_UNSUBSCRIBE_KEYS])
    base = f"http://127.0.0.1:{campaign_mesh.config.webhook_port}"
    with channel:
        deals = campaign("topic-deals")
        deals.unsubscribe.topic = "weekly-deals"
        news = campaign("topic-news")
        news.unsubscribe.topic = "product-news"
        first = create_and_fill(stub, auth, deals, 3, domain="topic.example.org")
        assert _one_click(unsubscribe_url(base, tokens.sign(UnsubscribeTarget(
            campaign_mesh.tenant, "r0@topic.example.org", first.id, "weekly-deals")))).status_code == 200
        second = create_and_fill(stub, auth, news, 3, domain="topic.example.org")
        for created in (first, second):
            stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        for created in (first, second):
            wait_until(lambda c=created: progress(stub, auth, c.name).state ==
                       campaigns_pb2.CAMPAIGN_STATE_COMPLETED, 30, "completed")
        assert sorted(m["to"][0] for m in campaign_mesh.delivered("topic-deals")) == ["r1@topic.example.org",
                                                                                       "r2@topic.example.org"]
        assert progress(stub, auth, first.name).progress.suppressed == 1
        news_mail = campaign_mesh.delivered("topic-news")
        assert len(news_mail) == 3
        # Each email's own link leaves its campaign's topic.
        token = news_mail[0]["headers"]["List-Unsubscribe"].strip("<>").rsplit("/", 1)[1]
        assert tokens.verify(token).topic == "product-news"
