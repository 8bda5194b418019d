"""Tests for the fake Anthropic/OpenAI upstream (relayd.testing.fakeprovider), without sockets.

The fake's resource is served in memory through treq's ``StubTreq`` (Twisted's
HTTP client over ``iosim`` transports), and the fake's own timers run on a
``task.Clock`` the tests drive, so latency, pacing, broken connections and
client disconnects are checked synchronously.  The official SDKs and the CLI,
which need a real socket, are exercised in
tests/integration/test_fakeprovider_process.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
from typing import Any, TypeVar, cast

import pytest
import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from relayd.pool import BytesProducer
from relayd.testing.fakeprovider import (
    FakeProvider,
    FakeSite,
    KnobError,
    Knobs,
    input_tokens_for,
    main,
    make_site,
    reply_chunks,
    reply_text,
)

T = TypeVar("T")

BASE = "http://fake-upstream.test"
REPLY = "Hello from fake-upstream. Deterministic reply."
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Say hello"}],
}
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-test-1",
    "messages": [{"role": "user", "content": "Say hello"}],
}


# ------------------------------------------------------------------------- helpers


def outcome(pending: Deferred[Any]) -> list[object]:
    """A list that gets the result (or Failure) of ``pending`` once it fires.

    The result passes on down the chain, so :func:`done` can still take it.
    """
    seen: list[object] = []

    def note(result: object) -> object:
        seen.append(result)
        return result

    pending.addBoth(note)
    return seen


def done(pending: Deferred[T]) -> T:
    """The result of a Deferred that has already fired (taken off it); a failure is raised."""
    seen: list[object] = []
    pending.addBoth(seen.append)
    assert seen, "the Deferred has not fired"
    if isinstance(seen[0], Failure):
        seen[0].raiseException()
    return cast(T, seen[0])


class Fake:
    """The fake upstream's resource behind an in-memory client, with a driven clock.

    ``agent`` is the raw in-memory agent (no gzip decoding); ``client`` is treq
    over it.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(self.clock, **kwargs)
        self.agent = RequestTraversalAgent(self.provider)
        self.client: Any = HTTPClient(self.agent, data_to_body_producer=BytesProducer)

    def flush(self) -> None:
        """Deliver what either side has written so far."""
        self.agent.flush()

    def advance(self, seconds: float) -> None:
        """Move the fake's clock, then deliver what its timers wrote."""
        self.clock.advance(seconds)
        self.flush()

    def send(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]:
        """Start a request; the Deferred fires once the response headers are in."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = {"content-type": "application/json", **(headers or {})}
        pending: Deferred[Any] = self.client.request(
            method, BASE + path, data=data, headers=sent, unbuffered=unbuffered
        )
        self.flush()
        return pending

    def request(self, method: str, path: str, body: object = None, **kw: Any) -> Any:
        """A request that must have been answered (its response, body not read yet)."""
        return done(self.send(method, path, body, **kw))

    def post(self, path: str, body: object, **kw: Any) -> Any:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def content(self, response: Any) -> bytes:
        """The whole body of ``response``, which must have finished."""
        pending = treq.content(response)
        self.flush()
        return done(pending)

    def call(self, method: str, path: str, body: object = None, **kw: Any) -> tuple[Any, Any]:
        """(response, parsed JSON body)."""
        response = self.request(method, path, body, **kw)
        return response, json.loads(self.content(response))


class Sink:
    """Collects a streamed body."""

    def __init__(self) -> None:
        self.data = b""

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk


class FirstChunkThenAbort(Protocol):
    """A body reader that notes data and can drop the connection like a client that goes away."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass

    def abort(self) -> None:
        """Stop producing the body, which makes Twisted's client drop the connection."""
        assert self.transport is not None
        cast(Any, self.transport).stopProducing()


def parse_sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    events: list[tuple[str | None, str]] = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if not values else cast(str, values[-1])


def delayed(fake: Fake) -> list[float]:
    """When the fake's pending timers are due."""
    return [call.getTime() for call in fake.clock.getDelayedCalls()]


@pytest.fixture
def fake() -> Fake:
    return Fake()


def same_length_bodies(base: dict[str, Any]) -> tuple[bytes, bytes]:
    """A non-streaming and a streaming body of identical length (so equal usage)."""
    rest = json.dumps(base)[1:]
    return b'{"stream":false,' + rest.encode(), b'{"stream":true, ' + rest.encode()


# ----------------------------------------------------------------- pure functions


def test_reply_chunks_are_deterministic_and_padded() -> None:
    assert "".join(reply_chunks(5)) == REPLY
    assert reply_text(2) == "Hello from"
    assert len(reply_chunks(12)) == 12
    padded = reply_chunks(3, 10)
    assert sum(map(len, padded)) == len(reply_text(3)) + 10
    assert reply_chunks(0) == ()
    assert input_tokens_for(b"x" * 40) == 11


