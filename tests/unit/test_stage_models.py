"""The model catalog on its own (relayd.http.models.ModelCatalog): relayd's own answer for a
route's model aliases, and the model list merged from the providers' lists."""

from __future__ import annotations

import json
from typing import Any

import pytest
from relay_harness import OTHER_KEY, base_config
from stage_fakes import REQUEST_ID, FakeResponse, World
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from relayd.errors import Refusal
from relayd.http.models import ModelCatalog
from relayd.providers import PROVIDERS

ANTHROPIC = PROVIDERS["anthropic"]
CLIENT_HEADERS = Headers({b"anthropic-version": [b"2024-01-01"], b"x-secret": [b"no"]})


def catalog_world(**top: Any) -> World:
    built = base_config(**top)
    built["providers"].append({"name": "backup", "type": "anthropic", "backends": [
        {"name": "bk", "url": "http://up-bk.test", "api_key": "sk-up-bk"}]})
    built["routes"] = [
        {"api": "anthropic", "models": ["smart", "fast-*"],
         "targets": [{"provider": "anthropic", "model": "claude-real"}]},
        {"api": "anthropic", "models": ["claude-b*"], "provider": "backup"},
        {"api": "anthropic", "models": ["claude-*"], "provider": "anthropic"},
        {"api": "openai", "provider": "openai"},
    ]
    return World(built)


def catalog(world: World, key: str | None = None) -> ModelCatalog:
    client = world.client() if key is None else world.client(key)
    return ModelCatalog(world.runtime, ANTHROPIC, client, world.clock, REQUEST_ID)


def listing(*ids: str) -> bytes:
    return json.dumps({"data": [{"id": i, "type": "model"} for i in ids]}).encode()


def answer(world: World, backend: str, body: bytes, code: int = 200) -> None:
    response = FakeResponse(code)
    world.agents[backend].last.deferred.callback(response)
    if code == 200:
        response.deliver(body)


def ids(result: list[Any]) -> list[str]:
    assert len(result) == 1 and isinstance(result[0], bytes), result
    return [entry["id"] for entry in json.loads(result[0])["data"]]


# -- aliases ---------------------------------------------------------------------------------


def test_a_literal_model_name_that_a_route_renames_is_answered_by_relayd() -> None:
    world = catalog_world()
    route = world.route("anthropic", "smart")
    body = catalog(world).alias(route, "smart")
    assert body is not None
    assert json.loads(body) == {"type": "model", **ANTHROPIC.model_entry("smart")}


def test_names_a_route_keeps_or_only_matches_by_glob_are_asked_upstream() -> None:
    world = catalog_world()
    assert catalog(world).alias(world.route("anthropic", "fast-1"), "fast-1") is None
    assert catalog(world).alias(world.route("anthropic", "claude-x"), "claude-x") is None


# -- the merged list -------------------------------------------------------------------------


def test_the_list_merges_aliases_and_what_each_provider_serves_under_its_route() -> None:
    world = catalog_world()
    result: list[Any] = []
    catalog(world).model_list(CLIENT_HEADERS).addBoth(result.append)
    assert set(world.agents) >= {"us", "bk"}
    answer(world, "bk", listing("claude-b1", "claude-x"))
    answer(world, "us", listing("claude-x", "claude-b2", "claude-real", "gpt-4o", "smart"))
    # smart: the alias; claude-b1 from backup (its route); claude-x and claude-real from
    # anthropic (the claude-* route sends them there unrenamed); claude-b2 is routed to
    # backup, not to the provider that listed it; gpt-4o has no Anthropic route.
    assert ids(result) == ["smart", "claude-b1", "claude-x", "claude-real"]


def test_each_provider_is_asked_once_with_relayds_key_and_the_clients_version() -> None:
    world = catalog_world()
    catalog(world).model_list(CLIENT_HEADERS)
    calls = [c for agent in world.agents.values() for c in agent.calls]
    assert sorted(c.uri for c in calls) == [b"http://up-bk.test/v1/models?limit=1000",
                                            b"http://up-us.test/v1/models?limit=1000"]
    sent = world.agents["us"].last
    assert sent.method == b"GET"
    assert sent.headers.getRawHeaders(b"x-api-key") == [b"sk-up-us"]
    assert sent.headers.getRawHeaders(b"anthropic-version") == [b"2024-01-01"]
    assert not sent.headers.hasHeader(b"x-secret")


