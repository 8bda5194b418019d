"""SSE stream translation, both directions, fed in many splits (one byte at a time too)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from relayd.providers.base import Usage
from relayd.translate import AnthropicToOpenAIStream, OpenAIToAnthropicStream

JsonDict = dict[str, Any]
Splitter = Callable[[bytes], list[bytes]]


class Translator(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def fixed(size: int) -> Splitter:
    def split(data: bytes) -> list[bytes]:
        return [data[i:i + size] for i in range(0, len(data), size)]

    split.__name__ = f"every_{size}_bytes"
    return split


def whole(data: bytes) -> list[bytes]:
    return [data]


def at_blank_lines(data: bytes) -> list[bytes]:
    """Each piece ends right after an event's blank line (how a fast upstream flushes)."""
    pieces = data.split(b"\n\n")
    return [p + b"\n\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def mid_crlf(data: bytes) -> list[bytes]:
    """Splits between every ``\\r`` and ``\\n`` (only changes CRLF inputs)."""
    return [piece for part in data.split(b"\r") for piece in (part, b"\r")][:-1]


SPLITTERS: list[Splitter] = [whole, fixed(1), fixed(2), fixed(3), fixed(7), fixed(64),
                             at_blank_lines, mid_crlf]


SPLIT = pytest.mark.parametrize("splitter", SPLITTERS, ids=lambda s: s.__name__)


def feed(translator: Translator, data: bytes, splitter: Splitter) -> bytes:
    """Everything the translator sends while ``data`` arrives in ``splitter``'s pieces."""
    return b"".join(translator.feed(piece) for piece in splitter(data))


def run(translator: Translator, data: bytes, splitter: Splitter) -> bytes:
    """As :func:`feed`, then the upstream body ends."""
    return feed(translator, data, splitter) + translator.finish()


def sse(name: str, payload: JsonDict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def data(payload: JsonDict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def compact(payload: JsonDict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --- Anthropic -> OpenAI ------------------------------------------------------------------

A_START = sse("message_start", {"type": "message_start", "message": {
    "id": "msg_01XYZ", "type": "message", "role": "assistant", "model": "claude-upstream",
    "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_creation_input_tokens": 3,
              "cache_read_input_tokens": 100, "output_tokens": 1},
}})
A_STREAM = b"".join([
    A_START,
    sse("ping", {"type": "ping"}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "thinking", "thinking": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "signature_delta", "signature": "s1g"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("content_block_start", {"type": "content_block_start", "index": 1,
                                "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "text_delta", "text": "Hel"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "text_delta", "text": "lo €"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "citations_delta", "citation": {}}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("brand_new_event", {"type": "brand_new_event"}),
    sse("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 2,
                                "delta": {"type": "input_json_delta", "partial_json": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 2,
                                "delta": {"type": "input_json_delta", "partial_json": '{"q":'}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 2,
                                "delta": {"type": "input_json_delta", "partial_json": '"x"}'}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 2}),
    sse("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {
        "type": "tool_use", "id": "toolu_2", "name": "now", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 3,
                                "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 3}),
    sse("message_delta", {"type": "message_delta",
                          "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 25}}),
    sse("message_stop", {"type": "message_stop"}),
])


def o_chunk(delta: JsonDict, finish: str | None = None, *, usage_key: bool = True) -> bytes:
    chunk: JsonDict = {
        "id": "chatcmpl-01XYZ", "object": "chat.completion.chunk", "created": 0,
        "model": "client-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage_key:
        chunk["usage"] = None
    return b"data: " + compact(chunk) + b"\n\n"


def o_tool_start(k: int, call_id: str, name: str, *, usage_key: bool = True) -> bytes:
    return o_chunk({"tool_calls": [{"index": k, "id": call_id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]},
                   usage_key=usage_key)


def o_tool_args(k: int, arguments: str, *, usage_key: bool = True) -> bytes:
    return o_chunk({"tool_calls": [{"index": k, "function": {"arguments": arguments}}]},
                   usage_key=usage_key)


def expected_openai(include_usage: bool) -> bytes:
    u = include_usage
    parts = [
        o_chunk({"role": "assistant", "content": ""}, usage_key=u),
        b": ping\n\n",
        o_chunk({"content": "Hel"}, usage_key=u),
        o_chunk({"content": "lo €"}, usage_key=u),
        o_tool_start(0, "toolu_1", "get", usage_key=u),
        o_tool_args(0, '{"q":', usage_key=u),
        o_tool_args(0, '"x"}', usage_key=u),
        o_tool_start(1, "toolu_2", "now", usage_key=u),
        o_tool_args(1, "{}", usage_key=u),
        o_chunk({}, "tool_calls", usage_key=u),
    ]
    if include_usage:
        parts.append(b"data: " + compact({
            "id": "chatcmpl-01XYZ", "object": "chat.completion.chunk", "created": 0,
            "model": "client-model", "choices": [],
            "usage": {"prompt_tokens": 113, "completion_tokens": 25, "total_tokens": 138,
                      "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 3}},
        }) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


@SPLIT
@pytest.mark.parametrize("include_usage", [True, False])
def test_anthropic_to_openai_stream(splitter: Splitter, include_usage: bool) -> None:
    translator = AnthropicToOpenAIStream("client-model", include_usage)
    assert run(translator, A_STREAM, splitter) == expected_openai(include_usage)
    assert translator.usage == Usage(input_tokens=10, output_tokens=25, cache_read_tokens=100,
                                     cache_write_tokens=3)
    assert (translator.complete, translator.failed) == (True, False)


@SPLIT
def test_anthropic_to_openai_stream_with_crlf(splitter: Splitter) -> None:
    translator = AnthropicToOpenAIStream("client-model", True)
    assert run(translator, A_STREAM.replace(b"\n", b"\r\n"), splitter) == expected_openai(True)


@SPLIT
def test_anthropic_first_event_is_translated_at_once(splitter: Splitter) -> None:
    translator = AnthropicToOpenAIStream("client-model", False)
    outputs = [translator.feed(piece) for piece in splitter(A_START)]
    assert outputs[-1] == o_chunk({"role": "assistant", "content": ""}, usage_key=False)
    assert not any(outputs[:-1])
    assert feed(translator, sse("ping", {"type": "ping"}), splitter) == b": ping\n\n"


@SPLIT
def test_anthropic_created_is_stamped(splitter: Splitter) -> None:
    translator = AnthropicToOpenAIStream("m", False, created=1700000000)
    assert b'"created":1700000000,' in feed(translator, A_START, splitter)


A_ERROR = sse("error", {"type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"}})


@SPLIT
def test_anthropic_in_stream_error(splitter: Splitter) -> None:
    translator = AnthropicToOpenAIStream("client-model", True)
    text = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "Hi"}})
    out = run(translator, A_START + text + A_ERROR + text, splitter)
    assert out == (
        o_chunk({"role": "assistant", "content": ""})
        + o_chunk({"content": "Hi"})
        + b'data: {"error":{"message":"Overloaded","type":"server_error","param":null,'
        b'"code":"server_is_overloaded"}}\n\n'
    )
    assert (translator.complete, translator.failed) == (False, True)
    assert translator.usage == Usage(input_tokens=10, output_tokens=1, cache_read_tokens=100,
                                     cache_write_tokens=3)


@SPLIT
def test_anthropic_truncated_stream_ends_with_an_error(splitter: Splitter) -> None:
    translator = AnthropicToOpenAIStream("client-model", False)
    out = run(translator, A_START + b"event: content_block_del", splitter)
    assert out == (
        o_chunk({"role": "assistant", "content": ""}, usage_key=False)
        + b'data: {"error":{"message":"upstream stream ended before it was complete",'
        b'"type":"server_error","param":null,"code":"bad_gateway"}}\n\n'
    )
    assert translator.failed


@SPLIT
def test_anthropic_message_stop_without_message_delta_still_finishes(splitter: Splitter) -> None:
    translator = AnthropicToOpenAIStream("client-model", False)
    stream = A_START + sse("message_stop", {"type": "message_stop"})
    assert run(translator, stream, splitter) == (
        o_chunk({"role": "assistant", "content": ""}, usage_key=False)
        + o_chunk({}, "stop", usage_key=False)
        + b"data: [DONE]\n\n"
    )
    assert translator.complete


@SPLIT
@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
     ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", "stop"),
     ("model_context_window_exceeded", "length")],
)
def test_anthropic_stream_stop_reasons(
    splitter: Splitter, stop_reason: str, finish_reason: str
) -> None:
    translator = AnthropicToOpenAIStream("client-model", False)
    stream = A_START + sse("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": stop_reason},
                                             "usage": {"output_tokens": 3}})
    assert feed(translator, stream, splitter) == (
        o_chunk({"role": "assistant", "content": ""}, usage_key=False)
        + o_chunk({}, finish_reason, usage_key=False)
    )


# --- OpenAI -> Anthropic ------------------------------------------------------------------


def chat_chunk(delta: JsonDict | None, finish: str | None = None, **extra: Any) -> JsonDict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-upstream", "choices": choices, "usage": None, **extra}


O_USAGE: JsonDict = {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
                     "prompt_tokens_details": {"cached_tokens": 20}}
O_FIRST = data(chat_chunk({"role": "assistant", "content": "", "refusal": None}))
O_BODY = b"".join([
    data(chat_chunk({"content": "Hi "})),
    data(chat_chunk({"content": "thére"})),
    data(chat_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get", "arguments": ""}}]})),
    data(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]})),
    data(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
    data(chat_chunk({"tool_calls": [{"index": 1, "id": "call.2", "type": "function",
                                     "function": {"name": "now", "arguments": "{}"}}]})),
])
O_FINISH = data(chat_chunk({}, "tool_calls"))
O_USAGE_CHUNK = data(chat_chunk(None, usage=O_USAGE))
O_DONE = b"data: [DONE]\n\n"
O_STREAM = O_FIRST + O_BODY + O_FINISH + O_USAGE_CHUNK + O_DONE


def a_event(name: str, payload: JsonDict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + compact(payload) + b"\n\n"


A_MESSAGE_START = a_event("message_start", {"type": "message_start", "message": {
    "id": "msg_9", "type": "message", "role": "assistant", "model": "client-model",
    "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0},
}})


def block_start(index: int, block: JsonDict) -> bytes:
    return a_event("content_block_start",
                   {"type": "content_block_start", "index": index, "content_block": block})


def block_delta(index: int, delta: JsonDict) -> bytes:
    return a_event("content_block_delta",
                   {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> bytes:
    return a_event("content_block_stop", {"type": "content_block_stop", "index": index})


def message_end(stop_reason: str, usage: JsonDict) -> bytes:
    return a_event("message_delta", {
        "type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": usage,
    }) + a_event("message_stop", {"type": "message_stop"})


A_BLOCKS = b"".join([
    block_start(0, {"type": "text", "text": ""}),
    block_delta(0, {"type": "text_delta", "text": "Hi "}),
    block_delta(0, {"type": "text_delta", "text": "thére"}),
    block_stop(0),
    block_start(1, {"type": "tool_use", "id": "call_1", "name": "get", "input": {}}),
    block_delta(1, {"type": "input_json_delta", "partial_json": '{"q":'}),
    block_delta(1, {"type": "input_json_delta", "partial_json": "1}"}),
    block_stop(1),
    block_start(2, {"type": "tool_use", "id": "call_2_bf9fb854", "name": "now", "input": {}}),
    block_delta(2, {"type": "input_json_delta", "partial_json": "{}"}),
])
A_ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0}
A_FULL_USAGE = {"input_tokens": 30, "output_tokens": 9, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 20}


@SPLIT
def test_openai_to_anthropic_stream(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    assert run(translator, O_STREAM, splitter) == (
        A_MESSAGE_START + A_BLOCKS + block_stop(2) + message_end("tool_use", A_FULL_USAGE)
    )
    assert translator.usage == Usage(input_tokens=30, output_tokens=9, cache_read_tokens=20)
    assert (translator.complete, translator.failed) == (True, False)


@SPLIT
def test_openai_to_anthropic_stream_with_crlf(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    assert run(translator, O_STREAM.replace(b"\n", b"\r\n"), splitter) == (
        A_MESSAGE_START + A_BLOCKS + block_stop(2) + message_end("tool_use", A_FULL_USAGE)
    )


@SPLIT
def test_openai_message_start_comes_with_the_first_chunk(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    outputs = [translator.feed(piece) for piece in splitter(O_FIRST)]
    assert outputs[-1] == A_MESSAGE_START
    assert not any(outputs[:-1])


@SPLIT
def test_openai_message_delta_is_held_until_usage(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    assert feed(translator, O_FIRST + O_BODY, splitter) == A_MESSAGE_START + A_BLOCKS
    assert feed(translator, O_FINISH, splitter) == block_stop(2)
    assert feed(translator, O_USAGE_CHUNK, splitter) == message_end("tool_use", A_FULL_USAGE)
    assert feed(translator, O_DONE, splitter) == b""
    assert translator.finish() == b""


@SPLIT
def test_openai_done_without_usage_ends_with_zero_usage(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    stream = O_FIRST + data(chat_chunk({"content": "x"})) + data(chat_chunk({}, "length"))
    assert run(translator, stream + O_DONE, splitter) == (
        A_MESSAGE_START
        + block_start(0, {"type": "text", "text": ""})
        + block_delta(0, {"type": "text_delta", "text": "x"})
        + block_stop(0)
        + message_end("max_tokens", A_ZERO_USAGE)
    )
    assert translator.usage == Usage()


@SPLIT
def test_openai_usage_in_the_finish_chunk_ends_at_once(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    stream = O_FIRST + data(chat_chunk({}, "stop", usage=O_USAGE))
    assert feed(translator, stream, splitter) == (
        A_MESSAGE_START + message_end("end_turn", A_FULL_USAGE)
    )


@SPLIT
def test_openai_text_after_tool_opens_a_new_block_and_refusal_is_text(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    stream = (
        O_FIRST
        + data(chat_chunk({"tool_calls": [{"index": 0, "id": "c", "function": {
            "name": "f", "arguments": "{}"}}]}))
        + data(chat_chunk({"refusal": "No."}))
        + data(chat_chunk({}, "stop"))
        + O_DONE
    )
    assert run(translator, stream, splitter) == (
        A_MESSAGE_START
        + block_start(0, {"type": "tool_use", "id": "c", "name": "f", "input": {}})
        + block_delta(0, {"type": "input_json_delta", "partial_json": "{}"})
        + block_stop(0)
        + block_start(1, {"type": "text", "text": ""})
        + block_delta(1, {"type": "text_delta", "text": "No."})
        + block_stop(1)
        + message_end("refusal", A_ZERO_USAGE)
    )


@SPLIT
@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
     ("content_filter", "refusal"), ("function_call", "tool_use")],
)
def test_openai_stream_finish_reasons(
    splitter: Splitter, finish_reason: str, stop_reason: str
) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    stream = O_FIRST + data(chat_chunk({}, finish_reason)) + O_USAGE_CHUNK
    assert feed(translator, stream, splitter) == (
        A_MESSAGE_START + message_end(stop_reason, A_FULL_USAGE)
    )


O_ERROR = data({"error": {"message": "Rate limited", "type": "requests", "param": None,
                          "code": "rate_limit_exceeded"}})


@SPLIT
def test_openai_in_stream_error(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    out = run(translator, O_FIRST + data(chat_chunk({"content": "a"})) + O_ERROR + O_DONE,
              splitter)
    assert out == (
        A_MESSAGE_START
        + block_start(0, {"type": "text", "text": ""})
        + block_delta(0, {"type": "text_delta", "text": "a"})
        + a_event("error", {"type": "error", "error": {"type": "rate_limit_error",
                                                       "message": "Rate limited"}})
    )
    assert (translator.complete, translator.failed) == (False, True)


@SPLIT
def test_openai_error_before_any_chunk_is_only_an_error(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    assert run(translator, O_ERROR + O_DONE, splitter) == a_event("error", {
        "type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}})


@SPLIT
def test_openai_truncated_stream_ends_with_an_error(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    out = run(translator, O_FIRST + data(chat_chunk({"content": "a"})) + b"data: {\"id", splitter)
    assert out == (
        A_MESSAGE_START
        + block_start(0, {"type": "text", "text": ""})
        + block_delta(0, {"type": "text_delta", "text": "a"})
        + a_event("error", {"type": "error", "error": {
            "type": "api_error",
            "message": "upstream stream ended before it was complete"}})
    )
    assert translator.failed


@SPLIT
def test_openai_stream_ending_after_finish_without_done_is_complete(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    assert feed(translator, O_FIRST + data(chat_chunk({}, "stop")), splitter) == A_MESSAGE_START
    assert translator.finish() == message_end("end_turn", A_ZERO_USAGE)
    assert translator.complete


@SPLIT
def test_openai_fragment_for_a_closed_tool_is_not_sent(splitter: Splitter) -> None:
    translator = OpenAIToAnthropicStream("client-model")
    feed(translator, O_FIRST + O_BODY, splitter)
    late = data(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "x"}}]}))
    assert feed(translator, late, splitter) == b""
