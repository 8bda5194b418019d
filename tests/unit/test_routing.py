"""Model globs, first-match routes and smooth weighted round-robin."""

from __future__ import annotations

from typing import Any

from relayd.routing import ModelMatcher, WeightedBalancer


class FakeBackend:
    def __init__(self, name: str, weight: int, max_concurrent: int = 100) -> None:
        self.name = name
        self.weight = weight
        self.max_concurrent = max_concurrent
        self.in_flight = 0

    def has_capacity(self) -> bool:
        return self.in_flight < self.max_concurrent


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
