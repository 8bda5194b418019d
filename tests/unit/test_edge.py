"""Per-address rules before authentication (relayd.edge) and clients' allow_from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config
from twisted.internet.task import Clock

from relayd import edge as edge_module
from relayd.config.checks import Context
from relayd.config.model import AuthFailuresConfig, EdgeConfig, PerAddressConfig
from relayd.config.regions import networks
from relayd.edge import AddressRules
from relayd.limits.memory import MemoryStore

MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def rules(clock: Clock, **edge: Any) -> AddressRules:
    return AddressRules(clock, MemoryStore(clock), EdgeConfig(**edge))


def test_the_bucket_lets_burst_plus_one_through_then_the_rate() -> None:
    clock = Clock()
    edge = rules(clock, per_address=PerAddressConfig(rate=5, burst=10))
    assert [edge.admit("192.0.2.1") for _ in range(11)] == [None] * 11
    refused = edge.admit("192.0.2.1")
    assert isinstance(refused, tuple) and refused[0] == "per_address"
    assert refused[1] == pytest.approx(0.2)
    assert edge.admit("192.0.2.2") is None  # another address has its own bucket
    clock.advance(0.2)
    assert edge.admit("192.0.2.1") is None
    assert edge.admit("192.0.2.1") is not None  # a refused request is not counted ...
    clock.advance(2.2)
    assert [edge.admit("192.0.2.1") for _ in range(11)] == [None] * 11  # ... it drained


def test_without_burst_one_request_per_interval() -> None:
    clock = Clock()
    edge = rules(clock, per_address=PerAddressConfig(rate=2))
    assert edge.admit("a") is None
    assert edge.admit("a") == ("per_address", 0.5)
    clock.advance(0.5)
    assert edge.admit("a") is None


def exempt(*cidrs: str) -> Any:
    return networks(list(cidrs), "edge.exempt", Context(environ={}, base_dir="/"))


def test_exempt_addresses_skip_every_rule() -> None:
    clock = Clock()
    edge = rules(clock, per_address=PerAddressConfig(rate=1),
                 auth_failures=AuthFailuresConfig(limit=1), exempt=exempt("10.0.0.0/8"))
    for _ in range(5):
        edge.auth_failed("10.1.2.3")
        assert edge.admit("10.1.2.3") is None


def test_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge_module, "MAX_ADDRESSES", 3)
    edge = rules(Clock(), per_address=PerAddressConfig(rate=1))
    for index in range(10):
        edge.admit(f"192.0.2.{index}")
    assert edge.stats()["buckets"] == 3


def test_repeated_failed_authentications_cool_an_address_down() -> None:
    clock = Clock()
    edge = rules(clock, auth_failures=AuthFailuresConfig(limit=3, window=60, cooldown=300))
    edge.auth_failed("a")
    edge.auth_failed("a")
    assert edge.admit("a") is None
    clock.advance(61)  # a new window: the two failures are forgotten
    edge.auth_failed("a")
    edge.auth_failed("a")
    assert edge.admit("a") is None
    edge.auth_failed("a")
    assert edge.admit("a") == ("auth_failures", 300.0)
    assert edge.admit("b") is None
    clock.advance(300)
    assert edge.admit("a") is None


# -- in the relay ---------------------------------------------------------------------------


@pytest.fixture
def harness() -> Iterator[Harness]:
    config = base_config(trusted_proxies=["127.0.0.1/32"],
                         edge={"per_address": {"rate": 1, "burst": 2},
                               "auth_failures": {"limit": 3, "window": 60, "cooldown": 300}})
    config["clients"][1]["allow_from"] = ["198.51.100.0/24"]
    h = Harness(config)
    yield h
    h.close()


def from_address(h: Harness, address: str, **call: Any) -> tuple[int, dict[str, list[str]], bytes]:
    path = call.pop("path", "/v1/messages")
    body = call.pop("body", MESSAGE)
    return h.call("POST", path, body, headers={"x-forwarded-for": address}, **call)


def rejections(h: Harness, reason: str) -> float:
    value = h.resource.metrics.registry.get_sample_value(
        "relayd_edge_rejections_total", {"reason": reason})
    return value or 0.0


def test_a_flood_from_one_address_gets_429_while_another_is_served(harness: Harness) -> None:
    statuses = [from_address(harness, "192.0.2.7")[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    status, headers, body = from_address(harness, "192.0.2.7")
    assert status == 429 and headers["retry-after"] == ["1"]
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert from_address(harness, "192.0.2.8")[0] == 200
    assert rejections(harness, "per_address") == 3
    # The OpenAI shape for an OpenAI call.
    status, _, body = from_address(harness, "192.0.2.7", path="/v1/chat/completions",
                                   body={"model": "gpt-x", "messages": []}, api="openai")
    assert status == 429 and "rate_limit" in json.loads(body)["error"]["type"]


def test_the_bucket_comes_before_authentication(harness: Harness) -> None:
    statuses = [from_address(harness, "192.0.2.9", key="sk-wrong")[0] for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


def test_an_address_failing_to_authenticate_is_cooled_down_for_every_key(
    harness: Harness,
) -> None:
    for _ in range(3):
        assert from_address(harness, "203.0.113.5", key="sk-guess")[0] == 401
        harness.clock.advance(1)  # within the bucket's rate
    status, headers, body = from_address(harness, "203.0.113.5", key=CLIENT_KEY)
    assert status == 429 and b"failed authentications" in body
    assert int(headers["retry-after"][0]) > 1  # max_retry_after clamps the 300 s
    assert rejections(harness, "auth_failures") == 1
    harness.clock.advance(301)
    assert from_address(harness, "203.0.113.5")[0] == 200


def test_allow_from_refuses_other_addresses_after_authentication(harness: Harness) -> None:
    from relay_harness import OTHER_KEY

    assert from_address(harness, "198.51.100.20", key=OTHER_KEY)[0] == 200
    status, _, body = from_address(harness, "192.0.2.30", key=OTHER_KEY)
    assert status == 403 and b"may not call from this address" in body
    assert rejections(harness, "allow_from") == 1
    assert from_address(harness, "192.0.2.30")[0] == 200  # team-a has no allow list


def test_without_edge_rules_nothing_is_counted() -> None:
    h = Harness(base_config())
    try:
        assert not h.runtime.address_rules.active
        assert all(h.call("POST", "/v1/messages", MESSAGE)[0] == 200 for _ in range(20))
    finally:
        h.close()


def test_a_flood_of_unknown_paths_is_limited_too(harness: Harness) -> None:
    statuses = [from_address(harness, "192.0.2.40", path="/nope")[0] for _ in range(4)]
    assert statuses == [404, 404, 404, 429]
