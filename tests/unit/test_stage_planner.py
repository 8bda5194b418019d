"""The planner on its own (relayd.http.planner): the route of a request, the backend and
key of each attempt, and whether a failed attempt may be retried (and why not)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from relay_harness import base_config
from stage_fakes import MESSAGE, World, endpoint_of

from relayd.errors import Outcome, Refusal
from relayd.http.intake import ClientCall
from relayd.http.planner import AttemptPlanner, Pick, choose_route
from relayd.keyring import KeyRing
from relayd.providers import PROVIDERS
from relayd.routing import Route
from relayd.upstream import Backend

ANTHROPIC = PROVIDERS["anthropic"]
BATCHES = endpoint_of("anthropic", "messages.batches")
MESSAGES = endpoint_of("anthropic", "messages")

BACKUP = {"name": "backup", "type": "anthropic",
          "backends": [{"name": "bk", "url": "http://up-bk.test", "api_key": "sk-up-bk"}]}


def config(**top: Any) -> dict[str, Any]:
    """The harness configuration plus a second Anthropic provider, ``backup``."""
    built = base_config(**top)
    built["providers"].append(BACKUP)
    return built


def two_targets(**top: Any) -> World:
    """claude-* goes to provider ``anthropic`` (us, eu), then to ``backup`` (bk)."""
    built = config(**top)
    built["routes"][0] = {"api": "anthropic", "models": ["claude-*"],
                          "targets": [{"provider": "anthropic"}, {"provider": "backup"}]}
    return World(built)


def sent(planner: AttemptPlanner) -> Pick:
    """The next pick, sent (its backend is not picked again for its target)."""
    pick = planner.next()
    assert pick is not None
    planner.sent(pick)
    return pick


def names(picks: list[Pick]) -> list[str]:
    return [p.backend.name for p in picks]


def trip(backend: Backend) -> None:
    """Open ``backend``'s breaker (its config opens it at the first failure)."""
    backend.breaker.record_failure("test")
    assert backend.breaker.state == "open"


def unhealthy(world: World, backend: Backend) -> None:
    for _ in range(backend.health.config.unhealthy_after):
        backend.health.record_probe(False, world.clock.seconds(), "probe failed")
    assert not backend.health.healthy


def refused(world: World, provider: str, reason: str) -> float:
    return world.sample("relayd_retries_refused_total", provider=provider, reason=reason)


# -- the route -------------------------------------------------------------------------------


def batch_world() -> World:
    built = config()
    built["routes"] = [
        {"api": "anthropic", "models": ["smart"],
         "targets": [{"provider": "anthropic", "model": "claude-real"}]},
        {"api": "anthropic", "models": ["claude-a*"], "provider": "anthropic"},
        {"api": "anthropic", "models": ["claude-b*"], "provider": "backup"},
        {"api": "openai", "provider": "openai"},
    ]
    return World(built)


def batch_call(world: World, *models: str) -> ClientCall:
    call = ClientCall(world.client(), b"{}")
    call.batch_models = list(models) if models else None
    return call


def test_a_call_goes_to_the_route_of_its_model() -> None:
    world = batch_world()
    call = world.call({"model": "claude-b1"})
    route = choose_route(world.runtime, ANTHROPIC, MESSAGES, call, False)
    assert route is world.runtime.router.routes[2]


def test_a_model_no_route_takes_is_a_404_naming_it_and_the_api() -> None:
    world = batch_world()
    with pytest.raises(Refusal) as caught:
        choose_route(world.runtime, ANTHROPIC, MESSAGES, world.call({"model": "gpt-4o"}), False)
    assert caught.value.status == 404
    assert caught.value.message == "no route for model 'gpt-4o' on the anthropic API"


def test_a_batch_goes_to_the_one_route_of_its_models() -> None:
    world = batch_world()
    route = choose_route(world.runtime, ANTHROPIC, BATCHES,
                         batch_call(world, "claude-a1", "claude-a2"), False)
    assert route is world.runtime.router.routes[1]


def test_a_batch_over_several_routes_is_a_400_naming_them() -> None:
    world = batch_world()
    with pytest.raises(Refusal) as caught:
        choose_route(world.runtime, ANTHROPIC, BATCHES,
                     batch_call(world, "claude-a1", "claude-b1", "claude-a2"), False)
    assert caught.value.status == 400
    assert "'claude-a1' to routes[1]" in caught.value.message
    assert "'claude-b1' to routes[2]" in caught.value.message


