"""How ``esp campaign add-recipients`` reads a recipient file: row by row, in frames, every row numbered as in the
file. No mesh: the frames are looked at as they would be sent."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from libs.client.recipient_files import FileFormat, RecipientFileError, RecipientReader


def _reader(path: Path, fmt: FileFormat = FileFormat.CSV) -> RecipientReader:
    reader = RecipientReader(path, fmt, "campaigns/c1")
    reader.check()
    return reader


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "list.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_list_is_sent_in_frames_of_500_and_only_the_first_names_the_campaign(tmp_path: Path) -> None:
    path = _csv(tmp_path, "email,first_name\n" + "".join(f"r{i}@example.org,N{i}\n" for i in range(1201)))
    frames = list(_reader(path).frames())
    assert [len(f.recipients) for f in frames] == [500, 500, 201]
    assert [f.campaign for f in frames] == ["campaigns/c1", "", ""]


def test_csv_columns_other_than_email_and_name_are_variables(tmp_path: Path) -> None:
    path = _csv(tmp_path, "Email,Name,first_name,code\n a@example.org ,Ann,Ann,A1\n")
    (recipient,) = next(_reader(path).frames()).recipients
    assert (recipient.address.email, recipient.address.name) == ("a@example.org", "Ann")
    assert dict(recipient.variables) == {"first_name": "Ann", "code": "A1"}


def test_a_row_with_the_wrong_column_count_is_refused_with_its_row_number(tmp_path: Path) -> None:
    path = _csv(tmp_path, "email,name\na@example.org,A\nb@example.org,B,extra\nc@example.org,C\n")
    reader = _reader(path)
    sent = [r.address.email for f in reader.frames() for r in f.recipients]
    assert sent == ["a@example.org", "c@example.org"]
    assert [(p.row, p.reason) for p in reader.problems] == [(3, "3 columns where the header has 2")]


def test_a_quoted_field_across_lines_is_one_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'email,note\na@example.org,"two\nlines"\nb@example.org,x,y\n')
    reader = _reader(path)
    list(reader.frames())
    assert [p.row for p in reader.problems] == [3]


def test_invalid_utf8_costs_only_its_row(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_bytes(b"email,name\na@example.org,A\nb@example.org,\xff\xfe\nc@example.org,C\n")
    reader = _reader(path)
    sent = [r.address.email for f in reader.frames() for r in f.recipients]
    assert sent == ["a@example.org", "c@example.org"]
    assert [p.row for p in reader.problems] == [3]
    assert "UTF-8" in reader.problems[0].reason


def test_a_csv_without_an_email_column_is_refused_before_any_row_is_read(tmp_path: Path) -> None:
    path = _csv(tmp_path, "address,name\na@example.org,A\n")
    with pytest.raises(RecipientFileError, match="no 'email' column"):
        _reader(path)


def test_an_empty_list_still_sends_one_frame_naming_the_campaign(tmp_path: Path) -> None:
    path = _csv(tmp_path, "email,name\n\n")
    frames = list(_reader(path).frames())
    assert [(f.campaign, len(f.recipients)) for f in frames] == [("campaigns/c1", 0)]


def test_jsonl_takes_nested_and_flat_variables_and_a_nested_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"email": "a@example.org", "name": "Ann", "variables": {"code": "A1", "vip": true}}\n'
                    '{"email": "b@example.org", "first_name": "Bob", "code": 7, "variables": {"code": "B7"}}\n')
    a, b = next(_reader(path, FileFormat.JSONL).frames()).recipients
    assert dict(a.variables) == {"code": "A1", "vip": "true"}
    assert dict(b.variables) == {"first_name": "Bob", "code": "B7"}


def test_a_jsonl_line_that_is_not_an_object_is_refused_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"email": "a@example.org"}\n\n["b@example.org"]\n{"email": "c@example.org", "tags": [1]}\n')
    reader = _reader(path, FileFormat.JSONL)
    sent = [r.address.email for f in reader.frames() for r in f.recipients]
    assert sent == ["a@example.org"]
    assert [p.row for p in reader.problems] == [3, 4]


def test_a_large_list_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = _csv(tmp_path, "email,first_name,code\n" + "".join(f"recipient{i}@example.org,Name{i},C{i:08d}\n"
                                                              for i in range(100_000)))
    reader = _reader(path)
    tracemalloc.start()
    try:
        frames = sum(1 for _ in reader.frames())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames == 200
    assert path.stat().st_size > 4_000_000
    assert peak < 1_000_000, f"peak {peak} bytes while reading a {path.stat().st_size}-byte list"
