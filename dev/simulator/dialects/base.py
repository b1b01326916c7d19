"""What every simulated HTTP provider implements: routing, auth, parsing, and its own answers and errors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from dev.simulator.model import Personality, SimMessage


class Rejected(Exception):
    """The request is refused as a whole with this answer (validation, unknown domain …)."""

    def __init__(self, response: Response, reason: str, result: str = "invalid") -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason
        self.result = result


@dataclass
class Parsed:
    """The messages a request asks to send."""

    messages: list[SimMessage]
    sandbox: bool = False
    """Validated but never delivered (SendGrid sandbox mode, Postmark's test token, Mailgun test mode)."""
    extra: dict[str, str] = field(default_factory=dict)


class Dialect(ABC):
    """One provider's HTTP API, as far as sending goes."""

    type_name: str

    @abstractmethod
    def operation(self, method: str, path: str) -> str | None:
        """The operation ``method path`` (relative to the personality's prefix) names, or None."""

    @abstractmethod
    def not_found(self, path: str) -> Response:
        """The provider's answer to an unknown path."""

    def account_domain(self, path: str) -> str | None:
        """The account's sending domain a send path names (Mailgun's ``/v3/{domain}/...``); None where paths name
        none. The app lets such a call through only for the personality's own domain or a domain registered and
        verified at it."""
        return None

    def unknown_domain(self, domain: str) -> Response:
        """The provider's answer to a send through a domain the account does not hold."""
        return self.not_found(domain)

    @abstractmethod
    def authenticate(self, personality: Personality, request: Request, body: bytes) -> Response | None:
        """None when the request carries the personality's credentials, else the provider's refusal."""

    @abstractmethod
    def parse(
        self, personality: Personality, operation: str, path: str, request: Request, body: bytes
    ) -> Parsed:
        """The messages in the request; raises ``Rejected`` with the provider's validation error."""

    @abstractmethod
    def assign_ids(self, personality: Personality, operation: str, parsed: Parsed) -> None:
        """Give accepted messages the ids the provider would."""

    @abstractmethod
    def accepted(self, personality: Personality, operation: str, parsed: Parsed) -> Response:
        """The provider's success answer."""

    @abstractmethod
    def outage(self) -> Response:
        """The answer while the provider is down."""

    @abstractmethod
    def throttled(self, retry_after_s: float) -> Response:
        """The answer above the rate limit."""

    @abstractmethod
    def quota_exceeded(self, retry_after_s: int) -> Response:
        """The answer once the daily quota is used up."""

    @abstractmethod
    def server_error(self) -> Response:
        """An internal error answer."""


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1), as HTTP requires delta-seconds to be an integer."""
    return {"Retry-After": str(max(1, round(seconds)))}
