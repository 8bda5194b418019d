"""A fake upstream that impersonates both the Anthropic and the OpenAI HTTP APIs.

relayd's integration tests run it as a separate process, the benchmarks use it
as a cheap upstream and the demo points relayd at it instead of the real
providers.  It is a real ``twisted.web`` server:

* Anthropic: ``POST /v1/messages`` (JSON or SSE), ``POST /v1/messages/count_tokens``,
  ``GET /v1/models[/{id}]``, ``POST /v1/messages/batches``,
  ``GET /v1/messages/batches/{id}[/results]``.
* OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or SSE),
  ``POST /v1/embeddings``, ``POST /v1/responses`` (JSON or typed SSE),
  ``GET /v1/models[/{id}]``.  ``/v1/models`` answers in the Anthropic shape when
  the request carries an ``anthropic-version`` header.
* Control (never recorded): ``GET /_fake/requests[?since=ID]``,
  ``POST /_fake/reset``, ``GET|POST /_fake/config``, ``GET /_fake/health``.

Replies are deterministic: the text is :func:`reply_chunks` (one chunk per
output token), usage is derived from the request body (:func:`input_tokens_for`)
and is identical in the JSON and the streamed form of the same request.

Tool calls: a ``/v1/messages`` or ``/v1/chat/completions`` request that declares
``tools`` (and neither sets ``tool_choice`` to none nor ends with a tool result)
is answered with the reply text followed by one call of the tool named by
``tool_choice``, else of the first tool.  The call's input has one placeholder
per property of the tool's schema (``"fake"``, ``1``, ``1.5``, ``true``, ``[]``,
``{}`` or ``null`` by JSON type); streams send it in fragments of at most
8 characters, and it counts as one output token.  A reply cut by the token limit
has no tool call.

Faults are driven by *knobs* (see :class:`Knobs`), set per instance with
``POST /_fake/config`` or per request with ``x-fake-<knob>`` headers (the header
wins).  Every API request is recorded and can be inspected with
``GET /_fake/requests``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import gzip
import json
import math
import os
import struct
import sys
import tempfile
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain
from typing import IO, Any, Final, NamedTuple, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = [
    "FakeProvider",
    "FakeSite",
    "KnobError",
    "Knobs",
    "RecordedRequest",
    "input_tokens_for",
    "main",
    "make_site",
    "reply_chunks",
    "reply_text",
]

_log = Logger()

ANTHROPIC: Final = "anthropic"
OPENAI: Final = "openai"

#: Default size of the request log; the oldest entries are dropped beyond it.
DEFAULT_MAX_LOG: Final = 10000
#: How many Anthropic message batches are remembered for ``GET``.
_MAX_BATCHES: Final = 1000
#: Default embedding width when the request has no ``dimensions``.
_DEFAULT_DIMENSIONS: Final = 16

_REPLY_WORDS: Final = ("Hello", "from", "fake-upstream.", "Deterministic", "reply.")


# --------------------------------------------------------------------------- knobs


class KnobError(ValueError):
    """An unknown knob name or a value of the wrong type/range."""


@dataclasses.dataclass(frozen=True, slots=True)
class Knobs:
    """Fault and shape settings for one request.

    ``None`` on an optional knob means "off".  Names are the same in
    ``POST /_fake/config`` bodies and in ``x-fake-<knob>`` request headers
    (where ``-`` may stand for ``_``).
    """

    #: Answer with this HTTP status (400-599) and an error body in the API's shape.
    status: int | None = None
    #: With ``status``: value of the ``retry-after`` header, in seconds.
    retry_after: float | None = None
    #: Seconds to wait before the response headers are sent.
    latency: float = 0.0
    #: Seconds between SSE events (0: the whole stream is written at once).
    chunk_delay: float = 0.0
    #: Number of text chunks (= output tokens) in a reply.
    chunks: int = 5
    #: Streams: close the connection mid-stream after this many events.  JSON:
    #: send the content-length header and half of the body, then close.
    drop_after: int | None = None
    #: Streams: finish the response cleanly after this many events.
    truncate_after: int | None = None
    #: Accept the request and never answer it.
    hang: bool = False
    #: Streams: send an in-stream error after the first event, then finish.
    stream_error: bool = False
    #: gzip-encode JSON bodies (``content-encoding: gzip``).
    gzip: bool = False
    #: Pad the reply text so the JSON body is this many bytes (0: no padding).
    body_bytes: int = 0
    #: Anthropic streams: send a ``ping`` event after ``content_block_start``.
    ping: bool = False
    #: Anthropic ``cache_creation_input_tokens`` reported in usage.
    cache_creation_input_tokens: int = 7
    #: Anthropic ``cache_read_input_tokens`` / OpenAI ``cached_tokens``.
    cache_read_input_tokens: int = 11
    #: Hostile answers: this many extra ``x-flood-N`` response headers.
    flood_headers: int = 0
    #: Hostile answers: JSON bodies replaced by gzip of this many MiB of zeros (a bomb).
    gzip_bomb_mib: int = 0

    def updated(self, values: Mapping[str, object]) -> Knobs:
        """Return a copy with ``values`` (raw JSON or header strings) applied.

        Raises :class:`KnobError` for unknown names and bad values.
        """
        if not values:
            return self
        parsed = {name: _parse_knob(name, raw) for name, raw in values.items()}
        return dataclasses.replace(self, **cast(dict[str, Any], parsed))

    def as_dict(self) -> dict[str, object]:
        """The knobs as a JSON-ready mapping."""
        return dataclasses.asdict(self)


_BUILTIN_KNOBS: Final = Knobs()

# name -> (kind, optional, minimum, maximum)
_KNOB_SPECS: Final[dict[str, tuple[type, bool, float, float]]] = {
    "status": (int, True, 400, 599),
    "retry_after": (float, True, 0, math.inf),
    "latency": (float, False, 0, math.inf),
    "chunk_delay": (float, False, 0, math.inf),
    "chunks": (int, False, 0, 1_000_000),
    "drop_after": (int, True, 0, math.inf),
    "truncate_after": (int, True, 0, math.inf),
    "hang": (bool, False, 0, 1),
    "stream_error": (bool, False, 0, 1),
    "gzip": (bool, False, 0, 1),
    "body_bytes": (int, False, 0, 1 << 31),
    "ping": (bool, False, 0, 1),
    "cache_creation_input_tokens": (int, False, 0, math.inf),
    "cache_read_input_tokens": (int, False, 0, math.inf),
    "flood_headers": (int, False, 0, 100_000),
    "gzip_bomb_mib": (int, False, 0, 4096),
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_NULL: Final = frozenset({"", "none", "null"})


def _parse_knob(name: str, raw: object) -> object:
    """Convert a JSON value or header string to the knob's type, or raise."""
    spec = _KNOB_SPECS.get(name)
    if spec is None:
        raise KnobError(f"unknown knob {name!r}")
    kind, optional, low, high = spec
    if isinstance(raw, str):
        raw = raw.strip()
        if raw.lower() in _NULL:
            raw = None
    if raw is None:
        return None if optional else getattr(_BUILTIN_KNOBS, name)
    value: object
    try:
        if kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                value = raw.lower() in _TRUE
            elif isinstance(raw, int) and raw in (0, 1):
                value = bool(raw)
            else:
                raise ValueError(raw)
            return value
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(raw)
        number = float(raw)
        if kind is int:
            if not number.is_integer():
                raise ValueError(raw)
            value = int(number)
        else:
            value = number
    except (ValueError, OverflowError):
        raise KnobError(f"bad value for knob {name!r}: {raw!r}") from None
    if not (low <= number <= high):
        raise KnobError(f"knob {name!r} out of range [{low:g}, {high:g}]: {raw!r}")
    return value


