"""The relay path in memory: auth, hygiene, routing, errors, streams and timeouts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import (
    CLIENT_KEY,
    OTHER_KEY,
    Harness,
    base_config,
    hang,
    json_reply,
)
from twisted.logger import eventAsText
from twisted.web.server import NOT_DONE_YET, Request

from relayd.routing import Router

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16,
           "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def test_anthropic_request_gets_backend_key_and_loses_client_key(harness: Harness) -> None:
    """The upstream sees the backend's x-api-key; the relay key appears nowhere."""
    status, headers, body = harness.call(
        "POST", "/v1/messages", MESSAGE,
        headers={"anthropic-beta": "tools-2024", "authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert status == 200
    assert json.loads(body)["usage"] == {"input_tokens": 3, "output_tokens": 4}
    assert headers["x-relayd-request-id"][0].startswith("req_")
    assert headers["content-length"] == [str(len(body))]
    seen = harness.upstreams["us"].seen[0]
    assert seen.headers[b"x-api-key"] == [b"sk-up-us"]
    assert b"authorization" not in seen.headers
    assert seen.headers[b"anthropic-beta"] == [b"tools-2024"]
    assert seen.path == b"/v1/messages"
    assert json.loads(seen.body) == MESSAGE
    flat = repr(seen.headers).encode()
    assert CLIENT_KEY.encode() not in flat


def test_openai_request_gets_bearer_and_hygiene(harness: Harness) -> None:
    """Bearer injected; Origin, Cookie, hop-by-hop and Connection-named headers dropped."""
    status, _, _ = harness.call(
        "POST", "/v1/chat/completions?x=1", CHAT, api="openai",
        headers={
            "origin": "https://evil.example",
            "cookie": "a=b",
            "connection": "x-secret-hop",
            "x-secret-hop": "1",
            "keep-alive": "timeout=5",
            "openai-organization": "org-1",
            "x-stainless-lang": "python",
            "x-api-key": CLIENT_KEY,
        },
    )
    assert status == 200
    seen = harness.upstreams["main"].seen[0]
    assert seen.headers[b"authorization"] == [b"Bearer sk-up-oai"]
    assert seen.path == b"/v1/chat/completions?x=1"
    for dropped in (b"origin", b"cookie", b"x-secret-hop", b"keep-alive", b"x-api-key"):
        assert dropped not in seen.headers, dropped
    assert b"openai-organization" not in seen.headers  # the client cannot pick the org
    assert seen.headers[b"x-stainless-lang"] == [b"python"]


def test_backend_url_prefix_is_kept(harness: Harness) -> None:
    for _ in range(4):
        harness.call("POST", "/v1/messages", MESSAGE)
    assert [r.path for r in harness.upstreams["eu"].seen] == [b"/prefix/v1/messages"]


def test_weights_three_to_one_are_exact(harness: Harness) -> None:
    """Smooth weighted round-robin: 3:1 over every window of four requests."""
    order = []
    for _ in range(8):
        before = len(harness.upstreams["us"].seen)
        harness.call("POST", "/v1/messages", MESSAGE)
        order.append("us" if len(harness.upstreams["us"].seen) > before else "eu")
    assert order[:4].count("us") == 3 and order[4:].count("us") == 3
    assert order == ["us", "us", "eu", "us"] * 2


@pytest.mark.parametrize(
    ("api", "key", "status", "expected_type"),
    [
        ("anthropic", None, 401, "authentication_error"),
        ("anthropic", "sk-wrong", 401, "authentication_error"),
        ("openai", None, 401, "invalid_request_error"),
        ("openai", "sk-wrong", 401, "invalid_request_error"),
    ],
)
def test_bad_keys_are_rejected_in_the_callers_shape(
    harness: Harness, api: str, key: str | None, status: int, expected_type: str
) -> None:
    path, body = ("/v1/messages", MESSAGE) if api == "anthropic" else ("/v1/chat/completions", CHAT)
    got, headers, raw = harness.call("POST", path, body, key=key, api=api)
    assert got == status
    payload = json.loads(raw)
    request_id = headers["x-relayd-request-id"][0]
    if api == "anthropic":
        assert payload["type"] == "error"
        assert payload["error"]["type"] == expected_type
        assert payload["request_id"] == request_id
    else:
        assert payload["error"]["type"] == expected_type
        assert request_id in payload["error"]["message"]
    assert not harness.upstreams["us"].seen and not harness.upstreams["main"].seen


def test_model_outside_allowlist_is_403(harness: Harness) -> None:
    status, _, raw = harness.call(
        "POST", "/v1/chat/completions", CHAT, key=OTHER_KEY, api="openai"
    )
    assert status == 403
    assert "gpt-4o" in json.loads(raw)["error"]["message"]
    status, _, _ = harness.call("POST", "/v1/messages", MESSAGE, key=OTHER_KEY)
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "fragment"),
    [
        ("POST", "/v1/messages", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/messages", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/messages", b'{"max_tokens": 3}', 400, "model"),
        ("POST", "/v1/messages", b'{"model": 7}', 400, "model"),
        ("POST", "/v1/nope", b"{}", 404, "no such endpoint"),
        ("GET", "/v1/messages", b"", 405, "not allowed"),
        ("POST", "/v1/messages", b'{"model": "llama-3"}', 404, "no route"),
    ],
)
def test_bad_requests_get_clear_errors(
    harness: Harness, method: str, path: str, raw: bytes, status: int, fragment: str
) -> None:
    got, headers, body = harness.call(method, path, raw=raw)
    assert got == status
    payload = json.loads(body)
    assert payload["type"] == "error"
    assert fragment in payload["error"]["message"]
    assert headers["content-type"] == ["application/json"]
    # ...and the relay keeps serving.
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_405_names_allowed_methods(harness: Harness) -> None:
    status, headers, _ = harness.call("GET", "/v1/chat/completions", api="openai")
    assert status == 405
    assert headers["allow"] == ["POST"]


