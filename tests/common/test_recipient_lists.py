"""A recipient list's records read as rows, as the campaigns service's import, the gateway and the CLI all read them:
values passed on as written, unreadable rows refused with their numbers, an unusable CSV header refused before any
row, and stream positions mapped back to file rows. (What the service then judges is in
tests/campaigns/test_recipients.py.)"""

from __future__ import annotations

import pytest

from libs.common.byte_records import Oversize, RecordSplitter, Unterminated, split_records
from libs.common.errors import InvalidArgument
from libs.common.recipient_lists import (
    RecipientFormat,
    RecipientRow,
    RowError,
    RowErrorKind,
    RowNumbers,
    RowReader,
)


def read(data: bytes, fmt: RecipientFormat = RecipientFormat.CSV, **kwargs: object) -> list[RecipientRow | RowError]:
    reader = RowReader(fmt, **kwargs)  # type: ignore[arg-type]
    splitter = RecordSplitter(reader.max_row_bytes, csv_quotes=fmt is RecipientFormat.CSV)
    rows = [row for record in split_records([data], splitter, strip_bom=True) if (row := reader.read(record))]
    reader.close()
    return rows


def test_csv_values_are_passed_on_as_written_for_the_service_to_judge():
    rows = read(b'EMAIL,Name,city\r\n  Ada@Example.com ,"Lovelace, Ada","Lon""don"\r\nnot-an-address,,\r\n')
    assert rows == [RecipientRow(2, "  Ada@Example.com ", "Lovelace, Ada", {"city": 'Lon"don'}),
                    RecipientRow(3, "not-an-address", "", {"city": ""})]


def test_csv_rows_are_numbered_with_the_header_as_row_1_and_blank_lines_keeping_their_number():
    reader = RowReader(RecipientFormat.CSV)
    rows = [reader.read(record) for record in (b"email,note", b'a@example.com,"two\nlines"', b"\r", b"b@x,y")]
    assert rows == [None, RecipientRow(2, "a@example.com", "", {"note": "two\nlines"}), None,
                    RecipientRow(4, "b@x", "", {"note": "y"})]
    assert (reader.row_number, reader.blank_rows) == (4, 1)


def test_rows_that_cannot_be_read_are_refused_with_their_numbers_and_kinds():
    reader = RowReader(RecipientFormat.CSV, max_row_bytes=100)
    read_rows = [reader.read(record) for record in
                 (b"email,name", b"a@example.com,A,extra", b"b@example.com,\xff", Oversize(500), b"x" * 101,
                  Unterminated())]
    assert [(r.row_number, r.kind) for r in read_rows if isinstance(r, RowError)] == [
        (2, RowErrorKind.WRONG_COLUMN_COUNT), (3, RowErrorKind.INVALID_UTF8), (4, RowErrorKind.TOO_LONG),
        (5, RowErrorKind.TOO_LONG), (6, RowErrorKind.MALFORMED_CSV)]
    assert str(read_rows[3]) == "TOO_LONG: row of 500 bytes; at most 100"


def test_a_json_line_takes_nested_and_flat_variables_and_the_nested_one_wins():
    rows = read(b'\xef\xbb\xbf{"email": " b@example.org", "first_name": "Bob", "code": 7, "n": null, '
                b'"variables": {"code": "B7", "vip": true}}\n', RecipientFormat.JSONL)
    assert rows == [RecipientRow(1, " b@example.org", "", {"first_name": "Bob", "code": "B7", "vip": "true"})]


@pytest.mark.parametrize(("line", "kind"), [
    (b"{broken", RowErrorKind.MALFORMED_JSON),
    (b'["a@example.com"]', RowErrorKind.NOT_AN_OBJECT),
    (b'{"name": "No Address"}', RowErrorKind.MISSING_EMAIL),
    (b'{"email": 12}', RowErrorKind.INVALID_ADDRESS),
    (b'{"email": "a@example.com", "name": 5}', RowErrorKind.INVALID_NAME),
    (b'{"email": "a@example.com", "variables": {"tags": ["x"]}}', RowErrorKind.BAD_VARIABLE),
    (b'{"email": "a@example.com", "name": "\\ud800"}', RowErrorKind.MALFORMED_JSON),
])
def test_a_json_line_that_is_no_recipient_is_refused(line: bytes, kind: RowErrorKind):
    [row] = read(b"\n" + line + b"\n", RecipientFormat.JSONL)
    assert isinstance(row, RowError) and (row.row_number, row.kind) == (2, kind)


def test_a_bad_csv_header_names_every_problem_and_leaves_variable_limits_to_the_caller():
    with pytest.raises(InvalidArgument) as refused:
        read(b"name,Name,,plan\na,b,c,d\n")
    assert refused.value.reason == "MALFORMED_RECIPIENT_HEADER"
    assert [v.field for v in refused.value.field_violations] == ["header[1]", "header[2]", "header"]
    assert read(b"email," + b"v" * 300 + b"\nx,y\n")[0] == RecipientRow(2, "x", "", {"v" * 300: "y"})


def test_a_caller_that_judges_variables_refuses_their_header_columns_in_the_same_error():
    with pytest.raises(InvalidArgument) as refused:
        read(b"email,email,a,bad\n", variable_name_problem=lambda name: "bad name" if name == "bad" else None,
             max_variables=1)
    assert [v.description for v in refused.value.field_violations][1:] == ["bad name", "2 variable columns; at most 1"]


def test_a_csv_without_a_header_row_is_refused_at_its_end():
    with pytest.raises(InvalidArgument, match="CSV header"):
        read(b"")
    assert read(b"", RecipientFormat.JSONL) == []


def test_stream_positions_map_back_to_file_rows_around_skipped_rows():
    numbers = RowNumbers()
    positions = [numbers.add(row) for row in [2, 3, 5, 6, 7, 10]]  # rows 4, 8 and 9 were not sent
    assert positions == [1, 2, 3, 4, 5, 6]
    assert [numbers.row_of(p) for p in range(1, 7)] == [2, 3, 5, 6, 7, 10]
    assert numbers.sent == 6
