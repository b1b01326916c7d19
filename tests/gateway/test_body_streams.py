"""Reading bodies as they stream: records (NDJSON lines, CSV records) and multipart/form-data parts, whatever the
chunk boundaries."""

import random

import pytest

from services.gateway.body_streams import (
    MultipartReader,
    Oversize,
    RecordSplitter,
    Unterminated,
    ndjson_lines,
    records,
)
from services.gateway.errors import GatewayError

CSV = (
    b'email,name,note\r\n'
    b'a@example.com,"Ada, Countess","said ""hi""\nthen left"\r\n'
    b'\r\n'
    b'b@example.com,Bob,"a ""quoted"" word"\n'
    b'c@example.com,C\xc3\xa9"cile,plain\n'
    b'd@example.com,"",""'
)


async def chunked(data: bytes, cuts: list[int]):
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        yield data[previous:cut]
        previous = cut


async def all_records(data: bytes, cuts: list[int], *, limit: int = 1024, csv_quotes: bool = True,
                      strip_bom: bool = False):
    splitter = RecordSplitter(limit, csv_quotes=csv_quotes)
    return [record async for record in records(chunked(data, cuts), splitter, strip_bom=strip_bom)]


async def test_csv_records_end_at_newlines_outside_quoted_fields():
    assert await all_records(CSV, []) == [
        b"email,name,note\r",
        b'a@example.com,"Ada, Countess","said ""hi""\nthen left"\r',
        b"\r",
        b'b@example.com,Bob,"a ""quoted"" word"',
        b'c@example.com,C\xc3\xa9"cile,plain',  # a quote inside an unquoted field is literal
        b'd@example.com,"",""',
    ]


async def test_every_split_of_the_body_gives_the_same_records():
    whole = await all_records(CSV, [])
    for cut in range(len(CSV) + 1):
        assert await all_records(CSV, [cut]) == whole, cut
    generator = random.Random(7)
    for _ in range(200):
        cuts = generator.sample(range(len(CSV) + 1), generator.randint(2, 12))
        assert await all_records(CSV, cuts) == whole, cuts


async def test_a_byte_order_mark_is_dropped_even_when_split():
    body = b"\xef\xbb\xbfemail\na@example.com\n"
    for cut in range(5):
        assert await all_records(body, [cut], strip_bom=True) == [b"email", b"a@example.com"]


async def test_a_record_over_the_limit_is_reported_with_its_size_and_the_next_one_is_whole():
    body = b"short\n" + b"x" * 5000 + b"\nnext\n"

    found = await all_records(body, list(range(0, len(body), 64)), limit=100)

    assert found == [b"short", Oversize(5000), b"next"]


async def test_a_quote_left_open_at_the_end_is_an_unterminated_record():
    assert await all_records(b'email\n"a@example.com,x\n', []) == [b"email", Unterminated()]


async def test_without_csv_quotes_only_newlines_end_records():
    assert await all_records(b'{"a": "x\\"\n"}\n{}', [], csv_quotes=False) == [b'{"a": "x\\"', b'"}', b"{}"]


async def test_an_ndjson_line_over_the_limit_is_refused_before_the_body_ends():
    read = []

    async def endless():
        for _ in range(1000):
            read.append(1)
            yield b"x" * 1024

    with pytest.raises(GatewayError, match="exceeds 4096 bytes"):
        async for _ in ndjson_lines(endless(), 4096):
            pass
    assert len(read) < 10


FORM = (
    b"preamble\r\n"
    b"--+++\r\n"
    b'Content-Disposition: form-data; name="sha256"\r\n'
    b"\r\n"
    b"abc\r\n"
    b"--+++\r\n"
    b'Content-Disposition: form-data; name="file"; filename="list.csv"\r\n'
    b"Content-Type: text/csv\r\n"
    b"\r\n"
    b"email\r\n--+ not a boundary\r\na@example.com\r\n"
    b"--+++--\r\n"
    b"epilogue"
)


async def parts_of(body: bytes, cuts: list[int], content_type: str = "multipart/form-data; boundary=+++"):
    reader = MultipartReader(chunked(body, cuts), content_type)
    found = []
    while (part := await reader.next_part()) is not None:
        found.append((part.name, part.filename, part.content_type, b"".join([c async for c in part.chunks])))
    return found


async def test_multipart_parts_come_with_their_headers_and_content_whatever_the_split():
    expected = [
        ("sha256", None, "", b"abc"),
        ("file", "list.csv", "text/csv", b"email\r\n--+ not a boundary\r\na@example.com"),  # CRLF + boundary ends it
    ]
    assert await parts_of(FORM, []) == expected
    for cut in range(len(FORM) + 1):
        assert await parts_of(FORM, [cut]) == expected, cut


async def test_a_part_left_unread_is_skipped_by_the_next():
    reader = MultipartReader(chunked(FORM, [30, 90]), "multipart/form-data; boundary=+++")
    first = await reader.next_part()
    second = await reader.next_part()

    assert first is not None and second is not None
    assert second.filename == "list.csv"
    assert await reader.next_part() is None


async def test_a_multipart_body_without_its_closing_boundary_is_refused():
    truncated = FORM[: FORM.index(b"--+++--")]

    with pytest.raises(GatewayError, match="ends before its closing boundary"):
        await parts_of(truncated, [])


async def test_a_multipart_content_type_without_a_boundary_is_refused():
    with pytest.raises(GatewayError, match="boundary"):
        MultipartReader(chunked(FORM, []), "multipart/form-data")
