"""A small async client for the simulator's admin API (tests, benchmarks, ``make run`` seeding)."""

from __future__ import annotations

from typing import Any

import httpx


class SimulatorClient:
    """Talks to ``/_sim/…`` of a running simulator."""

    def __init__(self, http_url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http_url = http_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.http_url, timeout=10.0, transport=transport)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _get(self, path: str, **params: Any) -> Any:
        response = await self._client.get(path, params={k: v for k, v in params.items() if v is not None})
        response.raise_for_status()
        return response.json()

    async def personalities(self) -> list[dict[str, Any]]:
        """Every personality with credentials, knobs and webhook verification material."""
        result: list[dict[str, Any]] = await self._get("/_sim/personalities")
        return result

    async def personality(self, name: str) -> dict[str, Any]:
        """One personality."""
        result: dict[str, Any] = await self._get(f"/_sim/personalities/{name}")
        return result

    async def knobs(self, name: str) -> dict[str, Any]:
        """A personality's live knobs."""
        result: dict[str, Any] = await self._get(f"/_sim/personalities/{name}/knobs")
        return result

    async def set_knobs(self, name: str, **values: Any) -> dict[str, Any]:
        """Change some knobs (e.g. ``error_rate=1.0``); raises ``httpx.HTTPStatusError`` on a bad value."""
        response = await self._client.patch(f"/_sim/personalities/{name}/knobs", json=values)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def requests(self, personality: str | None = None, *, since: int = 0) -> list[dict[str, Any]]:
        """Recorded requests (oldest first)."""
        result: list[dict[str, Any]] = await self._get("/_sim/requests", personality=personality, since=since)
        return result

    async def delivered_messages(self, personality: str | None = None) -> list[dict[str, Any]]:
        """Messages the simulator took for delivery (accepted or hung requests, batch entries not refused)."""
        return [
            message
            for record in await self.requests(personality)
            if record["delivered"]
            for message in record["messages"]
            if message["rejection"] is None
        ]

    async def stats(self) -> dict[str, Any]:
        """Counts per personality and result."""
        result: dict[str, Any] = await self._get("/_sim/stats")
        return result

    async def webhooks(self, personality: str | None = None) -> list[dict[str, Any]]:
        """Webhook callbacks sent so far."""
        result: list[dict[str, Any]] = await self._get("/_sim/webhooks", personality=personality)
        return result

    async def domains(self, name: str) -> list[dict[str, Any]]:
        """Domains registered at a personality, with their state."""
        result: list[dict[str, Any]] = await self._get(f"/_sim/personalities/{name}/domains")
        return result

    async def hold_domain(self, name: str, domain: str, state: str, detail: str = "") -> None:
        """Hold a domain at a personality ``pending`` or ``failed`` (with the provider's ``detail``), registered
        or not yet; ``verified`` lets it verify."""
        response = await self._client.put(f"/_sim/personalities/{name}/domains/{domain}",
                                          json={"state": state, "detail": detail})
        response.raise_for_status()

    async def release_domain(self, name: str, domain: str) -> None:
        """Drop a domain's hold: it verifies."""
        response = await self._client.delete(f"/_sim/personalities/{name}/domains/{domain}")
        response.raise_for_status()

    async def reset(self, *, keep_knobs: bool = False) -> None:
        """Forget requests, counters and pending webhooks; knobs go back to their initial values unless kept."""
        response = await self._client.post("/_sim/reset", params={"keep_knobs": str(keep_knobs).lower()})
        response.raise_for_status()