def test_body_over_limit_is_413() -> None:
    h = Harness(base_config(max_body_bytes=1000))
    try:
        big = dict(MESSAGE, pad="x" * 2000)
        status, _, body = h.call("POST", "/v1/messages", big)
        assert status == 413
        assert json.loads(body)["error"]["type"] == "request_too_large"
        assert not h.upstreams["us"].seen
    finally:
        h.close()


def test_upstream_status_and_error_body_pass_through(harness: Harness) -> None:
    def overloaded(request: Request, body: bytes) -> bytes:
        request.setHeader(b"retry-after", b"7")
        request.setHeader(b"set-cookie", b"track=1")
        return json_reply(request, {"type": "error", "error": {"type": "overloaded_error",
                                                               "message": "Overloaded"}}, 529)

    harness.upstreams["us"].handler = overloaded
    harness.upstreams["eu"].handler = overloaded
    status, headers, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 529
    assert headers["retry-after"] == ["7"]
    assert headers["x-should-retry"] == ["false"]  # relayd already tried both backends
    assert headers["x-relayd-attempts"] == ["2"]
    assert "set-cookie" not in headers
    assert json.loads(body)["error"]["type"] == "overloaded_error"
    assert harness.logs.access()[-1]["attempts"] == 2


def sse(request: Request, events: list[bytes], finish: bool = True) -> Any:
    request.setHeader(b"content-type", b"text/event-stream")
    for event in events:
        request.write(event)
    if finish:
        request.finish()
    return NOT_DONE_YET


ANTHROPIC_EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
    b'{"input_tokens":11,"cache_read_input_tokens":5,"output_tokens":1}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hi"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":9}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


def test_stream_is_relayed_and_usage_read(harness: Harness) -> None:
    harness.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS)
    status, headers, body = harness.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    assert body == b"".join(ANTHROPIC_EVENTS)
    assert headers["x-accel-buffering"] == ["no"]
    assert headers["cache-control"] == ["no-cache"]
    assert harness.upstreams["us"].seen[0].headers[b"accept-encoding"] == [b"identity"]
    line = harness.logs.access()[-1]
    assert (line["input_tokens"], line["output_tokens"], line["cache_read_tokens"]) == (11, 9, 5)
    assert line["stream"] is True and line["outcome"] == "ok"


def test_truncated_stream_ends_with_error_event(harness: Harness) -> None:
    """An upstream that ends cleanly but before message_stop is not a success."""
    harness.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS[:2])
    status, _, body = harness.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    assert body.startswith(b"".join(ANTHROPIC_EVENTS[:2]))
    tail = body[len(b"".join(ANTHROPIC_EVENTS[:2])):]
    assert tail.startswith(b"event: error\ndata: ")
    assert json.loads(tail.split(b"data: ", 1)[1])["error"]["type"] == "api_error"
    assert harness.logs.access()[-1]["outcome"] == "upstream_truncated"


