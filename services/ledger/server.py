"""The ledger's gRPC wiring: protobuf ↔ the domain in :mod:`services.ledger.ledger`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from esp.v1 import common_pb2, credits_pb2, credits_pb2_grpc
from nats.js.errors import NotFoundError

from libs.common import db
from libs.common.auth import TrustedHeaderAuthenticator, check_tenant_access
from libs.common.batching import BatchingOptions
from libs.common.errors import FieldViolation, InvalidArgument, error_parts
from libs.common.field_masks import update_paths
from libs.common.grpc_server import BackgroundTask, ServiceApp
from libs.common.jetstream import Topology, connect, ensure_streams
from libs.common.pagination import checked_page_token, page_size
from libs.common.resource_names import MAX_ID_CHARS, checked_text, resource_id
from libs.common.timestamps import to_timestamp
from libs.common.workers import WorkerSpec, start_or_inline, worker_env
from services.ledger.config import LedgerSettings
from services.ledger.errors import LedgerError
from services.ledger.ledger import Ledger, LedgerOptions
from services.ledger.models import (
    Balance,
    Hold,
    HoldState,
    MessageClass,
    PriceBook,
    PriceOverrides,
    ReserveRequest,
)
from services.ledger.notification_publisher import NotificationPublisher
from services.ledger.settlement_worker import build_settlement

_STATE = {HoldState.HELD: credits_pb2.HOLD_STATE_HELD, HoldState.COMMITTED: credits_pb2.HOLD_STATE_COMMITTED,
          HoldState.RELEASED: credits_pb2.HOLD_STATE_RELEASED, HoldState.EXPIRED: credits_pb2.HOLD_STATE_EXPIRED}


def _tenant(name: str, field: str = "tenant") -> str:
    tenant_id = resource_id(name, "tenants", field)
    check_tenant_access(tenant_id)
    return tenant_id


def _hold_id(name: str) -> str:
    return resource_id(name, "holds", "name")


def _class(value: int) -> MessageClass:
    try:
        return MessageClass.from_proto(value)
    except ValueError:
        raise InvalidArgument(
            "message_class is required",
            field_violations=[FieldViolation("message_class", "otp, transactional or bulk")],
        ) from None


def _balance(b: Balance) -> credits_pb2.Balance:
    return credits_pb2.Balance(tenant=f"tenants/{b.tenant_id}", available=b.available, held=b.held, spent=b.spent,
                               low_balance_threshold=b.low_balance_threshold or 0)


def _hold(h: Hold) -> credits_pb2.Hold:
    return credits_pb2.Hold(name=f"holds/{h.hold_id}", tenant=f"tenants/{h.tenant_id}", amount=h.amount,
                            committed_amount=h.committed_amount or 0, state=_STATE[h.state],
                            message_class=h.message_class.proto, expire_time=to_timestamp(h.expires_at))


def _reserve_request(r: credits_pb2.ReserveCreditsRequest) -> ReserveRequest:
    return ReserveRequest(_tenant(r.tenant), r.hold_id, _class(r.message_class), r.email_count or 1,
                          r.attachment_bytes, float(r.ttl_seconds) if r.ttl_seconds else None)


class CreditServicer(credits_pb2_grpc.CreditServiceServicer):
    """``esp.v1.CreditService`` over a :class:`Ledger`."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def GetBalance(self, request: credits_pb2.GetBalanceRequest, context: Any) -> credits_pb2.Balance:
        """The tenant's balance."""
        return _balance(await self.ledger.get_balance(_tenant(request.tenant)))

    async def TopUp(self, request: credits_pb2.TopUpRequest, context: Any) -> credits_pb2.Balance:
        """Add credits to the tenant's balance, once per request id."""
        request_id = checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        return _balance(await self.ledger.top_up(_tenant(request.tenant), request.amount, request_id))

    async def SetLowBalanceThreshold(self, request: credits_pb2.SetLowBalanceThresholdRequest,
                                     context: Any) -> credits_pb2.Balance:
        """Set or clear (0) the tenant's low-balance threshold."""
        return _balance(await self.ledger.set_low_balance_threshold(_tenant(request.tenant),
                                                                    request.threshold or None))

    async def ListTransactions(self, request: credits_pb2.ListTransactionsRequest,
                               context: Any) -> credits_pb2.ListTransactionsResponse:
        """The tenant's journal entries, newest first, a page at a time."""
        entries, token = await self.ledger.list_transactions(_tenant(request.tenant), page_size(request.page_size),
                                                             checked_page_token(request.page_token))
        return credits_pb2.ListTransactionsResponse(
            transactions=[credits_pb2.Transaction(
                id=str(e.entry_id), kind=str(e.kind), amount=e.amount, hold=f"holds/{e.hold_id}" if e.hold_id else "",
                request_id=e.request_id or "", create_time=to_timestamp(e.created_at),
                available_after=e.available_after) for e in entries],
            next_page_token=token)

    async def ReserveCredits(self, request: credits_pb2.ReserveCreditsRequest, context: Any) -> credits_pb2.Hold:
        """Hold the price of a message from the tenant's available credits."""
        r = _reserve_request(request)
        return _hold(await self.ledger.reserve(r.tenant_id, r.hold_id, r.message_class, r.emails,
                                               r.attachment_bytes, r.ttl_s))

    async def BatchReserveCredits(self, request: credits_pb2.BatchReserveCreditsRequest,
                                  context: Any) -> credits_pb2.BatchReserveCreditsResponse:
        """Reserve many holds; each request gets its own hold or error."""
        refused: dict[int, credits_pb2.BatchReserveCreditsResponse.Result] = {}
        valid: list[ReserveRequest] = []
        for index, item in enumerate(request.requests):
            try:
                valid.append(_reserve_request(item))
            except InvalidArgument as exc:
                refused[index] = _error_result(exc)
        outcomes = iter(await self.ledger.reserve_many(valid))
        # One per email: the holds of a batch come in a few shapes (same tenant, class, amount, expiry), so each
        # shape's message is built once and copied (in C), and only the name is set per hold.
        shapes: dict[tuple[Any, ...], credits_pb2.Hold] = {}
        response = credits_pb2.BatchReserveCreditsResponse()
        results = response.results
        for index in range(len(request.requests)):
            result = results.add()
            error = refused.get(index)
            if error is not None:
                result.CopyFrom(error)
                continue
            outcome = next(outcomes)
            if isinstance(outcome, LedgerError):
                result.CopyFrom(_error_result(outcome))
                continue
            key = (outcome.tenant_id, outcome.amount, outcome.committed_amount, outcome.state, outcome.message_class,
                   outcome.expires_at)
            shape = shapes.get(key)
            if shape is None:
                shape = shapes[key] = _hold(outcome)
            hold = result.hold
            hold.CopyFrom(shape)
            hold.name = "holds/" + outcome.hold_id
        return response

    async def CommitHold(self, request: credits_pb2.CommitHoldRequest, context: Any) -> credits_pb2.Hold:
        """Spend (part of) a hold."""
        request_id = checked_text(request.request_id, "request_id", max_chars=MAX_ID_CHARS)
        return _hold(await self.ledger.commit(_hold_id(request.name), request.amount or None, request_id or None))

    async def ReleaseHold(self, request: credits_pb2.ReleaseHoldRequest, context: Any) -> credits_pb2.Hold:
        """Return a hold's credits."""
        return _hold(await self.ledger.release(_hold_id(request.name), request.reason))

    async def GetPriceBook(self, request: credits_pb2.GetPriceBookRequest, context: Any) -> credits_pb2.PriceBook:
        """The prices in effect for a tenant, or the defaults (``tenants/-``)."""
        book = (await self.ledger.get_price_book() if request.tenant == "tenants/-"
                else await self.ledger.get_price_book(_tenant(request.tenant)))
        return _price_book(request.tenant, book)

    async def UpdatePriceBook(self, request: credits_pb2.UpdatePriceBookRequest,
                              context: Any) -> credits_pb2.PriceBook:
        """Change the defaults (``tenants/-``) or a tenant's overrides, the prices ``update_mask`` names, as every
        Update RPC reads a mask (AIP-134, :mod:`libs.common.field_masks`): ``*`` for every price; with no mask, the
        prices the request sets (other than 0). A tenant's price of 0 goes back to the default, so only a mask
        naming it can do that. INVALID_ARGUMENT for a path that is no price (``tenant`` cannot change)."""
        b = request.price_book
        paths = update_paths(request.update_mask, b, immutable=("tenant",))
        if b.tenant == "tenants/-":
            current = await self.ledger.get_price_book()
            book = await self.ledger.set_default_prices(PriceBook("-", *(
                getattr(b if name in paths else current, name) for name in _PRICES)))
        else:
            book = await self.ledger.set_price_overrides(_tenant(b.tenant, "price_book.tenant"), PriceOverrides(
                *(getattr(b, name) or None for name in _PRICES)), fields=paths)
        return _price_book(b.tenant, book)


