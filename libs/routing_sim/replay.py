"""Recorded traffic: one day of real messages, read from an events export, replayed on a scenario's market.

The issue's second what-if form: "replay a recorded window of real traffic against a proposed change of the
provider catalog". ``recorded_arrivals`` turns the CSV that ``esp events export`` (``EventService.ExportEvents``,
``services.reports.exports``) writes into the same ``Arrival`` list ``traffic.arrivals`` draws, so ``compare(...,
emails=...)`` runs every policy and the oracle over the real day on the scenario's providers and events.

What is read, one message at a time:

- **When.** A message arrives at its ``message.accepted`` event; a message whose acceptance is not in the file
  (the export's range began after it) arrives at its earliest event. Times count from the UTC midnight of the
  earliest message's day; the simulated day is 24 hours, so messages after it are dropped (and counted).
- **Class.** The ``class`` column (the message's class, the same on each of its rows). A message without a known
  class is replayed as transactional (and counted): the class the platform gives a message that names none.
- **Size.** The export has no sizes, so they are drawn from the scenario's size model of each class by
  ``traffic.py``'s own draw (``traffic.draw_sizes``, reused as it is: lognormal bodies, attachments for the model's
  share, attachments as links when too large for every provider), with a generator seeded by the scenario's seed —
  the same file on the same scenario replays the same day.

The file is streamed through the ``csv`` module: what stays in memory is one small record per message (its best
time so far and its class), never the rows. Text cells the export quoted against spreadsheet formulas (a leading
``'`` before ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) are read back without the quote
(``cell_value``). A file that is not such an export is refused with a ``ScenarioError`` naming the file, the row
(the header is row 1, as a spreadsheet shows it) and the column.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import numpy as np

from libs.common.message_classes import MessageClass
from libs.providers.capabilities import provider_size_cap
from libs.routing_sim.scenario import Scenario, ScenarioError
from libs.routing_sim.traffic import Arrival, draw_sizes

__all__ = ["ACCEPTED", "REQUIRED_COLUMNS", "RecordedTraffic", "cell_value", "recorded_arrivals", "recorded_day"]

ACCEPTED = "message.accepted"
"""The event type whose time is a message's arrival."""
REQUIRED_COLUMNS = ("time", "type", "message", "class")
"""The export's columns a replay reads (``services.reports.exports.EVENT_COLUMNS`` has them all)."""

