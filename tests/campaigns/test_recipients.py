"""Recipient lists (issue 17, point 2): CSV and JSON Lines parsed from a stream split anywhere, every row accounted
for by its number, bad rows reported while the others proceed, and memory bounded whatever the list's size."""

from __future__ import annotations

import asyncio
import json
import secrets
import tracemalloc
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.common.errors import InvalidArgument
from libs.common.recipient_lists import RowError, RowErrorKind
from libs.common.s3 import create_s3_client, ensure_bucket, stream_object
from services.campaigns.recipients import (
    DEFAULT_LIMITS,
    Recipient,
    RecipientBatch,
    body_chunks,
    parse_recipients,
    validate_recipient,
)
from services.ingest.model import EmailDraft, Mailbox
from services.ingest.validation import validate_draft
from tests.conftest import S3Server


async def pieces(data: bytes, sizes: Iterable[int]) -> AsyncIterator[bytes]:
    """``data`` cut into chunks of the given sizes (the last chunk takes the rest)."""
    pos = 0
    for size in sizes:
        if pos >= len(data):
            break
        yield data[pos:pos + size]
        pos += size
    if pos < len(data):
        yield data[pos:]


async def collect(chunks: AsyncIterator[bytes], fmt: str, **kwargs: object) -> list[RecipientBatch]:
    return [batch async for batch in parse_recipients(chunks, fmt, **kwargs)]


def rows(data: bytes | str, fmt: str = "csv", chunk: int = 1 << 20, **kwargs: object) -> list[Recipient | RowError]:
    """Every recipient and row error, in row order."""
    raw = data.encode() if isinstance(data, str) else data
    batches = asyncio.run(collect(body_chunks(raw, chunk), fmt, **kwargs))
    items: list[Recipient | RowError] = [item for batch in batches for item in (*batch.recipients, *batch.errors)]
    return sorted(items, key=lambda item: item.row_number)


def errors(data: bytes | str, fmt: str = "csv", **kwargs: object) -> dict[int, RowErrorKind]:
    return {item.row_number: item.kind for item in rows(data, fmt, **kwargs) if isinstance(item, RowError)}


def accepted(data: bytes | str, fmt: str = "csv", **kwargs: object) -> dict[int, str]:
    return {item.row_number: item.email for item in rows(data, fmt, **kwargs) if isinstance(item, Recipient)}


# -- CSV -------------------------------------------------------------------------------------------------------------
def test_csv_header_names_email_and_name_in_any_case_and_every_other_column_is_a_variable():
    [recipient] = rows("First Name,EMAIL,Name,plan\nAnn,Ann@Example.COM,Ann Lee,gold\n")
    assert recipient == Recipient(2, "Ann@example.com", "Ann Lee", {"First Name": "Ann", "plan": "gold"})


def test_a_list_without_a_name_column_gives_empty_names():
    [recipient] = rows("email\nann@example.com\n")
    assert (recipient.name, recipient.variables) == ("", {})


CSV_WITH_QUOTES = (b'email,name,note\r\n'
                   b'ann@example.com,"Lee, Ann","line one\r\nline two, with ""quotes"""\r\n'
                   b'bob@example.com,Bob,"a\nb"\n'
                   b'cy@example.com,Cy,"ends, quoted"\n')


def test_quoted_fields_keep_commas_quotes_and_line_breaks_whatever_the_chunk_boundaries():
    expected = rows(CSV_WITH_QUOTES)
    assert [r.variables["note"] for r in expected if isinstance(r, Recipient)] == [
        'line one\r\nline two, with "quotes"', "a\nb", "ends, quoted"]
    assert expected[0].name == "Lee, Ann"
    for size in range(1, 12):
        assert rows(CSV_WITH_QUOTES, chunk=size) == expected, f"chunks of {size} bytes"


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_split_of_the_stream_parses_as_the_whole(sizes: list[int]):
    whole = rows(CSV_WITH_QUOTES)
    batches = asyncio.run(collect(pieces(CSV_WITH_QUOTES, sizes), "csv"))
    assert sorted((r for b in batches for r in (*b.recipients, *b.errors)), key=lambda r: r.row_number) == whole


