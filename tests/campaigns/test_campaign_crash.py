"""The expander killed with SIGKILL mid-expansion, then restarted: every recipient is queued exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from esp.v1 import campaigns_pb2

from tests.campaigns.conftest import CampaignMesh, campaign, create_and_fill, progress, wait_until

RECIPIENTS = 10_000


def _expander_pid(campaigns_pid: int) -> int:
    found = subprocess.run(["pgrep", "-P", str(campaigns_pid), "-f", "services.campaigns.expander"],
                           capture_output=True, text=True, check=False).stdout.split()
    assert found, "the campaigns service has no expander worker"
    return int(found[0])


def test_sigkill_mid_expansion_queues_each_recipient_exactly_once(campaign_mesh: CampaignMesh) -> None:
    channel, stub = campaign_mesh.campaigns()
    auth = campaign_mesh.auth()
    service = campaign_mesh.mesh.processes["campaigns"]
    with channel:
        created = create_and_fill(stub, auth, campaign("crash"), RECIPIENTS)
        stub.StartCampaign(campaigns_pb2.StartCampaignRequest(name=created.name), metadata=auth, timeout=10)
        mid = wait_until(lambda: 0 < (c := progress(stub, auth, created.name)).progress.pending < RECIPIENTS and c,
                         30, "expansion under way", every_s=0.01)
        os.kill(_expander_pid(service.popen.pid), signal.SIGKILL)
        killed_at_pending = mid.progress.pending
        # Its parent treats a dead worker as fatal; take the service down for good and start it again.
        try:
            service.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
        campaign_mesh.mesh.start_service("campaigns")
        done = wait_until(lambda: (c := progress(stub, auth, created.name)).state ==
                          campaigns_pb2.CAMPAIGN_STATE_COMPLETED and c, 120, "completed after the restart",
                          progress=campaign_mesh.provider_calls)
        assert 0 < killed_at_pending < RECIPIENTS
        assert done.progress.sent == RECIPIENTS
        time.sleep(1)
        recipients = [m["to"][0] for m in campaign_mesh.delivered("crash")]
        assert len(recipients) == RECIPIENTS, "a recipient was sent twice or not at all"
        assert set(recipients) == {f"r{i}@example.org" for i in range(RECIPIENTS)}
