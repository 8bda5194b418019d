"""Token accounting: /admin/usage equals what the fake upstream reported, stream or not."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable
from typing import Any

import anthropic
import openai
from support import CLIENT_KEY, backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.fakeprovider import input_tokens_for
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess, wait_for


def test_usage_totals_match_the_upstream(
    certs: TestCertificates,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
) -> None:
    a1, o1 = upstream_factory("a1"), upstream_factory("o1")
    config = relay_config(certs, [backend("a1", a1)], [backend("o1", o1)],
                          admin={"address": "127.0.0.1:0"}, health={"enabled": False})
    relay = relayd_factory(config)
    base = relay.url("http")
    claude = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=base, max_retries=0)
    gpt = openai.OpenAI(api_key=CLIENT_KEY, base_url=base + "/v1", max_retries=0)
    expected: dict[str, dict[str, int]] = {}

    def add(model: str, inp: int, out: int, cache_read: int, cache_write: int) -> None:
        row = expected.setdefault(model, {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                                          "cache_read_tokens": 0, "cache_write_tokens": 0})
        row["requests"] += 1
        row["input_tokens"] += inp
        row["output_tokens"] += out
        row["cache_read_tokens"] += cache_read
        row["cache_write_tokens"] += cache_write

    messages: Any = [{"role": "user", "content": "count me"}]
    for _ in range(2):
        message = claude.messages.create(model="claude-a", max_tokens=64, messages=messages)
        u = message.usage
        add("claude-a", u.input_tokens, u.output_tokens, u.cache_read_input_tokens or 0,
            u.cache_creation_input_tokens or 0)
    with claude.messages.stream(model="claude-b", max_tokens=64, messages=messages) as stream:
        u = stream.get_final_message().usage
    add("claude-b", u.input_tokens, u.output_tokens, u.cache_read_input_tokens or 0,
        u.cache_creation_input_tokens or 0)
    completion = gpt.chat.completions.create(model="gpt-a", messages=messages)
    assert completion.usage is not None
    cached = completion.usage.prompt_tokens_details.cached_tokens or 0  # type: ignore[union-attr]
    add("gpt-a", completion.usage.prompt_tokens - cached, completion.usage.completion_tokens,
        cached, 0)
    chunks = list(gpt.chat.completions.create(model="gpt-b", messages=messages, stream=True,
                                              stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0  # type: ignore[union-attr]
    add("gpt-b", usage.prompt_tokens - cached, usage.completion_tokens, cached, 0)

    # A stream the client cuts off after message_start: what the upstream had reported by
    # then (message_start's usage) is what counts.
    a1.configure(chunk_delay=0.5, chunks=20)
    start = _read_message_start_then_hang_up(base, "claude-cut")
    u_start = start["message"]["usage"]
    add("claude-cut", u_start["input_tokens"], u_start["output_tokens"],
        u_start.get("cache_read_input_tokens", 0), u_start.get("cache_creation_input_tokens", 0))
    wait_for(lambda: "outcome=client_gone" in relay.log_text(), 15, "the cut stream to end")

    usage_doc = _admin_usage(relay)
    got = _totals_by_model(usage_doc)
    assert got == expected
    assert usage_doc["clients"]["team-a"]["requests"] == 6


def _admin_usage(relay: RelaydProcess) -> dict[str, Any]:
    with urllib.request.urlopen(relay.admin_url() + "/admin/usage", timeout=10) as response:
        document: dict[str, Any] = json.loads(response.read())
        return document


def _totals_by_model(usage_doc: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {
        e["model"]: {k: e[k] for k in ("requests", "input_tokens", "output_tokens",
                                       "cache_read_tokens", "cache_write_tokens")}
        for e in usage_doc["entries"]
    }


def _read_message_start_then_hang_up(base: str, model: str) -> dict[str, Any]:
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    body = json.dumps({"model": model, "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "count me"}]}).encode()
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"x-api-key: " + CLIENT_KEY.encode() + b"\r\nanthropic-version: 2023-06-01\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        received = b""
        while b"event: content_block_start" not in received:
            data = sock.recv(65536)
            assert data, "relay closed the stream early"
            received += data
    start = received.split(b"event: message_start\ndata: ", 1)[1].split(b"\n", 1)[0]
    parsed: dict[str, Any] = json.loads(start)
    return parsed



def test_translated_usage_is_counted_as_the_upstream_reported_it(
    certs: TestCertificates,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
) -> None:
    """Requests translated either way, JSON and streamed (an OpenAI stream that did not
    ask for the usage chunk included): the totals are the upstream's own counts."""
    a1, o1 = upstream_factory("a1"), upstream_factory("o1")
    config = relay_config(
        certs, [backend("a1", a1)], [backend("o1", o1)],
        admin={"address": "127.0.0.1:0"}, health={"enabled": False},
        routes=[
            {"api": "openai", "models": ["claude-*"], "provider": "anthropic"},
            {"api": "anthropic", "models": ["gpt-*"], "provider": "openai"},
        ],
    )
    relay = relayd_factory(config)
    base = relay.url("http")
    claude = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=base, max_retries=0)
    gpt = openai.OpenAI(api_key=CLIENT_KEY, base_url=base + "/v1", max_retries=0)
    messages: Any = [{"role": "user", "content": "count me"}]

    gpt.chat.completions.create(model="claude-o", messages=messages)
    list(gpt.chat.completions.create(model="claude-o", messages=messages, stream=True))
    claude.messages.create(model="gpt-a", max_tokens=64, messages=messages)
    with claude.messages.stream(model="gpt-a", max_tokens=64, messages=messages) as stream:
        stream.get_final_message()

    # What the fakes reported for the bodies they received (their defaults: 5 output
    # tokens; Anthropic 7 cache writes and 11 cache reads, OpenAI 11 cached reads).
    expected = {
        "claude-o": {"requests": 2, "input_tokens": 0, "output_tokens": 10,
                     "cache_read_tokens": 22, "cache_write_tokens": 14},
        "gpt-a": {"requests": 2, "input_tokens": 0, "output_tokens": 10,
                  "cache_read_tokens": 22, "cache_write_tokens": 0},
    }
    for model, upstream in (("claude-o", a1), ("gpt-a", o1)):
        recorded = upstream.requests()
        assert len(recorded) == 2
        expected[model]["input_tokens"] = sum(
            input_tokens_for(r["body"].encode()) for r in recorded
        )
    usage_doc = _admin_usage(relay)
    got = _totals_by_model(usage_doc)
    assert got == expected
