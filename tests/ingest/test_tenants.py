"""Tenant settings: per-tenant rates, quota, large-attachment policy and header allow-list, checked on write."""

from __future__ import annotations

import grpc
import pytest
from esp.v1 import tenants_pb2

from tests.ingest.conftest import IngestHarness, refused


@pytest.mark.parametrize(("field", "value"), [
    ("otp_rate_per_second", -1.0), ("bulk_rate_per_second", float("inf")), ("daily_quota", -5),
])
async def test_negative_or_infinite_limits_are_refused(harness: IngestHarness, field: str, value: float):
    failed = await refused(harness.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(
        tenant_id="bad-limits", tenant=tenants_pb2.Tenant(**{field: value})), metadata=harness.admin))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.fields == [f"tenant.{field}"]


async def test_a_reserved_header_cannot_be_put_on_a_tenants_allow_list(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    current = await harness.tenants.GetTenant(tenants_pb2.GetTenantRequest(name=tenant.name), metadata=harness.admin)
    current.allowed_headers.extend(["Organization", "Return-Path"])
    failed = await refused(harness.tenants.UpdateTenant(tenants_pb2.UpdateTenantRequest(tenant=current),
                                                        metadata=harness.admin))
    assert failed.fields == ["tenant.allowed_headers"]
    assert "Return-Path" in failed.violation("tenant.allowed_headers").description


async def test_tenant_settings_round_trip(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0, otp_rate_per_second=5, daily_quota=100,
                                      large_attachment_policy=tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT,
                                      allowed_headers=["Organization"])
    read = await harness.tenants.GetTenant(tenants_pb2.GetTenantRequest(name=tenant.name), metadata=tenant.auth)
    assert (read.otp_rate_per_second, read.daily_quota, read.large_attachment_policy, list(read.allowed_headers)) == (
        5, 100, tenants_pb2.LARGE_ATTACHMENT_POLICY_REJECT, ["Organization"])


async def test_only_the_platform_admin_creates_tenants(harness: IngestHarness):
    tenant = await harness.new_tenant(credits=0)
    failed = await refused(harness.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(
        tenant_id="sneaky", tenant=tenants_pb2.Tenant()), metadata=tenant.auth))
    assert failed.code == grpc.StatusCode.PERMISSION_DENIED


async def test_the_platform_admin_token_cannot_send_as_no_tenant(harness: IngestHarness):
    from tests.ingest.conftest import send_request

    failed = await refused(harness.messages.SendEmail(send_request(), metadata=harness.admin))
    assert failed.code == grpc.StatusCode.PERMISSION_DENIED
    assert failed.info.reason == "TENANT_KEY_REQUIRED"
