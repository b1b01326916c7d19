"""``esp events export`` and ``esp stats export`` against a real mesh (services as processes): the CLI's ``main`` runs
in this process, as a shell would run it. Events are recorded straight into the mesh's database by the real
recorder, as reports' consumer records them."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

from services.reports.envelopes import decode_envelope
from services.reports.recorder import record_events
from tests.campaigns.conftest import CampaignMesh, campaign_mesh
from tests.client.cli import Esp, cli_runner
from tests.reports.builders import accepted, new_id, sender_event

__all__ = ["campaign_mesh"]  # the module-scoped mesh fixture, used here

MESSAGES = 300


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def recorded(campaign_mesh: CampaignMesh) -> Iterator[tuple[str, datetime, list[str]]]:
    """(API key, start of a one-day range, the event ids in it in export order) of a fresh tenant."""
    tenant, key = campaign_mesh.new_tenant(0)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    envelopes: list[queue_pb2.EventEnvelope] = []
    for index in range(MESSAGES):
        message_id = f"cli{index:04d}-{new_id()[:8]}"
        when = start + timedelta(minutes=index)
        envelopes.append(accepted(tenant, message_id, when, to=(f"u{index}@example.com",)))
        envelopes.append(sender_event(tenant, message_id, messages_pb2.MESSAGE_EVENT_TYPE_SENT,
                                      when + timedelta(seconds=5), provider="ses", provider_message_id=new_id(),
                                      final=True))

    async def record() -> None:
        async with await psycopg.AsyncConnection.connect(campaign_mesh.config.postgres_dsn, autocommit=True) as conn:
            async with conn.transaction():
                await record_events(conn, [decode_envelope(e.SerializeToString()) for e in envelopes])

    asyncio.run(record())
    yield key, start, [e.event.event_id for e in envelopes]


@pytest.fixture
def esp(campaign_mesh: CampaignMesh, recorded: tuple[str, datetime, list[str]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Esp:
    return cli_runner(campaign_mesh.endpoint, recorded[0], monkeypatch, capsys)


def _csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def test_events_export_writes_every_event_to_the_file(esp: Esp, recorded: tuple[str, datetime, list[str]],
                                                      tmp_path: Path) -> None:
    _, start, event_ids = recorded
    target = tmp_path / "events.csv"

    run = esp("events", "export", "--start", _iso(start), "--end", _iso(start + timedelta(days=1)), "-o", str(target))

    assert run.code == 0, run.err
    assert run.out == ""
    assert f"{target}: {target.stat().st_size} bytes" in run.err
    header, *rows = _csv(target.read_text(encoding="utf-8"))
    assert header[:3] == ["event_id", "type", "time"]
    assert [row[0] for row in rows] == event_ids
    assert list(tmp_path.iterdir()) == [target]  # no .part left behind


def test_events_export_to_standard_output_with_a_filter(esp: Esp, recorded: tuple[str, datetime, list[str]]) -> None:
    _, start, event_ids = recorded

    run = esp("events", "export", "--start", _iso(start), "--end", _iso(start + timedelta(days=1)),
              "--type", "message.sent")

    assert run.code == 0, run.err
    _, *rows = _csv(run.out)
    assert [row[0] for row in rows] == event_ids[1::2]
    assert {row[1] for row in rows} == {"message.sent"}


def test_a_refused_export_prints_the_reason_and_leaves_no_file(esp: Esp, recorded: tuple[str, datetime, list[str]],
                                                               tmp_path: Path) -> None:
    _, start, _ = recorded
    target = tmp_path / "events.csv"

    run = esp("events", "export", "--start", _iso(start), "--end", _iso(start + timedelta(days=45)),
              "-o", str(target))

    assert run.code == 1
    assert run.err.startswith("INVALID_ARGUMENT: ")
    assert "  end_time: the range may cover at most 30 days" in run.err
    assert list(tmp_path.iterdir()) == []


def test_stats_export_writes_the_figures(esp: Esp, recorded: tuple[str, datetime, list[str]]) -> None:
    _, start, _ = recorded

    run = esp("stats", "export", "--start", _iso(start), "--end", _iso(start + timedelta(days=1)),
              "--dimension", "provider", "--dimension", "hour", "--metric", "sent", "--metric", "accepted")

    assert run.code == 0, run.err
    header, *rows = _csv(run.out)
    assert header == ["bucket", "provider", "sent", "accepted"]
    assert sum(int(row[2]) for row in rows) == MESSAGES
    assert {row[1] for row in rows if int(row[2])} == {"ses"}


def test_stats_show_prints_a_row_per_group_and_the_total(esp: Esp, recorded: tuple[str, datetime, list[str]]) -> None:
    _, start, _ = recorded

    run = esp("stats", "show", "--start", _iso(start), "--end", _iso(start + timedelta(days=1)),
              "--dimension", "provider", "--metric", "sent", "--metric", "send_latency")

    assert run.code == 0, run.err
    header, *rows = [line.split() for line in run.out.splitlines()]
    assert header == ["provider", "sent", "send_latency", "p50/p95/p99", "ms"]
    by_provider = {row[0]: row[1:] for row in rows}
    assert by_provider["ses"][0] == str(MESSAGES)
    assert by_provider["total"][0] == str(MESSAGES)
    p50, p95, p99 = (float(v) for v in by_provider["ses"][1].split("/"))
    assert 5_000 / 1.25 <= p50 <= p95 <= p99 <= 5_000 * 1.25  # every email was sent 5 s after it was accepted


def test_stats_show_refuses_an_unknown_dimension_naming_it(esp: Esp, recorded: tuple[str, datetime, list[str]]) -> None:
    run = esp("stats", "show", "--dimension", "colour")

    assert run.code == 1
    assert "colour" in run.err
