"""Hostile bodies, from clients and from upstreams: each a clear answer in the caller's
error shape, never a 500 with a critical traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import Harness, base_config
from twisted.web.server import Request


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
