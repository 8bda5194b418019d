"""OpenAI Chat Completions and legacy Completions: JSON, or ``data:`` chunks ending in ``[DONE]``.

Both stream the deterministic reply one chunk per token, with the usage chunk
only when ``stream_options.include_usage`` asks for it (as the real API does).
A Chat request that offers function ``tools`` is answered with a tool call
after the text (:func:`openai_tool_call`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, Final

from relayd.testing.fakeprovider.content import padded_chunks, token_limit
from relayd.testing.fakeprovider.exchange import Exchange
from relayd.testing.fakeprovider.tool_calls import ToolCall, choose_tool, fragments
from relayd.testing.fakeprovider.wire import DONE, dumps, json_str, sse_data


def openai_usage(ex: Exchange, completion: int) -> dict[str, object]:
    """Chat/Completions ``usage``: the prompt count includes the cached tokens, as OpenAI's does."""
    cached = ex.knobs.cache_read_input_tokens
    prompt = ex.base_input + cached
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_OPENAI_STREAM_ERROR: Final = sse_data(
    b'{"error":{"message":"The server had an error while processing your request. '
    b'Sorry about that!","type":"server_error","param":null,"code":null}}'
)
_CHAT_ROLE: Final = (
    b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}'
)


def _include_usage(req: Mapping[str, Any]) -> bool:
    """Whether a streamed request asked for the final usage chunk."""
    options = req.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_tool_call(req: Mapping[str, Any]) -> ToolCall | None:
    """The tool call a Chat Completions request gets, or ``None`` for a plain text reply.

    Needs function ``tools``; not with ``tool_choice`` ``"none"`` nor when the
    last message is a ``tool`` result.
    """
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = req.get("tool_choice")
    if choice == "none":
        return None
    messages = req.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "tool":
            return None
    functions = [tool.get("function") for tool in tools if isinstance(tool, dict)]
    declared = [
        (function["name"], function.get("parameters"))
        for function in functions
        if isinstance(function, dict) and isinstance(function.get("name"), str)
    ]
    wanted = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        named = choice.get("function")
        wanted = named.get("name") if isinstance(named, dict) else None
    return choose_tool(declared, wanted)


def _chat_tool_delta(tool_call: Mapping[str, object]) -> bytes:
    """The choice body of a chunk whose delta carries one ``tool_calls`` entry."""
    return (
        b'{"index":0,"delta":{"tool_calls":['
        + dumps(tool_call)
        + b']},"logprobs":null,"finish_reason":null}'
    )


def _chat_tool_chunks(call_id: str, call: ToolCall) -> list[bytes]:
    """Choice bodies of a streamed tool call: id and name, then the arguments in fragments."""
    function = {"name": call.name, "arguments": ""}
    bodies = [
        _chat_tool_delta({"index": 0, "id": call_id, "type": "function", "function": function})
    ]
    bodies.extend(
        _chat_tool_delta({"index": 0, "function": {"arguments": fragment}})
        for fragment in fragments(call.arguments)
    )
    return bodies


