"""What real clients ran into: final errors that SDKs retried for minutes, batches that the
shipped example config could not route, access lines that did not say what was asked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from relay_harness import CLIENT_KEY, OTHER_KEY, Harness, base_config, json_reply
from twisted.web.server import Request

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": []}
DEMO_KEY = "sk-relay-demo"


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "key", "status"),
    [
        ("POST", "/v1/messages", MESSAGE, None, 401),
        ("POST", "/v1/messages", MESSAGE, "sk-wrong", 401),
        ("POST", "/v1/messages", {**MESSAGE, "model": "gpt-4o"}, OTHER_KEY, 403),
        ("POST", "/v1/nowhere", MESSAGE, CLIENT_KEY, 404),
        ("POST", "/v1/messages", {**MESSAGE, "model": "gemini"}, CLIENT_KEY, 404),
        ("DELETE", "/v1/messages", None, CLIENT_KEY, 405),
        ("POST", "/v1/messages", "not an object", CLIENT_KEY, 400),
    ],
)
def test_relayd_s_own_final_errors_tell_sdks_not_to_retry(
    harness: Harness, method: str, path: str, body: object, key: str | None, status: int
) -> None:
    got, headers, _ = harness.call(method, path, body, key=key)
    assert got == status
    assert headers["x-should-retry"] == ["false"]


def test_an_upstream_error_passed_through_is_left_to_the_sdk(harness: Harness) -> None:
    def bad_request(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"type": "error", "error": {"type": "x", "message": "m"}},
                          400)

    harness.upstreams["us"].handler = harness.upstreams["eu"].handler = bad_request
    status, headers, _ = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 400 and "x-should-retry" not in headers


def test_a_rate_limited_client_may_retry() -> None:
    config = base_config()
    config["clients"][0]["limits"] = {"requests_per_minute": 1}
    h = Harness(config)
    try:
        assert h.call("POST", "/v1/messages", MESSAGE)[0] == 200
        status, headers, _ = h.call("POST", "/v1/messages", MESSAGE)
        assert status == 429 and "x-should-retry" not in headers and headers["retry-after"]
    finally:
        h.close()


def test_the_access_line_of_an_unknown_path_names_method_and_path(harness: Harness) -> None:
    harness.call("PUT", "/v1/secret/../admin?key=sk-oops", None)
    line = harness.logs.access()[-1]
    assert (line["method"], line["path"], line["status"]) == ("PUT", "/v1/secret/../admin", 404)
    assert "sk-oops" not in json.dumps(line)  # the query is not logged


# -- Message Batches with the shipped example configuration ---------------------------------


@pytest.fixture
def example() -> Iterator[Harness]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "etc" / "relayd.yaml").read_text())
    for provider in config["providers"]:  # one fake upstream per backend name
        provider["backends"][0]["name"] = provider["name"] + "-fake"
    h = Harness(config)
    yield h
    h.close()


def batch(*models: str) -> dict[str, Any]:
    return {"requests": [
        {"custom_id": f"r{i}", "params": {"model": model, "max_tokens": 5, "messages": []}}
        for i, model in enumerate(models)
    ]}


def test_example_config_routes_a_batch_by_the_models_inside_it(example: Harness) -> None:
    """The shipped config's first Anthropic route is `smart`, which renames the model: a
    body without a top-level model used to land there and get a 404."""
    upstream = example.upstreams["anthropic-fake"]
    upstream.handler = lambda request, body: json_reply(request, {"id": "msgbatch_1"})
    status, _, body = example.call(
        "POST", "/v1/messages/batches", batch("claude-sonnet-4-5", "claude-haiku-4-5"),
        key=DEMO_KEY,
    )
    assert status == 200 and json.loads(body)["id"] == "msgbatch_1"
    (sent,) = upstream.seen
    assert sent.path == b"/v1/messages/batches"
    assert json.loads(sent.body) == batch("claude-sonnet-4-5", "claude-haiku-4-5")  # unrenamed


@pytest.mark.parametrize(
    "path",
    ["/v1/messages/batches", "/v1/messages/batches/msgbatch_1",
     "/v1/messages/batches/msgbatch_1/results"],
)
def test_example_config_serves_batch_calls_without_a_model(example: Harness, path: str) -> None:
    upstream = example.upstreams["anthropic-fake"]
    upstream.handler = lambda request, body: json_reply(request, {"id": "msgbatch_1"})
    example.own("anthropic.batch", "msgbatch_1", "anthropic-fake", client="demo")
    status, _, _ = example.call("GET", path, None, key=DEMO_KEY)
    assert status == 200
    assert [r.path for r in upstream.seen] == [path.encode()]


def test_a_batch_for_a_renaming_route_names_that_route(example: Harness) -> None:
    status, headers, body = example.call(
        "POST", "/v1/messages/batches", batch("smart"), key=DEMO_KEY
    )
    assert status == 404 and headers["x-should-retry"] == ["false"]
    message = json.loads(body)["error"]["message"]
    assert "routes[0] (models: smart)" in message and "'smart'" in message
    assert not example.upstreams["anthropic-fake"].seen


def test_a_batch_spread_over_two_routes_is_refused(example: Harness) -> None:
    status, _, body = example.call(
        "POST", "/v1/messages/batches", batch("claude-sonnet-4-5", "smart"), key=DEMO_KEY
    )
    assert status == 400
    message = json.loads(body)["error"]["message"]
    assert "'claude-sonnet-4-5' to routes[2]" in message and "'smart' to routes[0]" in message
