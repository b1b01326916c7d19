"""UpdateProvider and DeleteProvider read ``etag`` strictly (AIP-154): a provider's version in ASCII decimal makes
the call conditional, and a value the router never gives out is INVALID_ARGUMENT naming the field, never a
database error."""

from __future__ import annotations

import pytest
from esp.v1 import providers_pb2

from libs.common.errors import Aborted, InvalidArgument
from services.router.server import ProviderServicer
from tests.routing.test_registry import Setup, postmark, router_database, setup

__all__ = ["router_database", "setup"]  # the fixtures, imported so that pytest finds them here

IMPOSSIBLE_ETAGS = {
    "past the bigint Postgres stores": "9" * 30,
    "one past int64": str(2**63),
    "a digit int() cannot read": "\u00b2",
    "an Arabic-Indic digit": "\u0663",
    "not a number": "abc",
    "negative": "-1",
    "padded": " 1",
    "a NUL after the digits": "1\x00",
}


def _servicer(setup: Setup) -> ProviderServicer:
    return ProviderServicer(setup.registry, setup.replicas.first, health=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("etag", IMPOSSIBLE_ETAGS.values(), ids=IMPOSSIBLE_ETAGS.keys())
async def test_a_delete_with_an_impossible_etag_is_invalid_argument_and_keeps_the_provider(
        setup: Setup, etag: str) -> None:
    await setup.registry.create(postmark("pm-a"))

    with pytest.raises(InvalidArgument) as refused:
        await _servicer(setup).DeleteProvider(providers_pb2.DeleteProviderRequest(name="providers/pm-a", etag=etag),
                                              None)

    assert [v.field for v in refused.value.field_violations] == ["etag"]
    assert (await setup.registry.get("pm-a")).spec.id == "pm-a"


@pytest.mark.parametrize("etag", IMPOSSIBLE_ETAGS.values(), ids=IMPOSSIBLE_ETAGS.keys())
async def test_an_update_with_an_impossible_etag_is_invalid_argument_and_changes_nothing(
        setup: Setup, etag: str) -> None:
    await setup.registry.create(postmark("pm-a", daily_quota=500))
    request = providers_pb2.UpdateProviderRequest(
        provider=providers_pb2.Provider(name="providers/pm-a", daily_quota=7, etag=etag))

    with pytest.raises(InvalidArgument) as refused:
        await _servicer(setup).UpdateProvider(request, None)

    assert [v.field for v in refused.value.field_violations] == ["provider.etag"]
    assert (await setup.registry.get("pm-a")).spec.daily_quota == 500


async def test_a_delete_with_a_stale_etag_is_aborted_and_keeps_the_provider(setup: Setup) -> None:
    created = await setup.registry.create(postmark("pm-a"))
    await setup.registry.update("pm-a", {"weight": 2.0})

    with pytest.raises(Aborted):
        await _servicer(setup).DeleteProvider(
            providers_pb2.DeleteProviderRequest(name="providers/pm-a", etag=str(created.spec.version)), None)

    assert (await setup.registry.get("pm-a")).spec.id == "pm-a"


async def test_a_delete_with_the_current_etag_deletes_the_provider(setup: Setup) -> None:
    await setup.registry.create(postmark("pm-a"))
    read = await _servicer(setup).GetProvider(providers_pb2.GetProviderRequest(name="providers/pm-a"), None)

    await _servicer(setup).DeleteProvider(providers_pb2.DeleteProviderRequest(name="providers/pm-a", etag=read.etag),
                                          None)

    assert await setup.registry.list(10) == []


async def test_the_largest_well_formed_etag_is_a_stale_condition_not_an_error(setup: Setup) -> None:
    await setup.registry.create(postmark("pm-a"))

    with pytest.raises(Aborted):
        await _servicer(setup).DeleteProvider(
            providers_pb2.DeleteProviderRequest(name="providers/pm-a", etag=str(2**63 - 1)), None)