def handle_chat(ex: Exchange) -> None:
    """``POST /v1/chat/completions``: JSON, or ``data:`` chunks ending in ``[DONE]``.

    Chunks are assembled from a per-request prefix and cached text literals,
    because this is the hot path of the benchmarks.  The reply text is followed
    by a tool call when the request calls for one (:func:`openai_tool_call`)
    and the token limit did not cut the text.
    """
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    n, cut = token_limit(ex.knobs.chunks, max_tokens)
    call = None if cut else openai_tool_call(req)
    finish = "length" if cut else "stop" if call is None else "tool_calls"
    chat_id = f"chatcmpl-fake{ex.record.id:016d}"
    call_id = f"call_fake{ex.record.id:016d}"
    created = int(ex.provider.clock.seconds())
    extra = 0 if call is None else 1  # the tool call counts as one completion token
    tool_calls: dict[str, object] = {}
    if call is not None:
        function = {"name": call.name, "arguments": call.arguments}
        tool_calls["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]

    def build(pieces: Sequence[str]) -> bytes:
        return dumps(
            {
                "id": chat_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(pieces),
                            **tool_calls,
                            "refusal": None,
                            "annotations": [],
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": openai_usage(ex, len(pieces) + extra),
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    pieces = padded_chunks(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return
    with_usage = _include_usage(req)
    prefix = _chunk_prefix(
        chat_id, b"chat.completion.chunk", created, model, b',"service_tier":"default"'
    )
    bodies: Iterable[bytes] = (
        b'{"index":0,"delta":{"content":'
        + json_str(piece)
        + b'},"logprobs":null,"finish_reason":null}'
        for piece in pieces
    )
    if call is not None:
        bodies = chain(bodies, _chat_tool_chunks(call_id, call))
    _send_chunk_stream(
        ex,
        prefix,
        with_usage,
        n + extra,
        first=_CHAT_ROLE,
        pieces=bodies,
        last=b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
        + finish.encode("ascii")
        + b'"}',
    )


def _chunk_prefix(
    chunk_id: str, object_name: bytes, created: int, model: str, extra: bytes = b""
) -> bytes:
    """The start of every chunk of one stream, up to and including ``"choices":[``."""
    return (
        b'{"id":"'
        + chunk_id.encode("ascii")
        + b'","object":"'
        + object_name
        + b'","created":'
        + b"%d" % created
        + b',"model":'
        + json_str(model)
        + extra
        + b',"system_fingerprint":"fp_fake","choices":['
    )


def _send_chunk_stream(
    ex: Exchange,
    prefix: bytes,
    with_usage: bool,
    n: int,
    *,
    first: bytes | None,
    pieces: Iterable[bytes],
    last: bytes,
) -> None:
    """A ``data:`` chunk stream (Chat and legacy Completions share the framing).

    Each choice body is wrapped in ``prefix`` ... suffix; the stream ends with the
    optional usage chunk (``n`` completion tokens) and ``[DONE]``; ``stream_error``
    cuts it after ``first``.
    """
    suffix = b'],"usage":null}' if with_usage else b"]}"
    events = [sse_data(prefix + first + suffix)] if first is not None else []
    if ex.knobs.stream_error:
        events.append(_OPENAI_STREAM_ERROR)
        ex.send_stream(events)
        return
    events.extend(sse_data(prefix + body + suffix) for body in pieces)
    events.append(sse_data(prefix + last + suffix))
    if with_usage:
        events.append(sse_data(prefix + b'],"usage":' + dumps(openai_usage(ex, n)) + b"}"))
    events.append(DONE)
    ex.send_stream(events)


def handle_completions(ex: Exchange) -> None:
    """``POST /v1/completions`` (legacy): JSON or ``data:`` chunks like chat."""
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    n, cut = token_limit(ex.knobs.chunks, req.get("max_tokens"))
    finish = "length" if cut else "stop"
    cmpl_id = f"cmpl-fake{ex.record.id:016d}"
    created = int(ex.provider.clock.seconds())

    def build(pieces: Sequence[str]) -> bytes:
        return dumps(
            {
                "id": cmpl_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}
                ],
                "usage": openai_usage(ex, len(pieces)),
                "system_fingerprint": "fp_fake",
            }
        )

    pieces = padded_chunks(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return
    with_usage = _include_usage(req)
    prefix = _chunk_prefix(cmpl_id, b"text_completion", created, model)
    _send_chunk_stream(
        ex,
        prefix,
        with_usage,
        n,
        first=None,
        pieces=(
            b'{"text":' + json_str(piece) + b',"index":0,"logprobs":null,"finish_reason":null}'
            for piece in pieces
        ),
        last=b'{"text":"","index":0,"logprobs":null,"finish_reason":"'
        + finish.encode("ascii")
        + b'"}',
    )