# ------------------------------------------------------------------ deterministic content


def input_tokens_for(body: bytes) -> int:
    """The fake's uncached input-token count for a raw request body.

    Anthropic reports it as ``input_tokens``; OpenAI endpoints report
    ``prompt_tokens``/``input_tokens`` = this + ``cache_read_input_tokens``
    (OpenAI's prompt count includes cached tokens), except embeddings which
    report exactly this.
    """
    return len(body) // 4 + 1


@lru_cache(maxsize=256)
def reply_chunks(n: int, pad: int = 0) -> tuple[str, ...]:
    """The ``n`` text chunks of a reply, with ``pad`` extra ``x`` spread over them.

    Chunks cycle through "Hello from fake-upstream. Deterministic reply."; each
    chunk counts as one output token.
    """
    words = [(" " if i else "") + _REPLY_WORDS[i % len(_REPLY_WORDS)] for i in range(n)]
    if pad > 0 and n > 0:
        each, extra = divmod(pad, n)
        words = [w + "x" * (each + (i < extra)) for i, w in enumerate(words)]
    return tuple(words)


def reply_text(n: int, pad: int = 0) -> str:
    """The full reply text, i.e. the concatenation of :func:`reply_chunks`."""
    return "".join(reply_chunks(n, pad))


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=4)
def _gzip_bomb(mib: int) -> bytes:
    """gzip of ``mib`` MiB of zeros: about a thousandth of that on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    return b"".join(packer.compress(block) for _ in range(mib)) + packer.flush()


def _dumps(obj: object) -> bytes:
    """Compact JSON, as the real APIs send it."""
    return _encoder.encode(obj).encode("utf-8")


@lru_cache(maxsize=4096)
def _json_str(text: str) -> bytes:
    """A JSON string literal, cached since reply chunks repeat across requests."""
    return _dumps(text)


def _rfc3339(seconds: float) -> str:
    """UTC timestamp as the Anthropic API writes them (``2025-01-01T00:00:00Z``)."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sse(event: str, data: bytes) -> bytes:
    """One named SSE event (Anthropic style and OpenAI Responses style)."""
    return b"event: " + event.encode("ascii") + b"\ndata: " + data + b"\n\n"


def _sse_data(data: bytes) -> bytes:
    """One unnamed SSE event (OpenAI chat/completions style)."""
    return b"data: " + data + b"\n\n"


@lru_cache(maxsize=1024)
def _embedding(index: int, dims: int) -> tuple[float, ...]:
    """A deterministic vector; every value is exact in float32 so base64 round-trips."""
    return tuple(((index * 31 + j * 7) % 256 - 128) / 256 for j in range(dims))


@lru_cache(maxsize=1024)
def _embedding_b64(index: int, dims: int) -> str:
    """:func:`_embedding` as base64 of little-endian float32, like ``encoding_format=base64``."""
    packed = struct.pack(f"<{dims}f", *_embedding(index, dims))
    return base64.b64encode(packed).decode("ascii")


def _limit(chunks: int, max_tokens: object) -> tuple[int, bool]:
    """Chunks to emit, and whether the request's token limit cut the reply short."""
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        if 0 <= max_tokens < chunks:
            return max_tokens, True
    return chunks, False


def _padded(n: int, body_bytes: int, build: Callable[[Sequence[str]], bytes]) -> tuple[str, ...]:
    """Chunks padded so that ``build(chunks)`` is ``body_bytes`` long (when it can grow)."""
    pieces = reply_chunks(n)
    if body_bytes > 0 and n > 0:
        missing = body_bytes - len(build(pieces))
        if missing > 0:
            pieces = reply_chunks(n, missing)
    return pieces


# ---------------------------------------------------------------------- tool calls

#: Longest ``partial_json`` / ``arguments`` fragment of a streamed tool call.
_TOOL_FRAGMENT: Final = 8


class _ToolCall(NamedTuple):
    """The tool the fake calls and the input it made up for it."""

    name: str
    input: dict[str, object]

    @property
    def arguments(self) -> str:
        """The input as compact JSON (OpenAI ``arguments``, Anthropic ``partial_json``)."""
        return _encoder.encode(self.input)


