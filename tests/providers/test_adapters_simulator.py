"""The provider simulator itself: admin API, knobs, bounded log, signed webhooks, and its command line."""

from __future__ import annotations

import asyncio
import json
import select
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dev.simulator import Personality, RunningSimulator, load_personalities, run_simulator
from libs.providers.base import provider_tls_context
from libs.providers.events import BounceType, EventKind
from libs.providers.mime import streamed_form_data
from libs.providers.model import Address, OutboundEmail, Outcome
from libs.providers.registry import create_adapter
from libs.providers.webhooks import InMemoryReplayGuard, WebhookVerifier
from tests.conftest import free_port
from tests.providers.conftest import WebhookSink, new_email


async def send(sim: RunningSimulator, personality: str, email: OutboundEmail | None = None, **overrides: object):
    adapter = create_adapter(sim.provider_config(personality, **overrides))
    try:
        return await adapter.send(email or new_email())
    finally:
        await adapter.aclose()


async def test_unknown_knob_is_refused_with_its_name(sim: RunningSimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.http_url) as client:
        response = await client.patch("/_sim/personalities/sendgrid-1/knobs", json={"eror_rate": 1.0})

    assert response.status_code == 400
    assert "eror_rate" in response.json()["error"]


async def test_knob_of_the_wrong_type_is_refused(sim: RunningSimulator) -> None:
    with pytest.raises(httpx.HTTPStatusError) as raised:
        await sim.client.set_knobs("sendgrid-1", error_rate="often")

    assert raised.value.response.status_code == 400


async def test_reset_forgets_requests_and_restores_knobs(sim: RunningSimulator) -> None:
    await sim.client.set_knobs("postmark-1", latency_ms=5)
    await send(sim, "postmark-1")

    await sim.client.reset()

    assert await sim.client.requests() == []
    assert (await sim.client.knobs("postmark-1"))["latency_ms"] == 0


async def test_requests_can_be_listed_for_one_personality(sim: RunningSimulator) -> None:
    await send(sim, "postmark-1")
    await send(sim, "sendgrid-1")

    records = await sim.client.requests("sendgrid-1")

    assert [r["personality"] for r in records] == ["sendgrid-1"]


async def test_throttling_starts_above_the_configured_rate(sim: RunningSimulator) -> None:
    await sim.client.set_knobs("postmark-1", throttle_rps=2)

    outcomes = [(await send(sim, "postmark-1")).outcome for _ in range(3)]

    assert outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.THROTTLED]


async def test_timed_outage_ends_by_itself(sim: RunningSimulator) -> None:
    await sim.client.set_knobs("mailgun-us", outage_for_s=0.3)

    during = await send(sim, "mailgun-us")
    for _ in range(50):  # bounded: the outage lasts 0.3 s
        await asyncio.sleep(0.05)
        if not sim.state.in_outage("mailgun-us"):
            break
    after = await send(sim, "mailgun-us")

    assert during.outcome is Outcome.RETRYABLE and during.status_code == 503
    assert after.outcome is Outcome.ACCEPTED


async def test_request_log_keeps_only_the_newest_entries() -> None:
    async with run_simulator(log_cap=3, personalities=[Personality("pm", "postmark", {"server_token": "t"})]) as sim:
        for _ in range(5):
            assert (await send(sim, "pm")).outcome is Outcome.ACCEPTED

        records = await sim.client.requests("pm")
        stats = await sim.client.stats()

    assert len(records) == 3
    assert stats["dropped_records"] == 2


async def test_personalities_file_problems_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "personalities.json"
    path.write_text(json.dumps({"personalities": [
        {"name": "a", "type": "pigeon", "credentials": {}},
        {"name": "b", "type": "mailgun", "credentials": {}, "knobs": {"error_rate": 3}},
    ]}))

    with pytest.raises(ValueError) as raised:
        load_personalities(path)

    assert "'type' must be one of" in str(raised.value)
    assert "error_rate must be within [0, 1]" in str(raised.value)


# -- webhooks --------------------------------------------------------------------------------------------------


class SimulatorCertificates:
    """Fetches SNS signing certificates from the simulator (which stands in for sns.<region>.amazonaws.com)."""

    def __init__(self, sim: RunningSimulator, personality: str) -> None:
        self._sim = sim
        self._personality = personality

    async def fetch(self, url: str) -> bytes:
        described = await self._sim.client.personality(self._personality)
        assert url == described["webhooks"]["sns_certificate_url"]
        async with httpx.AsyncClient(base_url=self._sim.http_url) as client:
            response = await client.get(f"/_sim/personalities/{self._personality}/sns-certificate.pem")
        response.raise_for_status()
        return response.content


async def verified_events(sim: RunningSimulator, sink: WebhookSink, provider_type: str, personality: str,
                          count: int) -> list:
    described = await sim.client.personality(personality)
    verifier = WebhookVerifier(InMemoryReplayGuard(), certificate_fetcher=SimulatorCertificates(sim, personality))
    events = []
    for request in await sink.wait_for(count):
        events.extend(await verifier.verify_and_parse(
            provider_type, described["webhooks"]["receiver_secrets"], request.headers, request.body,
            provider_name=personality,
        ))
    return events