def test_openai_truncated_stream_ends_with_error_chunk(harness: Harness) -> None:
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    harness.upstreams["main"].handler = lambda r, b: sse(r, [chunk])
    status, _, body = harness.call(
        "POST", "/v1/chat/completions", dict(CHAT, stream=True), api="openai"
    )
    assert status == 200
    tail = body[len(chunk):]
    assert tail.startswith(b"data: ")
    assert "error" in json.loads(tail[len(b"data: "):])


def test_first_byte_timeout_fails_over_then_gives_504(harness: Harness) -> None:
    """A hanging backend times out and the request moves on; when all hang, 504."""
    harness.upstreams["us"].handler = hang
    harness.upstreams["eu"].handler = hang
    d = harness.client.request(
        "POST", "http://relay.test/v1/messages",
        headers={"x-api-key": CLIENT_KEY}, data=json.dumps(MESSAGE).encode(),
    )
    harness.client.flush()
    results: list[Any] = []
    d.addBoth(results.append)
    assert not results
    harness.clock.advance(599)
    harness.client.flush()
    assert not results
    harness.clock.advance(2)
    harness.client.flush()
    assert not results  # the second backend got the request
    assert len(harness.upstreams["eu"].seen) == 1
    harness.clock.advance(601)
    harness.client.flush()
    assert results and results[0].code == 504
    assert results[0].headers.getRawHeaders(b"x-should-retry") == [b"false"]
    line = harness.logs.access()[-1]
    assert (line["outcome"], line["attempts"]) == ("upstream_timeout", 2)
    assert [b.in_flight for b in harness.runtime.backends] == [0, 0, 0]


def test_idle_timeout_mid_stream_ends_with_error_event(harness: Harness) -> None:
    harness.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS[:2], finish=False)
    d = harness.client.request(
        "POST", "http://relay.test/v1/messages",
        headers={"x-api-key": CLIENT_KEY}, data=json.dumps(dict(MESSAGE, stream=True)).encode(),
    )
    harness.client.flush()
    responses: list[Any] = []
    d.addCallback(responses.append)
    harness.client.flush()
    assert responses and responses[0].code == 200
    chunks: list[bytes] = []
    done: list[Any] = []
    harness.client.collect(responses[0], chunks.append).addBoth(done.append)
    harness.client.flush()
    assert b"".join(chunks) == b"".join(ANTHROPIC_EVENTS[:2])
    harness.clock.advance(301)
    harness.client.flush()
    assert done
    assert b"event: error" in b"".join(chunks)
    assert harness.logs.access()[-1]["outcome"] == "timeout_idle"


def test_gzip_json_usage_is_read(harness: Harness) -> None:
    import gzip

    def gz(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-encoding", b"gzip")
        return gzip.compress(json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                                   "prompt_tokens_details":
                                                   {"cached_tokens": 4}}}).encode())

    harness.upstreams["main"].handler = gz
    status, _, _ = harness.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 200
    line = harness.logs.access()[-1]
    assert (line["input_tokens"], line["cache_read_tokens"], line["output_tokens"]) == (6, 4, 2)


def test_model_list_is_filtered_for_the_client(harness: Harness) -> None:
    def models(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"data": [{"id": "claude-sonnet-4-5"}, {"id": "claude-opus"},
                                             {"id": "other-model"}], "has_more": False})

    for name in ("us", "eu"):
        harness.upstreams[name].handler = models
    status, _, body = harness.call("GET", "/v1/models", key=OTHER_KEY)
    assert status == 200
    payload = json.loads(body)
    assert [m["id"] for m in payload["data"]] == ["claude-sonnet-4-5", "claude-opus"]
    assert payload["first_id"] == "claude-sonnet-4-5" and payload["has_more"] is False


