"""``python -m services.sender.worker``: the pools of one sender worker process (started by the sender service,
one per message class; see ``services.sender.server`` and ``libs.common.workers``).

It has no gRPC server of its own — the supervising sender answers the probes — and stops on SIGTERM, or when
its supervisor disappears (it must never keep sending as an orphan nobody can stop).
"""

from __future__ import annotations

from libs.common.workers import run_worker
from services.sender.config import SenderSettings
from services.sender.server import build_pools


def _name(settings: SenderSettings) -> str:
    return "sender-" + "-".join(settings.sender_classes)


def _niceness(settings: SenderSettings) -> int:
    return settings.bulk_worker_niceness if settings.sender_classes == ("bulk",) else 0


def main() -> None:
    """Settings, logging, tracing, then the pools."""
    run_worker(SenderSettings, build_pools, name=_name, niceness=_niceness)


if __name__ == "__main__":
    main()
