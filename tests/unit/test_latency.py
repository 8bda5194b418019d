"""``balance: least_latency``: the peak-EWMA of a backend's time to response headers
(relayd.latency) and the power-of-two-choices balancer over it (relayd.routing), with a
fake clock and a seeded random source."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from relay_harness import Harness, base_config, json_reply
from stage_fakes import World

from relayd.latency import PeakEwma
from relayd.routing import LeastLatencyBalancer, WeightedBalancer
from relayd.upstream import Backend

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16,
           "messages": [{"role": "user", "content": "hi"}]}


def test_a_slow_sample_counts_at_once_a_fast_one_fades_in() -> None:
    ewma = PeakEwma(decay=10.0, default_rtt=0.7)
    assert ewma.estimate(0.0) == 0.7
    ewma.observe(0.1, 0.0)
    assert ewma.estimate(0.0) == 0.1
    ewma.observe(2.0, 1.0)  # a peak replaces the average
    assert ewma.estimate(1.0) == 2.0
    ewma.observe(0.1, 1.0)  # no time passed: a faster sample has no weight yet
    assert ewma.estimate(1.0) == 2.0
    ewma.observe(0.1, 11.0)  # one decay later: about 63% of the way down
    assert abs(ewma.estimate(11.0) - (2.0 * 0.36788 + 0.1 * 0.63212)) < 1e-3
    for second in range(12, 60):
        ewma.observe(0.1, float(second))
    assert abs(ewma.estimate(59.0) - 0.1) < 0.01


def test_without_samples_the_estimate_decays_so_a_passed_over_backend_is_retried() -> None:
    ewma = PeakEwma(decay=10.0)
    ewma.observe(2.0, 0.0)
    assert abs(ewma.estimate(10.0) - 2.0 * 0.36788) < 1e-3
    assert ewma.estimate(100.0) < 0.001
    assert PeakEwma().estimate(0.0) == 0.05  # the default: below real latencies


def world(**provider: Any) -> World:
    config = base_config()
    anthropic = config["providers"][0]
    anthropic["backends"][0]["weight"] = 1
    anthropic.update(balance="least_latency", **provider)
    return World(config)


def two_backends(seed: int) -> tuple[World, Backend, Backend, LeastLatencyBalancer]:
    """The world's two Anthropic backends (weight 1 each) under a seeded balancer."""
    w = world()
    us, eu = w.backend("us"), w.backend("eu")
    return w, us, eu, LeastLatencyBalancer([us, eu], random.Random(seed))


def picks(balancer: WeightedBalancer, count: int) -> Counter[str]:
    chosen: Counter[str] = Counter()
    for _ in range(count):
        backend = balancer.choose()
        assert backend is not None
        chosen[backend.name] += 1
    return chosen


def test_the_runtime_builds_it_with_the_providers_tuning() -> None:
    w = world(least_latency={"decay": 3, "default_rtt": 0.2})
    balancer = w.runtime.providers["anthropic"].balancer
    assert isinstance(balancer, LeastLatencyBalancer)
    assert w.backend("us").latency.decay == 3.0 and w.backend("us").latency.default_rtt == 0.2
    assert type(w.runtime.providers["openai"].balancer) is WeightedBalancer


def test_a_slow_backend_loses_its_share_and_wins_it_back() -> None:
    w, us, eu, balancer = two_backends(seed=7)
    assert picks(balancer, 200)["us"] in range(80, 121)  # no samples: even
    us.latency.observe(2.0, 0.0)  # us answers in 2 s, eu in 0.1 s
    eu.latency.observe(0.1, 0.0)
    assert picks(balancer, 200) == {"eu": 200}  # of two, the cheaper: always eu
    eu.in_flight = 5  # even five requests deep, eu (0.1 s x 6) beats us (2 s x 1)
    assert picks(balancer, 50) == {"eu": 50}
    for second in range(1, 60):  # us speeds up; its peak fades
        w.clock.advance(1)
        us.latency.observe(0.1, float(second))
        eu.latency.observe(0.1, float(second))
    assert us.latency.estimate(59.0) < 0.11
    assert picks(balancer, 50) == {"us": 50}  # now busy eu costs more
    eu.in_flight = 0
    us.in_flight = 1
    assert picks(balancer, 50) == {"eu": 50}  # and load alone moves it back


def test_a_slow_backend_left_alone_is_tried_again() -> None:
    w, us, eu, balancer = two_backends(seed=5)
    us.latency.observe(3.0, 0.0)
    eu.latency.observe(0.2, 0.0)
    assert picks(balancer, 20) == {"eu": 20}
    for _ in range(40):  # eu keeps answering in 0.2 s; us gets no traffic, no samples
        w.clock.advance(1)
        eu.latency.observe(0.2, w.clock.seconds())
    assert picks(balancer, 1) == {"us": 1}  # its old peak has faded: worth a new look


def test_requests_in_flight_and_weight_scale_the_cost() -> None:
    _, us, eu, balancer = two_backends(seed=3)
    for backend in (us, eu):
        backend.latency.observe(0.5, 0.0)
    us.in_flight = 3  # same latency, busier
    assert picks(balancer, 50) == {"eu": 50}
    us.in_flight = 0
    us.weight = 4  # same latency, four times the weight: the cheaper
    assert picks(balancer, 50) == {"us": 50}


def test_eligibility_and_tiers_are_the_weighted_balancers() -> None:
    _, us, eu, balancer = two_backends(seed=1)
    us.latency.observe(0.01, 0.0)
    eu.latency.observe(5.0, 0.0)
    assert balancer.choose(exclude=[us]) is eu  # failover still reaches the slow one
    us.health.healthy = False
    assert balancer.choose() is eu  # a healthy backend first, however slow
    eu.health.healthy = False
    assert balancer.choose() is us  # none healthy: the fallback pass
    assert balancer.choose(exclude=[us, eu]) is None


def test_attempts_feed_the_time_to_response_headers() -> None:
    config = base_config()
    config["providers"][0]["balance"] = "least_latency"
    h = Harness(config)
    held = h.hold_upstreams()
    try:
        results: list[Any] = []
        d = h.client.request("POST", "http://relay.test/v1/messages", json=MESSAGE,
                             headers={"x-api-key": "sk-relay-team-a",
                                      "anthropic-version": "2023-06-01"})
        d.addBoth(results.append)
        h.flush()
        assert len(held) == 1
        h.clock.advance(0.25)
        held[0].write(json_reply(held[0], {"id": "m", "usage": {}}))
        held[0].finish()
        h.flush()
        sampled: list[Backend] = [b for b in h.runtime.backends if b.latency.samples]
        assert len(sampled) == 1
        served = sampled[0]
        assert served.latency.samples == 1
        assert abs(served.latency.estimate(served.latency.last) - 0.25) < 1e-9
    finally:
        h.close()
