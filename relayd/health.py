"""Backend health: passive circuit breakers and active probes.

Everything here is bookkeeping driven by an injected clock (``IReactorTime``), never the
global reactor, so tests can drive time with :class:`twisted.internet.task.Clock`.

The request path calls :meth:`CircuitBreaker.allow_request` and the ``record_*`` methods
once or a few times per request: they are O(1), allocate nothing and never log. Only
:class:`HealthChecker` does I/O, through the ``probe`` callable it is given. A backend's
upstream keys are in :mod:`relayd.keyring`, the retry budget in
:mod:`relayd.retry_budget`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.backoff import doubled
from relayd.config.model import BreakerConfig, HealthCheckConfig

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "ActiveHealth",
    "CircuitBreaker",
    "HealthChecker",
]

_log = Logger(namespace="relayd.health")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-backend passive outlier detection over the last ``window`` outcomes.

    Closed: outcomes go into a ring of the last ``config.window`` booleans (True is a
    failure) with a running failure count, so recording is O(1); once ``config.failures``
    of them are failures the breaker opens. Open: no request is allowed until
    ``opened_until``; the n-th consecutive opening lasts ``cooldown * 2**(n-1)`` seconds,
    capped at ``max_cooldown``. The open -> half-open step is taken lazily when the state
    is looked at, so no timer is needed. Half-open: up to ``half_open_requests`` trials
    may be in flight; one success closes the breaker (and forgets the window and the
    doubling), one failure re-opens it with the next, doubled, cooldown.

    Outcomes reported while open (requests started before it opened) are ignored. The
    breaker cannot tell a trial from such a straggler finishing during half-open, so a
    straggler's outcome counts as a trial's: it is as much evidence about the backend.
    """

    __slots__ = (
        "_clock",
        "_config",
        "_failures",
        "_filled",
        "_opened_until",
        "_pos",
        "_ring",
        "_state",
        "_trials",
        "consecutive_opens",
        "last_failure_reason",
        "transitions",
    )

    def __init__(self, config: BreakerConfig, clock: IReactorTime) -> None:
        self._config = config
        self._clock = clock
        self._state = CLOSED
        self._opened_until: float | None = None
        self._ring: list[bool] = [False] * max(config.window, 1)
        self._pos = 0  # where the next outcome goes
        self._filled = 0  # outcomes held, at most len(self._ring)
        self._failures = 0  # failures among the held outcomes
        self._trials = 0  # half-open trials in flight
        self.consecutive_opens = 0
        self.last_failure_reason: str | None = None
        self.transitions = 0

    @property
    def config(self) -> BreakerConfig:
        """The thresholds in force."""
        return self._config

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``, after any due open -> half-open step."""
        if self._state is OPEN:
            self._refresh()
        return self._state

    @property
    def opened_until(self) -> float | None:
        """Clock time at which the open breaker turns half-open; None unless open."""
        if self._state is OPEN:
            self._refresh()
        return self._opened_until

    @property
    def failures_in_window(self) -> int:
        """How many of the outcomes in the window are failures (for metrics and tests)."""
        return self._failures

    @property
    def trials_in_flight(self) -> int:
        """Half-open trials started and not yet finished."""
        return self._trials

    def allow_request(self) -> bool:
        """Whether a request may go to this backend now; a half-open pass counts as a trial.

        A caller that gets True in half-open state must end the trial with exactly one of
        :meth:`record_success`, :meth:`record_failure` or :meth:`release_trial`.
        """
        state = self._state
        if state is CLOSED:
            return True
        if state is OPEN:
            self._refresh()
            if self._state is OPEN:
                return False
        if self._trials < self._config.half_open_requests:
            self._trials += 1
            return True
        return False

    def record_success(self) -> None:
        """A request succeeded: remember it (closed) or close the breaker (half-open)."""
        state = self._state
        if state is CLOSED:
            self._record(False)
        elif state is HALF_OPEN or self.state is HALF_OPEN:
            self._close()

    def record_failure(self, reason: str) -> None:
        """A request failed for ``reason``: remember it (closed, maybe opening) or re-open."""
        self.last_failure_reason = reason
        state = self._state
        if state is CLOSED:
            self._record(True)
            if self._failures >= self._config.failures:
                self._open()
        elif state is HALF_OPEN or self.state is HALF_OPEN:
            self._open()

    def release_trial(self) -> None:
        """A half-open trial ended with no verdict (client gone, a 4xx): free its slot."""
        if self._trials > 0 and self.state is HALF_OPEN:
            self._trials -= 1

    def reconfigure(self, config: BreakerConfig) -> None:
        """Apply new thresholds and keep the state.

        The window keeps its most recent outcomes (trimmed when it shrinks); an open
        breaker keeps its ``opened_until`` (the new cooldowns apply from the next opening);
        a lower ``failures`` threshold takes effect at the next recorded failure.
        """
        size = max(config.window, 1)
        if size != len(self._ring):
            held = self._outcomes()[-size:]
            self._ring = held + [False] * (size - len(held))
            self._filled = len(held)
            self._pos = self._filled % size
            self._failures = sum(held)
        self._config = config

    def _outcomes(self) -> list[bool]:
        """The outcomes held, oldest first."""
        ring = self._ring
        if self._filled < len(ring):
            return ring[: self._filled]
        return ring[self._pos :] + ring[: self._pos]

    def _record(self, failed: bool) -> None:
        ring = self._ring
        pos = self._pos
        if self._filled == len(ring):
            if ring[pos]:
                self._failures -= 1
        else:
            self._filled += 1
        ring[pos] = failed
        if failed:
            self._failures += 1
        pos += 1
        self._pos = 0 if pos == len(ring) else pos

    def _clear_window(self) -> None:
        ring = self._ring
        for i in range(len(ring)):
            ring[i] = False
        self._pos = self._filled = self._failures = 0

    def _open(self) -> None:
        self.consecutive_opens += 1
        cooldown = doubled(
            self._config.cooldown, self.consecutive_opens, self._config.max_cooldown
        )
        self._opened_until = self._clock.seconds() + cooldown
        self._state = OPEN
        self._trials = 0
        self.transitions += 1

    def _close(self) -> None:
        self._state = CLOSED
        self._opened_until = None
        self._trials = 0
        self.consecutive_opens = 0
        self._clear_window()
        self.transitions += 1

    def _refresh(self) -> None:
        """Open -> half-open once the cooldown has passed."""
        until = self._opened_until
        if until is not None and self._clock.seconds() >= until:
            self._state = HALF_OPEN
            self._opened_until = None
            self._trials = 0
            self.transitions += 1

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.state} failures={self._failures}/{self._filled}"
            f" opens={self.consecutive_opens}>"
        )


class ActiveHealth:
    """Result bookkeeping of active probes (no I/O).

    ``unhealthy_after`` consecutive failed probes mark the backend unhealthy,
    ``healthy_after`` consecutive good ones healthy again. A new backend starts healthy
    so it gets traffic at once; its first failed probes take it out.
    """

    __slots__ = (
        "_bad",
        "_config",
        "_good",
        "healthy",
        "last_error",
        "last_probe_at",
    )

    def __init__(self, config: HealthCheckConfig) -> None:
        self._config = config
        self._good = 0  # consecutive good probes
        self._bad = 0  # consecutive failed probes
        self.healthy = True
        # The error of the latest probe when it failed; None once a probe succeeds.
        self.last_error: str | None = None
        self.last_probe_at: float | None = None

    @property
    def config(self) -> HealthCheckConfig:
        """The thresholds in force."""
        return self._config

    def record_probe(self, ok: bool, now: float, error: str | None = None) -> bool:
        """Count one probe result taken at ``now``; True when ``healthy`` changed."""
        self.last_probe_at = now
        if ok:
            self._good += 1
            self._bad = 0
            self.last_error = None
            if not self.healthy and self._good >= self._config.healthy_after:
                self.healthy = True
                return True
            return False
        self._bad += 1
        self._good = 0
        self.last_error = error if error is not None else "probe failed"
        if self.healthy and self._bad >= self._config.unhealthy_after:
            self.healthy = False
            return True
        return False

    def mark_healthy(self) -> bool:
        """Forget the probe streaks and declare the backend healthy (probing disabled).

        Returns True when ``healthy`` changed.
        """
        self._good = self._bad = 0
        self.last_error = None
        if self.healthy:
            return False
        self.healthy = True
        return True

    def reconfigure(self, config: HealthCheckConfig) -> None:
        """New thresholds; they are checked against the current streaks at the next probe."""
        self._config = config


class HealthChecker:
    """Runs the probes of one backend every interval and feeds :class:`ActiveHealth`.

    ``probe`` is a zero-argument callable returning a ``Deferred[None]`` that fires on
    success and errbacks (with a message) on failure; the checker applies
    ``config.timeout`` itself with :meth:`Deferred.addTimeout`, which cancels the probe's
    Deferred (its canceller should abort the request). At most one probe is in flight;
    the next starts ``interval`` seconds after the previous one finished, so a slow
    backend is never probed faster than it answers. The first probe runs at once
    (``callLater(0)``) so a dead backend is noticed fast. ``on_change(healthy)`` is called
    each time the state flips.
    """

    __slots__ = (
        "_call",
        "_clock",
        "_config",
        "_finished_at",
        "_health",
        "_in_flight",
        "_on_change",
        "_probe",
        "_started",
    )

    def __init__(
        self,
        config: HealthCheckConfig,
        health: ActiveHealth,
        probe: Callable[[], Deferred[None]],
        clock: IReactorTime,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._health = health
        self._probe = probe
        self._clock = clock
        self._on_change = on_change
        self._started = False
        self._call: IDelayedCall | None = None
        self._in_flight: Deferred[None] | None = None
        self._finished_at: float | None = None

    @property
    def running(self) -> bool:
        """Started, not stopped, and probing enabled."""
        return self._started and self._config.enabled

    @property
    def probe_in_flight(self) -> bool:
        """Whether a probe has been sent and has not finished yet."""
        return self._in_flight is not None

    def start(self) -> None:
        """Begin probing: the first probe runs on the next reactor turn. Idempotent."""
        if self._started:
            return
        self._started = True
        if self._config.enabled:
            self._schedule(0.0)
        else:
            self._mark_healthy()

    def stop(self) -> None:
        """Cancel the pending probe timer and any probe in flight. Idempotent."""
        self._started = False
        self._halt()

    def reconfigure(self, config: HealthCheckConfig) -> None:
        """Apply a new configuration.

        ``enabled=False`` stops probing and marks the backend healthy; re-enabling probes
        at once. A new ``timeout`` applies from the next probe; a new ``interval``
        re-times the wait already scheduled, counted from the end of the last probe.
        """
        old = self._config
        self._config = config
        self._health.reconfigure(config)
        if not self._started:
            return
        if not config.enabled:
            self._halt()
            self._mark_healthy()
            return
        if not old.enabled:
            self._schedule(0.0)
            return
        call = self._call
        if (
            call is not None
            and call.active()
            and self._finished_at is not None
            and config.interval != old.interval
        ):
            now = self._clock.seconds()
            call.reset(max(self._finished_at + config.interval - now, 0.0))

    def _halt(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        probe, self._in_flight = self._in_flight, None
        if probe is not None:
            probe.cancel()  # its outcome is ignored: _in_flight no longer points at it

    def _schedule(self, delay: float) -> None:
        if self._call is None and self._in_flight is None:
            self._call = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._call = None
        try:
            d = self._probe()
        except Exception as e:  # a probe that cannot even start is a failed probe
            self._finish(False, f"{type(e).__name__}: {e}")
            return
        d.addTimeout(self._config.timeout, self._clock)
        self._in_flight = d

        def ok(_: None) -> None:
            if self._in_flight is d:
                self._finish(True, None)

        def failed(failure: Failure) -> None:
            if self._in_flight is d:
                self._finish(False, _describe(failure))
            # else: cancelled by stop()/reconfigure(); the failure is expected, swallow it

        d.addCallbacks(ok, failed)

    def _finish(self, ok: bool, error: str | None) -> None:
        self._in_flight = None
        now = self._clock.seconds()
        self._finished_at = now
        changed = self._health.record_probe(ok, now, error)
        if self.running:
            self._schedule(self._config.interval)
        if changed:
            self._notify()

    def _mark_healthy(self) -> None:
        if self._health.mark_healthy():
            self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self._health.healthy)
        except Exception:
            _log.failure("health on_change callback failed")


def _describe(failure: Failure) -> str:
    """A short message for a failed probe."""
    if failure.check(defer.TimeoutError):
        return "timed out"
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {message}" if message else name
