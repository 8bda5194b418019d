"""The memory store's limit algorithms (the Redis scripts are checked against the same
behaviour in tests/integration/test_redis_store.py)."""

from __future__ import annotations

import calendar
import datetime

import pytest
from twisted.internet.testing import MemoryReactorClock

from relayd.limits import MemoryStore, UsageRecord
from relayd.limits.checks import (
    ConcurrencyCheck,
    Decision,
    PeriodCheck,
    Ticket,
    WindowCheck,
    civil_from_days,
    period_end,
    period_number,
)
from relayd.providers.base import Usage

T0 = 1_800_000_000.0  # a whole second, 2027-01-15


def rpm(limit: int, key: str = "c:rpm") -> WindowCheck:
    return WindowCheck(key, limit, 1, "requests_per_minute", "client")


def tpm(limit: int, amount: int, key: str = "c:tpm", scope: str = "client") -> WindowCheck:
    return WindowCheck(key, limit, amount, "tokens_per_minute", scope)


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(T0)
    return clock


@pytest.fixture
def store(clock: MemoryReactorClock) -> MemoryStore:
    return MemoryStore(clock)


def admit(store: MemoryStore, *checks: WindowCheck | PeriodCheck | ConcurrencyCheck) -> Decision:
    return store.admit_now(checks)


def test_window_admits_exactly_the_limit_within_any_60_seconds(
    store: MemoryStore, clock: MemoryReactorClock
) -> None:
    allowed = 0
    for _ in range(100):  # 100 requests over 50 seconds
        allowed += admit(store, rpm(60)).allowed
        clock.advance(0.5)
    assert allowed == 60
    refused = admit(store, rpm(60))
    # The first requests (at T0) leave the window at T0 + 60: 10 seconds from now.
    assert not refused.allowed and refused.retry_after == pytest.approx(10.0)
    clock.advance(9.9)
    assert not admit(store, rpm(60)).allowed
    clock.advance(0.1)
    assert admit(store, rpm(60)).allowed


def test_window_states_report_used_and_reset(store: MemoryStore, clock: MemoryReactorClock) -> None:
    clock.advance(0.25)
    first = admit(store, rpm(5))
    second = admit(store, rpm(5))
    assert [s.used for s in (first.states[0], second.states[0])] == [1, 2]
    assert second.states[0].reset_after == pytest.approx(59.75)
    assert second.states[0].slot == int(T0)


def test_refusal_consumes_nothing(store: MemoryStore) -> None:
    """All-or-nothing: a refused check leaves the other checks' counters untouched."""
    assert admit(store, rpm(10), tpm(100, 80)).allowed
    refused = admit(store, rpm(10), tpm(100, 30))
    assert not refused.allowed and refused.failed == tpm(100, 30)
    ok = admit(store, rpm(10), tpm(100, 20))
    assert ok.allowed
    assert [s.used for s in ok.states] == [2, 100]


def test_token_retry_after_waits_for_enough_tokens_to_leave(
    store: MemoryStore, clock: MemoryReactorClock
) -> None:
    admit(store, tpm(100, 40))
    clock.advance(10)
    admit(store, tpm(100, 40))
    clock.advance(10)
    # 80 used: 50 more fit once the first 40 have left the window (at T0 + 60)...
    refused = admit(store, tpm(100, 50))
    assert refused.retry_after == pytest.approx(40.0)
    # ... 70 more only once both have (at T0 + 70); 20 fit now.
    assert admit(store, tpm(100, 70)).retry_after == pytest.approx(50.0)
    assert admit(store, tpm(100, 20)).allowed


def test_settle_replaces_a_reservation_with_the_actual_usage(store: MemoryStore) -> None:
    ticket = Ticket.of(admit(store, tpm(100, 90)))
    assert not admit(store, tpm(100, 20)).allowed
    adjustments, releases = ticket.settle({"client": (30, True)})
    store.settle(adjustments, releases, None)
    assert admit(store, tpm(100, 70)).allowed  # 30 + 70 = 100
    assert not admit(store, tpm(100, 1)).allowed


def test_partial_usage_only_raises_a_reservation(store: MemoryStore) -> None:
    ticket = Ticket.of(admit(store, tpm(100, 50)))
    adjustments, _ = ticket.settle({"client": (20, False)})
    assert adjustments == []  # 20 seen of a cut-off stream: the 50 reserved stand
    ticket = Ticket.of(admit(store, tpm(200, 50, key="other")))
    adjustments, _ = ticket.settle({"client": (80, False)})
    assert [a.delta for a in adjustments] == [30]


