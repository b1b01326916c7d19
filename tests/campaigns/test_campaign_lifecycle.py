"""Campaigns against the real mesh (services as processes, the simulator as the provider)."""

from __future__ import annotations

from esp.v1 import campaigns_pb2

from tests.campaigns.conftest import CampaignMesh, campaign, create_and_fill, progress, wait_until


def test_each_recipient_receives_their_own_values(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    with channel:
        created = create_and_fill(stub, auth, campaign("own-values"), 300)
        started = stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        assert started.state == campaigns_pb2.CAMPAIGN_STATE_RUNNING
        delivered = wait_until(lambda: len(campaign_mesh.delivered("own-values")) >= 300 and
                               campaign_mesh.delivered("own-values"), 60, "300 emails at the provider",
                               progress=campaign_mesh.provider_calls)
        by_recipient = {m["to"][0]: m for m in delivered}
        assert len(by_recipient) == 300 == len(delivered)
        for i in (0, 150, 299):
            message = by_recipient[f"r{i}@example.org"]
            assert message["subject"] == f"Hello Name{i}"
            assert f"code C{i:06d}" in message["text"]
            assert "List-Unsubscribe" in message["headers"]
        # Plain-substitution templates travel unrendered: Mailgun takes many recipients a call.
        calls = campaign_mesh.requests_with("own-values")
        assert len(calls) <= 30, f"{len(calls)} provider calls for 300 emails"
        done = wait_until(lambda: (c := progress(stub, auth, created.name)).state ==
                          campaigns_pb2.CAMPAIGN_STATE_COMPLETED and c, 30, "campaign completed")
        assert done.progress.sent == 300
        assert done.progress.pending == 0 and done.progress.queued == 0
