"""``esp campaign ...`` against the real mesh (services as processes, the simulator as the provider): the CLI's
``main`` runs in this process with its arguments, as a shell would run it (``status --watch`` runs as a process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from esp.v1 import campaigns_pb2, common_pb2

from tests.campaigns.conftest import (
    CampaignMesh,
    campaign_mesh,  # noqa: F401
    progress,
    wait_until,
)
from tests.client.cli import Esp, Run, cli_runner

ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture
def esp(campaign_mesh: CampaignMesh, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> Esp:
    """``esp("campaign", "list")`` runs ``esp campaign list`` against the mesh as its tenant."""
    return cli_runner(campaign_mesh.endpoint, campaign_mesh.api_key, monkeypatch, capsys)


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {"subject": tmp_path / "subject.txt", "text": tmp_path / "body.txt", "html": tmp_path / "body.html"}
    files["subject"].write_text("Hello {{ first_name }}\n")
    files["text"].write_text("Hi {{ first_name }}, your code is {{ code }}.\n")
    files["html"].write_text("<p>Hi {{ first_name }}, your code is <b>{{ code }}</b>.</p>\n")
    return files


def _draft(esp: Esp, tmp_path: Path, tag: str, *options: str) -> str:
    files = _files(tmp_path)
    run = esp("campaign", "create", "--name", tag, "--from", "News <news@example.com>", "--tag", tag,
              "--subject-file", str(files["subject"]), "--text-file", str(files["text"]), *options)
    assert run.code == 0, run.err
    return run.out.strip()


def _recipients_csv(tmp_path: Path, count: int, name: str = "list.csv") -> Path:
    path = tmp_path / name
    path.write_text("email,name,first_name,code\n"
                    + "".join(f"r{i}@example.org,R {i},Name{i},C{i:04d}\n" for i in range(count)))
    return path


def _filled(esp: Esp, tmp_path: Path, tag: str, count: int, *options: str) -> str:
    name = _draft(esp, tmp_path, tag, *options)
    run = esp("campaign", "add-recipients", name, str(_recipients_csv(tmp_path, count)))
    assert run.code == 0 and f"added {count}," in run.out, run
    return name


def _count(status: str, label: str) -> int:
    found = re.search(rf"^\s+{label}\s+(\d+)", status, re.MULTILINE)
    assert found, f"no {label} in:\n{status}"
    return int(found.group(1))


def _get(mesh: CampaignMesh, name: str) -> campaigns_pb2.Campaign:
    channel, stub = mesh.campaigns()
    with channel:
        return progress(stub, mesh.auth(), name)


def test_create_reads_the_templates_from_files_and_prints_the_campaign_name(
        esp: Esp, campaign_mesh: CampaignMesh, tmp_path: Path) -> None:  # noqa: F811
    files = _files(tmp_path)
    run = esp("campaign", "create", "--name", "Spring sale", "--from", "News <news@example.com>",
              "--reply-to", "help@example.com", "--reply-to", "Sales <sales@example.com>",
              "--subject-file", str(files["subject"]), "--text-file", str(files["text"]),
              "--html-file", str(files["html"]), "--var", "code=NONE", "--var", "first_name=friend",
              "--tag", "spring", "--metadata", "batch=7", "--class", "transactional",
              "--send-at", "2031-05-01T09:00:00+02:00", "--rate", "25", "--window", "09:00-18:30@Europe/Paris",
              "--missing-variable", "empty")
    assert run.code == 0, run.err
    assert re.fullmatch(r"campaigns/\w+\n", run.out)
    c = _get(campaign_mesh, run.out.strip())
    assert c.display_name == "Spring sale"
    assert (getattr(c, "from").email, getattr(c, "from").name) == ("news@example.com", "News")
    assert [(r.email, r.name) for r in c.reply_to] == [("help@example.com", ""), ("sales@example.com", "Sales")]
    assert c.subject == "Hello {{ first_name }}"
    assert c.text_body == files["text"].read_text() and c.html_body == files["html"].read_text()
    assert dict(c.default_variables) == {"code": "NONE", "first_name": "friend"}
    assert list(c.tags) == ["spring"] and dict(c.metadata) == {"batch": "7"}
    assert c.message_class == common_pb2.MESSAGE_CLASS_TRANSACTIONAL
    assert c.send_time.ToDatetime(tzinfo=UTC) == datetime(2031, 5, 1, 7, 0, tzinfo=UTC)
    assert c.send_rate == 25.0
    assert (c.send_window.start_minute, c.send_window.end_minute, c.send_window.time_zone) == (
        540, 1110, "Europe/Paris")
    assert c.missing_variable_policy == campaigns_pb2.MISSING_VARIABLE_POLICY_EMPTY


def test_a_template_syntax_error_exits_non_zero_with_its_line_and_column(esp: Esp, tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_text("Hi {{ first_name\n")
    run = esp("campaign", "create", "--from", "news@example.com", "--subject", "Hello", "--text-file", str(body))
    assert run.code == 1
    assert run.err.startswith("INVALID_ARGUMENT: ")
    assert "line 1, column 7" in run.err
    assert run.out == ""


def test_add_recipients_reports_a_malformed_csv_row_by_its_row_number_and_adds_the_others(
        esp: Esp, tmp_path: Path) -> None:
    name = _draft(esp, tmp_path, "cli-malformed")
    path = tmp_path / "list.csv"
    path.write_text("email,first_name,code\na@example.org,Ann,A1\nb@example.org,Bob,B2,extra\nc@example.org,Cy,C3\n")
    run = esp("campaign", "add-recipients", name, str(path))
    assert run.code == 0, run.err
    assert run.out.splitlines() == ["added 2, duplicates 0, suppressed 0, rejected 1",
                                    "  row 3: 4 columns where the header has 3"]


def test_an_address_the_mesh_refuses_is_reported_with_its_row_in_the_file(esp: Esp, tmp_path: Path) -> None:
    name = _draft(esp, tmp_path, "cli-bad-address")
    path = tmp_path / "list.csv"
    # Row 3 is refused by the CLI and row 4 is blank, so the bad address is the stream's 2nd recipient but row 5.
    path.write_text("email,first_name,code\na@example.org,Ann,A1\nb@example.org,Bob\n\nnot-an-address,X,X1\n"
                    "a@example.org,Ann,A1\n")
    run = esp("campaign", "add-recipients", name, str(path))
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == "added 1, duplicates 1, suppressed 0, rejected 2"
    assert lines[1] == "  row 3: 2 columns where the header has 3"
    assert lines[2].startswith("  row 5 <not-an-address>: INVALID_ADDRESS")


def test_import_uploads_the_file_and_reports_the_rows_the_mesh_refused(esp: Esp, tmp_path: Path) -> None:
    name = _draft(esp, tmp_path, "cli-import")
    path = tmp_path / "list.csv"
    path.write_text("email,first_name,code\na@example.org,Ann,A1\nnot-an-address,X,X1\nc@example.org,Cy,C3\n")
    run = esp("campaign", "add-recipients", "--import", name, str(path))
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == "added 2, duplicates 0, suppressed 0, rejected 1"
    assert lines[1].startswith("  row 3") and "INVALID_ADDRESS" in lines[1]


def test_jsonl_recipients_are_sent_with_their_nested_and_flat_variables(
        esp: Esp, campaign_mesh: CampaignMesh, tmp_path: Path) -> None:  # noqa: F811
    name = _draft(esp, tmp_path, "cli-jsonl")
    path = tmp_path / "list.jsonl"
    path.write_text('{"email": "j1@example.org", "variables": {"first_name": "Jo", "code": "J1"}}\n'
                    '{"email": "j2@example.org", "first_name": "Al", "code": 42}\n')
    assert esp("campaign", "add-recipients", name, str(path)).out.startswith("added 2,")
    assert esp("campaign", "start", name).code == 0
    delivered = wait_until(lambda: len(found := campaign_mesh.delivered("cli-jsonl")) == 2 and found, 60,
                           "both emails at the provider")
    subjects = {m["to"][0]: m["subject"] for m in delivered}
    assert subjects == {"j1@example.org": "Hello Jo", "j2@example.org": "Hello Al"}
    assert any("your code is 42." in m["text"] for m in delivered)


def test_a_csv_without_an_email_column_is_refused_before_anything_is_sent(esp: Esp, tmp_path: Path) -> None:
    name = _draft(esp, tmp_path, "cli-no-email")
    path = tmp_path / "list.csv"
    path.write_text("address,first_name\na@example.org,Ann\n")
    run = esp("campaign", "add-recipients", name, str(path))
    assert run.code == 1
    assert "no 'email' column" in run.err
    assert _count(esp("campaign", "status", name).out, "recipients") == 0


def test_start_prints_running(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-start", 3)
    run = esp("campaign", "start", name)
    assert (run.code, run.out) == (0, f"{name} running\n")


def test_status_shows_progress_and_reaches_completed(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-status", 40)
    esp("campaign", "start", name)
    first = esp("campaign", "status", name)
    assert first.code == 0
    assert first.out.startswith(f"{name} ")
    assert _count(first.out, "recipients") == 40
    for label in ("pending", "queued", "sent", "delivered", "bounced", "complained", "failed", "suppressed",
                  "cancelled"):
        _count(first.out, label)
    assert re.search(r"^\s+rate\s+[\d.]+ emails/s$", first.out, re.MULTILINE)
    assert re.search(r"^\s+eta\s+", first.out, re.MULTILINE)
    done = wait_until(lambda: (s := esp("campaign", "status", name).out).startswith(f"{name} completed") and s,
                      60, "status says completed", every_s=0.5)
    assert _count(done, "sent") == 40
    assert _count(done, "pending") == 0 and _count(done, "queued") == 0


def test_pause_prints_paused_with_its_reason(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-pause", 30, "--rate", "1")
    esp("campaign", "start", name)
    run = esp("campaign", "pause", name)
    assert (run.code, run.out) == (0, f"{name} paused (by customer)\n")
    esp("campaign", "cancel", name)


def test_resume_prints_running(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-resume", 30, "--rate", "1")
    esp("campaign", "start", name)
    esp("campaign", "pause", name)
    run = esp("campaign", "resume", name)
    assert (run.code, run.out) == (0, f"{name} running\n")
    esp("campaign", "cancel", name)


def test_cancel_prints_cancelled(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-cancel", 30, "--rate", "1")
    esp("campaign", "start", name)
    run = esp("campaign", "cancel", name)
    assert (run.code, run.out) == (0, f"{name} cancelled\n")


def test_an_illegal_transition_exits_non_zero_with_the_current_state(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-illegal", 3)
    run = esp("campaign", "resume", name)
    assert run.code == 1
    assert run.out == ""
    assert "FAILED_PRECONDITION: cannot resume a campaign that is draft" in run.err
    assert "state=DRAFT" in run.err


def test_a_transition_repeated_with_its_request_id_prints_the_state_again(esp: Esp, tmp_path: Path) -> None:
    name = _filled(esp, tmp_path, "cli-retry", 30, "--rate", "1")
    esp("campaign", "start", name)
    first = esp("campaign", "pause", name, "--request-id", "cli-pause-1")
    again = esp("campaign", "pause", name, "--request-id", "cli-pause-1")
    assert first == again == Run(0, f"{name} paused (by customer)\n", "")
    esp("campaign", "cancel", name)


def test_the_bare_id_names_the_campaign_too(esp: Esp, tmp_path: Path) -> None:
    name = _draft(esp, tmp_path, "cli-bare-id")
    run = esp("campaign", "status", name.removeprefix("campaigns/"))
    assert run.code == 0
    assert run.out.startswith(f"{name} draft\n")


def test_an_unknown_campaign_exits_non_zero_with_not_found(esp: Esp) -> None:
    run = esp("campaign", "status", "campaigns/nosuchcampaign")
    assert run.code == 1
    assert run.err.startswith("NOT_FOUND: campaigns/nosuchcampaign not found")


def test_list_shows_only_the_campaigns_in_the_state_asked_for(esp: Esp, tmp_path: Path) -> None:
    draft = _draft(esp, tmp_path, "cli-list-draft")
    cancelled = _draft(esp, tmp_path, "cli-list-cancelled")
    esp("campaign", "cancel", cancelled)
    run = esp("campaign", "list", "--state", "cancelled", "--limit", "200")
    assert run.code == 0
    names = [line.split()[0] for line in run.out.splitlines()]
    assert cancelled in names and draft not in names
    assert all(line.split()[1] == "cancelled" for line in run.out.splitlines())


def test_status_watch_exits_when_the_campaign_completes(
        esp: Esp, campaign_mesh: CampaignMesh, tmp_path: Path) -> None:  # noqa: F811
    name = _filled(esp, tmp_path, "cli-watch", 10, "--rate", "2")
    esp("campaign", "start", name)
    env = {**os.environ, "ESP_ENDPOINT": campaign_mesh.endpoint, "ESP_API_KEY": campaign_mesh.api_key,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    watched = subprocess.run([sys.executable, "-m", "libs.client.cli", "campaign", "status", name, "--watch"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert any(line.startswith("running") for line in lines), watched.stdout  # the bar while it sent
    assert any(re.match(r"completed\s+100% 10/10", line) for line in lines), watched.stdout
    assert f"{name} completed" in lines
    assert _get(campaign_mesh, name).state == campaigns_pb2.CAMPAIGN_STATE_COMPLETED
