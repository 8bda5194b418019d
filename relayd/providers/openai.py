"""The OpenAI API family (Chat Completions, Completions, Embeddings, Responses)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from twisted.web.http_headers import Headers
from zope.interface import implementer

from relayd import jsonbody
from relayd.providers.base import (
    Endpoint,
    IProvider,
    IStreamWatcher,
    LimitState,
    ModelIn,
    StreamWatcherBase,
    Usage,
    canonical,
    endpoint,
    first_of_role,
    text_parts,
)

# (type, code) per status, as the OpenAI API reports them.
_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "model_not_allowed"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "server_is_overloaded"),
    504: ("server_error", "timeout"),
}

RESPONSE = "openai.response"
_RESPONSE_ID = "(?P<id>[A-Za-z0-9_-]{1,128})"

ENDPOINTS = (
    endpoint(
        "chat.completions", "/v1/chat/completions", ["POST"], model_in=ModelIn.BODY,
        samples=True,
    ),
    endpoint("completions", "/v1/completions", ["POST"], model_in=ModelIn.BODY, samples=True),
    endpoint("embeddings", "/v1/embeddings", ["POST"], model_in=ModelIn.BODY),
    endpoint(
        "responses", "/v1/responses", ["POST"], model_in=ModelIn.BODY,
        objects=RESPONSE, roles={"POST": "create"}, reference_field="previous_response_id",
    ),
    # Stored responses live in the account that created them.
    endpoint(
        "responses.item", f"/v1/responses/{_RESPONSE_ID}", ["GET", "DELETE"], sticky=True,
        objects=RESPONSE, roles={"GET": "item", "DELETE": "item"},
    ),
    endpoint(
        "responses.input_items", f"/v1/responses/{_RESPONSE_ID}/input_items", ["GET"],
        sticky=True, objects=RESPONSE, roles={"GET": "item"},
    ),
    endpoint(
        "responses.cancel", f"/v1/responses/{_RESPONSE_ID}/cancel", ["POST"], sticky=True,
        objects=RESPONSE, roles={"POST": "item"},
    ),
    endpoint("models", "/v1/models", ["GET"], local=True),
    endpoint("models.item", "/v1/models/[^/]+", ["GET"], model_in=ModelIn.PATH),
)


def error_type_and_code(status: int) -> tuple[str, str | None]:
    """OpenAI's error ``type`` and ``code`` for an HTTP status."""
    found = _ERRORS.get(status)
    if found is not None:
        return found
    return ("server_error", None) if status >= 500 else ("invalid_request_error", None)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_from_mapping(raw: object) -> Usage | None:
    """Normalise a Chat/Completions/Embeddings or Responses ``usage`` object.

    OpenAI's prompt count includes cached tokens; :class:`Usage` keeps them apart.
    """
    if not isinstance(raw, dict):
        return None
    prompt = _int(raw.get("prompt_tokens"))
    details = raw.get("prompt_tokens_details")
    output = _int(raw.get("completion_tokens"))
    if prompt is None:  # Responses API names
        prompt = _int(raw.get("input_tokens"))
        details = raw.get("input_tokens_details")
        output = _int(raw.get("output_tokens"))
    cached = cache_write = None
    if isinstance(details, dict):
        cached = _int(details.get("cached_tokens"))
        cache_write = _int(details.get("cache_write_tokens"))
    usage = Usage(output_tokens=output, cache_read_tokens=cached, cache_write_tokens=cache_write)
    if prompt is not None:
        usage.input_tokens = max(prompt - (cached or 0) - (cache_write or 0), 0)
    if output is None and prompt is not None:
        usage.output_tokens = 0  # embeddings have no output
    return usage


_TERMINAL_RESPONSE_EVENTS = frozenset(
    {b"response.completed", b"response.failed", b"response.incomplete"}
)


@implementer(IStreamWatcher)
class OpenAIStreamWatcher(StreamWatcherBase):
    """Usage and completeness of a Chat/Completions chunk stream or a Responses stream.

    Until content starts every chunk is JSON-decoded (the first chunks, a role and maybe
    an error, decide whether a failover is still possible); after that a chunk is decoded
    only when it mentions ``usage`` (but as ``"usage":null``) or ``error``, so content
    chunks pass by untouched (a read of whole such chunks is not even parsed:
    :meth:`~relayd.providers.base.StreamWatcherBase.passes_by`).
    """

    __slots__ = ()

    # [DONE], errors, and any named event (Responses: its terminal events); usage below.
    passing_markers = (b"[DONE]", b"error", b"event:")

    def feed(self, data: bytes) -> None:
        if self.passes_by(data) and not _has_usage(data):
            return
        for event in self._parser.feed(data):
            body = event.data
            if body == b"[DONE]":
                self.complete = True
                continue
            name = event.event
            if name is not None and name in _TERMINAL_RESPONSE_EVENTS:
                self.complete = True
            if name == b"error":
                self.error_seen = True
            if self.content_started and not _has_usage(body) and b'"error"' not in body:
                continue
            try:
                payload = jsonbody.loads(body)
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            if payload.get("error") or payload.get("type") == "error":
                self.error_seen = True
            elif not self.content_started:
                self.content_started = _is_content(name, payload)
            raw = payload.get("usage")
            response = payload.get("response")
            if (
                name == b"response.created"
                and isinstance(response, dict)
                and isinstance(response.get("id"), str)
            ):
                self.created_id = response["id"]
            if raw is None and isinstance(response, dict):
                raw = response.get("usage")
            usage = usage_from_mapping(raw)
            if usage is not None:
                self.usage = usage