def test_a_byte_order_mark_and_crlf_line_ends_are_accepted_even_when_the_mark_is_split():
    data = "\ufeffemail,name\r\nann@example.com,Ann\r\nbob@example.com,Bob\r\n".encode()
    for size in (1, 2, 3, 4, 1 << 20):
        got = rows(data, chunk=size)
        assert [(r.email, r.name) for r in got if isinstance(r, Recipient)] == [
            ("ann@example.com", "Ann"), ("bob@example.com", "Bob")], f"chunks of {size} bytes"


def test_a_multibyte_character_split_between_chunks_decodes_whole():
    data = "email,name,city\nzoë@bücher.example,Zoë 用户,Köln 😀\n".encode()
    for size in range(1, 8):
        [recipient] = rows(data, chunk=size)
        assert isinstance(recipient, Recipient), f"chunks of {size} bytes"
        assert (recipient.email, recipient.name, recipient.variables) == (
            "zoë@bücher.example", "Zoë 用户", {"city": "Köln 😀"})


def test_row_numbers_count_the_header_as_row_1_a_multiline_record_as_one_row_and_blank_lines():
    data = 'email,note\nann@example.com,"two\nlines"\n\nbad-address,x\ncy@example.com,y\n'
    assert accepted(data) == {2: "ann@example.com", 5: "cy@example.com"}
    assert errors(data) == {4: RowErrorKind.INVALID_ADDRESS}
    [batch] = asyncio.run(collect(body_chunks(data.encode()), "csv"))
    assert (batch.blank_rows, batch.last_row) == (1, 5)


VALID = "ok{}@example.com,Ok,v\n"


@pytest.mark.parametrize(("line", "kind", "reason_says"), [
    (",Nobody,v\n", RowErrorKind.MISSING_EMAIL, "no email address"),
    ("not-an-address,X,v\n", RowErrorKind.INVALID_ADDRESS, "not a valid address"),
    ("x@example.com,\"Evil\rBcc: y\",v\n", RowErrorKind.INVALID_NAME, "control characters"),
    ("x@example.com,X\n", RowErrorKind.WRONG_COLUMN_COUNT, "2 columns where the header has 3"),
    ("x@example.com,X,v,extra\n", RowErrorKind.WRONG_COLUMN_COUNT, "4 columns where the header has 3"),
    ("x@example.com,X\xff\xfe,v\n", RowErrorKind.INVALID_UTF8, "not valid UTF-8 (byte 0xff at offset 15)"),
    ("x@example.com,X,a\x00b\n", RowErrorKind.BAD_VARIABLE, "NUL"),
    ("x@example.com,X," + "v" * (DEFAULT_LIMITS.max_variable_value_chars + 1) + "\n", RowErrorKind.TOO_LONG,
     "value longer than 8192 characters"),
])
def test_each_malformed_csv_row_is_reported_with_its_number_while_the_others_proceed(line: str, kind: RowErrorKind,
                                                                                     reason_says: str):
    data = "email,name,var\n" + VALID.format(1) + line + VALID.format(2)
    got = rows(data.encode("latin-1") if "\xff" in line else data.encode())
    assert [(r.row_number, type(r).__name__) for r in got] == [(2, "Recipient"), (3, "RowError"), (4, "Recipient")]
    error = got[1]
    assert isinstance(error, RowError) and error.kind is kind
    assert reason_says in error.reason


def test_a_quote_inside_an_unquoted_field_is_literal_and_does_not_swallow_the_next_row():
    got = rows('email,name\nann@example.com,O"Brien\nbob@example.com,Bob\n')
    assert [(r.row_number, r.name) for r in got if isinstance(r, Recipient)] == [(2, 'O"Brien'), (3, "Bob")]


def test_a_quote_left_open_at_the_end_of_the_file_is_a_row_error():
    data = 'email,name\nann@example.com,Ann\nbob@example.com,"Bob\n'
    assert accepted(data) == {2: "ann@example.com"}
    assert errors(data) == {3: RowErrorKind.MALFORMED_CSV}


