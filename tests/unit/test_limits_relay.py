"""Client policies and upstream quotas on the request path (memory store, fake clock)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from relay_harness import CLIENT_KEY, Harness, base_config, json_reply
from twisted.web.server import NOT_DONE_YET, Request

from relayd.config import parse_config
from relayd.limits import MemoryStore
from relayd.runtime import RelayRuntime
from relayd.runtime_diff import plan_reload

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16,
           "messages": [{"role": "user", "content": "hi"}]}
# Reserved per MESSAGE: ceil(len("claude-sonnet-4-5" "user" "hi") / 4) + max_tokens = 6 + 16.
RESERVED = 22
ACTUAL = 7  # the fake upstream's default answer: 3 input + 4 output tokens
CHAT = {"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def limited(limits: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    config = base_config(**overrides)
    config["clients"][0]["limits"] = limits
    return config


def make(config: dict[str, Any]) -> Iterator[Harness]:
    harness = Harness(config)
    yield harness
    harness.close()


def store_of(harness: Harness) -> MemoryStore:
    store = harness.runtime.store
    assert isinstance(store, MemoryStore)
    return store


def test_requests_per_minute_refuses_in_the_callers_shape() -> None:
    harness = next(make(limited({"requests_per_minute": 3})))
    statuses = [harness.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(3)]
    status, headers, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert statuses == [200, 200, 200] and status == 429
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
    assert "3 requests per minute" in error["error"]["message"]
    assert headers["retry-after"] == ["60"]
    assert headers["x-relayd-limit"] == ["requests_per_minute"]
    assert headers["anthropic-ratelimit-requests-remaining"] == ["0"]
    assert len(harness.upstreams["us"].seen) + len(harness.upstreams["eu"].seen) == 3
    harness.clock.advance(60)
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    access = harness.logs.access()
    assert [e["outcome"] for e in access] == ["ok", "ok", "ok", "rate_limited", "ok"]


def test_openai_callers_get_openai_codes_and_headers() -> None:
    harness = next(make(limited({"requests_per_minute": 1})))
    status, headers, _ = harness.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == ["1"]
    assert headers["x-ratelimit-remaining-requests"] == ["0"]
    assert headers["x-ratelimit-reset-requests"] == ["1m0s"]
    status, headers, body = harness.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 429
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert json.loads(body)["error"]["type"] == "rate_limit_exceeded"


def test_success_replaces_upstream_rate_limit_headers_with_the_clients() -> None:
    harness = next(make(limited({"requests_per_minute": 5, "tokens_per_minute": 1000})))

    def answer(request: Request, body: bytes) -> bytes:
        request.setHeader(b"anthropic-ratelimit-requests-remaining", b"4999")
        request.setHeader(b"anthropic-ratelimit-tokens-limit", b"800000")
        return json_reply(request, {"usage": {"input_tokens": 3, "output_tokens": 4}})

    for upstream in harness.upstreams.values():
        upstream.handler = answer
    harness.clock.advance(0.5)
    status, headers, _ = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 200
    assert headers["anthropic-ratelimit-requests-limit"] == ["5"]
    assert headers["anthropic-ratelimit-requests-remaining"] == ["4"]
    assert headers["anthropic-ratelimit-tokens-limit"] == ["1000"]
    assert headers["anthropic-ratelimit-tokens-remaining"] == [str(1000 - RESERVED)]
    assert headers["anthropic-ratelimit-requests-reset"] == ["1970-01-01T00:01:00Z"]


def test_unlimited_clients_see_the_upstream_headers_untouched() -> None:
    harness = next(make(base_config()))

    def answer(request: Request, body: bytes) -> bytes:
        request.setHeader(b"anthropic-ratelimit-requests-remaining", b"4999")
        return json_reply(request, {"usage": {"input_tokens": 3, "output_tokens": 4}})

    for upstream in harness.upstreams.values():
        upstream.handler = answer
    _, headers, _ = harness.call("POST", "/v1/messages", MESSAGE)
    assert headers["anthropic-ratelimit-requests-remaining"] == ["4999"]


def test_tokens_per_minute_reserves_then_settles_to_actual_usage() -> None:
    harness = next(make(limited({"tokens_per_minute": 50})))
    statuses = [harness.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(7)]
    # Request k fits while 7 * (k - 1) settled + 22 reserved <= 50: five of them.
    assert statuses == [200] * 5 + [429] * 2
    _, headers, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert headers["x-relayd-limit"] == ["tokens_per_minute"]
    assert f"reserves {RESERVED}" in json.loads(body)["error"]["message"]


def test_failed_upstream_answers_give_their_reservation_back() -> None:
    harness = next(make(limited({"tokens_per_minute": RESERVED})))
    for upstream in harness.upstreams.values():
        upstream.handler = lambda r, b: json_reply(
            r, {"type": "error", "error": {"type": "invalid_request_error"}}, 400
        )
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 400
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 400  # nothing was charged


def test_a_request_larger_than_the_limit_is_capped_at_the_limit() -> None:
    harness = next(make(limited({"tokens_per_minute": 10})))
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200  # reserves 10, uses 7
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 429


def test_day_budget_exhausted_is_a_distinct_error() -> None:
    harness = next(make(limited({"tokens_per_day": 30})))
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200  # 22 reserved, 7 used
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200  # 7 + 22 <= 30
    status, headers, body = harness.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert status == 429
    error = json.loads(body)["error"]
    assert error["code"] == error["type"] == "insufficient_quota"
    assert "token budget exhausted" in error["message"]
    assert headers["x-should-retry"] == ["false"]
    assert "retry-after" not in headers
    assert headers["x-relayd-limit"] == ["tokens_per_day"]
    assert headers["x-relayd-budget-reset"] == ["1970-01-02T00:00:00Z"]
    harness.clock.advance(86400)
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert harness.logs.access()[2]["outcome"] == "budget_exhausted"


def start(harness: Harness, body: dict[str, Any]) -> list[Any]:
    """Send a request without waiting for its answer; the list fills when it comes."""
    headers = {"anthropic-version": "2023-06-01", "x-api-key": CLIENT_KEY}
    results: list[Any] = []
    d = harness.client.request(
        "POST", "http://relay.test/v1/messages", headers=headers, data=json.dumps(body).encode()
    )
    d.addBoth(results.append)
    harness.client.flush()
    return results


def test_max_concurrent_counts_requests_in_flight() -> None:
    harness = next(make(limited({"max_concurrent": 1})))
    held: list[Request] = []

    def hold(request: Request, body: bytes) -> Any:
        held.append(request)
        return NOT_DONE_YET

    for upstream in harness.upstreams.values():
        upstream.handler = hold
    first = start(harness, MESSAGE)
    assert held and not first
    status, headers, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 429 and headers["x-relayd-limit"] == ["max_concurrent"]
    assert "1 concurrent requests" in json.loads(body)["error"]["message"]
    held[0].setHeader(b"content-type", b"application/json")
    held[0].write(b'{"usage":{"input_tokens":1,"output_tokens":1}}')
    held[0].finish()
    harness.flush()
    assert first and first[0].code == 200
    for upstream in harness.upstreams.values():
        upstream.handler = None
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_a_client_that_leaves_gives_back_its_slot() -> None:
    harness = next(make(limited({"max_concurrent": 1})))
    for upstream in harness.upstreams.values():
        upstream.handler = lambda r, b: NOT_DONE_YET
    start(harness, MESSAGE)
    (exchange,) = harness.resource.active
    exchange.abort()
    harness.client.flush()
    for upstream in harness.upstreams.values():
        upstream.handler = None
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200


def test_a_limited_request_is_settled_when_it_finishes() -> None:
    """Its slot and its tokens are settled at once (the client's next request may need
    them); only its count and access line wait for the answer to be sent."""
    harness = next(make(limited({"max_concurrent": 1, "tokens_per_minute": 1000})))
    first = start(harness, MESSAGE)
    assert first and first[0].code == 200
    assert harness.clock.calls and harness.logs.access() == []  # not reported yet
    assert store_of(harness).ledger.snapshot()["clients"]["team-a"]["output_tokens"] == 4
    assert start(harness, MESSAGE)[0].code == 200  # the slot is free already
    harness.turn()
    assert [line["status"] for line in harness.logs.access()] == [200, 200]


def upstream_limited(limits: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    config = base_config()
    backends = config["providers"][0]["backends"]
    del backends[0]["api_key"]
    backends[0]["api_keys"] = [{"api_key": k} for k in keys]
    backends[0]["limits"] = limits
    backends[1]["priority"] = 1  # eu only when us cannot take the request
    return config


def test_a_full_upstream_key_is_routed_around() -> None:
    harness = next(make(upstream_limited({"requests_per_minute": 1}, ["sk-a", "sk-b"])))
    for _ in range(3):
        assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    used = [r.headers[b"x-api-key"][0] for r in harness.upstreams["us"].seen]
    assert sorted(used) == [b"sk-a", b"sk-b"]  # one each: both keys are at their quota
    assert len(harness.upstreams["eu"].seen) == 1  # the third went to the next tier
    harness.clock.advance(60)
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert len(harness.upstreams["us"].seen) == 3


def test_every_quota_used_up_answers_429_with_retry_after() -> None:
    config = upstream_limited({"requests_per_minute": 2, "per": "backend"}, ["sk-a", "sk-b"])
    del config["providers"][0]["backends"][1]
    harness = next(make(config))
    assert [harness.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(2)] == [200, 200]
    status, headers, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 429
    assert "upstream quota" in json.loads(body)["error"]["message"]
    assert headers["retry-after"] == ["60"]
    assert len(harness.upstreams["us"].seen) == 2


def test_upstream_tokens_settle_per_attempt_and_client_counts_once() -> None:
    config = limited({"requests_per_minute": 2})
    backends = config["providers"][0]["backends"]
    backends[0]["limits"] = {"tokens_per_minute": 100}
    backends[1]["weight"] = 1
    harness = next(make(config))
    calls = {"us": 0}

    def overloaded_once(request: Request, body: bytes) -> bytes:
        calls["us"] += 1
        if calls["us"] == 1:
            return json_reply(request, {"type": "error", "error": {"type": "overloaded"}}, 529)
        return json_reply(request, {"usage": {"input_tokens": 3, "output_tokens": 4}})

    harness.upstreams["us"].handler = overloaded_once
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200  # us 529, then eu
    assert harness.logs.access()[0]["attempts"] == 2
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200  # client's 2nd request
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 429  # failover did not count
    # us's failed attempt gave its 22 tokens back: 100 - 7 (the 2nd request, served by us).
    windows = store_of(harness)._windows
    (key,) = [k for k in windows if k.endswith(":tpm")]
    assert sum(windows[key].values()) == ACTUAL


def test_usage_reaches_the_store() -> None:
    harness = next(make(base_config()))
    harness.call("POST", "/v1/messages", MESSAGE)
    harness.call("POST", "/v1/messages", MESSAGE, key="sk-wrong")
    snapshot = store_of(harness).ledger.snapshot()
    assert snapshot["clients"]["team-a"]["requests"] == 1
    assert snapshot["clients"]["team-a"]["output_tokens"] == 4


def test_limits_are_per_client() -> None:
    config = limited({"requests_per_minute": 1})
    harness = next(make(config))
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 429
    assert harness.call("POST", "/v1/messages", MESSAGE, key="sk-relay-team-b")[0] == 200


def test_a_reload_keeps_counters_unless_the_state_section_changes() -> None:
    harness = next(make(limited({"requests_per_minute": 2})))
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    first = harness.runtime
    config = parse_config(limited({"requests_per_minute": 2}))
    change = plan_reload(first, config)
    harness.runtime = RelayRuntime(config, harness.clock, carry=change)
    assert harness.runtime.store is first.store and change.replaced_store is None
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 429  # counted across reload
    kept = harness.runtime
    config = parse_config(limited({"requests_per_minute": 2}, state={"key_prefix": "other"}))
    change = plan_reload(kept, config)
    harness.runtime = RelayRuntime(config, harness.clock, carry=change)
    assert change.replaced_store is kept.store and harness.runtime.store is not kept.store
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200  # a fresh store
