"""Upstream objects (Message Batches, stored Responses) are kept to the client that
created them, and calls about them go to the backend that holds them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, OTHER_KEY, Harness, base_config, json_reply
from twisted.internet.defer import fail
from twisted.web.server import NOT_DONE_YET, Request

from relayd.limits.redis import StoreUnavailableError

UPSTREAM_RESULTS = "https://api.anthropic.com/v1/messages/batches/{id}/results"
BATCH = {"requests": [{"custom_id": "a", "params": {"model": "claude-x", "max_tokens": 5,
                                                   "messages": []}}]}


def batch_object(batch_id: str) -> dict[str, Any]:
    return {"id": batch_id, "type": "message_batch", "processing_status": "ended",
            "results_url": UPSTREAM_RESULTS.format(id=batch_id)}


class Batches:
    """A fake Batches API: creates msgbatch_0, _1, ...; lists what it was told to."""

    def __init__(self) -> None:
        self.made = 0
        self.listing: list[str] = []

    def __call__(self, request: Request, body: bytes) -> Any:
        path = request.path.decode()
        if request.method == b"POST" and path == "/v1/messages/batches":
            batch_id = f"msgbatch_{self.made}"
            self.made += 1
            return json_reply(request, batch_object(batch_id))
        if path == "/v1/messages/batches":
            data = [batch_object(i) for i in self.listing]
            return json_reply(request, {"data": data, "has_more": False,
                                        "first_id": self.listing[0], "last_id": self.listing[-1]})
        if path.endswith("/results"):
            request.setHeader(b"content-type", b"application/binary")
            return b'{"custom_id":"a","result":{"type":"succeeded"}}\n'
        return json_reply(request, batch_object(path.split("/")[4]))


@pytest.fixture
def h() -> Iterator[Harness]:
    config = base_config()
    config["clients"][1].pop("models")  # team-b may use every model too
    harness = Harness(config)
    fake = Batches()
    for name in ("us", "eu"):
        harness.upstreams[name].handler = fake
    harness.fake = fake  # type: ignore[attr-defined]
    yield harness
    harness.close()


def create(h: Harness, key: str = CLIENT_KEY) -> dict[str, Any]:
    status, _, body = h.call("POST", "/v1/messages/batches", BATCH, key=key)
    assert status == 200
    created: dict[str, Any] = json.loads(body)
    return created


def seen(h: Harness) -> list[bytes]:
    return [r.path for name in ("us", "eu") for r in h.upstreams[name].seen]


def test_a_batch_is_its_creators_alone(h: Harness) -> None:
    """The campaign: client B read client A's batch results by id."""
    batch = create(h)
    before = len(seen(h))
    for method, path in [("GET", "/v1/messages/batches/{id}"),
                         ("GET", "/v1/messages/batches/{id}/results"),
                         ("POST", "/v1/messages/batches/{id}/cancel"),
                         ("DELETE", "/v1/messages/batches/{id}")]:
        status, headers, body = h.call(method, path.format(id=batch["id"]), key=OTHER_KEY)
        assert status == 404, path
        error = json.loads(body)["error"]
        assert error["type"] == "not_found_error" and batch["id"] in error["message"]
        assert headers["x-should-retry"] == ["false"]
    assert len(seen(h)) == before  # nothing of it went upstream
    status, _, body = h.call("GET", f"/v1/messages/batches/{batch['id']}/results")
    assert status == 200 and b"succeeded" in body


def test_an_unknown_batch_is_a_404_for_everyone(h: Harness) -> None:
    status, _, _ = h.call("GET", "/v1/messages/batches/msgbatch_never")
    assert status == 404 and not seen(h)


def test_results_url_points_at_relayd(h: Harness) -> None:
    """The campaign: results_url named the upstream host, where the SDK fetched it with
    the relay key."""
    batch = create(h)
    assert batch["results_url"] == f"http://relay.test/v1/messages/batches/{batch['id']}/results"
    _, _, body = h.call("GET", f"/v1/messages/batches/{batch['id']}")
    assert json.loads(body)["results_url"].startswith("http://relay.test/")


def test_calls_about_a_batch_go_to_the_backend_that_holds_it(h: Harness) -> None:
    created = [create(h) for _ in range(4)]  # sticky: all on the primary backend, us
    h.upstreams["eu"].handler = lambda request, body: json_reply(request, {}, 500)
    for batch in created:
        assert h.call("GET", f"/v1/messages/batches/{batch['id']}")[0] == 200
    assert not h.upstreams["eu"].seen


