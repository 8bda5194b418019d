"""The provider interface: everything relayd must know about one LLM API family.

A provider module describes an upstream API (how to authenticate, which paths it serves,
how its errors look, where usage lives in its JSON and SSE bodies, which outcomes are
worth retrying). Since a client API family and a provider type are the same set today,
the same object also renders relay-made errors in that family's shape. Adding a provider
means adding one module that provides :class:`IProvider` and registering it in
:mod:`relayd.providers`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.web.http_headers import Headers
from zope.interface import Attribute, Interface

from relayd import jsonbody
from relayd.sse import SseParser

#: A model id as it may appear in a URL path (``GET /v1/models/{id}``): the ids of both
#: APIs, fine-tunes (``ft:gpt-4o:org:name:id``), vendor prefixes (``anthropic.claude-3``);
#: nothing a path could be climbed with (``/``, ``%``, a leading dot).
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}")


@dataclass(slots=True)
class Usage:
    """Token counts of one exchange; ``None`` means the upstream did not say.

    ``input_tokens`` excludes cache reads and writes (Anthropic's convention), so the
    total prompt size is ``input_tokens + cache_read_tokens + cache_write_tokens``.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class LimitState:
    """A client's standing under one limit, for its rate-limit response headers."""

    what: str  # "requests" or "tokens"
    limit: int
    remaining: int
    reset_after: float  # seconds until the limit is fully replenished


class ModelIn:
    """Where a request of an endpoint names its model (:attr:`Endpoint.model_in`)."""

    BODY = "body"  # the JSON body's ``model`` (required)
    PATH = "path"  # the last path segment, a model id (``GET /v1/models/{id}``)
    BATCH = "batch"  # ``params.model`` of every request of a batch create (POST)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A client-facing path of an API family.

    ``model_in``: where a request names its model (:class:`ModelIn`), which routes it and
    is checked against the client's allowlist; None for calls that name none.
    ``sticky``: the upstream keeps state between calls (batches), so these go to the
    provider's first backend rather than being balanced. ``local``: answered by the relay
    itself (the model list). ``objects``: the kind of upstream object the endpoint
    creates, lists or addresses (``anthropic.batch``, ``openai.response``), with
    ``object_roles`` saying which per method: ``create``, ``list`` or ``item`` (the
    object's id is the pattern's ``id`` group); relayd keeps every client to its own
    objects (:mod:`relayd.http.objects`). ``reference_field``: a body field of a create
    call that names an earlier object (``previous_response_id``). ``results_url``: the
    objects' answers carry a ``results_url`` naming the upstream (batches).
    """

    name: str
    pattern: re.Pattern[bytes]
    methods: frozenset[bytes]
    model_in: str | None = None
    sticky: bool = False
    local: bool = False
    objects: str | None = None
    object_roles: tuple[tuple[bytes, str], ...] = ()
    reference_field: str | None = None
    results_url: bool = False
    samples: bool = False

    @property
    def cacheable(self) -> bool:
        """Whether its answers may be kept by the response cache: a call that names its
        model in a JSON body and keeps no state upstream (no batches, no stored
        responses)."""
        return self.model_in == ModelIn.BODY and self.objects is None

    @property
    def needs_model(self) -> bool:
        """Whether the JSON body must name the model (the body can be renamed for it)."""
        return self.model_in == ModelIn.BODY

    def object_role(self, method: bytes) -> str | None:
        """``create``, ``list`` or ``item`` for a call of ``method``, or None."""
        for known, role in self.object_roles:
            if known == method:
                return role
        return None

    @property
    def path(self) -> bytes:
        """The path pattern without its anchors: the path itself for a fixed path."""
        return self.pattern.pattern[1:-1]


def endpoint(
    name: str,
    path_regex: str,
    methods: Sequence[str],
    *,
    model_in: str | None = None,
    sticky: bool = False,
    local: bool = False,
    objects: str | None = None,
    roles: dict[str, str] | None = None,
    reference_field: str | None = None,
    results_url: bool = False,
    samples: bool = False,
) -> Endpoint:
    """Build an :class:`Endpoint` whose path regex must match the whole path.

    ``samples``: the endpoint generates text, sampled unless ``temperature`` is 0.
    """
    return Endpoint(
        name=name,
        pattern=re.compile(("^" + path_regex + "$").encode()),
        methods=frozenset(m.encode() for m in methods),
        model_in=model_in,
        sticky=sticky,
        local=local,
        objects=objects,
        object_roles=tuple((m.encode(), r) for m, r in (roles or {}).items()),
        reference_field=reference_field,
        results_url=results_url,
        samples=samples,
    )


class IStreamWatcher(Interface):
    """Reads an SSE response on the side, as it passes, without delaying any byte."""

    usage = Attribute("The :class:`Usage` seen so far.")
    complete = Attribute("True once the stream's terminal event has been seen.")
    error_seen = Attribute("True once the upstream sent an in-stream error event.")
    content_started = Attribute(
        "True once an event other than preamble (start, ping) or an error was seen: "
        "before that, an in-stream error can still be failed over."
    )
    created_id = Attribute(
        "The id of the upstream object the stream created (a stored response), or None."
    )

    def feed(data: bytes) -> None:
        """Consume the next chunk of the response body."""

    def at_event_boundary() -> bool:
        """Whether the bytes fed so far end between two events."""


class StreamWatcherBase:
    """State every :class:`IStreamWatcher` keeps: a parser, usage so far, and the end."""

    __slots__ = ("_parser", "complete", "content_started", "created_id", "error_seen", "usage")

    #: Once content has started, every event a watcher still reads has one of these in
    #: its text.
    passing_markers: tuple[bytes, ...] = ()

    def __init__(self) -> None:
        self._parser = SseParser()
        self.usage = Usage()
        self.complete = False
        self.error_seen = False
        self.content_started = False
        self.created_id: str | None = None  # the object a create call's stream made

    def at_event_boundary(self) -> bool:
        return self._parser.at_boundary

    def passes_by(self, data: bytes) -> bool:
        """Whether the read ``data`` can go by unparsed: content has started, the parser
        is between two events and ``data`` ends one with LF line ends only (so it is
        whole events, and the parser would be between two events after it), and none of
        :attr:`passing_markers` is in it. Most reads of a stream are one content event
        the watcher has no use for; a marker in a content text only costs the parse."""
        if not self.content_started or not data.endswith(b"\n\n") or b"\r" in data:
            return False
        parser = self._parser
        if not parser.at_boundary or len(data) > parser.max_line or len(data) > parser.max_event:
            return False  # (a read past a bound may hold a line or event past it)
        for marker in self.passing_markers:
            if marker in data:
                return False
        return True


class IProvider(Interface):
    """One LLM API family: its paths, auth, errors, usage and retry semantics."""

    name = Attribute("The family name, as used in the config: 'anthropic' or 'openai'.")
    endpoints = Attribute("The client-facing :class:`Endpoint` objects, most specific first.")
    health_path = Attribute("The default active-probe path (a cheap GET), e.g. b'/v1/models'.")
    probe_headers = Attribute("Headers a probe needs besides the key, as (name, value) pairs.")
    forwarded_headers = Attribute(
        "Lower-case names of the client request headers this family defines for callers "
        "(API version, betas...), forwarded upstream besides the common ones."
    )
    header_prefix = Attribute(
        "The prefix of this family's own headers (b'anthropic-'): they mean nothing to "
        "the other family, so a translated request leaves them out."
    )
    model_list_path = Attribute("The upstream path (and query) that lists its models.")
    model_list_headers = Attribute(
        "Client request headers a model-list request carries upstream (lower-case names)."
    )
    answer_headers = Attribute(
        "Client request headers that can change the answer (the API version, beta "
        "features): part of a response cache key (lower-case names)."
    )

    def auth_headers(api_key: str) -> list[tuple[bytes, bytes]]:
        """The headers that carry ``api_key`` to the upstream."""

    def render_error(status: int, message: str, request_id: str, code: str | None = None) -> bytes:
        """A JSON error body in this family's shape for an HTTP status.

        ``code`` names a more specific error where the family has one (OpenAI's
        ``insufficient_quota`` for an exhausted budget); families without one ignore it.
        """

    def rate_limit_headers(limits: Sequence[LimitState], now: float) -> list[tuple[bytes, bytes]]:
        """The client's own rate-limit headers, in the names this family's clients read."""

    def stream_error_event(message: str, request_id: str) -> bytes:
        """A complete SSE event that tells this family's SDK that the stream failed."""

    def usage_from_json(body: bytes) -> Usage | None:
        """Usage from a complete (decoded) JSON response body, or None."""

    def stream_watcher(endpoint: Endpoint) -> IStreamWatcher:
        """A fresh watcher for one SSE response of ``endpoint``."""

    def is_retryable(status: int) -> bool:
        """Whether an upstream status means another backend might succeed (failover)."""

    def is_backend_failure(status: int) -> bool:
        """Whether an upstream status counts against the backend's circuit breaker."""

    def claims(request_headers: Headers) -> bool:
        """Whether a request on a path several families share is this family's."""

    def render_model_list(entries: Sequence[dict[str, Any]]) -> bytes:
        """A model-list body in this family's shape from upstream entries (each has an id)."""

    def model_entry(model_id: str) -> dict[str, Any]:
        """A model-list entry for a name relayd itself serves (a route's model alias)."""

    def render_model(entry: dict[str, Any]) -> bytes:
        """A single-model body (``GET /v1/models/{id}``) in this family's shape."""

    def session_of(payload: dict[str, Any]) -> str | None:
        """The session a request body names explicitly (for affinity), or None."""

    def texts_of(payload: dict[str, Any]) -> tuple[list[str], list[str]]:
        """The request's text for content rules: (system prompt parts, conversation
        parts: messages, prompts, inputs), as the client sent them."""

    def conversation_of(payload: dict[str, Any]) -> bytes | None:
        """What identifies the conversation a request continues when it names no
        session: its system prompt, tools and first user message (canonical JSON), or
        None (for ``affinity: {key: auto}``)."""


def canonical(parts: Sequence[object]) -> bytes | None:
    """``parts`` as canonical JSON (sorted keys, no spaces), None if not JSON-able."""
    try:
        return json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError):
        return None


def text_parts(content: object, into: list[str], depth: int = 0) -> None:
    """The text of a message's content: a string, or blocks/parts whose ``text`` (and
    nested ``content``, as in tool results) are strings; append them to ``into``."""
    if isinstance(content, str):
        into.append(content)
    elif isinstance(content, list) and depth < 8:
        for block in content:
            if isinstance(block, str):
                into.append(block)
            elif isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str):
                    into.append(text)
                nested = block.get("content")
                if nested is not None:
                    text_parts(nested, into, depth + 1)


def first_of_role(messages: object, roles: Sequence[str]) -> object | None:
    """The first message of ``messages`` (a list) whose role is one of ``roles``."""
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") in roles:
            return message
    return None


def model_entries(body: bytes) -> list[dict[str, Any]]:
    """The entries of a model-list body shaped ``{"data": [{"id": ...}, ...]}``.

    Both families use that shape; entries without a string ``id`` are skipped.
    """
    try:
        payload = jsonbody.loads(body)
    except ValueError:
        return []
    items = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]
