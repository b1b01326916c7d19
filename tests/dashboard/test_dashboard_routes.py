"""The dashboard's routes on the gateway: the page, its assets, their headers; the vendored library's sums."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.dashboard import DASHBOARD_DIR

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # The dashboard's routes never call the upstream: an address nothing listens on will do.
    app = create_app(REPO / "gen" / "esp.binpb", "127.0.0.1:9")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as c:
        yield c
    await app.state.transcoder.aclose()


def _csp(response: httpx.Response) -> dict[str, str]:
    return {part.split(" ", 1)[0]: part.split(" ", 1)[1] if " " in part else ""
            for part in (p.strip() for p in response.headers["content-security-policy"].split(";"))}


async def test_the_page_is_html_with_a_strict_content_security_policy(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    csp = _csp(response)
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["connect-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    # No inline script or style anywhere in the page: everything comes from the assets.
    assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
    assert "<style" not in response.text and " style=" not in response.text
    assert re.search(r'<script type="module" src="/dashboard/assets/dashboard.js">', response.text)


async def test_every_asset_the_page_and_scripts_name_is_served_with_its_content_type(
        client: httpx.AsyncClient) -> None:
    page = (await client.get("/dashboard")).text
    named = re.findall(r'(?:src|href)="(/dashboard/assets/[^"]+)"', page)
    for script in (DASHBOARD_DIR / "assets").glob("*.js"):
        named += [f"/dashboard/assets/{m}" for m in re.findall(r'from "\./([^"]+)"', script.read_text())]
    assert "/dashboard/assets/vendor/uplot-1.6.32/uPlot.esm.js" in named
    for path in named:
        response = await client.get(path)
        assert response.status_code == 200, path
        expected = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
                    "svg": "image/svg+xml"}[path.rsplit(".", 1)[1]]
        assert response.headers["content-type"] == expected, path
        assert response.headers["x-content-type-options"] == "nosniff"
        if "/vendor/" in path:
            assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        else:
            assert response.headers["cache-control"] == "no-cache"


async def test_an_asset_is_revalidated_with_its_etag(client: httpx.AsyncClient) -> None:
    first = await client.get("/dashboard/assets/dashboard.js")
    again = await client.get("/dashboard/assets/dashboard.js", headers={"If-None-Match": first.headers["etag"]})
    head = await client.head("/dashboard/assets/dashboard.js")

    assert again.status_code == 304 and again.content == b""
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(first.content))


@pytest.mark.parametrize("path", [
    "/dashboard/assets/missing.js",
    "/dashboard/assets/vendor/uplot-1.6.32/LICENSE",
    "/dashboard/assets/../__init__.py",
    "/dashboard/assets/%2e%2e/__init__.py",
    "/dashboard/assets/..%2F__init__.py",
    "/dashboard/assets/vendor/../../VENDORED.md",
])
async def test_nothing_outside_the_servable_assets_is_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)

    assert response.status_code == 404
    assert b"import" not in response.content


async def test_the_api_routes_are_still_the_transcoders(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard/nothing")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")


def test_the_vendored_files_match_the_sums_in_vendored_md() -> None:
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in (DASHBOARD_DIR / "VENDORED.md").read_text().splitlines()
            if re.search(r"\|\s*[0-9a-f]{64}\s*\|\s*$", line)]
    files = [(dest, digest) for _, _, _, dest, digest in rows if dest.startswith("assets/")]
    assert len(files) == 3
    for dest, digest in files:
        assert hashlib.sha256((DASHBOARD_DIR / dest).read_bytes()).hexdigest() == digest, dest
    vendored = {p.relative_to(DASHBOARD_DIR).as_posix()
                for p in (DASHBOARD_DIR / "assets" / "vendor").rglob("*") if p.is_file()}
    assert vendored == {dest for dest, _ in files}
