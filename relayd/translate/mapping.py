"""The tables the request, response and stream translators share.

One place holds every fact that more than one translator (or the operator docs) needs:
finish_reason <-> stop_reason, error statuses and types in both families, the usage
arithmetic (OpenAI's prompt count includes cached tokens, Anthropic's input count does
not), tool-call id normalisation, and the lossy-case table. The lossy table is data so
that ``docs/translation.md`` and the code cannot disagree: the docs embed
:func:`lossy_table_markdown` verbatim (a test checks it) and the request translators may
only report a feature as dropped if this table lists it as dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from relayd.providers import anthropic as anthropic_provider
from relayd.providers import openai as openai_provider
from relayd.providers.base import Usage

Family = Literal["anthropic", "openai"]
Policy = Literal["mapped", "dropped", "rejected"]
Scope = Literal[
    "request O->A", "request A->O", "response A->O", "response O->A"
]

# The Anthropic API version that still accepts temperature/top_p; later ones reject them.
LEGACY_ANTHROPIC_VERSION: Final = "2023-06-01"


class TranslationError(Exception):
    """A request that cannot be translated; the relay answers ``status`` with ``message``.

    Raised for features the lossy table rejects, for any dropped feature in strict mode,
    and for bodies too malformed to translate.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_legacy_anthropic_version(version: str) -> bool:
    """Whether ``anthropic-version`` predates 2026-10-21 (sampling knobs still allowed).

    Versions are ISO dates, so they compare as strings.
    """
    return version < "2026-10-21"


# --- finish_reason <-> stop_reason ------------------------------------------------------

FINISH_REASON_FOR_STOP_REASON: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

STOP_REASON_FOR_FINISH_REASON: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def finish_reason_for(stop_reason: object) -> str:
    """OpenAI's ``finish_reason`` for an Anthropic ``stop_reason`` (unknown ones: ``stop``)."""
    if isinstance(stop_reason, str):
        return FINISH_REASON_FOR_STOP_REASON.get(stop_reason, "stop")
    return "stop"


def stop_reason_for(finish_reason: object) -> str:
    """Anthropic's ``stop_reason`` for an OpenAI ``finish_reason`` (unknown: ``end_turn``).

    OpenAI's ``stop`` does not say whether a stop sequence matched, so it is always
    ``end_turn`` and ``stop_sequence`` is null.
    """
    if isinstance(finish_reason, str):
        return STOP_REASON_FOR_FINISH_REASON.get(finish_reason, "end_turn")
    return "end_turn"


# --- ids ----------------------------------------------------------------------------------

_TOOL_ID_OK = re.compile(r"[a-zA-Z0-9_-]+")
_TOOL_ID_BAD_CHAR = re.compile(r"[^a-zA-Z0-9_-]")


def normalize_tool_call_id(raw: str) -> str:
    """A tool-call id Anthropic accepts (``[a-zA-Z0-9_-]+``), stable for the same input.

    Valid ids are returned unchanged. Others get their bad characters replaced by ``_``
    plus a short hash of the original, so two ids that differ only in bad characters
    (``a.b``, ``a:b``) stay distinct and a ``tool_calls`` id and the ``tool_call_id`` that
    answers it still match after translation.
    """
    if _TOOL_ID_OK.fullmatch(raw):
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{_TOOL_ID_BAD_CHAR.sub('_', raw)}_{digest}"


_CHAT_ID_PREFIX: Final = "chatcmpl-"
_MESSAGE_ID_PREFIX: Final = "msg_"


def openai_id_for(anthropic_id: object) -> str:
    """``chatcmpl-X`` for an Anthropic ``msg_X`` (so a round trip gives the same id)."""
    raw = anthropic_id if isinstance(anthropic_id, str) else "relayd"
    return _CHAT_ID_PREFIX + raw.removeprefix(_MESSAGE_ID_PREFIX)


def anthropic_id_for(openai_id: object) -> str:
    """``msg_X`` for an OpenAI ``chatcmpl-X``."""
    raw = openai_id if isinstance(openai_id, str) else "relayd"
    return _MESSAGE_ID_PREFIX + raw.removeprefix(_CHAT_ID_PREFIX)


