"""The history checker finds each broken promise in a recorded history (and none in a clean one)."""

from __future__ import annotations

from typing import Any

from dev.chaos.history import PhaseHistory, StoredEmail, check
from dev.chaos.load import ClientRecord

PHASE = "p01-kill-sender"


def _client(key: str, message_id: str = "", outcome: str = "accepted", code: str = "OK", **extra: Any) -> ClientRecord:
    return ClientRecord(key=key, phase=PHASE, message_class="bulk", via="grpc", request_id="", outcome=outcome,
                        message_id=message_id, code=code, **extra)


def _stored(message_id: str, key: str, state: str = "sent", hold: str = "committed", commits: int = 1,
            amount: int = 1) -> StoredEmail:
    return StoredEmail(message_id, key, "", "bulk", amount, state=state, hold_state=hold, hold_amount=amount,
                       commits=commits if hold == "committed" else 0,
                       committed=commits * amount if hold == "committed" else 0)


def _take(result: str = "accepted", at: float = 100.0, personality: str = "mailgun-us") -> dict[str, Any]:
    return {"result": result, "personality": personality, "at": at, "rejected": False}


def _history(clients: list[ClientRecord], stored: list[StoredEmail], takes: dict[str, list[dict[str, Any]]],
             *, crash_window: bool = False, balance: tuple[int, int, int] = (10, 0, 2),
             journal: tuple[int, int, int] = (10, 0, 2)) -> PhaseHistory:
    return PhaseHistory(PHASE, ("kill-sender",), crash_window, clients, {s.message_id: s for s in stored}, takes,
                        balance, journal)


def _kinds(history: PhaseHistory) -> set[str]:
    return {violation.split(":", 1)[0] for violation in check(history).violations}


def test_a_clean_history_has_no_violations_and_counts_every_email_delivered():
    history = _history([_client("a", "m1"), _client("b", "m2")], [_stored("m1", "a"), _stored("m2", "b")],
                       {"m1": [_take()], "m2": [_take()]})
    verdict = check(history)
    assert verdict.violations == []
    assert (verdict.accepted, verdict.sent, verdict.lost, verdict.delivered_ratio) == (2, 2, 0, 1.0)


def test_an_acknowledged_email_that_was_never_stored_is_lost():
    verdict = check(_history([_client("a", "m1")], [], {}))
    assert verdict.lost == 1 and _kinds(_history([_client("a", "m1")], [], {})) == {"lost"}


def test_a_stored_email_that_never_reaches_a_final_state_is_lost():
    history = _history([_client("a", "m1")], [_stored("m1", "a", state="deferred", hold="held")], {})
    assert check(history).lost == 1 and _kinds(history) == {"lost"}


def test_a_hold_committed_twice_is_a_double_charge():
    history = _history([_client("a", "m1")], [_stored("m1", "a", commits=2)], {"m1": [_take()]})
    assert check(history).double_charges == 1 and _kinds(history) == {"double_charge"}


def test_a_failed_email_whose_hold_was_committed_is_a_charge_mismatch():
    history = _history([_client("a", "m1")], [_stored("m1", "a", state="failed", hold="committed")], {})
    assert _kinds(history) == {"charge_mismatch"}


def test_a_second_send_with_nothing_ambiguous_is_a_violation():
    history = _history([_client("a", "m1")], [_stored("m1", "a")], {"m1": [_take(), _take(at=101)]})
    assert _kinds(history) == {"duplicate"}


def test_a_second_send_after_an_ambiguous_timeout_is_counted_not_a_violation():
    history = _history([_client("a", "m1")], [_stored("m1", "a")], {"m1": [_take("hung"), _take(at=101)]})
    verdict = check(history)
    assert verdict.violations == [] and verdict.duplicates == {"ambiguous_timeout": 1}


def test_a_second_send_when_a_crash_could_cut_the_recording_is_counted_not_a_violation():
    history = _history([_client("a", "m1")], [_stored("m1", "a")], {"m1": [_take(), _take(at=101)]},
                       crash_window=True)
    verdict = check(history)
    assert verdict.violations == [] and verdict.duplicates == {"crash_window": 1}


def test_a_refused_request_that_was_stored_is_a_silent_accept():
    history = _history([_client("a", outcome="refused", code="INVALID_ARGUMENT")], [_stored("m1", "a")],
                       {"m1": [_take()]})
    assert _kinds(history) == {"silent_accept"}


def test_one_request_stored_twice_breaks_idempotency():
    history = _history([_client("a", "m1")], [_stored("m1", "a"), _stored("m2", "a")],
                       {"m1": [_take()], "m2": [_take()]})
    assert _kinds(history) == {"idempotency"}


def test_an_email_reaching_a_provider_after_its_cancel_was_acknowledged_is_a_violation():
    client = _client("a", "m1", cancel="acknowledged", cancel_acked_at=99.0)
    history = _history([client], [_stored("m1", "a")], {"m1": [_take(at=100.0)]})
    assert "sent_after_cancel" in _kinds(history)


def test_a_client_told_internal_is_a_violation():
    history = _history([_client("a", outcome="unknown", code="INTERNAL")], [], {})
    assert _kinds(history) == {"internal_error"}


def test_balances_that_differ_from_the_journal_are_a_violation():
    history = _history([], [], {}, balance=(10, 1, 2), journal=(10, 0, 3))
    assert _kinds(history) == {"balance"}


def test_mail_sent_to_dearer_providers_right_after_recovery_is_a_routing_burst():
    stored = [_stored(f"m{i}", f"k{i}") for i in range(20)]
    takes = {f"m{i}": [_take(at=100.5, personality="sendgrid-1" if i < 10 else "mailgun-us")] for i in range(20)}
    history = _history([], stored, takes)
    history.healed_at = 100.0
    verdict = check(history)
    assert verdict.dearer_after_recovery == (10, 20) and _kinds(history) == {"routing_burst"}


def test_an_acknowledged_cancel_that_ends_cancelled_with_no_provider_call_is_kept():
    client = _client("a", "m1", cancel="acknowledged", cancel_acked_at=99.0)
    history = _history([client], [_stored("m1", "a", state="cancelled", hold="released")], {})
    verdict = check(history)
    assert verdict.violations == [] and verdict.cancelled == 1


def test_a_cancel_answered_with_another_state_allows_the_send_under_way():
    client = _client("a", "m1", cancel="requested:MESSAGE_STATE_ACCEPTED")
    history = _history([client], [_stored("m1", "a")], {"m1": [_take(at=100.0)]})
    assert check(history).violations == []
