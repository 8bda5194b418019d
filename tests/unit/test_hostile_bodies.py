"""Hostile bodies, from clients and from upstreams: each a clear answer in the caller's
error shape, never a 500 with a critical traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config
from twisted.web.server import NOT_DONE_YET, Request

from relayd.http.bodies import StreamSink


def nested(depth: int) -> bytes:
    head = b'{"model": "claude-x", "max_tokens": 5, "messages": '
    return head + b"[" * depth + b"]" * depth + b"}"


def bad_lines(h: Harness) -> list[Any]:
    return [e for e in h.logs.events
            if getattr(e.get("log_level"), "name", "") in ("critical", "error")]


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_a_deeply_nested_request_is_a_400(harness: Harness, depth: int) -> None:
    """The campaign: about 1,000 levels answered 500 with a critical RecursionError."""
    status, headers, body = harness.call("POST", "/v1/messages", raw=nested(depth))
    assert status == 400
    error = json.loads(body)
    assert "nested too deeply" in error["error"]["message"] and error["request_id"]
    assert headers["x-should-retry"] == ["false"]
    assert not bad_lines(harness)
    assert not harness.upstreams["us"].seen and not harness.upstreams["eu"].seen


def test_a_deep_body_that_must_be_re_encoded_is_a_400_not_a_bug() -> None:
    """Just below the parser's limit, a body parses, but re-encoding it for a renamed or
    translated target may exceed the limit from deeper in the stack."""
    config = base_config(routes=[{"api": "anthropic",
                                  "targets": [{"provider": "anthropic", "model": "other"}]}])
    h = Harness(config)
    try:
        for depth in (900, 950, 985):
            status, _, _ = h.call("POST", "/v1/messages", raw=nested(depth))
            assert status in (200, 400)
        assert not bad_lines(h)
    finally:
        h.close()


def test_a_deeply_nested_upstream_answer_is_relayed_or_refused_cleanly(harness: Harness) -> None:
    deep = b'{"id": "m", "usage": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    def answer(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return deep

    harness.upstreams["us"].handler = harness.upstreams["eu"].handler = answer
    status, _, body = harness.call(
        "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []}
    )
    assert status == 200 and body == deep  # passed through; its usage just is not read
    assert harness.logs.access()[-1]["input_tokens"] is None
    assert not bad_lines(harness)


def test_a_deeply_nested_answer_to_translate_is_a_502() -> None:
    h = Harness(base_config(routes=[{"api": "openai", "provider": "anthropic"}]))
    try:
        def answer(request: Request, body: bytes) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return b'{"type": "message", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}"

        h.upstreams["us"].handler = h.upstreams["eu"].handler = answer
        status, _, body = h.call("POST", "/v1/chat/completions",
                                 {"model": "claude-x", "messages": [
                                     {"role": "user", "content": "hi"}]}, api="openai")
        assert status == 502 and json.loads(body)["error"]["message"]
        assert not bad_lines(h)
    finally:
        h.close()


@pytest.mark.parametrize(
    "path",
    ["/v1/models/..%2F..%2Fadmin", "/v1/models/%2e%2e", "/v1/models/a%2Fb",
     "/v1/models/x%00y", "/v1/models/" + "a" * 300],
)
def test_a_model_id_that_could_climb_the_upstream_path_is_refused(
    harness: Harness, path: str
) -> None:
    """The campaign: ..%2F..%2Fadmin was forwarded verbatim with relayd's key."""
    status, _, body = harness.call("GET", path, api="openai")
    assert status == 400 and "not a model id" in json.loads(body)["error"]["message"]
    assert not harness.upstreams["main"].seen


def test_model_ids_go_upstream_in_their_canonical_form(harness: Harness) -> None:
    for path, sent in [("/v1/models/gpt%2D4o", b"/v1/models/gpt-4o"),
                       ("/v1/models/ft:gpt-4o:org:x:1?x=1", b"/v1/models/ft:gpt-4o:org:x:1?x=1")]:
        harness.call("GET", path, api="openai")
        assert harness.upstreams["main"].seen[-1].path == sent


