"""Routes across API families in memory: translated requests, answers, errors and fallback."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config, json_reply
from twisted.web.server import NOT_DONE_YET, Request

from relayd.http.bodies import BufferedRewrite

CHAT = {
    "model": "smart",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ],
    "max_tokens": 20,
}
MESSAGE = {"model": "smart", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

ANTHROPIC_MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 7},
}

CHAT_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-5-2025",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 2},
    },
}

ANTHROPIC_EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01",'
    b'"model":"claude-x","usage":{"input_tokens":11,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hi"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":9}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]

OPENAI_CHUNKS = [
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-5","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-5","choices":[{"index":0,'
    b'"delta":{"content":"Hel"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-5","choices":[{"index":0,'
    b'"delta":{"content":"lo"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-5","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-5","choices":[],'
    b'"usage":{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22}}\n\n',
    b"data: [DONE]\n\n",
]


def config(*routes: dict[str, Any]) -> dict[str, Any]:
    return base_config(routes=list(routes))


@contextmanager
def harness(*routes: dict[str, Any]) -> Iterator[Harness]:
    """A relay whose routes are ``routes`` (the default clients and providers)."""
    h = Harness(config(*routes))
    try:
        yield h
    finally:
        h.close()


def sse(request: Request, events: list[bytes]) -> Any:
    request.setHeader(b"content-type", b"text/event-stream")
    for event in events:
        request.write(event)
    request.finish()
    return NOT_DONE_YET


def events_of(body: bytes) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) of each event of an SSE body."""
    out: list[tuple[str | None, Any]] = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            text = "\n".join(data)
            out.append((name, text if text == "[DONE]" else json.loads(text)))
    return out


@pytest.fixture
def o2a() -> Iterator[Harness]:
    """OpenAI clients asking for "smart" are served by the Anthropic provider."""
    with harness(
        {
            "api": "openai",
            "models": ["smart"],
            "targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}],
        },
        {"api": "openai", "provider": "openai"},
    ) as h:
        yield h


@pytest.fixture
def a2o() -> Iterator[Harness]:
    """Anthropic clients asking for "smart" are served by the OpenAI provider."""
    with harness(
        {
            "api": "anthropic",
            "models": ["smart"],
            "targets": [
                {"provider": "openai", "model": "gpt-5"},
            ],
        }
    ) as h:
        yield h


def test_openai_client_served_by_anthropic_backend(o2a: Harness) -> None:
    o2a.upstreams["us"].handler = lambda r, b: json_reply(r, ANTHROPIC_MESSAGE)
    o2a.upstreams["eu"].handler = o2a.upstreams["us"].handler
    status, headers, body = o2a.call(
        "POST",
        "/v1/chat/completions?x=1",
        CHAT,
        api="openai",
        headers={"openai-organization": "org-1", "x-stainless-lang": "python"},
    )
    assert status == 200
    (seen,) = o2a.upstreams["us"].seen + o2a.upstreams["eu"].seen
    assert seen.path.endswith(b"/v1/messages")
    assert seen.headers[b"anthropic-version"] == [b"2023-06-01"]
    assert seen.headers[b"content-type"] == [b"application/json"]
    assert b"authorization" not in seen.headers
    assert b"openai-organization" not in seen.headers
    assert seen.headers[b"x-stainless-lang"] == [b"python"]
    assert CLIENT_KEY.encode() not in repr(seen.headers).encode()
    sent = json.loads(seen.body)
    assert sent == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
    }
    answer = json.loads(body)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "smart"  # the name the client asked for
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Calling."
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "weather",
        "arguments": '{"city":"Paris"}',
    }
    assert answer["usage"]["prompt_tokens"] == 14
    assert headers["content-type"] == ["application/json"]
    assert headers["content-length"] == [str(len(body))]
    assert "x-relayd-dropped" not in headers
    line = o2a.logs.access()[-1]
    assert (line["input_tokens"], line["cache_read_tokens"], line["output_tokens"]) == (10, 4, 7)
    assert line["provider"] == "anthropic" and line["model"] == "smart"


