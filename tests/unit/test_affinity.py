"""Session affinity (relayd.affinity): a pin orders the candidates, it never blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, OTHER_KEY, Harness, base_config, json_reply
from twisted.internet.task import Clock
from twisted.web.server import Request

from relayd import affinity as affinity_module
from relayd.affinity import Pin, SessionPins
from relayd.config import parse_config
from relayd.limits.memory import MemoryStore
from relayd.metrics import RuntimeCollector
from relayd.runtime import RelayRuntime
from relayd.runtime_diff import plan_reload

MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
SESSION = "x-claude-code-session-id"


def two_keys_config(**route: Any) -> dict[str, Any]:
    config = base_config()
    config["providers"][0]["backends"][0]["api_keys"] = [
        {"api_key": "sk-up-us-0"}, {"api_key": "sk-up-us-1"}]
    del config["providers"][0]["backends"][0]["api_key"]
    config["routes"][0].update(route)
    return config


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(two_keys_config())
    yield h
    h.close()


def backend(harness: Harness, name: str) -> Any:
    return next(b for b in harness.runtime.backends if b.name == name)


def served_by(harness: Harness, **call: Any) -> str:
    """The backend that answered one Messages request."""
    body = call.pop("body", MESSAGE)
    status, _, _ = harness.call("POST", "/v1/messages", body, **call)
    assert status == 200
    return str(harness.logs.access()[-1]["backend"])


def key_used(harness: Harness, name: str) -> bytes:
    return harness.upstreams[name].seen[-1].headers[b"x-api-key"][0]


def stats(harness: Harness) -> dict[str, Any]:
    return harness.runtime.pins.stats()


def test_a_session_sticks_to_the_backend_and_key_that_answered_it(harness: Harness) -> None:
    first = served_by(harness, headers={SESSION: "s-1"})
    used = key_used(harness, first)
    for _ in range(6):
        assert served_by(harness, headers={SESSION: "s-1"}) == first
        assert key_used(harness, first) == used  # not the key ring's round robin
    assert stats(harness)["hits"] == 6 and stats(harness)["misses"] == 1
    access = harness.logs.access()
    assert [a["affinity"] for a in access] == ["new"] + ["hit"] * 6


def test_without_a_session_requests_are_balanced_by_weight_as_before(harness: Harness) -> None:
    picks = [served_by(harness) for _ in range(8)]
    assert picks.count("us") == 6 and picks.count("eu") == 2
    assert stats(harness)["misses"] == 0 and harness.logs.access()[0]["affinity"] is None


def test_new_sessions_keep_the_weighted_shares(harness: Harness) -> None:
    # Pinned requests do not advance the round robin, so the first request of each new
    # session is the weighted pick: 3:1 across sessions however often each returns.
    firsts = []
    for index in range(40):
        firsts.append(served_by(harness, headers={SESSION: f"s-{index}"}))
        for again in range(index % 3):
            served_by(harness, headers={SESSION: f"s-{index - again}"})
    assert firsts.count("us") == 30 and firsts.count("eu") == 10


def test_two_clients_with_one_session_id_get_their_own_pins(harness: Harness) -> None:
    a = served_by(harness, headers={SESSION: "shared-id"})
    b = served_by(harness, headers={SESSION: "shared-id"}, key=OTHER_KEY)
    assert stats(harness)["misses"] == 2  # two pins, not one
    assert served_by(harness, headers={SESSION: "shared-id"}) == a
    assert served_by(harness, headers={SESSION: "shared-id"}, key=OTHER_KEY) == b


def test_body_signals_anthropic_metadata_user_id(harness: Harness) -> None:
    body = {**MESSAGE, "metadata": {"user_id": "user_1_session_abc"}}
    first = served_by(harness, body=body)
    assert all(served_by(harness, body=body) == first for _ in range(5))
    assert stats(harness)["hits"] == 5


def test_openai_prompt_cache_key_and_user() -> None:
    config = base_config()
    config["providers"][1]["backends"] = [
        {"name": "o1", "url": "http://o1.test", "api_key": "k1"},
        {"name": "o2", "url": "http://o2.test", "api_key": "k2"},
    ]
    h = Harness(config)
    try:
        for field in ("prompt_cache_key", "user"):
            body = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}],
                    field: "conversation-7"}
            names = []
            for _ in range(4):
                before = {n: len(u.seen) for n, u in h.upstreams.items()}
                status, _, _ = h.call("POST", "/v1/chat/completions", body, api="openai")
                assert status == 200
                names += [n for n, u in h.upstreams.items() if len(u.seen) > before[n]]
            assert len(set(names)) == 1, field
    finally:
        h.close()


def test_auto_pins_agents_without_ids_by_their_conversation() -> None:
    h = Harness(two_keys_config(affinity={"key": "auto"}))
    try:
        opening = {"role": "user", "content": "hi"}
        body: dict[str, Any] = {
            **MESSAGE, "system": "You are a coding agent.", "messages": [opening],
            "tools": [{"name": "bash", "input_schema": {"type": "object"}}],
        }
        first = served_by(h, body=body)
        longer = {**body, "messages": [opening, {"role": "assistant", "content": "hello"},
                                       {"role": "user", "content": "go on"}]}
        assert all(served_by(h, body=longer) == first for _ in range(5))
        assert h.runtime.pins.stats()["hits"] == 5
    finally:
        h.close()


def test_session_affinity_ignores_the_conversation_digest() -> None:
    h = Harness(two_keys_config())  # key: session (the default)
    try:
        body = {**MESSAGE, "system": "You are a coding agent."}
        picks = [served_by(h, body=body) for _ in range(8)]
        assert picks.count("us") == 6  # balanced, not pinned
        assert h.runtime.pins.stats()["misses"] == 0
    finally:
        h.close()


def test_header_key_uses_only_that_header() -> None:
    h = Harness(two_keys_config(affinity={"key": "header X-Conversation"}))
    try:
        first = served_by(h, headers={"x-conversation": "c-9"})
        assert all(served_by(h, headers={"x-conversation": "c-9"}) == first for _ in range(5))
        picks = [served_by(h, headers={SESSION: "ignored"}) for _ in range(4)]
        assert picks.count("us") == 3  # Claude Code's header is not this route's key
    finally:
        h.close()


def test_key_none_turns_it_off() -> None:
    h = Harness(two_keys_config(affinity={"key": "none"}))
    try:
        picks = [served_by(h, headers={SESSION: "s-1"}) for _ in range(8)]
        assert picks.count("us") == 6 and h.runtime.pins.stats()["misses"] == 0
    finally:
        h.close()


def test_the_ttl_slides_with_each_use_and_a_pin_expires_after_it() -> None:
    h = Harness(two_keys_config(affinity={"ttl": 60}))
    try:
        served_by(h, headers={SESSION: "s-1"})
        for _ in range(5):
            h.clock.advance(50)  # within the TTL of the last use, not of the first
            served_by(h, headers={SESSION: "s-1"})
        assert h.runtime.pins.stats()["hits"] == 5
        h.clock.advance(61)
        served_by(h, headers={SESSION: "s-1"})
        assert h.runtime.pins.stats()["misses"] == 2
    finally:
        h.close()


# -- the pin yields: each case would succeed without affinity, and does with it ----------


def pinned_to_us(harness: Harness) -> None:
    """Pin session s-1 to us (the weighted first pick of a fresh harness)."""
    assert served_by(harness, headers={SESSION: "s-1"}) == "us"


def make_unhealthy(harness: Harness) -> None:
    backend(harness, "us").health.healthy = False


def open_breaker(harness: Harness) -> None:
    us = backend(harness, "us")
    for _ in range(us.breaker.config.failures):
        us.breaker.record_failure("test")


def fill_capacity(harness: Harness) -> None:
    us = backend(harness, "us")
    us.max_concurrent = 1
    us.in_flight = 1


def cool_pinned_key(harness: Harness) -> None:
    us = backend(harness, "us")
    pinned = harness.upstreams["us"].seen[-1].headers[b"x-api-key"][0].decode()
    key = next(k for k in us.keys.keys if k.secret == pinned)
    us.keys.cool_down(key, 30, "rate_limited")


def fail_with_529(harness: Harness) -> None:
    def overloaded(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"type": "error", "error": {"type": "overloaded_error",
                                                               "message": "busy"}}, 529)
    harness.upstreams["us"].handler = overloaded


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (make_unhealthy, "unhealthy"),
        (open_breaker, "breaker"),
        (fill_capacity, "busy"),
        (fail_with_529, "failed"),
    ],
)
def test_a_pinned_backend_that_cannot_serve_yields_and_the_pin_moves(
    harness: Harness, spoil: Any, reason: str
) -> None:
    pinned_to_us(harness)
    spoil(harness)
    assert served_by(harness, headers={SESSION: "s-1"}) == "eu"
    assert stats(harness)["repins"][reason] == 1
    assert harness.logs.access()[-1]["affinity"] == f"moved:{reason}"
    # The session now lives on eu, and stays there when us is fine again.
    harness.upstreams["us"].handler = None
    assert served_by(harness, headers={SESSION: "s-1"}) == "eu"
    assert harness.logs.access()[-1]["affinity"] == "hit"


def test_a_cooling_pinned_key_yields_to_the_normal_choice(harness: Harness) -> None:
    pinned_to_us(harness)
    pinned = key_used(harness, "us")
    cool_pinned_key(harness)
    # The balancer still picks us (weight 3, one key usable): the other key serves.
    assert served_by(harness, headers={SESSION: "s-1"}) == "us"
    assert key_used(harness, "us") != pinned
    assert stats(harness)["repins"]["key"] == 1
    assert served_by(harness, headers={SESSION: "s-1"}) == "us"
    assert key_used(harness, "us") != pinned  # pinned to the key that answered


def test_a_busy_pinned_backend_does_not_make_its_session_wait(harness: Harness) -> None:
    # Without affinity, a request finding one backend at its cap goes to the other at
    # once; with it, the same: the pin is not a reason to queue.
    pinned_to_us(harness)
    fill_capacity(harness)
    assert served_by(harness, headers={SESSION: "s-1"}) == "eu"
    assert harness.logs.access()[-1]["attempts"] == 1


def test_a_better_priority_tier_wins_over_the_pin() -> None:
    config = two_keys_config()
    config["providers"][0]["backends"][1]["priority"] = 1  # eu is the backup
    h = Harness(config)
    try:
        make_unhealthy(h)
        assert served_by(h, headers={SESSION: "s-1"}) == "eu"  # pinned to the backup
        backend(h, "us").health.healthy = True
        assert served_by(h, headers={SESSION: "s-1"}) == "us"
        assert h.runtime.pins.stats()["repins"]["priority"] == 1
    finally:
        h.close()


def test_an_ordered_routes_first_target_wins_over_a_pin_to_the_fallback() -> None:
    config = base_config()
    config["providers"].append({"name": "backup", "type": "anthropic", "backends": [
        {"name": "b1", "url": "http://b1.test", "api_key": "k"}]})
    config["routes"][0]["targets"] = [{"provider": "anthropic"}, {"provider": "backup"}]
    del config["routes"][0]["provider"]
    h = Harness(config)
    try:
        for b in h.runtime.providers["anthropic"].balancer.backends:
            b.health.healthy = False
        assert served_by(h, headers={SESSION: "s-1"}) == "b1"
        for b in h.runtime.providers["anthropic"].balancer.backends:
            b.health.healthy = True
        assert served_by(h, headers={SESSION: "s-1"}) in ("us", "eu")
        assert h.runtime.pins.stats()["repins"]["order"] == 1
    finally:
        h.close()


def test_a_weighted_route_keeps_a_session_on_its_target() -> None:
    config = base_config()
    config["providers"].append({"name": "other", "type": "anthropic", "backends": [
        {"name": "o1", "url": "http://o1.test", "api_key": "k"}]})
    config["routes"][0]["targets"] = [{"provider": "anthropic"}, {"provider": "other"}]
    config["routes"][0]["strategy"] = "weighted"
    del config["routes"][0]["provider"]
    h = Harness(config)
    try:
        firsts = [served_by(h, headers={SESSION: f"s-{i}"}) for i in range(4)]
        assert "o1" in firsts
        session = f"s-{firsts.index('o1')}"
        assert all(served_by(h, headers={SESSION: session}) == "o1" for _ in range(5))
    finally:
        h.close()


def test_a_reload_keeps_pins_and_a_removed_backend_moves_its_sessions(harness: Harness) -> None:
    # Weights 3:1 give us, us, eu, us to four new sessions.
    picks = [served_by(harness, headers={SESSION: f"s-{i}"}) for i in range(1, 5)]
    assert picks == ["us", "us", "eu", "us"]
    config = two_keys_config()
    config["providers"][0]["backends"][0]["weight"] = 5
    parsed = parse_config(config)
    new = RelayRuntime(parsed, harness.clock, carry=plan_reload(harness.runtime, parsed))
    assert new.pins is harness.runtime.pins
    harness.runtime = new
    assert served_by(harness, headers={SESSION: "s-3"}) == "eu"  # kept across the reload
    removed = two_keys_config()
    del removed["providers"][0]["backends"][1]
    parsed = parse_config(removed)
    harness.runtime = RelayRuntime(parsed, harness.clock,
                                   carry=plan_reload(harness.runtime, parsed))
    assert served_by(harness, headers={SESSION: "s-3"}) == "us"
    assert stats(harness)["repins"]["gone"] == 1


def test_pins_are_bounded_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(affinity_module, "MAX_PINS", 3)
    pins = SessionPins(Clock(), MemoryStore(Clock()))
    for index in range(5):
        pins.keep(f"k{index}", Pin("p", "b", 0), 60)
    assert pins.stats()["pins"] == 3
    assert pins.find("k0", 60) is None and pins.find("k4", 60) == Pin("p", "b", 0)


def test_pins_never_hold_secrets_or_session_ids_in_clear(harness: Harness) -> None:
    served_by(harness, headers={SESSION: "secret-session-id"})
    (key,) = harness.runtime.pins._memory
    assert "secret" not in key and CLIENT_KEY not in key and len(key) == 32


def test_affinity_metrics_are_exported(harness: Harness) -> None:
    pinned_to_us(harness)
    served_by(harness, headers={SESSION: "s-1"})
    make_unhealthy(harness)
    served_by(harness, headers={SESSION: "s-1"})
    collector = RuntimeCollector()
    collector.set_source(lambda: harness.runtime, harness.clock)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect() for s in family.samples
    }
    assert samples[("relayd_affinity_hits_total", ())] == 1
    assert samples[("relayd_affinity_misses_total", ())] == 1
    assert samples[("relayd_affinity_repins_total", (("reason", "unhealthy"),))] == 1
    assert samples[("relayd_affinity_pins", ())] == 1


def test_a_pin_is_written_only_for_a_successful_answer(harness: Harness) -> None:
    def bad_request(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"type": "error", "error": {"type": "invalid_request_error",
                                                               "message": "no"}}, 400)
    for upstream in harness.upstreams.values():
        upstream.handler = bad_request
    status, _, _ = harness.call("POST", "/v1/messages", MESSAGE, headers={SESSION: "s-1"})
    assert status == 400 and stats(harness)["pins"] == 0


def test_usage_shows_the_cache_read_share_per_backend(harness: Harness) -> None:
    def cached(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"id": "m", "type": "message", "usage": {
            "input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 90,
            "cache_creation_input_tokens": 0}})
    harness.upstreams["us"].handler = cached
    served_by(harness, headers={SESSION: "s-1"})
    snapshot: list[Any] = []
    harness.runtime.store.usage_snapshot().addCallback(snapshot.append)
    backends = snapshot[0]["backends"]
    assert backends["anthropic/us"]["cache_read_share"] == 0.9
    assert backends["anthropic/us"]["requests"] == 1
    assert json.dumps(snapshot[0])  # JSON-able for /admin/usage