def _placeholder(kind: object) -> object:
    """The fake value of a JSON-schema ``type``."""
    match kind:
        case "string":
            return "fake"
        case "integer":
            return 1
        case "number":
            return 1.5
        case "boolean":
            return True
        case "array":
            return []
        case "object":
            return {}
    return None


def _tool_input(schema: object) -> dict[str, object]:
    """One placeholder per entry of the schema's ``properties``, in order."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {
        str(name): _placeholder(prop.get("type") if isinstance(prop, dict) else None)
        for name, prop in properties.items()
    }


def _choose_tool(declared: Sequence[tuple[str, object]], wanted: object) -> _ToolCall | None:
    """The call of the tool named ``wanted`` if it is declared, else of the first one."""
    if not declared:
        return None
    name, schema = next((tool for tool in declared if tool[0] == wanted), declared[0])
    return _ToolCall(name, _tool_input(schema))


def _fragments(text: str) -> list[str]:
    """``text`` in pieces of at most :data:`_TOOL_FRAGMENT` characters."""
    return [text[i : i + _TOOL_FRAGMENT] for i in range(0, len(text), _TOOL_FRAGMENT)]


# ------------------------------------------------------------------------- static data

_ANTHROPIC_MODELS: Final = (
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
)
_OPENAI_MODELS: Final = (
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4o-mini", 1721172741, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
)


def _anthropic_model(
    model_id: str, name: str | None = None, created: str | None = None
) -> dict[str, object]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": name or model_id,
        "created_at": created or "2025-01-01T00:00:00Z",
    }


def _openai_model(
    model_id: str, created: int = 1700000000, owner: str = "system"
) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner}


_ANTHROPIC_MODEL_LIST: Final = _dumps(
    {
        "data": [_anthropic_model(*m) for m in _ANTHROPIC_MODELS],
        "has_more": False,
        "first_id": _ANTHROPIC_MODELS[0][0],
        "last_id": _ANTHROPIC_MODELS[-1][0],
    }
)
_OPENAI_MODEL_LIST: Final = _dumps(
    {"object": "list", "data": [_openai_model(*m) for m in _OPENAI_MODELS]}
)

_JSON_CT: Final = b"application/json"
_SSE_CT: Final = b"text/event-stream; charset=utf-8"

_ANTHROPIC_STATIC_HEADERS: Final = (
    (b"anthropic-organization-id", b"00000000-0000-4000-8000-0000000fa4e0"),
    (b"anthropic-ratelimit-requests-limit", b"4000"),
    (b"anthropic-ratelimit-requests-remaining", b"3999"),
    (b"anthropic-ratelimit-tokens-limit", b"2000000"),
    (b"anthropic-ratelimit-tokens-remaining", b"1999000"),
    (b"anthropic-ratelimit-input-tokens-limit", b"2000000"),
    (b"anthropic-ratelimit-input-tokens-remaining", b"1999000"),
    (b"anthropic-ratelimit-output-tokens-limit", b"400000"),
    (b"anthropic-ratelimit-output-tokens-remaining", b"400000"),
)
_ANTHROPIC_RESET_HEADERS: Final = (
    b"anthropic-ratelimit-requests-reset",
    b"anthropic-ratelimit-tokens-reset",
    b"anthropic-ratelimit-input-tokens-reset",
    b"anthropic-ratelimit-output-tokens-reset",
)
_OPENAI_STATIC_HEADERS: Final = (
    (b"openai-organization", b"fake-upstream-org"),
    (b"openai-version", b"2020-10-01"),
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"x-ratelimit-reset-requests", b"6ms"),
    (b"x-ratelimit-limit-tokens", b"30000000"),
    (b"x-ratelimit-remaining-tokens", b"29999000"),
    (b"x-ratelimit-reset-tokens", b"2ms"),
)

_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found"),
    409: ("conflict_error", "Conflict"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 4,000 requests "
        "per minute.",
    ),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}
_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request"),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", None, "The requested resource does not exist."),
    409: ("invalid_request_error", None, "Conflict"),
    422: ("invalid_request_error", None, "Unprocessable entity"),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", "server_is_overloaded", "The server is overloaded or not ready yet."),
}

_EXTRA_REASONS: Final = {529: b"Overloaded"}

_OPENAI_PATHS: Final = frozenset(
    {b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses"}
)


# ------------------------------------------------------------------- request plumbing


class _Req(Protocol):
    """The parts of ``twisted.web.server.Request`` this module uses, typed."""

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


class _Clock(Protocol):
    """``IReactorTime`` as a structural type (zope interfaces do not type-check)."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall: ...


class RecordedRequest:
    """One API request as received, plus what happened to its response."""

    __slots__ = (
        "aborted",
        "body",
        "client_disconnected",
        "events_sent",
        "finished",
        "headers",
        "id",
        "method",
        "path",
        "started",
        "status",
    )

    def __init__(
        self, ident: int, method: str, path: str, headers: Headers, body: bytes, started: float
    ) -> None:
        self.id = ident
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.started = started
        #: The response was completed normally (``request.finish()``).
        self.finished = False
        #: The client went away before the response finished.
        self.client_disconnected = False
        #: The fake closed the connection on purpose (``drop_after``).
        self.aborted = False
        #: SSE events written so far.
        self.events_sent = 0
        #: The HTTP status sent, once headers are out.
        self.status: int | None = None

    def header(self, name: str) -> str | None:
        """The last value of a request header, or ``None``."""
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[-1].decode("utf-8", "replace") if values else None

    def json(self) -> Any:
        """The request body parsed as JSON."""
        return json.loads(self.body)

    def to_json(self) -> dict[str, object]:
        """The ``GET /_fake/requests`` representation of this record."""
        headers: dict[str, list[str]] = {}
        for name, values in self.headers.getAllRawHeaders():
            key = name.decode("latin-1").lower()
            headers.setdefault(key, []).extend(v.decode("utf-8", "replace") for v in values)
        return {
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "headers": headers,
            "body": self.body.decode("utf-8", "replace"),
            "started": self.started,
            "finished": self.finished,
            "client_disconnected": self.client_disconnected,
            "aborted": self.aborted,
            "events_sent": self.events_sent,
            "status": self.status,
        }


