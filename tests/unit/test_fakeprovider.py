"""Tests for the fake Anthropic/OpenAI upstream (relayd.testing.fakeprovider).

Most tests serve the fake on a real 127.0.0.1 port of the test reactor while
the fake's own timers run on a ``task.Clock`` the test drives, so latency and
pacing are checked without sleeping.  The official SDKs (which are blocking)
are exercised in a worker thread against the same in-process server, and once
more against the CLI started as a subprocess.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from http.client import HTTPSConnection
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import anthropic
import openai
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet import threads
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

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

reactor = cast(Any, global_reactor)
Gen = Generator[Any, Any, None]

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


class Fake:
    """An in-process fake upstream on a real port, with a driven clock."""

    def __init__(self, site: FakeSite, port: IListeningPort, clock: Clock) -> None:
        self.site = site
        self.port = port
        self.clock = clock
        self.provider: FakeProvider = site.provider
        self.base = f"http://127.0.0.1:{cast(Any, port).getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        self.http = HTTPClient(self.agent)

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs: dict[bytes | str, bytes | str] = {"content-type": "application/json"}
        hdrs.update(headers or {})
        return cast(
            "Deferred[Any]",
            self.http.request(
                method, self.base + path, data=data, headers=hdrs, unbuffered=unbuffered
            ),
        )

    def post(self, path: str, body: object, **kw: Any) -> Deferred[Any]:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw: Any) -> Deferred[Any]:
        return self.request("GET", path, **kw)

    def call(self, method: str, path: str, body: object = None, **kw: Any) -> Deferred[Any]:
        """Fires with (response, parsed JSON body)."""

        def read(response: Any) -> Deferred[Any]:
            content: Deferred[bytes] = treq.content(response)
            return content.addCallback(lambda raw: (response, json.loads(raw)))

        return self.request(method, path, body, **kw).addCallback(read)


class Sink:
    """Collects a streamed body and lets a test wait for a given byte string."""

    def __init__(self) -> None:
        self.data = b""
        self._waiters: list[tuple[bytes, Deferred[None]]] = []

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        ready = [w for w in self._waiters if w[0] in self.data]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, waiter in ready:
            waiter.callback(None)

    def wait_for(self, needle: bytes) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if needle in self.data:
            waiter.callback(None)
        else:
            self._waiters.append((needle, waiter))
        return waiter


class FirstChunkThenAbort(Protocol):
    """A body reader that reports the first data and can abort the connection."""

    def __init__(self) -> None:
        self.got_data: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.got_data.called:
            self.got_data.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass

    def abort(self) -> None:
        """Stop producing the body, which makes Twisted's client drop the connection."""
        assert self.transport is not None
        cast(Any, self.transport).stopProducing()


def track(pending: Deferred[Any]) -> list[object]:
    """A list that gets an item once ``pending`` has a result (``.called`` is not
    reliable for chained Deferreds)."""
    seen: list[object] = []

    def note(result: object) -> object:
        seen.append(result)
        return result

    pending.addBoth(note)
    return seen


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


@pytest.fixture
def start_fake() -> Iterator[Callable[..., Fake]]:
    """Factory for in-process fakes; every port is closed at teardown."""
    started: list[Fake] = []

    def start(**kwargs: Any) -> Fake:
        clock = Clock()
        site = make_site(clock, **kwargs)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        fake = Fake(site, port, clock)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        pytest_twisted.blockon(maybeDeferred(fake.port.stopListening))


@pytest.fixture
def fake(start_fake: Callable[..., Fake]) -> Fake:
    return start_fake()


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


@pytest_twisted.inlineCallbacks
def test_anthropic_json_shape_and_headers(fake: Fake) -> Gen:
    raw = json.dumps(ANTHROPIC_BODY).encode()
    response = yield fake.post("/v1/messages", None, raw=raw)
    body = json.loads((yield treq.content(response)))
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


@pytest_twisted.inlineCallbacks
def test_anthropic_stream_order_and_usage_matches_json(fake: Fake) -> Gen:
    plain, streaming = same_length_bodies(ANTHROPIC_BODY)
    response = yield fake.post("/v1/messages", None, raw=plain)
    json_usage = json.loads((yield treq.content(response)))["usage"]

    response = yield fake.post("/v1/messages", None, raw=streaming)
    assert header(response, "content-type") == "text/event-stream; charset=utf-8"
    assert header(response, "cache-control") == "no-cache"
    assert header(response, "content-length") is None
    raw = yield treq.content(response)
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


