"""Plain bodies for the client-streaming RPCs: recipient lists (CSV, JSON Lines, multipart) cut into
AddCampaignRecipients frames, and files (raw, multipart) cut into UploadAttachment frames, against test doubles.

The recipients double numbers rows as the campaigns service does (1, 2, 3... in stream order) and refuses
addresses without "@", so the row numbers the gateway writes back can be checked against the file."""

import asyncio
import hashlib
import json
import os

import httpx

from services.gateway.descriptors import load_descriptor_set
from services.gateway.plain_bodies import plain_bodies

CHUNK = 1024 * 1024
ADD = "/v1/campaigns/c-7:addRecipients"
GENERATED_CLIENT_FORM = "multipart/form-data; boundary=+++"  # what openapi-python-client's clients send


def csv_list(count: int) -> bytes:
    rows = [b"email,Name,first_name,code"]
    rows += [f"r{i}@example.org,Person {i},N{i},C{i}".encode() for i in range(count)]
    return b"\n".join(rows) + b"\n"


def sent_recipients(recorder) -> list:
    return [recipient for frame in recorder.requests["AddCampaignRecipients"] for recipient in frame.recipients]


def form(boundary: str, *parts: tuple[str, str | None, str | None, bytes]) -> bytes:
    body = b""
    for name, filename, content_type, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


async def test_a_csv_body_becomes_frames_of_500_recipients_the_first_naming_the_campaign(esp_client, recorder):
    response = await esp_client.post(ADD, content=csv_list(1200), headers={"Content-Type": "text/csv"})

    assert response.status_code == 200, response.text
    assert response.json() == {"addedCount": "1200"}
    frames = recorder.requests["AddCampaignRecipients"]
    assert [len(frame.recipients) for frame in frames] == [500, 500, 200]
    assert [frame.campaign for frame in frames] == ["campaigns/c-7", "", ""]
    last = frames[2].recipients[-1]
    assert (last.address.email, last.address.name) == ("r1199@example.org", "Person 1199")
    assert dict(last.variables) == {"first_name": "N1199", "code": "C1199"}


async def test_csv_rows_are_passed_on_as_written_for_the_service_to_judge(esp_client, recorder):
    body = b'EMAIL,name,city\r\n  Ada@Example.com ,"Lovelace, Ada","Lon""don"\r\nnot-an-address,,\r\n'

    response = await esp_client.post(ADD, content=body, headers={"Content-Type": "text/csv; charset=utf-8"})

    first, second = sent_recipients(recorder)
    assert (first.address.email, first.address.name, dict(first.variables)) == (
        "  Ada@Example.com ", "Lovelace, Ada", {"city": 'Lon"don'}
    )
    assert (second.address.email, second.address.name, dict(second.variables)) == ("not-an-address", "", {"city": ""})
    assert response.json()["errors"] == [{"row": "3", "address": "not-an-address", "reason": "INVALID_ADDRESS: no @"}]


async def test_error_rows_are_the_file_rows_header_blank_lines_and_multiline_records_counted(esp_client, recorder):
    body = (
        b"email,note\n"  # row 1
        b"a@example.com,ok\n"  # 2
        b"\n"  # 3, blank
        b'bad-one,"two\nlines"\n'  # 4 (one record over two lines)
        b"c@example.com,too,many\n"  # 5: unreadable, the gateway says why
        b"\n\n"  # 6, 7
        b"bad-two,x\n"  # 8
    )

    response = await esp_client.post(ADD, content=body, headers={"Content-Type": "text/csv"})

    assert response.status_code == 200
    assert response.json() == {
        "addedCount": "1",
        "rejectedCount": "3",
        "errors": [
            {"row": "4", "address": "bad-one", "reason": "INVALID_ADDRESS: no @"},
            {"row": "5", "reason": "WRONG_COLUMN_COUNT: 3 columns where the header has 2"},
            {"row": "8", "address": "bad-two", "reason": "INVALID_ADDRESS: no @"},
        ],
    }
    # The unreadable row still reached the service (as an empty recipient), so it is counted there too.
    assert len(sent_recipients(recorder)) == 4


