"""What the health board is told about a failed call (``services.sender.outcomes.recorded_call``): whether its quota
was spent."""

from __future__ import annotations

from libs.providers.model import Outcome, SendResult
from libs.routing.health import CallHealth
from services.sender.outcomes import recorded_call

CONNECTION_REFUSED = SendResult(Outcome.RETRYABLE, reason="ConnectError: connection refused", provider_fault=True)
SERVICE_UNAVAILABLE = SendResult(Outcome.RETRYABLE, reason="503", status_code=503, provider_fault=True)


def test_a_call_the_provider_never_answered_gives_its_quota_back():
    recorded = recorded_call("p", [CONNECTION_REFUSED], emails=1, probe=False)

    assert recorded.outcome is CallHealth.FAILURE and recorded.refund_emails == 1


def test_a_call_the_provider_answered_with_a_failure_keeps_its_quota_spent():
    recorded = recorded_call("p", [SERVICE_UNAVAILABLE], emails=1, probe=False)

    assert recorded.outcome is CallHealth.FAILURE and recorded.refund_emails == 0