def test_knobs_parse_header_strings_and_json_values() -> None:
    knobs = Knobs().updated(
        {"status": "529", "latency": "0.5", "hang": "true", "gzip": 1, "drop_after": None}
    )
    assert (knobs.status, knobs.latency, knobs.hang, knobs.gzip) == (529, 0.5, True, True)
    assert knobs.drop_after is None
    assert Knobs(chunks=9).updated({"chunks": ""}).chunks == 5  # null -> built-in default
    for bad in (
        {"nope": 1},
        {"status": "abc"},
        {"status": 200},
        {"chunks": -1},
        {"hang": "maybe"},
        {"latency": True},
        {"chunks": 1.5},
    ):
        with pytest.raises(KnobError):
            Knobs().updated(bad)


# ---------------------------------------------------------------------- Anthropic


def test_anthropic_json_shape_and_headers(fake: Fake) -> None:
    raw = json.dumps(ANTHROPIC_BODY).encode()
    response = fake.post("/v1/messages", None, raw=raw)
    body = json.loads(fake.content(response))
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert header(response, "request-id") == "req_fake0000000000000001"
    assert header(response, "anthropic-ratelimit-requests-limit") == "4000"
    reset = header(response, "anthropic-ratelimit-tokens-reset")
    assert reset is not None and reset.endswith("Z")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude-test-1"
    assert body["id"].startswith("msg_")
    assert body["content"] == [{"type": "text", "text": REPLY}]
    assert body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None
    usage = body["usage"]
    assert usage["input_tokens"] == input_tokens_for(raw)
    assert usage["output_tokens"] == 5
    assert usage["cache_creation_input_tokens"] == 7
    assert usage["cache_read_input_tokens"] == 11


