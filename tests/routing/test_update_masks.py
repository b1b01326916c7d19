"""UpdateProvider reads its update_mask as every Update RPC does (AIP-134, libs/common/field_masks.py), and a
CreateProvider request_id names one create whatever the provider id (AIP-155)."""

from __future__ import annotations

import pytest
from esp.v1 import providers_pb2
from google.protobuf.field_mask_pb2 import FieldMask

from libs.common.errors import AlreadyExists, InvalidArgument
from services.router.server import ProviderServicer
from tests.routing.test_registry import SECRET, Setup, postmark, router_database, setup

__all__ = ["router_database", "setup"]  # the fixtures, imported so that pytest finds them here


def _servicer(setup: Setup) -> ProviderServicer:
    return ProviderServicer(setup.registry, setup.replicas.first, health=None)  # type: ignore[arg-type]


def _update(provider: providers_pb2.Provider, *paths: str) -> providers_pb2.UpdateProviderRequest:
    return providers_pb2.UpdateProviderRequest(provider=provider, update_mask=FieldMask(paths=list(paths)))


async def test_an_update_without_a_mask_changes_only_the_fields_it_sets(setup: Setup) -> None:
    await setup.registry.create(postmark("pm-a", daily_quota=500, display_name="Postmark"))

    updated = await _servicer(setup).UpdateProvider(
        _update(providers_pb2.Provider(name="providers/pm-a", disabled=True)), None)

    assert (updated.disabled, updated.daily_quota, updated.display_name, updated.endpoint) == (
        True, 500, "Postmark", "http://127.0.0.1:9/p/x")


async def test_a_masked_field_takes_the_request_value_even_its_default(setup: Setup) -> None:
    await setup.registry.create(postmark("pm-a", daily_quota=500))

    updated = await _servicer(setup).UpdateProvider(
        _update(providers_pb2.Provider(name="providers/pm-a"), "daily_quota"), None)

    assert updated.daily_quota == 0


async def test_a_star_mask_replaces_every_field_but_keeps_the_credentials(setup: Setup) -> None:
    await setup.registry.create(postmark("pm-a", daily_quota=500, display_name="Postmark"))

    await _servicer(setup).UpdateProvider(_update(providers_pb2.Provider(
        name="providers/pm-a", type="postmark", endpoint="http://127.0.0.1:9/p/y"), "*"), None)

    await setup.replicas.wait_until(lambda c: c.providers["pm-a"].endpoint.endswith("/y"))
    stored = setup.replicas.first.providers["pm-a"]
    assert (stored.daily_quota, stored.display_name, stored.credentials) == (0, "", SECRET)


@pytest.mark.parametrize("path", ["etag", "create_time", "credentials_ref", "name", "no_such_field"])
async def test_a_mask_naming_a_field_that_cannot_change_is_invalid_argument(setup: Setup, path: str) -> None:
    await setup.registry.create(postmark("pm-a"))

    with pytest.raises(InvalidArgument) as refused:
        await _servicer(setup).UpdateProvider(_update(providers_pb2.Provider(name="providers/pm-a"), path), None)
    assert [v.field for v in refused.value.field_violations] == ["update_mask"]


async def test_a_request_id_reused_for_another_provider_id_is_refused(setup: Setup) -> None:
    await setup.registry.create(postmark("pm-a"), request_id="create-1")

    with pytest.raises(AlreadyExists) as refused:
        await setup.registry.create(postmark("pm-b"), request_id="create-1")
    assert refused.value.reason == "REQUEST_ID_REUSED"
    assert [r.spec.id for r in await setup.registry.list(10)] == ["pm-a"]


async def test_a_create_provider_retried_with_its_request_id_answers_as_the_first_did(setup: Setup) -> None:
    request = providers_pb2.CreateProviderRequest(
        provider_id="pm-a", request_id="create-1", provider=providers_pb2.Provider(
            type="postmark", endpoint="http://127.0.0.1:9/p/x", credentials=SECRET))

    first = await _servicer(setup).CreateProvider(request, None)
    again = await _servicer(setup).CreateProvider(request, None)

    assert again == first