# Responses-API events that come before any output.
_RESPONSE_PREAMBLE_EVENTS = frozenset(
    {b"response.created", b"response.in_progress", b"response.queued"}
)


def _has_usage(text: bytes) -> bool:
    """Whether ``text`` may carry usage: it names ``"usage"`` other than as the
    ``"usage":null`` of every chunk of a stream asked for its usage (only the last chunk
    has a value)."""
    named = text.count(b'"usage"')
    return named > 0 and named != text.count(b'"usage":null')


def _is_content(name: bytes | None, payload: dict[str, Any]) -> bool:
    """Whether a decoded chunk carries output (so the stream can no longer be failed over).

    A Chat chunk with only ``role`` and empty ``content`` (always the first) is not
    content; text, tool calls, a refusal or a finish reason are. A Responses event is
    content unless it is one of the preamble events.
    """
    if name is not None:
        return name not in _RESPONSE_PREAMBLE_EVENTS
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content")
            or delta.get("tool_calls")
            or delta.get("refusal")
            or delta.get("function_call")
        ):
            return True
    return False


@implementer(IProvider)
class OpenAIProvider:
    """OpenAI: bearer auth, ``{"error":{...}}`` errors, ``data:`` chunks ending ``[DONE]``."""

    name = "openai"
    endpoints = ENDPOINTS
    health_path = b"/v1/models"
    forwarded_headers = frozenset({b"openai-beta", b"x-client-request-id"})
    header_prefix = b"openai-"
    model_list_path = b"/v1/models"
    model_list_headers: tuple[bytes, ...] = ()
    answer_headers = (b"openai-beta",)
    probe_headers: list[tuple[bytes, bytes]] = []

    def auth_headers(self, api_key: str) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", b"Bearer " + api_key.encode())]

    def _error_object(
        self, status: int, message: str, request_id: str, specific: str | None = None
    ) -> dict[str, Any]:
        kind, code = error_type_and_code(status)
        if specific is not None:
            kind = code = specific
        return {
            "message": f"{message} (relayd request id {request_id})",
            "type": kind,
            "param": None,
            "code": code,
        }

    def render_error(
        self, status: int, message: str, request_id: str, code: str | None = None
    ) -> bytes:
        error = self._error_object(status, message, request_id, code)
        return json.dumps({"error": error}).encode()

    def rate_limit_headers(
        self, limits: Sequence[LimitState], now: float
    ) -> list[tuple[bytes, bytes]]:
        headers = []
        for state in limits:
            what = state.what.encode()
            headers += [
                (b"x-ratelimit-limit-" + what, b"%d" % state.limit),
                (b"x-ratelimit-remaining-" + what, b"%d" % state.remaining),
                (b"x-ratelimit-reset-" + what, duration_text(state.reset_after).encode()),
            ]
        return headers

    def stream_error_event(self, message: str, request_id: str) -> bytes:
        body = json.dumps({"error": self._error_object(502, message, request_id)})
        return b"data: " + body.encode() + b"\n\n"

    def usage_from_json(self, body: bytes) -> Usage | None:
        try:
            payload = jsonbody.loads(body)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        return usage_from_mapping(payload.get("usage"))

    def stream_watcher(self, endpoint: Endpoint) -> IStreamWatcher:
        return OpenAIStreamWatcher()

    def is_retryable(self, status: int) -> bool:
        return status == 429 or status >= 500

    def is_backend_failure(self, status: int) -> bool:
        return status >= 500

    def claims(self, request_headers: Headers) -> bool:
        return False  # the default family: no header marks an OpenAI call

    def model_entry(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "created": 0, "owned_by": "relayd"}

    def render_model(self, entry: dict[str, Any]) -> bytes:
        return json.dumps({"object": "model", **entry}).encode()

    def session_of(self, payload: dict[str, Any]) -> str | None:
        for field in ("prompt_cache_key", "user"):
            value = payload.get(field)
            if isinstance(value, str) and value:
                return value
        return None

    def texts_of(self, payload: dict[str, Any]) -> tuple[list[str], list[str]]:
        system: list[str] = []
        prompt: list[str] = []
        text_parts(payload.get("instructions"), system)  # Responses
        for field in ("messages", "input"):  # Chat Completions; Responses and Embeddings
            given = payload.get(field)
            if not isinstance(given, list):
                text_parts(given, prompt)
                continue
            for item in given:
                if isinstance(item, dict) and ("role" in item or "content" in item):
                    into = system if item.get("role") in ("system", "developer") else prompt
                    text_parts(item.get("content"), into)
                else:
                    text_parts([item], prompt)
        text_parts(payload.get("prompt"), prompt)  # Completions
        return system, prompt

    def conversation_of(self, payload: dict[str, Any]) -> bytes | None:
        messages = payload.get("messages")
        if isinstance(messages, list):  # Chat Completions
            instructions: object = [
                m for m in messages[:4]
                if isinstance(m, dict) and m.get("role") in ("system", "developer")
            ]
            first = first_of_role(messages, ("user",))
        else:  # Responses
            instructions = payload.get("instructions")
            given = payload.get("input")
            first = given if isinstance(given, str) else first_of_role(given, ("user",))
        if first is None:
            return None
        return canonical([instructions, payload.get("tools"), first])

    def render_model_list(self, entries: Sequence[dict[str, Any]]) -> bytes:
        data = [{"object": "model", **entry} for entry in entries]
        return json.dumps({"object": "list", "data": data}).encode()


def duration_text(seconds: float) -> str:
    """A duration the way OpenAI writes its reset headers: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
