"""A recipient's mailbox provider comes from a table of well-known domains, else — when MX lookup is on — from the
domain's most preferred MX host, looked up in the background while the domain counts as ``other``.

DNS is the outside world: the MX tests ask a small authoritative responder of their own (``MxZone``, UDP on
127.0.0.1) that answers from a dict, stays silent for some names and counts the queries it gets.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from libs.common.mailbox_providers import (
    DEFAULT_MX_PROVIDERS,
    MAILBOX_ENV_PREFIX,
    MAILBOX_PROVIDERS,
    MailboxClassifier,
    MailboxProviderSettings,
    mailbox_provider_of_domain,
)
from libs.common.settings import SettingsError, load_settings, settings_env

MakeClassifier = Callable[..., MailboxClassifier]
"""The ``make_classifier`` fixture: keyword arguments are settings (``clock`` aside)."""

WORKSPACE = {"workspace.example": ["1 aspmx.l.google.com.", "5 alt1.aspmx.l.google.com."]}


# --- the well-known table ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("domain", "provider"), [
    ("gmail.com", "gmail"), ("googlemail.com", "gmail"),
    ("yahoo.com", "yahoo"), ("ymail.com", "yahoo"), ("rocketmail.com", "yahoo"),
    ("outlook.com", "outlook"), ("hotmail.com", "outlook"), ("live.com", "outlook"), ("msn.com", "outlook"),
    ("icloud.com", "apple"), ("me.com", "apple"), ("mac.com", "apple"),
])
def test_each_providers_own_domains_name_it(domain: str, provider: str) -> None:
    assert mailbox_provider_of_domain(domain) == provider


@pytest.mark.parametrize(("domain", "provider"), [
    ("yahoo.co.uk", "yahoo"), ("yahoo.fr", "yahoo"), ("yahoo.com.br", "yahoo"),
    ("hotmail.co.uk", "outlook"), ("hotmail.fr", "outlook"), ("live.fr", "outlook"), ("outlook.de", "outlook"),
])
def test_country_domains_name_their_provider(domain: str, provider: str) -> None:
    assert mailbox_provider_of_domain(domain) == provider


def test_aol_counts_as_yahoo_whose_platform_hosts_it() -> None:
    assert mailbox_provider_of_domain("aol.com") == "yahoo"


def test_yahoo_japan_is_not_yahoo() -> None:
    assert mailbox_provider_of_domain("yahoo.co.jp") is None


@pytest.mark.parametrize("spelling", ["GMail.COM", "gmail.com.", "ＧＭＡＩＬ.com"])  # noqa: RUF001 - full-width on purpose
def test_a_domain_is_matched_whatever_its_case_trailing_dot_or_unicode_form(spelling: str) -> None:
    assert mailbox_provider_of_domain(spelling) == "gmail"


@pytest.mark.parametrize("domain", ["mail.gmail.com", "eu.yahoo.com", "gmail.com.example", "notgmail.com"])
def test_only_exact_domains_match_not_subdomains_or_lookalikes(domain: str) -> None:
    assert mailbox_provider_of_domain(domain) is None


def test_a_domain_outside_the_table_has_no_provider_without_its_mx() -> None:
    assert mailbox_provider_of_domain("example.com") is None


def test_the_provider_names_are_the_five_analytics_group_by() -> None:
    assert MAILBOX_PROVIDERS == ("gmail", "yahoo", "outlook", "apple", "other")


# --- the classifier without MX ----------------------------------------------------------------------------------

def test_an_address_is_classified_by_its_domain() -> None:
    assert MailboxClassifier().classify("Jane.Doe@hotmail.co.uk") == "outlook"


def test_a_bare_domain_is_classified_too() -> None:
    assert MailboxClassifier().classify("icloud.com") == "apple"


def test_an_unknown_domain_is_other_when_mx_lookup_is_off() -> None:
    classifier = MailboxClassifier()
    assert classifier.classify("ceo@workspace.example") == "other"
    assert classifier.pending_lookups == 0


def test_something_that_is_no_domain_is_other() -> None:
    assert MailboxClassifier(MailboxProviderSettings(mx_lookup=True)).classify("not an address") == "other"


def test_the_cache_holds_at_most_cache_size_domains() -> None:
    classifier = MailboxClassifier(MailboxProviderSettings(cache_size=2))
    for domain in ("a.example", "b.example", "c.example", "GMAIL.com"):
        classifier.classify(domain)
    assert classifier.cached_domains == 2


# --- settings ---------------------------------------------------------------------------------------------------

def test_settings_are_read_from_esp_mailbox_variables() -> None:
    settings = load_settings(MailboxProviderSettings, {
        "ESP_MAILBOX_MX_LOOKUP": "true", "ESP_MAILBOX_MX_PROVIDERS": "mx.host.example=outlook",
        "ESP_MAILBOX_NAMESERVERS": "127.0.0.1:5353,[::1]:53"}, prefix=MAILBOX_ENV_PREFIX)
    assert settings.mx_lookup
    assert settings.mx_provider_map() == ({"mx.host.example": "outlook"}, [])
    assert settings.nameservers == ("127.0.0.1:5353", "[::1]:53")


def test_mx_lookup_is_off_and_the_default_mapping_shipped_by_default() -> None:
    settings = load_settings(MailboxProviderSettings, {}, prefix=MAILBOX_ENV_PREFIX)
    assert not settings.mx_lookup
    assert settings.mx_providers == DEFAULT_MX_PROVIDERS
    assert settings.mx_provider_map()[0]["google.com"] == "gmail"


def test_settings_survive_the_trip_to_a_worker_process() -> None:
    settings = MailboxProviderSettings(mx_lookup=True, nameservers=("127.0.0.1:5353",), cache_size=10)
    env = settings_env(settings, prefix=MAILBOX_ENV_PREFIX)
    assert load_settings(MailboxProviderSettings, env, prefix=MAILBOX_ENV_PREFIX) == settings


def test_every_malformed_setting_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(MailboxProviderSettings, {
            "ESP_MAILBOX_MX_PROVIDERS": "google.com,icloud.com=fruit", "ESP_MAILBOX_NAMESERVERS": "127.0.0.1:dns",
            "ESP_MAILBOX_CACHE_SIZE": "0"}, prefix=MAILBOX_ENV_PREFIX)
    text = str(raised.value)
    for problem in ("'google.com' is not", "'icloud.com=fruit'", "ESP_MAILBOX_NAMESERVERS", "ESP_MAILBOX_CACHE_SIZE"):
        assert problem in text


# --- MX lookups against a responder of our own -------------------------------------------------------------------

@dataclass
class MxZone(asyncio.DatagramProtocol):
    """An authoritative UDP responder: MX records from ``records``, no MX (NODATA) for ``no_mx``, no reply at all
    for ``silent``, NXDOMAIN for every other name. Replies leave ``delay_s`` after their query."""

    records: dict[str, list[str]] = field(default_factory=dict)
    no_mx: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    delay_s: float = 0.0
    queries: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    most_in_flight: int = 0
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11's selector one is not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries[name] += 1
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.records:
            response.answer.append(dns.rrset.from_text_list(question.name, 300, "IN", "MX", self.records[name]))
        elif name not in self.no_mx:
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        asyncio.get_running_loop().call_later(self.delay_s, self._reply, response.to_wire(), addr)

    def _reply(self, wire: bytes, addr: tuple[str, int]) -> None:
        self.in_flight -= 1
        if self.transport is not None:
            self.transport.sendto(wire, addr)

    @property
    def nameserver(self) -> str:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"


@pytest.fixture
async def zone() -> AsyncIterator[MxZone]:
    transport, zone = await asyncio.get_running_loop().create_datagram_endpoint(
        MxZone, local_addr=("127.0.0.1", 0))
    try:
        yield zone
    finally:
        transport.close()


class FakeClock:
    """Monotonic time that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make_classifier(zone: MxZone) -> AsyncIterator[MakeClassifier]:
    """Builds classifiers asking ``zone`` (started; closed at teardown); keyword arguments are settings."""
    made: list[MailboxClassifier] = []

    def make(clock: Callable[[], float] = time.monotonic, **settings: object) -> MailboxClassifier:
        options: dict[str, object] = {"mx_lookup": True, "nameservers": (zone.nameserver,), "lookup_timeout_s": 0.5}
        classifier = MailboxClassifier(MailboxProviderSettings(**{**options, **settings}),  # type: ignore[arg-type]
                                       clock=clock)
        made.append(classifier)
        return classifier

    yield make
    for classifier in made:
        await classifier.aclose()