def test_settle_of_a_reservation_that_left_the_window_is_ignored(
    store: MemoryStore, clock: MemoryReactorClock
) -> None:
    ticket = Ticket.of(admit(store, tpm(100, 90)))
    clock.advance(61)  # a long stream: its reservation has left the window
    admit(store, tpm(100, 50))
    adjustments, _ = ticket.settle({"client": (10, True)})
    store.settle(adjustments, [], None)
    assert admit(store, tpm(100, 50)).allowed  # 50 + 50: the old -80 changed nothing
    assert not admit(store, tpm(100, 1)).allowed


def test_day_budget_resets_at_utc_midnight(store: MemoryStore, clock: MemoryReactorClock) -> None:
    midnight = (int(T0) // 86400 + 1) * 86400
    clock.advance(midnight - T0 - 10)
    budget = PeriodCheck("c:day", 1000, 600, "tokens_per_day", "client", "day")
    assert admit(store, budget).allowed
    refused = admit(store, budget)
    assert not refused.allowed and refused.retry_after is None
    assert refused.failed is budget
    clock.advance(10)
    state = admit(store, budget).states[0]
    assert state.used == 600 and state.reset_after == pytest.approx(86400)


def test_month_budget(store: MemoryStore, clock: MemoryReactorClock) -> None:
    budget = PeriodCheck("c:month", 100, 60, "tokens_per_month", "client", "month")
    assert admit(store, budget).allowed
    clock.advance(10 * 86400)  # 2027-01-25: still January
    assert not admit(store, budget).allowed
    clock.advance(10 * 86400)  # February
    assert admit(store, budget).allowed


def test_concurrency_leases(store: MemoryStore, clock: MemoryReactorClock) -> None:
    def lease(name: str) -> ConcurrencyCheck:
        return ConcurrencyCheck("c:inflight", 2, name, 100.0, "max_concurrent", "client")

    first = Ticket.of(admit(store, lease("a")))
    assert admit(store, lease("b")).allowed
    refused = admit(store, lease("c"))
    assert not refused.allowed and refused.retry_after == 1.0
    store.settle(*first.settle({"client": (0, True)}), None)
    assert admit(store, lease("c")).allowed
    clock.advance(100)  # the leases of b and c expire (an instance died holding them)
    assert admit(store, lease("d")).allowed
    assert admit(store, lease("e")).allowed


def test_fallback_scale_gives_a_share_of_each_limit(clock: MemoryReactorClock) -> None:
    store = MemoryStore(clock, scale=1 / 3, label="fallback")
    results = [store.admit_now([rpm(60)]).allowed for _ in range(30)]
    assert results.count(True) == 20
    tiny = MemoryStore(clock, scale=1 / 3)
    assert tiny.admit_now([rpm(1)]).allowed  # never below one


def test_usage_is_recorded_by_settle(store: MemoryStore) -> None:
    usage = Usage(input_tokens=3, output_tokens=4, cache_read_tokens=5)
    store.settle([], [], UsageRecord("a", "m", "p", "b", usage))
    store.settle([], [], UsageRecord("a", "m", "p", "b", None))
    snapshot = store.ledger.snapshot()
    assert snapshot["clients"]["a"] == {
        "requests": 2,
        "input_tokens": 3,
        "output_tokens": 4,
        "cache_read_tokens": 5,
        "cache_write_tokens": 0,
    }


@pytest.mark.parametrize("days", [0, 59, 60, 365, 10_957, 18_000, 20_469, 20_513, 50_000])
def test_civil_from_days_matches_the_calendar(days: int) -> None:
    date = datetime.date(1970, 1, 1) + datetime.timedelta(days=days)
    assert civil_from_days(days) == (date.year, date.month)


def test_period_numbers_and_ends() -> None:
    t = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert period_number("month", t) == 2026 * 12 + 11
    assert period_end("month", period_number("month", t)) == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert period_end("day", period_number("day", t)) == t + 1
    feb = calendar.timegm((2028, 2, 10, 0, 0, 0))
    march = calendar.timegm((2028, 3, 1, 0, 0, 0))
    assert period_end("month", period_number("month", feb)) == march
