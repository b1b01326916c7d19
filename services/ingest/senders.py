"""Only verified senders: an email's ``From`` must be on a domain its tenant has verified (the domain itself or a
subdomain of it), or on one of the platform's sandbox domains.

The check reads the sending-domains view (``libs.common.sending_domains``: the router's KV bucket, watched in
memory), so it costs no round trip per email. A refusal is FAILED_PRECONDITION with reason
``UNVERIFIED_SENDER_DOMAIN`` and the domain in its metadata: the request is well formed, the account is not ready
for it (verify the domain with ``DomainService``).

A ``Sender`` header would be checked the same way, but no request can set one: ``Sender`` is a reserved header
(``services.ingest.validation.RESERVED_HEADERS``), so ``From`` is the one address to check.
"""

from __future__ import annotations

import idna

from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.sending_domains import SendingDomains
from services.ingest.model import EmailDraft

__all__ = ["UNVERIFIED_SENDER_DOMAIN", "SenderDomains"]

UNVERIFIED_SENDER_DOMAIN = "UNVERIFIED_SENDER_DOMAIN"
LOAD_WAIT_S = 10.0
"""How long a send waits, after ingest starts, for the view's first load (a replica's first seconds)."""


def ascii_domain(address: str) -> str:
    """The domain of ``address`` in the form domains are stored in: lower-case ASCII, ``xn--`` labels."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain


class SenderDomains:
    """Who may send from what, over the sending-domains view."""

    def __init__(self, view: SendingDomains) -> None:
        self.view = view

    async def check(self, tenant_id: str, draft: EmailDraft) -> None:
        """FAILED_PRECONDITION (``UNVERIFIED_SENDER_DOMAIN``) unless the draft's ``From`` domain is covered by a
        sandbox domain or a verified domain of the tenant. Call after validation (the address is well formed).
        Waits only once, in a replica's first seconds, for the view's first load (UNAVAILABLE when it does not
        come)."""
        domain = ascii_domain(draft.sender.email)
        if self.view.is_sandbox(domain):
            return
        try:
            if not self.view.loaded:
                await self.view.wait_loaded(LOAD_WAIT_S)
        except TimeoutError:
            raise Unavailable("the sending domains are not loaded yet; retry", reason="SENDING_DOMAINS_LOADING",
                              retry_after_s=1.0) from None
        if self.view.sender_domain(tenant_id, domain) is not None:
            return
        raise FailedPrecondition(
            f"the sender's domain {domain} is not a verified domain of this account: add it with DomainService "
            "and publish its records", reason=UNVERIFIED_SENDER_DOMAIN, metadata={"domain": domain})
