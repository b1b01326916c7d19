"""Suppression lists: from hard bounces and complaints, managed through the API, mirrored in Redis."""

from __future__ import annotations

from typing import Any, cast

import grpc
import pytest
from esp.v1 import messages_pb2, reports_pb2
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from libs.common.message_classes import MessageClass
from libs.common.suppressions import suppression_key_for_every_class, suppression_key_for_topic
from services.reports.models import Suppression, SuppressionReason
from services.reports.pagination import encode_page_token
from services.reports.suppressions import (
    add_to_redis,
    is_suppressed,
    resync_redis,
    suppressed_among,
    suppression_key,
)
from tests.reports.builders import accepted, at, eventually, new_id, sender_event, sent
from tests.reports.conftest import ReportsService, caller

M, R = messages_pb2, reports_pb2


async def _suppression(reports: ReportsService, tenant: str, email: str) -> reports_pb2.Suppression | None:
    try:
        return await reports.suppressions.GetSuppression(R.GetSuppressionRequest(name=f"suppressions/{email}"),
                                                         metadata=caller(tenant))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _delivery_report(reports: ReportsService, tenant: str, event_type: int, recipient: str,
                           bounce_type: str = "") -> str:
    message_id = new_id()
    await reports.publish([
        accepted(tenant, message_id, at(9), to=[recipient]),
        sent(tenant, message_id, at(9, 0, 1), provider="mailgun-main", provider_message_id=f"<{message_id}@mg>"),
        sender_event(tenant, message_id, event_type, at(9, 1), provider="mailgun-main", recipient=recipient,
                     bounce_type=bounce_type, reason="550 5.1.1 user unknown"),
    ])
    return message_id


async def test_a_hard_bounce_suppresses_the_recipient_in_postgres_and_redis(reports: ReportsService):
    tenant = new_id("tenant-")
    await _delivery_report(reports, tenant, M.MESSAGE_EVENT_TYPE_BOUNCED, "Gone@Example.com", bounce_type="hard")

    suppression = await eventually(lambda: _suppression(reports, tenant, "gone@example.com"), what="suppression")

    assert suppression.email == "gone@example.com"
    assert suppression.reason == R.SUPPRESSION_REASON_HARD_BOUNCE
    assert await is_suppressed(reports.redis, reports.settings.namespace, tenant, "GONE@example.com")


async def test_a_complaint_suppresses_the_recipient(reports: ReportsService):
    tenant = new_id("tenant-")
    await _delivery_report(reports, tenant, M.MESSAGE_EVENT_TYPE_COMPLAINED, "angry@example.com")

    suppression = await eventually(lambda: _suppression(reports, tenant, "angry@example.com"), what="suppression")

    assert suppression.reason == R.SUPPRESSION_REASON_COMPLAINT
    assert await is_suppressed(reports.redis, reports.settings.namespace, tenant, "angry@example.com")


async def test_a_soft_bounce_does_not_suppress(reports: ReportsService):
    tenant = new_id("tenant-")
    message_id = await _delivery_report(reports, tenant, M.MESSAGE_EVENT_TYPE_BOUNCED, "full@example.com",
                                        bounce_type="soft")

    async def bounced() -> bool:
        try:
            message = await reports.messages.GetMessage(M.GetMessageRequest(name=f"messages/{message_id}"),
                                                        metadata=caller(tenant))
        except grpc.aio.AioRpcError:
            return False
        return message.state == M.MESSAGE_STATE_BOUNCED

    await eventually(bounced, what="bounced state")
    assert await _suppression(reports, tenant, "full@example.com") is None
    assert not await is_suppressed(reports.redis, reports.settings.namespace, tenant, "full@example.com")


async def test_suppressions_are_per_tenant(reports: ReportsService):
    tenant, other = new_id("tenant-"), new_id("tenant-")
    await _delivery_report(reports, tenant, M.MESSAGE_EVENT_TYPE_BOUNCED, "gone@example.com", bounce_type="hard")
    await eventually(lambda: _suppression(reports, tenant, "gone@example.com"), what="suppression")

    assert await _suppression(reports, other, "gone@example.com") is None
    assert not await is_suppressed(reports.redis, reports.settings.namespace, other, "gone@example.com")