def test_gzip_answer_is_decoded_before_translation(o2a: Harness) -> None:
    def gzipped(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-encoding", b"gzip")
        return gzip.compress(json.dumps(ANTHROPIC_MESSAGE).encode())

    o2a.upstreams["us"].handler = o2a.upstreams["eu"].handler = gzipped
    status, headers, body = o2a.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 200
    # (treq's test client leaves an empty content-encoding behind once it has none.)
    assert headers.get("content-encoding", [""]) == [""]
    assert json.loads(body)["choices"][0]["message"]["content"] == "Calling."


def test_dropped_features_are_named_in_a_header(o2a: Harness) -> None:
    status, headers, _ = o2a.call(
        "POST", "/v1/chat/completions", dict(CHAT, logprobs=True, seed=3), api="openai"
    )
    assert status == 200
    assert headers["x-relayd-dropped"] == ["logprobs, seed"]


def test_untranslatable_request_is_a_400_in_the_callers_shape(o2a: Harness) -> None:
    status, _, body = o2a.call("POST", "/v1/chat/completions", dict(CHAT, n=2), api="openai")
    assert status == 400
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert "n" in error["message"]
    assert not o2a.upstreams["us"].seen and not o2a.upstreams["eu"].seen
    assert o2a.logs.access()[-1]["outcome"] == "untranslatable"


def test_strict_route_rejects_what_it_would_drop() -> None:
    with harness({"api": "openai", "provider": "anthropic", "strict": True}) as h:
        status, _, body = h.call(
            "POST", "/v1/chat/completions", dict(CHAT, logprobs=True), api="openai"
        )
        assert status == 400
        assert "logprobs" in json.loads(body)["error"]["message"]


def test_default_max_tokens_and_anthropic_version_come_from_the_route() -> None:
    with harness(
        {
            "api": "openai",
            "provider": "anthropic",
            "default_max_tokens": 777,
            "anthropic_version": "2026-10-21",
        }
    ) as h:
        chat = {k: v for k, v in CHAT.items() if k != "max_tokens"}
        status, _, _ = h.call("POST", "/v1/chat/completions", chat, api="openai")
        assert status == 200
        (seen,) = h.upstreams["us"].seen + h.upstreams["eu"].seen
        assert json.loads(seen.body)["max_tokens"] == 777
        assert json.loads(seen.body)["model"] == "smart"  # no target model: passed through
        assert seen.headers[b"anthropic-version"] == [b"2026-10-21"]


def test_upstream_error_is_translated(o2a: Harness) -> None:
    def bad(request: Request, body: bytes) -> bytes:
        return json_reply(
            request,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}},
            400,
        )

    o2a.upstreams["us"].handler = o2a.upstreams["eu"].handler = bad
    status, headers, body = o2a.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert json.loads(body)["error"]["message"].startswith("no")
    assert headers["content-type"] == ["application/json"]


def test_overloaded_anthropic_becomes_openai_503(o2a: Harness) -> None:
    def overloaded(request: Request, body: bytes) -> bytes:
        request.setHeader(b"anthropic-ratelimit-requests-limit", b"50")
        return json_reply(
            request,
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            529,
        )

    o2a.upstreams["us"].handler = o2a.upstreams["eu"].handler = overloaded
    status, headers, body = o2a.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 503
    assert json.loads(body)["error"]["code"] == "server_is_overloaded"
    assert headers["x-relayd-attempts"] == ["2"]
    assert "anthropic-ratelimit-requests-limit" not in headers


def test_upstream_success_that_is_not_json_is_a_502(o2a: Harness) -> None:
    def html(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"text/html")
        return b"<html>gateway</html>"

    o2a.upstreams["us"].handler = o2a.upstreams["eu"].handler = html
    status, _, body = o2a.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 502
    assert "could not be relayed" in json.loads(body)["error"]["message"]
    assert o2a.logs.access()[-1]["outcome"] == "upstream_bad_body"


def test_anthropic_stream_becomes_openai_chunks(o2a: Harness) -> None:
    o2a.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS)
    o2a.upstreams["eu"].handler = o2a.upstreams["us"].handler
    request = dict(CHAT, stream=True, stream_options={"include_usage": True})
    status, headers, body = o2a.call("POST", "/v1/chat/completions", request, api="openai")
    assert status == 200
    assert headers["content-type"] == ["text/event-stream; charset=utf-8"]
    events = events_of(body)
    assert all(name is None for name, _ in events)
    chunks = [data for _, data in events[:-1]]
    assert events[-1][1] == "[DONE]"
    assert {c["model"] for c in chunks} == {"smart"}
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == "Hi"
    )
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    (seen,) = o2a.upstreams["us"].seen + o2a.upstreams["eu"].seen
    assert json.loads(seen.body)["stream"] is True
    line = o2a.logs.access()[-1]
    assert (line["input_tokens"], line["output_tokens"], line["outcome"]) == (11, 9, "ok")


