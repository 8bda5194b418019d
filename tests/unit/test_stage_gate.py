"""The limits gate on its own (relayd.limits.gate.LimitGate) over the in-memory store:
which checks each admission asks, how a refusal looks, and what settling charges."""

from __future__ import annotations

import json
from typing import Any

import pytest
from relay_harness import OTHER_KEY, base_config
from stage_fakes import MESSAGE, REQUEST_ID, World

from relayd.errors import Outcome, Refusal
from relayd.limits import MemoryStore, UsageRecord
from relayd.limits.checks import (
    Check,
    ConcurrencyCheck,
    Decision,
    PeriodCheck,
    WindowCheck,
)
from relayd.limits.gate import LimitGate
from relayd.limits.policy import estimate_tokens
from relayd.providers import PROVIDERS, Usage
from relayd.upstream import Backend

ANTHROPIC = PROVIDERS["anthropic"]
FIRST, RETRY = object(), object()  # the attempts tickets are kept for


def limited(client: dict[str, Any] | None = None, **upstream: dict[str, Any]) -> World:
    """team-a with ``client`` limits; each named backend with its ``upstream`` quota."""
    built = base_config()
    if client is not None:
        built["clients"][0]["limits"] = client
    for provider in built["providers"]:
        for backend in provider["backends"]:
            if backend["name"] in upstream:
                backend["limits"] = upstream[backend["name"]]
    return World(built)


def gate_of(world: World, payload: dict[str, Any] | None = None,
            key: str | None = None) -> LimitGate | None:
    client = world.client() if key is None else world.client(key)
    return LimitGate.for_request(world.runtime, client, payload or MESSAGE, ANTHROPIC,
                                 world.clock, world.metrics, REQUEST_ID)


def gate(world: World, payload: dict[str, Any] | None = None) -> LimitGate:
    found = gate_of(world, payload)
    assert found is not None
    return found


def store(world: World) -> MemoryStore:
    found = world.runtime.store
    assert isinstance(found, MemoryStore)
    return found


def decided(g: LimitGate, backend: Backend, first: bool = True) -> Decision:
    d = g.admit(backend, backend.keys.keys[0], first)
    assert d is not None
    results: list[Decision] = []
    d.addCallback(results.append)
    assert results, "the memory store decides at once"
    return results[0]


def admitted(g: LimitGate, backend: Backend, attempt: object = FIRST,
             first: bool = True) -> Decision:
    decision = decided(g, backend, first)
    assert decision.allowed
    g.admitted(decision, attempt)
    return decision


def counted(world: World, check: Check) -> int:
    """What the store counts now under ``check``'s counter (asked with a zero amount)."""
    if isinstance(check, WindowCheck):
        probe: Check = WindowCheck(check.key, 10**12, 0, check.name, check.scope)
    else:
        assert isinstance(check, PeriodCheck)
        probe = PeriodCheck(check.key, 10**12, 0, check.name, check.scope, check.period)
    return store(world).admit_now([probe]).states[0].used


def named(decision: Decision, scope: str, name: str) -> Check:
    return next(c for c in decision.checks if c.scope == scope and c.name == name)


# -- which checks an admission asks ----------------------------------------------------------


def test_no_gate_without_any_limit() -> None:
    assert gate_of(World()) is None


def test_an_upstream_quota_alone_makes_a_gate_that_only_its_backend_passes() -> None:
    world = limited(us={"requests_per_minute": 5})
    g = gate(world)
    assert g.admit(world.backend("eu"), world.backend("eu").keys.keys[0], True) is None
    decision = admitted(g, world.backend("us"))
    assert [(c.scope, c.name) for c in decision.checks] == [("upstream", "requests_per_minute")]


def test_the_first_admission_checks_the_client_and_the_upstream_key() -> None:
    world = limited({"requests_per_minute": 10, "tokens_per_minute": 100_000},
                    us={"requests_per_minute": 5, "tokens_per_minute": 50_000})
    decision = admitted(gate(world), world.backend("us"))
    assert sorted((c.scope, c.name) for c in decision.checks) == [
        ("client", "requests_per_minute"), ("client", "tokens_per_minute"),
        ("upstream", "requests_per_minute"), ("upstream", "tokens_per_minute"),
    ]
    estimate = estimate_tokens(MESSAGE, 1024)
    client_tokens = named(decision, "client", "tokens_per_minute")
    upstream_tokens = named(decision, "upstream", "tokens_per_minute")
    assert isinstance(client_tokens, WindowCheck) and isinstance(upstream_tokens, WindowCheck)
    assert client_tokens.amount == upstream_tokens.amount == estimate