async def test_created_suppression_reaches_redis_and_deleting_it_lifts_it(reports: ReportsService):
    tenant = new_id("tenant-")
    created = await reports.suppressions.CreateSuppression(
        R.CreateSuppressionRequest(suppression=R.Suppression(email=" Bob@Example.COM ", note="asked by phone")),
        metadata=caller(tenant))

    assert created.name == "suppressions/bob@example.com"
    assert created.reason == R.SUPPRESSION_REASON_MANUAL
    assert created.note == "asked by phone"
    assert await is_suppressed(reports.redis, reports.settings.namespace, tenant, "bob@example.com")

    await reports.suppressions.DeleteSuppression(R.DeleteSuppressionRequest(name="suppressions/bob@example.com"),
                                                 metadata=caller(tenant))

    assert await _suppression(reports, tenant, "bob@example.com") is None
    assert not await is_suppressed(reports.redis, reports.settings.namespace, tenant, "bob@example.com")


async def test_creating_an_existing_suppression_is_already_exists(reports: ReportsService):
    tenant = new_id("tenant-")
    request = R.CreateSuppressionRequest(suppression=R.Suppression(email="twice@example.com"))
    await reports.suppressions.CreateSuppression(request, metadata=caller(tenant))

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.suppressions.CreateSuppression(request, metadata=caller(tenant))

    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_deleting_an_unknown_suppression_is_not_found(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.suppressions.DeleteSuppression(
            R.DeleteSuppressionRequest(name="suppressions/nobody@example.com"), metadata=caller(new_id("tenant-")))

    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_suppression_needs_an_email_address(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.suppressions.CreateSuppression(
            R.CreateSuppressionRequest(suppression=R.Suppression(email="not-an-address")),
            metadata=caller(new_id("tenant-")))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_managing_suppressions_needs_the_admin_scope(reports: ReportsService):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await reports.suppressions.CreateSuppression(
            R.CreateSuppressionRequest(suppression=R.Suppression(email="x@example.com")),
            metadata=caller(new_id("tenant-"), "read,send"))

    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_suppressions_are_listed_in_address_order_page_by_page(reports: ReportsService):
    tenant = new_id("tenant-")
    emails = [f"user{i}@example.com" for i in (3, 1, 4, 0, 2)]
    for email in emails:
        await reports.suppressions.CreateSuppression(
            R.CreateSuppressionRequest(suppression=R.Suppression(email=email)), metadata=caller(tenant))

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await reports.suppressions.ListSuppressions(R.ListSuppressionsRequest(page_size=2, page_token=token),
                                                           metadata=caller(tenant))
        seen += [s.email for s in page.suppressions]
        token = page.next_page_token
        if not token:
            break

    assert seen == sorted(emails)


async def test_suppressed_among_answers_for_several_recipients_at_once(reports: ReportsService):
    tenant = new_id("tenant-")
    await reports.suppressions.CreateSuppression(
        R.CreateSuppressionRequest(suppression=R.Suppression(email="blocked@example.com")), metadata=caller(tenant))

    found = await suppressed_among(reports.redis, reports.settings.namespace, tenant,
                                   ["ok@example.com", "Blocked@Example.com"])

    assert found == {"Blocked@Example.com"}


async def test_resync_rebuilds_redis_sets_from_postgres_and_drops_stale_ones(reports: ReportsService):
    namespace = f"{reports.settings.namespace}resync"
    kept, emptied = new_id("tenant-"), new_id("tenant-")
    async with await reports.connect_db() as conn:
        await conn.execute(
            "INSERT INTO reports.suppressions (tenant_id, email, reason) VALUES (%s, 'a@example.com', 'manual'),"
            " (%s, 'b@example.com', 'complaint')", (kept, kept))
    # Redis drifted: a member Postgres does not have, and a whole set of a tenant with no suppressions left.
    await reports.redis.sadd(suppression_key(namespace, kept), "lifted@example.com")
    await reports.redis.sadd(suppression_key(namespace, emptied), "c@example.com")

    async with AsyncConnectionPool(reports.settings.postgres_dsn, min_size=1, max_size=2, open=False) as pool:
        await resync_redis(pool, reports.redis, namespace)

    members = await reports.redis.smembers(suppression_key(namespace, kept))
    assert {m.decode() for m in members} == {"a@example.com", "b@example.com"}
    assert not await reports.redis.exists(suppression_key(namespace, emptied))


async def _scans(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_resync_finds_stale_sets_through_its_index_without_scanning_the_keyspace(reports: ReportsService):
    namespace = f"{reports.settings.namespace}index"
    kept, lifted = new_id("tenant-"), new_id("tenant-")
    async with await reports.connect_db() as conn:
        await conn.execute("INSERT INTO reports.suppressions (tenant_id, email, reason) VALUES (%s, 'a@example.com',"
                           " 'manual')", (kept,))
    async with AsyncConnectionPool(reports.settings.postgres_dsn, min_size=1, max_size=2, open=False) as pool:
        await resync_redis(pool, reports.redis, namespace)  # the first resync may scan: it writes the index
        # A suppression written through the mirror whose Postgres row is gone (its removal never reached Redis).
        await add_to_redis(reports.redis, namespace, [Suppression(lifted, "b@example.com", SuppressionReason.MANUAL)])
        scans = await _scans(reports.redis)
        await resync_redis(pool, reports.redis, namespace)

    assert await _scans(reports.redis) == scans
    assert not await reports.redis.exists(suppression_key(namespace, lifted))
    assert not await reports.redis.exists(suppression_key_for_every_class(namespace, lifted))
    assert await is_suppressed(reports.redis, namespace, kept, "A@example.com")


async def _members(redis: Redis, key: str) -> set[str]:
    return {m.decode() for m in await redis.smembers(key)}


async def _sets_holding(reports: ReportsService, tenant: str, email: str, namespace: str = "") -> set[str]:
    """Which of the tenant's two Redis sets hold ``email``: "all" (bulk checks it), "every_class" (all classes)."""
    namespace = namespace or reports.settings.namespace
    held = set()
    if email in await _members(reports.redis, suppression_key(namespace, tenant)):
        held.add("all")
    if email in await _members(reports.redis, suppression_key_for_every_class(namespace, tenant)):
        held.add("every_class")
    return held


async def _create(reports: ReportsService, tenant: str, email: str, reason: R.SuppressionReason.ValueType) -> None:
    await reports.suppressions.CreateSuppression(
        R.CreateSuppressionRequest(suppression=R.Suppression(email=email, reason=reason)), metadata=caller(tenant))


async def test_an_unsubscribe_suppression_goes_only_to_the_set_bulk_mail_checks(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "reader@example.com", R.SUPPRESSION_REASON_UNSUBSCRIBE)

    assert await _sets_holding(reports, tenant, "reader@example.com") == {"all"}


async def test_a_manual_suppression_goes_to_both_redis_sets(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "blocked@example.com", R.SUPPRESSION_REASON_MANUAL)

    assert await _sets_holding(reports, tenant, "blocked@example.com") == {"all", "every_class"}


async def test_deleting_a_suppression_removes_it_from_both_redis_sets(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "back@example.com", R.SUPPRESSION_REASON_MANUAL)

    await reports.suppressions.DeleteSuppression(R.DeleteSuppressionRequest(name="suppressions/back@example.com"),
                                                 metadata=caller(tenant))

    assert await _sets_holding(reports, tenant, "back@example.com") == set()


async def test_resync_rebuilds_both_sets_leaving_unsubscribes_out_of_the_one_for_every_class(
        reports: ReportsService):
    namespace = f"{reports.settings.namespace}classes"
    tenant, unsubscribed_only = new_id("tenant-"), new_id("tenant-")
    async with await reports.connect_db() as conn:
        await conn.execute(
            "INSERT INTO reports.suppressions (tenant_id, email, reason) VALUES (%s, 'a@example.com', 'manual'),"
            " (%s, 'u@example.com', 'unsubscribe'), (%s, 'v@example.com', 'unsubscribe')",
            (tenant, tenant, unsubscribed_only))
    # Redis drifted: the every-class sets hold addresses Postgres does not suppress for every class.
    await reports.redis.sadd(suppression_key_for_every_class(namespace, tenant), "u@example.com")
    await reports.redis.sadd(suppression_key_for_every_class(namespace, unsubscribed_only), "v@example.com")

    async with AsyncConnectionPool(reports.settings.postgres_dsn, min_size=1, max_size=2, open=False) as pool:
        await resync_redis(pool, reports.redis, namespace)

    assert await _members(reports.redis, suppression_key(namespace, tenant)) == {"a@example.com", "u@example.com"}
    assert await _members(reports.redis, suppression_key_for_every_class(namespace, tenant)) == {"a@example.com"}
    assert await _members(reports.redis, suppression_key(namespace, unsubscribed_only)) == {"v@example.com"}
    assert not await reports.redis.exists(suppression_key_for_every_class(namespace, unsubscribed_only))


async def test_a_hard_bounce_after_an_unsubscribe_suppresses_the_address_for_every_class(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "reader@example.com", R.SUPPRESSION_REASON_UNSUBSCRIBE)

    await _delivery_report(reports, tenant, M.MESSAGE_EVENT_TYPE_BOUNCED, "reader@example.com", bounce_type="hard")

    async def hard_bounced() -> reports_pb2.Suppression | None:
        found = await _suppression(reports, tenant, "reader@example.com")
        return found if found is not None and found.reason == R.SUPPRESSION_REASON_HARD_BOUNCE else None

    await eventually(hard_bounced, what="the suppression's reason to become hard_bounce")
    assert await _sets_holding(reports, tenant, "reader@example.com") == {"all", "every_class"}
    assert await suppressed_among(reports.redis, reports.settings.namespace, tenant, ["reader@example.com"],
                                  MessageClass.OTP) == {"reader@example.com"}


async def _create_for_topic(reports: ReportsService, tenant: str, email: str, topic: str,
                            reason: R.SuppressionReason.ValueType = R.SUPPRESSION_REASON_UNSUBSCRIBE
                            ) -> reports_pb2.Suppression:
    return await reports.suppressions.CreateSuppression(
        R.CreateSuppressionRequest(suppression=R.Suppression(email=email, reason=reason, topic=topic)),
        metadata=caller(tenant))


async def _listed(reports: ReportsService, tenant: str, topic: str = "") -> list[tuple[str, str, str]]:
    page = await reports.suppressions.ListSuppressions(R.ListSuppressionsRequest(topic=topic),
                                                       metadata=caller(tenant))
    return [(s.name, s.email, s.topic) for s in page.suppressions]


async def test_a_topic_suppression_is_named_after_its_address_and_topic(reports: ReportsService):
    tenant = new_id("tenant-")

    created = await _create_for_topic(reports, tenant, "Reader@Example.com", "Weekly-Deals")
    got = await reports.suppressions.GetSuppression(
        R.GetSuppressionRequest(name="suppressions/reader@example.com~weekly-deals"), metadata=caller(tenant))

    assert (created.name, created.email, created.topic) == (
        "suppressions/reader@example.com~weekly-deals", "reader@example.com", "weekly-deals")
    assert got == created
    assert await _suppression(reports, tenant, "reader@example.com") is None  # not suppressed for every topic


async def test_list_suppressions_shows_the_topic_of_each_suppression(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "a@example.com", R.SUPPRESSION_REASON_MANUAL)
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")
    await _create_for_topic(reports, tenant, "b@example.com", "product-updates")

    assert await _listed(reports, tenant) == [
        ("suppressions/a@example.com", "a@example.com", ""),
        ("suppressions/a@example.com~weekly-deals", "a@example.com", "weekly-deals"),
        ("suppressions/b@example.com~product-updates", "b@example.com", "product-updates"),
    ]


async def test_list_suppressions_filters_by_topic(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "a@example.com", R.SUPPRESSION_REASON_MANUAL)
    await _create_for_topic(reports, tenant, "c@example.com", "weekly-deals")
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")
    await _create_for_topic(reports, tenant, "b@example.com", "product-updates")

    assert [email for _, email, _ in await _listed(reports, tenant, "weekly-deals")] == [
        "a@example.com", "c@example.com"]


async def test_a_topic_filtered_listing_pages_through_the_topic(reports: ReportsService):
    tenant = new_id("tenant-")
    emails = [f"user{i}@example.com" for i in (3, 1, 4, 0, 2)]
    for email in emails:
        await _create_for_topic(reports, tenant, email, "weekly-deals")
        await _create(reports, tenant, email, R.SUPPRESSION_REASON_MANUAL)

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await reports.suppressions.ListSuppressions(
            R.ListSuppressionsRequest(page_size=2, page_token=token, topic="weekly-deals"), metadata=caller(tenant))
        seen += [s.email for s in page.suppressions]
        token = page.next_page_token
        if not token:
            break

    assert seen == sorted(emails)


async def test_a_page_token_issued_before_topics_existed_resumes_after_its_address(reports: ReportsService):
    tenant = new_id("tenant-")
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        await _create(reports, tenant, email, R.SUPPRESSION_REASON_MANUAL)
    legacy = encode_page_token(["a@example.com"], ("suppressions", tenant))

    page = await reports.suppressions.ListSuppressions(R.ListSuppressionsRequest(page_token=legacy),
                                                       metadata=caller(tenant))

    assert [s.email for s in page.suppressions] == ["b@example.com", "c@example.com"]


async def test_deleting_a_topic_suppression_lifts_it_and_keeps_the_one_for_every_topic(reports: ReportsService):
    tenant = new_id("tenant-")
    namespace = reports.settings.namespace
    await _create(reports, tenant, "a@example.com", R.SUPPRESSION_REASON_UNSUBSCRIBE)
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")

    await reports.suppressions.DeleteSuppression(
        R.DeleteSuppressionRequest(name="suppressions/a@example.com~weekly-deals"), metadata=caller(tenant))

    assert await _listed(reports, tenant) == [("suppressions/a@example.com", "a@example.com", "")]
    assert not await reports.redis.sismember(suppression_key_for_topic(namespace, tenant, "weekly-deals"),
                                             "a@example.com")
    assert await is_suppressed(reports.redis, namespace, tenant, "a@example.com")


async def test_deleting_a_topic_suppression_lets_bulk_mail_of_the_topic_through_again(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")

    await reports.suppressions.DeleteSuppression(
        R.DeleteSuppressionRequest(name="suppressions/a@example.com~weekly-deals"), metadata=caller(tenant))

    assert not await suppressed_among(reports.redis, reports.settings.namespace, tenant, ["a@example.com"],
                                      MessageClass.BULK, topic="weekly-deals")


async def test_deleting_the_suppression_for_every_topic_keeps_the_topic_scoped_one(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "a@example.com", R.SUPPRESSION_REASON_MANUAL)
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")

    await reports.suppressions.DeleteSuppression(R.DeleteSuppressionRequest(name="suppressions/a@example.com"),
                                                 metadata=caller(tenant))

    assert await suppressed_among(reports.redis, reports.settings.namespace, tenant, ["a@example.com"],
                                  MessageClass.BULK, topic="weekly-deals") == {"a@example.com"}
    assert not await is_suppressed(reports.redis, reports.settings.namespace, tenant, "a@example.com")


async def test_creating_an_existing_topic_suppression_is_already_exists(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals")

    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("topic", ["weekly deals", "-deals", "deals~x", "a" * 65])
async def test_a_topic_that_cannot_be_a_topic_is_invalid_argument(reports: ReportsService, topic: str):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _create_for_topic(reports, new_id("tenant-"), "a@example.com", topic)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("reason", [R.SUPPRESSION_REASON_HARD_BOUNCE, R.SUPPRESSION_REASON_COMPLAINT])
async def test_a_bounce_or_complaint_cannot_be_scoped_to_a_topic(reports: ReportsService,
                                                                  reason: R.SuppressionReason.ValueType):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _create_for_topic(reports, new_id("tenant-"), "a@example.com", "weekly-deals", reason)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_manual_topic_suppression_stops_only_bulk_mail_of_its_topic(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create_for_topic(reports, tenant, "a@example.com", "weekly-deals", R.SUPPRESSION_REASON_MANUAL)

    namespace, emails = reports.settings.namespace, ["a@example.com"]
    assert await suppressed_among(reports.redis, namespace, tenant, emails, MessageClass.BULK,
                                  topic="weekly-deals") == {"a@example.com"}
    assert not await suppressed_among(reports.redis, namespace, tenant, emails, MessageClass.TRANSACTIONAL,
                                      topic="weekly-deals")
    assert await _sets_holding(reports, tenant, "a@example.com") == set()


async def test_resync_rebuilds_topic_sets_and_drops_stale_ones(reports: ReportsService):
    namespace = f"{reports.settings.namespace}topics"
    tenant = new_id("tenant-")
    async with await reports.connect_db() as conn:
        await conn.execute(
            "INSERT INTO reports.suppressions (tenant_id, email, reason, topic) VALUES"
            " (%s, 'a@example.com', 'unsubscribe', 'weekly-deals'), (%s, 'b@example.com', 'manual', '')",
            (tenant, tenant))
    # Redis drifted: a member Postgres does not have, and a whole topic set with no suppressions left.
    await add_to_redis(reports.redis, namespace, [
        Suppression(tenant, "lifted@example.com", SuppressionReason.UNSUBSCRIBE, topic="weekly-deals"),
        Suppression(tenant, "c@example.com", SuppressionReason.UNSUBSCRIBE, topic="gone"),
    ])

    async with AsyncConnectionPool(reports.settings.postgres_dsn, min_size=1, max_size=2, open=False) as pool:
        await resync_redis(pool, reports.redis, namespace)

    assert await _members(reports.redis, suppression_key_for_topic(namespace, tenant, "weekly-deals")) == {
        "a@example.com"}
    assert not await reports.redis.exists(suppression_key_for_topic(namespace, tenant, "gone"))
    assert await _members(reports.redis, suppression_key(namespace, tenant)) == {"b@example.com"}


class _RoundTrips:
    """A Redis client counting what it sends: each pipeline as one round trip, with its commands."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.sent: list[list[str]] = []

    async def smismember(self, key: str, members: list[str]) -> Any:
        self.sent.append(["SMISMEMBER"])
        return await self.redis.smismember(key, members)

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.sent.append([str(command[0][0]) for command in pipe.command_stack])
            return await execute(*args, **kwargs)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


async def test_suppressed_among_checks_the_topic_in_the_same_round_trip(reports: ReportsService):
    tenant = new_id("tenant-")
    await _create(reports, tenant, "every@example.com", R.SUPPRESSION_REASON_UNSUBSCRIBE)
    await _create_for_topic(reports, tenant, "deals@example.com", "weekly-deals")
    redis = _RoundTrips(reports.redis)

    found = await suppressed_among(cast(Redis, redis), reports.settings.namespace, tenant,
                                   ["every@example.com", "Deals@Example.com", "ok@example.com"],
                                   MessageClass.BULK, topic="weekly-deals")

    assert found == {"every@example.com", "Deals@Example.com"}
    assert redis.sent == [["SMISMEMBER", "SMISMEMBER"]]  # one round trip: the tenant's set and the topic's
