"""Anthropic Messages: ``POST /v1/messages`` (JSON or SSE) and ``POST /v1/messages/count_tokens``.

The message is the deterministic reply text, plus a ``tool_use`` block when the
request offers tools (:func:`anthropic_tool_call`).  Usage is identical in the
JSON and the streamed form: ``message_start`` carries the input and cache
counts, ``message_delta`` the final output count and, as the real API sends them,
the same cumulative input and cache counts again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Final

from relayd.testing.fakeprovider.content import padded_chunks, token_limit
from relayd.testing.fakeprovider.exchange import Exchange
from relayd.testing.fakeprovider.tool_calls import ToolCall, choose_tool, fragments
from relayd.testing.fakeprovider.wire import dumps, json_str, sse


def anthropic_usage(ex: Exchange, output_tokens: int) -> dict[str, object]:
    """A message's ``usage``: input from the body, cache counts from the knobs."""
    creation, read = ex.cache_counts()
    return {
        "input_tokens": ex.base_input,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": creation, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _delta_usage(ex: Exchange, output_tokens: int) -> dict[str, object]:
    """``message_delta.usage``: the cumulative counts, input and cache ones too.

    The real API repeats the input and cache counts of ``message_start`` here
    (cumulative, not increments), so a client must take them, not add them.
    """
    creation, read = ex.cache_counts()
    return {
        "input_tokens": ex.base_input,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "output_tokens": output_tokens,
    }


def anthropic_message(
    ex: Exchange,
    model: str,
    msg_id: str,
    text: str | None,
    stop: str | None,
    output: int,
    tool_use: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """A ``message`` object; ``text=None`` gives the empty content of ``message_start``."""
    content: list[object] = [] if text is None else [{"type": "text", "text": text}]
    if tool_use is not None:
        content.append(tool_use)
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": anthropic_usage(ex, output),
    }


_A_BLOCK_START: Final = sse(
    "content_block_start",
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
)
_A_PING: Final = sse("ping", b'{"type":"ping"}')
_A_BLOCK_STOP: Final = sse("content_block_stop", b'{"type":"content_block_stop","index":0}')
_A_TOOL_BLOCK_STOP: Final = sse("content_block_stop", b'{"type":"content_block_stop","index":1}')
_A_MESSAGE_STOP: Final = sse("message_stop", b'{"type":"message_stop"}')
_A_STREAM_ERROR: Final = sse(
    "error", b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
)


@lru_cache(maxsize=4096)
def _anthropic_delta(text: str) -> bytes:
    """The ``text_delta`` event of one reply chunk (cached: chunks repeat)."""
    return sse(
        "content_block_delta",
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
        + json_str(text)
        + b"}}",
    )


def anthropic_tool_call(req: Mapping[str, Any]) -> ToolCall | None:
    """The tool call an Anthropic request gets, or ``None`` for a plain text reply.

    Needs ``tools``; not with ``tool_choice`` ``{"type": "none"}`` nor after a
    user turn that carries a ``tool_result``.
    """
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = req.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    messages = req.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "user":
            content = last.get("content")
            if isinstance(content, list) and any(
                isinstance(block, dict) and block.get("type") == "tool_result" for block in content
            ):
                return None
    declared = [
        (tool["name"], tool.get("input_schema"))
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("name"), str)
    ]
    wanted = (
        choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" else None
    )
    return choose_tool(declared, wanted)


def _anthropic_tool_use(tool_id: str, call: ToolCall) -> dict[str, object]:
    """The ``tool_use`` content block of ``call``."""
    return {"type": "tool_use", "id": tool_id, "name": call.name, "input": call.input}


def _anthropic_tool_events(tool_id: str, call: ToolCall) -> list[bytes]:
    """Content block 1 of a stream: the ``tool_use`` start, its input in fragments, the stop."""
    block = dict(_anthropic_tool_use(tool_id, call), input={})
    start = {"type": "content_block_start", "index": 1, "content_block": block}
    events = [sse("content_block_start", dumps(start))]
    for fragment in fragments(call.arguments):
        delta = {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": fragment},
        }
        events.append(sse("content_block_delta", dumps(delta)))
    events.append(_A_TOOL_BLOCK_STOP)
    return events


def handle_messages(ex: Exchange) -> None:
    """``POST /v1/messages``: a message as JSON, or the SSE event sequence.

    The message is the reply text, plus a ``tool_use`` block when the request
    calls for one (:func:`anthropic_tool_call`) and the token limit did not cut
    the text.
    """
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    n, cut = token_limit(ex.knobs.chunks, req.get("max_tokens"))
    call = None if cut else anthropic_tool_call(req)
    stop = "max_tokens" if cut else "end_turn" if call is None else "tool_use"
    msg_id = f"msg_fake{ex.record.id:016d}"
    tool_id = f"toolu_fake{ex.record.id:016d}"
    tool_use = None if call is None else _anthropic_tool_use(tool_id, call)
    extra = 0 if call is None else 1  # the tool call counts as one output token

    def build(pieces: Sequence[str]) -> bytes:
        return dumps(
            anthropic_message(
                ex, model, msg_id, "".join(pieces), stop, len(pieces) + extra, tool_use
            )
        )

    pieces = padded_chunks(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return
    start = {
        "type": "message_start",
        "message": anthropic_message(ex, model, msg_id, None, None, 1),
    }
    events = [sse("message_start", dumps(start))]
    if ex.knobs.stream_error:
        events.append(_A_STREAM_ERROR)
        ex.send_stream(events)
        return
    events.append(_A_BLOCK_START)
    if ex.knobs.ping:
        events.append(_A_PING)
    events.extend(_anthropic_delta(piece) for piece in pieces)
    events.append(_A_BLOCK_STOP)
    if call is not None:
        events.extend(_anthropic_tool_events(tool_id, call))
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": _delta_usage(ex, n + extra),
    }
    events.append(sse("message_delta", dumps(delta)))
    events.append(_A_MESSAGE_STOP)
    ex.send_stream(events)


def handle_count_tokens(ex: Exchange) -> None:
    """``POST /v1/messages/count_tokens``: the same input count as a message would get."""
    if ex.parse_body() is not None:
        ex.send_json(200, dumps({"input_tokens": ex.base_input}))
