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
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, DeferredList, succeed
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

from relayd import jsonbody
from relayd.config.model import DEFAULT_RESERVE_OUTPUT_TOKENS
from relayd.http.body import BoundedBody
from relayd.http.collected import BadEncodingError, BodyTooLargeError, CollectedBody
from relayd.http.headers import DROP_RESPONSE_HEADERS
from relayd.http.objects import (
    created_id,
    keep_owned,
    listed_ids,
    public_base,
    rewrite_results_url,
)
from relayd.http.translation import (
    BadUpstreamBodyError,
    StreamRewriter,
    UpstreamCall,
    prepare_call,
    serves,
)
from relayd.keyring import REJECTIONS_TO_BENCH, UpstreamKey
from relayd.limits import ObjectRecord, UsageRecord
from relayd.limits.checks import (
    Decision,
    PeriodCheck,
    Ticket,
    WindowCheck,
    period_end,
    period_number,
)
from relayd.limits.policy import estimate_tokens, usage_tokens
from relayd.limits.redis import StoreUnavailableError
from relayd.logs import log_access
from relayd.metrics import RelayMetrics
from relayd.pool import MAX_RESPONSE_HEAD, BytesProducer, head_too_large
from relayd.providers import (
    DEFAULT_FAMILY,
    MODEL_ID,
    PROVIDERS,
    Endpoint,
    IProvider,
    IStreamWatcher,
    LimitState,
    Usage,
    family_of,
)
from relayd.providers.anthropic import BATCH
from relayd.providers.base import model_entries
from relayd.retry_after import parse_retry_after
from relayd.routing import ProviderRoute, Route, RouteTarget, providers_of
from relayd.runtime import Client, RelayRuntime
from relayd.sse import SseTooLargeError
from relayd.translate import TranslationError
from relayd.translate.mapping import json_bytes
from relayd.upstream import Backend, QueuedRequest

log = Logger(namespace="relayd.relay")

REQUEST_ID_HEADER = b"x-relayd-request-id"

# JSON bodies larger than this (decoded) are relayed but not parsed for usage.
_MAX_COLLECTED_BODY = 4 * 1024 * 1024
# A body that is rewritten (translated, or its model renamed) is held whole until its end;
# an upstream answer larger than this (decoded) is refused with a 502.
_MAX_REWRITTEN_BODY = 64 * 1024 * 1024

# An upstream answer with more header lines than this is refused (502, or failed over):
# real answers carry a few dozen; relaying 20,000 would pass the flood on to the client.
_MAX_RESPONSE_HEADERS = 200

# A stream held back before its first content (for failover) is released past this.
_MAX_HELD_BYTES = 1024 * 1024

# Statuses the Anthropic and OpenAI SDKs retry by themselves (besides 5xx): a relay-made
# 4xx outside this set is final and says so with x-should-retry: false.
_SDK_RETRIED = frozenset({408, 409, 429})

# Rate-limit headers of an upstream response describe relayd's upstream key, not the
# client: they are replaced by the client's own when it has limits.
_UPSTREAM_LIMIT_HEADER_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")