def test_a_batch_on_a_route_that_renames_its_model_is_a_404() -> None:
    world = batch_world()
    with pytest.raises(Refusal) as caught:
        choose_route(world.runtime, ANTHROPIC, BATCHES, batch_call(world, "smart"), False)
    assert caught.value.status == 404
    assert "cannot be served by routes[0]" in caught.value.message


def test_a_batch_with_a_model_no_route_takes_is_a_404() -> None:
    world = batch_world()
    with pytest.raises(Refusal) as caught:
        choose_route(world.runtime, ANTHROPIC, BATCHES,
                     batch_call(world, "claude-a1", "gpt-4o"), False)
    assert caught.value.status == 404 and "'gpt-4o' (in the batch)" in caught.value.message


def test_a_batch_call_without_models_goes_to_the_first_route_serving_batches() -> None:
    world = batch_world()  # routes[0] renames its model: it cannot hold batches
    route = choose_route(world.runtime, ANTHROPIC, BATCHES, batch_call(world), False)
    assert route is world.runtime.router.routes[1]


def test_no_route_serving_batches_is_a_404() -> None:
    built = base_config()
    built["routes"][0] = {"api": "anthropic", "models": ["claude-*"],
                          "targets": [{"provider": "openai"}]}  # translated: no batches
    world = World(built)
    with pytest.raises(Refusal) as caught:
        choose_route(world.runtime, ANTHROPIC, BATCHES, batch_call(world), False)
    assert caught.value.status == 404
    assert "can serve Message Batches" in caught.value.message


def test_a_pinned_call_without_a_model_takes_the_first_route_of_its_api() -> None:
    world = batch_world()
    route = choose_route(world.runtime, ANTHROPIC, BATCHES, batch_call(world), True)
    assert route is world.runtime.router.routes[0]  # where its object lives decides
    built = base_config()
    built["routes"] = [{"api": "openai", "provider": "openai"}]
    lonely = World(built)
    with pytest.raises(Refusal) as caught:
        choose_route(lonely.runtime, ANTHROPIC, BATCHES, batch_call(lonely), True)
    assert (caught.value.status, caught.value.message) == (404, "no route on the anthropic API")


# -- picks -----------------------------------------------------------------------------------


def test_targets_are_tried_in_route_order_and_tried_backends_are_skipped() -> None:
    world = two_targets()
    planner = world.planner()
    picks = [sent(planner), sent(planner), sent(planner)]
    assert names(picks) == ["us", "eu", "bk"]
    assert [p.target.provider.name for p in picks] == ["anthropic", "anthropic", "backup"]
    assert planner.next() is None
    assert planner.provider_name == "backup"  # the provider of the last attempt sent


def test_a_pick_holds_its_backends_slot_until_unpicked() -> None:
    world = World()
    us = world.backend("us")
    planner = world.planner()
    pick = planner.next()
    assert pick is not None and pick.backend is us and us.in_flight == 1
    assert pick.key is us.keys.keys[0]
    assert pick.call.path == b"/v1/messages"
    AttemptPlanner.unpick(pick)
    assert us.in_flight == 0


def test_every_target_is_asked_for_a_healthy_backend_before_an_unhealthy_one() -> None:
    world = two_targets()
    for name in ("us", "eu"):
        unhealthy(world, world.backend(name))
    planner = world.planner()
    # The healthy backend of the second target comes before the first target's.
    assert names([sent(planner), sent(planner), sent(planner)]) == ["bk", "us", "eu"]


def test_one_target_falls_back_to_an_unhealthy_backend() -> None:
    world = World()
    unhealthy(world, world.backend("us"))
    planner = world.planner()
    assert names([sent(planner), sent(planner)]) == ["eu", "us"]


class NoKeyToChoose:
    """A key ring that says a key is usable but then has none to hand out."""

    keys = ()

    def available(self) -> bool:
        return True

    def choose(self) -> None:
        return None

    def next_available_at(self) -> None:
        return None


def half_open_world() -> World:
    built = base_config()
    built["providers"][0]["breaker"] = {"failures": 1, "window": 1, "cooldown": 5}
    world = World(built)
    us = world.backend("us")
    trip(us)
    world.clock.advance(5)
    assert us.breaker.state == "half_open"
    return world


def test_a_half_open_trial_is_given_back_when_the_backend_has_no_key() -> None:
    world = half_open_world()
    us = world.backend("us")
    us.keys = cast(KeyRing, NoKeyToChoose())
    pick = world.planner().next()
    assert pick is not None and pick.backend.name == "eu"
    assert us.breaker.trials_in_flight == 0 and us.in_flight == 0
    assert us.breaker.allow_request()  # its one trial slot is free for the next request


