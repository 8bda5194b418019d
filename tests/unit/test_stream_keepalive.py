"""SSE keepalive comments during upstream silence, so proxies in front do not cut long
pauses (thinking, tool work) as idle connections."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config
from twisted.web.server import NOT_DONE_YET, Request

from relayd.sse import SseParser

START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
BLOCK = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
         b'"content_block":{"type":"text","text":""}}\n\n')
DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"hi"}}\n\n')
END = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
       b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
       b'"end_turn"},"usage":{"output_tokens":1}}\n\n'
       b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
KEEPALIVE = b": keepalive\n\n"
STREAM = {"model": "claude-x", "max_tokens": 5, "stream": True, "messages": []}


@dataclass
class Upstream:
    """An SSE upstream the test writes to by hand."""

    requests: list[Request] = field(default_factory=list)

    def __call__(self, request: Request, body: bytes) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        self.requests.append(request)
        return NOT_DONE_YET

    def send(self, h: Harness, data: bytes, finish: bool = False) -> None:
        self.requests[-1].write(data)
        if finish:
            self.requests[-1].finish()
        h.flush()


@dataclass
class Client:
    chunks: list[bytes] = field(default_factory=list)
    done: list[Any] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def open_stream(h: Harness, upstream: Upstream, first: bytes, **extra: Any) -> Client:
    d = h.client.request(
        "POST", "http://relay.test/v1/messages",
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
        data=json.dumps({**STREAM, **extra}).encode(),
    )
    h.flush()
    upstream.send(h, first)
    client = Client()

    def collect(response: Any) -> None:
        h.client.collect(response, client.chunks.append).addBoth(client.done.append)

    d.addCallback(collect)
    h.flush()
    return client


def harness(**top: Any) -> tuple[Harness, Upstream]:
    config = base_config(**top)
    config["providers"][0]["backends"] = config["providers"][0]["backends"][:1]
    h = Harness(config)
    upstream = Upstream()
    h.upstreams["us"].handler = upstream
    return h, upstream


def events_of(body: bytes) -> list[bytes | None]:
    return [event.event for event in SseParser().feed(body)]


def test_a_silent_stream_gets_a_comment_every_interval() -> None:
    h, upstream = harness()
    try:
        client = open_stream(h, upstream, START + BLOCK)
        assert client.body == START + BLOCK  # content started: the stream is live
        h.clock.advance(14.9)
        h.flush()
        assert KEEPALIVE not in client.body
        h.clock.advance(0.1)
        h.flush()
        assert client.body.endswith(BLOCK + KEEPALIVE)
        h.clock.advance(15)
        h.flush()
        assert client.body.count(KEEPALIVE) == 2
        upstream.send(h, DELTA)
        h.clock.advance(10)  # data 10 s ago: the next comment waits for 15 s of silence
        h.flush()
        assert client.body.count(KEEPALIVE) == 2
        h.clock.advance(5)
        h.flush()
        assert client.body.count(KEEPALIVE) == 3
        upstream.send(h, END, finish=True)
        assert client.done
        # Comments are not events: the client's parser sees exactly the upstream's.
        assert events_of(client.body) == events_of(START + BLOCK + DELTA + END)
        assert h.logs.access()[-1]["outcome"] == "ok"
        assert not h.clock.getDelayedCalls()  # nothing left running
    finally:
        h.close()


def test_a_stream_held_for_failover_is_released_by_a_long_pause() -> None:
    h, upstream = harness()
    try:
        client = open_stream(h, upstream, START)
        assert client.body == b""  # held: only the preamble so far
        h.clock.advance(15)
        h.flush()
        assert client.body == START + KEEPALIVE
        upstream.send(h, BLOCK + DELTA + END, finish=True)
        assert events_of(client.body) == events_of(START + BLOCK + DELTA + END)
    finally:
        h.close()


def test_no_comment_goes_inside_an_event() -> None:
    h, upstream = harness()
    try:
        client = open_stream(h, upstream, START + BLOCK + DELTA[:30])
        h.clock.advance(15)
        h.flush()
        assert KEEPALIVE not in client.body  # mid-event: this tick is skipped
        upstream.send(h, DELTA[30:])
        h.clock.advance(15)
        h.flush()
        assert client.body.endswith(DELTA + KEEPALIVE)
    finally:
        h.close()


@pytest.mark.parametrize("keepalive", [0, 0.0])
def test_zero_turns_it_off(keepalive: float) -> None:
    h, upstream = harness(stream_keepalive=keepalive)
    try:
        client = open_stream(h, upstream, START + BLOCK)
        h.clock.advance(100)
        h.flush()
        assert KEEPALIVE not in client.body
    finally:
        h.close()


def test_translated_streams_get_comments_between_translated_chunks() -> None:
    config = base_config(routes=[{"api": "openai", "provider": "anthropic"}])
    config["providers"][0]["backends"] = config["providers"][0]["backends"][:1]
    h = Harness(config)
    upstream = Upstream()
    h.upstreams["us"].handler = upstream
    try:
        d = h.client.request(
            "POST", "http://relay.test/v1/chat/completions",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
            data=json.dumps({"model": "claude-x", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}).encode(),
        )
        h.flush()
        upstream.send(h, START + BLOCK + DELTA)
        client = Client()
        d.addCallback(lambda r: h.client.collect(r, client.chunks.append))
        h.flush()
        h.clock.advance(15)
        h.flush()
        assert client.body.endswith(b"\n\n" + KEEPALIVE)
        upstream.send(h, END, finish=True)
        body = client.body
        assert body.endswith(b"data: [DONE]\n\n")
        chunks = [e.data for e in SseParser().feed(body)]
        assert chunks[-1] == b"[DONE]" and len(chunks) > 2  # role, text, ..., [DONE]
        assert all(json.loads(c)["object"] == "chat.completion.chunk" for c in chunks[:-1])
    finally:
        h.close()
