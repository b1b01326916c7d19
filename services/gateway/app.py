"""The gateway's ASGI application: the transcoder, ``GET /openapi.json``, ``GET /healthz`` and the dashboard
(``GET /dashboard``, see ``services/gateway/dashboard``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from libs.common.grpc_client import MAX_MESSAGE_BYTES
from services.gateway.dashboard import dashboard_routes
from services.gateway.descriptors import load_descriptor_set
from services.gateway.openapi import build_openapi
from services.gateway.transcoder import JSON_MEDIA_TYPE, Transcoder, TranscoderOptions


def create_app(
    descriptor_set_path: str | Path,
    upstream_addr: str,
    *,
    options: TranscoderOptions | None = None,
) -> Starlette:
    """Build the REST facade of every ``google.api.http`` binding in the descriptor set, calling
    ``upstream_addr`` over gRPC. The transcoder is reachable as ``app.state.transcoder``. Without ``options``,
    unary bodies are capped at the largest message the upstream accepts (see ``GatewayConfig``)."""
    descriptors = load_descriptor_set(descriptor_set_path)
    options = options or TranscoderOptions(max_body_bytes=MAX_MESSAGE_BYTES)
    transcoder = Transcoder(descriptors, upstream_addr, options)
    # Generated once: the descriptors are fixed for the life of the process.
    openapi_body = json.dumps(build_openapi(descriptors), separators=(",", ":")).encode("utf-8")

    async def openapi(_: Request) -> Response:
        return Response(openapi_body, media_type=JSON_MEDIA_TYPE)

    async def healthz(_: Request) -> Response:
        # Liveness only: the process serves HTTP. Upstream health is the upstream's own probe's business.
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await transcoder.aclose()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *dashboard_routes(),
        ],
        lifespan=lifespan,
    )
    # Everything that is not one of the routes above is an API call for the transcoder to route, so it
    # answers 404/405 with a Status body; slash-redirects would invent routes the contracts do not have.
    app.router.default = transcoder
    app.router.redirect_slashes = False
    app.state.transcoder = transcoder
    return app
