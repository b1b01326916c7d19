"""Only verified senders: an email's ``From`` must be on a domain its tenant has verified (the domain itself or a
subdomain of it), or on one of the platform's sandbox domains.

Ingest checks every email, the campaigns service a campaign's sender at create and start. Both read the
sending-domains view (``libs.common.sending_domains``: the router's KV bucket, watched in memory), so the check
costs no round trip. A refusal is FAILED_PRECONDITION with reason ``UNVERIFIED_SENDER_DOMAIN`` and the domain in its
metadata: the request is well formed, the account is not ready for it (verify the domain with DomainService).
"""

from __future__ import annotations

import idna

from libs.common.errors import FailedPrecondition, Unavailable
from libs.common.sending_domains import SendingDomains

__all__ = ["UNVERIFIED_SENDER_DOMAIN", "VerifiedSenders", "ascii_domain"]

UNVERIFIED_SENDER_DOMAIN = "UNVERIFIED_SENDER_DOMAIN"
LOAD_WAIT_S = 10.0
"""How long a check waits, in a replica's first seconds, for the view's first load."""


def ascii_domain(address: str) -> str:
    """The domain of ``address`` as domains are stored: lower-case ASCII, ``xn--`` labels, no final dot."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain


class VerifiedSenders:
    """Who may send from what, over the sending-domains view (which its owner keeps running)."""

    def __init__(self, view: SendingDomains) -> None:
        self.view = view

    async def check(self, tenant_id: str, address: str) -> None:
        """FAILED_PRECONDITION (``UNVERIFIED_SENDER_DOMAIN``) unless ``address``'s domain is covered by a sandbox
        domain or a verified domain of the tenant; ``address`` is a validated email address. Waits only until the
        view's first load (UNAVAILABLE when it does not come within ``LOAD_WAIT_S``)."""
        domain = ascii_domain(address)
        if self.view.is_sandbox(domain):
            return
        if not self.view.loaded:
            try:
                await self.view.wait_loaded(LOAD_WAIT_S)
            except TimeoutError:
                raise Unavailable("the sending domains are not loaded yet; retry", reason="SENDING_DOMAINS_LOADING",
                                  retry_after_s=1.0) from None
        if self.view.sender_domain(tenant_id, domain) is not None:
            return
        raise FailedPrecondition(
            f"the sender's domain {domain} is not a verified domain of this account: add it with DomainService and "
            "publish its records", reason=UNVERIFIED_SENDER_DOMAIN, metadata={"domain": domain})
