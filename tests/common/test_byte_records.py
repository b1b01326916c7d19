"""A byte stream cut into records (NDJSON and JSON Lines lines, CSV records), whatever the chunk boundaries: what the
campaigns service's import, the gateway's bodies and the CLI's files are read through."""

import random
from itertools import pairwise

from libs.common.byte_records import Oversize, RecordSplitter, Unterminated, records, split_records

CSV = (
    b'email,name,note\r\n'
    b'a@example.com,"Ada, Countess","said ""hi""\nthen left"\r\n'
    b'\r\n'
    b'b@example.com,Bob,"a ""quoted"" word"\n'
    b'c@example.com,C\xc3\xa9"cile,plain\n'
    b'd@example.com,"",""'
)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in pairwise(bounds)]


async def chunked(data: bytes, cuts: list[int]):
    for piece in pieces(data, cuts):
        yield piece


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


async def test_a_stream_shorter_than_a_byte_order_mark_that_starts_like_one_is_a_record():
    assert await all_records(b"\xef\xbb", [1], strip_bom=True) == [b"\xef\xbb"]
    assert await all_records(b"", [], strip_bom=True) == []


async def test_a_byte_order_mark_is_kept_unless_asked_to_drop_it():
    assert await all_records(b"\xef\xbb\xbfemail\n", [1]) == [b"\xef\xbb\xbfemail"]


async def test_a_doubled_quote_split_between_chunks_stays_inside_its_field():
    body = b'email,note\na@example.com,"say ""\n"" twice"\nb@example.com,x\n'
    split = body.index(b'""') + 1
    assert await all_records(body, [split]) == [b"email,note", b'a@example.com,"say ""\n"" twice"',
                                                b"b@example.com,x"]


async def test_a_file_read_in_pieces_gives_the_records_of_the_stream():
    for cut in range(len(CSV) + 1):
        splitter = RecordSplitter(1024, csv_quotes=True)
        assert list(split_records(pieces(CSV, [cut]), splitter)) == await all_records(CSV, [cut]), cut


def test_the_record_in_progress_is_counted_past_the_limit_without_being_kept():
    splitter = RecordSplitter(10)
    assert splitter.feed(b"x" * 25) == []
    assert splitter.pending_bytes == 25
    assert splitter.feed(b"\nok\n") == [Oversize(25), b"ok"]
    assert splitter.pending_bytes == 0
