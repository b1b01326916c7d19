"""Campaigns settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from libs.common.settings import CommonSettings, check_positive


@dataclass(frozen=True)
class CampaignsSettings(CommonSettings):
    """The campaigns service's settings (``ESP_*`` variables, on top of :class:`CommonSettings`)."""

    chunk_size: int = 500
    """Recipients expanded per transaction: rendered, credits held (one ledger call), queued, cursor advanced."""
    expander_worker: bool = True
    """Expand campaigns in a worker process of its own (``services.campaigns.expander``), off the event loop that
    answers RPCs, at ``expander_niceness``; off, the service expands in its own process (tests, small set-ups)."""
    expander_niceness: int = 10
    """How much nicer than the service the expander runs: a campaign's expansion yields the CPU to the accept path
    (OTPs) on a busy machine."""
    poll_interval_s: float = 0.2
    """How often the expander looks for due campaigns and work when it found none: a scheduled campaign starts
    within this of its send_time."""
    hold_ttl_s: int = 7 * 86_400
    """How long a queued campaign email's credit hold lives: it must outlast a pause."""
    unpark_window_s: float = 30.0
    """After a resume or cancel, how long the expander keeps putting parked emails back in the send stream (senders
    may still be parking emails they had in hand when the pause was lifted)."""
    public_base_url: str = ""
    """The mesh's public https base URL, where reports serves ``/u/<token>`` (one-click unsubscribe); required for
    bulk campaigns with one-click unsubscribe."""
    unsubscribe_keys: tuple[str, ...] = field(default=(), repr=False)
    """``<id>:<base64url key>`` entries signing one-click unsubscribe tokens (the same as reports'), the first signs."""
    max_import_bytes: int = 2 * 1024 * 1024 * 1024
    """Largest recipients file an import reads."""

    def __post_init__(self) -> None:
        check_positive(self, "chunk_size", "poll_interval_s", "hold_ttl_s", "unpark_window_s", "max_import_bytes")
        if self.public_base_url:
            parts = urlsplit(self.public_base_url)
            loopback = parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")
            if parts.scheme != "https" and not loopback:
                raise ValueError("ESP_PUBLIC_BASE_URL: one-click unsubscribe links must be https (RFC 8058), "
                                 f"got {self.public_base_url!r}")
