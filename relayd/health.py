"""Backend health: passive circuit breakers, active probes, upstream keys, retry budget.

Everything here is bookkeeping driven by an injected clock (``IReactorTime``), never the
global reactor, so tests can drive time with :class:`twisted.internet.task.Clock`.

The request path calls :meth:`CircuitBreaker.allow_request`, the ``record_*`` methods,
:meth:`KeyRing.choose` and the :class:`RetryBudget` methods once or a few times per
request: they are O(1) (O(number of keys) at worst for the key ring), allocate nothing
and never log. Only :class:`HealthChecker` does I/O, through the ``probe`` callable it is
given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.config.model import BreakerConfig, HealthCheckConfig

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "ActiveHealth",
    "CircuitBreaker",
    "HealthChecker",
    "KeyRing",
    "RetryBudget",
    "UpstreamKey",
    "parse_retry_after",
]

_log = Logger(namespace="relayd.health")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# 2.0 ** 60 times any sane cooldown is far beyond any cap; bounding the exponent keeps
# the float arithmetic finite however many times a breaker or a key re-opens.
_MAX_EXPONENT = 60


def _doubled(base: float, n: int, cap: float) -> float:
    """``base * 2**(n-1)`` capped at ``cap``, for ``n >= 1``."""
    return min(base * 2.0 ** min(max(n - 1, 0), _MAX_EXPONENT), cap)


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
        cooldown = _doubled(
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


class UpstreamKey:
    """One upstream API key of a backend, with its cooldown state.

    ``index`` (its position in the backend's key list) names it in logs and metrics; the
    secret itself never appears in ``repr``.
    """

    __slots__ = (
        "_auth_failures",
        "_reject_streak",
        "auth_headers",
        "cooldown_reason",
        "cooldown_until",
        "index",
        "rejections",
        "secret",
    )

    def __init__(self, index: int, secret: str, auth_headers: list[tuple[bytes, bytes]]) -> None:
        self.index = index
        self.secret = secret
        self.auth_headers = auth_headers
        self.cooldown_until = 0.0
        self.cooldown_reason: str | None = None  # "rate_limited" | "rejected" | None
        self.rejections = 0  # every 401 ever reported for this key
        self._reject_streak = 0  # rejection cooldowns since the last success
        self._auth_failures = 0  # 401s in a row since the last success or bench

    def __repr__(self) -> str:
        return (
            f"<UpstreamKey #{self.index} cooldown_until={self.cooldown_until}"
            f" reason={self.cooldown_reason} rejections={self.rejections}>"
        )


# A rejected key's cooldown doubles per consecutive rejection up to this many seconds.
MAX_REJECT_COOLDOWN = 3600.0
# 401s in a row (no success between) that bench a key: one can be a fluke of a single
# request; a key the upstream no longer accepts fails every request.
REJECTIONS_TO_BENCH = 2


class KeyRing:
    """Round-robin over a backend's upstream keys, skipping keys in cooldown.

    A 429 cools a key down for the upstream's ``retry-after`` (:meth:`cool_down`); a
    401/403 for longer, doubling while the key keeps being rejected (:meth:`reject`).
    A key whose cooldown has ended is usable again without any call; its
    ``cooldown_reason`` is cleared when it is next chosen.
    """

    __slots__ = ("_clock", "_next", "keys")

    def __init__(
        self, keys: Sequence[tuple[str, list[tuple[bytes, bytes]]]], clock: IReactorTime
    ) -> None:
        self._clock = clock
        self._next = 0
        self.keys: tuple[UpstreamKey, ...] = tuple(
            UpstreamKey(i, secret, headers) for i, (secret, headers) in enumerate(keys)
        )

    def choose(self) -> UpstreamKey | None:
        """The next usable key in round-robin order, or None when every key is cooling down."""
        keys = self.keys
        n = len(keys)
        if n == 0:
            return None
        now = self._clock.seconds()
        start = self._next
        for step in range(n):
            i = start + step
            if i >= n:
                i -= n
            key = keys[i]
            if key.cooldown_until <= now:
                if key.cooldown_reason is not None:
                    key.cooldown_reason = None
                    key.cooldown_until = 0.0
                self._next = 0 if i + 1 == n else i + 1
                return key
        return None

    def available(self) -> bool:
        """Whether some key is usable now (no side effects, no rotation)."""
        now = self._clock.seconds()
        return any(key.cooldown_until <= now for key in self.keys)

    def cool_down(self, key: UpstreamKey, seconds: float, reason: str) -> None:
        """Keep ``key`` out for ``seconds`` (never shortening a longer cooldown)."""
        until = self._clock.seconds() + seconds
        if until >= key.cooldown_until:
            key.cooldown_until = until
            key.cooldown_reason = reason

    def reject(self, key: UpstreamKey, seconds: float = 300.0) -> None:
        """The upstream refused ``key`` (401/403): cool it down, doubling per repeat.

        Rejections of requests sent before the key's current rejection cooldown began
        (concurrent requests with the same key) count in ``rejections`` but do not double
        the cooldown again; :meth:`record_success` ends the streak.
        """
        key.rejections += 1
        now = self._clock.seconds()
        if key.cooldown_reason == "rejected" and key.cooldown_until > now:
            return
        key._reject_streak += 1
        self.cool_down(key, _doubled(seconds, key._reject_streak, MAX_REJECT_COOLDOWN), "rejected")
        key.cooldown_reason = "rejected"

    def authentication_failed(self, key: UpstreamKey) -> bool:
        """The upstream answered 401 (authentication) for ``key``: bench it once that
        happened :data:`REJECTIONS_TO_BENCH` times in a row; True when benched now.

        A 403 is not reported here: a permission error is about the request (a model, a
        beta feature the account may not use), and benching the shared key for it would
        refuse every other client too.
        """
        key._auth_failures += 1
        if key._auth_failures < REJECTIONS_TO_BENCH:
            key.rejections += 1
            return False
        key._auth_failures = 0
        self.reject(key)
        return True

    def record_success(self, key: UpstreamKey) -> None:
        """The upstream accepted ``key``: the next rejection starts from the base cooldown."""
        key._auth_failures = 0
        if key._reject_streak:
            key._reject_streak = 0

    def next_available_at(self) -> float | None:
        """The earliest cooldown end when no key is usable now, else None."""
        if not self.keys or self.available():
            return None
        return min(key.cooldown_until for key in self.keys)

    def reconfigure(self, keys: Sequence[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        """Replace the key list, keeping the cooldown state of keys whose secret is unchanged.

        Matching is by secret: a key that moved in the list keeps its state (under its new
        index and the new auth headers); new keys start fresh.
        """
        old = {key.secret: key for key in self.keys}
        fresh: list[UpstreamKey] = []
        for i, (secret, headers) in enumerate(keys):
            key = UpstreamKey(i, secret, headers)
            prev = old.get(secret)
            if prev is not None:
                key.cooldown_until = prev.cooldown_until
                key.cooldown_reason = prev.cooldown_reason
                key.rejections = prev.rejections
                key._reject_streak = prev._reject_streak
                key._auth_failures = prev._auth_failures
            fresh.append(key)
        self.keys = tuple(fresh)
        if self._next >= len(self.keys):
            self._next = 0

    def __repr__(self) -> str:
        return f"<KeyRing {len(self.keys)} keys: {list(self.keys)!r}>"


_BUCKETS = 10  # one per second: the budget looks at the last 10 seconds


class RetryBudget:
    """Caps retries at ``ratio`` x requests (+ a floor) over a sliding 10-second window.

    Counts live in 10 one-second buckets (a ring, with running sums), so recording and
    checking are O(1); a bucket is emptied when the second it stands for leaves the
    window. The floor of ``min_per_second`` x 10 retries lets a quiet relay retry at all.
    """

    __slots__ = (
        "_clock",
        "_requests",
        "_requests_sum",
        "_retries",
        "_retries_sum",
        "_second",
        "min_per_second",
        "ratio",
        "refused",
    )

    def __init__(self, ratio: float, min_per_second: float, clock: IReactorTime) -> None:
        self._clock = clock
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._second = math.floor(clock.seconds())  # the second the newest bucket holds
        self._requests_sum = 0
        self._retries_sum = 0
        self.refused = 0  # retries refused since start

    @property
    def requests_in_window(self) -> int:
        """Client requests recorded in the last 10 seconds."""
        self._advance()
        return self._requests_sum

    @property
    def retries_in_window(self) -> int:
        """Retries granted in the last 10 seconds."""
        self._advance()
        return self._retries_sum

    def record_request(self) -> None:
        """Count one client request (not one per attempt)."""
        self._requests[self._advance()] += 1
        self._requests_sum += 1

    def try_acquire_retry(self) -> bool:
        """Grant (and count) one retry if the budget allows it, else count a refusal."""
        slot = self._advance()
        allowed = self.ratio * self._requests_sum + self.min_per_second * _BUCKETS
        if self._retries_sum + 1 <= allowed:
            self._retries[slot] += 1
            self._retries_sum += 1
            return True
        self.refused += 1
        return False

    def reconfigure(self, ratio: float, min_per_second: float) -> None:
        """New ratio and floor; the counts already in the window are kept."""
        self.ratio = ratio
        self.min_per_second = min_per_second

    def _advance(self) -> int:
        """Drop the buckets of seconds that left the window; the current bucket's index."""
        second = math.floor(self._clock.seconds())
        last = self._second
        if second > last:
            if second - last >= _BUCKETS:
                for i in range(_BUCKETS):
                    self._requests[i] = self._retries[i] = 0
                self._requests_sum = self._retries_sum = 0
            else:
                for s in range(last + 1, second + 1):
                    i = s % _BUCKETS
                    self._requests_sum -= self._requests[i]
                    self._retries_sum -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
            self._second = second
        # A clock that steps back keeps counting in the newest bucket.
        return self._second % _BUCKETS


_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(headers_value: bytes | None, now: float) -> float | None:
    """Seconds to wait from a ``retry-after`` value, or None when absent or unusable.

    Accepts delta-seconds (digits, with a decimal fraction tolerated: some upstreams send
    ``1.5``) and an HTTP-date, taken relative to ``now`` (a Unix time). Negative values,
    dates already past and anything unparsable give None, so the caller falls back to
    its own default rather than retrying at once.
    """
    if headers_value is None:
        return None
    try:
        text = headers_value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when.timestamp() - now
    return delta if delta >= 0 else None