@pytest.mark.parametrize(("header", "says"), [
    ("name,address\n", "no 'email' column"),
    ("email,name,Plan,plan\n", "repeats column 3"),
    ("Email,EMAIL\n", "repeats column 1"),
    ("email,,plan\n", "column 2 has no name"),
    ("email," + ",".join(f"v{i}" for i in range(DEFAULT_LIMITS.max_variables + 1)) + "\n", "at most 100"),
    ("email," + "v" * 200 + "\n", "name longer than 128"),
    ("", "the file is empty"),
])
def test_a_bad_header_fails_the_whole_import_before_any_row(header: str, says: str):
    data = (header + "ann@example.com,x\n" * 3).encode() if header else b""

    async def first_batch() -> None:
        async for _ in parse_recipients(body_chunks(data), "csv"):
            pytest.fail("a batch came before the header was refused")

    with pytest.raises(InvalidArgument) as refused:
        asyncio.run(first_batch())
    assert refused.value.reason == "MALFORMED_RECIPIENT_HEADER"
    assert any(says in v.description for v in refused.value.field_violations)


def test_batches_hold_at_most_batch_size_rows_and_say_the_last_row_they_cover():
    data = "email\n" + "".join(f"u{i}@example.com\n" if i % 3 else "bad\n" for i in range(10))
    batches = asyncio.run(collect(body_chunks(data.encode(), 7), "csv", batch_size=4))
    assert [len(b.recipients) + len(b.errors) for b in batches] == [4, 4, 2]
    assert [b.last_row for b in batches] == [5, 9, 11]
    assert sum(len(b.errors) for b in batches) == 4


# -- JSON Lines ------------------------------------------------------------------------------------------------------
def test_json_lines_give_recipients_with_numbers_and_booleans_as_text_and_null_left_out():
    data = ('{"email": "Ann@Example.COM", "name": "Ann", "variables": {"n": 12, "x": 0.5, "vip": true, '
            '"plan": "gold", "gone": null}}\r\n'
            '{"email": "bob@example.com"}\n')
    assert rows(data, "jsonl") == [
        Recipient(1, "Ann@example.com", "Ann", {"n": "12", "x": "0.5", "vip": "true", "plan": "gold"}),
        Recipient(2, "bob@example.com", "", {})]


@pytest.mark.parametrize(("line", "kind"), [
    ('{"email": "x@example.com", "variables": {"a": 1', RowErrorKind.MALFORMED_JSON),
    ('{"email": "x@example.com", "variables": {"n": NaN}}', RowErrorKind.MALFORMED_JSON),
    ('["x@example.com"]', RowErrorKind.NOT_AN_OBJECT),
    ('"x@example.com"', RowErrorKind.NOT_AN_OBJECT),
    ('{"name": "Nobody"}', RowErrorKind.MISSING_EMAIL),
    ('{"email": 42}', RowErrorKind.INVALID_ADDRESS),
    ('{"email": "x@@example.com"}', RowErrorKind.INVALID_ADDRESS),
    ('{"email": "x@example.com", "first_name": {"a": 1}}', RowErrorKind.BAD_VARIABLE),
    ('{"email": "x@example.com", "variables": {"address": {"city": "Paris"}}}', RowErrorKind.BAD_VARIABLE),
    ('{"email": "x@example.com", "variables": {"tags": ["a"]}}', RowErrorKind.BAD_VARIABLE),
    ('{"email": "x@example.com", "variables": ["a"]}', RowErrorKind.BAD_VARIABLE),
    ('{"email": "x@example.com", "name": "\\ud800"}', RowErrorKind.MALFORMED_JSON),
    (json.dumps({"email": "x@example.com", "variables": {f"v{i}": 1 for i in range(101)}}),
     RowErrorKind.TOO_MANY_VARIABLES),
    (json.dumps({"email": "x@example.com", "variables": {"v" * 129: 1}}), RowErrorKind.TOO_LONG),
    (b'{"email": "x@example.com", "name": "\xc3"}', RowErrorKind.INVALID_UTF8),
])
def test_each_invalid_json_line_is_reported_with_its_number_while_the_others_proceed(line: str | bytes,
                                                                                    kind: RowErrorKind):
    bad = line if isinstance(line, bytes) else line.encode()
    data = b'{"email": "a@example.com"}\n' + bad + b'\n{"email": "b@example.com"}\n'
    assert errors(data, "jsonl") == {2: kind}
    assert accepted(data, "jsonl") == {1: "a@example.com", 3: "b@example.com"}