def test_openai_model_list_shape(harness: Harness) -> None:
    harness.upstreams["main"].handler = lambda r, b: json_reply(
        r, {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    )
    status, _, body = harness.call("GET", "/v1/models", api="openai", key=OTHER_KEY)
    assert status == 200
    assert json.loads(body) == {"object": "list", "data": []}
    status, _, body = harness.call("GET", "/v1/models", api="openai")
    assert [m["id"] for m in json.loads(body)["data"]] == ["gpt-4o"]


def test_unexpected_exception_becomes_500_and_relay_keeps_serving(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Router, api: str, model: str | None) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(Router, "route", broken)
    status, _, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 500
    assert json.loads(body)["error"]["type"] == "api_error"
    assert any(e.get("log_failure") for e in harness.logs.events)
    monkeypatch.undo()
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_access_log_never_contains_secrets(harness: Harness) -> None:
    _, accepted, _ = harness.call("POST", "/v1/messages", MESSAGE)
    _, refused, _ = harness.call("POST", "/v1/messages", MESSAGE, key="sk-not-a-client")
    request_ids = [accepted["x-relayd-request-id"][0], refused["x-relayd-request-id"][0]]
    # First: the access lines were captured, one per request, as they are written out.
    lines = [
        eventAsText(event, includeTimestamp=False)
        for event in harness.logs.events
        if "access" in event
    ]
    assert len(lines) == 2
    for line, request_id in zip(lines, request_ids, strict=True):
        assert f"request_id={request_id}" in line
    # Then: no key, neither in those lines nor anywhere in what was logged.
    text = "\n".join(lines) + repr(harness.logs.events)
    for secret in (CLIENT_KEY, "sk-not-a-client", "sk-up-us", "sk-up-eu"):
        assert secret not in text


def test_usage_is_recorded_per_client_model_and_backend(harness: Harness) -> None:
    harness.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS)
    harness.call("POST", "/v1/messages", dict(MESSAGE, stream=True))  # us: 11 in, 9 out
    harness.upstreams["us"].handler = None
    harness.call("POST", "/v1/messages", MESSAGE)  # us again (3:1), the default: 3 in, 4 out
    harness.call("POST", "/v1/messages", MESSAGE)  # eu: 3 in, 4 out
    harness.call("POST", "/v1/messages", MESSAGE, key="sk-wrong")  # rejected: not counted
    entries = harness.runtime.store.ledger.snapshot()["entries"]  # type: ignore[attr-defined]
    assert [(e["backend"], e["requests"], e["input_tokens"], e["output_tokens"],
             e["cache_read_tokens"]) for e in entries] == [
        ("eu", 1, 3, 4, 0), ("us", 2, 14, 13, 5)
    ]
    assert {e["client"] for e in entries} == {"team-a"}


def test_the_metrics_and_access_line_wait_until_the_answer_is_sent(harness: Harness) -> None:
    """A reactor sends what was written at its next poll; the calls due now run before
    that poll, the calls they schedule after it. The record of a finished request (usage,
    metrics, access line) waits for the second, so its work does not hold back the
    answer's last bytes; it keeps the time the request finished at."""

    def requests_total() -> float:
        registry = harness.resource.metrics.registry
        return sum(
            s.value for m in registry.collect() if m.name == "relayd_requests"
            for s in m.samples if s.name == "relayd_requests_total"
        )

    def usage() -> dict[str, Any]:
        snapshot: list[dict[str, Any]] = []
        harness.runtime.store.usage_snapshot().addCallback(snapshot.append)
        return snapshot[0]["clients"]

    answers: list[Any] = []
    harness.client.request(
        "POST", "http://relay.test/v1/messages", data=json.dumps(MESSAGE).encode(),
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
    ).addCallback(answers.append)
    harness.client.flush()
    assert answers[0].code == 200
    (exchange,) = harness.resource.active
    assert exchange.done and harness.logs.access() == [] and requests_total() == 0
    assert usage() == {} and exchange.usage is None  # not even read from the answer yet
    (due,) = harness.clock.calls
    assert due.getTime() == harness.clock.seconds()
    harness.clock.calls.remove(due)
    due.func(*due.args, **due.kw)  # the reactor's calls before its poll
    assert harness.logs.access() == [] and harness.resource.active == {exchange}
    harness.clock.advance(5)  # its poll sent the answer; the calls after it
    (line,) = harness.logs.access()
    assert line["status"] == 200 and line["outcome"] == "ok"
    assert line["total_ms"] < 1000  # when the request finished, not when it was logged
    assert requests_total() == 1 and not harness.resource.active
    assert usage()["team-a"]["output_tokens"] == 4 and line["output_tokens"] == 4


def test_a_bug_while_completing_still_reports_the_request_and_frees_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails in the completion, the exchange gets its line and leaves
    ``active`` (else every drain would wait for it until its timeout)."""
    from relayd.http.attempt import UpstreamAttempt

    def broken(self: UpstreamAttempt) -> None:
        raise RuntimeError("a bug in end()")

    monkeypatch.setattr(UpstreamAttempt, "end", broken)
    status, _, _ = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 200  # the answer was written before
    assert not harness.resource.active
    (line,) = harness.logs.access()
    assert line["status"] == 200
    idle: list[Any] = []
    harness.resource.wait_idle().addCallback(idle.append)
    assert idle == [None]
    assert any("a bug in end()" in str(e.get("log_failure", "")) for e in harness.logs.events)