_CLASSES = tuple(c.value for c in MessageClass)
_UNKNOWN = -1
"""The class code of a message without a known class."""
_FALLBACK_CLASS = MessageClass.TRANSACTIONAL.value
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What ``services.reports.exports.neutralise`` quotes (the export's documented rule, read back here)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class RecordedTraffic:
    """The messages of one recorded day, as the simulation's arrivals."""

    arrivals: list[Arrival]
    """One per replayed message, by time (ties in the order the file first names them); ``index`` 0..n-1."""
    messages: int
    """How many messages are replayed (``len(arrivals)``)."""
    dropped_outside_day: int
    """Messages of the file arriving after the replayed day (24 hours from the earliest message's UTC midnight)."""
    unknown_class: int
    """Replayed messages whose ``class`` cell was empty or unknown, replayed as transactional."""
    first_event: datetime
    """When the earliest message arrived (UTC): its day is the one replayed."""

    @property
    def day(self) -> datetime:
        """The UTC midnight the arrivals' times count from."""
        return _midnight(self.first_event)


def cell_value(cell: str) -> str:
    """The raw value of an export's text cell: without the ``'`` the export put before a would-be formula."""
    if cell.startswith("'") and cell[1:].startswith(_FORMULA_STARTS):
        return cell[1:]
    return cell


def recorded_arrivals(path: Path, scenario: Scenario) -> RecordedTraffic:
    """The messages of the events export at ``path`` as one day of arrivals on ``scenario``'s market.

    See the module's description for what is read and how. ``ScenarioError`` naming the file, row and column for a
    file that is not an events export (a missing column, a bad time, an empty message name), and for an export
    without any message.
    """
    # Per message: (0 if the time is its acceptance else 1, microseconds since the epoch, class code). The smaller
    # (first, second) pair wins, so an accepted event beats any other and, among equals, the earliest does.
    best: dict[str, tuple[int, int, int]] = {}
    for name, accepted, micros, code in _events(path):
        rank = (0 if accepted else 1, micros, code)
        seen = best.get(name)
        if seen is None:
            best[name] = rank
        else:
            # The class is the message's, not the event's: keep the first known one whichever event wins on time.
            known = seen[2] if seen[2] != _UNKNOWN else code
            best[name] = (*min(seen[:2], rank[:2]), known)
    if not best:
        raise ScenarioError(f"{path}: no message events, nothing to replay")

    earliest = min(micros for _, micros, _ in best.values())
    first_event = _EPOCH + earliest * _MICROSECOND
    midnight = (_midnight(first_event) - _EPOCH) // _MICROSECOND
    day_micros = round(scenario.day_s * 1e6)
    kept: list[tuple[float, int]] = []
    dropped = 0
    for _, micros, code in best.values():
        offset = micros - midnight
        if offset >= day_micros:
            dropped += 1
        else:
            kept.append((offset / 1e6, code))
    del best  # freed before the arrivals are built: for a large export, the records are most of the memory held
    kept.sort(key=lambda k: k[0])  # stable: equal times keep the file's order

    unknown = sum(1 for _, code in kept if code == _UNKNOWN)
    classes = [_FALLBACK_CLASS if code == _UNKNOWN else _CLASSES[code] for _, code in kept]
    sizes = _drawn_sizes(scenario, Counter(classes))
    taken = dict.fromkeys(_CLASSES, 0)
    arrivals = []
    for index, ((at_s, _), message_class) in enumerate(zip(kept, classes, strict=True)):
        arrivals.append(Arrival(index, at_s, message_class, sizes[message_class][taken[message_class]]))
        taken[message_class] += 1
    return RecordedTraffic(arrivals=arrivals, messages=len(arrivals), dropped_outside_day=dropped,
                           unknown_class=unknown, first_event=first_event)


def recorded_day(scenario: Scenario, recorded: RecordedTraffic) -> Scenario:
    """``scenario`` with its traffic describing the recorded messages: their count, class mix and hourly curve, no
    spikes or campaigns (they are in the recording). The market is unchanged; the report's summary and the OTP target
    (met by a day without OTPs) then speak of the replayed day, not of the traffic the scenario would have drawn."""
    count = max(1, recorded.messages)
    per_class = Counter(a.message_class for a in recorded.arrivals)
    hourly = [0.0] * 24
    for arrival in recorded.arrivals:
        hourly[min(23, int(arrival.at_s // 3600))] += 1
    mix: Mapping[str, float] = MappingProxyType({c: per_class[c] / count for c in _CLASSES})
    traffic = dataclasses.replace(scenario.traffic, emails=recorded.messages, mix=mix,
                                  hourly_weights=tuple(hourly) if any(hourly) else scenario.traffic.hourly_weights,
                                  spikes=(), campaigns=())
    return dataclasses.replace(scenario, traffic=traffic)


def _midnight(moment: datetime) -> datetime:
    """The UTC midnight starting ``moment``'s day."""
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


def _drawn_sizes(scenario: Scenario, counts: Mapping[str, int]) -> dict[str, list[int]]:
    """``counts[c]`` sizes of each class ``c`` from the scenario's size models, deterministic for its seed."""
    rng = np.random.Generator(np.random.PCG64(scenario.seed))
    largest = max(provider_size_cap(p.type, p.max_message_bytes) for p in scenario.providers)
    # Classes in a fixed order, so the draws do not depend on which class the file happens to name first.
    return {c: draw_sizes(rng, scenario.traffic.sizes[c], counts.get(c, 0), largest) for c in _CLASSES}


def _events(path: Path) -> Iterator[tuple[str, bool, int, int]]:
    """Each event row of the export as (message name, whether it is the acceptance, microseconds since the epoch,
    class code), streamed; ``ScenarioError`` naming the file, row and column of the first bad one."""
    last = 0  # the rows read so far: a read error is in the next one
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet may have added a BOM
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                raise ScenarioError(f"{path}: row 1: empty file, not an events export (esp events export)")
            last = 1
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ScenarioError(f"{path}: row 1 (the header): no column {', '.join(missing)}; not an events "
                                    "export (esp events export)")
            at = {column: header.index(column) for column in REQUIRED_COLUMNS}
            for row in reader:
                last += 1
                if not row:
                    continue  # a blank line (a trailing one, say) holds no event
                if len(row) != len(header):
                    raise ScenarioError(f"{path}: row {last}: {len(row)} cells, the header has {len(header)}")
                yield _event(path, last, {column: cell_value(row[i]) for column, i in at.items()})
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: row {last + 1}: not UTF-8 text, not an events export") from None
    except csv.Error as exc:
        raise ScenarioError(f"{path}: row {last + 1}: not CSV: {exc}") from None


def _event(path: Path, row_number: int, cells: Mapping[str, str]) -> tuple[str, bool, int, int]:
    def wrong(column: str, what: str) -> ScenarioError:
        return ScenarioError(f"{path}: row {row_number}, column {column}: {what} (got {cells[column]!r})")

    name = cells["message"]
    if not name:
        raise wrong("message", "empty: every event of an events export names its message")
    try:
        moment = datetime.fromisoformat(cells["time"])
    except ValueError:
        raise wrong("time", "not an RFC 3339 time such as 2024-03-01T10:00:00.000000Z") from None
    if moment.tzinfo is None:
        raise wrong("time", "no UTC offset (an RFC 3339 time ends in Z or an offset)")
    message_class = cells["class"]
    code = _CLASSES.index(message_class) if message_class in _CLASSES else _UNKNOWN
    return name, cells["type"] == ACCEPTED, (moment - _EPOCH) // _MICROSECOND, code
