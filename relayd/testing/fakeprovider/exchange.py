"""One API request's life in the fake upstream: knobs applied, response written, record kept.

An :class:`Exchange` is created per recorded request.  It applies the timing
knobs (``hang``, ``latency``, ``chunk_delay``) on the provider's clock, the
fault knobs (``status``, ``drop_after``, ``truncate_after``, ``gzip``,
``gzip_bomb_mib``, ``flood_headers``) when writing, and keeps the
:class:`~relayd.testing.fakeprovider.record.RecordedRequest` up to date so that
``FakeProvider.wait_for`` and ``GET /_fake/requests`` see what happened.
The endpoint handlers only build bodies and events and hand them to
:meth:`Exchange.send_json` / :meth:`Exchange.send_stream`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from relayd.testing.fakeprovider.content import input_tokens_for
from relayd.testing.fakeprovider.families import (
    ANTHROPIC,
    anthropic_error,
    openai_error,
    set_anthropic_headers,
    set_openai_headers,
)
from relayd.testing.fakeprovider.knobs import Knobs
from relayd.testing.fakeprovider.record import RecordedRequest
from relayd.testing.fakeprovider.wire import JSON_CT, SSE_CT, gzip_bomb

if TYPE_CHECKING:
    from relayd.testing.fakeprovider.resource import FakeProvider

_log = Logger()

_EXTRA_REASONS: Final = {529: b"Overloaded"}


class WebRequest(Protocol):
    """The parts of ``twisted.web.server.Request`` the fake uses, typed."""

    method: bytes
    path: bytes
    uri: bytes
    content: IO[bytes] | None
    requestHeaders: Headers
    responseHeaders: Headers

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def loseConnection(self) -> None: ...

    def isSecure(self) -> bool: ...

    def getHeader(self, key: bytes) -> bytes | None: ...


class Clock(Protocol):
    """``IReactorTime`` as a structural type (zope interfaces do not type-check)."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall: ...


Handler = Callable[["Exchange"], None]


#: The size of the prompt prefix the ``prompt_cache`` knob writes and reads.
PROMPT_PREFIX_TOKENS = 1000


