"""SSE keepalive comments through a real relay, read raw and by both official SDKs.

The fake upstream pauses between events longer than ``stream_keepalive``, so relayd
writes comments into every pause; the raw read shows they are there, and the SDKs must
parse the streams as if they were not.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import openai
import pytest
from support import CLIENT_KEY, backend, relay_config

from relayd.sse import SseParser
from relayd.testing.certs import TestCertificates
from relayd.testing.processes import FakeUpstreamProcess, ProcessGroup, RelaydProcess

KEEPALIVE = 0.1
PAUSE = 0.35  # seconds between two upstream events: about three intervals
CHUNKS = 2


@dataclass
class Setup:
    relay: RelaydProcess
    anthropic_up: FakeUpstreamProcess
    openai_up: FakeUpstreamProcess

    @property
    def port(self) -> int:
        return int(self.relay.url().rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def setup(certs: TestCertificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with ProcessGroup(tmp_path_factory.mktemp("keepalive")) as processes:
        a1, o1 = processes.upstream("a1"), processes.upstream("o1")
        for upstream in (a1, o1):
            upstream.configure(chunk_delay=PAUSE, chunks=CHUNKS)
        config = relay_config(certs, [backend("a1", a1)], [backend("o1", o1)],
                              stream_keepalive=KEEPALIVE)
        yield Setup(processes.relay(config), a1, o1)


def raw_stream(setup: Setup, path: str, body: dict[str, object],
               headers: dict[str, str]) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", setup.port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body),
                     {"content-type": "application/json", **headers})
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


def test_pauses_carry_comments_and_the_events_are_the_upstreams(setup: Setup) -> None:
    body = raw_stream(
        setup, "/v1/messages",
        {"model": "claude-x", "max_tokens": 64, "stream": True,
         "messages": [{"role": "user", "content": "hi"}]},
        {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
    )
    assert b"\n\n: keepalive\n\n" in body  # between two events
    events = SseParser().feed(body)
    assert [e.event for e in events] == [
        b"message_start", b"content_block_start", *[b"content_block_delta"] * CHUNKS,
        b"content_block_stop", b"message_delta", b"message_stop",
    ]
    assert b"event: error" not in body


def anthropic_client(setup: Setup) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=CLIENT_KEY, base_url=setup.relay.url(), max_retries=0)


def test_the_anthropic_sdk_ignores_the_comments(setup: Setup) -> None:
    with anthropic_client(setup).messages.stream(
        model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) == CHUNKS and "".join(texts) == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == CHUNKS


def test_the_openai_sdk_ignores_the_comments(setup: Setup) -> None:
    client = openai.OpenAI(api_key=CLIENT_KEY, base_url=setup.relay.url() + "/v1",
                           max_retries=0)
    chunks = list(client.chat.completions.create(
        model="gpt-x", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}],
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == CHUNKS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