def test_a_later_admission_checks_only_its_own_upstream_key() -> None:
    world = limited({"requests_per_minute": 10}, us={"requests_per_minute": 5},
                    eu={"requests_per_minute": 5})
    g = gate(world)
    admitted(g, world.backend("us"))
    retry = admitted(g, world.backend("eu"), RETRY, first=False)
    assert [(c.scope, c.name) for c in retry.checks] == [("upstream", "requests_per_minute")]
    # Even when asked as a first attempt, a gate that holds a ticket skips the client.
    again = decided(g, world.backend("us"), first=True)
    assert [c.scope for c in again.checks] == ["upstream"]
    assert counted(world, named(retry, "upstream", "requests_per_minute")) == 1


def test_a_later_attempt_on_a_backend_without_a_quota_needs_no_admission() -> None:
    world = limited({"requests_per_minute": 10})
    g = gate(world)
    admitted(g, world.backend("us"))
    assert g.admit(world.backend("eu"), world.backend("eu").keys.keys[0], False) is None


def test_an_admission_gives_the_clients_standing_for_its_headers() -> None:
    world = limited({"requests_per_minute": 10, "max_concurrent": 3})
    g = gate(world)
    admitted(g, world.backend("us"))
    assert len(g.limit_states) == 1  # concurrency has no rate-limit header
    state = g.limit_states[0]
    assert (state.what, state.limit, state.remaining) == ("requests", 10, 9)
    assert state.reset_after == 60.0


# -- refusals --------------------------------------------------------------------------------


def refused(world: World, payload: dict[str, Any] | None = None) -> tuple[LimitGate, Refusal]:
    """A second request over the limit that let the first in."""
    admitted(gate(world, payload), world.backend("us"))
    g = gate(world, payload)
    decision = decided(g, world.backend("us"))
    assert not decision.allowed and not g.quota_used_up(decision)
    return g, g.refusal(decision)


def test_a_used_up_budget_is_a_429_insufficient_quota_not_worth_retrying() -> None:
    world = limited({"tokens_per_day": 10})
    _, found = refused(world)
    assert (found.status, found.code, found.outcome) == (
        429, "insufficient_quota", Outcome.BUDGET_EXHAUSTED)
    assert found.retry_after is None
    assert dict(found.headers) == {
        b"x-relayd-limit": b"tokens_per_day",
        b"x-relayd-budget-reset": b"1970-01-02T00:00:00Z",  # the clock starts at 0
        b"x-should-retry": b"false",
    }
    assert "'team-a'" in found.message and "tokens_per_day (10)" in found.message
    assert world.sample("relayd_limit_rejections_total", client="team-a",
                        limit="tokens_per_day") == 1


def test_a_full_window_is_a_429_with_the_families_rate_limit_headers() -> None:
    world = limited({"requests_per_minute": 1})
    world.clock.advance(15)
    _, found = refused(world)
    assert (found.status, found.code, found.outcome) == (
        429, "rate_limit_exceeded", Outcome.RATE_LIMITED)
    assert found.retry_after == 60.0
    headers = dict(found.headers)
    assert headers[b"x-relayd-limit"] == b"requests_per_minute"
    assert headers[b"anthropic-ratelimit-requests-limit"] == b"1"
    assert headers[b"anthropic-ratelimit-requests-remaining"] == b"0"
    assert headers[b"anthropic-ratelimit-requests-reset"] == b"1970-01-01T00:01:15Z"
    assert found.message.endswith("limited to 1 requests per minute")
    assert world.sample("relayd_limit_rejections_total", client="team-a",
                        limit="requests_per_minute") == 1


def test_a_full_token_window_says_what_the_request_reserves() -> None:
    payload = {**MESSAGE, "max_tokens": 600}
    world = limited({"tokens_per_minute": 1000})
    _, found = refused(world, payload)
    amount = estimate_tokens(payload, 1024)
    assert found.message.endswith(f"1000 tokens per minute (this request reserves {amount})")
    assert dict(found.headers)[b"anthropic-ratelimit-tokens-limit"] == b"1000"


def test_too_many_requests_in_flight_is_a_429_worth_retrying_soon() -> None:
    world = limited({"max_concurrent": 1})
    _, found = refused(world)
    assert (found.status, found.outcome, found.retry_after) == (429, Outcome.RATE_LIMITED, 1.0)
    assert dict(found.headers) == {b"x-relayd-limit": b"max_concurrent"}
    assert found.message.endswith("limited to 1 concurrent requests")


def test_a_closed_store_that_cannot_decide_is_a_503() -> None:
    world = limited({"requests_per_minute": 1})
    g = gate(world)
    found = g.refusal(Decision(False, (), store="redis", degraded=True))
    assert (found.status, found.outcome, found.retry_after) == (
        503, Outcome.STORE_UNAVAILABLE, 1.0)
    assert g.refusal(Decision(False, (), retry_after=4.0)).retry_after == 4.0
    assert world.sample("relayd_limit_rejections_total", client="team-a",
                        limit="requests_per_minute") == 0