def test_truncated_translated_stream_ends_with_the_clients_error(o2a: Harness) -> None:
    o2a.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS[:3])
    o2a.upstreams["eu"].handler = o2a.upstreams["us"].handler
    status, _, body = o2a.call(
        "POST", "/v1/chat/completions", dict(CHAT, stream=True), api="openai"
    )
    assert status == 200
    events = events_of(body)
    assert "error" in events[-1][1]
    assert o2a.logs.access()[-1]["outcome"] == "upstream_truncated"


def test_anthropic_client_served_by_openai_backend(a2o: Harness) -> None:
    a2o.upstreams["main"].handler = lambda r, b: json_reply(r, CHAT_COMPLETION)
    status, _, body = a2o.call("POST", "/v1/messages", MESSAGE, headers={"anthropic-beta": "x"})
    assert status == 200
    (seen,) = a2o.upstreams["main"].seen
    assert seen.path == b"/v1/chat/completions"
    assert seen.headers[b"authorization"] == [b"Bearer sk-up-oai"]
    assert b"anthropic-version" not in seen.headers
    assert b"anthropic-beta" not in seen.headers
    assert b"x-api-key" not in seen.headers
    assert json.loads(seen.body) == {
        "model": "gpt-5",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 16,
    }
    answer = json.loads(body)
    assert answer["type"] == "message" and answer["model"] == "smart"
    assert answer["content"] == [{"type": "text", "text": "Hello"}]
    assert answer["stop_reason"] == "end_turn"
    assert answer["usage"]["input_tokens"] == 10
    line = a2o.logs.access()[-1]
    assert (line["input_tokens"], line["cache_read_tokens"], line["output_tokens"]) == (10, 2, 3)


def test_openai_stream_becomes_anthropic_events(a2o: Harness) -> None:
    a2o.upstreams["main"].handler = lambda r, b: sse(r, OPENAI_CHUNKS)
    status, _, body = a2o.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    (seen,) = a2o.upstreams["main"].seen
    assert json.loads(seen.body)["stream_options"] == {"include_usage": True}
    events = events_of(body)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["model"] == "smart"
    assert events[5][1]["usage"]["output_tokens"] == 2
    assert events[5][1]["usage"]["input_tokens"] == 20
    line = a2o.logs.access()[-1]
    assert (line["input_tokens"], line["output_tokens"]) == (20, 2)


def test_embeddings_cannot_reach_an_anthropic_target() -> None:
    with harness({"api": "openai", "provider": "anthropic"}) as h:
        status, _, body = h.call(
            "POST", "/v1/embeddings", {"model": "m", "input": "x"}, api="openai"
        )
        assert status == 404
        assert "translated" in json.loads(body)["error"]["message"]


# -- fallback across providers ---------------------------------------------------------------


def overloaded(request: Request, body: bytes) -> bytes:
    return json_reply(
        request, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, 529
    )


@pytest.fixture
def dual() -> Iterator[Harness]:
    """Anthropic clients: Anthropic first, OpenAI as the fallback."""
    with harness(
        {
            "api": "anthropic",
            "models": ["smart"],
            "targets": [
                {"provider": "anthropic", "model": "claude-sonnet-4-5"},
                {"provider": "openai", "model": "gpt-5"},
            ],
        }
    ) as h:
        yield h


def test_same_family_target_model_is_renamed_both_ways(dual: Harness) -> None:
    def answer(request: Request, body: bytes) -> bytes:
        return json_reply(request, dict(ANTHROPIC_MESSAGE, model=json.loads(body)["model"]))

    dual.upstreams["us"].handler = dual.upstreams["eu"].handler = answer
    status, _, body = dual.call("POST", "/v1/messages", MESSAGE)
    assert status == 200
    (seen,) = dual.upstreams["us"].seen + dual.upstreams["eu"].seen
    assert json.loads(seen.body)["model"] == "claude-sonnet-4-5"
    assert json.loads(body)["model"] == "smart"
    assert json.loads(body)["content"] == ANTHROPIC_MESSAGE["content"]


def test_same_family_stream_is_renamed(dual: Harness) -> None:
    dual.upstreams["us"].handler = lambda r, b: sse(r, ANTHROPIC_EVENTS)
    dual.upstreams["eu"].handler = dual.upstreams["us"].handler
    status, _, body = dual.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    events = events_of(body)
    assert events[0][1]["message"]["model"] == "smart"
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert body.count(b"claude-x") == 0


