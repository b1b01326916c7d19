"""One-click unsubscribe (RFC 8058), served on the reports HTTP server next to the provider webhooks.

``POST /u/{token}`` — what Gmail, Yahoo and other mail clients send (body ``List-Unsubscribe=One-Click``, no
cookies, no redirects followed) — verifies the token (``libs.common.unsubscribe``) and adds a tenant suppression
with reason ``unsubscribe`` through :class:`~services.reports.suppressions.SuppressionStore`, which writes the
Redis mirror ingest, campaign expansion and the senders read before the Postgres commit: the next bulk (marketing)
email to the address is refused. When the token names a topic (the campaign's ``unsubscribe_policy.topic``), the
suppression is scoped to it: the recipient leaves that topic (``weekly-deals``) and keeps the tenant's other bulk
mail (``product-updates``). OTP codes and transactional mail (receipts, password resets) still reach it either way:
an unsubscribe stops bulk mail only (``ClassPolicy.honours_unsubscribes``). Repeating it changes nothing and
answers 200 again. Any POST counts: link scanners and prefetchers only GET.

``GET /u/{token}`` shows a confirmation page whose button POSTs to the same URL; a GET never unsubscribes.

A token that is not ours answers 404 with no detail, and the token itself is never logged (it stands for a
recipient address).
"""

from __future__ import annotations

import html
import logging

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from libs.common.errors import InvalidArgument
from libs.common.suppressions import is_topic, normalise_topic
from libs.common.unsubscribe import MAX_TOKEN_LENGTH, InvalidUnsubscribeToken, UnsubscribeTarget, UnsubscribeTokens
from services.reports.models import SuppressionReason
from services.reports.suppressions import SuppressionStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""Largest POST body read (the one-click body is 26 bytes; a multipart one a few hundred)."""

UNSUBSCRIBES = Counter("esp_reports_unsubscribes_total", "One-click unsubscribe requests by outcome", ["result"])

# Nothing on these pages may leak the token: no referrer, no caching, no indexing, no third-party resources.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
}


class OneClickUnsubscriber:
    """Turns a verified unsubscribe token into a tenant suppression that stops the tenant's bulk mail, of the
    token's topic when it names one."""

    def __init__(self, tokens: UnsubscribeTokens | None, store: SuppressionStore) -> None:
        """``tokens`` is None when no key is configured: every token is then refused."""
        self._tokens = tokens
        self._store = store

    def target(self, token: str) -> UnsubscribeTarget:
        """Who and what ``token`` unsubscribes; :class:`InvalidUnsubscribeToken` when it is not ours."""
        if self._tokens is None:
            raise InvalidUnsubscribeToken()
        return self._tokens.verify(token)

    async def unsubscribe(self, token: str) -> bool:
        """Suppress the token's recipient (:meth:`suppress`); :class:`InvalidUnsubscribeToken` when it is not
        ours."""
        return await self.suppress(self.target(token))

    async def suppress(self, target: UnsubscribeTarget) -> bool:
        """Suppress ``target``'s recipient for its tenant's bulk mail; True when the address was not suppressed
        (for that scope) before.

        The suppression is scoped to the token's topic when it names one (:func:`topic_of`), else it covers all of
        the tenant's bulk (marketing) mail; either way it leaves OTP and transactional mail alone.
        """
        topic = topic_of(target)
        if target.topic and not topic:
            log.warning("unsubscribe token names no valid topic; suppressing for every topic",
                        extra={"tenant_id": target.tenant_id, "campaign_id": target.campaign_id})
        added = await self._store.ensure(target.tenant_id, target.email, SuppressionReason.UNSUBSCRIBE,
                                         note=suppression_note(target), topic=topic)
        log.info("one-click unsubscribe", extra={"tenant_id": target.tenant_id, "campaign_id": target.campaign_id,
                                                 "topic": topic, "new": added})
        return added