class _Exchange:
    """The life of one API request: timers, response writing and bookkeeping."""

    __slots__ = (
        "_end",
        "_events",
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
        request: _Req,
        record: RecordedRequest,
        body: bytes,
        family: str,
    ) -> None:
        self.provider = provider
        self.request = request
        self.record = record
        self.body = body
        self.family = family
        self.knobs = provider.config
        self.pending: IDelayedCall | None = None
        self.gone = False
        self.aborted = False
        self._events: Sequence[bytes] = ()
        self._index = 0
        self._limit = 0
        self._end = "finish"
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    # -- lifecycle

    def _finished(self, _: object) -> None:
        self.gone = True
        self.record.finished = True
        self.provider._changed()

    def _lost(self, _: Failure) -> None:
        """The connection went away first: stop all timers, never write again."""
        self.gone = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        if not self.aborted:
            self.record.client_disconnected = True
        self.provider._changed()

    def start(self) -> None:
        """Apply ``hang``/``latency``, then dispatch to the endpoint."""
        if self.knobs.hang:
            return
        if self.knobs.latency > 0:
            self.pending = self.provider.clock.callLater(self.knobs.latency, self._dispatch)
        else:
            self._dispatch()

    def _dispatch(self) -> None:
        self.pending = None
        if self.gone:
            return
        try:
            if self.knobs.status is not None:
                self.send_error(self.knobs.status)
                return
            handler = self.provider._route(self.request.method, self.request.path)
            handler(self)
        except Exception:
            _log.failure("fake-upstream: handler failed")
            if self.gone:
                return
            if self.record.status is None:
                self.send_error(500)
            else:  # headers are out: the only honest signal left is a broken response
                self._abort()

    # -- headers

    def _headers(self, status: int, content_type: bytes) -> None:
        request = self.request
        request.setResponseCode(status, http.RESPONSES.get(status, _EXTRA_REASONS.get(status)))
        self.record.status = status
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [content_type])
        self._flood()
        rid = self.request_id.encode("ascii")
        if self.family == ANTHROPIC:
            headers.setRawHeaders(b"request-id", [rid])
            for name, value in _ANTHROPIC_STATIC_HEADERS:
                headers.setRawHeaders(name, [value])
            reset = [self.provider._reset_stamp()]
            for name in _ANTHROPIC_RESET_HEADERS:
                headers.setRawHeaders(name, reset)
        else:
            headers.setRawHeaders(b"x-request-id", [rid])
            headers.setRawHeaders(
                b"openai-processing-ms", [b"%d" % int(self.knobs.latency * 1000 + 1)]
            )
            for name, value in _OPENAI_STATIC_HEADERS:
                headers.setRawHeaders(name, [value])

    def _flood(self) -> None:
        for i in range(self.knobs.flood_headers):
            self.request.responseHeaders.setRawHeaders(b"x-flood-%d" % i, [b"1"])

    @property
    def request_id(self) -> str:
        return f"req_fake{self.record.id:016d}"

    # -- responses

    def send_json(self, status: int, payload: bytes, content_type: bytes = _JSON_CT) -> None:
        """Write a complete body, honouring ``gzip`` and ``drop_after``."""
        if self.gone:
            return
        self._headers(status, content_type)
        request = self.request
        if self.knobs.gzip_bomb_mib:
            payload = _gzip_bomb(self.knobs.gzip_bomb_mib)
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
            kind, default = _ANTHROPIC_ERRORS.get(
                status, ("api_error" if status >= 500 else "invalid_request_error", "Error")
            )
            payload = _dumps(
                {
                    "type": "error",
                    "error": {"type": kind, "message": message or default},
                    "request_id": self.request_id,
                }
            )
        else:
            okind, code, odefault = _OPENAI_ERRORS.get(
                status,
                ("server_error" if status >= 500 else "invalid_request_error", None, "Error"),
            )
            error = {"message": message or odefault, "type": okind, "param": None, "code": code}
            payload = _dumps({"error": error})
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
        self._headers(200, _SSE_CT)
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
        self.provider._changed()

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
        self.provider._changed()

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

    @property
    def base_input(self) -> int:
        return input_tokens_for(self.body)


Handler = Callable[[_Exchange], None]


# ------------------------------------------------------------------------ Anthropic


def _anthropic_usage(ex: _Exchange, output_tokens: int) -> dict[str, object]:
    creation = ex.knobs.cache_creation_input_tokens
    return {
        "input_tokens": ex.base_input,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": ex.knobs.cache_read_input_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": creation, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _anthropic_message(
    ex: _Exchange,
    model: str,
    msg_id: str,
    text: str | None,
    stop: str | None,
    output: int,
    tool_use: Mapping[str, object] | None = None,
) -> dict[str, object]:
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
        "usage": _anthropic_usage(ex, output),
    }


_A_BLOCK_START: Final = _sse(
    "content_block_start",
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
)
_A_PING: Final = _sse("ping", b'{"type":"ping"}')
_A_BLOCK_STOP: Final = _sse("content_block_stop", b'{"type":"content_block_stop","index":0}')
_A_TOOL_BLOCK_STOP: Final = _sse("content_block_stop", b'{"type":"content_block_stop","index":1}')
_A_MESSAGE_STOP: Final = _sse("message_stop", b'{"type":"message_stop"}')
_A_STREAM_ERROR: Final = _sse(
    "error", b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
)


