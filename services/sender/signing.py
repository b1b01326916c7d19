"""The DKIM keys the sender hands an adapter with each email, and the count of emails sent signed.

An email's keys are the tenant's active keys of the verified domain covering its ``From`` address
(``SendingDomains.sender_domain``: the address's domain itself or a parent, so ``d=`` aligns with ``From`` under
DMARC's relaxed alignment); with an RSA and an Ed25519 key both active, both sign (RFC 8463). A platform sandbox
domain, or a domain the tenant has not verified, gets none: the provider signs. Whether an adapter uses the keys is
its provider's fact (``Capabilities.signs_raw_mime``).

Keys are built once per domain entry — the view replaces an entry's object whenever it changes, so the cache
holds the entry it was built from and rebuilds when that is no longer the one served — and each private key is
loaded once per process (``libs.providers.dkim``), never per email. A key that does not open
(``ESP_SECRETS_KEYS`` cannot unseal it) or does not load is left out: the email goes without its signature, one
warning per key, and ``esp_sender_dkim_keys_unusable_total`` counts the emails it missed.
"""

from __future__ import annotations

import logging

from cryptography.exceptions import UnsupportedAlgorithm
from prometheus_client import Counter

from libs.common.sending_domains import SendingDomain, SendingDomains
from libs.providers.dkim import DkimKey
from libs.providers.model import OutboundEmail

__all__ = ["DKIM_SIGNED", "DKIM_UNUSABLE", "SigningKeys"]

log = logging.getLogger(__name__)

DKIM_SIGNED = Counter("esp_sender_dkim_signed_total",
                      "Emails a provider took with a DKIM signature of the mesh, by signature algorithm", ["algorithm"])
DKIM_UNUSABLE = Counter("esp_sender_dkim_keys_unusable_total",
                        "Emails an active DKIM key of their domain could not sign, by why", ["why"])
_CACHE_LIMIT = 100_000
"""Domains whose keys are kept built; past it the cache starts over (a fresh build costs one dictionary lookup per
key: the private keys stay loaded)."""


class _Built:
    """An entry's keys as built, and why its other active keys cannot sign."""

    __slots__ = ("entry", "keys", "unusable")

    def __init__(self, entry: SendingDomain, keys: tuple[DkimKey, ...], unusable: tuple[str, ...]) -> None:
        self.entry = entry
        self.keys = keys
        self.unusable = unusable


class SigningKeys:
    """Which ``DkimKey`` values sign an email, from the sending-domains view."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, str], _Built] = {}

    def for_email(self, domains: SendingDomains,
                  email: OutboundEmail) -> tuple[SendingDomain | None, tuple[DkimKey, ...]]:
        """The tenant's verified sending domain that covers ``email``'s ``From`` (None when none does) and the keys
        that sign the email: none for a sandbox or unverified ``From`` domain."""
        address_domain = email.sender.email.rpartition("@")[2].lower()
        if not address_domain:
            return None, ()
        entry = domains.sender_domain(email.tenant_id, address_domain)
        if entry is None or domains.is_sandbox(address_domain):
            return entry, ()
        built = self._built.get((entry.tenant_id, entry.domain))
        if built is None or built.entry is not entry:
            if len(self._built) >= _CACHE_LIMIT:
                self._built.clear()
            built = self._built[(entry.tenant_id, entry.domain)] = _build(entry)
        for why in built.unusable:
            DKIM_UNUSABLE.labels(why).inc()
        return entry, built.keys


def _build(entry: SendingDomain) -> _Built:
    keys: list[DkimKey] = []
    unusable: list[str] = []
    for signing_key in entry.signing_keys:
        if not signing_key.active:
            continue
        if not signing_key.private_key_pem:
            log.warning("DKIM key %s of %s (tenant %s) is sealed with a key ESP_SECRETS_KEYS lacks; its mail goes "
                        "unsigned by it", signing_key.selector, entry.domain, entry.tenant_id)
            unusable.append("unopened")
            continue
        key = DkimKey(entry.domain, signing_key.selector, signing_key.private_key_pem)
        try:
            algorithm = key.algorithm  # loads the private key, once per process
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            log.warning("DKIM key %s of %s (tenant %s) does not load (%s); its mail goes unsigned by it",
                        signing_key.selector, entry.domain, entry.tenant_id, type(exc).__name__)
            unusable.append("unloadable")
            continue
        if algorithm != signing_key.algorithm:
            # Its DNS record was published for the other algorithm: a signature would fail verification.
            log.warning("DKIM key %s of %s (tenant %s) is %s, not the %s it is published as; its mail goes unsigned "
                        "by it", signing_key.selector, entry.domain, entry.tenant_id, algorithm, signing_key.algorithm)
            unusable.append("mismatched")
            continue
        keys.append(key)
    return _Built(entry, tuple(keys), tuple(unusable))
