"""The relay resource: one :class:`Exchange` per client request, client to upstream and back.

The path of a request: endpoint lookup (which API family, which endpoint), client
authentication by key digest, body and model checks, routing to a provider and a backend,
then the upstream request on that backend's pooled Agent. The response is relayed as it
arrives: status and headers, then every body chunk written at once, with backpressure
(a slow client pauses the upstream read) and cancellation (a client that goes away
cancels the upstream request). SSE bodies are watched on the side for usage and for an
upstream that stops without its terminal event.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, readBody
from twisted.web.http import PotentialDataLoss, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relayd.http.body import BoundedBody
from relayd.logs import log_access
from relayd.providers import (
    DEFAULT_FAMILY,
    PROVIDERS,
    Endpoint,
    IProvider,
    IStreamWatcher,
    Usage,
    family_of,
)
from relayd.providers.base import model_entries
from relayd.runtime import Client, RelayRuntime
from relayd.upstream import Backend, BytesProducer

log = Logger(namespace="relayd.relay")

REQUEST_ID_HEADER = b"x-relayd-request-id"

# Hop-by-hop headers (RFC 9110 7.6.1), never relayed in either direction; the headers
# named by a request's Connection header are dropped too.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)

# Never forwarded upstream: the client's relay credential (both places it can be),
# browser and proxy credentials, and headers that are the relay's to set.
_DROP_REQUEST_HEADERS = _HOP_BY_HOP | {
    b"authorization",
    b"x-api-key",
    b"proxy-authorization",
    b"cookie",
    b"origin",
    b"anthropic-dangerous-direct-browser-access",
    b"host",
    b"content-length",
    b"expect",
}

# Never relayed back: cookies and upstream identity details.
_DROP_RESPONSE_HEADERS = _HOP_BY_HOP | {
    b"set-cookie",
    b"server",
    b"date",
    b"cf-ray",
    b"cf-cache-status",
    b"anthropic-organization-id",
    b"openai-organization",
    b"alt-svc",
    b"via",
}

_MAX_COLLECTED_BODY = 4 * 1024 * 1024  # JSON bodies larger than this are not parsed for usage


class EndpointTable:
    """Finds the (family, endpoint) for a path; exact paths by dict, the rest by regex."""

    def __init__(self, families: list[IProvider]) -> None:
        self._exact: dict[bytes, list[tuple[IProvider, Endpoint]]] = {}
        self._patterns: list[tuple[IProvider, Endpoint]] = []
        for family in families:
            for ep in family.endpoints:
                literal = ep.pattern.pattern[1:-1]
                if literal.replace(b"/", b"").replace(b"_", b"").isalnum():
                    self._exact.setdefault(literal, []).append((family, ep))
                else:
                    self._patterns.append((family, ep))

    def lookup(self, request: Request, path: bytes) -> tuple[IProvider, Endpoint] | None:
        candidates = self._exact.get(path)
        if candidates is None:
            candidates = [(f, ep) for f, ep in self._patterns if ep.pattern.match(path)]
            if not candidates:
                return None
        if len(candidates) == 1:
            return candidates[0]
        preferred = family_of(request.requestHeaders)
        for family, ep in candidates:
            if family is preferred:
                return family, ep
        return candidates[0]


class RelayResource(Resource):
    """The root resource of a relay listener: every path is handled by an :class:`Exchange`."""

    isLeaf = True

    def __init__(self, get_runtime: Callable[[], RelayRuntime], clock: IReactorTime) -> None:
        super().__init__()
        self.get_runtime = get_runtime
        self.clock = clock
        self.endpoints = EndpointTable(list(PROVIDERS.values()))

    def render(self, request: Request) -> Any:
        exchange = Exchange(self, request, self.get_runtime())
        try:
            exchange.start()
        except Exception:
            log.failure("unexpected error handling {request_id}", request_id=exchange.request_id)
            exchange.fail_unexpectedly()
        return NOT_DONE_YET


class Exchange:
    """One client request and its upstream counterpart, from arrival to access-log line."""

    def __init__(self, resource: RelayResource, request: Request, runtime: RelayRuntime) -> None:
        self.resource = resource
        self.request = request
        self.runtime = runtime
        self.clock = resource.clock
        self.started = self.clock.seconds()
        self.request_id = "req_" + os.urandom(12).hex()
        self.family: IProvider = PROVIDERS[DEFAULT_FAMILY]
        self.endpoint: Endpoint | None = None
        self.client: Client | None = None
        self.model: str | None = None
        self.stream_requested = False
        self.backend: Backend | None = None
        self.provider_name: str | None = None
        self.status: int | None = None
        self.outcome = "ok"
        self.first_byte_at: float | None = None
        self.usage: Usage | None = None
        self.watcher: IStreamWatcher | None = None
        self.collected: list[bytes] | None = None
        self.collected_size = 0
        self.gzip_body = False
        self.upstream_request: Deferred[IResponse] | None = None
        self.upstream_body: Any = None  # the transport of the upstream response body
        self.timer: IDelayedCall | None = None
        self.total_deadline = 0.0
        self.timed_out: str | None = None
        self.client_gone = False
        self.done = False

    # -- arrival ---------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        request.setHeader(REQUEST_ID_HEADER, self.request_id.encode())
        request.responseHeaders.removeHeader(b"server")
        request.notifyFinish().addErrback(self._client_went_away)
        uri = request.uri
        if not uri.startswith(b"/"):
            self.reply_error(400, "request target must be an absolute path")
            return
        path = request.path
        found = self.resource.endpoints.lookup(request, path)
        if found is None:
            self.family = family_of(request.requestHeaders)
            self.reply_error(404, f"no such endpoint: {_printable(path)}")
            return
        self.family, self.endpoint = found
        if request.method not in self.endpoint.methods:
            allowed = b", ".join(sorted(self.endpoint.methods))
            request.setHeader(b"allow", allowed)
            self.reply_error(
                405,
                f"method {_printable(request.method)} not allowed on {_printable(path)}; "
                f"use {allowed.decode()}",
            )
            return
        client = self._authenticate()
        if client is None:
            return
        self.client = client
        body = self._read_body()
        if body is None:
            return
        if not self._check_model(body, path):
            return
        if self.endpoint.local:
            self._serve_model_list()
            return
        self._forward(body)

    def _authenticate(self) -> Client | None:
        headers = self.request.requestHeaders
        key = None
        raw = headers.getRawHeaders(b"x-api-key")
        if raw:
            key = raw[0].strip()
        else:
            raw = headers.getRawHeaders(b"authorization")
            if raw and raw[0][:7].lower() == b"bearer ":
                key = raw[0][7:].strip()
        if not key:
            self.reply_error(
                401, "missing relay key: send it as x-api-key or Authorization: Bearer"
            )
            return None
        # The table is keyed by SHA-256 digests: lookup time depends on the digest of what
        # the caller sent, never on how much of a real key it guessed.
        client = self.runtime.clients.get(hashlib.sha256(key).digest())
        if client is None:
            self.reply_error(401, "invalid relay key")
        return client

    def _read_body(self) -> bytes | None:
        content = self.request.content
        if isinstance(content, BoundedBody):
            if content.overflowed:
                self.reply_error(
                    413,
                    f"request body exceeds the relay's limit of {content.limit} bytes",
                )
                return None
            return content.getvalue()
        if content is None:
            return b""
        content.seek(0)
        data: bytes = content.read()
        if len(data) > self.runtime.max_body_bytes:
            self.reply_error(
                413,
                f"request body exceeds the relay's limit of {self.runtime.max_body_bytes} bytes",
            )
            return None
        return data

    def _check_model(self, body: bytes, path: bytes) -> bool:
        """Find the model (from the body or the path) and check the client's allowlist."""
        assert self.endpoint is not None and self.client is not None
        endpoint = self.endpoint
        if endpoint.needs_model:
            try:
                payload = json.loads(body)
            except ValueError as exc:
                self.reply_error(400, f"request body is not valid JSON: {exc}")
                return False
            if not isinstance(payload, dict):
                self.reply_error(400, "request body must be a JSON object")
                return False
            model = payload.get("model")
            if not isinstance(model, str) or not model:
                self.reply_error(400, "model: field required (a non-empty string)")
                return False
            self.model = model
            self.stream_requested = payload.get("stream") is True
        elif endpoint.name == "models.item":
            self.model = unquote(path.rsplit(b"/", 1)[1].decode("utf-8", "replace"))
        elif endpoint.name == "messages.batches" and self.request.method == b"POST":
            models = _batch_models(body)
            if models is None:
                self.reply_error(400, "requests: expected a list of {custom_id, params} objects")
                return False
            for model in models:
                if not self.client.allows(model):
                    self._forbid_model(model)
                    return False
        if self.model is not None and not self.client.allows(self.model):
            self._forbid_model(self.model)
            return False
        return True

    def _forbid_model(self, model: str) -> None:
        assert self.client is not None
        self.reply_error(403, f"client {self.client.name!r} may not use model {model!r}")

    # -- forwarding --------------------------------------------------------------------------

    def _forward(self, body: bytes) -> None:
        assert self.endpoint is not None
        runtime = self.runtime
        provider = runtime.router.route(self.family.name, self.model)
        if provider is None and self.model is None:
            provider = runtime.router.first_for(self.family.name)
        if provider is None:
            what = f"model {self.model!r}" if self.model else "this request"
            self.reply_error(404, f"no route for {what} on the {self.family.name} API")
            return
        self.provider_name = provider.name
        balancer = provider.balancer
        backend = balancer.primary() if self.endpoint.sticky else balancer.choose()
        if backend is None:
            self.request.setHeader(b"retry-after", b"1")
            self.reply_error(
                503,
                f"every backend of provider {provider.name!r} is at its concurrency limit",
            )
            return
        self.backend = backend
        backend.in_flight += 1
        timeouts = backend.timeouts
        now = self.clock.seconds()
        self.total_deadline = now + timeouts.total
        self.timer = self.clock.callLater(
            min(timeouts.first_byte, timeouts.total), self._on_timeout
        )
        request = self.request
        headers = Headers()
        set_raw = headers.setRawHeaders
        connection = request.requestHeaders.getRawHeaders(b"connection")
        named = _connection_tokens(connection) if connection else ()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _DROP_REQUEST_HEADERS or lower in named:
                continue
            set_raw(name, values)
        for name, value in backend.auth_headers:
            set_raw(name, [value])
        if self.stream_requested:
            set_raw(b"accept-encoding", [b"identity"])
        producer = BytesProducer(body) if body or request.method == b"POST" else None
        d = backend.agent.request(
            request.method, backend.base_url + request.uri, headers, producer
        )
        self.upstream_request = d
        d.addCallbacks(self._on_response, self._on_upstream_error)
        d.addErrback(self._on_unexpected)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.upstream_body is None:
            self.timed_out = "first_byte"
            if self.upstream_request is not None:
                self.upstream_request.cancel()
            return
        now = self.clock.seconds()
        self.timed_out = "total" if now >= self.total_deadline else "idle"
        upstream_body = self.upstream_body
        self.on_body_end(Failure(ConnectTimeoutError(f"{self.timed_out} timeout")))
        upstream_body.stopProducing()

    def _on_response(self, response: IResponse) -> None:
        self.upstream_request = None
        if self.done:
            response.deliverBody(_Discard())
            return
        request = self.request
        self.first_byte_at = self.clock.seconds()
        status = response.code
        self.status = status
        request.setResponseCode(status, response.phrase)
        out = request.responseHeaders
        out.removeHeader(b"content-type")
        content_type = b""
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _DROP_RESPONSE_HEADERS:
                continue
            if lower == b"content-type":
                content_type = values[0]
            elif lower == b"content-encoding" and values[0].lower() == b"gzip":
                self.gzip_body = True
            out.setRawHeaders(name, values)
        if content_type.startswith(b"text/event-stream"):
            assert self.endpoint is not None
            self.watcher = self.family.stream_watcher(self.endpoint)
            out.removeHeader(b"content-length")
            out.setRawHeaders(b"cache-control", [b"no-cache"])
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
        else:
            # Agent keeps Content-Length out of response.headers; relay it so the client
            # gets a length-delimited body rather than chunked encoding.
            if response.length is not UNKNOWN_LENGTH:
                out.setRawHeaders(b"content-length", [b"%d" % response.length])
            if status < 300 and b"json" in content_type:
                self.collected = []
        self._arm_idle_timer()
        response.deliverBody(_BodyRelay(self))

    def _arm_idle_timer(self) -> None:
        assert self.backend is not None
        delay = min(self.backend.timeouts.idle, self.total_deadline - self.clock.seconds())
        if self.timer is not None and self.timer.active():
            self.timer.reset(max(delay, 0.0))
        else:
            self.timer = self.clock.callLater(max(delay, 0.0), self._on_timeout)

    def on_body_start(self, transport: Any) -> None:
        self.upstream_body = transport
        if not self.done:
            self.request.registerProducer(transport, True)

    def on_body_data(self, data: bytes) -> None:
        if self.done:
            return
        timer = self.timer
        if timer is not None:
            assert self.backend is not None
            delay = min(self.backend.timeouts.idle, self.total_deadline - self.clock.seconds())
            timer.reset(max(delay, 0.0))
        if self.watcher is not None:
            self.watcher.feed(data)
        elif self.collected is not None:
            self.collected_size += len(data)
            if self.collected_size <= _MAX_COLLECTED_BODY:
                self.collected.append(data)
            else:
                self.collected = None
        self.request.write(data)

    def on_body_end(self, reason: Failure) -> None:
        if self.done:
            return
        self.request.unregisterProducer()
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        watcher = self.watcher
        if watcher is not None:
            self.usage = watcher.usage
            if self.timed_out is not None:
                self.outcome = f"timeout_{self.timed_out}"
                self._end_stream_with_error(
                    f"upstream stream stopped: no data within the {self.timed_out} timeout"
                )
                return
            if not clean:
                self.outcome = "upstream_broken"
                self._end_stream_with_error(
                    "upstream connection broke off before the stream ended"
                )
                return
            if not (watcher.complete or watcher.error_seen) and self.status == 200:
                self.outcome = "upstream_truncated"
                self._end_stream_with_error("upstream stream ended without its final event")
                return
            self._finish()
            return
        if not clean or self.timed_out is not None:
            # Headers are gone; the only honest signal left is an incomplete body.
            self.outcome = (
                f"timeout_{self.timed_out}" if self.timed_out else "upstream_broken"
            )
            self.request.loseConnection()
            self._complete()
            return
        if self.collected is not None:
            self.usage = self._usage_from_collected()
        self._finish()

    def _usage_from_collected(self) -> Usage | None:
        assert self.collected is not None
        body = b"".join(self.collected)
        if self.gzip_body:
            import zlib

            try:
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            except zlib.error:
                return None
        return self.family.usage_from_json(body)

    def _end_stream_with_error(self, message: str) -> None:
        log.warn(
            "{request_id}: {message} (backend {backend})",
            request_id=self.request_id,
            message=message,
            backend=self.backend,
        )
        self.request.write(self.family.stream_error_event(message, self.request_id))
        self._finish()

    def _on_upstream_error(self, failure: Failure) -> None:
        self.upstream_request = None
        if self.done:
            return
        if self.timed_out is not None:
            assert self.backend is not None
            self.outcome = "timeout_first_byte"
            self.reply_error(
                504,
                f"upstream did not answer within {self.backend.timeouts.first_byte:g}s",
            )
            return
        if failure.check(CancelledError):
            return  # the client went away; already accounted for
        if failure.check(
            ConnectError, ConnectingCancelledError, DNSLookupError, ConnectTimeoutError
        ):
            message = "could not connect to the upstream backend"
        else:
            message = "the upstream backend closed the connection without a response"
        log.warn(
            "{request_id}: {message}: {error} (backend {backend})",
            request_id=self.request_id,
            message=message,
            error=failure.getErrorMessage(),
            backend=self.backend,
        )
        self.outcome = "upstream_error"
        self.reply_error(502, message)

    def _on_unexpected(self, failure: Failure) -> None:
        log.failure(
            "unexpected error relaying {request_id}", failure, request_id=self.request_id
        )
        self.fail_unexpectedly()

    def fail_unexpectedly(self) -> None:
        if self.done:
            return
        if self.request.startedWriting:
            self.outcome = "relay_error"
            self.request.loseConnection()
            self._complete()
            return
        self.outcome = "relay_error"
        self.reply_error(500, "internal relay error; see the relay log for this request id")

    # -- the local model list -----------------------------------------------------------------

    def _serve_model_list(self) -> None:
        """Ask each provider this API routes to for its models; keep the client's."""
        runtime = self.runtime
        api = self.family.name
        fetches: list[Deferred[list[dict[str, Any]]]] = []
        providers = runtime.router.providers_for(api)
        for provider in providers:
            backend = provider.balancer.choose()
            if backend is None:
                continue
            fetches.append(self._fetch_models(backend))
        if not fetches:
            self.reply_error(502 if providers else 404, "no provider can list models now")
            return
        d = DeferredList(fetches, consumeErrors=True)
        d.addCallback(self._merge_model_lists)
        d.addErrback(self._on_unexpected)

    def _fetch_models(self, backend: Backend) -> Deferred[list[dict[str, Any]]]:
        headers = Headers()
        for name, value in backend.auth_headers:
            headers.setRawHeaders(name, [value])
        version = self.request.requestHeaders.getRawHeaders(b"anthropic-version")
        if version:
            headers.setRawHeaders(b"anthropic-version", version)
        elif backend.provider.name == "anthropic":
            headers.setRawHeaders(b"anthropic-version", [b"2023-06-01"])
        suffix = b"?limit=1000" if backend.provider.name == "anthropic" else b""
        backend.in_flight += 1
        d = backend.agent.request(b"GET", backend.base_url + b"/v1/models" + suffix, headers)

        def read(response: IResponse) -> Deferred[bytes]:
            if response.code != 200:
                raise RuntimeError(f"model list answered {response.code}")
            return readBody(response)

        def release(result: object) -> object:
            backend.in_flight -= 1
            return result

        entries: Deferred[list[dict[str, Any]]] = d.addCallback(read).addCallback(model_entries)
        entries.addBoth(release)
        entries.addTimeout(backend.timeouts.first_byte, self.clock)
        return entries

    def _merge_model_lists(self, results: list[tuple[bool, Any]]) -> None:
        if self.done:
            return
        assert self.client is not None
        router = self.runtime.router
        api = self.family.name
        providers = router.providers_for(api)
        merged: dict[str, dict[str, Any]] = {}
        ok = 0
        for provider, (success, entries) in zip(providers, results, strict=False):
            if not success:
                log.warn(
                    "{request_id}: model list from {provider} failed: {error}",
                    request_id=self.request_id,
                    provider=provider.name,
                    error=entries.getErrorMessage(),
                )
                continue
            ok += 1
            for entry in entries:
                model_id = entry["id"]
                if model_id in merged or not self.client.allows(model_id):
                    continue
                if router.route(api, model_id) is provider:
                    merged[model_id] = entry
        if not ok:
            self.reply_error(502, "no provider answered the model list")
            return
        self.status = 200
        self._write_json(200, self.family.render_model_list(list(merged.values())))

    # -- replies and the end ------------------------------------------------------------------

    def reply_error(self, status: int, message: str) -> None:
        """Answer with a relay-made error in the caller's API shape."""
        if self.done:
            return
        if self.outcome == "ok":
            self.outcome = "rejected" if status < 500 else "relay_error"
        self.status = status
        self._write_json(status, self.family.render_error(status, message, self.request_id))

    def _write_json(self, status: int, body: bytes) -> None:
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.request.finish()
        self._complete()

    def _client_went_away(self, failure: Failure) -> None:
        if self.done:
            return
        self.client_gone = True
        self.outcome = "client_gone"
        if self.watcher is not None:
            self.usage = self.watcher.usage
        if self.upstream_request is not None:
            self.upstream_request.cancel()
        elif self.upstream_body is not None:
            self.upstream_body.stopProducing()
        self._complete()

    def _complete(self) -> None:
        """Release the backend, stop the timer and write the access-log line (once)."""
        if self.done:
            return
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.backend is not None:
            self.backend.in_flight -= 1
        now = self.clock.seconds()
        usage = self.usage
        log_access(
            {
                "request_id": self.request_id,
                "client": self.client.name if self.client else None,
                "api": self.family.name,
                "endpoint": self.endpoint.name if self.endpoint else None,
                "provider": self.provider_name,
                "backend": self.backend.name if self.backend else None,
                "model": self.model,
                "stream": self.watcher is not None,
                "status": 499 if self.client_gone and self.status is None else self.status,
                "outcome": self.outcome,
                "total_ms": round((now - self.started) * 1000, 1),
                "ttfb_ms": (
                    round((self.first_byte_at - self.started) * 1000, 1)
                    if self.first_byte_at is not None
                    else None
                ),
                "input_tokens": usage.input_tokens if usage else None,
                "output_tokens": usage.output_tokens if usage else None,
                "cache_read_tokens": usage.cache_read_tokens if usage else None,
                "cache_write_tokens": usage.cache_write_tokens if usage else None,
            }
        )


_RESPONSE_DONE = Failure(ResponseDone())


class _BodyRelay(Protocol):
    """Receives the upstream body and hands each chunk to the exchange at once."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        self.exchange.on_body_start(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.on_body_data(data)

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        self.exchange.on_body_end(reason)


class _Discard(Protocol):
    """Drains and drops a body nobody wants (its connection is then reusable or closed)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration)."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def _batch_models(body: bytes) -> list[str] | None:
    """The models of a Message Batches create body, or None when it is malformed."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    requests = payload.get("requests") if isinstance(payload, dict) else None
    if not isinstance(requests, list):
        return None
    models: list[str] = []
    for item in requests:
        params = item.get("params") if isinstance(item, dict) else None
        model = params.get("model") if isinstance(params, dict) else None
        if not isinstance(model, str):
            return None
        models.append(model)
    return models


def _printable(raw: bytes) -> str:
    """Client-supplied bytes, safe to echo in an error message."""
    return raw[:200].decode("ascii", "backslashreplace")