@pytest.mark.parametrize(
    ("provider_type", "personality"),
    [("mailgun", "mailgun-us"), ("sendgrid", "sendgrid-1"), ("ses", "ses-1"), ("postmark", "postmark-1")],
)
async def test_delivery_webhook_is_signed_so_that_our_verifier_accepts_it(
    sim: RunningSimulator, webhook_sink: WebhookSink, provider_type: str, personality: str,
) -> None:
    await sim.client.set_knobs(personality, webhook_url=webhook_sink.url, webhook_delay_ms=0, webhook_jitter_ms=0)
    email = new_email()

    result = await send(sim, personality, email)
    events = await verified_events(sim, webhook_sink, provider_type, personality, 1)

    assert result.outcome is Outcome.ACCEPTED
    assert [e.kind for e in events] == [EventKind.DELIVERED]
    assert events[0].recipient == "alice@example.org"
    assert events[0].provider_message_id == result.provider_message_id
    assert events[0].message_id == email.message_id


async def test_bounce_ratio_one_reports_every_recipient_as_a_hard_bounce(
    sim: RunningSimulator, webhook_sink: WebhookSink,
) -> None:
    await sim.client.set_knobs("sendgrid-1", webhook_url=webhook_sink.url, webhook_delay_ms=0,
                               webhook_jitter_ms=0, bounce_rate=1.0)

    await send(sim, "sendgrid-1", new_email(to=(Address("a@example.org"), Address("b@example.org"))))
    events = await verified_events(sim, webhook_sink, "sendgrid", "sendgrid-1", 2)

    assert sorted(e.recipient for e in events) == ["a@example.org", "b@example.org"]
    assert {(e.kind, e.bounce_type) for e in events} == {(EventKind.BOUNCED, BounceType.HARD)}


async def test_complaint_ratio_one_reports_delivery_then_complaint(
    sim: RunningSimulator, webhook_sink: WebhookSink,
) -> None:
    await sim.client.set_knobs("postmark-1", webhook_url=webhook_sink.url, webhook_delay_ms=0,
                               webhook_jitter_ms=0, complaint_rate=1.0)

    await send(sim, "postmark-1")
    events = await verified_events(sim, webhook_sink, "postmark", "postmark-1", 2)

    assert [e.kind for e in events] == [EventKind.DELIVERED, EventKind.COMPLAINED]


async def test_no_webhooks_without_a_callback_url(sim: RunningSimulator, webhook_sink: WebhookSink) -> None:
    await send(sim, "mailgun-us")

    assert (await sim.client.stats())["webhooks_pending"] == 0
    assert await sim.client.webhooks() == []


# -- how the dialects personalise batch sends --------------------------------------------------------------------


async def test_mailgun_substitutes_each_recipients_variables_in_subject_bodies_and_headers(
    sim: RunningSimulator,
) -> None:
    config = sim.provider_config("mailgun-us")
    form = streamed_form_data([
        ("from", "shop@example.com"), ("to", "ann@example.org"), ("to", "ben@example.org"),
        ("subject", "Hi %recipient.name%"), ("text", "Dear %recipient.name%"), ("html", "<p>%recipient.name%</p>"),
        ("h:List-Unsubscribe", "<https://u.example/%recipient.token%>"),
        ("recipient-variables", json.dumps({"ann@example.org": {"name": "Ann", "token": "t-ann"},
                                            "ben@example.org": {"name": "Ben"}})),
    ])
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{config.endpoint}/v3/{config.options['domain']}/messages", content=await form.read(),
            auth=("api", config.credentials["api_key"]), headers={"content-type": form.content_type})

    assert response.status_code == 200, response.text
    delivered = {m["to"][0]: m for m in await sim.client.delivered_messages("mailgun-us")}
    assert (delivered["ann@example.org"]["subject"], delivered["ann@example.org"]["text"],
            delivered["ann@example.org"]["html"]) == ("Hi Ann", "Dear Ann", "<p>Ann</p>")
    assert delivered["ann@example.org"]["headers"]["List-Unsubscribe"] == "<https://u.example/t-ann>"
    # A variable the recipient has no value for stays as written.
    assert delivered["ben@example.org"]["headers"]["List-Unsubscribe"] == "<https://u.example/%recipient.token%>"


async def post_sendgrid(sim: RunningSimulator, payload: dict[str, object]) -> httpx.Response:
    config = sim.provider_config("sendgrid-1")
    async with httpx.AsyncClient() as client:
        return await client.post(f"{config.endpoint}/v3/mail/send", json=payload, headers={
            "authorization": f"Bearer {config.credentials['api_key']}", "accept": "application/json"})