def test_a_fetch_holds_its_backends_slot_until_it_ends() -> None:
    world = catalog_world()
    catalog(world).model_list(CLIENT_HEADERS)
    us = world.backend("us")
    assert us.in_flight == 1
    answer(world, "us", listing())
    assert us.in_flight == 0
    world.agents["bk"].last.deferred.errback(Failure(ConnectionRefusedError()))
    assert world.backend("bk").in_flight == 0


def test_the_client_sees_only_the_models_it_may_use() -> None:
    world = catalog_world()
    result: list[Any] = []
    catalog(world, OTHER_KEY).model_list(CLIENT_HEADERS).addBoth(result.append)  # claude-*
    answer(world, "bk", listing("claude-b1"))
    answer(world, "us", listing("claude-x", "other"))
    assert ids(result) == ["claude-b1", "claude-x"]  # not the alias smart


def test_a_provider_that_fails_is_left_out() -> None:
    world = catalog_world()
    result: list[Any] = []
    catalog(world).model_list(CLIENT_HEADERS).addBoth(result.append)
    answer(world, "bk", b"", code=503)
    answer(world, "us", listing("claude-x"))
    assert ids(result) == ["smart", "claude-x"]


def test_a_provider_that_does_not_answer_in_time_is_left_out() -> None:
    world = catalog_world(timeouts={"first_byte": 10})
    result: list[Any] = []
    catalog(world).model_list(CLIENT_HEADERS).addBoth(result.append)
    answer(world, "bk", listing("claude-b1"))
    world.clock.advance(10)
    assert world.agents["us"].last.cancelled
    assert ids(result) == ["smart", "claude-b1"]


def only_anthropic_route(world_config: dict[str, Any]) -> World:
    world_config["routes"] = [{"api": "anthropic", "provider": "anthropic"}]
    return World(world_config)


def test_no_provider_answering_and_no_alias_is_a_502() -> None:
    world = only_anthropic_route(base_config())
    result: list[Any] = []
    catalog(world).model_list(CLIENT_HEADERS).addBoth(result.append)
    world.agents["us"].last.deferred.errback(Failure(ConnectionRefusedError()))
    assert len(result) == 1 and isinstance(result[0], Failure)
    refusal = result[0].value
    assert isinstance(refusal, Refusal) and refusal.status == 502
    assert refusal.message == "no provider answered the model list"


def test_no_backend_to_ask_and_no_alias_is_a_502_at_once() -> None:
    built = base_config()
    built["providers"][0]["breaker"] = {"failures": 1, "window": 1}
    world = only_anthropic_route(built)
    for name in ("us", "eu"):
        world.backend(name).breaker.record_failure("test")
    with pytest.raises(Refusal) as caught:
        catalog(world).model_list(CLIENT_HEADERS)
    assert caught.value.status == 502
    assert not world.agents["us"].calls and not world.agents["eu"].calls


def test_an_api_without_routes_has_no_model_list() -> None:
    built = base_config()
    built["routes"] = [{"api": "openai", "provider": "openai"}]
    world = World(built)
    with pytest.raises(Refusal) as caught:
        catalog(world).model_list(CLIENT_HEADERS)
    assert caught.value.status == 404


def test_cache_model_list_ttl_keeps_each_providers_list() -> None:
    world = catalog_world(cache={"model_list_ttl": 60})
    first: list[Any] = []
    catalog(world).model_list(CLIENT_HEADERS).addBoth(first.append)
    answer(world, "bk", listing("claude-b1"))
    answer(world, "us", listing("claude-x"))
    calls = sum(len(agent.calls) for agent in world.agents.values())
    again: list[Any] = []
    catalog(world, OTHER_KEY).model_list(CLIENT_HEADERS).addBoth(again.append)
    assert sum(len(agent.calls) for agent in world.agents.values()) == calls
    # The kept lists are the providers'; each client's own allowlist still applies.
    assert ids(first) == ["smart", "claude-b1", "claude-x"]
    assert ids(again) == ["claude-b1", "claude-x"]
    other_version = Headers({b"anthropic-version": [b"2023-06-01"]})
    catalog(world).model_list(other_version)
    assert sum(len(agent.calls) for agent in world.agents.values()) == calls + 2
    world.clock.advance(61)
    catalog(world).model_list(CLIENT_HEADERS)
    assert sum(len(agent.calls) for agent in world.agents.values()) == calls + 4


def test_model_lists_are_asked_every_time_by_default() -> None:
    world = catalog_world()
    catalog(world).model_list(CLIENT_HEADERS)
    answer(world, "bk", listing("claude-b1"))
    answer(world, "us", listing("claude-x"))
    catalog(world).model_list(CLIENT_HEADERS)
    assert sum(len(agent.calls) for agent in world.agents.values()) == 4
