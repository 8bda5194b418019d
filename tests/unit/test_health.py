"""Circuit breaker, active health, probe scheduling, key ring, retry budget, retry-after.

Time is driven by hand with :class:`twisted.internet.task.Clock`; probes are Deferreds
the tests fire themselves. No sleeps, no sockets.
"""

from __future__ import annotations

from email.utils import formatdate

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd.config.model import BreakerConfig, HealthCheckConfig
from relayd.health import (
    ActiveHealth,
    CircuitBreaker,
    HealthChecker,
    KeyRing,
    RetryBudget,
    parse_retry_after,
)

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


# --- KeyRing ----------------------------------------------------------------------------


def ring(clock: Clock, *secrets: str) -> KeyRing:
    return KeyRing([(s, [(b"x-api-key", s.encode())]) for s in secrets], clock)


def names(kr: KeyRing, n: int) -> list[str | None]:
    picks = []
    for _ in range(n):
        key = kr.choose()
        picks.append(key.secret if key is not None else None)
    return picks


def test_keyring_round_robin_order() -> None:
    kr = ring(Clock(), "a", "b", "c")
    assert names(kr, 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert [k.index for k in kr.keys] == [0, 1, 2]
    assert kr.keys[1].auth_headers == [(b"x-api-key", b"b")]


def test_keyring_skips_cooled_keys_and_returns_them_later() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b", "c")
    kr.cool_down(kr.keys[1], 10.0, "rate_limited")
    assert kr.keys[1].cooldown_until == 10.0
    assert kr.keys[1].cooldown_reason == "rate_limited"
    assert names(kr, 4) == ["a", "c", "a", "c"]
    clock.advance(10)
    assert names(kr, 3) == ["a", "b", "c"]
    assert kr.keys[1].cooldown_reason is None
    assert kr.keys[1].cooldown_until == 0.0


def test_keyring_none_when_all_cooled_and_next_available_at() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b")
    assert kr.next_available_at() is None
    kr.cool_down(kr.keys[0], 30.0, "rate_limited")
    assert kr.available()
    assert kr.next_available_at() is None
    kr.cool_down(kr.keys[1], 12.0, "rate_limited")
    assert not kr.available()
    assert kr.choose() is None
    assert kr.next_available_at() == 12.0
    clock.advance(12)
    assert kr.available()
    assert names(kr, 2) == ["b", "b"]


def test_keyring_cool_down_never_shortens() -> None:
    clock = Clock()
    kr = ring(clock, "a")
    key = kr.keys[0]
    kr.cool_down(key, 60.0, "rate_limited")
    kr.cool_down(key, 5.0, "rate_limited")
    assert key.cooldown_until == 60.0
    clock.advance(10)
    kr.cool_down(key, 100.0, "rate_limited")
    assert key.cooldown_until == 110.0


def test_keyring_available_has_no_side_effects() -> None:
    kr = ring(Clock(), "a", "b")
    for _ in range(3):
        assert kr.available()
    assert names(kr, 2) == ["a", "b"]


def test_keyring_reject_doubles_and_caps() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b")
    key = kr.keys[0]
    cooldowns = []
    for _ in range(6):
        kr.reject(key)
        assert key.cooldown_reason == "rejected"
        cooldowns.append(key.cooldown_until - clock.seconds())
        clock.advance(key.cooldown_until - clock.seconds())
    assert cooldowns == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]
    assert key.rejections == 6
    kr.record_success(key)
    kr.reject(key, 10.0)
    assert key.cooldown_until - clock.seconds() == 10.0


def test_keyring_concurrent_rejections_do_not_double() -> None:
    clock = Clock()
    kr = ring(clock, "a")
    key = kr.keys[0]
    kr.reject(key)
    kr.reject(key)  # a second in-flight request with the same key got its 401 too
    assert key.rejections == 2
    assert key.cooldown_until == 300.0