@lru_cache(maxsize=4096)
def _anthropic_delta(text: str) -> bytes:
    return _sse(
        "content_block_delta",
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
        + _json_str(text)
        + b"}}",
    )


def _anthropic_tool_call(req: Mapping[str, Any]) -> _ToolCall | None:
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
    return _choose_tool(declared, wanted)


def _anthropic_tool_use(tool_id: str, call: _ToolCall) -> dict[str, object]:
    return {"type": "tool_use", "id": tool_id, "name": call.name, "input": call.input}


def _anthropic_tool_events(tool_id: str, call: _ToolCall) -> list[bytes]:
    """Content block 1 of a stream: the ``tool_use`` start, its input in fragments, the stop."""
    block = dict(_anthropic_tool_use(tool_id, call), input={})
    start = {"type": "content_block_start", "index": 1, "content_block": block}
    events = [_sse("content_block_start", _dumps(start))]
    for fragment in _fragments(call.arguments):
        delta = {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": fragment},
        }
        events.append(_sse("content_block_delta", _dumps(delta)))
    events.append(_A_TOOL_BLOCK_STOP)
    return events


def _h_messages(ex: _Exchange) -> None:
    """``POST /v1/messages``: a message as JSON, or the SSE event sequence.

    The message is the reply text, plus a ``tool_use`` block when the request
    calls for one (:func:`_anthropic_tool_call`) and the token limit did not cut
    the text.
    """
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    n, cut = _limit(ex.knobs.chunks, req.get("max_tokens"))
    call = None if cut else _anthropic_tool_call(req)
    stop = "max_tokens" if cut else "end_turn" if call is None else "tool_use"
    msg_id = f"msg_fake{ex.record.id:016d}"
    tool_id = f"toolu_fake{ex.record.id:016d}"
    tool_use = None if call is None else _anthropic_tool_use(tool_id, call)
    extra = 0 if call is None else 1  # the tool call counts as one output token

    def build(pieces: Sequence[str]) -> bytes:
        return _dumps(
            _anthropic_message(
                ex, model, msg_id, "".join(pieces), stop, len(pieces) + extra, tool_use
            )
        )

    pieces = _padded(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return
    start = {
        "type": "message_start",
        "message": _anthropic_message(ex, model, msg_id, None, None, 1),
    }
    events = [_sse("message_start", _dumps(start))]
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
        "usage": {"output_tokens": n + extra},
    }
    events.append(_sse("message_delta", _dumps(delta)))
    events.append(_A_MESSAGE_STOP)
    ex.send_stream(events)


def _h_count_tokens(ex: _Exchange) -> None:
    """``POST /v1/messages/count_tokens``: the same input count as a message would get."""
    if ex.parse_body() is not None:
        ex.send_json(200, _dumps({"input_tokens": ex.base_input}))


def _batch_object(
    ex: _Exchange, batch_id: str, created: float, count: int, ended: bool
) -> dict[str, object]:
    results_url = None
    if ended:
        host = (ex.request.getHeader(b"host") or b"127.0.0.1").decode("latin-1")
        scheme = "https" if ex.request.isSecure() else "http"
        results_url = f"{scheme}://{host}/v1/messages/batches/{batch_id}/results"
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": "ended" if ended else "in_progress",
        "request_counts": {
            "processing": 0 if ended else count,
            "succeeded": count if ended else 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": _rfc3339(created) if ended else None,
        "created_at": _rfc3339(created),
        "expires_at": _rfc3339(created + 86400),
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": results_url,
    }


def _h_batch_create(ex: _Exchange) -> None:
    """``POST /v1/messages/batches``: remember the batch and report it in progress."""
    parsed = ex.parse_body(require_model=False)
    if parsed is None:
        return
    requests = parsed[0].get("requests")
    if (
        not isinstance(requests, list)
        or not requests
        or not all(isinstance(r, dict) and isinstance(r.get("custom_id"), str) for r in requests)
    ):
        ex.send_error(400, "requests: a non-empty list of {custom_id, params} is required")
        return
    batch_id = f"msgbatch_fake{ex.record.id:016d}"
    created = ex.provider.clock.seconds()
    ex.provider._store_batch(batch_id, (created, requests))
    ex.send_json(200, _dumps(_batch_object(ex, batch_id, created, len(requests), False)))


def _h_batch_get(ex: _Exchange) -> None:
    """``GET /v1/messages/batches/{id}[/results]``: batches "end" instantly."""
    if ex.request.method != b"GET":
        ex.send_error(405, "Method not allowed")
        return
    rest = ex.request.path[len(b"/v1/messages/batches/") :].decode("utf-8", "replace")
    batch_id, _, tail = rest.partition("/")
    batch = ex.provider._batches.get(batch_id)
    if batch is None or tail not in ("", "results"):
        ex.send_error(404, f"Batch {batch_id!r} not found")
        return
    created, requests = batch
    if not tail:
        ex.send_json(200, _dumps(_batch_object(ex, batch_id, created, len(requests), True)))
        return
    lines = []
    for i, item in enumerate(requests):
        params = item.get("params")
        params = params if isinstance(params, dict) else {}
        model = params.get("model")
        model = model if isinstance(model, str) else "unknown"
        n, cut = _limit(ex.knobs.chunks, params.get("max_tokens"))
        message = _anthropic_message(
            ex,
            model,
            f"msg_fake{ex.record.id:08d}{i:08d}",
            reply_text(n),
            "max_tokens" if cut else "end_turn",
            n,
        )
        message["usage"] = dict(
            cast(dict[str, object], message["usage"]),
            input_tokens=input_tokens_for(_dumps(params)),
        )
        result = {"type": "succeeded", "message": message}
        lines.append(_dumps({"custom_id": item["custom_id"], "result": result}))
    ex.send_json(200, b"\n".join(lines) + b"\n", content_type=b"application/x-jsonl")


# --------------------------------------------------------------------------- OpenAI