def test_anthropic_stream_order_and_usage_matches_json(fake: Fake) -> None:
    plain, streaming = same_length_bodies(ANTHROPIC_BODY)
    response = fake.post("/v1/messages", None, raw=plain)
    json_usage = json.loads(fake.content(response))["usage"]

    response = fake.post("/v1/messages", None, raw=streaming)
    assert header(response, "content-type") == "text/event-stream; charset=utf-8"
    assert header(response, "cache-control") == "no-cache"
    assert header(response, "content-length") is None
    raw = fake.content(response)
    assert b"[DONE]" not in raw
    events = parse_sse(raw)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [json.loads(data) for _, data in events]
    assert [d["type"] for d in datas] == names  # event line matches data.type
    start = datas[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["model"] == "claude-test-1"
    assert start["usage"]["output_tokens"] == 1
    assert datas[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [d["delta"] for d in datas[2:7]]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == REPLY
    assert datas[8]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}

    stream_usage = dict(start["usage"], output_tokens=datas[8]["usage"]["output_tokens"])
    assert stream_usage == json_usage
    # message_delta repeats the cumulative input and cache counts, as the real API does
    assert datas[8]["usage"] == {
        "input_tokens": json_usage["input_tokens"],
        "cache_creation_input_tokens": 7,
        "cache_read_input_tokens": 11,
        "output_tokens": 5,
    }
    record = fake.provider.requests[-1]
    assert record.events_sent == len(events) and record.finished


def test_anthropic_max_tokens_cuts_reply(fake: Fake) -> None:
    _, body = fake.call("POST", "/v1/messages", dict(ANTHROPIC_BODY, max_tokens=2))
    assert body["content"][0]["text"] == "Hello from"
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 2


def test_anthropic_count_tokens_models_and_batches(fake: Fake) -> None:
    count_body = {"model": "claude-test-1", "messages": ANTHROPIC_BODY["messages"]}
    _, counted = fake.call("POST", "/v1/messages/count_tokens", count_body)
    assert counted == {"input_tokens": input_tokens_for(json.dumps(count_body).encode())}

    _, models = fake.call("GET", "/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert models["has_more"] is False
    assert models["first_id"] == models["data"][0]["id"]
    assert models["last_id"] == models["data"][-1]["id"]
    assert {m["type"] for m in models["data"]} == {"model"}
    assert all({"id", "display_name", "created_at"} <= m.keys() for m in models["data"])

    batch_request = {
        "requests": [
            {"custom_id": "one", "params": ANTHROPIC_BODY},
            {"custom_id": "two", "params": ANTHROPIC_BODY},
        ]
    }
    _, batch = fake.call("POST", "/v1/messages/batches", batch_request)
    assert batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress"
    assert batch["request_counts"]["processing"] == 2
    _, fetched = fake.call("GET", f"/v1/messages/batches/{batch['id']}")
    assert fetched["processing_status"] == "ended"
    assert fetched["request_counts"]["succeeded"] == 2
    assert fetched["results_url"].endswith(f"/v1/messages/batches/{batch['id']}/results")
    response = fake.get(f"/v1/messages/batches/{batch['id']}/results")
    lines = fake.content(response).decode().splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in results] == ["one", "two"]
    assert results[0]["result"]["message"]["content"][0]["text"] == REPLY
    missing, error = fake.call("GET", "/v1/messages/batches/msgbatch_nope")
    assert missing.code == 404 and error["error"]["type"] == "not_found_error"


# ------------------------------------------------------------------------- OpenAI


def test_openai_chat_json_and_stream_usage(fake: Fake) -> None:
    base = dict(CHAT_BODY, stream_options={"include_usage": True})
    plain, streaming = same_length_bodies(base)
    response = fake.post("/v1/chat/completions", None, raw=plain)
    body = json.loads(fake.content(response))
    assert header(response, "x-request-id") is not None
    assert header(response, "x-ratelimit-limit-requests") == "10000"
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-test-1"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == REPLY
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == input_tokens_for(plain) + 11
    assert usage["prompt_tokens_details"]["cached_tokens"] == 11
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5

    response = fake.post("/v1/chat/completions", None, raw=streaming)
    assert header(response, "content-type") == "text/event-stream; charset=utf-8"
    assert header(response, "cache-control") == "no-cache"
    raw = fake.content(response)
    assert raw.endswith(b"data: [DONE]\n\n")
    events = parse_sse(raw)
    assert all(name is None for name, _ in events)
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == REPLY
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == usage


def test_openai_chat_stream_without_include_usage(fake: Fake) -> None:
    response = fake.post("/v1/chat/completions", dict(CHAT_BODY, stream=True))
    events = parse_sse(fake.content(response))
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 1 + 5 + 1
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_openai_completions_and_embeddings(fake: Fake) -> None:
    _, completion = fake.call("POST", "/v1/completions", {"model": "m", "prompt": "hi"})
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == REPLY
    response = fake.post(
        "/v1/completions",
        {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    )
    events = parse_sse(fake.content(response))
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == REPLY
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    request = {"model": "text-embedding-3-small", "input": ["a", "b", "c"], "dimensions": 4}
    _, floats = fake.call("POST", "/v1/embeddings", dict(request, encoding_format="float"))
    _, b64 = fake.call("POST", "/v1/embeddings", dict(request, encoding_format="base64"))
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    for as_float, as_b64 in zip(floats["data"], b64["data"], strict=True):
        assert len(as_float["embedding"]) == 4
        decoded = struct.unpack("<4f", base64.b64decode(as_b64["embedding"]))
        assert list(decoded) == as_float["embedding"]
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"]
    _, single = fake.call("POST", "/v1/embeddings", {"model": "e", "input": [1, 2, 3]})
    assert len(single["data"]) == 1 and len(single["data"][0]["embedding"]) == 16


def test_openai_responses_json_and_stream(fake: Fake) -> None:
    base = {"model": "gpt-test-1", "input": "Say hello"}
    plain, streaming = same_length_bodies(base)
    response = fake.post("/v1/responses", None, raw=plain)
    body = json.loads(fake.content(response))
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == REPLY
    assert body["usage"]["output_tokens"] == 5
    assert body["usage"]["input_tokens"] == input_tokens_for(plain) + 11

    response = fake.post("/v1/responses", None, raw=streaming)
    events = parse_sse(fake.content(response))
    datas = [json.loads(d) for _, d in events]
    assert [n for n, _ in events] == [d["type"] for d in datas]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    names = [n for n, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    deltas = [d["delta"] for d in datas if d["type"] == "response.output_text.delta"]
    assert "".join(deltas) == REPLY
    assert datas[-1]["response"]["usage"] == body["usage"]


def test_models_family_follows_anthropic_version_header(fake: Fake) -> None:
    _, openai_list = fake.call("GET", "/v1/models")
    assert openai_list["object"] == "list"
    assert len(openai_list["data"]) == 3
    assert {m["object"] for m in openai_list["data"]} == {"model"}
    assert all({"id", "created", "owned_by"} <= m.keys() for m in openai_list["data"])
    _, anthropic_list = fake.call("GET", "/v1/models", headers={"anthropic-version": "2026-10-21"})
    assert "object" not in anthropic_list and "has_more" in anthropic_list


# ---------------------------------------------------------------------- tool calls

TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "metric": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
        },
        "note": {"type": ["string", "null"]},
        "optional": {"type": "string"},
    },
    "required": ["city", "days", "ratio", "metric", "tags", "unit", "where", "note"],
}
#: What the fake derives from TOOL_SCHEMA: the required properties, in property order.
TOOL_INPUT: dict[str, Any] = {
    "city": "fake",
    "days": 1,
    "ratio": 0.5,
    "metric": False,
    "tags": ["fake"],
    "unit": "celsius",
    "where": {"lat": 1, "lon": 1},
    "note": "fake",
}
TIME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string"}},
    "required": ["zone"],
}
ANTHROPIC_TOOL_BODY: dict[str, Any] = dict(
    ANTHROPIC_BODY,
    tools=[
        {"name": "get_weather", "description": "Weather", "input_schema": TOOL_SCHEMA},
        {"name": "get_time", "description": "Time", "input_schema": TIME_SCHEMA},
    ],
)
CHAT_TOOL_BODY: dict[str, Any] = dict(
    CHAT_BODY,
    tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": TOOL_SCHEMA}},
        {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}},
    ],
)


def compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def sse_datas(raw: bytes) -> list[Any]:
    """The parsed ``data:`` payloads of an SSE body (without OpenAI's ``[DONE]``)."""
    return [json.loads(data) for _, data in parse_sse(raw) if data != "[DONE]"]


def test_anthropic_tool_call_json(fake: Fake) -> None:
    response, body = fake.call("POST", "/v1/messages", ANTHROPIC_TOOL_BODY)
    assert response.code == 200
    text, tool = body["content"]
    assert text == {"type": "text", "text": REPLY}
    assert tool == {
        "type": "tool_use",
        "id": "toolu_fake0000000000000001",
        "name": "get_weather",
        "input": TOOL_INPUT,
    }
    assert list(tool["input"]) == list(TOOL_INPUT)  # property order is kept
    assert body["stop_reason"] == "tool_use"
    assert body["usage"]["output_tokens"] == 5 + 1


def test_anthropic_tool_call_stream_matches_json(fake: Fake) -> None:
    plain, streaming = same_length_bodies(ANTHROPIC_TOOL_BODY)
    response = fake.post("/v1/messages", None, raw=plain)
    json_body = json.loads(fake.content(response))

    response = fake.post("/v1/messages", None, raw=streaming)
    raw = fake.content(response)
    events = parse_sse(raw)
    names = [name for name, _ in events]
    datas = [json.loads(data) for _, data in events]
    argument = compact(TOOL_INPUT)
    n_fragments = -(-len(argument) // 8)
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * n_fragments,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [d["type"] for d in datas] == names
    assert datas[8] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_fake0000000000000002",
            "name": "get_weather",
            "input": {},
        },
    }
    text = "".join(d["delta"]["text"] for d in datas[2:7])
    assert text == REPLY
    fragment_events = datas[9 : 9 + n_fragments]
    assert all(d["index"] == 1 for d in fragment_events)
    assert {d["delta"]["type"] for d in fragment_events} == {"input_json_delta"}
    fragments = [d["delta"]["partial_json"] for d in fragment_events]
    assert all(0 < len(f) <= 8 for f in fragments)
    assert "".join(fragments) == argument
    assert json.loads("".join(fragments)) == json_body["content"][1]["input"]
    assert datas[-3] == {"type": "content_block_stop", "index": 1}
    assert datas[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}

    usage = dict(datas[0]["message"]["usage"], output_tokens=datas[-2]["usage"]["output_tokens"])
    assert usage == json_body["usage"]
    assert usage["output_tokens"] == 6
    record = fake.provider.requests[-1]
    assert record.events_sent == len(events) and record.finished


def test_anthropic_tool_choice_names_the_tool(fake: Fake) -> None:
    choice = {"type": "tool", "name": "get_time"}
    body = dict(ANTHROPIC_TOOL_BODY, tool_choice=choice)
    _, message = fake.call("POST", "/v1/messages", body)
    assert message["content"][1]["name"] == "get_time"
    assert message["content"][1]["input"] == {"zone": "fake"}

    response = fake.post("/v1/messages", dict(body, stream=True))
    datas = sse_datas(fake.content(response))
    starts = [d for d in datas if d["type"] == "content_block_start"]
    assert starts[1]["content_block"]["name"] == "get_time"
    fragments = [
        d["delta"]["partial_json"]
        for d in datas
        if d["type"] == "content_block_delta" and d["index"] == 1
    ]
    assert "".join(fragments) == '{"zone":"fake"}'

    # "any" and "auto" call the first tool
    for kind in ("any", "auto"):
        _, message = fake.call(
            "POST", "/v1/messages", dict(ANTHROPIC_TOOL_BODY, tool_choice={"type": kind})
        )
        assert message["content"][1]["name"] == "get_weather"


def test_anthropic_tools_without_a_tool_call(fake: Fake) -> None:
    tool_result = {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_fake1", "content": "sunny"},
        ],
    }
    earlier_call = {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_fake1", "name": "get_weather", "input": {}}],
    }
    bodies = [
        dict(ANTHROPIC_TOOL_BODY, tool_choice={"type": "none"}),
        dict(
            ANTHROPIC_TOOL_BODY,
            messages=[*ANTHROPIC_BODY["messages"], earlier_call, tool_result],
        ),
        dict(ANTHROPIC_TOOL_BODY, tools=[]),
    ]
    for body in bodies:
        _, message = fake.call("POST", "/v1/messages", body)
        assert message["content"] == [{"type": "text", "text": REPLY}]
        assert message["stop_reason"] == "end_turn"
        assert message["usage"]["output_tokens"] == 5
        response = fake.post("/v1/messages", dict(body, stream=True))
        datas = sse_datas(fake.content(response))
        assert [d["type"] for d in datas].count("content_block_start") == 1
        assert datas[-2]["delta"]["stop_reason"] == "end_turn"
        assert datas[-2]["usage"]["output_tokens"] == 5


