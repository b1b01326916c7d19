"""Client-streaming RPCs: a newline-delimited JSON body streamed to the upstream frame by frame."""

import asyncio
import base64
import hashlib
import json
import os

CHUNK = 1024 * 1024


def ndjson(*frames: dict) -> bytes:
    return b"".join(json.dumps(frame).encode() + b"\n" for frame in frames)


def chunk_frame(data: bytes) -> bytes:
    return ndjson({"chunk": base64.b64encode(data).decode()})


async def test_an_ndjson_upload_of_several_megabytes_reaches_the_upstream_intact(esp_client, recorder):
    content = os.urandom(4 * CHUNK + 12_345)
    frames = [ndjson({"metadata": {"filename": "report.pdf", "contentType": "application/pdf"}})]
    frames += [chunk_frame(content[offset : offset + CHUNK]) for offset in range(0, len(content), CHUNK)]

    response = await esp_client.post("/v1/attachments", content=b"".join(frames))

    assert response.status_code == 200
    assert response.json() == {
        "name": "attachments/a-1",
        "id": "a-1",
        "filename": "report.pdf",
        "contentType": "application/pdf",
        "sizeBytes": str(len(content)),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    assert recorder.requests["UploadAttachment"].filename == "report.pdf"


async def test_frames_are_forwarded_before_the_body_has_finished_arriving(esp_client, recorder):
    recorder.first_upload_frame.clear()
    content = os.urandom(CHUNK)

    async def body():
        yield ndjson({"metadata": {"filename": "a.bin"}})
        # A gateway that buffered the whole body would never let the upstream see this first frame.
        await asyncio.wait_for(recorder.first_upload_frame.wait(), timeout=10)
        yield chunk_frame(content)

    response = await esp_client.post("/v1/attachments", content=body())

    assert response.status_code == 200
    assert response.json()["sizeBytes"] == str(CHUNK)


async def test_frames_split_across_body_chunks_are_reassembled(esp_client):
    payload = ndjson({"metadata": {"filename": "split.txt"}}) + chunk_frame(b"hello world")

    async def body():
        for offset in range(0, len(payload), 7):
            yield payload[offset : offset + 7]

    response = await esp_client.post("/v1/attachments", content=body())

    assert response.json()["sizeBytes"] == "11"
    assert response.json()["sha256"] == hashlib.sha256(b"hello world").hexdigest()


async def test_path_variables_are_set_on_the_first_frame(esp_client, recorder):
    body = ndjson(
        {"recipients": [{"address": {"email": "a@example.com"}, "variables": {"name": "A"}}]},
        {"recipients": [{"address": {"email": "b@example.com"}}, {"address": {"email": "c@example.com"}}]},
    )

    response = await esp_client.post("/v1/campaigns/c-7:addRecipients", content=body)

    assert response.status_code == 200
    assert response.json() == {"addedCount": "3"}
    frames = recorder.requests["AddCampaignRecipients"]
    assert [frame.campaign for frame in frames] == ["campaigns/c-7", ""]
    assert frames[0].recipients[0].variables["name"] == "A"


async def test_a_malformed_frame_is_invalid_argument(esp_client):
    body = ndjson({"metadata": {"filename": "a.bin"}}) + b"{broken\n"

    response = await esp_client.post("/v1/attachments", content=body)

    assert response.status_code == 400
    assert response.json()["code"] == 3


async def test_an_upstream_refusal_mid_stream_is_reported_with_its_status(esp_client):
    body = chunk_frame(b"no metadata first") + chunk_frame(b"more")

    response = await esp_client.post("/v1/attachments", content=body)

    assert response.status_code == 400
    assert response.json() == {"code": 3, "message": "the first frame must carry metadata"}
