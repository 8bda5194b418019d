"""OpenAI Responses: ``POST /v1/responses`` as JSON, or the typed SSE event sequence.

Streamed events carry ``sequence_number`` and end with ``response.completed``
(``response.incomplete`` when ``max_output_tokens`` cut the reply), whose
``response.usage`` equals the JSON form's.
"""

from __future__ import annotations

from collections.abc import Sequence

from relayd.testing.fakeprovider.content import padded_chunks, token_limit
from relayd.testing.fakeprovider.exchange import Exchange
from relayd.testing.fakeprovider.wire import dumps, sse


def _responses_usage(ex: Exchange, output: int) -> dict[str, object]:
    cached = ex.knobs.cache_read_input_tokens
    prompt = ex.base_input + cached
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def handle_responses(ex: Exchange) -> None:
    """``POST /v1/responses``: JSON, or the typed event sequence with ``sequence_number``."""
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    max_output = req.get("max_output_tokens")
    n, cut = token_limit(ex.knobs.chunks, max_output)
    resp_id = f"resp_fake{ex.record.id:016d}"
    item_id = f"msg_fake{ex.record.id:016d}"
    created = int(ex.provider.clock.seconds())
    final_status = "incomplete" if cut else "completed"

    def message(text: str, status: str) -> dict[str, object]:
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    def response(status: str, output: list[object], usage: object) -> dict[str, object]:
        return {
            "id": resp_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": req.get("instructions"),
            "max_output_tokens": max_output,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": req.get("store", True),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": req.get("metadata") or {},
        }

    def build(pieces: Sequence[str]) -> bytes:
        done = message("".join(pieces), final_status)
        return dumps(response(final_status, [done], _responses_usage(ex, len(pieces))))

    pieces = padded_chunks(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return

    events: list[bytes] = []

    def emit(kind: str, **fields: object) -> None:
        fields = {"type": kind, **fields, "sequence_number": len(events)}
        events.append(sse(kind, dumps(fields)))

    emit("response.created", response=response("in_progress", [], None))
    if ex.knobs.stream_error:
        emit(
            "error",
            code="server_error",
            message="The server had an error while processing your request. Sorry about that!",
            param=None,
        )
        ex.send_stream(events)
        return
    emit("response.in_progress", response=response("in_progress", [], None))
    emit(
        "response.output_item.added",
        output_index=0,
        item=dict(message("", "in_progress"), content=[]),
    )
    empty_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    emit("response.content_part.added", **where, part=empty_part)
    for piece in pieces:
        emit("response.output_text.delta", **where, delta=piece, logprobs=[])
    text = "".join(pieces)
    emit("response.output_text.done", **where, text=text, logprobs=[])
    emit("response.content_part.done", **where, part=dict(empty_part, text=text))
    done = message(text, final_status)
    emit("response.output_item.done", output_index=0, item=done)
    emit(
        f"response.{final_status}", response=response(final_status, [done], _responses_usage(ex, n))
    )
    ex.send_stream(events)