def test_a_half_open_backend_whose_trial_is_taken_is_skipped() -> None:
    world = half_open_world()
    us = world.backend("us")
    first = world.planner().next()
    assert first is not None and first.backend is us and us.breaker.trials_in_flight == 1
    second = world.planner().next()
    assert second is not None and second.backend.name == "eu"
    AttemptPlanner.unpick(first)  # no attempt went: the trial and the slot come back
    assert us.breaker.trials_in_flight == 0 and us.in_flight == 0


def test_a_pinned_call_goes_only_to_its_backend() -> None:
    world = World()
    eu = world.backend("eu")
    provider = world.runtime.providers["anthropic"]
    planner = world.planner(pinned=(provider, eu))
    pick = sent(planner)
    assert pick.backend is eu  # though us has three times its weight
    assert planner.next() is None  # no failover away from where the object lives
    trip_config = base_config()
    trip_config["providers"][0]["breaker"] = {"failures": 1, "window": 1}
    closed = World(trip_config)
    closed_eu = closed.backend("eu")
    trip(closed_eu)
    blocked = closed.planner(pinned=(closed.runtime.providers["anthropic"], closed_eu))
    assert blocked.next() is None


def test_a_pinned_backend_of_a_provider_off_the_route_is_still_reached() -> None:
    world = World(config())
    bk = world.backend("bk")
    planner = world.planner(pinned=(world.runtime.providers["backup"], bk))
    pick = sent(planner)
    assert pick.backend is bk and pick.target.provider.name == "backup"
    assert pick.target.model is None and not pick.target.translated


def test_a_route_whose_targets_cannot_serve_the_endpoint_is_a_404() -> None:
    built = base_config()
    built["routes"].insert(0, {"api": "anthropic", "models": ["smart"],
                               "targets": [{"provider": "anthropic", "model": "claude-real"}]})
    world = World(built)
    call = world.call({"model": "smart"})
    with pytest.raises(Refusal) as caught:
        world.planner(endpoint="models.item", call=call)
    assert caught.value.status == 404
    assert "models.item requests for 'smart' cannot be served" in caught.value.message


# -- when nothing can be picked --------------------------------------------------------------


def test_a_request_no_target_can_translate_is_untranslatable() -> None:
    built = base_config()
    built["routes"][0] = {"api": "anthropic", "models": ["claude-*"],
                          "targets": [{"provider": "openai"}]}
    world = World(built)
    planner = world.planner({**MESSAGE, "max_tokens": "lots"})
    assert planner.next() is None
    found = planner.untranslatable()
    assert found is not None
    assert (found.status, found.outcome) == (400, Outcome.UNTRANSLATABLE)
    assert "max_tokens must be an integer" in found.message


def test_a_target_that_can_take_the_request_makes_it_translatable() -> None:
    built = base_config()
    built["routes"][0] = {"api": "anthropic", "models": ["claude-*"],
                          "targets": [{"provider": "openai"}, {"provider": "anthropic"}]}
    world = World(built)
    planner = world.planner({**MESSAGE, "max_tokens": "lots"})
    pick = planner.next()
    assert pick is not None and pick.target.provider.name == "anthropic"
    assert planner.untranslatable() is None
    assert planner.translation_error is not None  # kept, for when it is the only one


def test_no_backend_says_when_one_may_be_back() -> None:
    built = base_config()
    built["providers"][0]["breaker"] = {"failures": 1, "window": 1, "cooldown": 5}
    world = World(built)
    us, eu = world.backend("us"), world.backend("eu")
    trip(us)
    eu.keys.cool_down(eu.keys.keys[0], 12, "rate_limited")
    planner = world.planner()
    assert planner.next() is None and planner.capacity_blocked() == []
    found = planner.no_backend()
    assert (found.status, found.outcome) == (503, Outcome.NO_BACKEND)
    assert found.retry_after == 5.0  # us reopens first
    assert "provider 'anthropic'" in found.message
    world.clock.advance(4.5)
    assert planner.unavailable_for() == 1.0  # never less than a second


def test_a_backend_at_its_cap_that_could_serve_is_capacity_blocked() -> None:
    built = base_config()
    built["providers"][1]["backends"][0]["max_concurrent"] = 1
    built["providers"][1]["breaker"] = {"failures": 1, "window": 1}
    world = World(built)
    main = world.backend("main")
    planner = world.planner({"model": "gpt-4o"}, api="openai", endpoint="chat.completions")
    held = planner.next()
    assert held is not None and held.backend is main
    assert planner.next() is None and planner.capacity_blocked() == [main]
    trip(main)  # no free slot would help an open breaker
    assert planner.capacity_blocked() == []