def test_anthropic_max_tokens_cut_drops_the_tool_call(fake: Fake) -> None:
    body = dict(ANTHROPIC_TOOL_BODY, max_tokens=2)
    _, message = fake.call("POST", "/v1/messages", body)
    assert message["content"] == [{"type": "text", "text": "Hello from"}]
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 2
    response = fake.post("/v1/messages", dict(body, stream=True))
    datas = sse_datas(fake.content(response))
    assert not any(d.get("index") == 1 for d in datas)
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens"
    assert datas[-2]["usage"]["output_tokens"] == 2


def test_anthropic_tool_stream_honours_knobs(fake: Fake) -> None:
    body = dict(ANTHROPIC_TOOL_BODY, stream=True)
    response = fake.post("/v1/messages", body, headers={"x-fake-stream-error": "1"})
    assert [n for n, _ in parse_sse(fake.content(response))] == ["message_start", "error"]

    response = fake.post("/v1/messages", body, headers={"x-fake-ping": "1"})
    names = [n for n, _ in parse_sse(fake.content(response))]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names.count("ping") == 1

    response = fake.post("/v1/messages", body, headers={"x-fake-truncate-after": "10"})
    events = parse_sse(fake.content(response))
    assert len(events) == 10 and events[8][0] == "content_block_start"
    assert fake.provider.requests[-1].finished


def test_openai_tool_call_json(fake: Fake) -> None:
    _, body = fake.call("POST", "/v1/chat/completions", CHAT_TOOL_BODY)
    choice = body["choices"][0]
    message = choice["message"]
    assert message["content"] == REPLY
    assert message["tool_calls"] == [
        {
            "id": "call_fake0000000000000001",
            "type": "function",
            "function": {"name": "get_weather", "arguments": compact(TOOL_INPUT)},
        }
    ]
    arguments = json.loads(message["tool_calls"][0]["function"]["arguments"])
    assert arguments == TOOL_INPUT and list(arguments) == list(TOOL_INPUT)
    assert choice["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens"] == 5 + 1
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6


def test_openai_tool_call_stream_matches_json(fake: Fake) -> None:
    base = dict(CHAT_TOOL_BODY, stream_options={"include_usage": True})
    plain, streaming = same_length_bodies(base)
    response = fake.post("/v1/chat/completions", None, raw=plain)
    json_body = json.loads(fake.content(response))

    response = fake.post("/v1/chat/completions", None, raw=streaming)
    raw = fake.content(response)
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = sse_datas(raw)
    argument = compact(TOOL_INPUT)
    n_fragments = -(-len(argument) // 8)
    assert len(chunks) == 1 + 5 + 1 + n_fragments + 1 + 1
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d["content"] for d in deltas[1:6]) == REPLY
    assert deltas[6] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_fake0000000000000002",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    fragment_deltas = deltas[7 : 7 + n_fragments]
    assert all(list(d["tool_calls"][0]) == ["index", "function"] for d in fragment_deltas)
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in fragment_deltas]
    assert all(0 < len(f) <= 8 for f in fragments)
    assert "".join(fragments) == argument
    assert (
        "".join(fragments)
        == json_body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    )
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == json_body["usage"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_openai_tool_choice_names_the_tool(fake: Fake) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = dict(CHAT_TOOL_BODY, tool_choice=choice)
    _, completion = fake.call("POST", "/v1/chat/completions", body)
    function = completion["choices"][0]["message"]["tool_calls"][0]["function"]
    assert function == {"name": "get_time", "arguments": '{"zone":"fake"}'}

    response = fake.post("/v1/chat/completions", dict(body, stream=True))
    chunks = sse_datas(fake.content(response))
    calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_time"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"zone":"fake"}'

    for mode in ("auto", "required"):
        _, completion = fake.call(
            "POST", "/v1/chat/completions", dict(CHAT_TOOL_BODY, tool_choice=mode)
        )
        assert completion["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == (
            "get_weather"
        )


def test_openai_tools_without_a_tool_call(fake: Fake) -> None:
    earlier_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_fake1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"},
            }
        ],
    }
    tool_result = {"role": "tool", "tool_call_id": "call_fake1", "content": "sunny"}
    bodies = [
        dict(CHAT_TOOL_BODY, tool_choice="none"),
        dict(CHAT_TOOL_BODY, messages=[*CHAT_BODY["messages"], earlier_call, tool_result]),
        dict(CHAT_TOOL_BODY, tools=[]),
    ]
    for body in bodies:
        _, completion = fake.call("POST", "/v1/chat/completions", body)
        choice = completion["choices"][0]
        assert choice["message"]["content"] == REPLY
        assert "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
        assert completion["usage"]["completion_tokens"] == 5
        streaming = dict(body, stream=True, stream_options={"include_usage": True})
        response = fake.post("/v1/chat/completions", streaming)
        chunks = sse_datas(fake.content(response))
        assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_openai_max_tokens_cut_drops_the_tool_call(fake: Fake) -> None:
    body = dict(CHAT_TOOL_BODY, max_completion_tokens=2)
    _, completion = fake.call("POST", "/v1/chat/completions", body)
    choice = completion["choices"][0]
    assert choice["message"]["content"] == "Hello from"
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 2
    streaming = dict(body, stream=True, stream_options={"include_usage": True})
    response = fake.post("/v1/chat/completions", streaming)
    chunks = sse_datas(fake.content(response))
    assert len(chunks) == 1 + 2 + 1 + 1
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# -------------------------------------------------------------------------- knobs


