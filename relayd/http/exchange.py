"""One client request and its upstream counterpart, from arrival to access-log line.

The :class:`Exchange` coordinates the stages of the request path, in order:

``start -> intake -> [objects] -> route -> [cache] -> plan -> [wait] -> [gate] -> attempt
-> sink -> complete``

* intake, objects, route, cache, plan (:mod:`relayd.http.dispatch`): the endpoint, the
  caller's key, body and model; the owner of an upstream object; the route, its limits
  gate and its response cache (:mod:`relayd.http.caching`); the session's pin, the
  client's region, and the planner (:mod:`relayd.http.planner`), whose picks are each
  attempt's target, backend and key;
* wait (:mod:`relayd.http.waiting`): for a slot when every backend is at its cap;
* gate (:mod:`relayd.limits.gate`): the client's limits and the upstream quotas;
* attempt (:mod:`relayd.http.attempt`): one try, its timers and its verdict;
* sink (:mod:`relayd.http.bodies`): the answer's body, relayed as its kind needs;
* complete (:mod:`relayd.http.accesslog`): settlement, metrics, the access line.

A stage that cannot go on raises :class:`~relayd.errors.Refusal`; :meth:`Exchange.refuse`
renders it, once, in the caller's API error shape.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IResponse

from relayd.affinity import SessionAffinity
from relayd.cache import CACHE_PROVIDER, CachedAnswer
from relayd.errors import Outcome, Refusal, Result
from relayd.http import dispatch
from relayd.http.accesslog import read_usage, record_exchange, settle_exchange
from relayd.http.attempt import UpstreamAttempt, discard
from relayd.http.bodies import BodySink, choose_sink
from relayd.http.caching import CacheStage
from relayd.http.headers import write_answer_head
from relayd.http.intake import ClientCall
from relayd.http.objects import ObjectKeeper
from relayd.http.planner import AttemptPlanner, Pick
from relayd.http.replies import refusal_body, send_json
from relayd.http.waiting import SlotWait
from relayd.limits.checks import Decision
from relayd.limits.gate import LimitGate
from relayd.providers import DEFAULT_FAMILY, PROVIDERS, Endpoint, Usage
from relayd.routing import ProviderRoute, Route
from relayd.runtime import RelayRuntime
from relayd.upstream import Backend

if TYPE_CHECKING:
    from relayd.http.relay import RelayResource

log = Logger(namespace="relayd.relay")

REQUEST_ID_HEADER = b"x-relayd-request-id"

# Request ids correlate log lines: unique, not secret (no system call per request).
_ids = random.Random(os.urandom(32))




class Exchange:
    """One client request, through the stages of the request path."""

    __slots__ = (
        "affinity", "attempt", "attempts", "backend", "cache", "call", "client_gone", "client_ip",
        "clock", "deadline", "done", "endpoint", "family", "first_byte_at", "first_sent_at",
        "flagged", "gate", "metrics", "objects", "outcome", "pinned", "planner", "provider_name",
        "request", "request_id", "resource", "response", "route", "runtime", "sink", "started",
        "status", "stream_open", "upstream_done_at", "usage", "wait",
    )

    def __init__(self, resource: RelayResource, request: Request, runtime: RelayRuntime) -> None:
        self.resource = resource
        self.request = request
        self.runtime = runtime
        self.clock = resource.clock
        self.metrics = resource.metrics
        self.started = self.clock.seconds()
        self.request_id = f"req_{_ids.getrandbits(96):024x}"
        self.family = PROVIDERS[DEFAULT_FAMILY]
        self.endpoint: Endpoint | None = None
        self.call: ClientCall | None = None
        self.objects: ObjectKeeper | None = None  # an upstream object call
        self.pinned: tuple[ProviderRoute, Backend] | None = None  # where its object lives
        self.route: Route | None = None
        self.planner: AttemptPlanner | None = None
        self.gate: LimitGate | None = None
        self.wait: SlotWait | None = None
        self.cache: CacheStage | None = None  # a route that caches answers
        self.affinity: SessionAffinity | None = None  # a request of a pinned session
        self.client_ip = runtime.trusted_proxies.client_address(request)
        self.flagged: str | None = None  # the content rules that flagged it
        self.attempt: UpstreamAttempt | None = None  # the current (or last) try
        self.attempts = 0
        self.backend: Backend | None = None  # of the current (or last) try
        self.provider_name: str | None = None
        self.response: IResponse | None = None  # the answer being relayed
        self.sink: BodySink | None = None  # where its body goes
        self.status: int | None = None
        self.outcome = Outcome.OK
        self.usage: Usage | None = None
        self.first_sent_at: float | None = None
        self.first_byte_at: float | None = None
        self.upstream_done_at: float | None = None
        self.deadline = 0.0  # the total deadline, from the first attempt's backend
        self.stream_open = False
        self.client_gone = False
        self.done = False

    # -- the stages ---------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        request.setHeader(REQUEST_ID_HEADER, self.request_id.encode())
        request.responseHeaders.removeHeader(b"server")
        request.notifyFinish().addErrback(self._client_went_away)
        try:
            dispatch.intake(self)
        except Refusal as refusal:
            self.refuse(refusal)

    def first_attempt(self, planner: AttemptPlanner) -> None:
        """The request is planned (:mod:`relayd.http.dispatch`): send its first attempt,
        or wait for a backend slot."""
        runtime = self.runtime
        self.planner = planner
        self.provider_name = planner.provider_name
        runtime.retry_budget.record_request()
        pick = planner.next()
        if pick is not None:
            self._admit(pick)
            return
        untranslatable = planner.untranslatable()
        if untranslatable is not None:
            raise untranslatable
        blocked = planner.capacity_blocked()
        if not blocked:
            raise planner.no_backend()
        self.wait = SlotWait(
            self.resource.waiting_room, runtime.config, self.clock, self.metrics, planner,
            blocked, self._admit, self.on_unexpected,
        )

    def _admit(self, pick: Pick) -> None:
        """Send an attempt on ``pick`` once the limits gate (if any) admits it."""
        gate = self.gate
        d = gate.admit(pick.backend, pick.key, self.first_sent_at is None) if gate else None
        if d is None:
            self._send(pick, None)
            return
        d.addCallback(self._admitted, pick)
        d.addErrback(self.on_unexpected)

    def _admitted(self, decision: Decision, pick: Pick) -> None:
        gate = self.gate
        planner = self.planner
        assert gate is not None and planner is not None
        if self.done:
            # The client left while the store was deciding: give everything back.
            planner.unpick(pick)
            gate.give_back(decision)
            return
        if decision.allowed:
            self._send(pick, decision)
            return
        planner.unpick(pick)
        if not gate.quota_used_up(decision):
            raise gate.refusal(decision)
        # The key's provider quota is used up: keep it out, try another key or backend.
        self._admit(planner.around_quota(pick, decision.retry_after, self.attempts))

    def _send(self, pick: Pick, decision: Decision | None) -> None:
        assert self.planner is not None
        self.planner.sent(pick)
        self.attempts += 1
        backend = self.backend = pick.backend
        self.provider_name = backend.provider_name
        if self.first_sent_at is None:
            self.first_sent_at = self.clock.seconds()
            self.deadline = self.started + backend.timeouts.total
        attempt = self.attempt = UpstreamAttempt(
            self, pick, self.attempts, clock=self.clock, metrics=self.metrics,
            request_id=self.request_id, deadline=self.deadline,
        )
        if decision is not None:
            assert self.gate is not None
            self.gate.admitted(decision, attempt)
        attempt.send(self.request.method)

    def retry(self, result: str) -> Pick | None:
        """Where the failed current attempt may be retried, if anywhere."""
        if self.client_gone or self.done:
            return None
        assert self.planner is not None
        return self.planner.retry(result, self.attempts, self.backend)

    # -- what attempts report (relayd.http.attempt.AttemptHost) --------------------------------

    def attempt_responded(self, attempt: UpstreamAttempt, response: IResponse) -> None:
        status = response.code
        if attempt.backend.provider.is_retryable(status):
            pick = self.retry(f"status_{status}")
            if pick is not None:
                attempt.end()
                attempt.detach()
                discard(response)
                self._admit(pick)
                return
        stale = self._stale_for(status)
        if stale is not None:  # every target failed: the route serves a stale answer
            attempt.end()
            attempt.detach()
            discard(response)
            self._serve_stale(stale)
            return
        if self.affinity is not None and status < 300:
            self.affinity.served(attempt.backend, attempt.key)
        self.response = response
        self.status = status
        now = self.first_byte_at = self.clock.seconds()
        sink = self.sink = choose_sink(
            self, attempt, response, objects=self.objects,
            keepalive=self.runtime.config.stream_keepalive, now=now,
        )
        attempt.receive(response, sink)

    def attempt_failed(
        self, attempt: UpstreamAttempt, result: str, message: str, answered: bool
    ) -> None:
        pick = self.retry(result)
        if answered:
            attempt.end()
        if pick is None:
            assert self.planner is not None
            raise self.planner.gave_up(result, message, self.attempts, answered)
        self._admit(pick)

    def attempt_body_started(self, attempt: UpstreamAttempt) -> None:
        cache = self.cache
        body = attempt.body
        self.request.registerProducer(
            cache.body_producer(body) if cache is not None else body, True
        )

    def attempt_body_ended(self, attempt: UpstreamAttempt, clean: bool) -> None:
        assert self.sink is not None
        self.sink.end(clean)

    # -- what body sinks ask for (relayd.http.bodies.SinkHost) ---------------------------------

    def begin_response(self, sink: BodySink, rewritten: tuple[int, bytes] | None = None) -> None:
        """Send status and headers of the answer being relayed (or of ``rewritten``, the
        status and body the client gets instead: a translated or renamed answer)."""
        response = self.response
        attempt = self.attempt
        assert response is not None and attempt is not None
        write_answer_head(
            self.request, response, attempt.call, streaming=sink.streaming,
            rewritten=rewritten, family=self.family,
            limit_states=self.gate.limit_states if self.gate is not None else (),
            retried=self.attempts if self.attempts > 1 else 0,
            now=self.clock.seconds(),
            max_retry_after=self.runtime.config.failover.max_retry_after,
        )
        if sink.streaming:
            self.stream_opened()

    def stream_opened(self) -> None:
        """An SSE answer began (relayed, or shared with an identical request)."""
        self.metrics.stream_opened()
        self.stream_open = True

    def upstream_finished(self) -> None:
        self.upstream_done_at = self.clock.seconds()
        self.request.unregisterProducer()

    def fail_over(self, attempt: UpstreamAttempt, pick: Pick, message: str) -> None:
        """Drop a held stream's attempt (nothing of it reached the client) for ``pick``."""
        self.request.unregisterProducer()
        self.sink = None
        self.response = None
        self.status = None
        self.attempt = None
        attempt.detach()
        attempt.end()
        log.warn("{request_id}: {backend} failed before any content ({message}); retrying",
                 request_id=self.request_id, backend=attempt.backend, message=message)
        attempt.stop()
        self._admit(pick)

    def cut_off(self) -> None:
        """The answer's headers went but its body broke: drop the connection."""
        self.request.loseConnection()
        self._complete()

    # -- what the cache stage decides (relayd.http.caching.CacheHost) --------------------------

    def cache_missed(self) -> None:
        if not self.done:
            dispatch.plan(self)

    def from_cache(self, usage: Usage | None) -> None:
        """The answer comes from the cache: stored, or shared with an identical request."""
        self.status = 200
        self.usage = usage
        self.provider_name = CACHE_PROVIDER
        self.outcome = Outcome.OK
        self.first_byte_at = self.clock.seconds()

    def _stale_for(self, status: int) -> CachedAnswer | None:
        """A stale entry to serve instead of a failure of every target (5xx)."""
        return self.cache.stale_for_error(status) if self.cache is not None else None

    def _serve_stale(self, entry: CachedAnswer) -> None:
        assert self.cache is not None
        self.cache.serve(entry, "stale")

    # -- replies and the end ------------------------------------------------------------------

    def refuse(self, refusal: Refusal) -> None:
        """Answer with a relay-made error in the caller's API shape."""
        if self.done:
            return
        status = refusal.status
        if refusal.outcome is not None:
            self.outcome = refusal.outcome
        elif self.outcome == Outcome.OK:
            self.outcome = Outcome.REJECTED if status < 500 else Outcome.RELAY_ERROR
        request = self.request
        stale = None if request.startedWriting else self._stale_for(status)
        if stale is not None:
            self._serve_stale(stale)
            return
        if request.startedWriting:  # a stage refused too late for an error body
            log.error("{request_id}: refusal after the answer began: {message}",
                      request_id=self.request_id, message=refusal.message)
            self.fail_unexpectedly()
            return
        self.reply(status, refusal_body(
            request, refusal, self.family, self.request_id,
            self.runtime.config.failover.max_retry_after,
        ))

    def answered(self, body: bytes) -> None:
        if not self.done:
            self.reply(200, body)

    def reply(self, status: int, body: bytes) -> None:
        self.status = status
        send_json(self.request, status, body)
        self._complete()

    def finish(self) -> None:
        if not self.done:
            self.request.finish()
            self._complete()

    def on_unexpected(self, failure: Failure) -> None:
        """The errback of every stage: a refusal is answered, anything else is a bug."""
        refusal = failure.value
        if isinstance(refusal, Refusal):
            self.refuse(refusal)
            return
        log.failure("unexpected error relaying {request_id}", failure, request_id=self.request_id)
        self.fail_unexpectedly()

    def fail_unexpectedly(self) -> None:
        """A bug: answer 500 if nothing was sent yet (else drop the connection), stop the
        upstream call, and record the attempt as the relay's failure, not the backend's."""
        if self.done:
            return
        self.outcome = Outcome.RELAY_ERROR
        request = self.request
        attempt = self.attempt
        if attempt is not None and attempt.body is not None:
            request.unregisterProducer()
        if request.startedWriting:
            self._end_early(Result.RELAY_ERROR)
            request.loseConnection()
            return
        self.status = 500
        self._end_early(Result.RELAY_ERROR)
        send_json(request, 500, self.family.render_error(
            500, "internal relay error; see the relay log for this request id", self.request_id
        ))

    def abort(self) -> None:
        """Drop the client connection now (shutdown drain ran out of time)."""
        if self.done:
            return
        self.outcome = Outcome.ABORTED
        self._end_early(Result.SHUTDOWN)
        self.request.loseConnection()

    def _client_went_away(self, failure: Failure | None) -> None:
        if self.done:
            return
        self.client_gone = True
        if self.outcome == Outcome.OK:
            self.outcome = Outcome.CLIENT_GONE
        stage = "during_response" if self.request.startedWriting else "before_response"
        self.metrics.client_disconnected(self.family.name, stage)
        cache = self.cache
        if cache is not None and cache.keep_going(lambda: self._end_early(Result.CLIENT_GONE)):
            # Identical requests wait for this answer: it goes on for them, unseen by
            # this client, until it ends or they leave too (docs/caching.md).
            return
        self._end_early(Result.CLIENT_GONE)

    def _end_early(self, result: str) -> None:
        """End the exchange before its upstream did, for a reason that is not the
        backend's (``client_gone``, ``shutdown``): complete it first, so that whatever
        cancelling the upstream call causes finds it done and is neither recorded
        against the backend nor written to the client; then cancel."""
        if self.sink is not None:
            usage = self.sink.usage_so_far()
            if usage is not None:
                self.usage = usage
        attempt = self.attempt
        self._complete(result)
        if attempt is not None:
            attempt.stop()

    def _complete(self, unjudged: str = Result.RELAY_ERROR) -> None:
        """Release the backend, stop timers, and have the request settled, counted and
        logged once its answer is sent (once).

        An attempt still waiting for its answer is recorded as ``unjudged``: neither a
        success nor a failure of the backend (a half-open trial frees its slot).
        """
        if self.done:
            return
        self.done = True
        model: str | None = None
        try:
            if self.wait is not None:
                self.wait.leave()
                self.wait = None
            if self.sink is not None:
                self.sink.stop()
            attempt = self.attempt
            if attempt is not None:
                if not attempt.judged:
                    attempt.record(unjudged)
                attempt.end()
                attempt.detach()
            if self.stream_open:
                self.metrics.stream_closed()
            if self.cache is not None:
                read_usage(self)
                self.cache.complete(self, self.sink is not None and self.sink.complete)
            # A limit's slots and quotas now: the client's next request may wait for them.
            model = settle_exchange(self) if self.gate is not None else None
        finally:  # whatever failed above, it is reported and leaves ``active``
            self.resource.exchange_done(self, model, self.clock.seconds())

    def report(self, model: str | None, finished_at: float) -> None:
        """Once its answer is sent: settle (unless ``model`` says it is), count, log."""
        record_exchange(self, model, finished_at)
        self.sink = None  # (it refers back: without the cycle, refcounting frees them now)