def compact_json(value: object) -> str:
    """JSON without insignificant spaces, non-ASCII kept as is (the form we emit)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_bytes(value: object) -> bytes:
    """:func:`compact_json` as UTF-8 bytes, the form sent on the wire.

    Text holding a lone surrogate (JSON allows ``"\\ud83d"``, UTF-8 cannot carry it) is
    sent with non-ASCII escaped instead, as the peer wrote it.
    """
    try:
        return compact_json(value).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


# --- usage arithmetic ---------------------------------------------------------------------


def openai_prompt_tokens(input_tokens: int, cache_write: int, cache_read: int) -> int:
    """OpenAI ``prompt_tokens``: Anthropic's input plus cache writes plus cache reads."""
    return input_tokens + cache_write + cache_read


def anthropic_input_tokens(prompt_tokens: int, cached: int, cache_write: int) -> int:
    """Anthropic ``input_tokens`` from OpenAI counts: ``max(prompt - cached - write, 0)``."""
    return max(prompt_tokens - cached - cache_write, 0)


def usage_from_openai(raw: object) -> Usage:
    """A :class:`Usage` from an OpenAI ``usage`` object (empty when there is none)."""
    return openai_provider.usage_from_mapping(raw) or Usage()


def usage_from_anthropic(raw: object, into: Usage | None = None) -> Usage:
    """``into`` (or a new :class:`Usage`) overwritten with an Anthropic ``usage`` object."""
    usage = into if into is not None else Usage()
    anthropic_provider.usage_from_mapping(raw, usage)
    return usage


def openai_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object for ``usage`` (unknown counts become 0)."""
    cache_read = usage.cache_read_tokens or 0
    cache_write = usage.cache_write_tokens or 0
    prompt = openai_prompt_tokens(usage.input_tokens or 0, cache_write, cache_read)
    completion = usage.output_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write},
    }


def anthropic_usage(usage: Usage) -> dict[str, Any]:
    """Anthropic's ``usage`` object for ``usage`` (unknown counts become 0)."""
    return {
        "input_tokens": usage.input_tokens or 0,
        "output_tokens": usage.output_tokens or 0,
        "cache_creation_input_tokens": usage.cache_write_tokens or 0,
        "cache_read_input_tokens": usage.cache_read_tokens or 0,
    }


# --- errors -------------------------------------------------------------------------------

# The statuses Anthropic documents, used to turn an Anthropic error type back into a status.
ANTHROPIC_ERROR_STATUSES: Final = (400, 401, 402, 403, 404, 409, 413, 429, 500, 504, 529)
_STATUS_FOR_ANTHROPIC_TYPE: Final[Mapping[str, int]] = {
    anthropic_provider.error_type(status): status
    for status in reversed(ANTHROPIC_ERROR_STATUSES)  # 400 wins invalid_request_error
}

# OpenAI error ``code`` (first) or ``type`` values and the status they stand for.
_STATUS_FOR_OPENAI_ERROR: Final[Mapping[str, int]] = {
    "invalid_api_key": 401,
    "insufficient_quota": 402,
    "model_not_allowed": 403,
    "not_found": 404,
    "model_not_found": 404,
    "request_too_large": 413,
    "rate_limit_exceeded": 429,
    "requests": 429,
    "tokens": 429,
    "server_is_overloaded": 503,
    "slow_down": 503,
    "timeout": 504,
    "bad_gateway": 502,
    "server_error": 500,
    "invalid_request_error": 400,
}


def status_for_anthropic_error_type(error_type: object) -> int:
    """The HTTP status an Anthropic error ``type`` stands for (unknown: 500)."""
    if isinstance(error_type, str):
        return _STATUS_FOR_ANTHROPIC_TYPE.get(error_type, 500)
    return 500


def status_for_openai_error(error_type: object, code: object) -> int:
    """The HTTP status an OpenAI error ``code``/``type`` stands for (unknown: 500).

    ``insufficient_quota`` comes as a 429 but is not transient; it maps to 402 so an
    Anthropic client sees ``billing_error`` and does not retry.
    """
    for key in (code, error_type):
        if isinstance(key, str) and key in _STATUS_FOR_OPENAI_ERROR:
            return _STATUS_FOR_OPENAI_ERROR[key]
    return 500


