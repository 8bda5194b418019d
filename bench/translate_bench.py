"""CPU cost of translation, in process: what a translated request adds to the relay path.

Times, per operation, with the bench's request shape (``relayd.testing.loadgen.message_body``) and
the fake upstream's answer shapes: translating the request body both ways (decode,
translate, encode, as the relay does), a JSON answer both ways, and a 10-event stream
both ways (fed event by event, as it arrives). Prints one table; takes a few seconds.

    .venv/bin/python bench/translate_bench.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from relayd.testing.loadgen import message_body
from relayd.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)

TEXT = ["Hello", " from", " fake-upstream.", " Deterministic", " reply."]


def _sse(event: str | None, payload: object) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n").encode()


def anthropic_answer() -> dict[str, object]:
    return {
        "id": "msg_fake0000000000000001",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "".join(TEXT)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 242, "cache_creation_input_tokens": 7,
                  "cache_read_input_tokens": 11, "output_tokens": 5},
    }


def openai_answer() -> dict[str, object]:
    return {
        "id": "chatcmpl-fake0000000000000001",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(TEXT)},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 253, "completion_tokens": 5, "total_tokens": 258,
                  "prompt_tokens_details": {"cached_tokens": 11}},
    }


def anthropic_events() -> list[bytes]:
    start = {"type": "message_start", "message": dict(anthropic_answer(), content=[],
                                                        stop_reason=None)}
    events = [_sse("message_start", start),
              _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})]
    events += [
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": t}})
        for t in TEXT
    ]
    events += [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]
    return events


def openai_chunks() -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o"}

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse(None, dict(base, choices=[choice]))

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": t}) for t in TEXT]
    events.append(chunk({}, "stop"))
    events.append(_sse(None, dict(base, choices=[], usage=openai_answer()["usage"])))
    events.append(b"data: [DONE]\n\n")
    return events


def timed(rounds: int, operation: Callable[[], object]) -> float:
    """Microseconds of process CPU per call."""
    for _ in range(min(rounds, 200)):
        operation()
    start = time.process_time()
    for _ in range(rounds):
        operation()
    return (time.process_time() - start) / rounds * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    rounds = parser.parse_args().rounds

    a_body = message_body(stream=False)
    o_body = json.dumps(
        anthropic_to_openai_request(json.loads(a_body), strict=False, target_model=None).body
    ).encode()
    a_answer = json.dumps(anthropic_answer()).encode()
    o_answer = json.dumps(openai_answer()).encode()
    a_events = anthropic_events()
    o_events = openai_chunks()

    def o2a_request() -> bytes:
        out = openai_to_anthropic_request(
            json.loads(o_body), default_max_tokens=4096, anthropic_version="2023-06-01",
            strict=False, target_model="claude-sonnet-4-5",
        )
        return json.dumps(out.body).encode()

    def a2o_request() -> bytes:
        out = anthropic_to_openai_request(json.loads(a_body), strict=False, target_model="gpt-4o")
        return json.dumps(out.body).encode()

    def a2o_answer() -> bytes:
        return json.dumps(anthropic_to_openai_response(json.loads(a_answer), model="m")).encode()

    def o2a_answer() -> bytes:
        return json.dumps(openai_to_anthropic_response(json.loads(o_answer), model="m")).encode()

    def a2o_stream() -> int:
        translator = AnthropicToOpenAIStream("m", include_usage=True)
        return sum(len(translator.feed(event)) for event in a_events) + len(translator.finish())

    def o2a_stream() -> int:
        translator = OpenAIToAnthropicStream("m")
        return sum(len(translator.feed(event)) for event in o_events) + len(translator.finish())

    rows = [
        ("request, OpenAI -> Anthropic", len(o_body), o2a_request),
        ("request, Anthropic -> OpenAI", len(a_body), a2o_request),
        ("JSON answer, Anthropic -> OpenAI", len(a_answer), a2o_answer),
        ("JSON answer, OpenAI -> Anthropic", len(o_answer), o2a_answer),
        ("stream (10 events), Anthropic -> OpenAI", sum(map(len, a_events)), a2o_stream),
        ("stream (9 chunks), OpenAI -> Anthropic", sum(map(len, o_events)), o2a_stream),
    ]
    print(f"translation CPU, {rounds} rounds each, Python {sys.version.split()[0]}\n")
    print("| operation | input bytes | CPU µs per operation |")
    print("| --- | ---: | ---: |")
    for name, size, operation in rows:
        print(f"| {name} | {size} | {timed(rounds, operation):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
