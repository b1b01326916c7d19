"""What the sender asks an adapter before sending: would it take this email (``precheck``), and which emails share
one call (``plan_batches``); and the capabilities table both are read from, which imports no send code."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from libs.providers.base import ProviderAdapter
from libs.providers.capabilities import DEFAULT_CAPABILITIES, provider_size_cap
from libs.providers.errors import InvalidMessage, MessageTooLarge, TooManyRecipients, UnsupportedFeature
from libs.providers.model import Address, OutboundEmail, ProviderConfig
from libs.providers.registry import BUILTIN_TYPES, adapter_class, create_adapter
from tests.providers.conftest import exploding_attachment, new_email

CONFIGS: dict[str, dict[str, Any]] = {
    "mailgun": {"endpoint": "https://api.mailgun.net", "credentials": {"api_key": "k"}, "options": {"domain": "d"}},
    "sendgrid": {"endpoint": "https://api.sendgrid.com", "credentials": {"api_key": "k"}},
    "postmark": {"endpoint": "https://api.postmarkapp.com", "credentials": {"server_token": "t"}},
    "ses": {"endpoint": "", "credentials": {}, "region": "eu-west-1"},
    "smtp": {"endpoint": "localhost:2525", "credentials": {}},
}


@pytest.fixture
async def adapter() -> AsyncIterator[Callable[[str], ProviderAdapter]]:
    """Factory: an adapter of the given type (never connected), closed afterwards."""
    made: list[ProviderAdapter] = []

    def make(type_name: str) -> ProviderAdapter:
        made.append(create_adapter(ProviderConfig(name=f"{type_name}-1", type=type_name, **CONFIGS[type_name])))
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


def to(address: str) -> tuple[Address, ...]:
    return (Address(address),)


# -- precheck -------------------------------------------------------------------------------------------------


async def test_precheck_judges_the_size_by_the_callers_measure_without_reading_attachments(adapter: Any) -> None:
    postmark = adapter("postmark")
    email = new_email(attachments=(exploding_attachment(50),))

    problem = postmark.precheck(email, 10_000_001)

    assert isinstance(problem, MessageTooLarge)
    assert (problem.size, problem.limit) == (10_000_001, 10_000_000)
    assert postmark.precheck(email, 10_000_000) is None


async def test_precheck_names_an_email_no_provider_can_send(adapter: Any) -> None:
    assert isinstance(adapter("sendgrid").precheck(new_email(text=None, html=None), 100), InvalidMessage)
    assert isinstance(adapter("sendgrid").precheck(new_email(to=()), 100), InvalidMessage)


async def test_precheck_names_what_this_provider_cannot_do(adapter: Any) -> None:
    recipients = tuple(Address(f"r{i}@example.org") for i in range(51))

    assert isinstance(adapter("ses").precheck(new_email(to=recipients), 100), TooManyRecipients)
    assert isinstance(adapter("postmark").precheck(new_email(tags=("a", "b")), 100), UnsupportedFeature)
    assert isinstance(adapter("ses").precheck(new_email(tags=("not ok",)), 100), UnsupportedFeature)


# -- plan_batches ---------------------------------------------------------------------------------------------


async def test_a_provider_without_a_batch_api_plans_one_call_per_email(adapter: Any) -> None:
    emails = [new_email(to=to(f"r{i}@example.org")) for i in range(3)]

    assert adapter("ses").plan_batches(emails) == [[0], [1], [2]]
    assert adapter("smtp").plan_batches(emails) == [[0], [1], [2]]


async def test_the_registry_batch_size_caps_the_emails_of_one_call(adapter: Any) -> None:
    emails = [new_email(to=to(f"r{i}@example.org")) for i in range(5)]

    assert adapter("sendgrid").plan_batches(emails) == [[0, 1, 2, 3, 4]]
    assert adapter("sendgrid").plan_batches(emails, max_emails=2) == [[0, 1], [2, 3], [4]]


async def test_the_registry_batch_size_also_caps_the_recipients_of_one_call(adapter: Any) -> None:
    emails = [new_email(to=to(f"r{i}@example.org"), cc=to(f"c{i}@example.org")) for i in range(3)]

    assert adapter("sendgrid").plan_batches(emails, max_emails=3) == [[0], [1], [2]]
    assert adapter("sendgrid").plan_batches(emails, max_emails=4) == [[0, 1], [2]]


async def test_a_batch_names_each_recipient_once_unless_it_is_a_list_of_whole_messages(adapter: Any) -> None:
    emails = [new_email(to=to("same@example.org")), new_email(to=to("SAME@example.org"))]

    assert adapter("sendgrid").plan_batches(emails) == [[0], [1]]
    assert adapter("postmark").plan_batches(emails) == [[0, 1]]


async def test_known_sizes_count_against_the_batch_byte_limit(adapter: Any) -> None:
    emails = [new_email(to=to(f"r{i}@example.org")) for i in range(3)]

    assert adapter("sendgrid").plan_batches(emails, [20_000_000, 10_000_000, 1]) == [[0, 1], [2]]


async def test_emails_without_a_batch_key_go_on_their_own_after_the_groups(adapter: Any) -> None:
    emails = [new_email(to=to("a@example.org"), cc=to("c@example.org")), new_email(to=to("b@example.org")),
              new_email(to=to("d@example.org"))]

    assert adapter("mailgun").plan_batches(emails) == [[1, 2], [0]]


def campaign(count: int) -> list[OutboundEmail]:
    """``count`` emails of one campaign sent unrendered: equal content, each recipient's own values."""
    return [
        new_email(message_class="bulk", to=to(f"r{i}@example.org"), subject="Hi {{ name }}", html="<p>{{ name }}</p>",
                  headers={"List-Unsubscribe": "<https://u.example/{{ token }}>"},
                  recipient_variables={f"r{i}@example.org": {"name": f"R{i}", "token": f"t{i}"}})
        for i in range(count)
    ]


async def test_a_thousand_emails_of_one_campaign_plan_into_one_mailgun_call(adapter: Any) -> None:
    emails = campaign(1000)

    assert adapter("mailgun").plan_batches(emails) == [list(range(1000))]


async def test_sendgrid_sends_an_email_whose_values_could_overflow_its_substitutions_on_its_own(adapter: Any) -> None:
    emails = campaign(3)
    emails[1] = replace(emails[1], recipient_variables={"r1@example.org": {"name": "n" * 10_000, "token": "t1"}})

    assert adapter("sendgrid").plan_batches(emails) == [[0, 2], [1]]


# -- the capabilities table -----------------------------------------------------------------------------------


def test_every_adapter_reads_its_capabilities_from_the_table() -> None:
    assert BUILTIN_TYPES == tuple(DEFAULT_CAPABILITIES)
    for type_name in BUILTIN_TYPES:
        assert adapter_class(type_name).default_capabilities is DEFAULT_CAPABILITIES[type_name]


def test_the_capabilities_table_imports_no_send_code() -> None:
    code = ("import sys, libs.providers.capabilities, services.ingest.sizing, libs.routing.scoring; "
            "print(sorted(m for m in ('httpx', 'boto3', 'aiosmtplib') if m in sys.modules))")

    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert loaded.stdout.strip() == "[]"


def test_a_providers_size_cap_is_the_lower_of_its_registry_entry_and_its_type() -> None:
    assert provider_size_cap("postmark") == 10_000_000
    assert provider_size_cap("postmark", 1_000) == 1_000
    assert provider_size_cap("postmark", 20_000_000) == 10_000_000
    assert provider_size_cap("unknown-type", 5_000) == 5_000
    assert provider_size_cap("unknown-type") == 0
