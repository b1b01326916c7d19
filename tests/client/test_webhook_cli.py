"""``esp webhook ...`` and ``esp events list`` against the real mesh (services as processes, the simulator as the
provider, a local HTTP receiver as the webhook endpoint): the CLI's ``main`` runs in this process with its arguments,
as a shell would run it (``webhook log --follow`` runs as a process)."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from libs.client.cli import main
from tests.campaigns.conftest import CampaignMesh, wait_until
from tests.client.cli import Esp, cli_runner
from tests.webhooks.conftest import receiver, webhook_mesh
from tests.webhooks.receiver import Answer, Receiver

__all__ = ["receiver", "webhook_mesh"]  # the module-scoped mesh and receiver fixtures, used here

ROOT = Path(__file__).resolve().parents[2]
ATTEMPT = re.compile(r"(?P<time>\S+Z)  (?P<id>msg_\S+)  #(?P<attempt>\d+)  (?P<outcome>.+?)  (?P<latency>\d+)ms  "
                     r"(?P<types>\S+)(?:  \(retry at \S+\))?")



@dataclass(frozen=True)
class Tenant:
    """A fresh tenant of the mesh, and a receiver URL of its own."""

    key: str
    path: str
    url: str


@pytest.fixture
def tenant(webhook_mesh: CampaignMesh, receiver: Receiver) -> Tenant:
    tenant_id, key = webhook_mesh.new_tenant(1_000_000)
    path = f"/{tenant_id}/{secrets.token_hex(3)}"
    return Tenant(key, path, receiver.url + path)


@pytest.fixture
def esp(webhook_mesh: CampaignMesh, tenant: Tenant, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Esp:
    """``esp("webhook", "list")`` runs ``esp webhook list`` against the mesh as the tenant."""
    return cli_runner(webhook_mesh.endpoint, tenant.key, monkeypatch, capsys)


def _field(out: str, label: str) -> str:
    found = re.search(rf"^  {label}\s+(.*)$", out, re.MULTILINE)
    assert found, f"no {label} in:\n{out}"
    return found.group(1)


def _create(esp: Esp, url: str, *options: str) -> tuple[str, str]:
    """(endpoint name, signing secret)."""
    run = esp("webhook", "create", url, *options)
    assert run.code == 0, run.err
    return run.out.split()[0], _field(run.out, "signing secret")


def _send(esp: Esp, *options: str) -> str:
    run = esp("send", "--to", "rcpt@example.net", "--from", "shop@example.com", "--subject", "hello", "--text", "hi",
              *options)
    assert run.code == 0, run.err
    return run.out.strip()


def _attempts(esp: Esp, name: str) -> list[dict[str, str]]:
    run = esp("webhook", "log", name, "--limit", "200")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    parsed = [ATTEMPT.fullmatch(line) for line in lines]
    assert all(parsed), run.out
    return [m.groupdict() for m in parsed if m]


def test_create_prints_the_endpoint_and_its_secret_once_and_get_never_shows_it(esp: Esp, tenant: Tenant) -> None:
    run = esp("webhook", "create", tenant.url, "--event-type", "message.sent", "--event-type", "message.bounced",
              "--tag", "receipts", "--description", "orders", "--batch", "10")

    assert run.code == 0, run.err
    name = run.out.split()[0]
    assert re.fullmatch(r"webhookEndpoints/\S+", name) and run.out.startswith(f"{name} enabled\n")
    assert _field(run.out, "url") == tenant.url
    assert _field(run.out, "event types") == "message.sent, message.bounced"
    assert (_field(run.out, "tags"), _field(run.out, "description"), _field(run.out, "batch")) == (
        "receipts", "orders", "10")
    assert _field(run.out, "signing secret").startswith("whsec_")
    assert "won't be shown again" in run.out
    again = esp("webhook", "get", name.removeprefix("webhookEndpoints/"))
    assert again.code == 0 and again.out.startswith(f"{name} enabled\n")
    assert "whsec_" not in again.out and "signing secret" not in again.out


def test_log_shows_the_successful_attempts_of_an_emails_webhooks(esp: Esp, tenant: Tenant,
                                                                 receiver: Receiver) -> None:
    name, _ = _create(esp, tenant.url)
    _send(esp)

    def delivered() -> list[dict[str, str]]:
        attempts = _attempts(esp, name)
        kinds = {a["types"] for a in attempts if a["outcome"] == "200"}
        return attempts if {"message.accepted", "message.sent"} <= kinds else []

    attempts = wait_until(delivered, 30, "accepted and sent attempts in the log", every_s=0.5)
    assert all((a["attempt"], a["outcome"]) == ("1", "200") for a in attempts)
    assert {a["id"] for a in attempts} == {r.headers["webhook-id"] for r in receiver.received(tenant.path)}
    assert [a["time"] for a in attempts] == sorted(a["time"] for a in attempts)  # oldest first


def test_log_shows_a_failed_attempt_with_its_status_and_the_retry(esp: Esp, tenant: Tenant,
                                                                  receiver: Receiver) -> None:
    receiver.script(tenant.path, Answer(503))
    name, _ = _create(esp, tenant.url)
    esp("webhook", "test", name)

    attempts = wait_until(lambda: len(found := _attempts(esp, name)) >= 2 and found, 20, "a retry", every_s=0.5)
    first, second = attempts[:2]
    assert (first["attempt"], first["outcome"], second["attempt"], second["outcome"]) == ("1", "503", "2", "200")
    assert first["id"] == second["id"] and first["types"] == "test"


def test_log_follow_prints_an_attempt_made_after_it_started(
        esp: Esp, webhook_mesh: CampaignMesh, tenant: Tenant, tmp_path: Path) -> None:
    name, _ = _create(esp, tenant.url)
    earlier = esp("webhook", "test", name).out.split()[-1]
    wait_until(lambda: _attempts(esp, name), 20, "the first test attempt logged", every_s=0.3)
    env = {**os.environ, "ESP_ENDPOINT": webhook_mesh.endpoint, "ESP_API_KEY": tenant.key,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    follower = subprocess.Popen([sys.executable, "-m", "libs.client.cli", "webhook", "log", name, "--follow",
                                 "--interval", "0.2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in follower.stdout or ():
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        first = lines.get(timeout=30)  # the attempt already logged: the follower has read the log
        assert f"  {earlier}  #1  200  " in first
        later = esp("webhook", "test", name).out.split()[-1]
        followed = lines.get(timeout=30)
        assert ATTEMPT.fullmatch(followed.rstrip("\n")), followed
        assert f"  {later}  #1  200  " in followed and followed.rstrip().endswith("test")
        assert follower.poll() is None  # still following
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_events_list_shows_the_messages_events_oldest_first(esp: Esp) -> None:
    message_id = _send(esp, "--tag", "receipts")

    def listed() -> list[str]:
        run = esp("events", "list", "--message", message_id)
        assert run.code == 0, run.err
        lines = run.out.splitlines()
        return lines if any(" message.sent " in line for line in lines) else []

    lines = wait_until(listed, 30, "the message's sent event", every_s=0.5)
    types = [line.split()[1] for line in lines]
    assert types[0] == "message.accepted" and "message.sent" in types
    assert all(f"messages/{message_id}" in line and "rcpt@example.net" in line for line in lines)
    assert all("tags=receipts" in line for line in lines)


def test_events_list_filters_by_type_and_tag(esp: Esp) -> None:
    tagged = _send(esp, "--tag", "cli-filter")
    _send(esp, "--tag", "other")
    wait_until(lambda: esp("events", "list", "--message", tagged, "--type", "message.sent").out, 30, "sent")

    run = esp("events", "list", "--type", "message.sent", "--tag", "cli-filter", "--since", "1h")

    assert run.code == 0, run.err
    [line] = run.out.splitlines()
    assert line.split()[1:3] == ["message.sent", f"messages/{tagged}"]


def test_update_changes_only_the_options_given(esp: Esp, tenant: Tenant) -> None:
    name, _ = _create(esp, tenant.url, "--event-type", "message.sent", "--description", "kept")

    run = esp("webhook", "update", name, "--disable", "--url", tenant.url + "/v2")

    assert run.code == 0, run.err
    assert run.out.startswith(f"{name} disabled\n")
    assert _field(run.out, "url") == tenant.url + "/v2"
    assert (_field(run.out, "description"), _field(run.out, "event types")) == ("kept", "message.sent")
    enabled = esp("webhook", "update", name, "--enable", "--all-event-types")
    assert enabled.out.startswith(f"{name} enabled\n") and _field(enabled.out, "event types") == "all"


def test_list_shows_the_endpoints_and_delete_removes_one(esp: Esp, tenant: Tenant) -> None:
    kept, _ = _create(esp, tenant.url + "/kept")
    gone, _ = _create(esp, tenant.url + "/gone", "--event-type", "message.delivered")
    listed = esp("webhook", "list").out.splitlines()
    assert sorted(line.split() for line in listed) == sorted([
        [kept, "enabled", tenant.url + "/kept", "all"], [gone, "enabled", tenant.url + "/gone", "message.delivered"]])

    deleted = esp("webhook", "delete", gone)

    assert (deleted.code, deleted.out) == (0, f"{gone} deleted\n")
    assert [line.split()[0] for line in esp("webhook", "list").out.splitlines()] == [kept]
    missing = esp("webhook", "get", gone)
    assert missing.code == 1 and missing.err.startswith("NOT_FOUND")


def test_rotate_prints_a_new_secret_that_signs_the_next_delivery(esp: Esp, tenant: Tenant,
                                                                  receiver: Receiver) -> None:
    name, old = _create(esp, tenant.url)

    run = esp("webhook", "rotate", name, "--overlap", "0s")

    assert run.code == 0, run.err
    new = _field(run.out, "signing secret")
    assert new.startswith("whsec_") and new != old
    assert "won't be shown again" in run.out
    esp("webhook", "test", name)
    [request] = wait_until(lambda: receiver.received(tenant.path), 20, "the test delivery")
    assert Webhook(new).verify(request.body, request.headers)["type"] == "test"


def test_test_prints_the_webhook_id_the_receiver_gets(esp: Esp, tenant: Tenant, receiver: Receiver) -> None:
    name, _ = _create(esp, tenant.url)

    run = esp("webhook", "test", name)

    assert run.code == 0, run.err
    webhook_id = run.out.split()[-1]
    [request] = wait_until(lambda: receiver.received(tenant.path), 20, "the test delivery")
    assert request.headers["webhook-id"] == webhook_id
    assert json.loads(request.body)["type"] == "test"


def test_replay_delivers_a_messages_events_again_with_their_webhook_ids(
        esp: Esp, tenant: Tenant, receiver: Receiver) -> None:
    name, _ = _create(esp, tenant.url, "--event-type", "message.accepted")
    message_id = _send(esp)
    [first] = wait_until(lambda: receiver.received(tenant.path), 20, "the accepted webhook")

    run = esp("webhook", "replay", name, "--message", message_id)

    assert (run.code, run.out) == (0, f"queued 1 event to {name}\n")
    wait_until(lambda: len(receiver.received(tenant.path)) == 2, 20, "the replayed webhook")
    assert receiver.received(tenant.path)[1].headers["webhook-id"] == first.headers["webhook-id"]


def test_an_unknown_event_type_exits_non_zero_naming_it(esp: Esp, tenant: Tenant) -> None:
    run = esp("webhook", "create", tenant.url, "--event-type", "message.teleported")

    assert (run.code, run.out) == (1, "")
    assert run.err.startswith("INVALID_ARGUMENT") and "message.teleported" in run.err


def test_replay_needs_a_message_or_a_time_range() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["webhook", "replay", "webhookEndpoints/x"])
    assert exited.value.code == 2
