"""Replaying a recorded day (libs/routing_sim/replay.py and ``esp-routing simulate --traffic``): events exports
written here by the export's own code (``services.reports.exports``) are read back as the simulation's arrivals,
and replayed on a tiny market of two providers."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import tomllib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from libs.routing_sim import cli, scenario
from libs.routing_sim.replay import RecordedTraffic, cell_value, recorded_arrivals, recorded_day
from libs.routing_sim.scenario import Scenario, ScenarioError
from services.reports.event_listing import ListedEvent
from services.reports.exports import EVENT_COLUMNS, csv_chunks, event_row, neutralise
from services.reports.models import EventType

TINY_TOML = """\
name = "tiny-replay"
description = "Two providers; the replay tests' market."
seed = 11
window_minutes = 60

[[providers]]
id = "cheap"
type = "ses"
price_per_email_micros = 100
latency = { median_ms = 100, p99_ms = 500 }

[[providers]]
id = "dear"
type = "sendgrid"
price_per_email_micros = 600
latency = { median_ms = 80, p99_ms = 400 }

[traffic]
emails = 300
mix = { otp = 0.2, transactional = 0.3, bulk = 0.5 }
"""

DAY = datetime(2024, 3, 1, tzinfo=UTC)
"""The recorded day: every export here starts on it."""


def tiny() -> Scenario:
    return scenario.parse(tomllib.loads(TINY_TOML))


def event(message_id: str, event_type: EventType, at: datetime, message_class: str = "transactional", *,
          recipient: str = "rcpt@example.com", tags: Sequence[str] = (), metadata: dict[str, str] | None = None,
          reason: str = "") -> ListedEvent:
    return ListedEvent(
        event_id=f"ev-{message_id}-{event_type.value}-{at.timestamp()}", event_type=event_type, event_time=at,
        message_id=message_id, sequence=1, recipient=recipient, provider="ses-1", tags=tags,
        metadata=metadata or {}, campaign="", message_class=message_class, reason=reason, bounce_type="", url="",
        attempt=0)


def export(path: Path, events: Sequence[ListedEvent]) -> Path:
    """The events as the export writes them: its header, its rows, its CSV writer."""
    async def chunks() -> bytes:
        return b"".join([chunk async for chunk in csv_chunks(EVENT_COLUMNS, [event_row(e) for e in events])])

    path.write_bytes(asyncio.run(chunks()))
    return path


def write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def replay(path: Path, day: Scenario | None = None) -> RecordedTraffic:
    return recorded_arrivals(path, day or tiny())


def test_one_arrival_per_message_at_its_accepted_time(tmp_path: Path) -> None:
    at = DAY + timedelta(hours=10)
    csv_file = export(tmp_path / "events.csv", [
        event("a", EventType.ACCEPTED, at),
        event("b", EventType.ACCEPTED, at + timedelta(minutes=5, microseconds=250_000)),
        event("a", EventType.SENT, at + timedelta(seconds=1)),
        event("a", EventType.DELIVERED, at + timedelta(seconds=4)),
        # Accepted before the export's range: its earliest event stands for its acceptance.
        event("c", EventType.SENT, at + timedelta(minutes=7)),
        event("c", EventType.DELIVERED, at + timedelta(minutes=8)),
        # A sent event stamped before the acceptance (another clock): the acceptance is still the arrival.
        event("d", EventType.SENT, at + timedelta(minutes=9)),
        event("d", EventType.ACCEPTED, at + timedelta(minutes=9, seconds=2)),
        event("b", EventType.DELIVERED, at + timedelta(minutes=10)),
    ])
    recorded = replay(csv_file)
    start = 10 * 3600
    assert [a.at_s for a in recorded.arrivals] == [start, start + 300.25, start + 420, start + 542]
    assert [a.index for a in recorded.arrivals] == [0, 1, 2, 3]
    assert recorded.messages == 4
    assert recorded.dropped_outside_day == 0
    assert recorded.unknown_class == 0
    assert recorded.first_event == at
    assert recorded.day == DAY
    assert all(a.size_bytes >= 200 for a in recorded.arrivals)


def test_sizes_come_from_the_scenario_size_model_and_its_seed(tmp_path: Path) -> None:
    csv_file = export(tmp_path / "events.csv", [
        event(f"m{i}", EventType.ACCEPTED, DAY + timedelta(seconds=i), "bulk") for i in range(50)])
    day = tiny()
    sizes = [a.size_bytes for a in replay(csv_file, day).arrivals]
    assert sizes == [a.size_bytes for a in replay(csv_file, day).arrivals]
    assert sizes != [a.size_bytes for a in replay(csv_file, dataclasses.replace(day, seed=day.seed + 1)).arrivals]
    # The tiny market's bulk model is the default one: a median of 60 kB.
    assert 20_000 < sorted(sizes)[len(sizes) // 2] < 180_000


def test_the_class_comes_from_the_class_column(tmp_path: Path) -> None:
    at = DAY + timedelta(hours=8)
    csv_file = export(tmp_path / "events.csv", [
        event("otp", EventType.ACCEPTED, at, "otp"),
        event("bulk", EventType.ACCEPTED, at + timedelta(seconds=1), "bulk"),
        event("tx", EventType.ACCEPTED, at + timedelta(seconds=2), "transactional"),
        event("none", EventType.ACCEPTED, at + timedelta(seconds=3), ""),
        event("odd", EventType.ACCEPTED, at + timedelta(seconds=4), "carrier-pigeon"),
    ])
    recorded = replay(csv_file)
    assert [a.message_class for a in recorded.arrivals] == ["otp", "bulk", "transactional", "transactional",
                                                            "transactional"]
    assert recorded.unknown_class == 2


def test_messages_after_the_first_message_day_are_dropped_and_counted(tmp_path: Path) -> None:
    first = DAY + timedelta(hours=23)
    csv_file = export(tmp_path / "events.csv", [
        event("first", EventType.ACCEPTED, first),
        event("last-moment", EventType.ACCEPTED, DAY + timedelta(days=1, microseconds=-1)),
        event("first", EventType.DELIVERED, DAY + timedelta(days=1, minutes=1)),  # its acceptance is in the day
        event("midnight", EventType.ACCEPTED, DAY + timedelta(days=1)),
        event("next-day", EventType.ACCEPTED, DAY + timedelta(days=1, hours=5)),
    ])
    recorded = replay(csv_file)
    assert recorded.messages == 2
    assert recorded.dropped_outside_day == 2
    assert [a.at_s for a in recorded.arrivals] == pytest.approx([23 * 3600, 86400 - 1e-6], abs=1e-9)
    assert recorded.first_event == first


def test_formula_quoted_cells_are_read_back(tmp_path: Path) -> None:
    hostile = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx"]
    for text in hostile:
        assert cell_value(neutralise(text)) == text
    assert cell_value("'quoted by its author") == "'quoted by its author"
    assert cell_value("plain") == "plain"
    at = DAY + timedelta(hours=12)
    csv_file = export(tmp_path / "events.csv", [
        event("m1", EventType.ACCEPTED, at, "otp", recipient="=cmd|' /C calc'!A0", tags=["-tag", "@t"],
              metadata={"k": "=1+1"}, reason='a "reason",\r\nover two lines'),
        event("m1", EventType.DELIVERED, at + timedelta(seconds=1), "otp", recipient="+rcpt@example.com"),
    ])
    text = csv_file.read_text(encoding="utf-8")
    assert "'=cmd" in text and "'+rcpt" in text  # the export did quote them
    recorded = replay(csv_file)
    assert [(a.at_s, a.message_class) for a in recorded.arrivals] == [(12 * 3600, "otp")]
    assert recorded.unknown_class == 0


Change = Callable[[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]
"""Turns a good export's header and rows into a broken file's."""


@pytest.mark.parametrize(("change", "expected"), [
    (lambda header, rows: ([c for c in header if c != "class"], [r[:-1] for r in rows]), "row 1 (the header)"),
    (lambda header, rows: (header, [rows[0], [*rows[1][:2], "yesterday", *rows[1][3:]]]), "row 3, column time"),
    (lambda header, rows: (header, [rows[0], [*rows[1][:2], "2024-03-01T10:00:00", *rows[1][3:]]]),
     "row 3, column time: no UTC offset"),
    (lambda header, rows: (header, [rows[0], [*rows[1][:3], "", *rows[1][4:]]]), "row 3, column message"),
    (lambda header, rows: (header, [rows[0], rows[1][:5]]), "row 3: 5 cells"),
])
def test_a_file_that_is_not_an_events_export_is_refused_naming_the_row(tmp_path: Path, change: Change,
                                                                        expected: str) -> None:
    at = DAY + timedelta(hours=1)
    good = export(tmp_path / "good.csv", [event("a", EventType.ACCEPTED, at), event("b", EventType.ACCEPTED, at)])
    header, *rows = list(csv.reader(good.read_text(encoding="utf-8").splitlines(keepends=True)))
    new_header, new_rows = change(header, rows)
    bad = write_rows(tmp_path / "bad.csv", new_header, new_rows)
    with pytest.raises(ScenarioError) as refused:
        replay(bad)
    message = str(refused.value)
    assert message.startswith(f"{bad}: {expected}")
    if "header" in expected:
        assert "class" in message


def test_an_empty_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="row 1: empty file"):
        (tmp_path / "empty.csv").write_bytes(b"")
        replay(tmp_path / "empty.csv")
    with pytest.raises(ScenarioError, match="no message events"):
        replay(export(tmp_path / "header-only.csv", []))
    with pytest.raises(ScenarioError, match="cannot read"):
        replay(tmp_path / "missing.csv")


def test_the_replayed_day_describes_the_recorded_traffic(tmp_path: Path) -> None:
    csv_file = export(tmp_path / "events.csv", [
        event("a", EventType.ACCEPTED, DAY + timedelta(hours=3), "bulk"),
        event("b", EventType.ACCEPTED, DAY + timedelta(hours=3, minutes=1), "bulk"),
        event("c", EventType.ACCEPTED, DAY + timedelta(hours=9), "transactional"),
    ])
    day = tiny()
    replayed = recorded_day(day, replay(csv_file, day))
    assert replayed.providers == day.providers
    assert replayed.traffic.emails == 3
    assert dict(replayed.traffic.mix) == {"otp": 0.0, "transactional": 1 / 3, "bulk": 2 / 3}
    assert replayed.traffic.hourly_weights[3] == 2
    assert replayed.traffic.hourly_weights[9] == 1


def recorded_day_export(path: Path, messages: int, after_the_day: int) -> Path:
    """``messages`` messages spread over the recorded day (a third otp, a third bulk), each accepted then
    delivered, and ``after_the_day`` more the next morning."""
    classes = ("otp", "transactional", "bulk")
    events = []
    for i in range(messages):
        at = DAY + timedelta(seconds=60 + i * (86000 // messages))
        events.append(event(f"m{i}", EventType.ACCEPTED, at, classes[i % 3]))
        events.append(event(f"m{i}", EventType.DELIVERED, at + timedelta(seconds=2), classes[i % 3]))
    events += [event(f"late{i}", EventType.ACCEPTED, DAY + timedelta(days=1, hours=1, seconds=i))
               for i in range(after_the_day)]
    return export(path, events)


def test_cli_simulate_replays_a_traffic_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario_file = tmp_path / "tiny.toml"
    scenario_file.write_text(TINY_TOML)
    traffic = recorded_day_export(tmp_path / "events.csv", 300, 3)
    report = tmp_path / "r.html"
    assert cli.main(["simulate", "--scenario", str(scenario_file), "--traffic", str(traffic),
                     "--report", str(report)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("replayed 300 recorded messages of 2024-03-01")
    assert "dropped 3 after that day" in lines[0]
    assert "production" in captured.out
    assert "300 emails" in captured.err
    assert report.read_text().startswith("<!DOCTYPE html>")


def test_cli_refuses_a_traffic_file_that_is_not_an_export(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    scenario_file = tmp_path / "tiny.toml"
    scenario_file.write_text(TINY_TOML)
    traffic = write_rows(tmp_path / "stats.csv", ["day", "sent"], [["2024-03-01", "10"]])
    assert cli.main(["simulate", "--scenario", str(scenario_file), "--traffic", str(traffic),
                     "--report", str(tmp_path / "r.html")]) == 2
    captured = capsys.readouterr()
    assert f"{traffic}: row 1 (the header)" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not (tmp_path / "r.html").exists()