def test_an_unknown_format_is_refused():
    with pytest.raises(InvalidArgument, match="unknown recipient list format"):
        rows("email\n", "xlsx")


# -- the client-streaming path ---------------------------------------------------------------------------------------
ADDRESSES = ["simple@example.com", "Zoë@Bücher.EXAMPLE", "用户@例子.广告", "o'brien@example.ie", "no-at-sign.example",
             "two@@example.net", "a@b", "user@exa_mple.net", "<user@example.net>", "x@example.com\r\nBcc: y@z.com"]


@pytest.mark.parametrize("address", ADDRESSES)
def test_a_streamed_recipient_is_accepted_exactly_when_ingest_accepts_the_address(address: str):
    draft = EmailDraft(message_class="bulk", sender=Mailbox("shop@example.com"), to=(Mailbox(address),),
                       subject="Hi", text_body="Hi")
    try:
        ingest: str | None = validate_draft(draft).to[0].email
    except InvalidArgument:
        ingest = None
    result = validate_recipient(1, address)
    assert (result.email if isinstance(result, Recipient) else None) == ingest


def test_a_streamed_recipient_goes_through_the_same_checks_as_a_file_row():
    assert validate_recipient(7, " ann@example.com ", "Ann", {"plan": "gold"}) == Recipient(
        7, "ann@example.com", "Ann", {"plan": "gold"})
    assert validate_recipient(8, "", "Nobody").kind is RowErrorKind.MISSING_EMAIL
    too_many = {f"v{i}": "x" for i in range(101)}
    assert validate_recipient(9, "a@example.com", "", too_many).kind is RowErrorKind.TOO_MANY_VARIABLES
    huge = {f"v{i}": "x" * 8000 for i in range(10)}
    error = validate_recipient(10, "a@example.com", "", huge)
    assert isinstance(error, RowError) and error.kind is RowErrorKind.TOO_LONG


def test_spaces_and_tabs_around_an_address_are_trimmed_but_a_line_break_is_refused_as_ingest_refuses_it():
    assert accepted("email,name\n  ann@example.com\t, Ann \n") == {2: "ann@example.com"}
    assert validate_recipient(1, "ann@example.com\r\n").kind is RowErrorKind.INVALID_ADDRESS


def test_every_problem_of_a_row_is_named_in_its_reason():
    error = validate_recipient(3, "bad", "x" * 300, {"": "v"})
    assert isinstance(error, RowError) and error.kind is RowErrorKind.INVALID_ADDRESS
    assert "not a valid address" in error.reason
    assert "longer than 256 characters" in error.reason
    assert "empty name" in error.reason