def _openai_usage(ex: _Exchange, completion: int) -> dict[str, object]:
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


_OPENAI_STREAM_ERROR: Final = _sse_data(
    b'{"error":{"message":"The server had an error while processing your request. '
    b'Sorry about that!","type":"server_error","param":null,"code":null}}'
)
_DONE: Final = b"data: [DONE]\n\n"
_CHAT_ROLE: Final = (
    b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}'
)


def _include_usage(req: Mapping[str, Any]) -> bool:
    options = req.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _openai_tool_call(req: Mapping[str, Any]) -> _ToolCall | None:
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
    return _choose_tool(declared, wanted)


def _chat_tool_delta(tool_call: Mapping[str, object]) -> bytes:
    """The choice body of a chunk whose delta carries one ``tool_calls`` entry."""
    return (
        b'{"index":0,"delta":{"tool_calls":['
        + _dumps(tool_call)
        + b']},"logprobs":null,"finish_reason":null}'
    )


def _chat_tool_chunks(call_id: str, call: _ToolCall) -> list[bytes]:
    """Choice bodies of a streamed tool call: id and name, then the arguments in fragments."""
    function = {"name": call.name, "arguments": ""}
    bodies = [
        _chat_tool_delta({"index": 0, "id": call_id, "type": "function", "function": function})
    ]
    bodies.extend(
        _chat_tool_delta({"index": 0, "function": {"arguments": fragment}})
        for fragment in _fragments(call.arguments)
    )
    return bodies


def _h_chat(ex: _Exchange) -> None:
    """``POST /v1/chat/completions``: JSON, or ``data:`` chunks ending in ``[DONE]``.

    Chunks are assembled from a per-request prefix and cached text literals,
    because this is the hot path of the benchmarks.  The reply text is followed
    by a tool call when the request calls for one (:func:`_openai_tool_call`)
    and the token limit did not cut the text.
    """
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    n, cut = _limit(ex.knobs.chunks, max_tokens)
    call = None if cut else _openai_tool_call(req)
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
        return _dumps(
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
                "usage": _openai_usage(ex, len(pieces) + extra),
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
        )

    pieces = _padded(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return
    with_usage = _include_usage(req)
    prefix = _chunk_prefix(
        chat_id, b"chat.completion.chunk", created, model, b',"service_tier":"default"'
    )
    bodies: Iterable[bytes] = (
        b'{"index":0,"delta":{"content":'
        + _json_str(piece)
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
        + _json_str(model)
        + extra
        + b',"system_fingerprint":"fp_fake","choices":['
    )


def _send_chunk_stream(
    ex: _Exchange,
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
    events = [_sse_data(prefix + first + suffix)] if first is not None else []
    if ex.knobs.stream_error:
        events.append(_OPENAI_STREAM_ERROR)
        ex.send_stream(events)
        return
    events.extend(_sse_data(prefix + body + suffix) for body in pieces)
    events.append(_sse_data(prefix + last + suffix))
    if with_usage:
        events.append(_sse_data(prefix + b'],"usage":' + _dumps(_openai_usage(ex, n)) + b"}"))
    events.append(_DONE)
    ex.send_stream(events)


def _h_completions(ex: _Exchange) -> None:
    """``POST /v1/completions`` (legacy): JSON or ``data:`` chunks like chat."""
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    n, cut = _limit(ex.knobs.chunks, req.get("max_tokens"))
    finish = "length" if cut else "stop"
    cmpl_id = f"cmpl-fake{ex.record.id:016d}"
    created = int(ex.provider.clock.seconds())

    def build(pieces: Sequence[str]) -> bytes:
        return _dumps(
            {
                "id": cmpl_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}
                ],
                "usage": _openai_usage(ex, len(pieces)),
                "system_fingerprint": "fp_fake",
            }
        )

    pieces = _padded(n, ex.knobs.body_bytes, build)
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
            b'{"text":' + _json_str(piece) + b',"index":0,"logprobs":null,"finish_reason":null}'
            for piece in pieces
        ),
        last=b'{"text":"","index":0,"logprobs":null,"finish_reason":"'
        + finish.encode("ascii")
        + b'"}',
    )


def _h_embeddings(ex: _Exchange) -> None:
    """``POST /v1/embeddings``: one deterministic vector per input (float list or base64)."""
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    given = req.get("input")
    if isinstance(given, str):
        count = 1
    elif isinstance(given, list) and given:
        count = 1 if all(isinstance(x, int) for x in given) else len(given)
    else:
        ex.send_error(400, "input: a string or a non-empty array is required")
        return
    dims = req.get("dimensions")
    if not isinstance(dims, int) or isinstance(dims, bool) or not 0 < dims <= 8192:
        dims = _DEFAULT_DIMENSIONS
    as_b64 = req.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _embedding_b64(i, dims) if as_b64 else _embedding(i, dims),
        }
        for i in range(count)
    ]
    usage = {"prompt_tokens": ex.base_input, "total_tokens": ex.base_input}
    ex.send_json(200, _dumps({"object": "list", "data": data, "model": model, "usage": usage}))


def _responses_usage(ex: _Exchange, output: int) -> dict[str, object]:
    cached = ex.knobs.cache_read_input_tokens
    prompt = ex.base_input + cached
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _h_responses(ex: _Exchange) -> None:
    """``POST /v1/responses``: JSON, or the typed event sequence with ``sequence_number``."""
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    max_output = req.get("max_output_tokens")
    n, cut = _limit(ex.knobs.chunks, max_output)
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
        return _dumps(response(final_status, [done], _responses_usage(ex, len(pieces))))

    pieces = _padded(n, ex.knobs.body_bytes, build)
    if req.get("stream") is not True:
        ex.send_json(200, build(pieces))
        return

    events: list[bytes] = []

    def emit(kind: str, **fields: object) -> None:
        fields = {"type": kind, **fields, "sequence_number": len(events)}
        events.append(_sse(kind, _dumps(fields)))

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


