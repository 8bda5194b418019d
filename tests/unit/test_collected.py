"""Bodies read whole (for usage or rewriting): gzip undone as chunks arrive, size-capped."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable

import pytest
from relay_harness import Harness, base_config
from twisted.web.server import Request

from relayd.http.collected import BadEncodingError, BodyTooLargeError, CollectedBody

MIB = 1024 * 1024


def bomb(decoded_mib: int) -> bytes:
    """gzip of ``decoded_mib`` MiB of zeros: about a thousandth of that on the wire."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(MIB)
    return b"".join(z.compress(block) for _ in range(decoded_mib)) + z.flush()


def chunks(data: bytes, size: int = 16 * 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_gzip_is_undone_chunk_by_chunk() -> None:
    text = json.dumps({"usage": {"input_tokens": 3}, "pad": "x" * 100_000}).encode()
    body = CollectedBody(MIB, gzipped=True)
    for chunk in chunks(gzip.compress(text), 7):
        body.feed(chunk)
    assert body.value() == text


def test_a_gzip_bomb_stops_at_the_limit_without_inflating_it() -> None:
    data = bomb(64)
    assert len(data) < 100 * 1024
    body = CollectedBody(4 * MIB, gzipped=True)
    with pytest.raises(BodyTooLargeError):
        for chunk in chunks(data):
            body.feed(chunk)
    assert body.size <= 4 * MIB + 1  # never more than one byte past the cap was produced


def test_plain_bodies_are_capped_too() -> None:
    body = CollectedBody(10, gzipped=False)
    body.feed(b"0123456789")
    with pytest.raises(BodyTooLargeError):
        body.feed(b"x")


def test_corrupt_and_cut_gzip_are_bad_encodings() -> None:
    with pytest.raises(BadEncodingError):
        CollectedBody(MIB, gzipped=True).feed(b"not gzip at all")
    cut = CollectedBody(MIB, gzipped=True)
    cut.feed(gzip.compress(b"{}" * 1000)[:-12])
    with pytest.raises(BadEncodingError):
        cut.value()


def gzip_reply(
    payload: bytes, content_type: bytes = b"application/json"
) -> Callable[[Request, bytes], bytes]:
    def handler(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-encoding", b"gzip")
        return payload

    return handler


def test_a_gzip_bomb_to_be_translated_is_a_502_in_the_callers_shape() -> None:
    config = base_config()
    config["routes"] = [{"api": "openai", "provider": "anthropic"}]  # OpenAI client, Claude
    h = Harness(config)
    try:
        h.upstreams["us"].handler = h.upstreams["eu"].handler = gzip_reply(bomb(70))
        status, _, body = h.call(
            "POST", "/v1/chat/completions",
            {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}, api="openai",
        )
        assert status == 502
        error = json.loads(body)["error"]
        assert "larger than 67108864 bytes (decoded)" in error["message"]
        assert h.logs.access()[-1]["outcome"] == "upstream_bad_body"
    finally:
        h.close()


def test_a_gzip_bomb_passed_through_is_relayed_without_reading_its_usage() -> None:
    h = Harness()
    try:
        data = bomb(8)
        h.upstreams["main"].handler = gzip_reply(data)
        status, _, body = h.call(
            "POST", "/v1/chat/completions",
            {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}, api="openai",
        )
        # The client gets the upstream's answer (treq's client undoes the gzip itself).
        assert status == 200 and body == bytes(8 * MIB)
        line = h.logs.access()[-1]
        assert (line["outcome"], line["input_tokens"]) == ("ok", None)
    finally:
        h.close()
