"""The dashboard: a static page and its assets, served by the gateway next to the REST API it calls.

``GET /dashboard`` is the page, ``GET /dashboard/assets/{path}`` its scripts, styles and the vendored chart library
(see VENDORED.md). Nothing here reads a key or calls a service: the page asks the user for an API key (or the
platform admin token), keeps it in sessionStorage and calls ``/v1/stats``, ``/v1/stats:compareProviders`` and
``/v1/campaigns`` of the same origin with it, so the REST API's own authentication and tenant scoping apply.

The files are read once when the app is built (they are small and fixed for the life of the process) and served
with a strict Content-Security-Policy (no inline script or style, API calls to this origin only), an ETag for
revalidation and ``nosniff``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

DASHBOARD_DIR = Path(__file__).resolve().parent
ASSETS_DIR = DASHBOARD_DIR / "assets"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
"""What is served, by extension; anything else under assets/ (a LICENSE, notes) is not."""

PAGE_CACHE_CONTROL = "no-cache"
"""The page and the dashboard's own scripts: always revalidated (a cheap 304 with the ETag), so a new gateway's
page and scripts are never mixed with an old one's."""

VENDOR_CACHE_CONTROL = "public, max-age=31536000, immutable"
"""Vendored libraries live under a folder named with their version, so a given URL never changes content."""


@dataclass(frozen=True)
class StaticFile:
    """One file to serve, read at start-up."""

    body: bytes
    content_type: str
    cache_control: str
    etag: str


def _static_file(path: Path, cache_control: str) -> StaticFile:
    body = path.read_bytes()
    return StaticFile(body, CONTENT_TYPES[path.suffix], cache_control,
                      '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_assets(assets_dir: Path = ASSETS_DIR) -> dict[str, StaticFile]:
    """Every servable file under ``assets_dir`` by its path relative to it ("vendor/uplot-1.6.32/uPlot.esm.js")."""
    files: dict[str, StaticFile] = {}
    for path in sorted(assets_dir.rglob("*")):
        if not path.is_file() or path.suffix not in CONTENT_TYPES:
            continue
        relative = path.relative_to(assets_dir).as_posix()
        cache = VENDOR_CACHE_CONTROL if relative.startswith("vendor/") else PAGE_CACHE_CONTROL
        files[relative] = _static_file(path, cache)
    return files


def _headers(file: StaticFile) -> dict[str, str]:
    return {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Cache-Control": file.cache_control,
        "ETag": file.etag,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }


def _serve(request: Request, file: StaticFile) -> Response:
    headers = _headers(file)
    if file.etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else file.body
    response = Response(body, headers=headers, media_type=None)
    response.headers["Content-Type"] = file.content_type
    if request.method == "HEAD":
        response.headers["Content-Length"] = str(len(file.body))
    return response


def _not_found() -> Response:
    return Response("not found\n", status_code=404, media_type="text/plain",
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


def dashboard_routes(dashboard_dir: Path = DASHBOARD_DIR) -> list[BaseRoute]:
    """The routes of the page and of its assets."""
    page = _static_file(dashboard_dir / "index.html", PAGE_CACHE_CONTROL)
    assets = load_assets(dashboard_dir / "assets")

    async def dashboard(request: Request) -> Response:
        return _serve(request, page)

    async def asset(request: Request) -> Response:
        # A lookup in the files read at start-up: no path ever reaches the file system, so "..", encoded
        # slashes and the like find nothing.
        file = assets.get(str(request.path_params["path"]))
        return _serve(request, file) if file is not None else _not_found()

    return [
        Route("/dashboard", dashboard, methods=["GET", "HEAD"]),
        Route("/dashboard/assets/{path:path}", asset, methods=["GET", "HEAD"]),
    ]