def test_keyring_reconfigure_keeps_state_by_secret() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b", "c")
    kr.reject(kr.keys[1])
    kr.cool_down(kr.keys[2], 50.0, "rate_limited")
    kr.reconfigure([("b", [(b"x-api-key", b"b2")]), ("d", []), ("c2", [])])
    b, d, c2 = kr.keys
    assert (b.index, b.secret, b.auth_headers) == (0, "b", [(b"x-api-key", b"b2")])
    assert b.cooldown_until == 300.0
    assert b.cooldown_reason == "rejected"
    assert b.rejections == 1
    assert d.cooldown_until == 0.0 and d.rejections == 0
    assert c2.cooldown_until == 0.0 and c2.cooldown_reason is None
    assert names(kr, 3) == ["d", "c2", "d"]


def test_keyring_repr_hides_secrets() -> None:
    secret = "sk-ant-supersecret-123"
    kr = ring(Clock(), secret, "sk-other-456")
    kr.reject(kr.keys[0])
    text = repr(kr) + repr(kr.keys[0]) + str(kr.keys[1])
    assert "supersecret" not in text
    assert "other-456" not in text
    assert "#0" in repr(kr.keys[0])


def test_keyring_empty() -> None:
    kr = KeyRing([], Clock())
    assert kr.choose() is None
    assert not kr.available()
    assert kr.next_available_at() is None


# --- RetryBudget ------------------------------------------------------------------------


def grant(budget: RetryBudget, n: int) -> int:
    return sum(budget.try_acquire_retry() for _ in range(n))


def test_retry_budget_floor_without_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, clock=Clock())
    assert grant(budget, 10) == 5
    assert budget.retries_in_window == 5
    assert budget.refused == 5


def test_retry_budget_ratio() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, clock=Clock())
    for _ in range(100):
        budget.record_request()
    assert budget.requests_in_window == 100
    assert grant(budget, 25) == 20
    assert budget.refused == 5
    budget.record_request()
    budget.record_request()
    budget.record_request()
    budget.record_request()
    budget.record_request()  # 105 requests: 21 retries allowed
    assert grant(budget, 2) == 1


def test_retry_budget_ratio_plus_floor() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.1, clock=Clock())
    for _ in range(10):
        budget.record_request()
    assert grant(budget, 10) == 6  # 0.5 * 10 + 0.1 * 10


def test_retry_budget_window_slides() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    clock.advance(5)
    for _ in range(4):
        budget.record_request()
    assert budget.requests_in_window == 14
    assert grant(budget, 20) == 14
    clock.advance(5)  # t=10: the t=0 bucket (10 requests, 0 retries) left the window
    assert budget.requests_in_window == 4
    assert budget.retries_in_window == 14
    assert grant(budget, 1) == 0
    clock.advance(5)  # t=15: the t=5 bucket left too
    assert budget.requests_in_window == 0
    assert budget.retries_in_window == 0


def test_retry_budget_everything_drops_after_11_seconds() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.3, clock=clock)
    assert grant(budget, 5) == 3
    budget.record_request()
    clock.advance(11)
    assert budget.requests_in_window == 0
    assert budget.retries_in_window == 0
    assert grant(budget, 5) == 3
    assert budget.refused == 4


def test_retry_budget_reconfigure() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, clock=Clock())
    assert grant(budget, 3) == 1
    budget.reconfigure(ratio=0.0, min_per_second=0.3)
    assert grant(budget, 3) == 2


# --- parse_retry_after ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"7", 7.0),
        (b" 7 ", 7.0),
        (b"0", 0.0),
        (b"1.5", 1.5),
        (None, None),
        (b"", None),
        (b"soon", None),
        (b"-5", None),
        (b"nan", None),
        (b"1e3", None),
        (b"\xff\xfe", None),
        (b"Mon, 99 Foo 2024 25:61:00 GMT", None),
    ],
)
def test_parse_retry_after_values(value: bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value, 1_000_000.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    value = formatdate(now + 42, usegmt=True).encode()
    assert parse_retry_after(value, now) == pytest.approx(42.0)
    past = formatdate(now - 42, usegmt=True).encode()
    assert parse_retry_after(past, now) is None