def test_an_answer_with_thousands_of_headers_is_a_502(harness: Harness) -> None:
    """The campaign: 20,000 upstream headers were relayed to the client."""
    def flood(request: Request, body: bytes) -> bytes:
        for i in range(2000):
            request.setHeader(b"x-flood-%d" % i, b"1")
        request.setHeader(b"content-type", b"application/json")
        return b'{"id": "m"}'

    harness.upstreams["us"].handler = harness.upstreams["eu"].handler = flood
    status, headers, body = harness.call(
        "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []}
    )
    assert status == 502 and "headers" in json.loads(body)["error"]["message"]
    assert not any(name.startswith("x-flood") for name in headers)
    assert sum(b.breaker.failures_in_window for b in harness.runtime.backends) == 2  # both
    assert not bad_lines(harness)


def stream_upstream(*pieces: bytes, finish: bool = False) -> Any:
    def handler(request: Request, body: bytes) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        for piece in pieces:
            request.write(piece)
        if finish:
            request.finish()
        return NOT_DONE_YET

    return handler


START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
BLOCK = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
         b'"content_block":{"type":"text","text":""}}\n\n')
PING = b'event: ping\ndata: {"type":"ping"}\n\n'
STREAM = {"model": "claude-x", "max_tokens": 5, "stream": True, "messages": []}


def one_backend() -> Harness:
    config = base_config(failover={"max_attempts": 1})
    config["providers"][0]["backends"] = config["providers"][0]["backends"][:1]
    return Harness(config)


def test_an_endless_sse_line_fails_the_attempt_with_an_error_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("relayd.sse.MAX_LINE_BYTES", 64 * 1024)
    h = one_backend()
    try:
        h.upstreams["us"].handler = stream_upstream(START, BLOCK, *[b"x" * 8192] * 20)
        status, _, body = h.call("POST", "/v1/messages", STREAM)
        assert status == 200
        # The stream was live: what came before the bound was relayed as it came; the
        # error event starts on a fresh line, after the cut one is closed.
        assert body.startswith(START + BLOCK)
        assert b"x\n\nevent: error\n" in body and b"longer than 65536 bytes" in body
        assert h.logs.access()[-1]["outcome"] == "upstream_bad_body"
        assert h.runtime.backends[0].breaker.failures_in_window == 1
        assert not bad_lines(h)
    finally:
        h.close()


def test_an_endless_line_before_content_is_failed_over() -> None:
    import relayd.sse

    h = Harness()
    try:
        relayd.sse.MAX_LINE_BYTES, saved = 64 * 1024, relayd.sse.MAX_LINE_BYTES
        try:
            h.upstreams["us"].handler = stream_upstream(START, *[b"y" * 8192] * 20)
            h.upstreams["eu"].handler = stream_upstream(
                START, BLOCK, b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
                finish=True,
            )
            status, _, body = h.call("POST", "/v1/messages", STREAM)
        finally:
            relayd.sse.MAX_LINE_BYTES = saved
        assert status == 200 and b"message_stop" in body and b"y" * 10 not in body
        assert h.logs.access()[-1]["attempts"] == 2
    finally:
        h.close()


def test_held_events_are_released_past_their_cap(harness: Harness) -> None:
    """The campaign: 100 MB of pings before any content were held: +126 MB."""
    h = one_backend()
    try:
        pings = PING * (1024 * 1024 // len(PING) + 1)
        h.upstreams["us"].handler = stream_upstream(START, pings)
        answers: list[Any] = []
        h.client.request("POST", "http://relay.test/v1/messages",
                         headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
                         data=json.dumps(STREAM).encode()).addCallback(answers.append)
        h.flush()
        (exchange,) = h.resource.active
        sink = exchange.sink
        assert isinstance(sink, StreamSink)
        assert not sink.holding and not sink.held  # live, nothing kept back
        assert answers and answers[0].code == 200
    finally:
        h.close()