# -- retries ---------------------------------------------------------------------------------


def test_a_retry_goes_elsewhere_and_is_counted_as_retry_and_failover() -> None:
    world = World()
    planner = world.planner()
    first = sent(planner)
    retry = planner.retry("status_529", 1, first.backend)
    assert retry is not None and retry.backend.name == "eu" and retry.backend.in_flight == 1
    assert world.sample("relayd_upstream_retries_total", provider="anthropic",
                        reason="status_529") == 1
    assert world.sample("relayd_failovers_total", provider="anthropic", reason="status_529") == 1


def test_a_retry_on_the_same_backend_is_no_failover() -> None:
    built = base_config()
    built["routes"][1] = {"api": "openai", "targets": [
        {"provider": "openai", "model": "gpt-a"}, {"provider": "openai", "model": "gpt-b"}]}
    world = World(built)
    planner = world.planner({"model": "gpt-4o"}, api="openai", endpoint="chat.completions")
    first = sent(planner)
    retry = planner.retry("timeout", 1, first.backend)
    assert retry is not None and retry.backend is first.backend and retry.target.model == "gpt-b"
    assert world.sample("relayd_upstream_retries_total", provider="openai", reason="timeout") == 1
    assert world.sample("relayd_failovers_total", provider="openai", reason="timeout") == 0


def test_no_retry_past_max_attempts() -> None:
    world = World(base_config(failover={"max_attempts": 2}))
    planner = world.planner()
    first = sent(planner)
    assert planner.retry("timeout", 2, first.backend) is None
    assert refused(world, "anthropic", "attempts") == 1
    assert world.backend("eu").in_flight == 0  # nothing picked


def test_a_single_attempt_configuration_counts_no_refusal() -> None:
    world = World(base_config(failover={"max_attempts": 1}))
    planner = world.planner()
    first = sent(planner)
    assert planner.retry("timeout", 1, first.backend) is None
    assert refused(world, "anthropic", "attempts") == 0


def test_no_retry_of_a_body_too_large_to_replay() -> None:
    world = World(base_config(failover={"max_replay_bytes": 10}))
    planner = world.planner()
    first = sent(planner)
    assert planner.retry("timeout", 1, first.backend) is None
    assert refused(world, "anthropic", "body_too_large") == 1


def test_no_retry_without_another_backend() -> None:
    world = World()
    planner = world.planner()
    sent(planner)
    last = sent(planner)
    assert planner.retry("timeout", 2, last.backend) is None
    assert refused(world, "anthropic", "no_backend") == 1


def test_no_retry_past_the_retry_budget_and_the_pick_is_given_back() -> None:
    world = World(base_config(failover={"retry_budget_ratio": 0,
                                        "retry_budget_min_per_second": 0}))
    planner = world.planner()
    first = sent(planner)
    assert planner.retry("timeout", 1, first.backend) is None
    assert refused(world, "anthropic", "budget") == 1
    assert world.backend("eu").in_flight == 0
    assert world.runtime.retry_budget.refused == 1


def test_a_sticky_call_is_never_retried_nor_counted() -> None:
    world = World()
    call = ClientCall(world.client(), b"{}")
    route = world.runtime.router.routes[0]
    planner = world.planner(endpoint="messages.batches", call=call, route=route)
    first = sent(planner)
    assert first.backend.name == "us"  # the provider's first backend, always
    assert planner.retry("timeout", 1, first.backend) is None
    for reason in ("attempts", "body_too_large", "no_backend", "budget"):
        assert refused(world, "anthropic", reason) == 0


# -- around a used-up quota, and giving up ---------------------------------------------------


def test_a_used_up_key_is_cooled_and_another_key_or_backend_picked() -> None:
    built = base_config()
    built["providers"][0]["backends"][0] = {
        "name": "us", "url": "http://up-us.test", "weight": 3,
        "api_keys": [{"api_key": "sk-1"}, {"api_key": "sk-2"}]}
    world = World(built)
    us = world.backend("us")
    planner = world.planner()
    pick = planner.next()
    assert pick is not None and pick.key is us.keys.keys[0]
    planner.unpick(pick)  # as the exchange does before asking around the quota
    second = planner.around_quota(pick, 30.0, 0)
    first_key = us.keys.keys[0]
    assert first_key.cooldown_reason == "quota"
    assert first_key.cooldown_until == world.clock.seconds() + 30
    assert second.backend is us and second.key is us.keys.keys[1]
    planner.unpick(second)
    third = planner.around_quota(second, 0.2, 0)
    assert us.keys.keys[1].cooldown_until == world.clock.seconds() + 1  # at least a second
    assert third.backend.name == "eu"
    assert world.sample("relayd_upstream_quota_skips_total", provider="anthropic",
                        backend="us") == 2


