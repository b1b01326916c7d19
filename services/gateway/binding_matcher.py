"""Which RPC answers an HTTP request: the REST routes of the contracts, matched as grpc-gateway v2 matches them.

Every ``google.api.http`` binding of the descriptor set (read by ``descriptors``) is a candidate. Per HTTP method,
the first binding whose path template matches wins, the most literal template first (grpc-gateway: the last
registered); a path that matches only under other methods is 405 with ``Allow`` (body code 12 UNIMPLEMENTED),
anything else 404 (code 5 NOT_FOUND).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc

from services.gateway.descriptors import HttpBinding
from services.gateway.errors import GatewayError


class BindingMatcher:
    """Finds the binding of a request from its HTTP method and raw path."""

    def __init__(self, bindings: Iterable[HttpBinding]) -> None:
        ordered = sorted(
            enumerate(bindings),
            key=lambda item: (-item[1].template.literal_count, item[1].template.has_multi_wildcard, item[0]),
        )
        self._by_method: dict[str, list[HttpBinding]] = {}
        for _, binding in ordered:
            self._by_method.setdefault(binding.http_method, []).append(binding)

    def match(self, http_method: str, raw_path: str) -> tuple[HttpBinding, dict[str, str]]:
        """The binding and its decoded path variables; raise GatewayError 400/404/405 otherwise."""
        if not raw_path.startswith("/"):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "Bad Request", http_status=400)
        components = raw_path[1:].split("/")
        try:
            for binding in self._by_method.get(http_method, ()):
                variables = self._match(binding, components)
                if variables is not None:
                    return binding, variables
            allowed = sorted(
                method
                for method, bindings in self._by_method.items()
                if method != http_method and any(self._match(b, components) is not None for b in bindings)
            )
        except UnicodeDecodeError as exc:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid path encoding: {exc}") from exc
        if allowed:
            raise GatewayError(
                grpc.StatusCode.UNIMPLEMENTED,
                "Method Not Allowed",
                http_status=405,
                headers={"allow": ", ".join(allowed)},
            )
        raise GatewayError(grpc.StatusCode.NOT_FOUND, "Not Found")

    @staticmethod
    def _match(binding: HttpBinding, components: Sequence[str]) -> dict[str, str] | None:
        parts = binding.template.split_verb(components)
        return None if parts is None else binding.template.match(parts)
