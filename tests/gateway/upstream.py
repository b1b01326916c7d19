"""Test doubles of OUR gRPC services (not of the outside world), served by a real grpc.aio server so the
transcoder is tested in isolation: each records what it received and answers with canned logic."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from esp.v1 import (
    attachments_pb2,
    attachments_pb2_grpc,
    campaigns_pb2,
    campaigns_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
    providers_pb2,
    providers_pb2_grpc,
)
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.gateway.descriptors import load_descriptor_set

BIG_CREDITS = 12_345_678_901_234  # beyond 2**53: JSON must carry it as a string


@dataclass
class Recorder:
    """What the upstream saw: the last request and metadata per method, and upload progress."""

    requests: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    time_remaining: dict[str, float | None] = field(default_factory=dict)
    first_upload_frame: asyncio.Event = field(default_factory=asyncio.Event)
    first_recipients_frame: asyncio.Event = field(default_factory=asyncio.Event)
    upload_chunk_sizes: list[int] = field(default_factory=list)

    def record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.requests[method] = request
        self.metadata[method] = {key: value for key, value in context.invocation_metadata() or ()}
        self.time_remaining[method] = context.time_remaining()


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class MessageServiceDouble(messages_pb2_grpc.MessageServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def SendEmail(self, request, context):
        self.recorder.record("SendEmail", request, context)
        await context.send_initial_metadata((("x-served-by", "double"),))
        message = messages_pb2.Message(
            name="messages/m-1",
            id="m-1",
            message_class=request.message_class,
            state=messages_pb2.MESSAGE_STATE_ACCEPTED,
            to=request.to,
            subject=request.subject,
            tags=request.tags,
            metadata=request.metadata,
            request_id=request.request_id,
            credits=BIG_CREDITS,
        )
        getattr(message, "from").CopyFrom(getattr(request, "from"))
        message.create_time.FromJsonString("2025-01-02T03:04:05Z")
        return messages_pb2.SendEmailResponse(message=message)

    async def GetMessage(self, request, context):
        self.recorder.record("GetMessage", request, context)
        if request.name == "messages/missing":
            status = status_pb2.Status(
                code=grpc.StatusCode.NOT_FOUND.value[0],
                message=f"{request.name} does not exist",
                details=[
                    _packed(
                        error_details_pb2.ErrorInfo(
                            reason="MESSAGE_NOT_FOUND", domain="esp.dev", metadata={"message": request.name}
                        )
                    )
                ],
            )
            await context.abort_with_status(rpc_status.to_status(status))
        return messages_pb2.Message(name=request.name)

    async def ListMessages(self, request, context):
        self.recorder.record("ListMessages", request, context)
        return messages_pb2.ListMessagesResponse(next_page_token="next")


class AttachmentServiceDouble(attachments_pb2_grpc.AttachmentServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def UploadAttachment(self, request_iterator, context):
        metadata: attachments_pb2.AttachmentMetadata | None = None
        digest = hashlib.sha256()
        size = 0
        frames = 0
        self.recorder.upload_chunk_sizes = []
        async for frame in request_iterator:
            frames += 1
            if frames == 1:
                self.recorder.first_upload_frame.set()
                if not frame.HasField("metadata"):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "the first frame must carry metadata"
                    )
                metadata = frame.metadata
                continue
            digest.update(frame.chunk)
            size += len(frame.chunk)
            self.recorder.upload_chunk_sizes.append(len(frame.chunk))
        self.recorder.record("UploadAttachment", metadata, context)
        assert metadata is not None
        return attachments_pb2.Attachment(
            name="attachments/a-1",
            id="a-1",
            filename=metadata.filename,
            content_type=metadata.content_type,
            size_bytes=size,
            sha256=digest.hexdigest(),
        )

    async def DeleteAttachment(self, request, context):
        self.recorder.record("DeleteAttachment", request, context)
        return empty_pb2.Empty()


class CampaignServiceDouble(campaigns_pb2_grpc.CampaignServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def CreateCampaign(self, request, context):
        self.recorder.record("CreateCampaign", request, context)
        campaign = campaigns_pb2.Campaign()
        campaign.CopyFrom(request.campaign)
        campaign.name = "campaigns/c-1"
        return campaign

    async def AddCampaignRecipients(self, request_iterator, context):
        """Numbers recipients 1, 2, 3... in stream order and refuses addresses without "@", as the campaigns
        service numbers and reports rows."""
        frames = []
        response = campaigns_pb2.AddCampaignRecipientsResponse()
        row = 0
        async for frame in request_iterator:
            frames.append(frame)
            self.recorder.first_recipients_frame.set()
            for recipient in frame.recipients:
                row += 1
                email = recipient.address.email.strip()
                if "@" in email:
                    response.added_count += 1
                    continue
                response.rejected_count += 1
                reason = "MISSING_EMAIL: no email address" if not email else "INVALID_ADDRESS: no @"
                response.errors.add(row=row, address=email, reason=reason)
        self.recorder.record("AddCampaignRecipients", frames, context)
        return response


class ProviderServiceDouble(providers_pb2_grpc.ProviderServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def UpdateProvider(self, request, context):
        self.recorder.record("UpdateProvider", request, context)
        provider = providers_pb2.Provider()
        provider.CopyFrom(request.provider)
        return provider


def echo_handler(descriptor_set_path: Path, recorder: Recorder) -> grpc.GenericRpcHandler:
    """A generic handler for gatewaytest.v1.EchoService built from its descriptor set: every RPC echoes its
    request, except Fail, which fails as asked."""
    descriptors = load_descriptor_set(descriptor_set_path)
    service = descriptors.pool.FindServiceByName("gatewaytest.v1.EchoService")
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = descriptors.message_class(method.input_type)

        def make(name: str) -> Any:
            async def echo(request, context):
                recorder.record(name, request, context)
                if name == "Fail":
                    details = [_packed(error_details_pb2.ErrorInfo(reason="ASKED_TO_FAIL", domain="test"))]
                    if request.retry_after_ms:
                        info = error_details_pb2.RetryInfo()
                        info.retry_delay.FromMilliseconds(request.retry_after_ms)
                        details.append(_packed(info))
                    status = status_pb2.Status(code=request.code, message=request.message, details=details)
                    await context.abort_with_status(rpc_status.to_status(status))
                return request

            return echo

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            make(method.name),
            request_deserializer=request_type.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def start_upstream(echo_descriptor_set: Path) -> tuple[grpc.aio.Server, int, Recorder]:
    """A grpc.aio server on a free loopback port with every double registered."""
    recorder = Recorder()
    server = grpc.aio.server()
    messages_pb2_grpc.add_MessageServiceServicer_to_server(MessageServiceDouble(recorder), server)
    attachments_pb2_grpc.add_AttachmentServiceServicer_to_server(AttachmentServiceDouble(recorder), server)
    campaigns_pb2_grpc.add_CampaignServiceServicer_to_server(CampaignServiceDouble(recorder), server)
    providers_pb2_grpc.add_ProviderServiceServicer_to_server(ProviderServiceDouble(recorder), server)
    server.add_generic_rpc_handlers((echo_handler(echo_descriptor_set, recorder),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, recorder