def test_overloaded_anthropic_falls_back_to_openai(dual: Harness) -> None:
    dual.upstreams["us"].handler = dual.upstreams["eu"].handler = overloaded
    dual.upstreams["main"].handler = lambda r, b: json_reply(r, CHAT_COMPLETION)
    status, headers, body = dual.call("POST", "/v1/messages", MESSAGE)
    assert status == 200
    assert json.loads(body)["content"] == [{"type": "text", "text": "Hello"}]
    assert json.loads(body)["model"] == "smart"
    assert headers["x-relayd-attempts"] == ["3"]
    (seen,) = dual.upstreams["main"].seen
    assert json.loads(seen.body)["model"] == "gpt-5"
    line = dual.logs.access()[-1]
    assert (line["provider"], line["backend"], line["attempts"]) == ("openai", "main", 3)


def test_stream_error_before_content_falls_back_to_openai(dual: Harness) -> None:
    error = (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n'
    )
    dual.upstreams["us"].handler = lambda r, b: sse(r, [ANTHROPIC_EVENTS[0], error])
    dual.upstreams["eu"].handler = dual.upstreams["us"].handler
    dual.upstreams["main"].handler = lambda r, b: sse(r, OPENAI_CHUNKS)
    status, _, body = dual.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    events = events_of(body)
    assert events[0][0] == "message_start"
    assert events[-1][0] == "message_stop"
    assert b"overloaded" not in body
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "Hello"


def test_healthy_fallback_target_wins_over_an_unhealthy_first(dual: Harness) -> None:
    for backend in dual.runtime.providers["anthropic"].balancer.backends:
        backend.health.healthy = False
    dual.upstreams["main"].handler = lambda r, b: json_reply(r, CHAT_COMPLETION)
    status, _, _ = dual.call("POST", "/v1/messages", MESSAGE)
    assert status == 200
    assert dual.upstreams["main"].seen
    assert not dual.upstreams["us"].seen and not dual.upstreams["eu"].seen


def test_untranslatable_request_skips_to_a_target_that_can_take_it() -> None:
    with harness(
        {
            "api": "openai",
            "targets": [{"provider": "anthropic"}, {"provider": "openai"}],
        }
    ) as h:
        status, _, _ = h.call("POST", "/v1/chat/completions", dict(CHAT, n=2), api="openai")
        assert status == 200
        assert len(h.upstreams["main"].seen) == 1
        assert not h.upstreams["us"].seen and not h.upstreams["eu"].seen


def test_weighted_targets_share_requests_by_weight() -> None:
    with harness(
        {
            "api": "openai",
            "strategy": "weighted",
            "targets": [
                {"provider": "openai", "weight": 3},
                {"provider": "anthropic", "weight": 1},
            ],
        }
    ) as h:
        for _ in range(8):
            status, _, _ = h.call("POST", "/v1/chat/completions", CHAT, api="openai")
            assert status == 200
        anthropic = len(h.upstreams["us"].seen) + len(h.upstreams["eu"].seen)
        assert (len(h.upstreams["main"].seen), anthropic) == (6, 2)