# --------------------------------------------------------------------------- models


def _h_models(ex: _Exchange) -> None:
    """``GET /v1/models`` in the family's list shape (precomputed)."""
    if ex.family == ANTHROPIC:
        ex.send_json(200, _ANTHROPIC_MODEL_LIST)
    else:
        ex.send_json(200, _OPENAI_MODEL_LIST)


def _h_model(ex: _Exchange) -> None:
    """``GET /v1/models/{id}``: any id is answered (echoed if unknown)."""
    if ex.request.method != b"GET":
        ex.send_error(405, "Method not allowed")
        return
    model_id = ex.request.path[len(b"/v1/models/") :].decode("utf-8", "replace")
    if ex.family == ANTHROPIC:
        known = {m[0]: m for m in _ANTHROPIC_MODELS}
        ex.send_json(200, _dumps(_anthropic_model(*known.get(model_id, (model_id,)))))
    else:
        oknown = {m[0]: m for m in _OPENAI_MODELS}
        found = oknown.get(model_id)
        ex.send_json(200, _dumps(_openai_model(*found) if found else _openai_model(model_id)))


def _h_not_found(ex: _Exchange) -> None:
    ex.send_error(404, f"Not found: {ex.request.method.decode()} {ex.record.path}")


def _h_bad_method(ex: _Exchange) -> None:
    ex.send_error(405, f"Method {ex.request.method.decode()} not allowed")


_ROUTES: Final[dict[bytes, dict[bytes, Handler]]] = {
    b"/v1/messages": {b"POST": _h_messages},
    b"/v1/messages/count_tokens": {b"POST": _h_count_tokens},
    b"/v1/messages/batches": {b"POST": _h_batch_create},
    b"/v1/models": {b"GET": _h_models},
    b"/v1/chat/completions": {b"POST": _h_chat},
    b"/v1/completions": {b"POST": _h_completions},
    b"/v1/embeddings": {b"POST": _h_embeddings},
    b"/v1/responses": {b"POST": _h_responses},
}


# ------------------------------------------------------------------------- provider


class FakeProvider(Resource):
    """The fake upstream as a single leaf resource (routing is a dict lookup).

    :param clock: the reactor's time interface; every delay is a ``callLater``
        on it, so tests can drive time with ``twisted.internet.task.Clock``.
    :param defaults: knob values that ``POST /_fake/config`` starts from (and
        that ``{}`` resets to).
    :param max_log: how many recorded requests to keep.
    """

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        *,
        defaults: Mapping[str, object] | None = None,
        max_log: int = DEFAULT_MAX_LOG,
    ) -> None:
        super().__init__()
        self.clock: _Clock = cast(_Clock, clock)
        self.baseline = _BUILTIN_KNOBS.updated(defaults or {})
        self.config = self.baseline
        self._log: deque[RecordedRequest] = deque(maxlen=max_log)
        self._next_id = 1
        self._waiters: list[tuple[Callable[[FakeProvider], bool], Deferred[None]]] = []
        self._batches: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()
        self._reset_cache: tuple[int, bytes] = (-1, b"")

    # -- public API for in-process use

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the request log, oldest first."""
        return list(self._log)

    def configure(self, values: Mapping[str, object]) -> Knobs:
        """Replace the instance config with baseline + ``values`` (``{}`` resets)."""
        self.config = self.baseline.updated(values)
        return self.config

    def reset_log(self) -> int:
        """Forget recorded requests (not the config); return how many were dropped."""
        count = len(self._log)
        self._log.clear()
        self._changed()
        return count

    def wait_for(self, predicate: Callable[[FakeProvider], bool]) -> Deferred[None]:
        """A Deferred that fires once ``predicate(self)`` holds.

        It is re-checked whenever a request is recorded or its state changes
        (events sent, finished, disconnected), so tests need neither sleeps nor
        polling.  The Deferred fires synchronously from inside the server's
        processing, after the fake's own state is updated.
        """
        waiter: Deferred[None]

        def cancel(_: Deferred[None]) -> None:
            self._waiters = [w for w in self._waiters if w[1] is not waiter]

        waiter = Deferred(cancel)
        if predicate(self):
            waiter.callback(None)
        else:
            self._waiters.append((predicate, waiter))
        return waiter

    # -- internals

    def _changed(self) -> None:
        if not self._waiters:
            return
        ready = [w for w in self._waiters if w[0](self)]
        if ready:
            self._waiters = [w for w in self._waiters if w not in ready]
            for _, waiter in ready:
                waiter.callback(None)

    def _reset_stamp(self) -> bytes:
        """RFC 3339 time a minute ahead, for ``anthropic-ratelimit-*-reset`` (cached per second)."""
        now = int(self.clock.seconds())
        if self._reset_cache[0] != now:
            self._reset_cache = (now, _rfc3339(now + 60).encode("ascii"))
        return self._reset_cache[1]

    def _store_batch(self, batch_id: str, batch: tuple[float, list[dict[str, Any]]]) -> None:
        self._batches[batch_id] = batch
        while len(self._batches) > _MAX_BATCHES:
            self._batches.popitem(last=False)

    def _route(self, method: bytes, path: bytes) -> Handler:
        methods = _ROUTES.get(path)
        if methods is not None:
            return methods.get(method, _h_bad_method)
        if path.startswith(b"/v1/messages/batches/"):
            return _h_batch_get
        if path.startswith(b"/v1/models/"):
            return _h_model
        return _h_not_found

    def _knobs_for(self, request: _Req) -> Knobs:
        overrides: dict[str, object] | None = None
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower.startswith(b"x-fake-") and values:
                if overrides is None:
                    overrides = {}
                key = lower[7:].decode("latin-1").replace("-", "_")
                overrides[key] = values[-1].decode("latin-1")
        return self.config.updated(overrides) if overrides else self.config

    def render(self, request: Request) -> bytes | int:
        """Entry point for every request: control endpoints or a recorded API call."""
        req = cast(_Req, request)
        path = req.path
        if path.startswith(b"/_fake/"):
            return self._render_control(req, path)
        content = req.content
        if content is None:
            body = b""
        else:
            content.seek(0)
            body = content.read()
        record = RecordedRequest(
            self._next_id,
            req.method.decode("latin-1"),
            req.uri.decode("utf-8", "replace"),
            req.requestHeaders,
            body,
            self.clock.seconds(),
        )
        self._next_id += 1
        self._log.append(record)
        if path.startswith(b"/v1/messages"):
            family = ANTHROPIC
        elif path in _OPENAI_PATHS:
            family = OPENAI
        else:
            has_version = req.requestHeaders.hasHeader(b"anthropic-version")
            family = ANTHROPIC if has_version else OPENAI
        exchange = _Exchange(self, req, record, body, family)
        try:
            exchange.knobs = self._knobs_for(req)
        except KnobError as exc:
            exchange.knobs = _BUILTIN_KNOBS  # no faults on the complaint itself
            exchange.send_error(400, f"fake-upstream: {exc}")
        else:
            exchange.start()
        # Last, so a waiter that runs synchronously sees a consistent state.
        self._changed()
        return NOT_DONE_YET

    def _render_control(self, request: _Req, path: bytes) -> bytes:
        method = request.method
        status, result = 404, cast(object, {"error": f"unknown control endpoint {path!r}"})
        if path == b"/_fake/health" and method == b"GET":
            status, result = 200, {"ok": True}
        elif path == b"/_fake/requests" and method == b"GET":
            since = 0
            query = request.uri.partition(b"?")[2]
            for part in query.split(b"&"):
                key, _, value = part.partition(b"=")
                if key == b"since" and value.isdigit():
                    since = int(value)
            status, result = 200, [r.to_json() for r in self._log if r.id > since]
        elif path == b"/_fake/reset" and method == b"POST":
            status, result = 200, {"ok": True, "cleared": self.reset_log()}
        elif path == b"/_fake/config" and method == b"GET":
            status, result = 200, self.config.as_dict()
        elif path == b"/_fake/config" and method == b"POST":
            status, result = self._post_config(request)
        request.setResponseCode(status)
        request.responseHeaders.setRawHeaders(b"content-type", [_JSON_CT])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        return _dumps(result)

    def _post_config(self, request: _Req) -> tuple[int, object]:
        raw = request.content.read() if request.content is not None else b""
        try:
            values = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return 400, {"error": f"body is not valid JSON: {exc}"}
        if not isinstance(values, dict):
            return 400, {"error": "body must be a JSON object of knobs"}
        try:
            return 200, self.configure(values).as_dict()
        except KnobError as exc:
            return 400, {"error": str(exc)}


class FakeSite(Site):
    """A ``Site`` serving a :class:`FakeProvider`, without access log by default."""

    noisy = False

    def __init__(self, provider: FakeProvider, *, access_log: bool = False) -> None:
        super().__init__(provider, reactor=provider.clock, parsePOSTFormSubmission=False)
        self.provider = provider
        self.access_log = access_log

    def log(self, request: http.Request) -> None:
        """Access-log only when asked to (it is costly for benchmarks)."""
        if self.access_log:
            super().log(request)


def make_site(
    clock: IReactorTime,
    *,
    defaults: Mapping[str, object] | None = None,
    max_log: int = DEFAULT_MAX_LOG,
    access_log: bool = False,
) -> FakeSite:
    """Build the fake upstream's ``Site``; the provider is ``site.provider``."""
    provider = FakeProvider(clock, defaults=defaults, max_log=max_log)
    return FakeSite(provider, access_log=access_log)