def test_status_knob_error_shapes(fake: Fake) -> None:
    expected = {
        400: "invalid_request_error",
        401: "authentication_error",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }
    for status, kind in expected.items():
        response, body = fake.call(
            "POST",
            "/v1/messages",
            ANTHROPIC_BODY,
            headers={"x-fake-status": str(status), "x-fake-retry-after": "7"},
        )
        assert response.code == status
        assert body["type"] == "error" and body["error"]["type"] == kind
        assert body["request_id"] == header(response, "request-id")
        assert header(response, "retry-after") == "7"

    response, body = fake.call(
        "POST", "/v1/chat/completions", CHAT_BODY, headers={"x-fake-status": "429"}
    )
    assert response.code == 429
    assert header(response, "retry-after") is None
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"
    response, body = fake.call(
        "POST", "/v1/chat/completions", CHAT_BODY, headers={"x-fake-status": "500"}
    )
    assert body["error"]["type"] == "server_error"


def test_latency_waits_for_the_clock(fake: Fake) -> None:
    pending = fake.send("POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-latency": "2.5"})
    answered = outcome(pending)
    assert len(fake.provider.requests) == 1
    fake.advance(2.4)
    assert not answered
    assert fake.provider.requests[0].status is None
    fake.advance(0.1)
    assert answered
    response = answered[0]
    assert cast(Any, response).code == 200
    assert json.loads(fake.content(response))["content"][0]["text"] == REPLY


def test_chunk_delay_writes_one_event_per_tick(fake: Fake) -> None:
    response = fake.post(
        "/v1/messages",
        dict(ANTHROPIC_BODY, stream=True),
        headers={"x-fake-chunk-delay": "1"},
        unbuffered=True,
    )
    sink = Sink()
    finished = outcome(treq.collect(response, sink))
    fake.flush()
    record = fake.provider.requests[0]
    assert b"event: message_start" in sink.data
    assert record.events_sent == 1
    fake.advance(1)
    assert b"event: content_block_start" in sink.data
    assert record.events_sent == 2 and b"content_block_delta" not in sink.data
    for _ in range(7):
        fake.advance(1)
    assert not finished and record.events_sent == 9
    fake.advance(1)
    assert finished == [None]
    assert [n for n, _ in parse_sse(sink.data)][-1] == "message_stop"
    assert record.events_sent == 10 and record.finished


def test_drop_after_breaks_the_stream(fake: Fake) -> None:
    response = fake.post(
        "/v1/messages",
        dict(ANTHROPIC_BODY, stream=True),
        headers={"x-fake-drop-after": "3"},
        unbuffered=True,
    )
    assert response.code == 200
    sink = Sink()
    collected = treq.collect(response, sink)
    fake.flush()
    with pytest.raises(ResponseFailed):
        done(collected)
    assert [n for n, _ in parse_sse(sink.data)] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    record = fake.provider.requests[0]
    assert record.events_sent == 3
    assert record.aborted and not record.finished and not record.client_disconnected


def test_drop_after_with_pacing_breaks_the_stream(fake: Fake) -> None:
    response = fake.post(
        "/v1/chat/completions",
        dict(CHAT_BODY, stream=True),
        headers={"x-fake-drop-after": "2", "x-fake-chunk-delay": "0.5"},
        unbuffered=True,
    )
    sink = Sink()
    collected = treq.collect(response, sink)
    fake.flush()
    assert len(parse_sse(sink.data)) == 1 and not outcome(collected)
    fake.advance(0.5)
    with pytest.raises(ResponseFailed):
        done(collected)
    assert len(parse_sse(sink.data)) == 2


def test_drop_after_json_sends_half_the_body(fake: Fake) -> None:
    response = fake.post(
        "/v1/chat/completions", CHAT_BODY, headers={"x-fake-drop-after": "0"}, unbuffered=True
    )
    length = response.length  # Twisted's client moves content-length here
    sink = Sink()
    collected = treq.collect(response, sink)
    fake.flush()
    with pytest.raises(ResponseFailed):
        done(collected)
    assert len(sink.data) == length // 2 > 0


