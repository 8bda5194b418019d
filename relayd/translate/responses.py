"""JSON response bodies and error bodies: Anthropic Messages <-> OpenAI Chat Completions.

The client-visible ``model`` is always the name the client asked for (the ``model``
argument), never the upstream's. ``created`` is the Unix time to stamp on an OpenAI
body; the caller passes its clock's time (this module reads no clock).
"""

from __future__ import annotations

from typing import Any

from relayd import jsonbody
from relayd.translate.mapping import (
    Family,
    anthropic_error,
    anthropic_id_for,
    anthropic_usage,
    compact_json,
    finish_reason_for,
    json_bytes,
    normalize_tool_call_id,
    openai_error,
    openai_id_for,
    openai_status_for,
    openai_usage,
    status_for_anthropic_error_type,
    status_for_openai_error,
    stop_reason_for,
    usage_from_anthropic,
    usage_from_openai,
)

JsonDict = dict[str, Any]


def anthropic_to_openai_response(body: JsonDict, *, model: str, created: int = 0) -> JsonDict:
    """A ``chat.completion`` for an Anthropic ``message``.

    Text blocks are joined into ``content`` (null when there is none); ``tool_use``
    blocks become ``tool_calls`` with their ``input`` as a compact JSON string. Thinking,
    citations and server-tool blocks have no Chat Completions form and are left out.
    """
    texts: list[str] = []
    calls: list[JsonDict] = []
    for block in _list(body.get("content")):
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name", "")),
                        "arguments": compact_json(block.get("input", {})),
                    },
                }
            )
    message: JsonDict = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": openai_id_for(body.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason_for(body.get("stop_reason")),
            }
        ],
        "usage": openai_usage(usage_from_anthropic(body.get("usage"))),
    }


def openai_to_anthropic_response(body: JsonDict, *, model: str) -> JsonDict:
    """An Anthropic ``message`` for a ``chat.completion`` (its first choice).

    ``content`` and ``refusal`` become text blocks (a refusal also sets ``stop_reason``
    to ``refusal``); ``tool_calls`` become ``tool_use`` blocks with normalised ids and
    parsed arguments (``{}`` when the upstream's arguments are not a JSON object).
    """
    choices = _list(body.get("choices"))
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[JsonDict] = []
    for key in ("content", "refusal"):
        text = message.get(key)
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
    for call in _list(message.get("tool_calls")):
        if isinstance(call, dict):
            content.append(_tool_use(call))
    stop_reason = stop_reason_for(choice.get("finish_reason"))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        stop_reason = "refusal"
    return {
        "id": anthropic_id_for(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": anthropic_usage(usage_from_openai(body.get("usage"))),
    }


def _tool_use(call: JsonDict) -> JsonDict:
    fn = call.get("function")
    fn = fn if isinstance(fn, dict) else {}
    arguments = fn.get("arguments")
    parsed: object = {}
    if isinstance(arguments, str) and arguments:
        try:
            parsed = jsonbody.loads(arguments)
        except ValueError:
            parsed = {}
    return {
        "type": "tool_use",
        "id": normalize_tool_call_id(str(call.get("id", ""))),
        "name": str(fn.get("name", "")),
        "input": parsed if isinstance(parsed, dict) else {},
    }


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


# --- errors -------------------------------------------------------------------------------


def error_message(body: object) -> str | None:
    """The ``error.message`` of either family's error object, if there is one."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    return None


def _decode(body_bytes: bytes) -> object:
    try:
        return jsonbody.loads(body_bytes)
    except ValueError:
        return None


def translate_error(
    status: int, body_bytes: bytes, from_family: Family, to_family: Family
) -> tuple[int, bytes]:
    """An upstream error response re-shaped for the caller's family.

    The message is kept; the status and type follow the caller's conventions: an
    Anthropic 529 shows as 503 to OpenAI callers, and OpenAI's ``insufficient_quota``
    (a 429 that retrying cannot fix) as a 402 ``billing_error`` to Anthropic callers.
    A body that is not an error object gets a generic message naming the status.
    """
    if from_family == to_family:
        return status, body_bytes
    payload = _decode(body_bytes)
    message = error_message(payload) or f"upstream returned HTTP {status}"
    if to_family == "openai":
        out_status = openai_status_for(status)
        return out_status, json_bytes(openai_error(out_status, message))
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        if status_for_openai_error(error.get("type"), error.get("code")) == 402:
            status = 402
    return status, json_bytes(anthropic_error(status, message))


def anthropic_error_to_openai(error: object) -> JsonDict:
    """OpenAI's error body for an Anthropic ``error`` object (as sent in a stream)."""
    error = error if isinstance(error, dict) else {}
    status = openai_status_for(status_for_anthropic_error_type(error.get("type")))
    message = error.get("message")
    return openai_error(status, message if isinstance(message, str) else "upstream error")


def openai_error_to_anthropic(error: object) -> JsonDict:
    """Anthropic's error body for an OpenAI ``error`` object (as sent in a stream)."""
    error = error if isinstance(error, dict) else {}
    status = status_for_openai_error(error.get("type"), error.get("code"))
    message = error.get("message")
    return anthropic_error(status, message if isinstance(message, str) else "upstream error")


def rename_model(body: JsonDict, model: str) -> bool:
    """Put the client's ``model`` name into a same-family body in place of the upstream's.

    For routes whose target asks the upstream for another model than the client named:
    the top-level ``model`` (Messages, Chat Completions, Responses), the ``message`` of an
    Anthropic ``message_start`` event and the ``response`` of a Responses event. Returns
    whether anything changed.
    """
    changed = False
    for holder in (body, body.get("message"), body.get("response")):
        if isinstance(holder, dict) and isinstance(holder.get("model"), str):
            if holder["model"] != model:
                holder["model"] = model
                changed = True
    return changed
