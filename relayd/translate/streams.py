"""Incremental SSE stream translators: Anthropic Messages <-> OpenAI Chat Completions.

Each translator takes the upstream body in whatever pieces the network delivers
(``feed``) and returns, at once, the bytes the caller's SDK should see for every event
those pieces completed; ``finish`` is called at upstream end-of-body. Input is parsed
with :class:`relayd.sse.SseParser`. ``usage`` is what the upstream reported (for
accounting), ``complete`` says a terminal event was translated and ``failed`` that an
error was sent in-stream; after either, further input is ignored and the relay should
close the response.
"""

from __future__ import annotations

from typing import Any, Literal

from relayd import jsonbody
from relayd.providers.base import Usage
from relayd.sse import SseEvent, SseParser
from relayd.translate.mapping import (
    anthropic_error,
    anthropic_id_for,
    anthropic_usage,
    finish_reason_for,
    json_bytes,
    normalize_tool_call_id,
    openai_error,
    openai_id_for,
    openai_usage,
    stop_reason_for,
    usage_from_anthropic,
    usage_from_openai,
)
from relayd.translate.responses import (
    anthropic_error_to_openai,
    openai_error_to_anthropic,
    rename_model,
)

JsonDict = dict[str, Any]

PING_COMMENT = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
_TRUNCATED = "upstream stream ended before it was complete"