def test_truncate_after_finishes_cleanly(fake: Fake) -> None:
    response = fake.post(
        "/v1/messages", dict(ANTHROPIC_BODY, stream=True), headers={"x-fake-truncate-after": "4"}
    )
    events = parse_sse(fake.content(response))
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
    ]
    record = fake.provider.requests[0]
    assert record.finished and not record.aborted and record.events_sent == 4


def test_hang_until_client_disconnects(fake: Fake) -> None:
    pending = fake.send("POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-hang": "1"})
    answered = outcome(pending)
    assert len(fake.provider.requests) == 1
    fake.advance(3600)
    assert not answered
    pending.cancel()
    fake.flush()
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        done(pending)
    record = fake.provider.requests[0]
    assert record.client_disconnected
    assert not record.finished and record.status is None


def test_disconnect_during_latency_cancels_the_timer(fake: Fake) -> None:
    pending = fake.send("POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-latency": "123"})
    assert len(fake.provider.requests) == 1
    assert 123 in delayed(fake)
    pending.cancel()
    fake.flush()
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        done(pending)
    assert fake.provider.requests[0].client_disconnected
    assert 123 not in delayed(fake)
    fake.advance(200)
    assert fake.provider.requests[0].status is None


def test_disconnect_mid_stream_stops_writing(fake: Fake) -> None:
    response = fake.post(
        "/v1/messages",
        dict(ANTHROPIC_BODY, stream=True),
        headers={"x-fake-chunk-delay": "7"},
        unbuffered=True,
    )
    reader = FirstChunkThenAbort()
    response.deliverBody(reader)
    fake.flush()
    assert b"event: message_start" in reader.received
    assert 7 in delayed(fake)
    reader.abort()
    fake.flush()
    assert fake.provider.requests[0].client_disconnected
    assert 7 not in delayed(fake)
    fake.advance(100)
    assert fake.provider.requests[0].events_sent == 1


def test_wait_for_fires_when_the_state_changes(fake: Fake) -> None:
    already = outcome(fake.provider.wait_for(lambda p: not p.requests))
    assert already == [None]  # true now: fired at once
    disconnected = fake.provider.wait_for(
        lambda p: bool(p.requests) and p.requests[0].client_disconnected
    )
    recorded = outcome(fake.provider.wait_for(lambda p: len(p.requests) == 1))
    never = fake.provider.wait_for(lambda p: len(p.requests) == 99)
    never.cancel()  # a cancelled waiter is dropped, not re-checked
    pending = fake.send("POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-hang": "1"})
    assert recorded == [None]
    seen = outcome(disconnected)
    assert not seen
    pending.cancel()
    fake.flush()
    assert seen == [None]
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        done(pending)