async def test_a_csv_header_without_an_email_column_is_refused_with_a_bad_request_detail(esp_client):
    response = await esp_client.post(ADD, content=b"mail,name\nx@example.com,X\n", headers={"Content-Type": "text/csv"})

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert body["message"] == "the recipient list's CSV header is not usable"
    [detail] = body["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert detail["fieldViolations"][0]["field"] == "header"
    assert "no 'email' column" in detail["fieldViolations"][0]["description"]


async def test_an_empty_csv_is_refused_and_a_header_alone_adds_nothing(esp_client, recorder):
    empty = await esp_client.post(ADD, content=b"", headers={"Content-Type": "text/csv"})
    header_only = await esp_client.post(ADD, content=b"email,name\n", headers={"Content-Type": "text/csv"})

    assert empty.status_code == 400
    assert header_only.status_code == 200 and header_only.json() == {}
    [frame] = recorder.requests["AddCampaignRecipients"]
    assert frame.campaign == "campaigns/c-7" and not frame.recipients  # the service still checks the campaign


async def test_frames_are_sent_while_the_csv_is_still_arriving(esp_client, recorder):
    recorder.first_recipients_frame.clear()

    async def body():
        yield csv_list(600)
        # A gateway that read the whole body first would never let the upstream see a frame before this.
        await asyncio.wait_for(recorder.first_recipients_frame.wait(), timeout=10)
        yield b"late@example.org,Late,L,C\n"

    response = await esp_client.post(ADD, content=body(), headers={"Content-Type": "text/csv"})

    assert response.json() == {"addedCount": "601"}


async def test_json_lines_of_recipients_nested_or_flat_with_numbers_as_text_and_null_left_out(esp_client, recorder):
    lines = [
        {"email": "a@example.com", "name": "Ada", "variables": {"code": 7, "vip": True, "gone": None}},
        {"email": "b@example.com", "first_name": "Bob", "score": 0.5},
    ]
    body = "\n".join(json.dumps(line) for line in lines).encode() + b"\n"

    response = await esp_client.post(ADD, content=body, headers={"Content-Type": "application/jsonl"})

    assert response.json() == {"addedCount": "2"}
    first, second = sent_recipients(recorder)
    assert (first.address.name, dict(first.variables)) == ("Ada", {"code": "7", "vip": "true"})
    assert (second.address.email, dict(second.variables)) == ("b@example.com", {"first_name": "Bob", "score": "0.5"})


async def test_unreadable_json_lines_are_reported_with_their_line_numbers(esp_client):
    body = (
        b'{"email": "a@example.com"}\n'  # 1
        b"{broken\n"  # 2
        b"\n"  # 3, blank
        b'["b@example.com"]\n'  # 4
        b'{"email": "c@example.com", "variables": {"tags": ["x"]}}\n'  # 5
        b'{"email": 12}\n'  # 6
        b'{"name": "No Address"}\n'  # 7: readable, the service refuses it
    )

    response = await esp_client.post(ADD, content=body, headers={"Content-Type": "application/x-ndjson"})

    errors = response.json()["errors"]
    assert [(error["row"], error["reason"].split(":")[0]) for error in errors] == [
        ("2", "MALFORMED_JSON"),
        ("4", "NOT_AN_OBJECT"),
        ("5", "BAD_VARIABLE"),
        ("6", "INVALID_ADDRESS"),
        ("7", "MISSING_EMAIL"),
    ]
    assert response.json()["rejectedCount"] == "5"


async def test_ndjson_whose_first_line_is_a_request_frame_is_still_a_stream_of_frames(esp_client, recorder):
    body = b"\n".join(
        json.dumps(frame).encode()
        for frame in (
            {"recipients": [{"address": {"email": "a@example.com"}}]},
            {"campaign": "campaigns/c-7", "recipients": [{"address": {"email": "b@example.com"}}]},
        )
    )

    response = await esp_client.post(ADD, content=body, headers={"Content-Type": "application/x-ndjson"})

    assert response.json() == {"addedCount": "2"}
    assert [frame.campaign for frame in recorder.requests["AddCampaignRecipients"]] == ["campaigns/c-7"] * 2


async def test_a_recipient_list_file_in_a_form_as_a_generated_client_sends_it(esp_client, recorder):
    files = {"file": ("list.csv", csv_list(3), "text/csv")}

    response = await esp_client.post(ADD, files=files, headers={"Content-Type": GENERATED_CLIENT_FORM})

    assert response.status_code == 200, response.text
    assert response.json() == {"addedCount": "3"}
    assert sent_recipients(recorder)[2].address.email == "r2@example.org"


async def test_a_json_lines_file_in_a_form_is_told_by_its_name(esp_client, recorder):
    body = form("b0undary", ("file", "people.jsonl", "application/octet-stream", b'{"email": "a@example.com"}\n'))

    response = await esp_client.post(
        ADD, content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"}
    )

    assert response.json() == {"addedCount": "1"}


async def test_a_form_whose_file_format_cannot_be_told_is_refused(esp_client):
    body = form("b0undary", ("file", "people.txt", None, b"email\na@example.com\n"))

    response = await esp_client.post(
        ADD, content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"}
    )

    assert response.status_code == 400
    assert response.json()["message"] == "cannot tell the recipient list's format"


async def test_a_raw_file_is_uploaded_in_1_mib_chunks_named_by_the_query(esp_client, recorder):
    content = os.urandom(2 * CHUNK + 100)

    response = await esp_client.post(
        "/v1/attachments",
        params={"filename": "report.pdf", "sha256": hashlib.sha256(content).hexdigest()},
        content=content,
        headers={"Content-Type": "application/octet-stream"},
    )

    assert response.status_code == 200, response.text
    assert response.json()["sizeBytes"] == str(len(content))
    assert response.json()["sha256"] == hashlib.sha256(content).hexdigest()
    metadata = recorder.requests["UploadAttachment"]
    assert (metadata.filename, metadata.content_type) == ("report.pdf", "")  # octet-stream: the service guesses
    assert metadata.sha256 == hashlib.sha256(content).hexdigest()
    assert recorder.upload_chunk_sizes == [CHUNK, CHUNK, 100]


async def test_a_raw_file_takes_its_type_from_content_type_and_its_name_from_content_disposition(
    esp_client, recorder
):
    response = await esp_client.post(
        "/v1/attachments",
        content=b"\x89PNG...",
        headers={"Content-Type": "image/png", "Content-Disposition": "attachment; filename=\"logo.png\""},
    )

    assert response.status_code == 200
    metadata = recorder.requests["UploadAttachment"]
    assert (metadata.filename, metadata.content_type) == ("logo.png", "image/png")


async def test_a_json_file_is_raw_when_named_and_ndjson_frames_when_not(esp_client, recorder):
    named = await esp_client.post(
        "/v1/attachments", params={"filename": "data.json"}, content=b'{"a": 1}',
        headers={"Content-Type": "application/json"},
    )
    frames = await esp_client.post(
        "/v1/attachments", content=b'{"metadata": {"filename": "f.txt"}}\n',
        headers={"Content-Type": "application/json"},
    )

    assert named.json()["sizeBytes"] == "8" and named.json()["contentType"] == "application/json"
    assert frames.json()["filename"] == "f.txt" and "sizeBytes" not in frames.json()


async def test_a_file_in_a_form_as_a_generated_client_sends_it(esp_client, recorder):
    content = os.urandom(CHUNK + 1)

    response = await esp_client.post(
        "/v1/attachments",
        files={"file": ("photo.jpg", content, "image/jpeg")},
        headers={"Content-Type": GENERATED_CLIENT_FORM},
    )

    assert response.status_code == 200, response.text
    assert response.json()["sha256"] == hashlib.sha256(content).hexdigest()
    metadata = recorder.requests["UploadAttachment"]
    assert (metadata.filename, metadata.content_type) == ("photo.jpg", "image/jpeg")
    assert recorder.upload_chunk_sizes == [CHUNK, 1]


async def test_form_fields_before_the_file_set_its_metadata_and_the_query_wins(esp_client, recorder):
    body = form(
        "xyz",
        ("requestId", None, None, b"req-9"),
        ("contentType", None, None, b"text/plain"),
        ("upload", "notes.txt", "application/octet-stream", b"hello"),
    )

    response = await esp_client.post(
        "/v1/attachments", params={"contentType": "text/markdown"}, content=body,
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )

    assert response.status_code == 200, response.text
    metadata = recorder.requests["UploadAttachment"]
    assert (metadata.filename, metadata.request_id, metadata.content_type) == ("notes.txt", "req-9", "text/markdown")


async def test_a_form_with_two_files_or_no_file_is_refused(esp_client):
    two = form("xyz", ("a", "a.txt", None, b"a"), ("b", "b.txt", None, b"b"))
    none = form("xyz", ("sha256", None, None, b"abc"))

    for body in (two, none):
        response = await esp_client.post(
            "/v1/attachments", content=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"}
        )
        assert response.status_code == 400
        assert response.json()["code"] == 3


async def test_a_bad_query_value_for_a_raw_upload_is_invalid_argument(esp_client):
    response = await esp_client.post(
        "/v1/attachments", params={"filename": "a.bin", "sizeBytes": "many"}, content=b"x",
        headers={"Content-Type": "application/octet-stream"},
    )

    assert response.status_code == 400
    assert "sizeBytes" in response.json()["message"]


def test_httpx_generated_form_uses_the_boundary_of_the_header():
    # openapi-python-client sets "multipart/form-data; boundary=+++" itself; the body must use that boundary.
    request = httpx.Request("POST", "http://x", files={"file": ("a.csv", b"email\n")},
                            headers={"Content-Type": GENERATED_CLIENT_FORM})

    assert b"--+++\r\n" in request.read()


async def test_an_over_long_or_non_utf8_row_is_reported_on_its_row_and_the_list_goes_on(esp_client, recorder):
    body = (
        b"email,note\n"
        + b"a@example.com," + b"x" * (70 * 1024) + b"\n"  # row 2
        + b"b@example.com,caf\xe9\n"  # row 3: Latin-1, not UTF-8
        + b"c@example.com,fine\n"
    )

    response = await esp_client.post(ADD, content=body, headers={"Content-Type": "text/csv"})

    assert response.json()["addedCount"] == "1"
    assert [(e["row"], e["reason"].split(":")[0]) for e in response.json()["errors"]] == [
        ("2", "TOO_LONG"),
        ("3", "INVALID_UTF8"),
    ]


def test_both_plain_bodies_fit_the_contracts(esp_descriptor_set):
    # A contract change that no longer fits would leave these RPCs with NDJSON only (and a warning at start).
    assert set(plain_bodies(load_descriptor_set(esp_descriptor_set))) == {
        "esp.v1.CampaignService.AddCampaignRecipients",
        "esp.v1.AttachmentService.UploadAttachment",
    }
