"""Sending-domain records checked against a real authoritative DNS server (NSD) on loopback, serving zones the
tests write."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dev.dns_server import AuthoritativeDns, Record
from libs.common.domain_records import (
    DnsUnavailable,
    Purpose,
    RecordState,
    check_records,
    expected_records,
    resolver_at,
)
from libs.providers.dkim import generate_key
from tests.conftest import free_port, running_dns

ZONE = "shop.example"
DKIM_PEM, DKIM_RECORD = generate_key("rsa-sha256")
EXPECTED = expected_records(ZONE, token="tok-123", dkim_keys={"esp1": DKIM_RECORD}, spf_include="spf.esp.example")


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthoritativeDns]:
    yield from running_dns(tmp_path_factory, [ZONE])


def _relative(name: str) -> str:
    return "@" if name == ZONE else name.removesuffix(f".{ZONE}")


def _published(*, skip: Purpose | None = None, override: dict[Purpose, str] | None = None) -> list[Record]:
    return [Record(_relative(r.name), "TXT", (override or {}).get(r.purpose, r.value))
            for r in EXPECTED if r.purpose is not skip]


async def _states(server: AuthoritativeDns) -> dict[Purpose, tuple[RecordState, tuple[str, ...]]]:
    checks = await check_records(EXPECTED, resolver_at(f"127.0.0.1:{server.port}"))
    return {c.record.purpose: (c.state, c.seen) for c in checks}


async def test_every_record_is_found_once_published(dns_server: AuthoritativeDns) -> None:
    dns_server.publish(ZONE, _published())
    states = await _states(dns_server)
    assert {purpose: state for purpose, (state, _) in states.items()} == dict.fromkeys(Purpose, RecordState.FOUND)


async def test_a_dkim_key_longer_than_one_txt_string_is_found(dns_server: AuthoritativeDns) -> None:
    assert len(DKIM_RECORD) > 255  # published as several strings of one record
    dns_server.publish(ZONE, _published())
    state, seen = (await _states(dns_server))[Purpose.DKIM]
    assert state is RecordState.FOUND and seen == (DKIM_RECORD,)


async def test_a_missing_record_is_reported_missing_and_the_others_found(dns_server: AuthoritativeDns) -> None:
    dns_server.publish(ZONE, _published(skip=Purpose.OWNERSHIP))
    states = await _states(dns_server)
    assert states[Purpose.OWNERSHIP] == (RecordState.MISSING, ())
    assert states[Purpose.DKIM][0] is RecordState.FOUND


async def test_a_wrong_value_is_reported_with_the_value_seen(dns_server: AuthoritativeDns) -> None:
    _, other_key = generate_key("rsa-sha256")
    dns_server.publish(ZONE, _published(override={Purpose.DKIM: other_key,
                                                  Purpose.OWNERSHIP: "esp-verification=someone-else"}))
    states = await _states(dns_server)
    assert states[Purpose.DKIM] == (RecordState.WRONG, (other_key,))
    assert states[Purpose.OWNERSHIP] == (RecordState.WRONG, ("esp-verification=someone-else",))


async def test_an_spf_record_without_the_platforms_include_is_wrong(dns_server: AuthoritativeDns) -> None:
    dns_server.publish(ZONE, _published(override={Purpose.SPF: "v=spf1 include:_spf.google.com ~all"}))
    assert (await _states(dns_server))[Purpose.SPF] == (RecordState.WRONG, ("v=spf1 include:_spf.google.com ~all",))


async def test_a_record_removed_after_it_was_found_flips_back_to_missing(dns_server: AuthoritativeDns) -> None:
    dns_server.publish(ZONE, _published())
    assert (await _states(dns_server))[Purpose.DKIM][0] is RecordState.FOUND
    dns_server.publish(ZONE, _published(skip=Purpose.DKIM))
    assert (await _states(dns_server))[Purpose.DKIM] == (RecordState.MISSING, ())


async def test_a_resolver_that_does_not_answer_is_an_error_not_missing_records() -> None:
    with pytest.raises(DnsUnavailable):
        await check_records(EXPECTED, resolver_at(f"127.0.0.1:{free_port()}", timeout_s=0.5))