def prompt_prefix(body: bytes) -> str:
    """What a prompt cache keys on: the digest of the system prompt, tools and first
    message of a Messages request body."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return ""
    messages = payload.get("messages")
    first = messages[0] if isinstance(messages, list) and messages else None
    canonical = json.dumps([payload.get("system"), payload.get("tools"), first],
                           sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Exchange:
    """The life of one API request: timers, response writing and bookkeeping."""

    __slots__ = (
        "_cache_counts",
        "_end",
        "_events",
        "_handler",
        "_index",
        "_limit",
        "aborted",
        "body",
        "family",
        "gone",
        "knobs",
        "pending",
        "provider",
        "record",
        "request",
    )

    def __init__(
        self,
        provider: FakeProvider,
        request: WebRequest,
        record: RecordedRequest,
        body: bytes,
        family: str,
        knobs: Knobs,
    ) -> None:
        self.provider = provider
        self.request = request
        self.record = record
        self.body = body
        self.family = family
        self.knobs = knobs
        self.pending: IDelayedCall | None = None
        self.gone = False
        self.aborted = False
        self._handler: Handler | None = None
        self._events: Sequence[bytes] = ()
        self._index = 0
        self._limit = 0
        self._end = "finish"
        self._cache_counts: tuple[int, int] | None = None
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    # -- lifecycle

    def _finished(self, _: object) -> None:
        self.gone = True
        self.record.finished = True
        self.provider.changed()

    def _lost(self, _: Failure) -> None:
        """The connection went away first: stop all timers, never write again."""
        self.gone = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        if not self.aborted:
            self.record.client_disconnected = True
        self.provider.changed()

    def start(self, handler: Handler) -> None:
        """Apply ``hang``/``latency``, then answer with ``handler`` (or the ``status`` knob)."""
        self._handler = handler
        if self.knobs.hang:
            return
        if self.knobs.latency > 0:
            self.pending = self.provider.clock.callLater(self.knobs.latency, self._dispatch)
        else:
            self._dispatch()

    def _dispatch(self) -> None:
        self.pending = None
        if self.gone or self._handler is None:
            return
        try:
            if self.knobs.status is not None:
                self.send_error(self.knobs.status)
                return
            self._handler(self)
        except Exception:
            _log.failure("fake-upstream: handler failed")
            if self.gone:
                return
            if self.record.status is None:
                self.send_error(500)
            else:  # headers are out: the only honest signal left is a broken response
                self._abort()

    # -- headers

    @property
    def request_id(self) -> str:
        """The id the response headers and error bodies carry."""
        return f"req_fake{self.record.id:016d}"

    def _headers(self, status: int, content_type: bytes) -> None:
        request = self.request
        request.setResponseCode(status, http.RESPONSES.get(status, _EXTRA_REASONS.get(status)))
        self.record.status = status
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [content_type])
        for i in range(self.knobs.flood_headers):
            headers.setRawHeaders(b"x-flood-%d" % i, [b"1"])
        rid = self.request_id.encode("ascii")
        if self.family == ANTHROPIC:
            set_anthropic_headers(headers, rid, self.provider.reset_stamp())
        else:
            set_openai_headers(headers, rid, self.knobs.latency)

    # -- responses

    def send_json(self, status: int, payload: bytes, content_type: bytes = JSON_CT) -> None:
        """Write a complete body, honouring ``gzip``, ``gzip_bomb_mib`` and ``drop_after``."""
        if self.gone:
            return
        self._headers(status, content_type)
        request = self.request
        if self.knobs.gzip_bomb_mib:
            payload = gzip_bomb(self.knobs.gzip_bomb_mib)
            request.responseHeaders.setRawHeaders(b"content-encoding", [b"gzip"])
        elif self.knobs.gzip:
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
            request.responseHeaders.setRawHeaders(b"content-encoding", [b"gzip"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(payload)])
        if self.knobs.drop_after is not None:
            request.write(payload[: len(payload) // 2])
            self._abort()
            return
        request.write(payload)
        request.finish()

    def send_error(self, status: int, message: str | None = None) -> None:
        """An error body in the API family's shape (plus ``retry-after`` if set)."""
        if self.family == ANTHROPIC:
            payload = anthropic_error(status, message, self.request_id)
        else:
            payload = openai_error(status, message)
        if self.knobs.retry_after is not None and not self.gone:
            self.request.responseHeaders.setRawHeaders(
                b"retry-after", [f"{self.knobs.retry_after:g}".encode("ascii")]
            )
        self.send_json(status, payload)

    def send_stream(self, events: Sequence[bytes]) -> None:
        """Write SSE events, honouring ``chunk_delay``, ``drop_after`` and ``truncate_after``.

        With no pacing the events go out in a single write (cheap for
        benchmarks); with pacing each event is its own write.
        """
        if self.gone:
            return
        self._headers(200, SSE_CT)
        self.request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
        knobs = self.knobs
        limit, end = len(events), "finish"
        if knobs.drop_after is not None and knobs.drop_after < limit:
            limit, end = knobs.drop_after, "drop"
        if knobs.truncate_after is not None and knobs.truncate_after < limit:
            limit, end = knobs.truncate_after, "finish"
        self._events, self._limit, self._end, self._index = events, limit, end, 0
        if knobs.chunk_delay <= 0:
            self.request.write(b"".join(events[:limit]))
            self.record.events_sent = limit
            self._end_stream()
        else:
            self.request.write(b"")  # the headers, now
            self._next_event()

    def _next_event(self) -> None:
        self.pending = None
        if self.gone:
            return
        if self._index < self._limit:
            self.request.write(self._events[self._index])
            self._index += 1
            self.record.events_sent = self._index
        if self._index >= self._limit:
            self._end_stream()
        else:
            self.pending = self.provider.clock.callLater(self.knobs.chunk_delay, self._next_event)
        self.provider.changed()

    def _end_stream(self) -> None:
        if self._end == "drop":
            self._abort()
        else:
            self.request.finish()

    def _abort(self) -> None:
        """Close the connection without ending the body.

        ``loseConnection`` (not ``abortConnection``) so the bytes already written
        reach the client before the FIN; the client then sees a short
        content-length body or an unterminated chunked stream.
        """
        self.aborted = True
        self.record.aborted = True
        self.request.loseConnection()
        self.provider.changed()

    # -- request helpers

    def parse_body(self, require_model: bool = True) -> tuple[dict[str, Any], str] | None:
        """The JSON object body and its model, or ``None`` after sending a 400."""
        try:
            obj = json.loads(self.body) if self.body else None
        except ValueError as exc:
            self.send_error(400, f"Request body is not valid JSON: {exc}")
            return None
        if not isinstance(obj, dict):
            self.send_error(400, "Request body must be a JSON object")
            return None
        model = obj.get("model")
        if require_model and (not isinstance(model, str) or not model):
            self.send_error(400, "model: Field required")
            return None
        return obj, model if isinstance(model, str) else ""

    def cache_counts(self) -> tuple[int, int]:
        """(cache creation, cache read) input tokens: the knobs' counts, or with the
        ``prompt_cache`` knob what this upstream's prompt cache would say (fixed per
        request: asked again, the same answer)."""
        knobs = self.knobs
        if not knobs.prompt_cache:
            return knobs.cache_creation_input_tokens, knobs.cache_read_input_tokens
        if self._cache_counts is None:
            prefix = prompt_prefix(self.body)
            seen = self.provider.prompts_seen
            if prefix in seen:
                self._cache_counts = (0, PROMPT_PREFIX_TOKENS)
            else:
                seen.add(prefix)
                self._cache_counts = (PROMPT_PREFIX_TOKENS, 0)
        return self._cache_counts

    @property
    def base_input(self) -> int:
        """The uncached input-token count of this request (:func:`input_tokens_for`)."""
        return input_tokens_for(self.body)
