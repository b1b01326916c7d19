"""JSON nested too deeply is a bad request (400, INVALID_ARGUMENT, the limit named), never a gateway failure: a
request body, a streamed NDJSON frame and a sniffed recipients line alike. Up to MAX_JSON_DEPTH levels are read."""

import json

from services.gateway.json_depth import MAX_JSON_DEPTH

THOUSANDS_DEEP = 100_000


def nested_lists(depth: int) -> str:
    """``depth`` arrays, each inside the one before."""
    return "[" * depth + "]" * depth


def object_of_depth(depth: int, **fields: object) -> str:
    """A JSON object with ``fields`` and an unknown field ``extra``, ``depth`` levels deep in all (the object itself
    is the first level)."""
    known = "".join(f", {json.dumps(name)}: {json.dumps(value)}" for name, value in fields.items())
    return f'{{"extra": {nested_lists(depth - 1)}{known}}}'


def assert_refused_as_too_deep(response) -> None:
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 3
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in body["message"]


async def test_a_body_of_arrays_nested_thousands_deep_is_a_400_naming_the_limit(esp_client):
    response = await esp_client.post("/v1/messages:send", content=nested_lists(THOUSANDS_DEEP))

    assert_refused_as_too_deep(response)


async def test_a_body_of_objects_nested_thousands_deep_is_a_400_naming_the_limit(esp_client):
    body = '{"subject":' * THOUSANDS_DEEP + '"x"' + "}" * THOUSANDS_DEEP

    response = await esp_client.post("/v1/messages:send", content=body)

    assert_refused_as_too_deep(response)


async def test_a_body_one_level_past_the_limit_is_refused(echo_client):
    response = await echo_client.post("/v1/things/t-1:replace", content=object_of_depth(MAX_JSON_DEPTH + 1))

    assert_refused_as_too_deep(response)


async def test_a_body_exactly_at_the_limit_is_read(echo_client):
    response = await echo_client.post("/v1/things/t-1:replace", content=object_of_depth(MAX_JSON_DEPTH, flag=True))

    assert response.status_code == 200
    assert response.json()["flag"] is True


async def test_a_streamed_frame_nested_thousands_deep_is_a_400(esp_client):
    body = b'{"metadata": {"filename": "a.bin"}}\n' + nested_lists(THOUSANDS_DEEP).encode() + b"\n"

    response = await esp_client.post("/v1/attachments", content=body)

    assert_refused_as_too_deep(response)


async def test_recipients_frames_nested_thousands_deep_are_a_400(esp_client):
    # A body without a file type is sniffed (is its first line a request frame?) and then read as NDJSON frames.
    response = await esp_client.post("/v1/campaigns/c-7:addRecipients", content=nested_lists(30_000) + "\n")

    assert_refused_as_too_deep(response)


async def test_a_json_lines_row_nested_thousands_deep_is_a_refused_row_of_an_accepted_file(esp_client):
    response = await esp_client.post("/v1/campaigns/c-7:addRecipients", content=nested_lists(30_000) + "\n",
                                     headers={"content-type": "application/jsonl"})

    assert response.status_code == 200
    assert response.json()["rejectedCount"] == "1"
    assert response.json()["errors"][0]["reason"].startswith("MALFORMED_JSON")
