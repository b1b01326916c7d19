"""Provider secrets set at runtime through the admin RPC, never stored or broadcast in plain text: a simulated
Mailgun account created with ProviderService (credentials and webhook signing key, write-only) takes an email
through the sender and its signed delivery webhook is accepted by reports, with no SQL anywhere; then the raw
Postgres rows and the raw KV bucket are searched for the secrets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest
from esp.v1 import common_pb2, messages_pb2, messages_pb2_grpc, providers_pb2, providers_pb2_grpc
from google.protobuf import field_mask_pb2

from dev import mesh as m
from dev.simulator.model import default_personalities
from libs.routing.catalog import bucket_name
from tests.e2e.conftest import RunningMesh

pytestmark = pytest.mark.e2e

PROVIDER = "mailgun-us"


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    proc, description = m.start_simulator(m.free_port(), m.free_port(), tmp_path_factory.mktemp("sim-logs"))
    yield description
    proc.stop()


def _raw_postgres(dsn: str) -> str:
    """Every row of the router's tables, every column, as text (bytea as hex and as raw bytes)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT row_to_json(p)::text, coalesce(row_to_json(c)::text, ''),
                      coalesce(encode(c.sealed_credentials, 'escape'), ''),
                      coalesce(encode(c.sealed_webhook_secrets, 'escape'), '')
               FROM router.providers p LEFT JOIN router.provider_credentials c ON c.provider_id = p.id""").fetchall()
        tables = conn.execute("""SELECT string_agg(table_schema || '.' || table_name, ' ')
                                 FROM information_schema.tables WHERE table_name LIKE '%webhook_secret%'""").fetchone()
    return "\n".join(" ".join(row) for row in rows) + f"\ntables: {tables[0] if tables else ''}"


async def _raw_bucket(nats_url: str, namespace: str) -> bytes:
    """Every value in the mesh's provider bucket, as stored."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(bucket_name(namespace))
        return b"\n".join([(await kv.get(key)).value or b"" for key in await kv.keys()])
    finally:
        await nc.close()


def _set_disabled(stub: providers_pb2_grpc.ProviderServiceStub, mesh: RunningMesh, provider: str,
                  disabled: bool) -> None:
    stub.UpdateProvider(providers_pb2.UpdateProviderRequest(
        provider=providers_pb2.Provider(name=f"providers/{provider}", disabled=disabled),
        update_mask=field_mask_pb2.FieldMask(paths=["disabled"])), metadata=mesh.admin(), timeout=10)


def test_webhook_secrets_set_by_the_admin_rpc_verify_the_simulators_webhooks_and_stay_sealed(
        running_mesh: RunningMesh, simulator: dict[str, Any]):
    mesh = running_mesh
    http_url = simulator["http_url"]
    personality = next(p for p in default_personalities() if p.name == PROVIDER)
    config = personality.provider_config(http_url, simulator["smtp_host"], simulator["smtp_port"])
    webhook_secrets = httpx.get(f"{http_url}/_sim/personalities/{PROVIDER}", timeout=10).json()["webhooks"][
        "receiver_secrets"]
    httpx.patch(f"{http_url}/_sim/personalities/{PROVIDER}/knobs", timeout=10, json={
        "latency_ms": 0, "jitter_ms": 0, "webhook_delay_ms": 0, "webhook_jitter_ms": 0,
        "webhook_url": f"http://127.0.0.1:{mesh.config.webhook_port}/webhooks/{PROVIDER}"}).raise_for_status()
    secrets = [*config.credentials.values(), *webhook_secrets.values()]
    assert secrets and all(len(s) >= 8 for s in secrets)

    with mesh.channel() as channel:
        providers = providers_pb2_grpc.ProviderServiceStub(channel)
        created = providers.CreateProvider(providers_pb2.CreateProviderRequest(
            provider_id=PROVIDER, provider=providers_pb2.Provider(
                type="mailgun", endpoint=config.endpoint, credentials=dict(config.credentials),
                options=dict(config.options), price_per_email_micros=1)), metadata=mesh.admin(), timeout=10)
        assert list(created.webhook_secret_names) == []
        # The signing key is set afterwards, on its own, as an operator rotating it would.
        updated = providers.UpdateProvider(providers_pb2.UpdateProviderRequest(
            provider=providers_pb2.Provider(name=f"providers/{PROVIDER}", webhook_secrets=webhook_secrets),
            update_mask=field_mask_pb2.FieldMask(paths=["webhook_secrets"])), metadata=mesh.admin(), timeout=10)
        _set_disabled(providers, mesh, "sink", True)  # the email must go to the simulated Mailgun
        try:
            assert list(updated.webhook_secret_names) == sorted(webhook_secrets)
            time.sleep(2.0)  # "applied by every replica within 2 s"
            reply = messages_pb2_grpc.MessageServiceStub(channel).SendEmail(messages_pb2.SendEmailRequest(
                message_class=common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
                to=[common_pb2.EmailAddress(email="rcpt@example.net")], subject="Sealed secrets",
                text_body="hello", **{"from": common_pb2.EmailAddress(email="shop@example.com")}),
                metadata=mesh.auth(), timeout=10)

            # The sender opened the sealed credentials (the simulator refuses a wrong API key) and reports opened
            # the sealed signing key (it refuses an unsigned or wrongly signed callback): DELIVERED.
            delivered = mesh.wait_state(reply.message.name, messages_pb2.MESSAGE_STATE_DELIVERED)
            assert delivered.provider == PROVIDER
            log = httpx.get(f"{http_url}/_sim/webhooks", params={"personality": PROVIDER}, timeout=10).json()
            ours = [entry for entry in log if entry["provider_message_id"] == delivered.provider_message_id]
            assert [entry["status"] for entry in ours] == [200]

            fetched = providers.GetProvider(providers_pb2.GetProviderRequest(name=f"providers/{PROVIDER}"),
                                            metadata=mesh.admin(), timeout=10)
            listed = providers.ListProviders(providers_pb2.ListProvidersRequest(page_size=100, show_disabled=True),
                                             metadata=mesh.admin(), timeout=10)
            for answer in (created, updated, fetched, *listed.providers):
                for secret in secrets:
                    assert secret.encode() not in answer.SerializeToString()

            database = _raw_postgres(mesh.config.postgres_dsn)
            bucket = asyncio.run(_raw_bucket(mesh.config.nats_url, mesh.config.namespace))
            assert PROVIDER in database and PROVIDER.encode() in bucket
            for secret in secrets:
                assert secret not in database
                assert secret.encode() not in bucket
            assert "reports.provider_webhook_secrets" not in database
            for log_file in Path(mesh.config.log_dir).glob("*.log"):
                text = log_file.read_text(errors="replace")
                for secret in secrets:
                    assert secret not in text, f"{log_file.name} logs a secret"
        finally:
            _set_disabled(providers, mesh, "sink", False)
            providers.DeleteProvider(providers_pb2.DeleteProviderRequest(name=f"providers/{PROVIDER}"),
                                     metadata=mesh.admin(), timeout=10)