def test_every_quota_used_up_is_a_429_after_the_longest_wait() -> None:
    world = World()
    planner = world.planner({"model": "gpt-4o"}, api="openai", endpoint="chat.completions")
    pick = planner.next()
    assert pick is not None
    planner.unpick(pick)
    with pytest.raises(Refusal) as caught:
        planner.around_quota(pick, 30.0, 2)
    found = caught.value
    assert (found.status, found.outcome, found.retry_after) == (429, Outcome.UPSTREAM_QUOTA, 30)
    assert dict(found.headers) == {b"x-should-retry": b"false", b"x-relayd-attempts": b"2"}
    assert world.sample("relayd_upstream_quota_skips_total", provider="openai",
                        backend="main") == 1


def test_a_quota_refusal_before_any_attempt_has_no_attempt_headers() -> None:
    world = World()
    planner = world.planner({"model": "gpt-4o"}, api="openai", endpoint="chat.completions")
    pick = planner.next()
    assert pick is not None
    planner.unpick(pick)
    with pytest.raises(Refusal) as caught:
        planner.around_quota(pick, None, 0)
    assert tuple(caught.value.headers) == ()


def gave_up(planner: AttemptPlanner, result: str, attempts: int, answered: bool) -> Refusal:
    return planner.gave_up(result, "the message", attempts, answered)


def test_giving_up_after_a_timeout_is_a_504_and_otherwise_a_502() -> None:
    planner = World().planner()
    timeout = gave_up(planner, "timeout", 1, False)
    assert (timeout.status, timeout.outcome) == (504, Outcome.UPSTREAM_TIMEOUT)
    assert timeout.retry_after == 1.0 and tuple(timeout.headers) == ()
    assert timeout.message == "upstream failed after 1 attempt(s); last: the message"
    other = gave_up(planner, "connect_error", 3, False)
    assert (other.status, other.outcome) == (502, Outcome.UPSTREAM_ERROR)
    assert dict(other.headers) == {b"x-should-retry": b"false", b"x-relayd-attempts": b"3"}


def test_giving_up_on_an_answer_that_cannot_be_relayed_is_a_502_without_retry_after() -> None:
    found = gave_up(World().planner(), "bad_headers", 2, True)
    assert (found.status, found.outcome, found.retry_after) == (502, Outcome.UPSTREAM_ERROR, None)
    assert found.message == "the upstream's answer could not be relayed: its the message"


def test_the_route_chosen_is_the_planners() -> None:
    world = World()
    route: Route = world.route("anthropic", "claude-x")
    planner = world.planner(route=route)
    assert planner.route is route and planner.provider_name == "anthropic"
    assert [t.provider.name for t in planner.targets] == ["anthropic"]


# -- a pinned call waits and is refused for its own backend only ------------------------------


def pinned_world() -> tuple[World, AttemptPlanner]:
    """A call pinned to eu, whose breaker is open for 30 s; us is at its cap."""
    built = base_config()
    built["providers"][0]["breaker"] = {"failures": 1, "window": 1, "cooldown": 30}
    built["providers"][0]["backends"][0]["max_concurrent"] = 1
    world = World(built)
    us, eu = world.backend("us"), world.backend("eu")
    us.acquire()  # another request holds us's only slot
    trip(eu)
    planner = world.planner(pinned=(world.runtime.providers["anthropic"], eu))
    assert planner.next() is None
    return world, planner


def test_a_pinned_call_does_not_wait_for_a_slot_it_could_never_use() -> None:
    """Waiting on us would end in a no-backend 503 anyway, queue_timeout seconds later."""
    _, planner = pinned_world()
    assert planner.capacity_blocked() == []


def test_a_pinned_call_waits_for_its_own_backends_slot() -> None:
    built = base_config()
    built["providers"][0]["backends"][1]["max_concurrent"] = 1
    world = World(built)
    eu = world.backend("eu")
    eu.acquire()
    planner = world.planner(pinned=(world.runtime.providers["anthropic"], eu))
    assert planner.next() is None and planner.capacity_blocked() == [eu]


def test_a_pinned_calls_retry_after_is_its_own_backends() -> None:
    _, planner = pinned_world()
    found = planner.no_backend()
    assert found.retry_after == 30.0  # us being fine does not bring eu back sooner
