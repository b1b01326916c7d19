"""Which URLs an endpoint may have, and which addresses a delivery may connect to (SSRF protection).

A customer's URL must not reach the mesh's own network: destinations in private, loopback, link-local, shared,
multicast, reserved or cloud-metadata ranges are refused, when the endpoint is created or updated and again at
every connection (a name may resolve elsewhere later: DNS rebinding), unless the platform allows internal
destinations (the dev mesh). URLs must be https unless the same setting allows plain http.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DestinationPolicy", "RefusedDestination", "refused_address"]

_METADATA = (ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128"),
             ipaddress.ip_network("100.100.100.200/32"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")
MAX_URL_LENGTH = 2048


class RefusedDestination(ValueError):
    """A URL or address an endpoint may not use; the message names the rule."""


def refused_address(address: str) -> str:
    """Why ``address`` (an IP literal) may not be connected to, or '' when it may."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in _METADATA):
        return f"{ip} is a cloud metadata address"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED):
        return f"{ip} is a private address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return f"{ip} is not a public address"
    return ""


@dataclass(frozen=True)
class DestinationPolicy:
    """The platform's rule for endpoint URLs."""

    allow_internal: bool = False
    """Plain http and internal addresses allowed (the dev mesh)."""

    def check_url(self, url: str) -> tuple[str, int]:
        """The host and port of ``url``, or :class:`RefusedDestination` naming the rule it breaks (syntax only:
        :meth:`check_host` resolves)."""
        if len(url) > MAX_URL_LENGTH:
            raise RefusedDestination(f"the URL is longer than {MAX_URL_LENGTH} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise RefusedDestination(f"the URL cannot be parsed: {exc}") from None
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise RefusedDestination("the URL must be an absolute https:// URL with a host")
        if parts.scheme == "http" and not self.allow_internal:
            raise RefusedDestination("the URL must use https")
        if parts.username or parts.password:
            raise RefusedDestination("the URL must not carry credentials")
        if parts.fragment:
            raise RefusedDestination("the URL must not have a fragment")
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    async def check_host(self, host: str, port: int) -> list[str]:
        """The addresses ``host`` resolves to, every one allowed; :class:`RefusedDestination` when it does not
        resolve or any address is refused (a name that also points inside is refused whole)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise RefusedDestination(f"the host {host!r} does not resolve ({exc})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise RefusedDestination(f"the host {host!r} does not resolve")
        if not self.allow_internal:
            for address in addresses:
                why = refused_address(address)
                if why:
                    raise RefusedDestination(f"the host {host!r} resolves to {why}")
        return addresses

    async def check(self, url: str) -> None:
        """Both checks: what an endpoint's create or update runs."""
        host, port = self.check_url(url)
        await self.check_host(host, port)