def topic_of(target: UnsubscribeTarget) -> str:
    """The topic the suppression of ``target`` is scoped to: the token's, normalised; empty (every topic) when it
    names none, or one that cannot be a topic (``libs.common.suppressions.is_topic``; campaigns validate theirs, so
    only a token signed elsewhere has one). Then the recipient leaves everything: broader than asked, never
    narrower, and never refused."""
    topic = normalise_topic(target.topic)
    return topic if is_topic(topic) else ""


def suppression_note(target: UnsubscribeTarget) -> str:
    """The note of a suppression made by one-click unsubscribe, e.g. ``one-click; campaign=c1; topic=news``."""
    parts = ["one-click"]
    if target.campaign_id:
        parts.append(f"campaign={target.campaign_id}")
    if target.topic:
        parts.append(f"topic={target.topic}")
    return "; ".join(parts)


def unsubscribe_routes(unsubscriber: OneClickUnsubscriber) -> list[Route]:
    """``GET`` and ``POST /u/{token}`` for the reports HTTP app."""

    async def confirm_page(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            target = unsubscriber.target(token)
        except InvalidUnsubscribeToken:
            return _not_found()
        UNSUBSCRIBES.labels("page").inc()
        address = html.escape(masked(target.email))
        # Honest about the scope: one topic, or all of the sender's marketing mail; never its account mail.
        topic = topic_of(target)
        what = f"<b>{html.escape(topic)}</b> email" if topic else "marketing email"
        keeps = "the sender's other email, and account email" if topic else "account email"
        return _page("Unsubscribe", f"""<p>Stop receiving {what} from this sender at <b>{address}</b>?</p>
<p>You will still receive {keeps} you need, such as sign-in codes, receipts and password resets.</p>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>""")

    async def one_click(request: Request) -> Response:
        token = request.path_params["token"]
        if len(token) > MAX_TOKEN_LENGTH:
            return _not_found()
        received = 0
        async for chunk in request.stream():  # drained, not parsed: any POST to a valid token unsubscribes
            received += len(chunk)
            if received > MAX_BODY_BYTES:
                UNSUBSCRIBES.labels("too_large").inc()
                return Response("request body too large", status_code=413, media_type="text/plain",
                                headers=_PAGE_HEADERS)
        try:
            target = unsubscriber.target(token)
            added = await unsubscriber.suppress(target)
        except InvalidUnsubscribeToken:
            return _not_found()
        except InvalidArgument as exc:  # refused for good (the store rejects the address): a retry cannot help
            log.warning("one-click unsubscribe refused", extra={"reason": exc.reason})
            UNSUBSCRIBES.labels("refused").inc()
            return _not_found()
        except Exception:
            log.exception("one-click unsubscribe failed; the client may retry")
            UNSUBSCRIBES.labels("unavailable").inc()
            return Response("temporarily unavailable, please try again", status_code=503, media_type="text/plain",
                            headers={"Retry-After": "30", **_PAGE_HEADERS})
        UNSUBSCRIBES.labels("unsubscribed" if added else "already").inc()
        if topic := topic_of(target):
            return _page("Unsubscribed", f"<p>You have been unsubscribed from <b>{html.escape(topic)}</b>. The "
                                         "sender's other email, and account email you need, such as sign-in codes, "
                                         "receipts and password resets, will still reach you.</p>")
        return _page("Unsubscribed", "<p>You have been unsubscribed. You will not receive marketing email from "
                                     "this sender again. Account email you need, such as sign-in codes, receipts "
                                     "and password resets, will still reach you.</p>")

    return [
        Route("/u/{token}", confirm_page, methods=["GET"]),
        Route("/u/{token}", one_click, methods=["POST"]),
    ]


def masked(email: str) -> str:
    """The address with most of its local part hidden (``j***@example.com``), for the confirmation page."""
    local, _, domain = email.rpartition("@")
    return f"{local[:1]}***@{domain}"


def _not_found() -> Response:
    UNSUBSCRIBES.labels("invalid_token").inc()
    return Response("not found", status_code=404, media_type="text/plain", headers=_PAGE_HEADERS)


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
""", headers=_PAGE_HEADERS)
