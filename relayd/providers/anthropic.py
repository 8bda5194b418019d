"""The Anthropic Messages API family."""

from __future__ import annotations

import json
import time
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

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

BATCH = "anthropic.batch"
_BATCH_ID = "(?P<id>[A-Za-z0-9_-]{1,128})"

ENDPOINTS = (
    endpoint("messages", "/v1/messages", ["POST"], model_in=ModelIn.BODY, samples=True),
    endpoint(
        "messages.count_tokens", "/v1/messages/count_tokens", ["POST"], model_in=ModelIn.BODY
    ),
    endpoint(
        "messages.batches", "/v1/messages/batches", ["GET", "POST"], sticky=True,
        objects=BATCH, roles={"GET": "list", "POST": "create"}, model_in=ModelIn.BATCH,
        results_url=True,
    ),
    endpoint(
        "messages.batches.item", f"/v1/messages/batches/{_BATCH_ID}", ["GET", "DELETE"],
        sticky=True, objects=BATCH, roles={"GET": "item", "DELETE": "item"}, results_url=True,
    ),
    endpoint(
        "messages.batches.cancel", f"/v1/messages/batches/{_BATCH_ID}/cancel", ["POST"],
        sticky=True, objects=BATCH, roles={"POST": "item"}, results_url=True,
    ),
    endpoint(
        "messages.batches.results", f"/v1/messages/batches/{_BATCH_ID}/results", ["GET"],
        sticky=True, objects=BATCH, roles={"GET": "item"},
    ),
    endpoint("models", "/v1/models", ["GET"], local=True),
    endpoint("models.item", "/v1/models/[^/]+", ["GET"], model_in=ModelIn.PATH),
)


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    found = _ERROR_TYPES.get(status)
    if found is not None:
        return found
    if status == 503:
        return "overloaded_error"
    return "api_error" if status >= 500 else "invalid_request_error"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_from_mapping(raw: object, into: Usage) -> None:
    """Overwrite ``into`` with the counts present in an Anthropic ``usage`` object."""
    if not isinstance(raw, dict):
        return
    if (v := _int(raw.get("input_tokens"))) is not None:
        into.input_tokens = v
    if (v := _int(raw.get("output_tokens"))) is not None:
        into.output_tokens = v
    if (v := _int(raw.get("cache_read_input_tokens"))) is not None:
        into.cache_read_tokens = v
    if (v := _int(raw.get("cache_creation_input_tokens"))) is not None:
        into.cache_write_tokens = v


# Events that may precede the first content: an error after only these can be failed over.
_PREAMBLE_EVENTS = frozenset({b"message_start", b"ping", b"error"})


@implementer(IStreamWatcher)
class AnthropicStreamWatcher(StreamWatcherBase):
    """Usage and completeness of a Messages SSE stream.

    Only ``message_start``, ``message_delta`` and ``error`` are JSON-decoded; once content
    has started, a read of whole content events is not even parsed
    (:meth:`~relayd.providers.base.StreamWatcherBase.passes_by`).
    ``message_delta.usage`` is cumulative, so later values overwrite earlier ones.
    """

    __slots__ = ()

    # message_start, message_delta, message_stop, error.
    passing_markers = (b"message_", b"error")

    def feed(self, data: bytes) -> None:
        if self.passes_by(data):
            return
        for event in self._parser.feed(data):
            name = event.event
            if name == b"message_start" or name == b"message_delta":
                try:
                    payload = jsonbody.loads(event.data)
                except ValueError:
                    continue
                if not isinstance(payload, dict):
                    continue
                if name == b"message_start":
                    message = payload.get("message")
                    if isinstance(message, dict):
                        usage_from_mapping(message.get("usage"), self.usage)
                else:
                    usage_from_mapping(payload.get("usage"), self.usage)
            elif name == b"message_stop":
                self.complete = True
            elif name == b"error":
                self.error_seen = True
            if not self.content_started and name not in _PREAMBLE_EVENTS:
                self.content_started = True


