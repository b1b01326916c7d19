"""What every ``esp`` command shares: where the endpoint and API key come from, how an RPC error is told to a person,
and the attachment upload (used by ``esp send --attach`` and ``esp campaign add-recipients --import``)."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from esp.v1 import attachments_pb2, attachments_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "CHUNK",
    "Metadata",
    "auth_metadata",
    "connection",
    "describe_error",
    "upload_attachment",
]

CHUNK = 1024 * 1024
"""Bytes per upload frame."""

Metadata = tuple[tuple[str, str], ...]
"""gRPC call metadata, as the stubs take it."""


def _demo_env() -> dict[str, str]:
    for folder in (Path.cwd(), *Path.cwd().parents):
        candidate = folder / ".dev" / "demo.env"
        if candidate.is_file():
            pairs = (line.split("=", 1) for line in candidate.read_text().splitlines() if "=" in line)
            return {k.strip(): v.strip() for k, v in pairs}
    return {}


def connection() -> tuple[str, str]:
    """(endpoint, api key): the environment first, then .dev/demo.env."""
    file_values = _demo_env()
    endpoint = os.environ.get("ESP_ENDPOINT") or file_values.get("ESP_ENDPOINT", "")
    api_key = os.environ.get("ESP_API_KEY") or file_values.get("ESP_API_KEY", "")
    if not endpoint or not api_key:
        sys.exit("esp: set ESP_ENDPOINT and ESP_API_KEY (or run `make run` in the repository first)")
    return endpoint, api_key


def auth_metadata(api_key: str) -> Metadata:
    """The metadata that authenticates a call with ``api_key``."""
    return (("authorization", f"Bearer {api_key}"),)


def describe_error(exc: grpc.RpcError) -> str:
    """The error for a person: code and message, then each bad field and the ErrorInfo reason with its metadata."""
    status = rpc_status.from_call(exc)
    lines = [f"{exc.code().name}: {exc.details()}"]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                extra = ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
                lines.append(f"  reason: {info.reason}" + (f" ({extra})" if extra else ""))
    return "\n".join(lines)


def upload_attachment(channel: grpc.Channel, metadata: Metadata, path: Path, content_type: str = "") -> str:
    """Upload ``path`` (read twice: once for its SHA-256, once to send it, never whole in memory); its id."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)

    def frames() -> Iterator[attachments_pb2.UploadAttachmentRequest]:
        yield attachments_pb2.UploadAttachmentRequest(metadata=attachments_pb2.AttachmentMetadata(
            filename=path.name,
            content_type=content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            size_bytes=path.stat().st_size, sha256=digest.hexdigest()))
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                yield attachments_pb2.UploadAttachmentRequest(chunk=block)

    stub = attachments_pb2_grpc.AttachmentServiceStub(channel)
    return str(stub.UploadAttachment(frames(), metadata=metadata, timeout=600).id)