def _decode(event: SseEvent) -> JsonDict | None:
    try:
        payload = jsonbody.loads(event.data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _dict(value: object) -> JsonDict:
    return value if isinstance(value, dict) else {}


class _StreamTranslator:
    """What both directions share: the SSE parser, usage, end state, and ``feed``."""

    def __init__(self) -> None:
        self._parser = SseParser()
        self.usage = Usage()
        self.complete = False
        self.failed = False

    def feed(self, chunk: bytes) -> bytes:
        """Translate the events ``chunk`` completes; returns the bytes to send now."""
        out: list[bytes] = []
        for event in self._parser.feed(chunk):
            if self.complete or self.failed:
                break
            out.append(self._on_event(event))
        return b"".join(out)

    def _on_event(self, event: SseEvent) -> bytes:
        raise NotImplementedError


class AnthropicToOpenAIStream(_StreamTranslator):
    """Anthropic ``event:`` stream in, OpenAI ``chat.completion.chunk`` stream out.

    Raw Anthropic events are never forwarded (the OpenAI SDK parses every data line as a
    chunk): pings become ``: ping`` comments and unknown events are dropped. Tool calls
    get the tool's ordinal ``k`` as their index, not the Anthropic block index.
    """

    def __init__(self, model: str, include_usage: bool, *, created: int = 0) -> None:
        super().__init__()
        self._model = model
        self._include_usage = include_usage
        self._created = created
        self._id = openai_id_for(None)
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> tool ordinal k
        self._finish_sent = False

    def finish(self) -> bytes:
        """At upstream end-of-body: an in-stream error if the stream was cut short."""
        if self.complete or self.failed:
            return b""
        self.failed = True
        return self._data(openai_error(502, _TRUNCATED))

    def _on_event(self, event: SseEvent) -> bytes:
        if event.event == b"ping":
            return PING_COMMENT
        payload = _decode(event)
        if payload is None:
            return b""
        name = event.event.decode("utf-8", "replace") if event.event else payload.get("type")
        if name == "ping":
            return PING_COMMENT
        if name == "message_start":
            return self._on_message_start(_dict(payload.get("message")))
        if name == "content_block_start":
            return self._on_block_start(payload)
        if name == "content_block_delta":
            return self._on_block_delta(payload)
        if name == "message_delta":
            usage_from_anthropic(payload.get("usage"), self.usage)
            reason = _dict(payload.get("delta")).get("stop_reason")
            return self._finish_chunk(finish_reason_for(reason))
        if name == "message_stop":
            return self._on_message_stop()
        if name == "error":
            self.failed = True
            return self._data(anthropic_error_to_openai(payload.get("error")))
        return b""  # content_block_stop and event types this version does not know

    def _on_message_start(self, message: JsonDict) -> bytes:
        if isinstance(message.get("id"), str):
            self._id = openai_id_for(message["id"])
        usage_from_anthropic(message.get("usage"), self.usage)
        return self._chunk({"role": "assistant", "content": ""})

    def _on_block_start(self, payload: JsonDict) -> bytes:
        block = _dict(payload.get("content_block"))
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            return self._chunk({"content": block["text"]})
        if kind != "tool_use":
            return b""
        k = len(self._tool_index)
        self._tool_index[payload.get("index", -1)] = k
        call = {
            "index": k,
            "id": str(block.get("id", "")),
            "type": "function",
            "function": {"name": str(block.get("name", "")), "arguments": ""},
        }
        return self._chunk({"tool_calls": [call]})

    def _on_block_delta(self, payload: JsonDict) -> bytes:
        delta = _dict(payload.get("delta"))
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return self._chunk({"content": text}) if isinstance(text, str) and text else b""
        if kind == "input_json_delta":
            k = self._tool_index.get(payload.get("index", -1))
            partial = delta.get("partial_json")
            if k is None or not isinstance(partial, str) or not partial:
                return b""
            return self._chunk({"tool_calls": [{"index": k, "function": {"arguments": partial}}]})
        return b""  # thinking, signature and citations deltas have no OpenAI form

    def _on_message_stop(self) -> bytes:
        out = [] if self._finish_sent else [self._finish_chunk("stop")]
        if self._include_usage:
            out.append(self._data(self._envelope([], openai_usage(self.usage))))
        out.append(DONE)
        self.complete = True
        return b"".join(out)

    def _finish_chunk(self, finish_reason: str) -> bytes:
        self._finish_sent = True
        return self._chunk({}, finish_reason)

    def _chunk(self, delta: JsonDict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self._data(self._envelope([choice], None))

    def _envelope(self, choices: list[JsonDict], usage: JsonDict | None) -> JsonDict:
        chunk: JsonDict = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        if self._include_usage:
            chunk["usage"] = usage
        return chunk

    @staticmethod
    def _data(payload: JsonDict) -> bytes:
        return b"data: " + json_bytes(payload) + b"\n\n"


_BlockKind = Literal["text", "tool"]


class OpenAIToAnthropicStream(_StreamTranslator):
    """OpenAI ``chat.completion.chunk`` stream in, Anthropic ``event:`` stream out.

    ``message_start`` goes out with the first chunk (input tokens 0: the count only comes
    at the end). Blocks open lazily with indexes from 0 without gaps; a block is stopped
    when the kind of content changes, a new tool call starts or the choice finishes.
    ``message_delta`` (stop reason and cumulative usage) is held until the usage chunk or
    ``[DONE]`` arrives, then ``message_stop`` follows.
    """

    def __init__(self, model: str) -> None:
        super().__init__()
        self._model = model
        self._started = False
        self._next_block = 0
        self._open: _BlockKind | None = None
        self._open_tool: int | None = None  # the OpenAI tool index of the open tool block
        self._seen_tools: set[int] = set()
        self._refused = False
        self._stop_reason: str | None = None
        self._usage_seen = False

    def finish(self) -> bytes:
        """At upstream end-of-body: the held ending if the choice finished, else an error."""
        if self.complete or self.failed:
            return b""
        if self._stop_reason is not None:
            return self._end()
        self.failed = True
        return self._event("error", anthropic_error(502, _TRUNCATED))

    def _on_event(self, event: SseEvent) -> bytes:
        if event.data.strip() == b"[DONE]":
            return self._end() if self._started else self.finish()
        payload = _decode(event)
        if payload is None:
            return b""
        if payload.get("error"):
            self.failed = True
            return self._event("error", openai_error_to_anthropic(payload["error"]))
        out = [] if self._started else [self._message_start(payload)]
        choices = payload.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    out.append(self._on_choice(choice))
        if isinstance(payload.get("usage"), dict):
            self.usage = usage_from_openai(payload["usage"])
            self._usage_seen = True
        if self._stop_reason is not None and self._usage_seen:
            out.append(self._end())
        return b"".join(out)

    def _message_start(self, payload: JsonDict) -> bytes:
        self._started = True
        message: JsonDict = {
            "id": anthropic_id_for(payload.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": anthropic_usage(Usage()),
        }
        return self._event("message_start", {"type": "message_start", "message": message})

    def _on_choice(self, choice: JsonDict) -> bytes:
        delta = _dict(choice.get("delta"))
        out: list[bytes] = []
        for key in ("content", "refusal"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                self._refused = self._refused or key == "refusal"
                out.append(self._text(text))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    out.append(self._tool_call(call))
        reason = choice.get("finish_reason")
        if reason is not None and self._stop_reason is None:
            out.append(self._close())
            self._stop_reason = "refusal" if self._refused else stop_reason_for(reason)
        return b"".join(out)

    def _text(self, text: str) -> bytes:
        out = b""
        if self._open != "text":
            out = self._close() + self._open_block("text", {"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        return out + self._delta(delta)

    def _tool_call(self, call: JsonDict) -> bytes:
        index = call.get("index", 0)
        fn = _dict(call.get("function"))
        out = b""
        if self._open != "tool" or self._open_tool != index:
            if index in self._seen_tools:
                return b""  # a fragment for a closed block cannot be sent any more
            raw_id = call.get("id")
            raw_id = raw_id if isinstance(raw_id, str) else f"call_{index}"
            block = {
                "type": "tool_use",
                "id": normalize_tool_call_id(raw_id),
                "name": str(fn.get("name", "")),
                "input": {},
            }
            out = self._close() + self._open_block("tool", block)
            self._open_tool = index
            self._seen_tools.add(index)
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        return out

    def _open_block(self, kind: _BlockKind, block: JsonDict) -> bytes:
        self._open = kind
        payload = {"type": "content_block_start", "index": self._next_block, "content_block": block}
        return self._event("content_block_start", payload)

    def _delta(self, delta: JsonDict) -> bytes:
        payload = {"type": "content_block_delta", "index": self._next_block, "delta": delta}
        return self._event("content_block_delta", payload)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        payload = {"type": "content_block_stop", "index": self._next_block}
        self._open = None
        self._open_tool = None
        self._next_block += 1
        return self._event("content_block_stop", payload)

    def _end(self) -> bytes:
        """The held ``message_delta`` (cumulative usage) and ``message_stop``."""
        self.complete = True
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None},
            "usage": anthropic_usage(self.usage),
        }
        return (
            self._close()
            + self._event("message_delta", delta)
            + self._event("message_stop", {"type": "message_stop"})
        )

    @staticmethod
    def _event(name: str, payload: JsonDict) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + json_bytes(payload) + b"\n\n"


class ModelRenamingStream(_StreamTranslator):
    """A stream of the client's own family, with the client's model name put back.

    Events that name no model pass through as they came (re-framed: comments and
    ``id:`` lines are dropped, as relayd's parser does not keep them); the others are
    decoded, renamed with :func:`rename_model` and re-encoded. It never ends the stream
    by itself: ``complete`` and ``failed`` stay false.
    """

    def __init__(self, model: str) -> None:
        super().__init__()
        self._model = model

    def finish(self) -> bytes:
        return b""

    def _on_event(self, event: SseEvent) -> bytes:
        data = event.data
        if b'"model"' in data:
            payload = _decode(event)
            if payload is not None and rename_model(payload, self._model):
                data = json_bytes(payload)
        head = b"event: " + event.event + b"\n" if event.event is not None else b""
        return head + b"data: " + data.replace(b"\n", b"\ndata: ") + b"\n\n"