# ------------------------------------------------------------------------------ CLI


def _parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to an interface and a port number."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _write_port_file(path: str, port: int) -> None:
    """Write atomically (temp file + rename) so readers never see a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fake-upstream-port-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{port}\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd-fake-upstream",
        description="Fake Anthropic + OpenAI API server for tests, benchmarks and demos.",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:0",
        type=_parse_listen,
        metavar="HOST:PORT",
        help="address to listen on (port 0 picks a free port; default %(default)s)",
    )
    parser.add_argument("--port-file", metavar="PATH", help="write the bound port here")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    parser.add_argument(
        "--config",
        metavar="JSON",
        default="{}",
        help="baseline knobs as a JSON object, e.g. '{\"chunks\": 8}'",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--quiet", dest="verbose", action="store_false", help="no access log (default)"
    )
    verbosity.add_argument(
        "--verbose", dest="verbose", action="store_true", help="log every request"
    )
    parser.set_defaults(verbose=False)
    return parser


def _start_logging(verbose: bool) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.warn
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake upstream until SIGINT/SIGTERM; the only user of the global reactor."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        defaults = json.loads(args.config)
        if not isinstance(defaults, dict):
            raise KnobError("--config must be a JSON object")
        _BUILTIN_KNOBS.updated(defaults)
    except ValueError as exc:
        parser.error(f"--config: {exc}")

    from twisted.internet import reactor as global_reactor

    reactor = cast(Any, global_reactor)
    _start_logging(args.verbose)
    site = make_site(reactor, defaults=defaults, access_log=args.verbose)
    interface, port = args.listen
    if args.tls_cert:
        from twisted.internet import ssl

        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            pem = key.read() + b"\n" + cert.read()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        listening = reactor.listenSSL(port, site, options, backlog=1024, interface=interface)
        scheme = "https"
    else:
        listening = reactor.listenTCP(port, site, backlog=1024, interface=interface)
        scheme = "http"
    address = listening.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    sys.stdout.write(f"fake-upstream listening on {scheme}://{host}:{address.port}\n")
    sys.stdout.flush()
    if args.port_file:
        _write_port_file(args.port_file, address.port)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