def test_a_used_up_upstream_key_is_routed_around_not_refused() -> None:
    world = limited(us={"requests_per_minute": 1})
    admitted(gate(world), world.backend("us"))
    g = gate(world)
    decision = decided(g, world.backend("us"))
    assert not decision.allowed and g.quota_used_up(decision)
    assert not g.quota_used_up(Decision(False, ()))


# -- settling --------------------------------------------------------------------------------


def record(model: str = "claude-x") -> UsageRecord:
    return UsageRecord("team-a", model, "anthropic", "us", Usage(input_tokens=3))


def requests_counted(world: World) -> int:
    snapshot = json.loads(json.dumps(store(world).ledger.snapshot()))
    return sum(client["requests"] for client in snapshot["clients"].values())


def test_a_final_count_replaces_the_reservation() -> None:
    world = limited({"tokens_per_minute": 100_000})
    g = gate(world)
    check = named(admitted(g, world.backend("us")), "client", "tokens_per_minute")
    assert counted(world, check) == estimate_tokens(MESSAGE, 1024)
    g.settle(record(), (7, True), FIRST)
    assert counted(world, check) == 7
    assert requests_counted(world) == 1


@pytest.mark.parametrize("used", [3, 5000])
def test_a_partial_count_only_ever_raises_the_reservation(used: int) -> None:
    """A stream cut before its usage: what it reported so far, or at least the estimate."""
    world = limited({"tokens_per_minute": 100_000})
    g = gate(world)
    check = named(admitted(g, world.backend("us")), "client", "tokens_per_minute")
    reserved = counted(world, check)
    assert 3 < reserved < 5000
    g.settle(None, (used, False), FIRST)
    assert counted(world, check) == max(reserved, used)


def test_only_the_attempt_that_answered_uses_its_keys_quota() -> None:
    world = limited({"tokens_per_minute": 100_000}, us={"tokens_per_minute": 50_000},
                    eu={"tokens_per_minute": 50_000})
    g = gate(world)
    first = admitted(g, world.backend("us"), FIRST)
    retry = admitted(g, world.backend("eu"), RETRY, first=False)
    g.settle(record(), (40, True), RETRY)
    assert counted(world, named(first, "client", "tokens_per_minute")) == 40
    assert counted(world, named(first, "upstream", "tokens_per_minute")) == 0
    assert counted(world, named(retry, "upstream", "tokens_per_minute")) == 40
    assert requests_counted(world) == 1  # the usage record goes with one ticket only


def test_nothing_relayed_gives_every_reservation_back() -> None:
    world = limited({"tokens_per_minute": 100_000}, us={"tokens_per_minute": 50_000})
    g = gate(world)
    decision = admitted(g, world.backend("us"))
    g.settle(None, None, FIRST)
    for check in decision.checks:
        assert counted(world, check) == 0


def test_settling_releases_concurrency_leases() -> None:
    world = limited({"max_concurrent": 1})
    g = gate(world)
    admitted(g, world.backend("us"))
    assert not decided(gate(world), world.backend("us")).allowed
    g.settle(None, (0, True), FIRST)
    assert decided(gate(world), world.backend("us")).allowed


def test_a_usage_record_without_any_ticket_still_reaches_the_store() -> None:
    world = limited(us={"requests_per_minute": 5})
    g = gate(world)  # only eu answered, which has no quota: no ticket
    g.settle(record(), (10, True), FIRST)
    assert requests_counted(world) == 1


def test_giving_back_an_allowed_decision_frees_everything_it_took() -> None:
    world = limited({"tokens_per_minute": 100_000, "max_concurrent": 1})
    g = gate(world)
    decision = decided(g, world.backend("us"))
    assert decision.allowed
    g.give_back(decision)
    tokens = named(decision, "client", "tokens_per_minute")
    assert counted(world, tokens) == 0
    assert any(isinstance(c, ConcurrencyCheck) for c in decision.checks)
    assert decided(gate(world), world.backend("us")).allowed  # the lease is free again
    assert g.limit_states == []  # nothing admitted, nothing to report


def test_giving_back_a_refusal_changes_nothing() -> None:
    world = limited({"requests_per_minute": 1})
    first = admitted(gate(world), world.backend("us"))
    g = gate(world)
    refusal = decided(g, world.backend("us"))
    assert not refusal.allowed
    g.give_back(refusal)
    assert counted(world, first.checks[0]) == 1


def test_clients_have_their_own_counters() -> None:
    built = base_config()
    built["clients"][0]["limits"] = {"requests_per_minute": 1}
    built["clients"][1]["limits"] = {"requests_per_minute": 1}
    world = World(built)
    admitted(gate(world), world.backend("us"))
    other = gate_of(world, key=OTHER_KEY)
    assert other is not None and other.client == "team-b"
    assert decided(other, world.backend("us")).allowed