@implementer(IProvider)
class AnthropicProvider:
    """Anthropic: ``x-api-key`` auth, ``{"type":"error",...}`` errors, named SSE events."""

    name = "anthropic"
    endpoints = ENDPOINTS
    health_path = b"/v1/models?limit=1"
    probe_headers = [(b"anthropic-version", b"2023-06-01")]
    forwarded_headers = frozenset(
        {b"anthropic-version", b"anthropic-beta", b"x-app", b"x-claude-code-session-id"}
    )
    header_prefix = b"anthropic-"
    model_list_path = b"/v1/models?limit=1000"
    model_list_headers = (b"anthropic-version",)
    answer_headers = (b"anthropic-version", b"anthropic-beta")

    def auth_headers(self, api_key: str) -> list[tuple[bytes, bytes]]:
        return [(b"x-api-key", api_key.encode())]

    def render_error(
        self, status: int, message: str, request_id: str, code: str | None = None
    ) -> bytes:
        return json.dumps(
            {
                "type": "error",
                "error": {"type": error_type(status), "message": message},
                "request_id": request_id,
            }
        ).encode()

    def rate_limit_headers(
        self, limits: Sequence[LimitState], now: float
    ) -> list[tuple[bytes, bytes]]:
        headers = []
        for state in limits:
            prefix = b"anthropic-ratelimit-" + state.what.encode()
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + state.reset_after))
            headers += [
                (prefix + b"-limit", b"%d" % state.limit),
                (prefix + b"-remaining", b"%d" % state.remaining),
                (prefix + b"-reset", reset.encode()),
            ]
        return headers

    def stream_error_event(self, message: str, request_id: str) -> bytes:
        payload = json.dumps(
            {
                "type": "error",
                "error": {"type": "api_error", "message": message},
                "request_id": request_id,
            }
        )
        return b"event: error\ndata: " + payload.encode() + b"\n\n"

    def usage_from_json(self, body: bytes) -> Usage | None:
        raw = jsonbody.trailing_member(body, b"usage")  # where the API puts it
        if raw is jsonbody.MISSING:
            try:
                payload = jsonbody.loads(body)
            except ValueError:
                return None
            if not isinstance(payload, dict) or "usage" not in payload:
                return None
            raw = payload["usage"]
        usage = Usage()
        usage_from_mapping(raw, usage)
        return usage

    def stream_watcher(self, endpoint: Endpoint) -> IStreamWatcher:
        return AnthropicStreamWatcher()

    def is_retryable(self, status: int) -> bool:
        return status == 429 or status >= 500

    def is_backend_failure(self, status: int) -> bool:
        return status >= 500  # includes 529 overloaded; 429 is a key cooldown, not a failure

    def claims(self, request_headers: Headers) -> bool:
        # Every Anthropic SDK sends anthropic-version; older ones and curl use x-api-key.
        return request_headers.hasHeader(b"anthropic-version") or request_headers.hasHeader(
            b"x-api-key"
        )

    def model_entry(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "display_name": model_id, "created_at": "1970-01-01T00:00:00Z"}

    def render_model(self, entry: dict[str, Any]) -> bytes:
        return json.dumps({"type": "model", **entry}).encode()

    def session_of(self, payload: dict[str, Any]) -> str | None:
        metadata = payload.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        return user if isinstance(user, str) and user else None

    def texts_of(self, payload: dict[str, Any]) -> tuple[list[str], list[str]]:
        system: list[str] = []
        prompt: list[str] = []
        text_parts(payload.get("system"), system)
        messages = payload.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict):
                text_parts(message.get("content"), prompt)
        return system, prompt

    def conversation_of(self, payload: dict[str, Any]) -> bytes | None:
        first = first_of_role(payload.get("messages"), ("user",))
        if first is None:
            return None
        return canonical([payload.get("system"), payload.get("tools"), first])

    def render_model_list(self, entries: Sequence[dict[str, Any]]) -> bytes:
        data = [{"type": "model", **entry} for entry in entries]
        return json.dumps(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        ).encode()