async def settled(classifier: MailboxClassifier, timeout_s: float = 5.0) -> None:
    """Wait until the classifier has no lookup queued or under way."""
    for _ in range(int(timeout_s / 0.005)):
        if not classifier.pending_lookups:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{classifier.pending_lookups} lookups still pending after {timeout_s} s")


async def test_a_workspace_domain_is_gmail_once_its_mx_is_known(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.records.update(WORKSPACE)
    classifier = make_classifier()
    await classifier.start()
    assert classifier.classify("ceo@workspace.example") == "other"
    await settled(classifier)
    assert classifier.classify("ceo@workspace.example") == "gmail"


async def test_classify_answers_at_once_without_waiting_for_dns(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.records.update(WORKSPACE)
    zone.delay_s = 0.3
    classifier = make_classifier()
    await classifier.start()
    started = time.perf_counter()
    assert classifier.classify("ceo@workspace.example") == "other"
    assert time.perf_counter() - started < 0.05  # well under the responder's 0.3 s: no DNS on the calling path
    assert zone.queries["workspace.example"] == 0  # the lookup starts only once the caller yields to the loop
    await settled(classifier)
    assert classifier.classify("ceo@workspace.example") == "gmail"


async def test_a_domain_is_looked_up_once_however_often_it_is_seen(zone: MxZone,
                                                                   make_classifier: MakeClassifier) -> None:
    zone.records.update(WORKSPACE)
    classifier = make_classifier()
    await classifier.start()
    for _ in range(100):
        classifier.classify("someone@workspace.example")
    await settled(classifier)
    for _ in range(100):
        classifier.classify("someone@workspace.example")
    assert zone.queries["workspace.example"] == 1


async def test_spellings_of_one_domain_share_its_lookup(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.records.update(WORKSPACE)
    classifier = make_classifier()
    await classifier.start()
    classifier.classify("a@workspace.example")
    classifier.classify("b@WorkSpace.Example.")
    await settled(classifier)
    assert classifier.classify("b@WorkSpace.Example.") == "gmail"
    assert zone.queries["workspace.example"] == 1


async def test_an_idn_domain_is_looked_up_by_its_ascii_name(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.records["xn--bcher-kva.example"] = ["10 example-com.mail.protection.outlook.com."]
    classifier = make_classifier()
    await classifier.start()
    classifier.classify("info@bücher.example")
    await settled(classifier)
    assert classifier.classify("info@bücher.example") == "outlook"


@pytest.mark.parametrize(("mx_host", "provider"), [
    ("example-com.mail.protection.outlook.com.", "outlook"), ("mta5.am0.yahoodns.net.", "yahoo"),
    ("mx01.mail.icloud.com.", "apple"), ("aspmx2.googlemail.com.", "gmail"), ("smtp.google.com.", "gmail"),
    ("mx.notgoogle.com.", "other"), ("mx.custom.example.", "other"),
])
async def test_the_shipped_mapping_names_the_provider_of_an_mx_host(zone: MxZone, make_classifier: MakeClassifier,
                                                                    mx_host: str, provider: str) -> None:
    zone.records["custom.example"] = [f"10 {mx_host}"]
    classifier = make_classifier()
    await classifier.start()
    classifier.classify("custom.example")
    await settled(classifier)
    assert classifier.classify("custom.example") == provider


async def test_the_most_preferred_mx_decides_so_a_filtering_gateway_is_other(zone: MxZone,
                                                                             make_classifier: MakeClassifier) -> None:
    zone.records["filtered.example"] = ["20 aspmx.l.google.com.", "10 mx.filter.example."]
    classifier = make_classifier()
    await classifier.start()
    classifier.classify("filtered.example")
    await settled(classifier)
    assert classifier.classify("filtered.example") == "other"


async def test_a_configured_mapping_replaces_the_shipped_one(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.records["hosted.example"] = ["10 in.mx.host.example."]
    zone.records.update(WORKSPACE)
    classifier = make_classifier(mx_providers=("mx.host.example=outlook",))
    await classifier.start()
    classifier.classify("hosted.example")
    classifier.classify("workspace.example")
    await settled(classifier)
    assert classifier.classify("hosted.example") == "outlook"
    assert classifier.classify("workspace.example") == "other"


@pytest.mark.parametrize("kind", ["nxdomain", "no_mx"])
async def test_a_domain_without_mx_stays_other_and_is_not_asked_again(zone: MxZone, make_classifier: MakeClassifier,
                                                                      kind: str) -> None:
    if kind == "no_mx":
        zone.no_mx.add("dead.example")
    classifier = make_classifier()
    await classifier.start()
    classifier.classify("dead.example")
    await settled(classifier)
    assert classifier.classify("dead.example") == "other"
    await asyncio.sleep(0.05)
    assert (zone.queries["dead.example"], classifier.pending_lookups) == (1, 0)


async def test_a_timed_out_lookup_stays_other_and_is_not_retried_at_once(zone: MxZone,
                                                                         make_classifier: MakeClassifier) -> None:
    zone.silent.add("slow.example")
    classifier = make_classifier(lookup_timeout_s=0.2)
    await classifier.start()
    classifier.classify("slow.example")
    await settled(classifier)
    asked = zone.queries["slow.example"]
    assert classifier.classify("slow.example") == "other"
    await asyncio.sleep(0.05)
    assert (zone.queries["slow.example"], classifier.pending_lookups) == (asked, 0)


async def test_a_failed_lookup_is_retried_after_failure_ttl(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.silent.add("flaky.example")
    clock = FakeClock()
    classifier = make_classifier(clock, lookup_timeout_s=0.2, failure_ttl_s=60.0)
    await classifier.start()
    classifier.classify("flaky.example")
    await settled(classifier)
    clock.now += 61
    zone.silent.clear()
    zone.records["flaky.example"] = ["1 aspmx.l.google.com."]
    assert classifier.classify("flaky.example") == "other"
    await settled(classifier)
    assert classifier.classify("flaky.example") == "gmail"


async def test_an_expired_answer_is_still_given_while_it_is_looked_up_again(zone: MxZone,
                                                                            make_classifier: MakeClassifier) -> None:
    zone.records.update(WORKSPACE)
    clock = FakeClock()
    classifier = make_classifier(clock, ttl_s=3600.0)
    await classifier.start()
    classifier.classify("workspace.example")
    await settled(classifier)
    clock.now += 3601
    assert classifier.classify("workspace.example") == "gmail"
    assert classifier.pending_lookups == 1
    await settled(classifier)
    assert zone.queries["workspace.example"] == 2


async def test_no_more_than_lookup_concurrency_lookups_run_at_once(zone: MxZone,
                                                                   make_classifier: MakeClassifier) -> None:
    zone.delay_s = 0.05
    classifier = make_classifier(lookup_concurrency=2)
    await classifier.start()
    for n in range(6):
        classifier.classify(f"d{n}.example")
    await settled(classifier)
    assert zone.most_in_flight == 2
    assert sum(zone.queries.values()) == 6


async def test_a_full_queue_defers_a_domain_to_its_next_sighting(zone: MxZone,
                                                                make_classifier: MakeClassifier) -> None:
    zone.records.update(WORKSPACE)
    classifier = make_classifier(max_pending_lookups=1)
    classifier.classify("first.example")  # not started yet: it fills the queue
    assert classifier.classify("workspace.example") == "other"
    assert classifier.pending_lookups == 1
    await classifier.start()
    await settled(classifier)
    classifier.classify("workspace.example")
    await settled(classifier)
    assert classifier.classify("workspace.example") == "gmail"


async def test_a_forgotten_domain_is_looked_up_again(zone: MxZone, make_classifier: MakeClassifier) -> None:
    zone.records.update({"a.example": ["1 aspmx.l.google.com."], "b.example": ["1 aspmx.l.google.com."]})
    classifier = make_classifier(cache_size=2)
    await classifier.start()
    for domain in ("a.example", "b.example"):
        classifier.classify(domain)
    await settled(classifier)
    classifier.classify("a.example")  # now the most recently used: c evicts b, not a
    classifier.classify("c.example")
    await settled(classifier)
    assert classifier.classify("a.example") == "gmail"
    assert classifier.classify("b.example") == "other"
    await settled(classifier)
    assert (zone.queries["a.example"], zone.queries["b.example"]) == (1, 2)


async def test_well_known_domains_are_never_looked_up(zone: MxZone, make_classifier: MakeClassifier) -> None:
    classifier = make_classifier()
    await classifier.start()
    for address in ("a@gmail.com", "b@YAHOO.FR", "c@me.com."):
        classifier.classify(address)
    assert classifier.pending_lookups == 0
    await asyncio.sleep(0.05)
    assert sum(zone.queries.values()) == 0


async def test_the_classifier_is_an_async_context_manager_that_stops_its_lookups(zone: MxZone) -> None:
    zone.records.update(WORKSPACE)
    settings = MailboxProviderSettings(mx_lookup=True, nameservers=(zone.nameserver,))
    async with MailboxClassifier(settings) as classifier:
        classifier.classify("workspace.example")
        await settled(classifier)
    assert classifier.classify("workspace.example") == "gmail"
    classifier.classify("new.example")
    await asyncio.sleep(0.05)
    assert zone.queries["new.example"] == 0
