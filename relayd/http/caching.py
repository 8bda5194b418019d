"""The cache stage of the request path: look up, wait for an identical request, or capture.

Runs once the route is known (its ``cache`` settings, its targets) and the client's own
limits have admitted the request, for endpoints whose answers may be kept
(:attr:`relayd.providers.Endpoint.cacheable`). In order:

1. the client's ``Cache-Control`` and the request's sampling decide whether to look up
   and whether to store (``bypass`` otherwise);
2. the memory level: a fresh entry is a ``hit``; an expired one within the route's
   ``stale_if_error`` is kept aside, in case every target fails (``stale``);
3. with ``coalesce``, an identical request in flight in this process: this one joins
   it (:mod:`relayd.cache.flights`); otherwise this one becomes the flight others join;
4. the shared level (Redis); with ``coalesce``, a lock there makes one instance go
   upstream while the others poll the shared level, at most ``cache.coalesce_wait``
   seconds, before going upstream themselves;
5. a ``miss``: the request goes upstream with its client's answer captured; at the end
   a complete 200 is stored (:meth:`CacheStage.complete`).

What the stage decides reaches the exchange through :class:`CacheHost`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request

from relayd.cache import CacheControls, CachedAnswer, cache_key, parse_cache_control, samples
from relayd.cache.flights import Capture
from relayd.cache.store import ResponseCache
from relayd.errors import Outcome
from relayd.http.intake import ClientCall
from relayd.providers import Endpoint, IProvider, Usage
from relayd.routing import Route

if TYPE_CHECKING:
    from relayd.config.model import RouteCacheConfig
    from relayd.limits.checks import Decision
    from relayd.limits.gate import LimitGate

__all__ = ["CACHE_HEADER", "CacheHost", "CacheStage", "FlightJoiner"]

log = Logger(namespace="relayd.cache")

CACHE_HEADER = b"x-relayd-cache"
# Polling the shared level while another instance holds the coalescing lock.
_POLL_FIRST, _POLL_MAX = 0.05, 0.5


class CacheHost(Protocol):
    """The exchange, as the cache stage sees it."""

    done: bool
    client_gone: bool
    outcome: str
    status: int | None
    usage: Usage | None
    request: Request
    request_id: str
    family: IProvider
    clock: IReactorTime

    def from_cache(self, usage: Usage | None) -> None: ...

    def cache_missed(self) -> None: ...

    def finish(self) -> None: ...

    def stream_opened(self) -> None: ...

    def on_unexpected(self, failure: Failure) -> None: ...


class CacheStage:
    """One request's use of the response cache (see the module's docstring)."""

    __slots__ = ("_deadline", "_poll", "_poll_delay", "cache", "capture", "client", "controls",
                 "host", "joined", "joiner", "key", "lock_token", "looking", "model", "route",
                 "settings", "shared_key", "stale", "state", "storing", "streamed")

    def __init__(
        self,
        cache: ResponseCache,
        settings: RouteCacheConfig,
        route: str,
        client: str | None,
        key: str,
        controls: CacheControls,
        *,
        model: str,
        looking: bool,
        storing: bool,
        streamed: bool,
    ) -> None:
        self.cache = cache
        self.settings = settings
        self.route = route
        self.client = client  # None: an entry shared by every client
        self.model = model  # as the client named it (kept with the entry)
        self.key = key
        self.controls = controls
        self.looking = looking
        self.storing = storing
        self.streamed = streamed
        self.state = "miss" if looking else "bypass"
        shared = cache.shared
        self.shared_key = shared.key(key, route, client or "") if shared is not None else None
        self.host: CacheHost | None = None
        self.stale: CachedAnswer | None = None  # served if every target fails
        self.capture: Capture | None = None  # this request's answer, as it goes
        self.joiner: FlightJoiner | None = None
        self.joined: Capture | None = None  # the flight this request waits for
        self.lock_token: str | None = None
        self._poll: IDelayedCall | None = None
        self._deadline = 0.0
        self._poll_delay = _POLL_FIRST

    @classmethod
    def for_request(
        cls,
        cache: ResponseCache,
        route: Route,
        endpoint: Endpoint,
        family: IProvider,
        call: ClientCall,
        request: Request,
    ) -> CacheStage | None:
        """The stage of a request, or None when its route caches nothing or its endpoint
        keeps no answers."""
        settings = route.cache
        payload = call.payload
        if settings is None or not endpoint.cacheable or payload is None or call.model is None:
            return None
        controls = parse_cache_control(request.requestHeaders)
        sampled = endpoint.samples and not settings.sampled and samples(payload)
        storing = not (controls.no_store or sampled)
        looking = storing and not controls.no_cache
        client = None if settings.scope == "shared" else call.client.name
        try:
            key = cache_key(
                family=family.name,
                endpoint=endpoint.name,
                targets=[(t.provider.name, t.model or call.model) for t in route.targets],
                client=client,
                headers=request.requestHeaders,
                answer_headers=family.answer_headers,
                payload=payload,
            )
        except ValueError:  # a body JSON cannot state canonically (NaN): not cached
            return None
        return cls(cache, settings, route.label, client, key, controls, model=call.model,
                   looking=looking, storing=storing, streamed=call.stream)

    # -- the lookup ---------------------------------------------------------------------------

    def start(self, host: CacheHost, gate: LimitGate | None) -> None:
        """Admit the request against its client's own limits (a hit counts as a request
        too), then look it up: answer it from the cache (:meth:`serve`), join a flight,
        or send it upstream (:meth:`~CacheHost.cache_missed`), now or later."""
        self.host = host
        d = gate.admit_client() if gate is not None else None
        if d is None or gate is None:
            self._look_up()
            return
        d.addCallback(self._client_admitted, gate).addErrback(host.on_unexpected)

    def _client_admitted(self, decision: Decision, gate: LimitGate) -> None:
        host = self.host
        assert host is not None
        if host.done:
            gate.give_back(decision)
            return
        if not decision.allowed:
            raise gate.refusal(decision)
        gate.admitted(decision, None)
        self._look_up()

    def _look_up(self) -> None:
        host = self.host
        assert host is not None
        if not self.looking:
            host.request.setHeader(CACHE_HEADER, b"bypass")
            self._go_upstream()
            return
        cache = self.cache
        now = host.clock.seconds()
        entry = cache.memory.get(self.key, now)
        if entry is not None:
            if entry.fresh(now, self.controls.max_age):
                self._hit(entry)
                return
            self._keep_stale(entry, now)
        if self.settings.coalesce:
            flight = cache.flights.get(self.key)
            if flight is not None:
                joiner = FlightJoiner(self)
                if flight.join(joiner):
                    self.joiner = joiner
                    self.joined = flight
                    cache.coalesced += 1
                    return
            capture = self.capture = Capture(self.key, cache.config.max_entry_bytes, self.streamed)
            capture.flights = cache.flights
            cache.flights[self.key] = capture
        shared = cache.shared
        if shared is not None and self.shared_key is not None:
            d = shared.get(self.shared_key)
            d.addCallback(self._shared_found).addErrback(host.on_unexpected)
            return
        self._missed()

    def _keep_stale(self, entry: CachedAnswer, now: float) -> None:
        if now < entry.stale_until and self.settings.stale_if_error > 0:
            self.stale = entry

    def _shared_hit(self, entry: CachedAnswer | None, now: float) -> bool:
        """Serve ``entry`` from the shared level if it is fresh (kept in memory too)."""
        if entry is None or not entry.fresh(now, self.controls.max_age):
            return False
        self.cache.memory.put(self.key, entry)
        self.cache.shared_hits += 1
        self._hit(entry)  # a lock this request took is let go when the exchange completes
        return True

    def _shared_found(self, entry: CachedAnswer | None) -> None:
        host = self.host
        assert host is not None
        if host.done:
            return
        now = host.clock.seconds()
        if self._shared_hit(entry, now):
            return
        if entry is not None:
            self._keep_stale(entry, now)
        if not self.settings.coalesce or self.cache.shared is None:
            self._missed()
            return
        self._try_lock(first=True)

    def _try_lock(self, *, first: bool) -> None:
        """Take the coalescing lock in Redis (``first``: on the miss; else after a poll
        that found no entry, to learn whether the holder is gone)."""
        host = self.host
        shared = self.cache.shared
        assert host is not None
        if shared is None:
            self._missed()
            return
        token = os.urandom(12).hex()
        d = shared.lock(self.key, token, self.cache.config.coalesce_wait)
        d.addCallback(self._locked, token, first).addErrback(host.on_unexpected)

    def _locked(self, taken: bool | None, token: str, first: bool) -> None:
        host = self.host
        shared = self.cache.shared
        assert host is not None
        if host.done:
            if taken and shared is not None:
                shared.unlock(self.key, token)
            return
        if taken is False:
            # Another instance is asking upstream: wait for its answer in Redis.
            if first:
                self._deadline = host.clock.seconds() + self.cache.config.coalesce_wait
                self.cache.coalesced += 1
            else:
                self._poll_delay = min(self._poll_delay * 2, _POLL_MAX)
            self._poll = host.clock.callLater(self._poll_delay, self._poll_shared)
            return
        self.lock_token = token if taken else None
        if first or not taken or shared is None or self.shared_key is None:
            self._missed()
            return
        # The holder may have stored its answer and let go between the last look and
        # this lock: one more look before going upstream.
        d = shared.get(self.shared_key)
        d.addCallback(self._last_look).addErrback(host.on_unexpected)

    def _poll_shared(self) -> None:
        self._poll = None
        host = self.host
        shared = self.cache.shared
        assert host is not None
        if host.done:
            return
        if shared is None or self.shared_key is None:
            self._missed()
            return
        d = shared.get(self.shared_key)
        d.addCallback(self._polled).addErrback(host.on_unexpected)

    def _polled(self, entry: CachedAnswer | None) -> None:
        host = self.host
        assert host is not None
        if host.done:
            return
        now = host.clock.seconds()
        if self._shared_hit(entry, now):
            return
        if now >= self._deadline:
            log.info("{request_id}: no answer from the instance coalescing this request "
                     "within {wait} s; asking upstream", request_id=host.request_id,
                     wait=self.cache.config.coalesce_wait)
            self._missed()
            return
        # Still no entry: is the lock still held? If its holder ended without storing an
        # answer (it failed), the lock is gone and this request takes over.
        self._try_lock(first=False)

    def _last_look(self, entry: CachedAnswer | None) -> None:
        host = self.host
        assert host is not None
        if host.done:
            return
        if not self._shared_hit(entry, host.clock.seconds()):
            self._missed()

    def _hit(self, entry: CachedAnswer) -> None:
        host = self.host
        assert host is not None
        capture = self.capture
        if capture is not None:
            # This request led a flight: its joiners get the same entry.
            self.capture = None
            capture.close(entry)
        self.serve(entry, "hit")

    def _missed(self) -> None:
        host = self.host
        assert host is not None
        host.request.setHeader(CACHE_HEADER, b"miss")
        self._go_upstream()

    def _go_upstream(self) -> None:
        host = self.host
        assert host is not None
        if self.storing:
            if self.capture is None:
                self.capture = Capture(self.key, self.cache.config.max_entry_bytes, self.streamed)
            host.request.tap = self.capture  # type: ignore[attr-defined]
        host.cache_missed()

    # -- a joined flight ending ---------------------------------------------------------------

    def flight_over(self, entry: CachedAnswer | None) -> None:
        """The flight this request waited for ended before sending it anything."""
        self.joiner = None
        self.joined = None
        if entry is not None:
            self.serve(entry, "hit")
            return
        # The leader got no answer to share: this request asks upstream itself.
        self._missed()

    # -- a leader whose client left ------------------------------------------------------------

    def keep_going(self, give_up: Callable[[], None]) -> bool:
        """The leader's client left: whether its answer goes on for the requests waiting
        for it (then ``give_up`` is called if they all leave before it ends)."""
        capture = self.capture
        if capture is None or not capture.waited_for:
            return False
        capture.deserted = give_up
        return True

    def body_producer(self, body: Any) -> Any:
        """What the client's connection gets as the producer of the upstream body: the
        body itself, or (for a flight's leader) a guard that keeps it flowing for the
        waiters when that connection is lost."""
        if self.capture is None or self.capture.flights is None:
            return body
        return _KeptForJoiners(body, self.capture)

    # -- answers from the cache ---------------------------------------------------------------

    def serve(self, entry: CachedAnswer, state: str) -> None:
        """Answer with a stored answer (``state``: ``hit`` or ``stale``): its status,
        headers and exact bytes."""
        host = self.host
        assert host is not None
        if host.done:
            return
        self.state = state
        request = host.request
        request.tap = None  # type: ignore[attr-defined]  # never captured again
        host.from_cache(entry.usage)
        self.write_head(entry.headers, state, host.clock.seconds() - entry.stored_at)
        if not entry.streamed:
            request.setHeader(b"content-length", b"%d" % len(entry.body))
        request.write(entry.body)
        host.finish()

    def write_head(self, headers: tuple[tuple[bytes, bytes], ...], state: str, age: float) -> None:
        """Status and headers of an answer from the cache (``age``: seconds stored)."""
        self.state = state
        request = self.host.request  # type: ignore[union-attr]
        request.setResponseCode(200)
        answer = request.responseHeaders
        for name, value in headers:
            answer.addRawHeader(name, value)
        answer.setRawHeaders(CACHE_HEADER, [state.encode()])
        answer.setRawHeaders(b"age", [b"%d" % max(int(age), 0)])

    def stale_for_error(self, status: int) -> CachedAnswer | None:
        """The expired entry to serve instead of an answer of ``status`` (a 5xx: every
        target failed), if there is one."""
        stale = self.stale
        host = self.host
        if status < 500 or stale is None or host is None:
            return None
        return stale if host.clock.seconds() < stale.stale_until else None

    # -- the end ------------------------------------------------------------------------------

    def complete(self, host: CacheHost, complete: bool) -> None:
        """The exchange ends: store its answer if it may be kept (``complete``: its body
        sink saw the whole answer, a stream its terminal event), release what waits."""
        poll, self._poll = self._poll, None
        if poll is not None and poll.active():
            poll.cancel()
        request = host.request
        capture = self.capture
        if capture is not None:
            if getattr(request, "tap", None) is capture:
                request.tap = None  # type: ignore[attr-defined]
            entry = None
            # ``finished``: the answer's end was reached and written (to a client that may
            # have left meanwhile, when others waited for it).
            if (
                self.storing and complete and capture.keeping and capture.finished
                and capture.status == 200 and host.status == 200
                and host.outcome in (Outcome.OK, Outcome.CLIENT_GONE)
                and self.state in ("miss", "bypass")
            ):
                now = host.clock.seconds()
                ttl = self.settings.ttl
                entry = CachedAnswer(
                    status=200, headers=capture.headers, body=capture.body,
                    streamed=capture.streamed, stored_at=now, expires_at=now + ttl,
                    stale_until=now + ttl + self.settings.stale_if_error, route=self.route,
                    client=self.client or "", model=self.model, usage=host.usage,
                )
                self.cache.keep(self.key, self.shared_key, entry)
            capture.close(entry)
            self.capture = None
        joined, joiner = self.joined, self.joiner
        if joined is not None and joiner is not None:
            joined.leave(joiner)
        token, self.lock_token = self.lock_token, None
        if token is not None and self.cache.shared is not None:
            self.cache.shared.unlock(self.key, token)
        self.cache.counted(self.state)


class _KeptForJoiners:
    """The upstream body, as the leader's client connection produces it: a lost
    connection stops it only when no request waits for the answer (else a pause its
    client's backpressure left on it is lifted)."""

    __slots__ = ("body", "capture")

    def __init__(self, body: Any, capture: Capture) -> None:
        self.body = body
        self.capture = capture

    def pauseProducing(self) -> None:
        self.body.pauseProducing()

    def resumeProducing(self) -> None:
        self.body.resumeProducing()

    def stopProducing(self) -> None:
        if self.capture.waited_for:
            self.body.resumeProducing()
            return
        self.body.stopProducing()


class FlightJoiner:
    """A request given the answer of an identical one in flight (a push producer on its
    own client's connection, so a slow joiner never slows the leader or the others)."""

    __slots__ = ("ending", "live", "paused", "pending", "pending_size", "stage")

    def __init__(self, stage: CacheStage) -> None:
        self.stage = stage
        self.live = False  # the stream's head went to this joiner's client
        self.paused = False
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.ending: tuple[CachedAnswer | None, bool] | None = None

    @property
    def _host(self) -> CacheHost:
        host = self.stage.host
        assert host is not None
        return host

    def flight_started(self, status: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        host = self._host
        if host.done:
            return
        self.live = True
        host.from_cache(None)
        self.stage.write_head(headers, "hit", 0.0)
        host.request.registerProducer(self, True)
        host.stream_opened()

    def flight_data(self, data: bytes) -> None:
        host = self._host
        if not self.live or host.done:
            return
        if self.paused:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > self.stage.cache.config.max_entry_bytes:
                # Too far behind to catch up: end it like a broken stream.
                self.pending = []
                self.ending = (None, False)
                self.paused = False
                self._end()
            return
        host.request.write(data)

    def flight_ended(self, entry: CachedAnswer | None, finished: bool) -> None:
        host = self._host
        if host.done:
            return
        if not self.live:
            self.stage.flight_over(entry)
            return
        self.ending = (entry, finished)
        if not self.paused:
            self._end()

    def _end(self) -> None:
        host = self._host
        ending, self.ending = self.ending, None
        if ending is None or host.done:
            return
        pending, self.pending = self.pending, []
        self.pending_size = 0
        request = host.request
        for chunk in pending:
            request.write(chunk)
        request.unregisterProducer()
        entry, finished = ending
        if entry is not None:
            host.usage = entry.usage
        elif not finished:
            host.outcome = Outcome.UPSTREAM_BROKEN
            request.write(b"\n\n" + host.family.stream_error_event(
                "the upstream stream this request shared with an identical one ended early",
                host.request_id,
            ))
        host.finish()

    # -- IPushProducer -----------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        host = self._host
        pending, self.pending = self.pending, []
        self.pending_size = 0
        for chunk in pending:
            if host.done:
                return
            host.request.write(chunk)
        if self.ending is not None:
            self._end()

    def stopProducing(self) -> None:
        self.paused = True