async def test_sendgrid_substitutes_in_subject_bodies_and_custom_args_but_not_in_headers(
    sim: RunningSimulator,
) -> None:
    response = await post_sendgrid(sim, {
        "personalizations": [
            {"to": [{"email": "ann@example.org"}], "substitutions": {"-name-": "Ann"},
             "headers": {"X-Own": "-name-"}},
            {"to": [{"email": "ben@example.org"}], "substitutions": {"-name-": "Ben"}},
        ],
        "from": {"email": "shop@example.com"}, "subject": "Hi -name-", "headers": {"X-Shared": "-name-"},
        "content": [{"type": "text/plain", "value": "Dear -name-"}, {"type": "text/html", "value": "<p>-name-</p>"}],
        "custom_args": {"greeting": "-name-"},
    })

    assert response.status_code == 202, response.text
    delivered = {m["to"][0]: m for m in await sim.client.delivered_messages("sendgrid-1")}
    ann = delivered["ann@example.org"]
    assert (ann["subject"], ann["text"], ann["html"], ann["metadata"]["greeting"]) == (
        "Hi Ann", "Dear Ann", "<p>Ann</p>", "Ann")
    assert (ann["headers"]["X-Own"], ann["headers"]["X-Shared"]) == ("-name-", "-name-")
    assert delivered["ben@example.org"]["subject"] == "Hi Ben"


async def test_sendgrid_takes_a_substituted_value_as_final_text(sim: RunningSimulator) -> None:
    response = await post_sendgrid(sim, {
        "personalizations": [{"to": [{"email": "ann@example.org"}], "substitutions": {"-a-": "-b-", "-b-": "B"}}],
        "from": {"email": "shop@example.com"}, "subject": "-a- and -b-",
        "content": [{"type": "text/plain", "value": "x"}],
    })

    assert response.status_code == 202, response.text
    [message] = await sim.client.delivered_messages("sendgrid-1")
    assert message["subject"] == "-b- and B"


async def test_building_an_adapter_does_not_load_the_ca_bundle_again(sim: RunningSimulator,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Adapters are built on the sender's delivery loops when a provider changes: loading the bundle stalled them.
    provider_tls_context()
    loads: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args or kwargs)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    adapters = [create_adapter(sim.provider_config(name)) for name in ("mailgun-us", "sendgrid-1", "ses-1")]
    for adapter in adapters:
        await adapter.aclose()
    assert loads == []


def test_provider_clients_verify_certificates_and_host_names() -> None:
    context = provider_tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.get_ca_certs() or context.cert_store_stats()["x509_ca"] > 0


# -- the command line ---------------------------------------------------------------------------------------


def test_command_line_serves_until_terminated(tmp_path: Path) -> None:
    personalities = tmp_path / "p.json"
    personalities.write_text(json.dumps({"personalities": [
        {"name": "pm", "type": "postmark", "credentials": {"server_token": "t"}},
        {"name": "relay", "type": "smtp", "credentials": {"username": "u", "password": "p"}},
    ]}))
    http_port, smtp_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dev.simulator", "--http-port", str(http_port), "--smtp-port", str(smtp_port),
         "--personalities", str(personalities)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], 30)  # bounded wait for the ready line
        assert readable, "the simulator printed nothing within 30 s"
        ready = json.loads(process.stdout.readline())
        health = httpx.get(f"{ready['http_url']}/_sim/health", timeout=5)
        listed = httpx.get(f"{ready['http_url']}/_sim/personalities", timeout=5).json()
    finally:
        process.terminate()
        exit_code = process.wait(timeout=10)

    assert ready["http_url"] == f"http://127.0.0.1:{http_port}"
    assert ready["smtp_port"] == smtp_port
    assert ready["personalities"]["pm"]["endpoint"] == f"http://127.0.0.1:{http_port}/p/pm"
    assert health.json() == {"ok": True}
    assert [p["name"] for p in listed] == ["pm", "relay"]
    assert exit_code == 0


def test_command_line_rejects_a_bad_personalities_file(tmp_path: Path) -> None:
    personalities = tmp_path / "p.json"
    personalities.write_text(json.dumps({"personalities": []}))

    completed = subprocess.run(
        [sys.executable, "-m", "dev.simulator", "--personalities", str(personalities)],
        capture_output=True, text=True, timeout=30,
    )

    assert completed.returncode == 2
    assert "non-empty 'personalities' list" in completed.stderr




def test_command_line_runs_nicer_with_its_sessions_autogroup_when_asked() -> None:
    # A benchmark's stand-in for a remote provider must not take the CPU the mesh it measures would have.
    http_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dev.simulator", "--http-port", str(http_port), "--smtp-port", str(free_port()),
         "--niceness", "7"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], 30)
        assert readable, "the simulator printed nothing within 30 s"
        json.loads(process.stdout.readline())
        nice = int(Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        autogroup = Path(f"/proc/{process.pid}/autogroup")
        group = autogroup.read_text().strip() if autogroup.exists() else None
    finally:
        process.terminate()
        exit_code = process.wait(timeout=10)

    assert nice == 7
    if group is not None:  # Linux with CONFIG_SCHED_AUTOGROUP (this machine and CI)
        assert group.endswith(" nice 7")
    assert exit_code == 0