def openai_status_for(status: int) -> int:
    """The status to show an OpenAI client: Anthropic's non-standard 529 becomes 503."""
    return 503 if status == 529 else status


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body for ``status``: ``{"type":"error","error":{type,message}}``."""
    return {
        "type": "error",
        "error": {"type": anthropic_provider.error_type(status), "message": message},
    }


def openai_error(status: int, message: str, param: object = None) -> dict[str, Any]:
    """OpenAI's error body for ``status``: ``{"error":{message,type,param,code}}``."""
    kind, code = openai_provider.error_type_and_code(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- the lossy table ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LossyFeature:
    """One row of the lossy table.

    ``name`` is what the request translators report in ``dropped`` (and so what the
    ``x-relayd-dropped`` header says). ``policy`` applies by default, ``strict_policy``
    when the route is strict. ``mapped`` rows are translated, possibly approximately (the
    note says how); ``dropped`` rows are removed and reported; ``rejected`` rows fail the
    request with a 400. Response rows have no strict variant (a response cannot be
    refused), so both policies are the same there.
    """

    scope: Scope
    name: str
    policy: Policy
    strict_policy: Policy
    note: str


def _drop(scope: Scope, name: str, note: str) -> LossyFeature:
    strict: Policy = "rejected" if scope.startswith("request") else "dropped"
    return LossyFeature(scope, name, "dropped", strict, note)


def _map(scope: Scope, name: str, note: str) -> LossyFeature:
    return LossyFeature(scope, name, "mapped", "mapped", note)


def _reject(scope: Scope, name: str, note: str) -> LossyFeature:
    return LossyFeature(scope, name, "rejected", "rejected", note)


OTHER_FIELDS: Final = "(other fields)"

_OA: Final = "request O->A"
_AO: Final = "request A->O"
_RAO: Final = "response A->O"
_ROA: Final = "response O->A"

LOSSY_FEATURES: Final[tuple[LossyFeature, ...]] = (
    # OpenAI request -> Anthropic request
    _reject(_OA, "n", "`n` > 1 (several choices); Anthropic returns one. `n: 1` is fine."),
    _drop(_OA, "logprobs", "No Anthropic equivalent. `false` is ignored."),
    _drop(_OA, "top_logprobs", "No Anthropic equivalent. `0` is ignored."),
    _drop(_OA, "logit_bias", "No Anthropic equivalent. `{}` is ignored."),
    _drop(_OA, "seed", "No Anthropic equivalent."),
    _drop(_OA, "presence_penalty", "No Anthropic equivalent. `0` is ignored."),
    _drop(_OA, "frequency_penalty", "No Anthropic equivalent. `0` is ignored."),
    _drop(_OA, "audio", "Audio output has no Anthropic equivalent."),
    _drop(_OA, "modalities", "Anything but `[\"text\"]`; Anthropic answers in text only."),
    _drop(
        _OA, "temperature",
        "Dropped for anthropic-version 2026-10-21 and later (they reject it). "
        "On 2023-06-01 it is sent, clamped to 0-1.",
    ),
    _drop(
        _OA, "top_p",
        "Dropped for anthropic-version 2026-10-21 and later. Sent as is on 2023-06-01.",
    ),
    _drop(_OA, "messages.name", "Participant `name` on a message has no Anthropic field."),
    _drop(_OA, "image_url.detail", "`low`/`high` image detail (`auto` is ignored)."),
    _drop(
        _OA, "response_format.json_object",
        "JSON mode has no equivalent; `json_schema` is mapped instead.",
    ),
    _map(
        _OA, "response_format.json_schema",
        "Becomes `output_config.format{type:json_schema,schema}`; the schema's `name`, "
        "`description` and `strict` are not carried.",
    ),
    _map(
        _OA, "reasoning_effort",
        "`low`/`medium`/`high` become `output_config.effort`; `minimal` -> `low`, "
        "`xhigh` -> `high`, `none` is omitted.",
    ),
    _map(
        _OA, "system/developer messages",
        "Leading ones become the top-level `system` (one block each). Later ones are "
        "hoisted there on 2023-06-01, kept in place as `role:\"system\"` on newer versions.",
    ),
    _map(
        _OA, "consecutive same-role messages",
        "Merged into one turn; `role:\"tool\"` messages become one user turn with the "
        "`tool_result` blocks first.",
    ),
    _map(_OA, "tool call ids", "Characters outside `[a-zA-Z0-9_-]` become `_` plus a hash."),
    _map(_OA, "max_tokens", "`max_completion_tokens`, else `max_tokens`, else the default."),
    _map(_OA, "stream_options", "`include_usage` is remembered for the translated stream."),
    _reject(
        _OA, "unsupported content",
        "Content parts other than text and image (`input_audio`, `file`), non-function "
        "tools, `allowed_tools` tool choices, legacy `function_call`, image URLs that are "
        "neither base64 `data:` nor http(s), tool arguments that are not a JSON object.",
    ),
    _drop(
        _OA, OTHER_FIELDS,
        "Any other top-level field (`store`, `metadata`, `service_tier`, `prediction`, "
        "`functions`, ...) is dropped and reported under its own name.",
    ),
    # Anthropic request -> OpenAI request
    _drop(_AO, "top_k", "No OpenAI equivalent."),
    _drop(
        _AO, "thinking_blocks",
        "`thinking`/`redacted_thinking` blocks in the history: OpenAI cannot take them "
        "back (and their `signature` would be lost).",
    ),
    _drop(
        _AO, "cache_control",
        "Cache breakpoints anywhere (system, blocks, tools, top level); OpenAI caches "
        "prompts by itself.",
    ),
    _drop(_AO, "citations", "Citations on text blocks in the history."),
    _drop(_AO, "tool_result.is_error", "OpenAI tool messages have no error flag."),
    _drop(_AO, "tool_result.image", "OpenAI tool messages carry text only."),
    _map(
        _AO, "thinking",
        "`enabled` becomes `reasoning_effort` by budget (<4096 low, <16384 medium, else "
        "high), `adaptive` -> `medium`, `disabled` is omitted. `output_config.effort` wins.",
    ),
    _map(_AO, "output_config.effort", "`low`/`medium`/`high` as is, `max` -> `high`."),
    _map(
        _AO, "output_config.format",
        "Becomes `response_format{type:json_schema,json_schema:{name:\"response\","
        "schema,strict:true}}`.",
    ),
    _map(_AO, "system", "One `system` message first (text blocks become text parts)."),
    _map(_AO, "max_tokens", "Becomes `max_completion_tokens`."),
    _map(_AO, "stream", "Also sets `stream_options.include_usage: true` for accounting."),
    _reject(
        _AO, "unsupported content",
        "Blocks other than text, image, tool_use, tool_result and thinking (`document`, "
        "`search_result`, server-tool blocks, ...), server/built-in tools (a `type` such as "
        "`web_search_20250305`), image sources other than base64 and URL.",
    ),
    _drop(
        _AO, OTHER_FIELDS,
        "Any other top-level field (`service_tier`, `container`, `mcp_servers`, "
        "`context_management`, `metadata` keys besides `user_id`, other `output_config` "
        "keys) is dropped and reported under its own name.",
    ),
    # Anthropic response -> OpenAI response (JSON and streams)
    _drop(_RAO, "thinking", "Thinking, redacted thinking and signature deltas are not sent."),
    _drop(_RAO, "citations", "Citations on text (and `citations_delta`) are not sent."),
    _drop(_RAO, "server tool blocks", "`server_tool_use` and tool-result blocks are not sent."),
    _drop(_RAO, "stop_sequence", "Which stop sequence matched is lost (`stop`)."),
    _map(_RAO, "pause_turn", "Becomes `stop`."),
    _map(_RAO, "refusal", "Becomes `content_filter`; any text is kept as content."),
    _map(_RAO, "model_context_window_exceeded", "Becomes `length`."),
    # OpenAI response -> Anthropic response (JSON and streams)
    _drop(_ROA, "logprobs", "Not sent."),
    _drop(_ROA, "choices[1:]", "Only the first choice is translated."),
    _drop(_ROA, "reasoning_tokens", "Not reported separately (they count as output)."),
    _map(_ROA, "refusal", "Refusal text becomes a text block; `stop_reason` is `refusal`."),
    _map(
        _ROA, "tool arguments",
        "JSON: parsed into `input` (`{}` if they are not a JSON object). Streams: sent as "
        "`input_json_delta` fragments unchanged.",
    ),
    _map(_ROA, "stream input_tokens", "`message_start` says 0; `message_delta` has the count."),
)

_LOSSY_BY_KEY: Final[Mapping[tuple[str, str], LossyFeature]] = {
    (feature.scope, feature.name): feature for feature in LOSSY_FEATURES
}


def lossy_feature(scope: Scope, name: str) -> LossyFeature:
    """The row for ``name`` in ``scope``; names the table lacks fall under ``(other fields)``."""
    found = _LOSSY_BY_KEY.get((scope, name))
    if found is None:
        found = _LOSSY_BY_KEY[(scope, OTHER_FIELDS)]
    return found


def lossy_table_markdown() -> str:
    """The lossy table as Markdown; ``docs/translation.md`` embeds exactly this text."""
    lines = [
        "| Where | Feature | Default | Strict | Notes |",
        "|---|---|---|---|---|",
    ]
    for row in LOSSY_FEATURES:
        feature = row.name if " " in row.name else f"`{row.name}`"
        lines.append(
            f"| {row.scope.replace('->', '→')} | {feature} | {row.policy} | "
            f"{row.strict_policy} | {row.note} |"
        )
    return "\n".join(lines) + "\n"