def test_a_listing_shows_only_the_callers_batches(h: Harness) -> None:
    """The campaign: listing showed every batch of the upstream account."""
    mine, theirs = create(h), create(h, key=OTHER_KEY)
    h.fake.listing = [theirs["id"], mine["id"], "msgbatch_unknown"]  # type: ignore[attr-defined]
    status, _, body = h.call("GET", "/v1/messages/batches")
    assert status == 200
    listing = json.loads(body)
    assert [b["id"] for b in listing["data"]] == [mine["id"]]
    assert listing["first_id"] == listing["last_id"] == mine["id"]
    assert listing["data"][0]["results_url"].startswith("http://relay.test/")


def test_an_object_store_that_cannot_answer_is_a_503(h: Harness) -> None:
    batch = create(h)
    h.runtime.store.owners = lambda kind, ids: fail(  # type: ignore[method-assign,assignment]
        StoreUnavailableError("down")
    )
    status, headers, _ = h.call("GET", f"/v1/messages/batches/{batch['id']}")
    assert status == 503 and headers["retry-after"] == ["1"]


def test_a_batch_on_a_backend_removed_by_a_reload_is_a_404_naming_it(h: Harness) -> None:
    h.own("anthropic.batch", "msgbatch_old", "us")
    config = base_config()
    config["providers"][0]["backends"] = config["providers"][0]["backends"][1:]  # eu only
    from relayd.config import parse_config
    from relayd.runtime import RelayRuntime
    from relayd.runtime_diff import plan_reload

    parsed = parse_config(config)
    h.runtime = RelayRuntime(parsed, h.clock, carry=plan_reload(h.runtime, parsed),
                             agent_factory=lambda b: h.agents[0])
    status, _, body = h.call("GET", "/v1/messages/batches/msgbatch_old")
    assert status == 404 and b"backend 'us'" in body


# -- OpenAI stored responses ------------------------------------------------------------------


class Responses:
    def __init__(self) -> None:
        self.made = 0

    def __call__(self, request: Request, body: bytes) -> Any:
        if request.method == b"POST" and request.path == b"/v1/responses":
            self.made += 1
            response_id = f"resp_{self.made}"
            if json.loads(body).get("stream"):
                request.setHeader(b"content-type", b"text/event-stream")
                created = {"type": "response.created",
                           "response": {"id": response_id, "status": "in_progress"}}
                done = {"type": "response.completed",
                        "response": {"id": response_id, "status": "completed"}}
                request.write(b"event: response.created\ndata: " + json.dumps(created).encode()
                              + b"\n\nevent: response.completed\ndata: "
                              + json.dumps(done).encode() + b"\n\n")
                request.finish()
                return NOT_DONE_YET
            return json_reply(request, {"id": response_id, "object": "response"})
        return json_reply(request, {"id": request.path.decode().split("/")[3]})


@pytest.fixture
def responses() -> Iterator[Harness]:
    config = base_config()
    config["clients"][1].pop("models")
    harness = Harness(config)
    harness.upstreams["main"].handler = Responses()
    yield harness
    harness.close()


def respond(h: Harness, key: str = CLIENT_KEY, **extra: Any) -> tuple[int, bytes]:
    status, _, body = h.call("POST", "/v1/responses", {"model": "gpt-x", "input": "hi", **extra},
                             api="openai", key=key)
    return status, body


@pytest.mark.parametrize("stream", [False, True])
def test_a_stored_response_is_its_creators_alone(responses: Harness, stream: bool) -> None:
    status, _ = respond(responses, stream=stream)
    assert status == 200
    for method, path in [("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
                         ("GET", "/v1/responses/resp_1/input_items")]:
        assert responses.call(method, path, api="openai", key=OTHER_KEY)[0] == 404
    assert responses.call("GET", "/v1/responses/resp_1", api="openai")[0] == 200


def test_previous_response_id_of_another_client_is_refused(responses: Harness) -> None:
    """The same rule for continuing a conversation by id."""
    respond(responses)
    status, body = respond(responses, key=OTHER_KEY, previous_response_id="resp_1")
    assert status == 404 and b"resp_1" in body
    assert len(responses.upstreams["main"].seen) == 1
    status, _ = respond(responses, previous_response_id="resp_1")
    assert status == 200
    status, _ = respond(responses, previous_response_id=["not", "an", "id"])
    assert status == 404