@pytest_twisted.inlineCallbacks
def test_anthropic_max_tokens_cuts_reply(fake: Fake) -> Gen:
    _, body = yield fake.call("POST", "/v1/messages", dict(ANTHROPIC_BODY, max_tokens=2))
    assert body["content"][0]["text"] == "Hello from"
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 2


@pytest_twisted.inlineCallbacks
def test_anthropic_count_tokens_models_and_batches(fake: Fake) -> Gen:
    count_body = {"model": "claude-test-1", "messages": ANTHROPIC_BODY["messages"]}
    _, counted = yield fake.call("POST", "/v1/messages/count_tokens", count_body)
    assert counted == {"input_tokens": input_tokens_for(json.dumps(count_body).encode())}

    _, models = yield fake.call("GET", "/v1/models", headers={"anthropic-version": "2023-06-01"})
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
    _, batch = yield fake.call("POST", "/v1/messages/batches", batch_request)
    assert batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress"
    assert batch["request_counts"]["processing"] == 2
    _, fetched = yield fake.call("GET", f"/v1/messages/batches/{batch['id']}")
    assert fetched["processing_status"] == "ended"
    assert fetched["request_counts"]["succeeded"] == 2
    assert fetched["results_url"].endswith(f"/v1/messages/batches/{batch['id']}/results")
    response = yield fake.get(f"/v1/messages/batches/{batch['id']}/results")
    lines = (yield treq.content(response)).decode().splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in results] == ["one", "two"]
    assert results[0]["result"]["message"]["content"][0]["text"] == REPLY
    missing, error = yield fake.call("GET", "/v1/messages/batches/msgbatch_nope")
    assert missing.code == 404 and error["error"]["type"] == "not_found_error"


# ------------------------------------------------------------------------- OpenAI


@pytest_twisted.inlineCallbacks
def test_openai_chat_json_and_stream_usage(fake: Fake) -> Gen:
    base = dict(CHAT_BODY, stream_options={"include_usage": True})
    plain, streaming = same_length_bodies(base)
    response = yield fake.post("/v1/chat/completions", None, raw=plain)
    body = json.loads((yield treq.content(response)))
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

    response = yield fake.post("/v1/chat/completions", None, raw=streaming)
    assert header(response, "content-type") == "text/event-stream; charset=utf-8"
    assert header(response, "cache-control") == "no-cache"
    raw = yield treq.content(response)
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


@pytest_twisted.inlineCallbacks
def test_openai_chat_stream_without_include_usage(fake: Fake) -> Gen:
    response = yield fake.post("/v1/chat/completions", dict(CHAT_BODY, stream=True))
    events = parse_sse((yield treq.content(response)))
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 1 + 5 + 1
    assert all("usage" not in c and c["choices"] for c in chunks)


