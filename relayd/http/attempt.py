"""One try of a request on one backend with one key: send, timers, verdict.

An :class:`UpstreamAttempt` sends the upstream request on the backend's pooled Agent,
owns its timers (first byte, then idle gaps capped by the request's total deadline),
judges the answer's status for the backend's breaker and key ring, classifies failures,
and, as the body's protocol, hands every chunk to the body sink the exchange chose.
It tells its host (the exchange) what happened; the host decides what comes next. Once
the host is done with it (:meth:`detach`), nothing it hears reaches the host again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as Interface

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from relayd.errors import Result
from relayd.keyring import REJECTIONS_TO_BENCH
from relayd.metrics import RelayMetrics
from relayd.pool import MAX_RESPONSE_HEAD, head_too_large
from relayd.retry_after import parse_retry_after
from relayd.timers import rearm

if TYPE_CHECKING:
    from relayd.http.bodies import BodySink
    from relayd.http.planner import Pick

log = Logger(namespace="relayd.relay")

# An upstream answer with more header lines than this is refused (502, or failed over):
# real answers carry a few dozen; relaying 20,000 would pass the flood on to the client.
MAX_RESPONSE_HEADERS = 200

# Timers are compared with this slack, so that float rounding never reschedules a timer
# by a few ulps (which a clock could run again at the same instant).
_SLACK = 1e-6

# What an attempt's outcome has done to the backend's breaker: nothing yet; judged (a
# success, or a result that is neither); failed (a failure was recorded: at most one).
_OPEN, _JUDGED, _FAILED = 0, 1, 2

_RESPONSE_DONE = Failure(ResponseDone())


class AttemptHost(Interface):
    """What an attempt reports to (the exchange)."""

    done: bool

    def attempt_responded(self, attempt: UpstreamAttempt, response: IResponse) -> None: ...

    def attempt_failed(
        self, attempt: UpstreamAttempt, result: str, message: str, answered: bool
    ) -> None: ...

    def attempt_body_started(self, attempt: UpstreamAttempt) -> None: ...

    def attempt_body_ended(self, attempt: UpstreamAttempt, clean: bool) -> None: ...

    def on_unexpected(self, failure: Failure) -> None: ...


class UpstreamAttempt(Protocol):
    """One try: one route target, on one backend, with one key (a :class:`Pick`)."""

    def __init__(
        self,
        host: AttemptHost,
        pick: Pick,
        number: int,
        *,
        clock: IReactorTime,
        metrics: RelayMetrics,
        request_id: str,
        deadline: float,
    ) -> None:
        self.host: AttemptHost | None = host
        self.pick = pick
        self.backend = pick.backend
        self.key = pick.key
        self.target = pick.target
        self.call = pick.call
        self.number = number
        self.clock = clock
        self.metrics = metrics
        self.request_id = request_id
        self.deadline = deadline  # the request's total deadline (clock time)
        self.request: Deferred[IResponse] | None = None  # until the answer's head arrives
        self.body: Any = None  # the upstream body's transport, once it flows
        self.sink: BodySink | None = None  # where the body's chunks go
        self.timer: IDelayedCall | None = None
        self.timed_out: str | None = None  # first_byte, idle or total
        self.last_data = 0.0  # clock time of the last body chunk
        self.ended = False  # backend slot released
        self.verdict = _OPEN
        self._body_over = False
        self.sent_at = 0.0

    # -- sending ------------------------------------------------------------------------------

    def send(self, method: bytes) -> None:
        """Send the request; its key and the backend's account headers are added here."""
        call = self.call
        backend = self.backend
        # The call's headers never carry these names (relayd.http.headers.NEVER_FORWARDED).
        headers = call.headers + self.key.auth_headers + backend.account_headers
        now = self.sent_at = self.clock.seconds()
        first_byte = max(min(backend.timeouts.first_byte, self.deadline - now), 0.0)
        self.timer = self.clock.callLater(first_byte, self._timer_fired)
        body = call.body
        d = backend.send(method, call.path, headers,
                         body if body or method == b"POST" else None)
        self.request = d
        d.addCallbacks(self._responded, self._failed)
        d.addErrback(self._unexpected)

    def _responded(self, response: IResponse) -> None:
        self.request = None
        now = self.clock.seconds()
        self.backend.latency.observe(now - self.sent_at, now)
        host = self.host
        if host is None or host.done:
            discard(response)
            return
        count = sum(len(values) for _, values in response.headers.getAllRawHeaders())
        if count > MAX_RESPONSE_HEADERS:
            # An answer with more headers than any real one has: an upstream failure.
            message = f"response has {count} headers (at most {MAX_RESPONSE_HEADERS})"
            self.record(Result.BAD_HEADERS, failure=message)
            discard(response)
            host.attempt_failed(self, Result.BAD_HEADERS, message, True)
            return
        self._judge(response)
        host.attempt_responded(self, response)

    def _judge(self, response: IResponse) -> None:
        """Tell the breaker and the key ring what the answer's status says."""
        backend = self.backend
        status = response.code
        if status == 429:
            seconds = parse_retry_after(
                first(response.headers.getRawHeaders(b"retry-after")), self.clock.seconds()
            )
            cooldown = min(max(seconds if seconds is not None else 5.0, 1.0), 600.0)
            backend.keys.cool_down(self.key, cooldown, "rate_limited")
            self.record("status_429")
        elif status == 401:
            if backend.keys.authentication_failed(self.key):
                log.error(
                    "upstream key #{index} of {backend} was rejected with 401 "
                    "{times} times in a row: check it; it is benched and retried later",
                    index=self.key.index, backend=backend, times=REJECTIONS_TO_BENCH,
                )
            self.record("status_401")
        elif status == 403:
            # A permission error belongs to this request (a model or feature the account
            # may not use): relayed to its client, and the shared key stays in service.
            self.record("status_403")
        elif backend.provider.is_backend_failure(status):
            self.record(f"status_{status}", failure=f"upstream answered {status}")
        else:
            self.record(Result.OK if status < 400 else Result.CLIENT_ERROR)
            backend.keys.record_success(self.key)

    def _failed(self, failure: Failure) -> None:
        self.request = None
        if self.ended:
            # Ended by relayd before the upstream answered (the client left, a drain
            # aborted it): the cancellation's failure says nothing about the backend.
            return
        if self.timed_out is not None:
            result = Result.TIMEOUT
            message = f"no response within {self.backend.timeouts.first_byte:g}s"
        elif failure.check(
            ConnectError, ConnectingCancelledError, DNSLookupError, ConnectTimeoutError
        ):
            result = Result.CONNECT_ERROR
            message = f"could not connect: {failure.getErrorMessage()}"
        elif head_too_large(failure):
            result = Result.BAD_HEADERS
            message = f"response head larger than {MAX_RESPONSE_HEAD} bytes"
        else:
            result = Result.NO_RESPONSE
            message = f"connection closed without a response: {failure.getErrorMessage()}"
        self.record(result, failure=message)
        self.end()
        log.warn("{request_id}: attempt {n} on {backend} failed: {message}",
                 request_id=self.request_id, n=self.number, backend=self.backend,
                 message=message)
        host = self.host
        if host is not None and not host.done:
            host.attempt_failed(self, result, message, False)

    def _unexpected(self, failure: Failure) -> None:
        host = self.host
        if host is not None:
            host.on_unexpected(failure)
        else:
            log.failure("unexpected error in a finished attempt of {request_id}", failure,
                        request_id=self.request_id)

    # -- the body (this object is its protocol) -----------------------------------------------

    def receive(self, response: IResponse, sink: BodySink) -> None:
        """Relay the answer's body into ``sink``, now under the idle timer."""
        self.sink = sink
        now = self.last_data = self.clock.seconds()
        delay = max(min(self.backend.timeouts.idle, self.deadline - now), 0.0)
        self.timer = rearm(self.clock, self.timer, delay, self._timer_fired)
        response.deliverBody(self)

    def connectionMade(self) -> None:
        self.body = self.transport
        host = self.host
        if host is not None and not host.done:
            host.attempt_body_started(self)

    def dataReceived(self, data: bytes) -> None:
        if self._body_over or self.host is None:
            return
        self.last_data = self.clock.seconds()
        try:
            self.sink.feed(data)  # type: ignore[union-attr]
        except Exception:
            self._unexpected(Failure())

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        self._body_ended(reason.check(ResponseDone, PotentialDataLoss) is not None)

    def _body_ended(self, clean: bool) -> None:
        if self._body_over:
            return
        self._body_over = True
        host = self.host
        if host is None or host.done:
            return
        try:
            host.attempt_body_ended(self, clean)
        except Exception:
            self._unexpected(Failure())

    # -- timers -------------------------------------------------------------------------------

    def _timer_fired(self) -> None:
        self.timer = None
        host = self.host
        if host is None or host.done:
            return
        if self.body is None:
            self.timed_out = "first_byte"
            if self.request is not None:
                self.request.cancel()
            return
        now = self.clock.seconds()
        due = min(self.last_data + self.backend.timeouts.idle, self.deadline)
        if now < due - _SLACK:
            # Data came since the timer was set: wait for the rest of the gap.
            self.timer = self.clock.callLater(due - now, self._timer_fired)
            return
        self.timed_out = "total" if now >= self.deadline - _SLACK else "idle"
        body = self.body
        self._body_ended(False)
        body.stopProducing()

    # -- the verdict and the end --------------------------------------------------------------

    def record(self, result: str, *, failure: str | None = None) -> None:
        """Count the attempt's outcome for the metrics and (once) the breaker.

        At most one failure is recorded per attempt; a failure after a judged success
        (a stream that breaks after its 200) still counts against the breaker.
        """
        verdict = self.verdict
        if verdict == _FAILED:
            return  # the breaker and metrics already have it
        backend = self.backend
        self.metrics.upstream_attempt(backend.provider_name, backend.name, result)
        breaker = backend.breaker
        if verdict == _JUDGED:
            if failure is not None:
                self.verdict = _FAILED
                breaker.record_failure(failure)
            return
        if failure is not None:
            self.verdict = _FAILED
            was_open = breaker.state == "open"
            breaker.record_failure(failure)
            backend.note_error(failure)
            if not was_open and breaker.state == "open":
                log.warn("circuit breaker of {backend} opened after: {failure}",
                         backend=backend, failure=failure)
            return
        self.verdict = _JUDGED
        if result == Result.OK:
            breaker.record_success()
        else:
            breaker.release_trial()

    @property
    def judged(self) -> bool:
        return self.verdict != _OPEN

    def end(self) -> None:
        """Release the backend slot and stop the timer (once)."""
        if self.ended:
            return
        self.ended = True
        timer = self.timer
        if timer is not None and timer.active():
            timer.cancel()
        self.timer = None
        self.backend.release()

    def stop(self) -> None:
        """Stop the upstream call: cancel it while waiting for the answer, else stop
        reading its body."""
        if self.request is not None:
            self.request.cancel()
        elif self.body is not None:
            self.body.stopProducing()

    def detach(self) -> None:
        """The host is done with this attempt: nothing more reaches it."""
        self.host = None
        self.sink = None  # (its sink refers back to it)


class _Drain(Protocol):
    """Reads and drops a body nobody wants, so its connection can go back to the pool."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        pass


def discard(response: IResponse) -> None:
    """Read an unwanted answer's body to its end."""
    response.deliverBody(_Drain())


def first(values: Any) -> bytes | None:
    """The first of a header's raw values, or None."""
    return values[0] if values else None
