"""Whether a provider may send for an email's ``From`` domain: the eligibility rule routing adds to size caps.

A provider whose type registers domains (``libs.providers.capabilities.registers_domains``: SES, Mailgun, SendGrid,
Postmark) sends for a tenant's domain only once it has registered and verified it: the router's readiness worker
says so in a ``ready.<provider>.<tenant>.<domain>`` entry of the sending-domains bucket
(``libs.common.sending_domains``). So, for a provider of such a type, an email from a tenant domain — the
tenant's domain that is the ``From`` domain or a parent of it, as DKIM's relaxed alignment reads it — is ready only
when that entry says ``ready``; no entry (not registered there yet) is not ready, and neither is ``pending`` or
``failed``, whose detail is the provider's own words.

Always ready: the platform's sandbox domains (the providers sign them as their own), provider types that relay
for any domain (SMTP), and an address on no domain of the tenant at all — ingest refuses those
(``UNVERIFIED_SENDER_DOMAIN``), and routing does not judge what it has no record of.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from libs.common.sending_domains import ProviderReadiness, ReadinessState, SendingDomain
from libs.providers.capabilities import registers_domains

__all__ = [
    "NOT_READY",
    "DomainReadiness",
    "address_domain",
    "not_ready_reason",
    "tenant_domain",
]

NOT_READY = "not ready for"
"""How the exclusion reason of a provider not ready for the email's domain begins."""


class DomainReadiness(Protocol):
    """What routing reads of the sending domains (``libs.common.sending_domains.SendingDomains``)."""

    def is_sandbox(self, address_domain: str) -> bool:
        """Whether a platform sandbox domain covers ``address_domain``."""
        ...

    def domain(self, tenant_id: str, domain: str) -> SendingDomain | None:
        """The tenant's entry for exactly ``domain``, in any state."""
        ...

    def readiness(self, provider_id: str, tenant_id: str, domain: str) -> ProviderReadiness | None:
        """What ``provider_id`` last said about the tenant's ``domain``."""
        ...


def address_domain(address: str) -> str:
    """The domain of an email address, lower-case (empty when there is none)."""
    return address.rpartition("@")[2].strip().rstrip(".").lower() if "@" in address else ""


def _parents(domain: str) -> Iterator[str]:
    labels = domain.split(".")
    for i in range(len(labels) - 1):  # a bare top-level label is no one's domain
        yield ".".join(labels[i:])


def tenant_domain(domains: DomainReadiness, tenant_id: str, from_domain: str) -> str:
    """The tenant's domain covering ``from_domain`` (itself or its longest parent the tenant has, in any state), or
    empty when the tenant has none or a sandbox domain covers it."""
    if not from_domain or domains.is_sandbox(from_domain):
        return ""
    return next((d for d in _parents(from_domain) if domains.domain(tenant_id, d) is not None), "")


def not_ready_reason(provider_id: str, provider_type: str, domains: DomainReadiness | None, tenant_id: str,
                     from_domain: str) -> str:
    """Why the provider may not send for ``from_domain`` of ``tenant_id``: ``not ready for <domain>: <the
    provider's status>``; empty when it may (see the module's rules; no ``domains`` view: every provider may)."""
    if domains is None or not registers_domains(provider_type):
        return ""
    covering = tenant_domain(domains, tenant_id, from_domain)
    if not covering:
        return ""
    said = domains.readiness(provider_id, tenant_id, covering)
    if said is None:
        return f"{NOT_READY} {covering}: not registered at the provider yet"
    if said.state is ReadinessState.READY:
        return ""
    return f"{NOT_READY} {covering}: {said.state.value}" + (f" ({said.detail})" if said.detail else "")
