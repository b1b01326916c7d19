"""The large-attachment policy, decided at accept: attach, send as download links, or refuse.

Every provider caps the size of a message far below our 150 MiB attachments (SES 40 MB, SendGrid 30 MB, Mailgun
25 MB, Postmark 10 MB). When an email, encoded, exceeds the cap of every provider that could carry it, the tenant's
policy says what happens: ``link`` replaces the attachments by expiring download links (the sender makes them:
:mod:`services.sender.links`) and tells routing the size of the email with links; ``reject`` refuses the email at
accept with FAILED_PRECONDITION, before anything is spent.

Caps are computed as routing computes them, by :func:`libs.providers.capabilities.provider_size_cap`: the smaller
of the provider's own ``max_message_bytes`` and its type's cap in the capabilities table, whichever are set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from libs.common.errors import FailedPrecondition
from libs.providers.capabilities import DEFAULT_SIZE_CAPS, provider_size_cap
from libs.routing.catalog import ProviderSpec
from services.ingest.model import EmailDraft, StoredAttachment
from services.ingest.payloads import estimated_message_bytes

LINK, REJECT = "link", "reject"


@dataclass(frozen=True)
class SizeDecision:
    """How an email's attachments travel, and the size routing will see."""

    attachments_as_links: bool
    message_bytes: int
    """Estimated encoded size of the email as it will be sent."""
    attached_bytes: int
    """Estimated encoded size with the attachments attached."""
    largest_cap_bytes: int
    """The largest cap among the eligible providers; 0 when none is known (or none has a cap)."""

    def event_attributes(self) -> dict[str, str]:
        """What the ACCEPTED event records about the decision (empty when the attachments are attached)."""
        if not self.attachments_as_links:
            return {}
        return {"attachments_as_links": "true", "attached_message_bytes": str(self.attached_bytes),
                "largest_provider_cap_bytes": str(self.largest_cap_bytes)}


class SizePolicy:
    """Decides attach / links / reject from the live provider catalog."""

    def __init__(self, providers: Callable[[], Iterable[ProviderSpec]],
                 size_caps: Mapping[str, int] = DEFAULT_SIZE_CAPS) -> None:
        self.providers = providers
        self.size_caps = size_caps

    def largest_cap(self, message_class: str) -> int | None:
        """The largest cap of a provider that may carry ``message_class``: 0 when one has no cap, None when no
        provider is eligible (then nothing is decided here: the email waits for a provider like any other)."""
        caps = [provider_size_cap(s.type, s.max_message_bytes, type_caps=self.size_caps) for s in self.providers()
                if not s.disabled and s.carries(message_class)]
        if not caps:
            return None
        return 0 if 0 in caps else max(caps)

    def decide(self, draft: EmailDraft, attachments: list[StoredAttachment], policy: str) -> SizeDecision:
        """The decision for ``draft``; raises FAILED_PRECONDITION (ATTACHMENTS_TOO_LARGE) under policy reject."""
        attached = estimated_message_bytes(draft, attachments)
        largest = self.largest_cap(draft.message_class) if attachments else None
        if largest is None or largest == 0 or attached <= largest:
            return SizeDecision(False, attached, attached, largest or 0)
        if policy == REJECT:
            raise FailedPrecondition(
                f"with its attachments the email is about {attached} bytes encoded; the largest any provider "
                f"takes is {largest} bytes, and this tenant's large-attachment policy is 'reject'",
                reason="ATTACHMENTS_TOO_LARGE",
                metadata={"message_bytes": str(attached), "largest_provider_cap_bytes": str(largest),
                          "large_attachment_policy": REJECT})
        linked = estimated_message_bytes(draft, attachments, as_links=True)
        return SizeDecision(True, linked, attached, largest)