def test_model_list_shows_aliases(dual: Harness) -> None:
    dual.upstreams["us"].handler = dual.upstreams["eu"].handler = lambda r, b: json_reply(
        r, {"data": [{"id": "claude-x"}]}
    )
    status, _, body = dual.call("GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["smart"]
    assert json.loads(body)["data"][0]["type"] == "model"


def test_a_single_alias_model_is_answered_by_the_relay(dual: Harness) -> None:
    status, _, body = dual.call("GET", "/v1/models/smart")
    assert status == 200
    assert json.loads(body) == {
        "type": "model",
        "id": "smart",
        "display_name": "smart",
        "created_at": "1970-01-01T00:00:00Z",
    }
    assert not dual.upstreams["us"].seen and not dual.upstreams["eu"].seen


# -- hardening: odd inputs, odd answers, sticky calls, clients that leave ---------------------


def test_a_request_the_translator_cannot_read_is_a_400_and_fails_over_to_a_usable_target() -> None:
    with harness(
        {
            "api": "openai",
            "models": ["smart"],
            "targets": [{"provider": "openai"}, {"provider": "anthropic", "model": "claude-x"}],
        }
    ) as h:
        h.upstreams["main"].handler = lambda r, b: json_reply(r, {"error": {"message": "x"}}, 503)
        odd = dict(CHAT, reasoning_effort=[])
        status, _, body = h.call("POST", "/v1/chat/completions", odd, api="openai")
        # The OpenAI target failed; the Anthropic one cannot take reasoning_effort: [].
        assert status == 503
        assert not h.upstreams["us"].seen and not h.upstreams["eu"].seen
        assert not h.resource.active
        assert [b.in_flight for b in h.runtime.backends] == [0, 0, 0]
    with harness({"api": "openai", "provider": "anthropic"}) as h:
        status, _, body = h.call("POST", "/v1/chat/completions", odd, api="openai")
        assert status == 400
        assert "reasoning_effort" in json.loads(body)["error"]["message"]


def test_lone_surrogates_cross_translation_escaped(o2a: Harness) -> None:
    answer = (
        b'{"id":"msg_01","type":"message","role":"assistant","model":"claude-x",'
        b'"content":[{"type":"text","text":"cut emoji \\ud83d"}],"stop_reason":"max_tokens",'
        b'"usage":{"input_tokens":3,"output_tokens":4}}'
    )

    def handler(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return answer

    o2a.upstreams["us"].handler = o2a.upstreams["eu"].handler = handler
    raw = json.dumps(dict(CHAT, messages=[{"role": "user", "content": "half \ud83d"}])).encode()
    status, _, body = o2a.call("POST", "/v1/chat/completions", raw=raw, api="openai")
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "cut emoji \ud83d"
    (seen,) = o2a.upstreams["us"].seen + o2a.upstreams["eu"].seen
    assert json.loads(seen.body)["messages"][0]["content"] == "half \ud83d"


def test_renamed_answers_are_asked_for_without_compression(dual: Harness) -> None:
    dual.call("POST", "/v1/messages", MESSAGE, headers={"accept-encoding": "gzip, deflate, br"})
    (seen,) = dual.upstreams["us"].seen + dual.upstreams["eu"].seen
    assert seen.headers[b"accept-encoding"] == [b"identity"]


def test_batches_stay_with_the_first_provider_of_a_weighted_route() -> None:
    cfg = base_config()
    cfg["providers"].append(
        {
            "name": "anthropic2",
            "type": "anthropic",
            "backends": [{"name": "b2", "url": "http://up-b2.test", "api_key": "sk-b2"}],
        }
    )
    cfg["routes"] = [
        {
            "api": "anthropic",
            "strategy": "weighted",
            "targets": [{"provider": "anthropic"}, {"provider": "anthropic2"}],
        }
    ]
    h = Harness(cfg)
    try:
        created = iter(range(4))

        def batches(request: Request, body: bytes) -> bytes:
            if request.method == b"POST":
                return json_reply(request, {"id": f"msgbatch_{next(created)}"})
            return json_reply(request, {"id": request.path.rsplit(b"/", 1)[1].decode()})

        for name in ("us", "eu", "b2"):
            h.upstreams[name].handler = batches
        batch = {"requests": [{"custom_id": "a", "params": {
            "model": "claude-x", "max_tokens": 5, "messages": []}}]}
        for _ in range(4):
            assert h.call("POST", "/v1/messages/batches", batch)[0] == 200
        assert not h.upstreams["b2"].seen
        assert len(h.upstreams["us"].seen) == 4  # the provider's primary backend
        for i in range(4):  # and each batch is fetched where it was made
            assert h.call("GET", f"/v1/messages/batches/msgbatch_{i}")[0] == 200
        assert len(h.upstreams["us"].seen) == 8 and not h.upstreams["b2"].seen
    finally:
        h.close()


def test_a_client_that_leaves_while_the_answer_is_buffered_is_logged_as_499(o2a: Harness) -> None:
    def partial(request: Request, body: bytes) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"id":"msg_01","type":"message",')
        return NOT_DONE_YET

    o2a.upstreams["us"].handler = o2a.upstreams["eu"].handler = partial
    o2a.client.request(
        "POST",
        "http://relay.test/v1/chat/completions",
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
        data=json.dumps(CHAT).encode(),
    )
    o2a.flush()
    o2a.flush()
    (exchange,) = o2a.resource.active
    assert isinstance(exchange.sink, BufferedRewrite)  # held whole, not yet sent
    exchange.request.connectionLost(Exception("client hung up"))
    o2a.flush()
    line = o2a.logs.access()[-1]
    assert (line["status"], line["outcome"]) == (499, "client_gone")
    assert [b.in_flight for b in o2a.runtime.backends] == [0, 0, 0]