class EndpointTable:
    """Finds the (family, endpoint) for a path; exact paths by dict, the rest by regex."""

    def __init__(self, families: list[IProvider]) -> None:
        self._exact: dict[bytes, list[tuple[IProvider, Endpoint]]] = {}
        self._patterns: list[tuple[IProvider, Endpoint]] = []
        for family in families:
            for ep in family.endpoints:
                literal = ep.path
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
    """The root resource of a relay listener: every path is handled by an :class:`Exchange`.

    ``active`` holds the exchanges in progress, so a shutdown can wait for them.
    """

    isLeaf = True

    def __init__(
        self,
        get_runtime: Callable[[], RelayRuntime],
        clock: IReactorTime,
        metrics: RelayMetrics | None = None,
    ) -> None:
        super().__init__()
        self.get_runtime = get_runtime
        self.clock = clock
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.endpoints = EndpointTable(list(PROVIDERS.values()))
        self.active: set[Exchange] = set()
        self.queued = 0  # exchanges waiting for a backend slot
        self._idle_waiters: list[Deferred[None]] = []

    def exchange_done(self, exchange: Exchange) -> None:
        self.active.discard(exchange)
        if not self.active and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """Fires once no exchange is in progress."""
        waiter: Deferred[None] = Deferred()
        if not self.active:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter

    def render(self, request: Request) -> Any:
        exchange = Exchange(self, request, self.get_runtime())
        self.active.add(exchange)
        self.metrics.request_started()
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
        self.metrics = resource.metrics
        self.started = self.clock.seconds()
        self.request_id = "req_" + os.urandom(12).hex()
        self.family: IProvider = PROVIDERS[DEFAULT_FAMILY]
        self.endpoint: Endpoint | None = None
        self.client: Client | None = None
        self.model: str | None = None
        self.stream_requested = False
        self.payload: dict[str, Any] | None = None
        self.batch_models: list[str] | None = None  # the models inside a batch create
        self.upstream_uri: bytes | None = None  # when it is not the client's, verbatim
        self.objects: str | None = None  # create / list / item: an upstream object call
        self.claimed = False  # a streamed create call's object is recorded
        # The provider and backend that hold the object this call addresses.
        self.pinned: tuple[ProviderRoute, Backend] | None = None
        self.queued: QueuedRequest | None = None  # while waiting for a backend slot
        self.keepalive: IDelayedCall | None = None  # SSE comments during silence
        self.wrote_at = 0.0  # when stream bytes last went to the client
        self.estimate = 0  # tokens reserved against token limits
        self.tickets: list[tuple[Ticket, Attempt | None]] = []
        self.limit_states: list[LimitState] = []
        self.route: Route | None = None
        self.targets: tuple[RouteTarget, ...] = ()  # the route's targets that can serve this
        self.calls: dict[RouteTarget, UpstreamCall | None] = {}  # None: cannot translate
        self.translation_error: TranslationError | None = None
        self.provider_name: str | None = None
        self.body = b""
        self.upstream_headers = Headers()
        self.backend: Backend | None = None  # of the current (or last) attempt
        self.attempt: Attempt | None = None
        self.attempts = 0
        self.tried: list[tuple[RouteTarget, Backend]] = []
        self.response: IResponse | None = None
        self.status: int | None = None
        self.outcome = "ok"
        self.first_sent_at: float | None = None
        self.first_byte_at: float | None = None
        self.upstream_done_at: float | None = None
        self.usage: Usage | None = None
        self.watcher: IStreamWatcher | None = None
        self.call: UpstreamCall | None = None  # of the response being relayed
        self.rewriter: StreamRewriter | None = None  # turns its stream into the client's
        self.rewritten: CollectedBody | None = None  # a body held whole to be rewritten
        self.holding = False
        self.held: list[bytes] = []
        self.held_size = 0
        self.collected: CollectedBody | None = None  # a JSON body read for its usage
        self.total_deadline = 0.0
        self.timed_out: str | None = None
        self.stream_open = False
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
        role = self.endpoint.object_role(request.method)
        if role is not None:
            self.objects = role
            reference = self._object_reference(role)
            if reference is not None:
                self._check_owner(reference, body)
                return
        self._forward(body)

    # -- upstream objects kept to their client (relayd.http.objects) -----------------------

    def _object_reference(self, role: str) -> str | None:
        """The id of an existing object this call addresses, if any."""
        assert self.endpoint is not None
        if role == "item":
            found = self.endpoint.pattern.match(self.request.path)
            return found.group("id").decode("ascii") if found is not None else None
        previous = self.payload.get("previous_response_id") if self.payload else None
        if previous is None:
            return None
        return previous if isinstance(previous, str) else ""

    def _check_owner(self, object_id: str, body: bytes) -> None:
        """Serve the call only for the client that created the object, on its backend."""
        assert self.endpoint is not None and self.endpoint.objects is not None
        d = self.runtime.store.owners(self.endpoint.objects, [object_id])
        d.addCallbacks(
            self._owner_found, self._owners_unknown,
            callbackArgs=(object_id, body),
        )
        d.addErrback(self.on_unexpected)

    def _owners_unknown(self, failure: Failure) -> None:
        failure.trap(StoreUnavailableError)
        self.outcome = "store_unavailable"
        self._set_retry_after(1.0)
        self.reply_error(503, "the state store is unreachable: who owns this object cannot be "
                              "checked now; retry")

    def _owner_found(self, records: list[ObjectRecord | None], object_id: str,
                     body: bytes) -> None:
        if self.done:
            return
        assert self.client is not None and self.endpoint is not None
        record = records[0] if records else None
        what = (self.endpoint.objects or "object").rsplit(".", 1)[-1]
        if record is None or record.client != self.client.name:
            # The same answer whether it exists for another client or not at all.
            self.reply_error(404, f"no such {what}: {object_id[:200]!r}")
            return
        found = self.runtime.backend(record.provider, record.backend)
        if found is None:
            self.reply_error(
                404,
                f"{what} {object_id!r} lives on backend {record.backend!r} of provider "
                f"{record.provider!r}, which the configuration no longer has",
            )
            return
        self.pinned = found
        self._forward(body)

    def _claim_streamed(self, object_id: str) -> None:
        """Record the object a streamed create call made, once its id went by (before the
        client has it: the id reaches the client in the same event)."""
        assert self.client is not None and self.endpoint is not None
        assert self.endpoint.objects is not None and self.backend is not None
        self.claimed = True
        self.runtime.store.claim(
            self.endpoint.objects, object_id,
            ObjectRecord(self.client.name, self.backend.provider_name, self.backend.name),
        )

    def _object_answer(self, body: bytes) -> Deferred[bytes]:
        """The answer to an object call, after recording the created object (create) or
        dropping other clients' objects (list), with batches' results URLs rewritten."""
        assert self.client is not None and self.endpoint is not None
        kind = self.endpoint.objects
        assert kind is not None
        try:
            payload = jsonbody.loads(body)
        except ValueError:
            return succeed(body)
        if not isinstance(payload, dict):
            return succeed(body)
        request = self.request
        base = public_base(request.getHeader(b"host"), request.isSecure(),
                           f"{request.getHost().host}:{request.getHost().port}")
        client = self.client.name

        def rewritten(_: object = None) -> bytes:
            if kind == BATCH:
                for entry in payload.get("data") or [payload]:
                    if isinstance(entry, dict):
                        rewrite_results_url(entry, base)
            return json_bytes(payload)

        if self.objects == "create":
            object_id = created_id(payload)
            backend = self.backend
            if object_id is None or backend is None:
                return succeed(rewritten())
            record = ObjectRecord(client, backend.provider_name, backend.name)
            return self.runtime.store.claim(kind, object_id, record).addCallback(rewritten)
        if self.objects == "list":
            ids = listed_ids(payload)

            def filtered(records: list[ObjectRecord | None]) -> bytes:
                keep_owned(payload, dict(zip(ids, records, strict=True)), client)
                return rewritten()

            return self.runtime.store.owners(kind, ids).addCallback(filtered)
        return succeed(rewritten())

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
                payload = jsonbody.loads(body)
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
            self.payload = payload
            self.stream_requested = payload.get("stream") is True
        elif endpoint.name == "models.item":
            model = unquote(path.rsplit(b"/", 1)[1].decode("utf-8", "replace"))
            if not MODEL_ID.fullmatch(model):
                # e.g. ..%2F..%2Fadmin: never forwarded with relayd's key
                self.reply_error(400, f"not a model id: {model[:200]!r}")
                return False
            self.model = model
            # Upstream, the id goes as the canonical path (nothing left to decode there).
            query = self.request.uri.partition(b"?")[2]
            self.upstream_uri = b"/v1/models/" + model.encode() + (b"?" + query if query else b"")
        elif endpoint.name == "messages.batches" and self.request.method == b"POST":
            models = _batch_models(body)
            if models is None:
                self.reply_error(400, "requests: expected a list of {custom_id, params} objects")
                return False
            for model in models:
                if not self.client.allows(model):
                    self._forbid_model(model)
                    return False
            self.batch_models = models
        if self.model is not None and not self.client.allows(self.model):
            self._forbid_model(self.model)
            return False
        return True

    def _forbid_model(self, model: str) -> None:
        assert self.client is not None
        self.reply_error(403, f"client {self.client.name!r} may not use model {model!r}")

    # -- forwarding --------------------------------------------------------------------------

    # -- forwarding, with failover before the first byte --------------------------------------

    def _route(self) -> Route | None:
        """The route of this request, or None after answering why there is none.

        Message Batches live in the upstream account that created them and are relayed
        as they are (no model renamed, no translation): a batch create goes to the route
        of the models inside it, which must serve batches; calls that name no model (a
        batch's status, results, cancel, the list) go to the first route that serves
        batches, which is where those models' batches went.
        """
        assert self.endpoint is not None
        router = self.runtime.router
        api = self.family.name
        endpoint = self.endpoint
        if self.model is not None or not endpoint.sticky:
            route = router.route(api, self.model)
            if route is None:
                what = f"model {self.model!r}" if self.model else "this request"
                self.reply_error(404, f"no route for {what} on the {api} API")
            return route

        def serves_batches(route: Route) -> bool:
            return any(serves(t, self.family, endpoint) for t in route.targets)

        if not self.batch_models:
            route = router.first_for(api, serves_batches)
            if route is None:
                self.reply_error(
                    404,
                    f"no route of the {api} API can serve Message Batches: batches are "
                    "relayed as they are, so they need a route with a target of type "
                    f"{api} that keeps the model name",
                )
            return route
        routes: dict[Route, str] = {}
        for model in self.batch_models:
            route = router.route(api, model)
            if route is None:
                self.reply_error(
                    404, f"no route for model {model!r} (in the batch) on the {api} API"
                )
                return None
            routes.setdefault(route, model)
        if len(routes) > 1:
            where = "; ".join(f"{model!r} to {route.name}" for route, model in routes.items())
            self.reply_error(
                400,
                "the requests of a batch must all go to one route (one upstream account), "
                f"but they go to several: {where}",
            )
            return None
        ((route, model),) = routes.items()
        if not serves_batches(route):
            self.reply_error(
                404,
                f"Message Batches for {model!r} cannot be served by {route.name}: its "
                "targets rename the model or speak the other API, and batches are relayed "
                f"as they are; route these models through a route with a target of type "
                f"{api} that keeps the model name",
            )
            return None
        return route

    def _forward(self, body: bytes) -> None:
        assert self.endpoint is not None
        runtime = self.runtime
        if self.pinned is not None and self.model is None:
            # The object lives on a known backend: any route of the API carries the call.
            route = runtime.router.first_for(self.family.name)
            if route is None:
                self.reply_error(404, f"no route on the {self.family.name} API")
                return
        else:
            route = self._route()
        if route is None:
            return
        endpoint = self.endpoint
        if (
            endpoint.name == "models.item"
            and self.model in route.matcher.literals
            and any(t.model is not None for t in route.targets)
        ):
            # A model name this route gives other upstream names: relayd's own entry,
            # as in the model list.
            self.route = route
            self.status = 200
            self._write_json(200, self.family.render_model(self.family.model_entry(self.model)))
            return
        if self.pinned is not None:
            provider = self.pinned[0]
            same = [t for t in route.targets if t.provider is provider and not t.translated]
            self.targets = (same[0] if same else RouteTarget(provider, None, 1, False),)
        elif endpoint.sticky:
            # Batches live in the account that created them: always the first provider.
            self.targets = tuple(t for t in route.targets if serves(t, self.family, endpoint))[:1]
        else:
            self.targets = tuple(t for t in route.order() if serves(t, self.family, endpoint))
        if not self.targets:
            names = ", ".join(sorted({t.provider.type for t in route.targets}))
            self.reply_error(
                404,
                f"{endpoint.name} requests for {self.model or 'this route'!r} cannot be served: "
                f"the route reaches only providers of type {names} under other model names "
                "or APIs, and only chat completions and messages are translated",
            )
            return
        self.route = route
        self.provider_name = self.targets[0].provider.name
        self.body = body
        headers = runtime.header_policy.upstream_headers(
            self.family.name, self.request.requestHeaders
        )
        if self.stream_requested:
            headers.setRawHeaders(b"accept-encoding", [b"identity"])
        self.upstream_headers = headers
        runtime.retry_budget.record_request()
        target = self._pick_target()
        if target is None:
            error = self.translation_error
            if error is not None and not any(self.calls.get(t) for t in self.targets):
                self.outcome = "untranslatable"
                self.reply_error(error.status, str(error))
                return
            blocked = self._capacity_blocked()
            if blocked:
                self._wait_for_slot(blocked)
            else:
                self._reply_no_backend()
            return
        self._send(*target)

    def _reply_no_backend(self) -> None:
        self.outcome = "no_backend"
        self._set_retry_after(self._unavailable_for())
        self.reply_error(
            503,
            f"no backend of {self._provider_names()} is available now "
            "(circuit-broken, or every key rate-limited or rejected)",
        )

    # -- waiting for a free slot --------------------------------------------------------------

    def _capacity_blocked(self) -> list[Backend]:
        """The backends this request could use but for their ``max_concurrent``."""
        return [
            backend
            for provider in providers_of(self.targets)
            for backend in provider.balancer.backends
            if not backend.has_capacity() and backend.can_serve()
        ]

    def _wait_for_slot(self, blocked: list[Backend]) -> None:
        """Every usable backend is at its concurrency cap: wait (bounded) for a slot."""
        config = self.runtime.config
        resource = self.resource
        if resource.queued >= config.max_queued or config.queue_timeout <= 0:
            self._refuse_for_capacity(
                "full",
                f"every backend of {self._provider_names()} is at its concurrency limit and "
                f"the queue is full ({config.max_queued} requests waiting)",
            )
            return
        queued = self.queued = QueuedRequest(self._slot_freed, self.clock.seconds())
        queued.wait_on(blocked)
        queued.timer = self.clock.callLater(config.queue_timeout, self._queue_timed_out)
        resource.queued += 1
        self.metrics.queue_entered()

    def _slot_freed(self, backend: Backend) -> None:
        """A backend this request waits for released a slot (called from its release)."""
        try:
            target = self._pick_target()
            if target is not None:
                self._leave_queue()
                self._send(*target)
                return
            blocked = self._capacity_blocked()
            if blocked:
                assert self.queued is not None
                self.queued.wait_on(blocked)
                return
            self._leave_queue()
            self._reply_no_backend()
        except Exception:
            self.on_unexpected(Failure())

    def _queue_timed_out(self) -> None:
        assert self.queued is not None
        self.queued.timer = None
        self._leave_queue()
        self._refuse_for_capacity(
            "timeout",
            f"no backend of {self._provider_names()} had a free slot within "
            f"{self.runtime.config.queue_timeout:g}s (all at their concurrency limit)",
        )

    def _refuse_for_capacity(self, reason: str, message: str) -> None:
        """503 for want of a backend slot (``full`` or ``timeout``): worth a retry soon."""
        self.metrics.queue_refused(reason)
        self.outcome = "queue_" + reason
        self._set_retry_after(1.0)
        self.reply_error(503, message)

    def _leave_queue(self) -> None:
        queued = self.queued
        if queued is None:
            return
        self.queued = None
        queued.leave()
        self.resource.queued -= 1
        self.metrics.queue_left(self.clock.seconds() - queued.since)

    def _provider_names(self) -> str:
        names = [repr(p.name) for p in providers_of(self.targets)]
        return ("provider " if len(names) == 1 else "providers ") + ", ".join(names)

    def _call_for(self, target: RouteTarget) -> UpstreamCall | None:
        """The upstream request for ``target`` (built once); None if it cannot be made."""
        try:
            return self.calls[target]
        except KeyError:
            pass
        assert self.endpoint is not None and self.route is not None
        call: UpstreamCall | None
        try:
            call = prepare_call(
                self.route,
                target,
                self.family,
                self.endpoint,
                uri=self.upstream_uri or self.request.uri,
                headers=self.upstream_headers,
                body=self.body,
                payload=self.payload,
                model=self.model,
            )
        except TranslationError as exc:
            if self.translation_error is None:
                self.translation_error = exc
            call = None
        except RecursionError:
            if self.translation_error is None:
                self.translation_error = TranslationError(400, "request body is nested too deeply")
            call = None
        except Exception:
            # A translator bug must not take the exchange down: this target is skipped.
            log.failure(
                "{request_id}: translating for {provider} failed",
                request_id=self.request_id,
                provider=target.provider.name,
            )
            if self.translation_error is None:
                self.translation_error = TranslationError(
                    400, "the request could not be translated for the upstream's API"
                )
            call = None
        self.calls[target] = call
        return call

    def _pick_target(self) -> tuple[RouteTarget, Backend, UpstreamKey] | None:
        """The next target, backend and key to try, skipping backends already tried.

        Targets are tried in the route's order; with several, each is asked for an
        actively healthy backend before any is asked for an unhealthy one, so a route
        falls back to a healthy provider rather than to a failing backend of the first.
        """
        assert self.endpoint is not None
        if self.pinned is not None:
            return self._pick_pinned()
        sticky = self.endpoint.sticky
        passes: tuple[bool | None, ...] = (None,) if len(self.targets) == 1 else (True, False)
        excludes: dict[RouteTarget, list[Backend]] = {}
        for healthy in passes:
            for target in self.targets:
                if self._call_for(target) is None:
                    continue
                exclude = excludes.get(target)
                if exclude is None:
                    exclude = excludes[target] = [b for t, b in self.tried if t is target]
                balancer = target.provider.balancer
                while True:
                    backend = (
                        balancer.primary(exclude, healthy=healthy)
                        if sticky
                        else balancer.choose(exclude, healthy=healthy)
                    )
                    if backend is None:
                        break
                    if not backend.breaker.allow_request():  # half-open, trial slots taken
                        exclude.append(backend)
                        continue
                    key = backend.keys.choose()
                    if key is None:
                        backend.breaker.release_trial()
                        exclude.append(backend)
                        continue
                    backend.acquire()  # its slot is ours until the attempt ends or _unpick
                    return target, backend, key
        return None

    def _pick_pinned(self) -> tuple[RouteTarget, Backend, UpstreamKey] | None:
        """The one backend that holds the addressed object (never another: no failover)."""
        assert self.pinned is not None
        backend = self.pinned[1]
        target = self.targets[0]
        if any(b is backend for _, b in self.tried) or self._call_for(target) is None:
            return None
        if not backend.is_available() or not backend.breaker.allow_request():
            return None
        key = backend.keys.choose()
        if key is None:
            backend.breaker.release_trial()
            return None
        backend.acquire()
        return target, backend, key

    @staticmethod
    def _unpick(backend: Backend) -> None:
        """Give back what :meth:`_pick_target` took for a backend that gets no attempt:
        its slot, and its half-open trial if it was one."""
        backend.breaker.release_trial()
        backend.release()

    # -- limits: admission before each attempt ------------------------------------------------

    def _send(self, target: RouteTarget, backend: Backend, key: UpstreamKey) -> None:
        """Send an attempt to ``backend`` with ``key`` once the limits admit it.

        The first admission checks the client's limits and the upstream key's quota in
        one atomic step; later attempts (failover) check only their key's quota. Without
        limits to check, the attempt goes out at once.
        """
        runtime = self.runtime
        upstream = runtime.upstream_policies.get(backend) if runtime.upstream_policies else None
        policy = self.client.policy if self.client is not None else None
        first = self.first_sent_at is None and not self.tickets
        if upstream is None and (policy is None or not first):
            self._transmit(target, backend, key, None)
            return
        if (policy is not None and policy.counts_tokens) or upstream is not None:
            if not self.estimate:
                reserve = (
                    policy.reserve_output if policy is not None else DEFAULT_RESERVE_OUTPUT_TOKENS
                )
                self.estimate = estimate_tokens(self.payload or {}, reserve)
        checks = policy.checks(self.estimate, self.request_id) if policy and first else []
        if upstream is not None:
            checks += upstream.checks(key.index, self.estimate)
        d = runtime.store.admit(checks)
        d.addCallback(self._admitted, target, backend, key)
        d.addErrback(self.on_unexpected)

    def _admitted(
        self, decision: Decision, target: RouteTarget, backend: Backend, key: UpstreamKey
    ) -> None:
        if self.done:
            # The client left while the store was deciding: give everything back.
            self._unpick(backend)
            if decision.allowed:
                self._settle_ticket(
                    Ticket.of(decision), {"client": (0, True), "upstream": (0, True)}, None
                )
            return
        if decision.allowed:
            ticket = Ticket.of(decision)
            self._note_limit_states(decision)
            self._transmit(target, backend, key, ticket)
            return
        failed = decision.failed
        if failed is not None and failed.scope == "upstream":
            self._unpick(backend)
            self._route_around_quota(backend, key, decision)
            return
        self._unpick(backend)
        self._refuse(decision)

    def _route_around_quota(self, backend: Backend, key: UpstreamKey, decision: Decision) -> None:
        """The key's provider quota is used up: keep it out and try another key or backend."""
        wait = max(decision.retry_after or 1.0, 1.0)
        backend.keys.cool_down(key, wait, "quota")
        self.metrics.quota_skip(backend.provider_name, backend.name)
        target = self._pick_target()
        if target is not None:
            self._send(*target)
            return
        self.outcome = "upstream_quota"
        self._set_retry_after(max(self._unavailable_for(), wait))
        if self.attempts:
            self.request.setHeader(b"x-should-retry", b"false")
            self.request.setHeader(b"x-relayd-attempts", b"%d" % self.attempts)
        self.reply_error(
            429,
            f"the upstream quota of every backend of {self._provider_names()} is used up for now",
        )

    def _refuse(self, decision: Decision) -> None:
        """Answer a client that is over one of its limits (or whose store is closed)."""
        assert self.client is not None
        failed = decision.failed
        request = self.request
        if failed is None:
            self.outcome = "store_unavailable"
            self._set_retry_after(decision.retry_after or 1.0)
            self.reply_error(
                503, "the rate-limit store is unreachable and this relay fails closed; retry"
            )
            return
        self.metrics.limit_rejected(self.client.name, failed.name)
        request.setHeader(b"x-relayd-limit", failed.name.encode())
        if isinstance(failed, PeriodCheck):
            self.outcome = "budget_exhausted"
            now = self.clock.seconds()
            ends = period_end(failed.period, period_number(failed.period, now))
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ends))
            request.setHeader(b"x-relayd-budget-reset", reset.encode())
            # A retry cannot help before the period ends: tell SDKs not to.
            request.setHeader(b"x-should-retry", b"false")
            self.reply_error(
                429,
                f"token budget exhausted: client {self.client.name!r} has used its "
                f"{failed.name} ({failed.limit}) or this request (up to {failed.amount} "
                f"tokens) would exceed it; the budget resets at {reset}",
                code="insufficient_quota",
            )
            return
        self.outcome = "rate_limited"
        self._set_retry_after(decision.retry_after or 1.0)
        if isinstance(failed, WindowCheck):
            what = failed.unit
            for name, value in self.family.rate_limit_headers(
                [LimitState(what, failed.limit, 0, decision.retry_after or 1.0)],
                self.clock.seconds(),
            ):
                request.setHeader(name, value)
            detail = (
                f"{failed.limit} requests per minute"
                if what == "requests"
                else f"{failed.limit} tokens per minute (this request reserves {failed.amount})"
            )
        else:
            detail = f"{failed.limit} concurrent requests"
        self.reply_error(
            429,
            f"rate limit exceeded: client {self.client.name!r} is limited to {detail}",
            code="rate_limit_exceeded",
        )

    def _note_limit_states(self, decision: Decision) -> None:
        """Keep the client's per-minute standing for its response headers."""
        for check, state in zip(decision.checks, decision.states, strict=True):
            if isinstance(check, WindowCheck) and check.scope == "client":
                remaining = max(check.limit - state.used, 0)
                self.limit_states.append(
                    LimitState(check.unit, check.limit, remaining, state.reset_after)
                )

    def _transmit(
        self, target: RouteTarget, backend: Backend, key: UpstreamKey, ticket: Ticket | None
    ) -> None:
        call = self.calls[target]
        assert call is not None
        attempt = Attempt(backend, key, target, call)
        if ticket is not None:
            self.tickets.append((ticket, attempt))
        self.attempt = attempt
        self.attempts += 1
        self.tried.append((target, backend))
        self.backend = backend
        self.provider_name = backend.provider_name
        now = self.clock.seconds()
        if self.first_sent_at is None:
            self.first_sent_at = now
            self.total_deadline = self.started + backend.timeouts.total
        headers = call.headers.copy()
        for name, value in key.auth_headers:
            headers.setRawHeaders(name, [value])
        for name, value in backend.account_headers:
            headers.setRawHeaders(name, [value])
        timeouts = backend.timeouts
        attempt.timer = self.clock.callLater(
            max(min(timeouts.first_byte, self.total_deadline - now), 0.0),
            self._on_timeout,
            attempt,
        )
        method = self.request.method
        body = call.body
        producer = BytesProducer(body) if body or method == b"POST" else None
        d = backend.agent.request(method, backend.base_url + call.path, headers, producer)
        attempt.request = d
        d.addCallbacks(
            self._on_response,
            self._on_upstream_error,
            callbackArgs=(attempt,),
            errbackArgs=(attempt,),
        )
        d.addErrback(self.on_unexpected)

    def _may_retry(self, reason: str) -> tuple[RouteTarget, Backend, UpstreamKey] | None:
        """Whether (and where) a failed attempt may be retried; counts refusals."""
        failover = self.runtime.config.failover
        provider = self.provider_name or "-"
        if self.client_gone or self.done:
            return None
        assert self.endpoint is not None
        if self.endpoint.sticky:
            # Batches live in the upstream account that created them: another backend
            # would answer for a different account.
            return None
        if self.attempts >= failover.max_attempts:
            if failover.max_attempts > 1:
                self.metrics.retry_refused(provider, "attempts")
            return None
        if len(self.body) > failover.max_replay_bytes:
            self.metrics.retry_refused(provider, "body_too_large")
            return None
        target = self._pick_target()
        if target is None:
            self.metrics.retry_refused(provider, "no_backend")
            return None
        if not self.runtime.retry_budget.try_acquire_retry():
            self._unpick(target[1])
            self.metrics.retry_refused(provider, "budget")
            return None
        self.metrics.retry(provider, reason)
        if target[1] is not self.backend:
            self.metrics.failover(provider, reason)
        return target

    def _end_attempt(self, attempt: Attempt) -> None:
        """Release an attempt's backend slot and timer (once)."""
        if attempt.ended:
            return
        attempt.ended = True
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.cancel()
        attempt.timer = None
        attempt.backend.release()

    def _record(self, attempt: Attempt, result: str, *, failure: str | None = None) -> None:
        """Count an attempt's outcome for the breaker (once) and the metrics."""
        backend = attempt.backend
        if attempt.failed:
            return  # one failure per attempt: the breaker and metrics already have it
        self.metrics.upstream_attempt(backend.provider_name, backend.name, result)
        if failure is not None:
            attempt.failed = True
        if attempt.judged:
            if failure is not None:
                backend.breaker.record_failure(failure)
            return
        attempt.judged = True
        if failure is not None:
            was_open = backend.breaker.state == "open"
            backend.breaker.record_failure(failure)
            backend.note_error(failure)
            if not was_open and backend.breaker.state == "open":
                log.warn(
                    "circuit breaker of {backend} opened after: {failure}",
                    backend=backend,
                    failure=failure,
                )
        elif result == "ok":
            backend.breaker.record_success()
        else:
            backend.breaker.release_trial()

    def _on_timeout(self, attempt: Attempt) -> None:
        attempt.timer = None
        if self.done or attempt is not self.attempt:
            return
        if attempt.body is None:
            attempt.timed_out = "first_byte"
            if attempt.request is not None:
                attempt.request.cancel()
            return
        now = self.clock.seconds()
        self.timed_out = "total" if now >= self.total_deadline else "idle"
        upstream_body = attempt.body
        self.on_body_end(attempt, Failure(ConnectTimeoutError(f"{self.timed_out} timeout")))
        upstream_body.stopProducing()

    def _on_upstream_error(self, failure: Failure, attempt: Attempt) -> None:
        attempt.request = None
        if attempt.ended:
            # Ended by relayd before the upstream answered (the client left, a drain
            # aborted it): the cancellation's failure says nothing about the backend.
            return
        if attempt.timed_out is not None:
            result = "timeout"
            message = f"no response within {attempt.backend.timeouts.first_byte:g}s"
        elif failure.check(
            ConnectError, ConnectingCancelledError, DNSLookupError, ConnectTimeoutError
        ):
            result = "connect_error"
            message = f"could not connect: {failure.getErrorMessage()}"
        elif head_too_large(failure):
            result = "bad_headers"
            message = f"response head larger than {MAX_RESPONSE_HEAD} bytes"
        else:
            result = "no_response"
            message = f"connection closed without a response: {failure.getErrorMessage()}"
        self._record(attempt, result, failure=message)
        self._end_attempt(attempt)
        log.warn(
            "{request_id}: attempt {n} on {backend} failed: {message}",
            request_id=self.request_id,
            n=self.attempts,
            backend=attempt.backend,
            message=message,
        )
        if self.done:
            return
        target = self._may_retry(result)
        if target is not None:
            self._send(*target)
            return
        self.outcome = "upstream_timeout" if result == "timeout" else "upstream_error"
        self._set_retry_after(self._unavailable_for())
        if self.attempts > 1:
            self.request.setHeader(b"x-should-retry", b"false")
            self.request.setHeader(b"x-relayd-attempts", b"%d" % self.attempts)
        status = 504 if result == "timeout" else 502
        self.reply_error(
            status,
            f"upstream failed after {self.attempts} attempt(s); last: {message}",
        )

    def _on_response(self, response: IResponse, attempt: Attempt) -> None:
        attempt.request = None
        if self.done:
            response.deliverBody(_Drain())
            return
        backend = attempt.backend
        status = response.code
        family = backend.provider
        headers = sum(len(values) for _, values in response.headers.getAllRawHeaders())
        if headers > _MAX_RESPONSE_HEADERS:
            self._bad_headers(response, attempt, headers)
            return
        if status == 429:
            seconds = parse_retry_after(
                _first(response.headers.getRawHeaders(b"retry-after")), self.clock.seconds()
            )
            cooldown = min(max(seconds if seconds is not None else 5.0, 1.0), 600.0)
            backend.keys.cool_down(attempt.key, cooldown, "rate_limited")
            self._record(attempt, "status_429")
        elif status == 401:
            if backend.keys.authentication_failed(attempt.key):
                log.error(
                    "upstream key #{index} of {backend} was rejected with 401 "
                    "{times} times in a row: check it; it is benched and retried later",
                    index=attempt.key.index,
                    backend=backend,
                    times=REJECTIONS_TO_BENCH,
                )
            self._record(attempt, "status_401")
        elif status == 403:
            # A permission error belongs to this request (a model or feature the account
            # may not use): relayed to its client, and the shared key stays in service.
            self._record(attempt, "status_403")
        elif family.is_backend_failure(status):
            self._record(attempt, f"status_{status}", failure=f"upstream answered {status}")
        else:
            self._record(attempt, "ok" if status < 400 else "client_error")
            backend.keys.record_success(attempt.key)
        if family.is_retryable(status):
            target = self._may_retry(f"status_{status}")
            if target is not None:
                self._end_attempt(attempt)
                response.deliverBody(_Drain())
                self._send(*target)
                return
        self.response = response
        self.status = status
        self.first_byte_at = self.clock.seconds()
        call = self.call = attempt.call
        content_type = _first(response.headers.getRawHeaders(b"content-type")) or b""
        stream = content_type.startswith(b"text/event-stream") and status == 200
        gzipped = (
            _first(response.headers.getRawHeaders(b"content-encoding")) or b""
        ).lower() == b"gzip"
        objects = self.objects is not None and status < 300 and b"json" in content_type
        if (call.rewrites and not stream and (call.translated or status < 300)) or (
            objects and not stream
        ):
            # Translated answers (and renamed successes) are rewritten whole: status and
            # headers wait for the end of the body.
            self.rewritten = CollectedBody(_MAX_REWRITTEN_BODY, gzipped)
        elif content_type.startswith(b"text/event-stream"):
            self.watcher = family.stream_watcher(call.endpoint)
            if stream and call.rewrites:
                self.rewriter = call.stream_rewriter(int(self.first_byte_at))
            # Hold the stream's first events back until content starts, so an error
            # event before any content can still be failed over invisibly.
            self.holding = status == 200
            if not self.holding:
                self._begin_client_response()
            elif self.runtime.config.stream_keepalive > 0:
                self.wrote_at = self.first_byte_at
                self.keepalive = self.clock.callLater(
                    self.runtime.config.stream_keepalive, self._keep_alive
                )
        else:
            self._begin_client_response()
            if status < 300 and b"json" in content_type:
                self.collected = CollectedBody(_MAX_COLLECTED_BODY, gzipped)
        self._arm_idle_timer(attempt)
        response.deliverBody(_BodyRelay(self, attempt))

    def _bad_headers(self, response: IResponse, attempt: Attempt, count: int) -> None:
        """An answer with more headers than any real one has: an upstream failure."""
        message = f"response has {count} headers (at most {_MAX_RESPONSE_HEADERS})"
        self._record(attempt, "bad_headers", failure=message)
        target = self._may_retry("bad_headers")
        self._end_attempt(attempt)
        response.deliverBody(_Drain())
        if target is not None:
            self._send(*target)
            return
        self.outcome = "upstream_error"
        self.reply_error(502, f"the upstream's answer could not be relayed: its {message}")

    def _begin_client_response(self, rewritten: tuple[int, bytes] | None = None) -> None:
        """Send status and headers of the final upstream response to the client.

        ``rewritten`` is the status and body the client gets instead of the upstream's
        (a translated or renamed answer): its length replaces the upstream's, and the
        upstream's encoding no longer applies.
        """
        response = self.response
        call = self.call
        assert response is not None and call is not None
        request = self.request
        if rewritten is not None:
            request.setResponseCode(rewritten[0])
        else:
            request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        out.removeHeader(b"content-type")
        max_retry_after = self.runtime.config.failover.max_retry_after
        own_limits = self.limit_states
        # The upstream's limit headers describe relayd's key; a translated answer's are
        # also in names the client's SDK does not read.
        drop_limits = bool(own_limits) or call.translated
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in DROP_RESPONSE_HEADERS:
                continue
            if drop_limits and lower.startswith(_UPSTREAM_LIMIT_HEADER_PREFIXES):
                continue
            if call.translated and lower == b"content-type":
                continue
            if rewritten is not None and lower == b"content-encoding":
                continue
            if lower == b"retry-after":
                seconds = parse_retry_after(values[0], self.clock.seconds())
                if seconds is not None and seconds > max_retry_after:
                    values = [b"%d" % max_retry_after]
            elif lower == b"retry-after-ms":
                try:
                    if float(values[0]) > max_retry_after * 1000:
                        values = [b"%d" % (max_retry_after * 1000)]
                except ValueError:
                    continue
            out.setRawHeaders(name, values)
        if own_limits:
            for name, value in self.family.rate_limit_headers(own_limits, self.clock.seconds()):
                out.setRawHeaders(name, [value])
        if call.dropped:
            out.setRawHeaders(b"x-relayd-dropped", [", ".join(call.dropped).encode()])
        if self.attempts > 1:
            out.setRawHeaders(b"x-relayd-attempts", [b"%d" % self.attempts])
            if self.backend is not None and self.backend.provider.is_retryable(response.code):
                # relayd already retried elsewhere: the SDK retrying through us won't help.
                out.setRawHeaders(b"x-should-retry", [b"false"])
        if self.watcher is not None:
            if call.translated:
                out.setRawHeaders(b"content-type", [b"text/event-stream; charset=utf-8"])
            out.setRawHeaders(b"cache-control", [b"no-cache"])
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
            self.metrics.stream_opened()
            self.stream_open = True
        elif rewritten is not None:
            if call.translated:
                out.setRawHeaders(b"content-type", [b"application/json"])
            out.setRawHeaders(b"content-length", [b"%d" % len(rewritten[1])])
        elif response.length is not UNKNOWN_LENGTH:
            # Agent keeps Content-Length out of response.headers; relay it so the client
            # gets a length-delimited body rather than chunked encoding.
            out.setRawHeaders(b"content-length", [b"%d" % response.length])

    def _arm_idle_timer(self, attempt: Attempt, now: float | None = None) -> None:
        """(Re)start the attempt's timer: the idle gap, capped by the total deadline."""
        if now is None:
            now = self.clock.seconds()
        delay = max(min(attempt.backend.timeouts.idle, self.total_deadline - now), 0.0)
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.reset(delay)
        else:
            attempt.timer = self.clock.callLater(delay, self._on_timeout, attempt)

    def on_body_start(self, attempt: Attempt, transport: Any) -> None:
        attempt.body = transport
        if not self.done and attempt is self.attempt:
            self.request.registerProducer(transport, True)

    def on_body_data(self, attempt: Attempt, data: bytes) -> None:
        if self.done or attempt is not self.attempt:
            return
        now = self.clock.seconds()
        if attempt.timer is not None:
            self._arm_idle_timer(attempt, now)
        rewritten = self.rewritten
        if rewritten is not None:
            try:
                rewritten.feed(data)
            except BodyTooLargeError:
                self._refuse_rewrite(
                    attempt, f"is larger than {_MAX_REWRITTEN_BODY} bytes (decoded)"
                )
            except BadEncodingError:
                self._refuse_rewrite(attempt, "is not valid gzip")
            return
        watcher = self.watcher
        if watcher is not None:
            try:
                watcher.feed(data)
                if (
                    self.objects == "create"
                    and watcher.created_id is not None
                    and not self.claimed
                ):
                    self._claim_streamed(watcher.created_id)
                if self.holding:
                    self.held.append(data)
                    self.held_size += len(data)
                    if watcher.error_seen and not watcher.content_started:
                        self._fail_over_held_stream(
                            attempt, "stream_error", "in-stream error before content"
                        )
                    elif (
                        watcher.content_started
                        or watcher.complete
                        or self.held_size > _MAX_HELD_BYTES
                    ):
                        # Past the cap (100 MB of pings), holding costs more than the
                        # failover it buys: the stream goes live.
                        self._release_held()
                    return
                if self.rewriter is not None:
                    data = self.rewriter.feed(data)
                    if not data:
                        return
            except SseTooLargeError as exc:
                self._bad_stream(attempt, str(exc))
                return
            self.wrote_at = now
        elif self.collected is not None:
            try:
                self.collected.feed(data)
            except (BodyTooLargeError, BadEncodingError):
                self.collected = None  # relayed all the same; its usage stays unknown
        self.request.write(data)

    def _bad_stream(self, attempt: Attempt, problem: str) -> None:
        """The upstream's stream cannot be read (a line or event past the parser's bounds):
        an upstream failure, failed over while nothing was sent, else an error event."""
        message = f"upstream stream could not be relayed: {problem}"
        if self.holding:
            self.held = []  # nothing of it is worth sending
            self.held_size = 0
            if self._fail_over_held_stream(attempt, "bad_stream", message):
                return
        else:
            self._record(attempt, "bad_stream", failure=message)
        self.outcome = "upstream_bad_body"
        body = attempt.body
        self.request.unregisterProducer()
        self._end_stream_with_error(message)
        if body is not None:
            body.stopProducing()

    def _keep_alive(self) -> None:
        """Stream keepalive: after ``stream_keepalive`` seconds in which no stream byte
        reached the client, send an SSE comment (every SDK ignores comments), so that a
        proxy in front does not close the connection as idle during a long pause.

        A stream still held back for failover is released first: a pause that long
        means content is slow to come, and the client must see bytes now. A comment is
        only put between two events, never inside one.
        """
        self.keepalive = None
        if self.done:
            return
        interval = self.runtime.config.stream_keepalive
        now = self.clock.seconds()
        due = self.wrote_at + interval
        if now < due:
            self.keepalive = self.clock.callLater(due - now, self._keep_alive)
            return
        if self.holding:
            self._release_held()
        watcher = self.watcher
        if self.rewriter is not None or (watcher is not None and watcher.at_event_boundary()):
            self.request.write(b": keepalive\n\n")
        self.wrote_at = now
        self.keepalive = self.clock.callLater(interval, self._keep_alive)

    def _stop_keepalive(self) -> None:
        keepalive, self.keepalive = self.keepalive, None
        if keepalive is not None and keepalive.active():
            keepalive.cancel()

    def _release_held(self) -> None:
        """The stream is past the point of failover: send what was held, then relay live."""
        self.holding = False
        self.wrote_at = self.clock.seconds()
        self._begin_client_response()
        held, self.held = self.held, []
        self.held_size = 0
        rewriter = self.rewriter
        if rewriter is not None:
            held = [rewriter.feed(b"".join(held))]
        for chunk in held:
            if chunk:
                self.request.write(chunk)

    def _refuse_rewrite(self, attempt: Attempt, problem: str) -> None:
        """An answer that was to be rewritten cannot be: a 502, before any byte was sent."""
        self.outcome = "upstream_bad_body"
        self._record(attempt, "bad_body", failure=f"response body {problem}")
        self.rewritten = None
        body = attempt.body
        self.request.unregisterProducer()
        self.reply_error(502, f"the upstream's answer could not be relayed: its body {problem}")
        if body is not None:
            body.stopProducing()

    def _fail_over_held_stream(self, attempt: Attempt, result: str, message: str) -> bool:
        """A held stream failed before any content reached the client: try elsewhere.

        Returns False (having released what was held) when no retry is possible, so the
        caller goes on relaying this attempt's outcome to the client.
        """
        self._record(attempt, result, failure=message)
        target = self._may_retry(result)
        if target is None:
            self._release_held()
            return False
        self.request.unregisterProducer()
        self._stop_keepalive()
        self.watcher = None
        self.rewriter = None
        self.call = None
        self.held = []
        self.held_size = 0
        self.holding = False
        self.response = None
        self.status = None
        self.timed_out = None
        body = attempt.body
        self.attempt = None
        self._end_attempt(attempt)
        log.warn(
            "{request_id}: {backend} failed before any content ({message}); retrying",
            request_id=self.request_id,
            backend=attempt.backend,
            message=message,
        )
        if body is not None:
            body.stopProducing()
        self._send(*target)
        return True

    def on_body_end(self, attempt: Attempt, reason: Failure) -> None:
        if self.done or attempt is not self.attempt:
            return
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if self.holding:
            if self.timed_out is not None or not clean:
                result = "timeout" if self.timed_out else "stream_broken"
                if self._fail_over_held_stream(attempt, result, f"stream {result} before content"):
                    return
            else:
                self._release_held()
        self.upstream_done_at = self.clock.seconds()
        self.request.unregisterProducer()
        watcher = self.watcher
        backend = attempt.backend
        if watcher is not None:
            self.usage = watcher.usage
            if self.timed_out is not None:
                self.outcome = f"timeout_{self.timed_out}"
                self._record(attempt, "timeout", failure=f"stream {self.timed_out} timeout")
                self._end_stream_with_error(
                    f"upstream stream stopped: no data within the {self.timed_out} timeout"
                )
                return
            if not clean:
                self.outcome = "upstream_broken"
                self._record(attempt, "stream_broken", failure="stream broke off")
                self._end_stream_with_error("upstream connection broke off before the stream ended")
                return
            if not (watcher.complete or watcher.error_seen) and self.status == 200:
                self.outcome = "upstream_truncated"
                self._record(attempt, "stream_truncated", failure="stream truncated")
                self._end_stream_with_error("upstream stream ended without its final event")
                return
            if self.rewriter is not None:
                tail = self.rewriter.finish()
                if tail:
                    self.request.write(tail)
            self._finish()
            return
        if self.rewritten is not None and (not clean or self.timed_out is not None):
            # Nothing was sent yet: the client gets a proper error instead of a cut body.
            self.outcome = f"timeout_{self.timed_out}" if self.timed_out else "upstream_broken"
            self._record(attempt, "body_broken", failure=f"body {self.outcome}")
            self.rewritten = None
            self.reply_error(
                504 if self.timed_out else 502,
                f"upstream response body broke off ({self.outcome})",
            )
            return
        if not clean or self.timed_out is not None:
            # Headers are gone; the only honest signal left is an incomplete body.
            self.outcome = f"timeout_{self.timed_out}" if self.timed_out else "upstream_broken"
            self._record(attempt, "body_broken", failure=f"body {self.outcome}")
            backend.note_error(f"response body {self.outcome}")
            self.request.loseConnection()
            self._complete()
            return
        if self.rewritten is not None:
            self._relay_rewritten(attempt)
            return
        if self.collected is not None:
            self.usage = self._usage_from_collected()
        self._finish()

    def _usage_from_collected(self) -> Usage | None:
        assert self.collected is not None and self.backend is not None
        try:
            body = self.collected.value()
        except BadEncodingError:
            return None
        return self.backend.provider.usage_from_json(body)

    def _relay_rewritten(self, attempt: Attempt) -> None:
        """Send a whole upstream answer, translated or renamed for the client."""
        assert self.rewritten is not None and self.response is not None
        call = attempt.call
        status = self.response.code
        try:
            body = self.rewritten.value()
        except BadEncodingError:
            self._refuse_rewrite(attempt, "is not valid gzip")
            return
        self.rewritten = None
        if status < 300:
            self.usage = call.family.usage_from_json(body)
        try:
            rewritten = (
                call.rewrite_body(status, body, int(self.clock.seconds()))
                if call.rewrites
                else (status, body)
            )
        except BadUpstreamBodyError as exc:
            self._refuse_rewrite(attempt, str(exc))
            return
        except RecursionError:
            self._refuse_rewrite(attempt, "is nested too deeply")
            return
        except Exception:
            log.failure("{request_id}: rewriting the answer failed", request_id=self.request_id)
            self._refuse_rewrite(attempt, "could not be translated")
            return
        if self.objects is not None and rewritten[0] < 300:
            d = self._object_answer(rewritten[1])
            d.addCallbacks(
                lambda answer: self._send_rewritten((rewritten[0], answer)),
                self._owners_unknown,
            )
            d.addErrback(self.on_unexpected)
            return
        self._send_rewritten(rewritten)

    def _send_rewritten(self, rewritten: tuple[int, bytes]) -> None:
        if self.done:
            return
        self.status = rewritten[0]
        self._begin_client_response(rewritten)
        self.request.write(rewritten[1])
        self._finish()

    def _end_stream_with_error(self, message: str) -> None:
        log.warn(
            "{request_id}: {message} (backend {backend})",
            request_id=self.request_id,
            message=message,
            backend=self.backend,
        )
        event = self.family.stream_error_event(message, self.request_id)
        watcher = self.watcher
        if self.rewriter is None and watcher is not None and not watcher.at_event_boundary():
            # Cut mid-event: end that event first, so the error event parses on its own.
            event = b"\n\n" + event
        self.request.write(event)
        self._finish()

    def _unavailable_for(self) -> float:
        """Seconds until some backend of the route's providers may take requests (>= 1)."""
        now = self.clock.seconds()
        soonest: float | None = None
        backends = [b for p in providers_of(self.targets) for b in p.balancer.backends]
        for backend in backends:
            candidates = []
            if backend.breaker.state == "open" and backend.breaker.opened_until is not None:
                candidates.append(backend.breaker.opened_until - now)
            key_time = backend.keys.next_available_at()
            if key_time is not None:
                candidates.append(key_time - now)
            wait = max(candidates) if candidates else 0.0
            soonest = wait if soonest is None else min(soonest, wait)
        return max(soonest or 0.0, 1.0)

    def _set_retry_after(self, seconds: float) -> None:
        clamped = min(seconds, self.runtime.config.failover.max_retry_after)
        self.request.setHeader(b"retry-after", b"%d" % math.ceil(clamped))

    def on_unexpected(self, failure: Failure) -> None:
        log.failure("unexpected error relaying {request_id}", failure, request_id=self.request_id)
        self.fail_unexpectedly()

    def fail_unexpectedly(self) -> None:
        """A bug: answer 500 if nothing was sent yet (else drop the connection), stop the
        upstream call, and record the attempt as the relay's failure, not the backend's."""
        if self.done:
            return
        self.outcome = "relay_error"
        request = self.request
        attempt = self.attempt
        if attempt is not None and attempt.body is not None:
            request.unregisterProducer()
        if request.startedWriting:
            self._end_early("relay_error")
            request.loseConnection()
            return
        self.status = 500
        self._end_early("relay_error")
        self._send_json(
            500,
            self.family.render_error(
                500,
                "internal relay error; see the relay log for this request id",
                self.request_id,
            ),
        )

    # -- the local model list -----------------------------------------------------------------

    def _serve_model_list(self) -> None:
        """Ask each provider this API routes to for its models; keep the client's.

        Providers reached under the client's own model names are asked; a route's model
        names that its targets map to other upstream models (aliases) are listed as
        they are.
        """
        runtime = self.runtime
        asked: list[ProviderRoute] = []
        fetches: list[Deferred[list[dict[str, Any]]]] = []
        routes = runtime.router.routes_for(self.family.name)
        for route in routes:
            for target in route.targets:
                if target.model is not None or target.provider in asked:
                    continue
                backend = target.provider.balancer.choose()
                if backend is None:
                    continue
                asked.append(target.provider)
                fetches.append(self._fetch_models(backend))
        aliases = self._model_aliases()
        if not fetches and not aliases:
            self.reply_error(502 if routes else 404, "no provider can list models now")
            return
        d = DeferredList(fetches, consumeErrors=True)
        d.addCallback(self._merge_model_lists, asked, aliases)
        d.addErrback(self.on_unexpected)

    def _model_aliases(self) -> list[dict[str, Any]]:
        """Entries for the literal model names of routes that rename the model upstream."""
        assert self.client is not None
        router = self.runtime.router
        api = self.family.name
        entries = []
        for route in router.routes_for(api):
            if all(target.model is None for target in route.targets):
                continue
            for name in route.matcher.literals:
                if self.client.allows(name) and router.route(api, name) is route:
                    entries.append(self.family.model_entry(name))
        return entries

    def _fetch_models(self, backend: Backend) -> Deferred[list[dict[str, Any]]]:
        headers = backend.service_headers()
        version = self.request.requestHeaders.getRawHeaders(b"anthropic-version")
        if version:
            headers.setRawHeaders(b"anthropic-version", version)
        suffix = b"?limit=1000" if backend.provider.name == "anthropic" else b""
        backend.acquire()
        d = backend.agent.request(b"GET", backend.base_url + b"/v1/models" + suffix, headers)

        def read(response: IResponse) -> Deferred[bytes]:
            if response.code != 200:
                raise RuntimeError(f"model list answered {response.code}")
            return readBody(response)

        def release(result: object) -> object:
            backend.release()
            return result

        entries: Deferred[list[dict[str, Any]]] = d.addCallback(read).addCallback(model_entries)
        entries.addBoth(release)
        entries.addTimeout(backend.timeouts.first_byte, self.clock)
        return entries

    def _merge_model_lists(
        self,
        results: list[tuple[bool, Any]],
        providers: list[ProviderRoute],
        aliases: list[dict[str, Any]],
    ) -> None:
        if self.done:
            return
        assert self.client is not None
        router = self.runtime.router
        api = self.family.name
        merged: dict[str, dict[str, Any]] = {entry["id"]: entry for entry in aliases}
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
                route = router.route(api, model_id)
                if route is not None and any(
                    t.provider is provider and t.model is None for t in route.targets
                ):
                    merged[model_id] = entry
        if not ok and not aliases:
            self.reply_error(502, "no provider answered the model list")
            return
        self.status = 200
        self._write_json(200, self.family.render_model_list(list(merged.values())))

    # -- replies and the end ------------------------------------------------------------------

    def reply_error(self, status: int, message: str, code: str | None = None) -> None:
        """Answer with a relay-made error in the caller's API shape."""
        if self.done:
            return
        if self.outcome == "ok":
            self.outcome = "rejected" if status < 500 else "relay_error"
        if status < 500 and status not in _SDK_RETRIED:
            # A bad key, a forbidden model, an unknown route: asking again will not help,
            # and clients (Claude Code) otherwise retry a 401 for minutes.
            self.request.setHeader(b"x-should-retry", b"false")
        self.status = status
        body = self.family.render_error(status, message, self.request_id, code)
        self._write_json(status, body)

    def _write_json(self, status: int, body: bytes) -> None:
        self._send_json(status, body)
        self._complete()

    def _send_json(self, status: int, body: bytes) -> None:
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.request.finish()
        self._complete()

    def abort(self) -> None:
        """Drop the client connection now (shutdown drain ran out of time)."""
        if self.done:
            return
        self.outcome = "aborted"
        self._end_early("shutdown")
        self.request.loseConnection()

    def _client_went_away(self, failure: Failure | None) -> None:
        if self.done:
            return
        self.client_gone = True
        if self.outcome == "ok":
            self.outcome = "client_gone"
        stage = "during_response" if self.request.startedWriting else "before_response"
        self.metrics.client_disconnected(self.family.name, stage)
        self._end_early("client_gone")

    def _end_early(self, result: str) -> None:
        """End the exchange before its upstream did, for a reason that is not the
        backend's (``client_gone``, ``shutdown``): complete it first, so that whatever
        cancelling the upstream call causes finds it done and is neither recorded
        against the backend nor written to the client; then cancel."""
        if self.watcher is not None:
            self.usage = self.watcher.usage
        attempt = self.attempt
        self._complete(result)
        if attempt is not None:
            if attempt.request is not None:
                attempt.request.cancel()
            elif attempt.body is not None:
                attempt.body.stopProducing()

    def _complete(self, unjudged: str = "relay_error") -> None:
        """Release the backend, stop timers, count and log the request (once).

        An attempt still waiting for its answer is recorded as ``unjudged``: neither a
        success nor a failure of the backend (a half-open trial frees its slot).
        """
        if self.done:
            return
        self.done = True
        self._leave_queue()
        self._stop_keepalive()
        self.resource.exchange_done(self)
        attempt = self.attempt
        if attempt is not None:
            if not attempt.judged:
                self._record(attempt, unjudged)
            self._end_attempt(attempt)
        now = self.clock.seconds()
        usage = self.usage
        # A client that left before any byte was written got no status at all.
        status = 499 if self.client_gone and not self.request.startedWriting else self.status
        total = now - self.started
        ttfb = self.first_byte_at - self.started if self.first_byte_at is not None else None
        upstream_wait = 0.0
        if self.first_sent_at is not None:
            upstream_wait = (self.upstream_done_at or now) - self.first_sent_at
        if self.stream_open:
            self.metrics.stream_closed()
        # Labels and usage keys never take arbitrary client-supplied names: only routed
        # requests name a model, and only configured or upstream-confirmed ones.
        model = (
            self.runtime.model_labels.label(
                self.model, self.response is not None and self.response.code < 400
            )
            if self.route is not None
            else "-"
        )
        self._settle(usage, model)
        self.metrics.request_finished(
            client=self.client.name if self.client else "-",
            api=self.family.name,
            provider=self.provider_name or "-",
            backend=self.backend.name if self.backend else "-",
            model=model,
            status=status or 0,
            outcome=self.outcome,
            total=total,
            ttfb=ttfb,
            upstream_wait=upstream_wait,
            usage=usage,
        )
        log_access(
            {
                "request_id": self.request_id,
                "client": self.client.name if self.client else None,
                "api": self.family.name,
                "method": _printable(self.request.method),
                "path": _printable(self.request.path),
                "endpoint": self.endpoint.name if self.endpoint else None,
                "provider": self.provider_name,
                "backend": self.backend.name if self.backend else None,
                "model": self.model,
                "upstream_api": attempt.call.family.name if attempt else None,
                "upstream_model": (attempt.target.model or self.model) if attempt else None,
                "dropped": ",".join(attempt.call.dropped) or None if attempt else None,
                "stream": self.watcher is not None,
                "status": status,
                "outcome": self.outcome,
                "attempts": self.attempts,
                "total_ms": round(total * 1000, 1),
                "ttfb_ms": round(ttfb * 1000, 1) if ttfb is not None else None,
                "input_tokens": usage.input_tokens if usage else None,
                "output_tokens": usage.output_tokens if usage else None,
                "cache_read_tokens": usage.cache_read_tokens if usage else None,
                "cache_write_tokens": usage.cache_write_tokens if usage else None,
            }
        )

    def _settle(self, usage: Usage | None, model: str) -> None:
        """Hand the request's usage (under the model's label) and its limit reservations
        to the state store."""
        record = None
        if self.first_sent_at is not None and self.client is not None and self.backend:
            record = UsageRecord(
                self.client.name,
                model,
                self.backend.provider_name,
                self.backend.name,
                usage,
            )
        if not self.tickets:
            if record is not None:
                self.runtime.store.settle((), (), record)
            return
        relayed = self.response is not None and self.status is not None and self.status < 400
        if not relayed:
            outcome = (0, True)
        elif self.watcher is not None:
            outcome = (usage_tokens(usage), self.watcher.complete)
        else:
            outcome = (usage_tokens(usage), self.upstream_done_at is not None)
        for ticket, attempt in self.tickets:
            upstream = outcome if attempt is self.attempt else (0, True)
            self._settle_ticket(ticket, {"client": outcome, "upstream": upstream}, record)
            record = None

    def _settle_ticket(
        self, ticket: Ticket, outcomes: dict[str, tuple[int, bool]], record: UsageRecord | None
    ) -> None:
        adjustments, releases = ticket.settle(outcomes)
        local = ticket.decision.degraded
        self.runtime.store.settle(adjustments, releases, record, local=local)