def test_stream_error_after_message_start(fake: Fake) -> None:
    response = fake.post(
        "/v1/messages", dict(ANTHROPIC_BODY, stream=True), headers={"x-fake-stream-error": "true"}
    )
    events = parse_sse(fake.content(response))
    assert [n for n, _ in events] == ["message_start", "error"]
    assert json.loads(events[1][1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


def raw_post(fake: Fake, path: str, body: object, headers: dict[bytes, bytes]) -> Any:
    """A POST on the raw agent, so a gzip body arrives as sent (treq would decode it)."""
    sent = Headers({name: [value] for name, value in headers.items()})
    pending = fake.agent.request(
        b"POST", (BASE + path).encode(), sent, BytesProducer(json.dumps(body).encode())
    )
    fake.flush()
    return done(pending)


def test_gzip_encodes_json(fake: Fake) -> None:
    response = raw_post(fake, "/v1/messages", ANTHROPIC_BODY, {b"x-fake-gzip": b"1"})
    raw = fake.content(response)
    assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert response.length == len(raw)
    assert json.loads(gzip.decompress(raw))["content"][0]["text"] == REPLY


def test_gzip_bomb_and_flood_headers(fake: Fake) -> None:
    knobs = {b"x-fake-gzip-bomb-mib": b"2", b"x-fake-flood-headers": b"50"}
    response = raw_post(fake, "/v1/chat/completions", CHAT_BODY, knobs)
    raw = fake.content(response)
    assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert len(raw) < 64 * 1024
    assert gzip.decompress(raw) == bytes(2 * 1024 * 1024)
    flood = [name for name, _ in response.headers.getAllRawHeaders() if name.startswith(b"X-Flood")]
    assert len(flood) == 50


def test_body_bytes_pads_json_and_stream_alike(fake: Fake) -> None:
    plain, streaming = same_length_bodies(ANTHROPIC_BODY)
    knob = {"x-fake-body-bytes": "4096"}
    response = fake.post("/v1/messages", None, raw=plain, headers=knob)
    raw = fake.content(response)
    assert len(raw) == 4096
    text = json.loads(raw)["content"][0]["text"]
    response = fake.post("/v1/messages", None, raw=streaming, headers=knob)
    events = parse_sse(fake.content(response))
    deltas = [json.loads(d)["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert "".join(deltas) == text and len(deltas) == 5


def test_bad_knob_is_a_400(fake: Fake) -> None:
    response, body = fake.call(
        "POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-chunks": "many"}
    )
    assert response.code == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "chunks" in body["error"]["message"]


# -------------------------------------------------------- control and inspection


def test_request_log_and_reset(fake: Fake) -> None:
    raw = json.dumps(ANTHROPIC_BODY).encode()
    fake.call(
        "POST",
        "/v1/messages?beta=true",
        None,
        raw=raw,
        headers={"x-api-key": "sk-test", "anthropic-version": "2023-06-01"},
    )
    fake.call("GET", "/_fake/health")
    _, log = fake.call("GET", "/_fake/requests")
    assert len(log) == 1
    entry = log[0]
    assert entry["id"] == 1
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/messages?beta=true"
    assert entry["headers"]["x-api-key"] == ["sk-test"]
    assert entry["headers"]["anthropic-version"] == ["2023-06-01"]
    assert entry["body"] == raw.decode()
    assert entry["started"] == 0.0
    assert entry["finished"] is True
    assert entry["client_disconnected"] is False
    assert entry["events_sent"] == 0

    _, reset = fake.call("POST", "/_fake/reset")
    assert reset == {"ok": True, "cleared": 1}
    _, log = fake.call("GET", "/_fake/requests")
    assert log == []
    fake.call("GET", "/v1/models")
    fake.call("GET", "/v1/models")
    _, log = fake.call("GET", "/_fake/requests?since=2")
    assert [e["id"] for e in log] == [3]


def test_log_is_capped() -> None:
    small = Fake(max_log=3)
    for _ in range(5):
        small.call("GET", "/v1/models")
    assert [r.id for r in small.provider.requests] == [3, 4, 5]


def test_config_endpoint_and_header_override(fake: Fake) -> None:
    response, config = fake.call("POST", "/_fake/config", {"chunks": 3, "gzip": False})
    assert response.code == 200 and config["chunks"] == 3
    _, body = fake.call("POST", "/v1/messages", ANTHROPIC_BODY)
    assert body["content"][0]["text"] == reply_text(3)
    _, body = fake.call("POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-chunks": "2"})
    assert body["usage"]["output_tokens"] == 2
    _, current = fake.call("GET", "/_fake/config")
    assert current["chunks"] == 3

    response, config = fake.call("POST", "/_fake/config", {"status": 503})
    assert config["chunks"] == 5  # replace semantics: unspecified knobs are defaults
    response, _ = fake.call("POST", "/v1/chat/completions", CHAT_BODY)
    assert response.code == 503
    response, _ = fake.call(
        "POST", "/v1/chat/completions", CHAT_BODY, headers={"x-fake-status": ""}
    )
    assert response.code == 200  # the header switches the instance fault off

    fake.call("POST", "/_fake/config", {})
    response, _ = fake.call("POST", "/v1/chat/completions", CHAT_BODY)
    assert response.code == 200
    response, error = fake.call("POST", "/_fake/config", {"bogus": 1})
    assert response.code == 400 and "bogus" in error["error"]
    _, log = fake.call("GET", "/_fake/requests")
    # Only the API calls were recorded, none of the control calls between them.
    assert [e["path"] for e in log] == ["/v1/messages"] * 2 + ["/v1/chat/completions"] * 3


def test_unknown_paths_and_methods(fake: Fake) -> None:
    response, body = fake.call("GET", "/v1/nothing")
    assert response.code == 404 and body["error"]["type"] == "invalid_request_error"
    response, body = fake.call("GET", "/v1/messages")
    assert response.code == 405 and body["type"] == "error"
    response, body = fake.call("POST", "/v1/messages", None, raw=b"{not json")
    assert response.code == 400 and body["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------ site and CLI


def test_make_site_serves_a_provider_with_the_given_defaults() -> None:
    clock = Clock()
    site = make_site(clock, defaults={"chunks": 3, "ping": True}, max_log=2)
    assert isinstance(site, FakeSite) and isinstance(site.provider, FakeProvider)
    assert site.resource is site.provider and not site.access_log
    assert (site.provider.config.chunks, site.provider.config.ping) == (3, True)
    assert site.provider.configure({}).chunks == 3  # {} resets to the defaults, not built-ins
    assert site.provider.clock is clock
    with pytest.raises(KnobError):
        make_site(clock, defaults={"chunks": "lots"})


def test_cli_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        main(["--listen", "nonsense"])
    with pytest.raises(SystemExit):
        main(["--tls-cert", "only-a-cert.pem"])
    with pytest.raises(SystemExit):
        main(["--config", '{"chunks": "lots"}'])
    with pytest.raises(SystemExit):
        main(["--config", "[1, 2]"])
