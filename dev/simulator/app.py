"""The simulator's HTTP side: provider APIs under ``/p/<personality>/…`` and the admin API under ``/_sim/…``.

Admin API (JSON):
    GET   /_sim/health                              → {"ok": true}
    GET   /_sim/personalities                       → [{name, type, region, credentials, knobs, webhooks}]
    GET   /_sim/personalities/{name}                → one of those
    GET   /_sim/personalities/{name}/knobs          → knobs
    PATCH /_sim/personalities/{name}/knobs          → apply a partial update (unknown keys → 400), returns knobs
    GET   /_sim/personalities/{name}/sns-certificate.pem → the PEM behind the SES personality's SigningCertURL
    GET   /_sim/requests?personality=&since=&limit= → recorded requests, oldest first
    GET   /_sim/stats                               → counts per personality and result
    GET   /_sim/webhooks?personality=               → sent webhook callbacks (newest last)
    POST  /_sim/reset?keep_knobs=false              → forget requests, counters, pending webhooks, registered
                                                      domains; knobs (and domain holds) back unless kept
    GET   /_sim/personalities/{name}/domains        → domains registered there: [{name, id, created_at, state,
                                                      detail}]
    PUT   /_sim/personalities/{name}/domains/{domain} → hold a domain {"state": "pending" | "failed" | "verified",
                                                      "detail": …} (``dev.simulator.domain_apis``)
    DELETE /_sim/personalities/{name}/domains/{domain} → drop the hold: the domain verifies
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dev.simulator.dialects.base import Dialect, Rejected
from dev.simulator.dialects.mailgun import MailgunDialect
from dev.simulator.dialects.postmark import PostmarkDialect
from dev.simulator.dialects.sendgrid import SendGridDialect
from dev.simulator.dialects.ses import SesDialect
from dev.simulator.domain_apis import DOMAIN_APIS
from dev.simulator.emitter import WebhookEmitter
from dev.simulator.model import Personality
from dev.simulator.state import SimulatorState, UnknownPersonality

DIALECTS: dict[str, Dialect] = {d.type_name: d for d in (MailgunDialect(), SendGridDialect(), SesDialect(),
                                                         PostmarkDialect())}
#: Request headers kept in the log, so tests can check the wire format (never the secrets themselves).
RECORDED_HEADERS = ("content-type", "content-length", "accept", "transfer-encoding", "user-agent", "x-amz-date")


def _recorded_headers(request: Request) -> dict[str, str]:
    headers = {name: request.headers[name] for name in RECORDED_HEADERS if name in request.headers}
    authorization = request.headers.get("authorization")
    if authorization:
        headers["authorization-scheme"] = authorization.split(" ", 1)[0]
    if "x-postmark-server-token" in request.headers:
        headers["x-postmark-server-token"] = "present"
    return headers


def create_app(state: SimulatorState, emitter: WebhookEmitter) -> Starlette:
    """The ASGI application."""

    def _holds_domain(personality: Personality, domain: str) -> bool:
        """Whether the account may send through ``domain``: its own, or one registered and verified at it."""
        if domain == personality.credentials.get("domain", "").lower():
            return True
        registered = state.registered_domain(personality.name, domain) is not None
        return registered and state.domain_state(personality.name, domain)[0] == "verified"

    async def provider_endpoint(request: Request) -> Response:
        arrived_at, arrived = time.time(), time.monotonic()
        name = request.path_params["personality"]
        path = "/" + request.path_params["path"]
        try:
            personality = state.personality(name)
        except UnknownPersonality:
            return JSONResponse({"error": f"no personality {name!r}"}, status_code=404)
        dialect = DIALECTS.get(personality.type)
        if dialect is None:
            return JSONResponse({"error": f"{name} is an {personality.type} personality (no HTTP API)"},
                                status_code=404)
        body = await request.body()
        await state.delay(name)
        base = {"personality": name, "provider": personality.type, "method": request.method, "path": path,
                "request_headers": _recorded_headers(request), "arrived_at": arrived_at}

        def answer(response: Response, result: str, reason: str = "", **extra: Any) -> Response:
            state.record({**base, "status": response.status_code, "result": result, "reason": reason, **extra})
            return response

        domain_api = DOMAIN_APIS.get(personality.type)
        domain_call = domain_api.match(request.method, path) if domain_api is not None else None
        if domain_api is not None and domain_call is not None:
            if state.in_outage(name):
                return answer(dialect.outage(), "outage")
            refusal = domain_api.authenticate(personality, request, body)
            if refusal is not None:
                return answer(refusal, "unauthorized")
            if state.roll(state.knobs(name).error_rate):
                return answer(dialect.server_error(), "error")
            return answer(await domain_api.handle(personality, domain_call, request, body, state), "domain",
                          domain_call.operation)
        operation = dialect.operation(request.method, path)
        if operation is None:
            return answer(dialect.not_found(path), "not_found")
        if state.in_outage(name):
            return answer(dialect.outage(), "outage")
        refusal = dialect.authenticate(personality, request, body)
        if refusal is not None:
            return answer(refusal, "unauthorized")
        domain = dialect.account_domain(path)
        if domain is not None and not _holds_domain(personality, domain):
            return answer(dialect.unknown_domain(domain), "not_found")
        knobs = state.knobs(name)
        if not state.admit_rate(name, arrived):
            return answer(dialect.throttled(knobs.retry_after_s), "throttled")
        try:
            parsed = dialect.parse(personality, operation, path, request, body)
        except Rejected as rejected:
            return answer(rejected.response, rejected.result, rejected.reason)
        good = [m for m in parsed.messages if m.rejection is None]
        if not parsed.sandbox and not state.consume_quota(name, len(good)):
            return answer(dialect.quota_exceeded(state.seconds_until_quota_reset()), "quota",
                          messages=parsed.messages)
        if state.roll(knobs.error_rate):
            return answer(dialect.server_error(), "error", messages=parsed.messages)
        dialect.assign_ids(personality, operation, parsed)
        hang = not parsed.sandbox and state.roll(knobs.hang_rate)
        response = dialect.accepted(personality, operation, parsed)
        result = "sandbox" if parsed.sandbox else "hung" if hang else "accepted"
        answer(response, result, messages=parsed.messages)
        if not parsed.sandbox:
            for message in good:
                emitter.schedule(personality, message)
        if hang:
            # Accepted and recorded, but the answer comes only after the client has given up: ambiguous.
            await state.hang(knobs.hang_s)
        return response

    def describe(name: str) -> dict[str, Any]:
        personality = state.personality(name)
        material = emitter.material[name]
        return {**personality.describe(), "knobs": state.knobs(name).to_json(),
                "webhooks": {**material.public(), "receiver_secrets": material.receiver_secrets()}}

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def personalities(request: Request) -> Response:
        return JSONResponse([describe(name) for name in state.personalities])

    async def personality_detail(request: Request) -> Response:
        try:
            return JSONResponse(describe(request.path_params["name"]))
        except UnknownPersonality:
            return JSONResponse({"error": "no such personality"}, status_code=404)

    async def knobs(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            if request.method == "GET":
                return JSONResponse(state.knobs(name).to_json())
            values = await request.json()
            if not isinstance(values, dict):
                return JSONResponse({"error": "expected a JSON object of knob values"}, status_code=400)
            return JSONResponse(state.set_knobs(name, values).to_json())
        except UnknownPersonality:
            return JSONResponse({"error": "no such personality"}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def sns_certificate(request: Request) -> Response:
        name = request.path_params["name"]
        material = emitter.material.get(name)
        if material is None or material.sns_certificate_pem is None:
            return JSONResponse({"error": "not an SES personality"}, status_code=404)
        return Response(material.sns_certificate_pem, media_type="application/x-pem-file")

    async def requests(request: Request) -> Response:
        query = request.query_params
        try:
            since = int(query.get("since", "0"))
            limit = int(query["limit"]) if "limit" in query else None
            records = state.requests(query.get("personality"), since_seq=since)
        except UnknownPersonality:
            return JSONResponse({"error": "no such personality"}, status_code=404)
        except ValueError:
            return JSONResponse({"error": "since and limit must be integers"}, status_code=400)
        if limit is not None:
            records = records[-limit:] if limit > 0 else []
        return JSONResponse([r.to_json() for r in records])

    async def stats(request: Request) -> Response:
        return JSONResponse({**state.stats(), "webhooks_pending": emitter.pending,
                             "webhooks_dropped": emitter.dropped})

    async def webhooks(request: Request) -> Response:
        wanted = request.query_params.get("personality")
        return JSONResponse([entry for entry in emitter.log if wanted is None or entry["personality"] == wanted])

    async def domains(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            return JSONResponse([{**d.to_json(), **dict(zip(("state", "detail"), state.domain_state(name, d.name),
                                                            strict=True))}
                                 for d in state.registered_domains(name)])
        except UnknownPersonality:
            return JSONResponse({"error": "no such personality"}, status_code=404)

    async def domain_hold(request: Request) -> Response:
        name, domain = request.path_params["name"], request.path_params["domain"]
        try:
            if request.method == "DELETE":
                state.release_domain(name, domain)
                return JSONResponse({"ok": True})
            values = await request.json()
            if not isinstance(values, dict) or not isinstance(values.get("state"), str):
                return JSONResponse({"error": "expected {\"state\": …, \"detail\": …}"}, status_code=400)
            state.hold_domain(name, domain, values["state"], str(values.get("detail", "")))
            return JSONResponse({"ok": True})
        except UnknownPersonality:
            return JSONResponse({"error": "no such personality"}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def reset(request: Request) -> Response:
        keep = request.query_params.get("keep_knobs", "false").lower() in {"1", "true", "yes"}
        state.reset(keep_knobs=keep)
        emitter.clear()
        return JSONResponse({"ok": True})

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(
        routes=[
            Route("/_sim/health", health),
            Route("/_sim/personalities", personalities),
            Route("/_sim/personalities/{name}", personality_detail),
            Route("/_sim/personalities/{name}/knobs", knobs, methods=["GET", "PATCH", "PUT"]),
            Route("/_sim/personalities/{name}/sns-certificate.pem", sns_certificate),
            Route("/_sim/personalities/{name}/domains", domains),
            Route("/_sim/personalities/{name}/domains/{domain}", domain_hold, methods=["PUT", "DELETE"]),
            Route("/_sim/requests", requests),
            Route("/_sim/stats", stats),
            Route("/_sim/webhooks", webhooks),
            Route("/_sim/reset", reset, methods=["POST"]),
            Route("/p/{personality}/{path:path}", provider_endpoint, methods=methods),
        ]
    )
