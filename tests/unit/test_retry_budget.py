"""The retry budget over its sliding 10-second window, on a hand-driven clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from relayd.retry_budget import RetryBudget


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