@pytest_twisted.inlineCallbacks
def test_openai_completions_and_embeddings(fake: Fake) -> Gen:
    _, completion = yield fake.call("POST", "/v1/completions", {"model": "m", "prompt": "hi"})
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == REPLY
    response = yield fake.post(
        "/v1/completions",
        {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    )
    events = parse_sse((yield treq.content(response)))
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == REPLY
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    request = {"model": "text-embedding-3-small", "input": ["a", "b", "c"], "dimensions": 4}
    _, floats = yield fake.call("POST", "/v1/embeddings", dict(request, encoding_format="float"))
    _, b64 = yield fake.call("POST", "/v1/embeddings", dict(request, encoding_format="base64"))
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    for as_float, as_b64 in zip(floats["data"], b64["data"], strict=True):
        assert len(as_float["embedding"]) == 4
        decoded = struct.unpack("<4f", base64.b64decode(as_b64["embedding"]))
        assert list(decoded) == as_float["embedding"]
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"]
    _, single = yield fake.call("POST", "/v1/embeddings", {"model": "e", "input": [1, 2, 3]})
    assert len(single["data"]) == 1 and len(single["data"][0]["embedding"]) == 16


@pytest_twisted.inlineCallbacks
def test_openai_responses_json_and_stream(fake: Fake) -> Gen:
    base = {"model": "gpt-test-1", "input": "Say hello"}
    plain, streaming = same_length_bodies(base)
    response = yield fake.post("/v1/responses", None, raw=plain)
    body = json.loads((yield treq.content(response)))
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == REPLY
    assert body["usage"]["output_tokens"] == 5
    assert body["usage"]["input_tokens"] == input_tokens_for(plain) + 11

    response = yield fake.post("/v1/responses", None, raw=streaming)
    events = parse_sse((yield treq.content(response)))
    datas = [json.loads(d) for _, d in events]
    assert [n for n, _ in events] == [d["type"] for d in datas]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    names = [n for n, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    deltas = [d["delta"] for d in datas if d["type"] == "response.output_text.delta"]
    assert "".join(deltas) == REPLY
    assert datas[-1]["response"]["usage"] == body["usage"]


@pytest_twisted.inlineCallbacks
def test_models_family_follows_anthropic_version_header(fake: Fake) -> Gen:
    _, openai_list = yield fake.call("GET", "/v1/models")
    assert openai_list["object"] == "list"
    assert {m["object"] for m in openai_list["data"]} == {"model"}
    assert all({"id", "created", "owned_by"} <= m.keys() for m in openai_list["data"])
    _, anthropic_list = yield fake.call(
        "GET", "/v1/models", headers={"anthropic-version": "2026-10-21"}
    )
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


@pytest_twisted.inlineCallbacks
def test_anthropic_tool_call_json(fake: Fake) -> Gen:
    response, body = yield fake.call("POST", "/v1/messages", ANTHROPIC_TOOL_BODY)
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


@pytest_twisted.inlineCallbacks
def test_anthropic_tool_call_stream_matches_json(fake: Fake) -> Gen:
    plain, streaming = same_length_bodies(ANTHROPIC_TOOL_BODY)
    response = yield fake.post("/v1/messages", None, raw=plain)
    json_body = json.loads((yield treq.content(response)))

    response = yield fake.post("/v1/messages", None, raw=streaming)
    raw = yield treq.content(response)
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


@pytest_twisted.inlineCallbacks
def test_anthropic_tool_choice_names_the_tool(fake: Fake) -> Gen:
    choice = {"type": "tool", "name": "get_time"}
    body = dict(ANTHROPIC_TOOL_BODY, tool_choice=choice)
    _, message = yield fake.call("POST", "/v1/messages", body)
    assert message["content"][1]["name"] == "get_time"
    assert message["content"][1]["input"] == {"zone": "fake"}

    response = yield fake.post("/v1/messages", dict(body, stream=True))
    datas = sse_datas((yield treq.content(response)))
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
        _, message = yield fake.call(
            "POST", "/v1/messages", dict(ANTHROPIC_TOOL_BODY, tool_choice={"type": kind})
        )
        assert message["content"][1]["name"] == "get_weather"


@pytest_twisted.inlineCallbacks
def test_anthropic_tools_without_a_tool_call(fake: Fake) -> Gen:
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
        _, message = yield fake.call("POST", "/v1/messages", body)
        assert message["content"] == [{"type": "text", "text": REPLY}]
        assert message["stop_reason"] == "end_turn"
        assert message["usage"]["output_tokens"] == 5
        response = yield fake.post("/v1/messages", dict(body, stream=True))
        datas = sse_datas((yield treq.content(response)))
        assert [d["type"] for d in datas].count("content_block_start") == 1
        assert datas[-2]["delta"]["stop_reason"] == "end_turn"
        assert datas[-2]["usage"]["output_tokens"] == 5


@pytest_twisted.inlineCallbacks
def test_anthropic_max_tokens_cut_drops_the_tool_call(fake: Fake) -> Gen:
    body = dict(ANTHROPIC_TOOL_BODY, max_tokens=2)
    _, message = yield fake.call("POST", "/v1/messages", body)
    assert message["content"] == [{"type": "text", "text": "Hello from"}]
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 2
    response = yield fake.post("/v1/messages", dict(body, stream=True))
    datas = sse_datas((yield treq.content(response)))
    assert not any(d.get("index") == 1 for d in datas)
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens"
    assert datas[-2]["usage"]["output_tokens"] == 2


@pytest_twisted.inlineCallbacks
def test_anthropic_tool_stream_honours_knobs(fake: Fake) -> Gen:
    body = dict(ANTHROPIC_TOOL_BODY, stream=True)
    response = yield fake.post("/v1/messages", body, headers={"x-fake-stream-error": "1"})
    assert [n for n, _ in parse_sse((yield treq.content(response)))] == ["message_start", "error"]

    response = yield fake.post("/v1/messages", body, headers={"x-fake-ping": "1"})
    names = [n for n, _ in parse_sse((yield treq.content(response)))]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names.count("ping") == 1

    response = yield fake.post("/v1/messages", body, headers={"x-fake-truncate-after": "10"})
    events = parse_sse((yield treq.content(response)))
    assert len(events) == 10 and events[8][0] == "content_block_start"
    assert fake.provider.requests[-1].finished


@pytest_twisted.inlineCallbacks
def test_openai_tool_call_json(fake: Fake) -> Gen:
    _, body = yield fake.call("POST", "/v1/chat/completions", CHAT_TOOL_BODY)
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


@pytest_twisted.inlineCallbacks
def test_openai_tool_call_stream_matches_json(fake: Fake) -> Gen:
    base = dict(CHAT_TOOL_BODY, stream_options={"include_usage": True})
    plain, streaming = same_length_bodies(base)
    response = yield fake.post("/v1/chat/completions", None, raw=plain)
    json_body = json.loads((yield treq.content(response)))

    response = yield fake.post("/v1/chat/completions", None, raw=streaming)
    raw = yield treq.content(response)
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


@pytest_twisted.inlineCallbacks
def test_openai_tool_choice_names_the_tool(fake: Fake) -> Gen:
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = dict(CHAT_TOOL_BODY, tool_choice=choice)
    _, completion = yield fake.call("POST", "/v1/chat/completions", body)
    function = completion["choices"][0]["message"]["tool_calls"][0]["function"]
    assert function == {"name": "get_time", "arguments": '{"zone":"fake"}'}

    response = yield fake.post("/v1/chat/completions", dict(body, stream=True))
    chunks = sse_datas((yield treq.content(response)))
    calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_time"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"zone":"fake"}'

    for mode in ("auto", "required"):
        _, completion = yield fake.call(
            "POST", "/v1/chat/completions", dict(CHAT_TOOL_BODY, tool_choice=mode)
        )
        assert completion["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == (
            "get_weather"
        )


@pytest_twisted.inlineCallbacks
def test_openai_tools_without_a_tool_call(fake: Fake) -> Gen:
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
        _, completion = yield fake.call("POST", "/v1/chat/completions", body)
        choice = completion["choices"][0]
        assert choice["message"]["content"] == REPLY
        assert "tool_calls" not in choice["message"]
        assert choice["finish_reason"] == "stop"
        assert completion["usage"]["completion_tokens"] == 5
        streaming = dict(body, stream=True, stream_options={"include_usage": True})
        response = yield fake.post("/v1/chat/completions", streaming)
        chunks = sse_datas((yield treq.content(response)))
        assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 5


@pytest_twisted.inlineCallbacks
def test_openai_max_tokens_cut_drops_the_tool_call(fake: Fake) -> Gen:
    body = dict(CHAT_TOOL_BODY, max_completion_tokens=2)
    _, completion = yield fake.call("POST", "/v1/chat/completions", body)
    choice = completion["choices"][0]
    assert choice["message"]["content"] == "Hello from"
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 2
    streaming = dict(body, stream=True, stream_options={"include_usage": True})
    response = yield fake.post("/v1/chat/completions", streaming)
    chunks = sse_datas((yield treq.content(response)))
    assert len(chunks) == 1 + 2 + 1 + 1
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# -------------------------------------------------------------------------- knobs


@pytest_twisted.inlineCallbacks
def test_status_knob_error_shapes(fake: Fake) -> Gen:
    expected = {
        400: "invalid_request_error",
        401: "authentication_error",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }
    for status, kind in expected.items():
        response, body = yield fake.call(
            "POST",
            "/v1/messages",
            ANTHROPIC_BODY,
            headers={"x-fake-status": str(status), "x-fake-retry-after": "7"},
        )
        assert response.code == status
        assert body["type"] == "error" and body["error"]["type"] == kind
        assert body["request_id"] == header(response, "request-id")
        assert header(response, "retry-after") == "7"

    response, body = yield fake.call(
        "POST", "/v1/chat/completions", CHAT_BODY, headers={"x-fake-status": "429"}
    )
    assert response.code == 429
    assert header(response, "retry-after") is None
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"
    response, body = yield fake.call(
        "POST", "/v1/chat/completions", CHAT_BODY, headers={"x-fake-status": "500"}
    )
    assert body["error"]["type"] == "server_error"


@pytest_twisted.inlineCallbacks
def test_latency_waits_for_the_clock(fake: Fake) -> Gen:
    pending = fake.post("/v1/messages", ANTHROPIC_BODY, headers={"x-fake-latency": "2.5"})
    answered = track(pending)
    yield fake.provider.wait_for(lambda p: len(p.requests) == 1)
    fake.clock.advance(2.4)
    assert not answered
    assert fake.provider.requests[0].status is None
    fake.clock.advance(0.1)
    response = yield pending
    assert response.code == 200
    assert json.loads((yield treq.content(response)))["content"][0]["text"] == REPLY


@pytest_twisted.inlineCallbacks
def test_chunk_delay_writes_one_event_per_tick(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/messages",
        dict(ANTHROPIC_BODY, stream=True),
        headers={"x-fake-chunk-delay": "1"},
        unbuffered=True,
    )
    sink = Sink()
    done = treq.collect(response, sink)
    record = fake.provider.requests[0]
    yield sink.wait_for(b"event: message_start")
    assert record.events_sent == 1
    fake.clock.advance(1)
    yield sink.wait_for(b"event: content_block_start")
    assert record.events_sent == 2 and b"content_block_delta" not in sink.data
    for _ in range(8):
        fake.clock.advance(1)
    yield done
    assert [n for n, _ in parse_sse(sink.data)][-1] == "message_stop"
    assert record.events_sent == 10 and record.finished


@pytest_twisted.inlineCallbacks
def test_drop_after_breaks_the_stream(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/messages",
        dict(ANTHROPIC_BODY, stream=True),
        headers={"x-fake-drop-after": "3"},
        unbuffered=True,
    )
    assert response.code == 200
    sink = Sink()
    with pytest.raises(ResponseFailed):
        yield treq.collect(response, sink)
    assert [n for n, _ in parse_sse(sink.data)] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    record = fake.provider.requests[0]
    assert record.events_sent == 3
    assert record.aborted and not record.finished and not record.client_disconnected


@pytest_twisted.inlineCallbacks
def test_drop_after_with_pacing_breaks_the_stream(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/chat/completions",
        dict(CHAT_BODY, stream=True),
        headers={"x-fake-drop-after": "2", "x-fake-chunk-delay": "0.5"},
        unbuffered=True,
    )
    sink = Sink()
    done = treq.collect(response, sink)
    fake.clock.advance(0.5)
    with pytest.raises(ResponseFailed):
        yield done
    assert len(parse_sse(sink.data)) == 2


@pytest_twisted.inlineCallbacks
def test_drop_after_json_sends_half_the_body(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/chat/completions", CHAT_BODY, headers={"x-fake-drop-after": "0"}, unbuffered=True
    )
    length = response.length  # Twisted's client moves content-length here
    sink = Sink()
    with pytest.raises(ResponseFailed):
        yield treq.collect(response, sink)
    assert len(sink.data) == length // 2 > 0


@pytest_twisted.inlineCallbacks
def test_truncate_after_finishes_cleanly(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/messages", dict(ANTHROPIC_BODY, stream=True), headers={"x-fake-truncate-after": "4"}
    )
    events = parse_sse((yield treq.content(response)))
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
    ]
    record = fake.provider.requests[0]
    assert record.finished and not record.aborted and record.events_sent == 4


@pytest_twisted.inlineCallbacks
def test_hang_until_client_disconnects(fake: Fake) -> Gen:
    pending = fake.post("/v1/messages", ANTHROPIC_BODY, headers={"x-fake-hang": "1"})
    answered = track(pending)
    yield fake.provider.wait_for(lambda p: len(p.requests) == 1)
    fake.clock.advance(3600)
    assert not answered
    pending.cancel()
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        yield pending
    yield fake.provider.wait_for(lambda p: p.requests[0].client_disconnected)
    record = fake.provider.requests[0]
    assert not record.finished and record.status is None


@pytest_twisted.inlineCallbacks
def test_disconnect_during_latency_cancels_the_timer(fake: Fake) -> Gen:
    pending = fake.post("/v1/messages", ANTHROPIC_BODY, headers={"x-fake-latency": "123"})
    yield fake.provider.wait_for(lambda p: len(p.requests) == 1)
    assert 123 in [call.getTime() for call in fake.clock.getDelayedCalls()]
    pending.cancel()
    with pytest.raises((CancelledError, ResponseNeverReceived)):
        yield pending
    yield fake.provider.wait_for(lambda p: p.requests[0].client_disconnected)
    assert 123 not in [call.getTime() for call in fake.clock.getDelayedCalls()]
    fake.clock.advance(200)
    assert fake.provider.requests[0].status is None


@pytest_twisted.inlineCallbacks
def test_disconnect_mid_stream_stops_writing(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/messages",
        dict(ANTHROPIC_BODY, stream=True),
        headers={"x-fake-chunk-delay": "7"},
        unbuffered=True,
    )
    reader = FirstChunkThenAbort()
    response.deliverBody(reader)
    yield reader.got_data
    assert 7 in [call.getTime() for call in fake.clock.getDelayedCalls()]
    reader.abort()
    yield fake.provider.wait_for(lambda p: p.requests[0].client_disconnected)
    assert 7 not in [call.getTime() for call in fake.clock.getDelayedCalls()]
    fake.clock.advance(100)
    assert fake.provider.requests[0].events_sent == 1


@pytest_twisted.inlineCallbacks
def test_stream_error_after_message_start(fake: Fake) -> Gen:
    response = yield fake.post(
        "/v1/messages", dict(ANTHROPIC_BODY, stream=True), headers={"x-fake-stream-error": "true"}
    )
    events = parse_sse((yield treq.content(response)))
    assert [n for n, _ in events] == ["message_start", "error"]
    assert json.loads(events[1][1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


@pytest_twisted.inlineCallbacks
def test_gzip_encodes_json(fake: Fake) -> Gen:
    headers = Headers({b"x-fake-gzip": [b"1"], b"content-type": [b"application/json"]})
    producer = FileBodyProducer(BytesIO(json.dumps(ANTHROPIC_BODY).encode()))
    response = yield fake.agent.request(
        b"POST", (fake.base + "/v1/messages").encode(), headers, producer
    )
    raw = yield treq.content(response)
    assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert response.length == len(raw)
    assert json.loads(gzip.decompress(raw))["content"][0]["text"] == REPLY


@pytest_twisted.inlineCallbacks
def test_body_bytes_pads_json_and_stream_alike(fake: Fake) -> Gen:
    plain, streaming = same_length_bodies(ANTHROPIC_BODY)
    knob = {"x-fake-body-bytes": "4096"}
    response = yield fake.post("/v1/messages", None, raw=plain, headers=knob)
    raw = yield treq.content(response)
    assert len(raw) == 4096
    text = json.loads(raw)["content"][0]["text"]
    response = yield fake.post("/v1/messages", None, raw=streaming, headers=knob)
    events = parse_sse((yield treq.content(response)))
    deltas = [json.loads(d)["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert "".join(deltas) == text and len(deltas) == 5


@pytest_twisted.inlineCallbacks
def test_bad_knob_is_a_400(fake: Fake) -> Gen:
    response, body = yield fake.call(
        "POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-chunks": "many"}
    )
    assert response.code == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "chunks" in body["error"]["message"]


# -------------------------------------------------------- control and inspection


@pytest_twisted.inlineCallbacks
def test_request_log_and_reset(fake: Fake) -> Gen:
    raw = json.dumps(ANTHROPIC_BODY).encode()
    yield fake.call(
        "POST",
        "/v1/messages?beta=true",
        None,
        raw=raw,
        headers={"x-api-key": "sk-test", "anthropic-version": "2023-06-01"},
    )
    yield fake.call("GET", "/_fake/health")
    _, log = yield fake.call("GET", "/_fake/requests")
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

    _, reset = yield fake.call("POST", "/_fake/reset")
    assert reset == {"ok": True, "cleared": 1}
    _, log = yield fake.call("GET", "/_fake/requests")
    assert log == []
    yield fake.call("GET", "/v1/models")
    yield fake.call("GET", "/v1/models")
    _, log = yield fake.call("GET", "/_fake/requests?since=2")
    assert [e["id"] for e in log] == [3]


@pytest_twisted.inlineCallbacks
def test_log_is_capped(start_fake: Callable[..., Fake]) -> Gen:
    small = start_fake(max_log=3)
    for _ in range(5):
        yield small.call("GET", "/v1/models")
    assert [r.id for r in small.provider.requests] == [3, 4, 5]


@pytest_twisted.inlineCallbacks
def test_config_endpoint_and_header_override(fake: Fake) -> Gen:
    response, config = yield fake.call("POST", "/_fake/config", {"chunks": 3, "gzip": False})
    assert response.code == 200 and config["chunks"] == 3
    _, body = yield fake.call("POST", "/v1/messages", ANTHROPIC_BODY)
    assert body["content"][0]["text"] == reply_text(3)
    _, body = yield fake.call(
        "POST", "/v1/messages", ANTHROPIC_BODY, headers={"x-fake-chunks": "2"}
    )
    assert body["usage"]["output_tokens"] == 2
    _, current = yield fake.call("GET", "/_fake/config")
    assert current["chunks"] == 3

    response, config = yield fake.call("POST", "/_fake/config", {"status": 503})
    assert config["chunks"] == 5  # replace semantics: unspecified knobs are defaults
    response, _ = yield fake.call("POST", "/v1/chat/completions", CHAT_BODY)
    assert response.code == 503
    response, _ = yield fake.call(
        "POST", "/v1/chat/completions", CHAT_BODY, headers={"x-fake-status": ""}
    )
    assert response.code == 200  # the header switches the instance fault off

    yield fake.call("POST", "/_fake/config", {})
    response, _ = yield fake.call("POST", "/v1/chat/completions", CHAT_BODY)
    assert response.code == 200
    response, error = yield fake.call("POST", "/_fake/config", {"bogus": 1})
    assert response.code == 400 and "bogus" in error["error"]
    _, log = yield fake.call("GET", "/_fake/requests")
    assert all(not e["path"].startswith("/_fake") for e in log)


@pytest_twisted.inlineCallbacks
def test_unknown_paths_and_methods(fake: Fake) -> Gen:
    response, body = yield fake.call("GET", "/v1/nothing")
    assert response.code == 404 and body["error"]["type"] == "invalid_request_error"
    response, body = yield fake.call("GET", "/v1/messages")
    assert response.code == 405 and body["type"] == "error"
    response, body = yield fake.call("POST", "/v1/messages", None, raw=b"{not json")
    assert response.code == 400 and body["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------ official SDKs (thread)


@pytest_twisted.inlineCallbacks
def test_official_sdks_parse_everything_in_process(fake: Fake) -> Gen:
    def use_sdks() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with anthropic.Anthropic(api_key="k", base_url=fake.base, max_retries=0) as client:
            message = client.messages.create(**ANTHROPIC_BODY)
            out["a_text"] = message.content[0].text
            out["a_usage"] = message.usage.output_tokens
            out["a_count"] = client.messages.count_tokens(
                model="m", messages=ANTHROPIC_BODY["messages"]
            ).input_tokens
            out["a_models"] = [m.id for m in client.models.list()]
            batch = client.messages.batches.create(
                requests=[{"custom_id": "x", "params": cast(Any, ANTHROPIC_BODY)}]
            )
            out["a_batch"] = client.messages.batches.retrieve(batch.id).processing_status
            out["a_results"] = [r.custom_id for r in client.messages.batches.results(batch.id)]
            try:
                client.messages.create(**ANTHROPIC_BODY, extra_headers={"x-fake-status": "529"})
            except anthropic.APIStatusError as exc:
                out["a_error"] = exc.status_code
            try:
                with client.messages.stream(
                    **ANTHROPIC_BODY, extra_headers={"x-fake-stream-error": "1"}
                ) as stream:
                    list(stream)
            except anthropic.APIStatusError as exc:
                out["a_stream_error"] = str(exc)
        with openai.OpenAI(api_key="k", base_url=fake.base + "/v1", max_retries=0) as oai:
            out["o_text"] = oai.chat.completions.create(**CHAT_BODY).choices[0].message.content
            out["o_completion"] = oai.completions.create(model="m", prompt="x").choices[0].text
            embedded = oai.embeddings.create(model="e", input=["a", "b"])  # base64 by default
            out["o_embedding"] = [len(e.embedding) for e in embedded.data]
            out["o_response"] = oai.responses.create(model="m", input="hi").output_text
            with oai.responses.stream(model="m", input="hi") as rstream:
                final = rstream.get_final_response()
            usage = final.usage
            out["o_stream_response"] = (final.output_text, usage and usage.output_tokens)
            out["o_models"] = [m.id for m in oai.models.list()]
            try:
                oai.chat.completions.create(**CHAT_BODY, extra_headers={"x-fake-status": "429"})
            except openai.RateLimitError as exc:
                out["o_error"] = exc.status_code
        return out

    out = yield threads.deferToThread(use_sdks)
    assert out["a_text"] == REPLY and out["a_usage"] == 5
    assert out["a_count"] > 0
    assert len(out["a_models"]) == 3
    assert out["a_batch"] == "ended" and out["a_results"] == ["x"]
    assert out["a_error"] == 529
    assert "overloaded_error" in out["a_stream_error"]
    assert out["o_text"] == REPLY and out["o_completion"] == REPLY
    assert out["o_embedding"] == [16, 16]
    assert out["o_response"] == REPLY
    assert out["o_stream_response"] == (REPLY, 5)
    assert "gpt-4o" in out["o_models"]
    assert out["o_error"] == 429


@pytest_twisted.inlineCallbacks
def test_official_sdks_parse_tool_calls_in_process(fake: Fake) -> Gen:
    strict_tools = [
        {"type": "function", "function": dict(tool["function"], strict=True)}
        for tool in CHAT_TOOL_BODY["tools"]
    ]

    def use_sdks() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with anthropic.Anthropic(api_key="k", base_url=fake.base, max_retries=0) as client:
            message = client.messages.create(**ANTHROPIC_TOOL_BODY)
            out["a_json"] = [block.to_dict() for block in message.content]
            out["a_json_stop"] = message.stop_reason
            with client.messages.stream(**ANTHROPIC_TOOL_BODY) as stream:
                final = stream.get_final_message()
            out["a_stream"] = [block.to_dict() for block in final.content]
            out["a_stream_usage"] = final.usage.output_tokens
        with openai.OpenAI(api_key="k", base_url=fake.base + "/v1", max_retries=0) as oai:
            completion = oai.chat.completions.create(**CHAT_TOOL_BODY)
            calls = completion.choices[0].message.tool_calls or []
            out["o_json"] = [c.to_dict() for c in calls]
            with oai.chat.completions.stream(
                **dict(CHAT_TOOL_BODY, tools=strict_tools),
                stream_options={"include_usage": True},
            ) as ostream:
                done = ostream.get_final_completion()
            choice = done.choices[0]
            out["o_stream"] = [
                (c.function.name, c.function.arguments, c.function.parsed_arguments)
                for c in choice.message.tool_calls or []
            ]
            out["o_stream_finish"] = choice.finish_reason
            out["o_stream_text"] = choice.message.content
            out["o_stream_usage"] = done.usage and done.usage.completion_tokens
        return out

    out = yield threads.deferToThread(use_sdks)
    expected_block = {"type": "tool_use", "name": "get_weather", "input": TOOL_INPUT}
    assert (out["a_json"][0]["type"], out["a_json"][0]["text"]) == ("text", REPLY)
    assert {k: out["a_json"][1][k] for k in expected_block} == expected_block
    assert out["a_json_stop"] == "tool_use"
    assert out["a_stream"][0]["text"] == REPLY
    assert {k: out["a_stream"][1][k] for k in expected_block} == expected_block
    assert out["a_stream_usage"] == 6
    assert out["o_json"][0]["function"] == {
        "name": "get_weather",
        "arguments": compact(TOOL_INPUT),
    }
    assert out["o_stream"] == [("get_weather", compact(TOOL_INPUT), TOOL_INPUT)]
    assert out["o_stream_finish"] == "tool_calls"
    assert out["o_stream_text"] == REPLY
    assert out["o_stream_usage"] == 6


# ----------------------------------------------------------------- CLI subprocess


def _start_cli(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relayd.testing.fakeprovider",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"fake upstream exited: {proc.communicate()}")
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            raise AssertionError("fake upstream did not write its port file")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _stop_cli(proc: subprocess.Popen[str]) -> tuple[str, str]:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.communicate()


def test_cli_subprocess_with_official_sdks(tmp_path: Path) -> None:
    proc, port = _start_cli(tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        with anthropic.Anthropic(api_key="k", base_url=base, max_retries=0) as client:
            with client.messages.stream(**ANTHROPIC_BODY) as stream:
                streamed = "".join(stream.text_stream)
                final = stream.get_final_message()
        with openai.OpenAI(api_key="k", base_url=base + "/v1", max_retries=0) as oai:
            chunks = list(
                oai.chat.completions.create(
                    **CHAT_BODY, stream=True, stream_options={"include_usage": True}
                )
            )
    finally:
        out, err = _stop_cli(proc)
    assert out == f"fake-upstream listening on http://127.0.0.1:{port}\n"
    assert "Traceback" not in err
    assert streamed == REPLY
    assert final.content[0].text == REPLY  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5
    assert final.usage.cache_read_input_tokens == 11
    assert final.usage.cache_creation_input_tokens == 7
    assert final.usage.input_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 11


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_cli_serves_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    proc, port = _start_cli(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        connection = HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        connection.request("GET", "/_fake/health")
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
        connection.close()
    finally:
        out, _ = _stop_cli(proc)
    assert out == f"fake-upstream listening on https://127.0.0.1:{port}\n"
    assert (status, body) == (200, {"ok": True})


def test_cli_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        main(["--listen", "nonsense"])
    with pytest.raises(SystemExit):
        main(["--tls-cert", "only-a-cert.pem"])
    with pytest.raises(SystemExit):
        main(["--config", '{"chunks": "lots"}'])