# -- bounded memory --------------------------------------------------------------------------------------------------
async def peak_traced_bytes(batches: AsyncIterator[RecipientBatch], seen: list[RecipientBatch]) -> int:
    """The peak of traced memory while ``batches`` are read; ``seen`` gets each batch, as a consumer that had
    stored it would have let it go (the batches of a large list are counted by the caller, not kept)."""
    tracemalloc.start()
    try:
        async for batch in batches:
            seen.append(batch)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def one_huge_row_between_two(row_bytes: int, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    yield b"email,note\nann@example.com,a\nbob@example.com,\""
    for _ in range(row_bytes // chunk):
        yield b"x" * (chunk - 4) + b",\n\"\""  # commas, line ends and doubled quotes, all inside the quoted field
    yield b'"\ncy@example.com,c\n'


def test_an_oversize_row_is_a_row_error_and_is_never_held_in_memory():
    seen: list[RecipientBatch] = []
    peak = asyncio.run(peak_traced_bytes(parse_recipients(one_huge_row_between_two(32 << 20), "csv"), seen))
    items = sorted((r for b in seen for r in (*b.recipients, *b.errors)), key=lambda r: r.row_number)
    assert [(r.row_number, type(r).__name__) for r in items] == [(2, "Recipient"), (3, "RowError"), (4, "Recipient")]
    assert isinstance(items[1], RowError) and items[1].kind is RowErrorKind.TOO_LONG
    assert "at most 65536" in items[1].reason
    assert peak < 2 << 20, f"a 32 MiB row peaked at {peak} traced bytes"


def test_an_oversize_json_line_is_a_row_error():
    data = b'{"email": "a@example.com"}\n{"email": "b@example.com", "name": "' + b"x" * (70 * 1024) + b'"}\n{}\n'
    assert errors(data, "jsonl", chunk=1000) == {2: RowErrorKind.TOO_LONG, 3: RowErrorKind.MISSING_EMAIL}


async def generated_csv(rows: int, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    """A recipient list made on the fly (about 70 bytes a row), never whole in memory."""
    buffer = bytearray(b"email,name,first_name,city,plan\r\n")
    for i in range(rows):
        buffer += f'user{i}@example{i % 97}.com,User {i},First{i},"City, {i % 50}",gold\r\n'.encode()
        if len(buffer) >= chunk:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def parse_peak(rows: int) -> int:
    """Parse a generated list of ``rows`` rows; the peak of traced memory meanwhile, in bytes."""
    counts: list[tuple[int, int, int]] = []

    async def count() -> int:
        tracemalloc.start()
        try:
            async for batch in parse_recipients(generated_csv(rows), "csv"):
                counts.append((len(batch.recipients), len(batch.errors), batch.last_row))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak = asyncio.run(count())
    assert sum(recipients for recipients, _, _ in counts) == rows
    assert sum(errors for _, errors, _ in counts) == 0
    assert counts[-1][2] == rows + 1  # the header is row 1
    return peak


def test_parsing_memory_does_not_grow_with_the_list():
    # Held at once: one 64 KiB chunk, its rows, one batch of 1,000 recipients (about 1 MB), the generator's buffer.
    # Five times the rows (3.5 MB of input instead of 0.7) would add 2.8 MB if the input were held, over 25 MB if
    # the parsed recipients were.
    small, large = parse_peak(10_000), parse_peak(50_000)

    assert large < 4 << 20, f"peak traced memory {large} bytes"
    assert large - small < 512 << 10, f"peak grew from {small} to {large} bytes with five times the rows"


# -- from S3 ---------------------------------------------------------------------------------------------------------
def test_a_list_uploaded_to_s3_parses_from_the_streamed_object(s3_server: S3Server):
    client = create_s3_client(s3_server.endpoint, s3_server.region, s3_server.access_key, s3_server.secret_key)
    bucket = f"recipients-{secrets.token_hex(4)}"
    ensure_bucket(client, bucket)
    lines = [json.dumps({"email": f"u{i}@example.com", "variables": {"i": i}}) for i in range(500)]
    client.put_object(Bucket=bucket, Key="list.jsonl", Body=("\n".join(lines) + "\n").encode())

    async def parse() -> list[RecipientBatch]:
        return await collect(stream_object(client, bucket, "list.jsonl", chunk_bytes=4093), "jsonl", batch_size=200)

    batches = asyncio.run(parse())
    assert [len(b.recipients) for b in batches] == [200, 200, 100]
    assert batches[-1].recipients[-1] == Recipient(500, "u499@example.com", "", {"i": "499"})


async def test_flat_json_keys_beside_email_and_name_are_variables() -> None:
    lines = b'{"email": "x@example.com", "first_name": "X", "code": 7, "variables": {"code": "8"}}\n'
    batches = [b async for b in parse_recipients(body_chunks(lines), "jsonl")]
    assert batches[0].recipients[0].variables == {"first_name": "X", "code": "8"}