_PRICES = ("otp_per_email", "transactional_per_email", "bulk_per_email", "per_attachment_mb")
"""The prices of a PriceBook, in the order PriceBook and PriceOverrides take them."""


def _price_book(tenant: str, book: Any) -> credits_pb2.PriceBook:
    return credits_pb2.PriceBook(tenant=tenant, otp_per_email=book.otp_per_email,
                                 transactional_per_email=book.transactional_per_email,
                                 bulk_per_email=book.bulk_per_email, per_attachment_mb=book.per_attachment_mb)


def _error_result(exc: Any) -> credits_pb2.BatchReserveCreditsResponse.Result:
    code, message, reason, metadata, fields = error_parts(exc)
    return credits_pb2.BatchReserveCreditsResponse.Result(error=common_pb2.BatchError(
        code=code, message=message, reason=reason, metadata=metadata, fields=fields))


async def build_app(settings: LedgerSettings) -> ServiceApp:
    """The ledger service: the CreditService, the expiry sweeper, the notification publisher, and the settling of
    outcome events (in a worker process of its own unless ``settlement_worker`` is off)."""
    topology = Topology(settings.namespace, replicas=settings.stream_replicas)
    pool = await db.create_pool(settings.postgres_dsn, min_size=2, max_size=settings.reserve_workers + 8,
                                name="ledger")
    ledger = Ledger(pool, LedgerOptions(
        default_hold_ttl_s=settings.hold_ttl_s,
        reserve_batching=BatchingOptions(max_batch_size=settings.reserve_batch_size,
                                         workers=settings.reserve_workers),
        reserve_synchronous_commit=settings.reserve_synchronous_commit))
    nc = await connect(settings.nats_url, "esp-ledger")
    js = nc.jetstream()
    await ensure_streams(js, topology)
    try:  # the consumer of every event that came before ledger-final, if an older ledger left it behind
        await js.delete_consumer(topology.events_stream, topology.consumer("ledger"))
    except NotFoundError:
        pass

    async def sweep(stop: Any) -> None:
        await ledger.run_expiry_sweeper(stop, interval_s=settings.sweep_interval_s,
                                        processed_event_retention_s=settings.processed_event_retention_s)

    notifications = NotificationPublisher(ledger, js, topology)

    async def publish_notifications(stop: Any) -> None:
        await notifications.run(stop)

    async def close_all() -> None:
        await ledger.close()
        await nc.drain()
        await pool.close()

    tasks: list[BackgroundTask] = [sweep, publish_notifications]
    closers: list[Callable[[], Awaitable[None]]] = [close_all]
    # Only final outcomes settle holds (they have a subject of their own), in a worker process of lower CPU priority
    # unless configured otherwise; see services.ledger.settlement_worker.
    settlement = await start_or_inline(
        "ledger", WorkerSpec("ledger-settlement", "services.ledger.settlement_worker", worker_env(settings, 0)),
        lambda: build_settlement(settings), in_process=not settings.settlement_worker,
        grace_s=settings.shutdown_grace_s)
    tasks.extend(settlement.tasks)
    closers.extend(settlement.closers)
    return ServiceApp(
        name="ledger", default_port=50053,
        servicers=[(credits_pb2_grpc.add_CreditServiceServicer_to_server, CreditServicer(ledger))],
        service_names=[credits_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name],
        tasks=tasks, closers=closers, authenticator=TrustedHeaderAuthenticator())

