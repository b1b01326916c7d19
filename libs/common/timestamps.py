"""Datetimes to protobuf Timestamps, the one conversion every service's wiring needs."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "to_timestamp",
]


def to_timestamp(value: datetime | None) -> Timestamp:
    """``value`` as a Timestamp; an unset (zero) Timestamp for None."""
    stamp = Timestamp()
    if value is not None:
        stamp.FromDatetime(value)
    return stamp
