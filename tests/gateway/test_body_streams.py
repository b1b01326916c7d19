"""Reading bodies as they stream: NDJSON lines and multipart/form-data parts, whatever the chunk boundaries (records
themselves are cut by ``libs.common.byte_records``: tests/common/test_byte_records.py)."""

import pytest

from services.gateway.body_streams import MultipartReader, ndjson_lines
from services.gateway.errors import GatewayError


async def chunked(data: bytes, cuts: list[int]):
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        yield data[previous:cut]
        previous = cut


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
