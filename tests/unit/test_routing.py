"""Model globs, first-match routes and smooth weighted round-robin."""

from __future__ import annotations

from typing import Any

from relayd.routing import ModelMatcher, WeightedBalancer


class FakeBackend:
    def __init__(
        self, name: str, weight: int, max_concurrent: int = 100, priority: int = 0
    ) -> None:
        self.name = name
        self.weight = weight
        self.priority = priority
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.healthy = True
        self.broken = False
        self.health = self

    def has_capacity(self) -> bool:
        return self.in_flight < self.max_concurrent

    def is_available(self) -> bool:
        return self.has_capacity() and not self.broken


def picks(balancer: WeightedBalancer, n: int) -> list[str]:
    return [b.name for b in (balancer.choose() for _ in range(n)) if b is not None]


def balancer(*backends: Any) -> WeightedBalancer:
    return WeightedBalancer(backends)


def test_weights_are_exact_over_each_cycle() -> None:
    lb = balancer(FakeBackend("a", 5), FakeBackend("b", 1), FakeBackend("c", 2))
    for _ in range(5):
        window = picks(lb, 8)
        assert (window.count("a"), window.count("b"), window.count("c")) == (5, 1, 2)


def test_smooth_order_interleaves() -> None:
    lb = balancer(FakeBackend("a", 3), FakeBackend("b", 1))
    assert picks(lb, 8) == ["a", "a", "b", "a"] * 2
    lb = balancer(FakeBackend("a", 1), FakeBackend("b", 1))
    assert picks(lb, 4) == ["a", "b", "a", "b"]


def test_full_backends_are_skipped_and_none_when_all_full() -> None:
    a, b = FakeBackend("a", 3, max_concurrent=1), FakeBackend("b", 1, max_concurrent=1)
    lb = balancer(a, b)
    a.in_flight = 1
    assert picks(lb, 3) == ["b", "b", "b"]
    b.in_flight = 1
    assert lb.choose() is None
    assert lb.primary() is None
    a.in_flight = 0
    assert lb.primary() is a  # type: ignore[comparison-overlap]


def test_model_matcher_globs() -> None:
    matcher = ModelMatcher(["claude-*", "gpt-4o*"])
    assert matcher("claude-sonnet-4-5") and matcher("gpt-4o-mini")
    assert not matcher("gpt-5") and not matcher(None) and not matcher("xclaude-1")
    assert ModelMatcher(None)(None) and ModelMatcher(None)("anything")
    assert ModelMatcher(["a?c"])("abc") and not ModelMatcher(["a?c"])("abbc")


def test_lower_priority_tier_only_when_higher_unavailable() -> None:
    a, b = FakeBackend("a", 1), FakeBackend("b", 1)
    backup = FakeBackend("backup", 5, priority=1)
    lb = balancer(a, b, backup)
    assert picks(lb, 4) == ["a", "b", "a", "b"]
    a.broken = True
    assert picks(lb, 2) == ["b", "b"]
    b.broken = True
    assert picks(lb, 2) == ["backup", "backup"]
    a.broken = False
    assert picks(lb, 1) == ["a"]


def test_unhealthy_backends_get_traffic_only_when_none_is_healthy() -> None:
    a, b = FakeBackend("a", 1), FakeBackend("b", 1, priority=1)
    lb = balancer(a, b)
    a.healthy = False
    assert picks(lb, 2) == ["b", "b"]  # a healthy lower tier beats an unhealthy higher one
    b.healthy = False
    assert picks(lb, 2) == ["a", "a"]  # nobody healthy: fall back to tier order


def test_exclude_skips_already_tried_backends() -> None:
    a, b = FakeBackend("a", 3), FakeBackend("b", 1)
    lb = balancer(a, b)
    assert lb.choose(exclude=[a]) is b  # type: ignore[comparison-overlap,list-item]
    assert lb.choose(exclude=[a, b]) is None  # type: ignore[list-item]
