"""The object keeper on its own (relayd.http.objects.ObjectKeeper): which object a call
addresses, where it lives (for its creator only), and the answers it rewrites."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from stage_fakes import World, endpoint_of, make_request
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from relayd.errors import Outcome, Refusal
from relayd.http.objects import ObjectKeeper
from relayd.limits import MemoryStore, ObjectRecord
from relayd.limits.redis import StoreUnavailableError

BATCH = "anthropic.batch"
BATCHES = endpoint_of("anthropic", "messages.batches")
BATCH_ITEM = endpoint_of("anthropic", "messages.batches.item")
RESPONSES = endpoint_of("openai", "responses")


class DownStore(MemoryStore):
    """A store whose object records cannot be read now."""

    def owners(self, kind: str, object_ids: Sequence[str]) -> Deferred[list[ObjectRecord | None]]:
        return fail(StoreUnavailableError("redis is down"))


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert len(results) == 1, "the memory store answers at once"
    return results[0]


def refusal_of(d: Deferred[Any]) -> Refusal:
    result = outcome(d)
    assert isinstance(result, Failure) and isinstance(result.value, Refusal), result
    return result.value


def keeper(world: World, role: str, endpoint: Any = BATCH_ITEM,
           client: str = "team-a") -> tuple[ObjectKeeper, MemoryStore]:
    store = world.runtime.store
    assert isinstance(store, MemoryStore)
    return ObjectKeeper(store, endpoint, role, client), store


# -- the object a call addresses -------------------------------------------------------------


def test_an_item_call_addresses_the_id_in_its_path() -> None:
    item, _ = keeper(World(), "item")
    assert item.reference(b"/v1/messages/batches/msgbatch_01", None) == "msgbatch_01"
    assert item.reference(b"/v1/messages/batches", None) is None


def test_a_create_call_addresses_the_object_its_reference_field_names() -> None:
    create, _ = keeper(World(), "create", RESPONSES)
    assert create.reference(b"/v1/responses", {"previous_response_id": "resp_1"}) == "resp_1"
    assert create.reference(b"/v1/responses", {"input": "hi"}) is None
    assert create.reference(b"/v1/responses", None) is None
    # A reference that is no string addresses nothing anyone owns (a 404), never "no object".
    assert create.reference(b"/v1/responses", {"previous_response_id": 7}) == ""


def test_a_create_call_without_a_reference_field_addresses_nothing() -> None:
    create, _ = keeper(World(), "create", BATCHES)
    assert create.reference(b"/v1/messages/batches", {"previous_response_id": "x"}) is None


# -- where it lives --------------------------------------------------------------------------


def test_the_creators_object_is_located_on_its_backend() -> None:
    world = World()
    item, store = keeper(world, "item")
    store.claim_now(BATCH, "b1", ObjectRecord("team-a", "anthropic", "eu"))
    provider, backend = outcome(item.locate("b1", world.runtime))
    assert provider is world.runtime.providers["anthropic"] and backend is world.backend("eu")


def test_another_clients_object_is_the_same_404_as_none_at_all() -> None:
    world = World()
    item, store = keeper(world, "item")
    store.claim_now(BATCH, "theirs", ObjectRecord("team-b", "anthropic", "us"))
    foreign = refusal_of(item.locate("theirs", world.runtime))
    unknown = refusal_of(item.locate("nothing", world.runtime))
    assert foreign.status == unknown.status == 404
    assert foreign.message == "no such batch: 'theirs'"
    assert unknown.message == "no such batch: 'nothing'"


def test_an_object_on_a_backend_the_configuration_lost_is_a_404_naming_it() -> None:
    world = World()
    item, store = keeper(world, "item")
    store.claim_now(BATCH, "b1", ObjectRecord("team-a", "anthropic", "ap"))
    found = refusal_of(item.locate("b1", world.runtime))
    assert found.status == 404
    assert "backend 'ap' of provider 'anthropic'" in found.message


def test_an_unreadable_store_is_a_503_worth_retrying() -> None:
    world = World()
    item = ObjectKeeper(DownStore(world.clock), BATCH_ITEM, "item", "team-a")
    found = refusal_of(item.locate("b1", world.runtime))
    assert (found.status, found.outcome, found.retry_after) == (
        503, Outcome.STORE_UNAVAILABLE, 1.0)


# -- recording created objects ---------------------------------------------------------------


def test_a_streamed_create_records_its_object_once() -> None:
    world = World()
    create, store = keeper(world, "create", RESPONSES)
    create.claim_streamed("resp_1", world.backend("us"))
    create.claim_streamed("resp_2", world.backend("eu"))
    assert store.owners_now("openai.response", ["resp_1", "resp_2"]) == [
        ObjectRecord("team-a", "anthropic", "us"), None]


def test_only_a_create_call_records_a_streamed_object() -> None:
    world = World()
    item, store = keeper(world, "item", RESPONSES)
    item.claim_streamed("resp_1", world.backend("us"))
    assert store.owners_now("openai.response", ["resp_1"]) == [None]


# -- answers ---------------------------------------------------------------------------------


def answered(keeper_: ObjectKeeper, payload: object, world: World, *,
             host: bytes | None = b"relay.test:8443", secure: bool = False) -> Any:
    request = make_request(b"GET", b"/v1/messages/batches",
                           {b"host": host} if host is not None else {}, b"", secure=secure)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return outcome(keeper_.answer(body, world.backend("eu"), request))


def test_a_created_object_is_recorded_and_its_results_url_points_at_relayd() -> None:
    world = World()
    create, store = keeper(world, "create", BATCHES)
    body = answered(create, {"id": "msgbatch_9", "results_url": "https://api.up/x"}, world)
    assert json.loads(body)["results_url"] == (
        "http://relay.test:8443/v1/messages/batches/msgbatch_9/results")
    assert store.owners_now(BATCH, ["msgbatch_9"]) == [ObjectRecord("team-a", "anthropic", "eu")]


def test_a_listing_keeps_only_the_callers_objects_and_fixes_its_ends() -> None:
    world = World()
    listing, store = keeper(world, "list", BATCHES)
    store.claim_now(BATCH, "a", ObjectRecord("team-a", "anthropic", "us"))
    store.claim_now(BATCH, "b", ObjectRecord("team-b", "anthropic", "us"))
    store.claim_now(BATCH, "d", ObjectRecord("team-a", "anthropic", "us"))
    payload = {"data": [{"id": i, "results_url": "https://api.up/" + i} for i in "abcd"],
               "first_id": "a", "last_id": "d", "has_more": False}
    body = json.loads(answered(listing, payload, world, secure=True))
    assert [entry["id"] for entry in body["data"]] == ["a", "d"]
    assert (body["first_id"], body["last_id"], body["has_more"]) == ("a", "d", False)
    assert body["data"][1]["results_url"] == (
        "https://relay.test:8443/v1/messages/batches/d/results")


def test_a_listing_with_none_of_the_callers_objects_is_empty() -> None:
    world = World()
    listing, _ = keeper(world, "list", BATCHES)
    body = json.loads(answered(listing, {"data": [{"id": "x"}], "first_id": "x",
                                         "last_id": "x"}, world))
    assert body == {"data": [], "first_id": None, "last_id": None}


def test_a_listing_is_refused_while_the_store_cannot_say_who_owns_what() -> None:
    world = World()
    listing = ObjectKeeper(DownStore(world.clock), BATCHES, "list", "team-a")
    request = make_request(b"GET", b"/v1/messages/batches", {}, b"")
    found = refusal_of(listing.answer(b'{"data": [{"id": "a"}]}', world.backend("us"), request))
    assert (found.status, found.outcome) == (503, Outcome.STORE_UNAVAILABLE)


@pytest.mark.parametrize(("host", "base"), [
    (b"relay.test", "http://relay.test"),
    (b"[::1]:8080", "http://[::1]:8080"),
    (b"evil.test/steal?", "http://10.0.0.1:80"),  # not a host: the listener's own address
    (None, "http://10.0.0.1:80"),
])
def test_results_urls_name_relayd_as_the_client_reached_it(host: bytes | None, base: str) -> None:
    world = World()
    item, _ = keeper(world, "item")
    body = answered(item, {"id": "b1", "results_url": "https://api.up/b1"}, world, host=host)
    assert json.loads(body)["results_url"] == f"{base}/v1/messages/batches/b1/results"


def test_answers_that_are_no_json_object_pass_unchanged() -> None:
    world = World()
    item, _ = keeper(world, "item")
    assert answered(item, b"not json", world) == b"not json"
    assert answered(item, b"[1]", world) == b"[1]"


def test_objects_without_results_urls_keep_their_fields() -> None:
    world = World()
    create, store = keeper(world, "create", RESPONSES)
    body = answered(create, {"id": "resp_5", "results_url": "https://api.up/r"}, world)
    assert json.loads(body)["results_url"] == "https://api.up/r"
    assert store.owners_now("openai.response", ["resp_5"]) == [
        ObjectRecord("team-a", "anthropic", "eu")]
