"""Calls that last as long as their work are not cut by the edge's upstream timeout meant for unary calls: a
recipients stream or an import longer than it still completes (the mesh here times upstream calls out after 1 s)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import pytest
from esp.v1 import attachments_pb2, attachments_pb2_grpc, campaigns_pb2

from dev import mesh as m
from tests.campaigns.conftest import CampaignMesh, campaign, recipients_frames, start_campaign_mesh
from tests.conftest import S3Server

ROWS = 100_000
"""Enough rows that adding them takes well over the 1 s upstream timeout on this machine."""


@pytest.fixture(scope="module")
def impatient_mesh(new_database: Callable[[], str], redis_url: str, nats_url: str, s3_server: S3Server, run_id: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[CampaignMesh]:
    namespace = f"{run_id}l{secrets.token_hex(2)}"
    running = start_campaign_mesh(new_database(), redis_url, nats_url, s3_server, namespace,
                                  tmp_path_factory.mktemp("long-calls-logs"), {"ESP_UPSTREAM_TIMEOUT_S": "1"})
    yield running
    running.mesh.stop()
    asyncio.run(m.forget_namespace(namespace, nats_url, redis_url))


def test_a_recipients_stream_longer_than_the_upstream_timeout_completes(impatient_mesh: CampaignMesh) -> None:
    channel, stub = impatient_mesh.campaigns()
    auth = impatient_mesh.auth()
    with channel:
        created = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("long-stream")),
                                      metadata=auth, timeout=10)
        added = stub.AddCampaignRecipients(recipients_frames(created.name, ROWS), metadata=auth, timeout=300)
    assert added.added_count == ROWS


def test_an_import_longer_than_the_upstream_timeout_completes(impatient_mesh: CampaignMesh) -> None:
    body = ("email,first_name,code\n" + "".join(f"i{i}@example.org,I{i},{i}\n" for i in range(ROWS))).encode()
    channel, stub = impatient_mesh.campaigns()
    auth = impatient_mesh.auth()
    with channel:
        uploads = attachments_pb2_grpc.AttachmentServiceStub(channel)
        frames = [attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename="list.csv", content_type="text/csv"))]
        frames += [attachments_pb2.UploadAttachmentRequest(chunk=body[i:i + (1 << 20)])
                   for i in range(0, len(body), 1 << 20)]
        attachment = uploads.UploadAttachment(iter(frames), metadata=auth, timeout=60)
        created = stub.CreateCampaign(campaigns_pb2.CreateCampaignRequest(campaign=campaign("long-import")),
                                      metadata=auth, timeout=10)
        imported = stub.ImportCampaignRecipients(campaigns_pb2.ImportCampaignRecipientsRequest(
            campaign=created.name, attachment_id=attachment.id), metadata=auth, timeout=300)
    assert imported.added_count == ROWS