class Attempt:
    """One try of an exchange: one route target, on one backend, with one key."""

    __slots__ = (
        "backend",
        "body",
        "call",
        "ended",
        "failed",
        "judged",
        "key",
        "request",
        "target",
        "timed_out",
        "timer",
    )

    def __init__(
        self, backend: Backend, key: UpstreamKey, target: RouteTarget, call: UpstreamCall
    ) -> None:
        self.backend = backend
        self.key = key
        self.target = target
        self.call = call
        self.request: Deferred[IResponse] | None = None
        self.body: Any = None  # the upstream response body's transport
        self.timer: IDelayedCall | None = None
        self.timed_out: str | None = None
        self.ended = False  # backend slot released
        self.judged = False  # breaker outcome recorded
        self.failed = False  # a failure was recorded (at most one per attempt)


_RESPONSE_DONE = Failure(ResponseDone())


class _BodyRelay(Protocol):
    """Receives one attempt's upstream body and hands each chunk to the exchange at once."""

    def __init__(self, exchange: Exchange, attempt: Attempt) -> None:
        self.exchange = exchange
        self.attempt = attempt

    def connectionMade(self) -> None:
        self.exchange.on_body_start(self.attempt, self.transport)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.exchange.on_body_data(self.attempt, data)
        except Exception:
            self.exchange.on_unexpected(Failure())

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        try:
            self.exchange.on_body_end(self.attempt, reason)
        except Exception:
            self.exchange.on_unexpected(Failure())


class _Drain(Protocol):
    """Reads and drops a body nobody wants, so its connection can go back to the pool."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        pass


def _first(values: Sequence[bytes] | None) -> bytes | None:
    return values[0] if values else None


def _batch_models(body: bytes) -> list[str] | None:
    """The models of a Message Batches create body, or None when it is malformed."""
    try:
        payload = jsonbody.loads(body)
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
