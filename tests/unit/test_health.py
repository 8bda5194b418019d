"""Circuit breaker, active health and probe scheduling.

Time is driven by hand with :class:`twisted.internet.task.Clock`; probes are Deferreds
the tests fire themselves. No sleeps, no sockets.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd.config.model import BreakerConfig, HealthCheckConfig
from relayd.health import ActiveHealth, CircuitBreaker, HealthChecker

# --- CircuitBreaker ---------------------------------------------------------------------


def breaker(clock: Clock, **overrides: float) -> CircuitBreaker:
    fields: dict[str, float] = {
        "window": 10,
        "failures": 3,
        "cooldown": 5.0,
        "max_cooldown": 40.0,
        "half_open_requests": 1,
    }
    fields.update(overrides)
    config = BreakerConfig(
        window=int(fields["window"]),
        failures=int(fields["failures"]),
        cooldown=fields["cooldown"],
        max_cooldown=fields["max_cooldown"],
        half_open_requests=int(fields["half_open_requests"]),
    )
    return CircuitBreaker(config, clock)


def trip(cb: CircuitBreaker, n: int = 3) -> None:
    for _ in range(n):
        cb.record_failure("upstream_5xx")


def test_breaker_opens_at_n_failures_not_before() -> None:
    clock = Clock()
    cb = breaker(clock)
    cb.record_success()
    trip(cb, 2)
    assert cb.state == "closed"
    assert cb.allow_request()
    assert cb.failures_in_window == 2
    cb.record_failure("timeout")
    assert cb.state == "open"
    assert not cb.allow_request()
    assert cb.opened_until == 5.0
    assert cb.consecutive_opens == 1
    assert cb.last_failure_reason == "timeout"
    assert cb.transitions == 1


def test_breaker_failures_scroll_out_of_window() -> None:
    clock = Clock()
    cb = breaker(clock, window=4, failures=3)
    trip(cb, 2)
    for _ in range(3):
        cb.record_success()
    # Window now [F, S, S, S] after the first F scrolled out: one failure left.
    assert cb.failures_in_window == 1
    cb.record_failure("x")
    assert cb.failures_in_window == 1  # the oldest F left as this one came in
    cb.record_failure("x")
    assert cb.state == "closed"
    assert cb.failures_in_window == 2
    cb.record_failure("x")
    assert cb.state == "open"


def test_breaker_becomes_half_open_after_cooldown() -> None:
    clock = Clock()
    cb = breaker(clock)
    trip(cb)
    clock.advance(4.9)
    assert cb.state == "open"
    assert not cb.allow_request()
    clock.advance(0.1)
    assert cb.state == "half_open"
    assert cb.opened_until is None
    assert cb.transitions == 2


def test_breaker_half_open_lazily_via_allow_request() -> None:
    clock = Clock()
    cb = breaker(clock)
    trip(cb)
    clock.advance(5)
    assert cb.allow_request()  # no state access in between: allow_request evaluates it


def test_breaker_half_open_trial_limit_and_release() -> None:
    clock = Clock()
    cb = breaker(clock, half_open_requests=2)
    trip(cb)
    clock.advance(5)
    assert cb.allow_request()
    assert cb.allow_request()
    assert not cb.allow_request()
    assert cb.trials_in_flight == 2
    cb.release_trial()
    assert cb.state == "half_open"
    assert cb.allow_request()
    assert not cb.allow_request()


def test_breaker_release_trial_never_goes_below_zero() -> None:
    clock = Clock()
    cb = breaker(clock)
    trip(cb)
    clock.advance(5)
    cb.release_trial()
    cb.release_trial()
    assert cb.allow_request()
    assert not cb.allow_request()


def test_breaker_trial_success_closes_and_clears() -> None:
    clock = Clock()
    cb = breaker(clock)
    trip(cb)
    clock.advance(5)
    assert cb.allow_request()
    cb.record_success()
    assert cb.state == "closed"
    assert cb.consecutive_opens == 0
    assert cb.failures_in_window == 0
    assert cb.opened_until is None
    trip(cb, 2)  # the old failures are gone: two new ones do not open it
    assert cb.state == "closed"


def test_breaker_trial_failure_reopens_with_doubled_cooldown() -> None:
    clock = Clock()
    cb = breaker(clock)
    trip(cb)
    clock.advance(5)
    assert cb.allow_request()
    cb.record_failure("connect")
    assert cb.state == "open"
    assert cb.consecutive_opens == 2
    assert cb.opened_until == 5.0 + 10.0
    assert cb.last_failure_reason == "connect"


def test_breaker_cooldown_doubles_up_to_cap_and_resets_on_close() -> None:
    clock = Clock()
    cb = breaker(clock, cooldown=5.0, max_cooldown=30.0)
    trip(cb)
    cooldowns = []
    for _ in range(5):
        until = cb.opened_until
        assert until is not None
        cooldowns.append(until - clock.seconds())
        clock.advance(until - clock.seconds())
        assert cb.allow_request()
        cb.record_failure("x")
    assert cooldowns == [5.0, 10.0, 20.0, 30.0, 30.0]
    clock.advance(30)
    assert cb.allow_request()
    cb.record_success()
    trip(cb)
    assert cb.opened_until == clock.seconds() + 5.0


def test_breaker_ignores_outcomes_while_open() -> None:
    clock = Clock()
    cb = breaker(clock)
    trip(cb)
    cb.record_success()
    cb.record_failure("late")
    assert cb.state == "open"
    assert cb.consecutive_opens == 1
    assert cb.opened_until == 5.0


def test_breaker_reconfigure_keeps_state_and_trims_window() -> None:
    clock = Clock()
    cb = breaker(clock, window=6, failures=5)
    cb.record_failure("x")
    cb.record_failure("x")
    cb.record_success()
    cb.record_failure("x")
    # Keep only the last 2 outcomes: [S, F].
    cb.reconfigure(BreakerConfig(window=2, failures=2, cooldown=1.0, max_cooldown=8.0))
    assert cb.state == "closed"
    assert cb.failures_in_window == 1
    cb.record_failure("x")
    assert cb.state == "open"
    assert cb.opened_until == 1.0  # the new cooldown


def test_breaker_reconfigure_grows_window_and_keeps_open_state() -> None:
    clock = Clock()
    cb = breaker(clock, window=3, failures=3)
    trip(cb)
    cb.reconfigure(BreakerConfig(window=10, failures=3, cooldown=1.0, max_cooldown=8.0))
    assert cb.state == "open"
    assert cb.opened_until == 5.0  # the running cooldown is kept
    clock.advance(5)
    assert cb.allow_request()
    cb.record_success()
    for _ in range(9):
        cb.record_success()
    trip(cb, 2)  # a window of 10 now: 2 failures among 11 outcomes stay closed
    assert cb.state == "closed"
    assert cb.failures_in_window == 2


def test_breaker_reconfigure_half_open_requests() -> None:
    clock = Clock()
    cb = breaker(clock, half_open_requests=1)
    trip(cb)
    cb.reconfigure(BreakerConfig(window=10, failures=3, cooldown=5.0, half_open_requests=3))
    clock.advance(5)
    assert [cb.allow_request() for _ in range(4)] == [True, True, True, False]


# --- ActiveHealth -----------------------------------------------------------------------


def health_config(
    *,
    enabled: bool = True,
    interval: float = 10.0,
    timeout: float = 2.0,
    unhealthy_after: int = 3,
    healthy_after: int = 2,
) -> HealthCheckConfig:
    return HealthCheckConfig(
        enabled=enabled,
        interval=interval,
        timeout=timeout,
        unhealthy_after=unhealthy_after,
        healthy_after=healthy_after,
    )


def test_active_health_goes_unhealthy_after_n_failures() -> None:
    h = ActiveHealth(health_config())
    assert h.healthy
    assert h.record_probe(False, 1.0, "boom") is False
    assert h.record_probe(False, 2.0) is False
    assert h.healthy
    assert h.record_probe(False, 3.0, "refused") is True
    assert not h.healthy
    assert h.last_error == "refused"
    assert h.last_probe_at == 3.0
    assert h.record_probe(False, 4.0) is False  # already unhealthy: no change


def test_active_health_failures_must_be_consecutive() -> None:
    h = ActiveHealth(health_config())
    h.record_probe(False, 1.0)
    h.record_probe(False, 2.0)
    h.record_probe(True, 3.0)
    h.record_probe(False, 4.0)
    h.record_probe(False, 5.0)
    assert h.healthy


def test_active_health_recovers_after_m_good() -> None:
    h = ActiveHealth(health_config())
    for t in range(3):
        h.record_probe(False, float(t), "x")
    assert h.record_probe(True, 10.0) is False
    assert not h.healthy
    assert h.last_error is None
    h.record_probe(False, 11.0, "y")  # breaks the good streak
    assert h.record_probe(True, 12.0) is False
    assert h.record_probe(True, 13.0) is True
    assert h.healthy
    assert h.record_probe(True, 14.0) is False


def test_active_health_reconfigure_thresholds() -> None:
    h = ActiveHealth(health_config(unhealthy_after=3))
    h.record_probe(False, 1.0)
    h.reconfigure(health_config(unhealthy_after=2))
    assert h.record_probe(False, 2.0) is True
    assert not h.healthy


# --- HealthChecker ----------------------------------------------------------------------


class FakeProbe:
    """A probe whose Deferreds the test fires; records cancellations."""

    def __init__(self) -> None:
        self.calls: list[Deferred[None]] = []
        self.cancelled = 0

    def __call__(self) -> Deferred[None]:
        def cancel(_: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancel)
        self.calls.append(d)
        return d

    @property
    def last(self) -> Deferred[None]:
        return self.calls[-1]


def checker(
    config: HealthCheckConfig | None = None,
) -> tuple[Clock, FakeProbe, ActiveHealth, HealthChecker, list[bool]]:
    clock = Clock()
    probe = FakeProbe()
    config = config or health_config()
    health = ActiveHealth(config)
    changes: list[bool] = []
    hc = HealthChecker(config, health, probe, clock, changes.append)
    return clock, probe, health, hc, changes


def test_checker_first_probe_immediately() -> None:
    clock, probe, _, hc, _ = checker()
    hc.start()
    assert hc.running
    assert probe.calls == []  # on the next reactor turn, not inside start()
    clock.advance(0)
    assert len(probe.calls) == 1


def test_checker_schedules_interval_after_finish() -> None:
    clock, probe, health, hc, _ = checker(health_config(interval=10.0, timeout=5.0))
    hc.start()
    clock.advance(0)
    clock.advance(1.5)  # the probe takes 1.5 s
    probe.last.callback(None)
    assert health.last_probe_at == 1.5
    clock.advance(9.9)
    assert len(probe.calls) == 1
    clock.advance(0.1)
    assert len(probe.calls) == 2


def test_checker_one_probe_in_flight_at_most() -> None:
    clock, probe, _, hc, _ = checker(health_config(interval=1.0, timeout=100.0))
    hc.start()
    clock.advance(0)
    for _ in range(50):
        clock.advance(1)
    assert len(probe.calls) == 1
    assert hc.probe_in_flight
    hc.start()  # idempotent: no second loop
    clock.advance(0)
    assert len(probe.calls) == 1


def test_checker_timeout_counts_as_failure() -> None:
    clock, probe, health, hc, changes = checker(
        health_config(interval=10.0, timeout=2.0, unhealthy_after=1)
    )
    hc.start()
    clock.advance(0)
    clock.advance(2.0)
    assert probe.cancelled == 1
    assert not health.healthy
    assert health.last_error == "timed out"
    assert changes == [False]
    clock.advance(10.0)
    assert len(probe.calls) == 2  # next probe scheduled after the timed-out one


def test_checker_failure_message_and_on_change_once_per_flip() -> None:
    clock, probe, health, hc, changes = checker(
        health_config(interval=5.0, unhealthy_after=2, healthy_after=2)
    )
    hc.start()
    clock.advance(0)
    outcomes = [False, False, False, True, True, True, False, False]
    for ok in outcomes:
        if ok:
            probe.last.callback(None)
        else:
            probe.last.errback(ConnectionRefusedError("connection refused"))
        clock.advance(5.0)
    assert changes == [False, True, False]
    assert len(probe.calls) == len(outcomes) + 1
    assert health.last_error == "ConnectionRefusedError: connection refused"


def test_checker_probe_raising_synchronously_is_a_failure() -> None:
    clock = Clock()
    config = health_config(unhealthy_after=1)
    health = ActiveHealth(config)

    def probe() -> Deferred[None]:
        raise RuntimeError("no route")

    hc = HealthChecker(config, health, probe, clock)
    hc.start()
    clock.advance(0)
    assert not health.healthy
    assert health.last_error == "RuntimeError: no route"
    assert len(clock.getDelayedCalls()) == 1  # still probing


def test_checker_stop_cancels_probe_and_timer() -> None:
    clock, probe, health, hc, changes = checker()
    hc.start()
    clock.advance(0)
    hc.stop()
    assert probe.cancelled == 1
    assert not hc.running
    assert not hc.probe_in_flight
    assert clock.getDelayedCalls() == []  # the timeout timer went with the probe
    assert health.last_probe_at is None  # the cancellation is not a failed probe
    assert changes == []
    hc.stop()  # idempotent
    clock.advance(100)
    assert len(probe.calls) == 1


def test_checker_stop_cancels_pending_timer() -> None:
    clock, probe, _, hc, _ = checker()
    hc.start()
    clock.advance(0)
    probe.last.callback(None)
    assert len(clock.getDelayedCalls()) == 1
    hc.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(probe.calls) == 1


def test_checker_disabled_never_probes() -> None:
    clock, probe, health, hc, _ = checker(health_config(enabled=False))
    hc.start()
    clock.advance(100)
    assert probe.calls == []
    assert not hc.running
    assert health.healthy


def test_checker_reconfigure_disable_marks_healthy_and_enable_resumes() -> None:
    clock, probe, health, hc, changes = checker(health_config(unhealthy_after=1))
    hc.start()
    clock.advance(0)
    probe.last.errback(RuntimeError("down"))
    assert changes == [False]
    clock.advance(10)
    hc.reconfigure(health_config(enabled=False))
    assert probe.cancelled == 1
    assert health.healthy
    assert changes == [False, True]
    clock.advance(100)
    assert len(probe.calls) == 2
    hc.reconfigure(health_config(unhealthy_after=1))
    assert hc.running
    clock.advance(0)
    assert len(probe.calls) == 3


def test_checker_reconfigure_new_interval_and_timeout() -> None:
    clock, probe, _, hc, _ = checker(health_config(interval=60.0, timeout=2.0))
    hc.start()
    clock.advance(0)
    probe.last.callback(None)  # finished at t=0: next at t=60
    clock.advance(3)
    hc.reconfigure(health_config(interval=5.0, timeout=20.0))
    clock.advance(1.9)
    assert len(probe.calls) == 1
    clock.advance(0.1)  # t=5: 5 s after the last probe finished
    assert len(probe.calls) == 2
    clock.advance(19.9)
    assert probe.cancelled == 0  # the new timeout applies
    clock.advance(0.1)
    assert probe.cancelled == 1


def test_checker_reconfigure_passes_thresholds_to_health() -> None:
    clock, probe, health, hc, changes = checker(health_config(unhealthy_after=3))
    hc.start()
    clock.advance(0)
    hc.reconfigure(health_config(unhealthy_after=1))
    probe.last.errback(RuntimeError("down"))
    assert not health.healthy
    assert changes == [False]


def test_checker_on_change_exception_does_not_stop_probing() -> None:
    clock = Clock()
    config = health_config(unhealthy_after=1)
    health = ActiveHealth(config)
    probe = FakeProbe()

    def on_change(_: bool) -> None:
        raise ValueError("listener bug")

    hc = HealthChecker(config, health, probe, clock, on_change)
    hc.start()
    clock.advance(0)
    probe.last.errback(RuntimeError("down"))
    clock.advance(10)
    assert len(probe.calls) == 2


def test_checker_cancelled_probe_is_swallowed_not_recorded() -> None:
    clock = Clock()
    config = health_config(unhealthy_after=1)
    health = ActiveHealth(config)
    d: Deferred[None] = Deferred()  # no canceller: cancel() errbacks with CancelledError
    hc = HealthChecker(config, health, lambda: d, clock)
    hc.start()
    clock.advance(0)
    hc.stop()
    assert d.called
    assert d.result is None  # CancelledError consumed: no "Unhandled error in Deferred"
    assert health.healthy
    assert health.last_probe_at is None
