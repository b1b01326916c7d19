"""Recipient addresses: what the mesh accepts as an address and a display name, and the canonical form it keeps.

One definition for every way a recipient enters: a send request (ingest's validation) and a campaign's recipient
list (the campaign service's recipient parsing) accept exactly the same addresses and names.

Addresses: RFC 5322 ``addr-spec`` in dot-atom form, internationalised (RFC 6531/6532: UTF-8 local parts, IDN
domains) included. Quoted local parts, IP-literal domains and dotless domains are refused, as the providers do.
The canonical form has the domain lower-cased and Unicode-normalised, so equal addresses look equal to the
idempotency fingerprint, the suppression list and a campaign's duplicate check.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

__all__ = [
    "MAX_NAME_CHARS",
    "NO_CONTROL",
    "MailboxProblem",
    "check_mailbox",
    "has_control",
    "normalise_address",
]

MAX_NAME_CHARS = 256
"""A display name's length cap, in characters."""
NO_CONTROL = "line breaks (CR, LF ...), NUL and other control characters are not allowed"
"""The description of a value refused for holding a control character."""
_SHOWN_ADDRESS_CHARS = 100
"""How much of a refused address an error message repeats: enough to find it, never a whole oversized value."""

# CR, LF, NUL, the other C0 controls (tab aside), DEL, NEL and the Unicode line/paragraph separators: any of them in
# a header may end it and start another — in SMTP, or in a MIME library that splits lines its own way.
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def has_control(value: str) -> bool:
    """True when ``value`` holds a line break or another control character: in a header it could end the header
    and start another (header injection)."""
    return _FORBIDDEN.search(value) is not None


# The everyday address (ASCII dot-atom, LDH domain labels, alphabetic TLD), checked with one regex instead of the
# full RFC machinery: anything it does not match (IDN, punycode, odd lengths ...) takes the full check.
_PLAIN_ADDRESS = re.compile(
    r"^(?=.{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@((?:(?!-)(?!..--)[A-Za-z0-9-]{1,63}(?<!-)\.)+[A-Za-z]{2,63})$")
_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES)


def _plain_address(raw: str) -> str | None:
    """``raw`` canonicalised when it is an everyday address the full check would accept unchanged; else None."""
    match = _PLAIN_ADDRESS.match(raw)
    if match is None or len(raw) > 254:
        return None
    domain = match.group(1).lower()
    if any(domain == name or domain.endswith("." + name) for name in _SPECIAL_USE):
        return None
    return f"{raw[:match.start(1)]}{domain}"


def _normalise(raw: str) -> str:
    if has_control(raw):
        raise ValueError(NO_CONTROL)
    plain = _plain_address(raw)
    if plain is not None:
        return plain
    try:
        result = validate_email(raw, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from exc
    return str(result.normalized)


@functools.lru_cache(maxsize=65_536)
def normalise_address(raw: str) -> str:
    """The address in canonical form; raises ValueError when malformed. Cached: senders and recipients repeat."""
    return _normalise(raw)


@dataclass(frozen=True, slots=True)
class MailboxProblem:
    """Why an address or its display name is refused."""

    part: str
    """``email`` or ``name``."""
    description: str
    reason: str
    """The machine-readable reason: ``HEADER_INJECTION``, ``MALFORMED_ADDRESS`` or empty (a name too long)."""


def check_mailbox(email: str, name: str = "", *, cached: bool = True) -> tuple[str | None, tuple[MailboxProblem, ...]]:
    """The canonical address (None when refused) and every problem of the address and its display name.

    ``cached=False`` skips :func:`normalise_address`' cache, for callers whose addresses do not repeat (a campaign's
    recipient list: its 65,536 entries, about 17 MB measured, would fill with addresses never seen again, and push
    out the ones that do repeat)."""
    problems: list[MailboxProblem] = []
    if has_control(name):
        problems.append(MailboxProblem("name", NO_CONTROL, "HEADER_INJECTION"))
    elif len(name) > MAX_NAME_CHARS:
        problems.append(MailboxProblem("name", f"longer than {MAX_NAME_CHARS} characters", ""))
    if has_control(email):
        problems.append(MailboxProblem("email", NO_CONTROL, "HEADER_INJECTION"))
        return None, tuple(problems)
    try:
        normalised: str | None = normalise_address(email) if cached else _normalise(email)
    except ValueError as exc:
        shown = email if len(email) <= _SHOWN_ADDRESS_CHARS else email[:_SHOWN_ADDRESS_CHARS] + "…"
        problems.append(MailboxProblem("email", f"{shown!r} is not a valid address: {exc}", "MALFORMED_ADDRESS"))
        normalised = None
    return normalised, tuple(problems)
