"""Failover, breakers, key cooldowns and runtime reuse on reload, in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config, json_reply
from twisted.web.server import NOT_DONE_YET, Request

from relayd.config import parse_config
from relayd.runtime import RelayRuntime
from relayd.runtime_diff import plan_reload

MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": []}


def status_reply(status: int, retry_after: str | None = None) -> Any:
    def handler(request: Request, body: bytes) -> bytes:
        if retry_after is not None:
            request.setHeader(b"retry-after", retry_after.encode())
        return json_reply(request, {"type": "error", "error": {"type": "x", "message": "m"}},
                          status)
    return handler


def sse(events: list[bytes]) -> Any:
    def handler(request: Request, body: bytes) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        for event in events:
            request.write(event)
        request.finish()
        return NOT_DONE_YET
    return handler


START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
ERROR = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"hi"}}\n\n')
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def sample(h: Harness, name: str, labels: dict[str, str]) -> float:
    value = h.resource.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def backend(h: Harness, name: str) -> Any:
    return next(b for b in h.runtime.backends if b.name == name)


def test_529_fails_over_to_the_other_backend(harness: Harness) -> None:
    harness.upstreams["us"].handler = status_reply(529)
    status, headers, _ = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 200
    assert "x-should-retry" not in headers
    assert (len(harness.upstreams["us"].seen), len(harness.upstreams["eu"].seen)) == (1, 1)
    assert backend(harness, "us").breaker.failures_in_window == 1
    assert sample(harness, "relayd_failovers_total",
                  {"provider": "anthropic", "reason": "status_529"}) == 1
    assert harness.logs.access()[-1]["attempts"] == 2


def test_client_errors_pass_through_without_retry(harness: Harness) -> None:
    harness.upstreams["us"].handler = status_reply(400)
    status, _, _ = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 400
    assert not harness.upstreams["eu"].seen
    assert backend(harness, "us").breaker.failures_in_window == 0


def test_error_event_before_content_is_failed_over(harness: Harness) -> None:
    harness.upstreams["us"].handler = sse([START, ERROR])
    harness.upstreams["eu"].handler = sse([START, DELTA, STOP])
    status, _, body = harness.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    assert body == START + DELTA + STOP  # nothing of the failed attempt leaked
    assert harness.logs.access()[-1]["outcome"] == "ok"


def test_error_event_after_content_is_not_retried(harness: Harness) -> None:
    harness.upstreams["us"].handler = sse([START, DELTA, ERROR])
    status, _, body = harness.call("POST", "/v1/messages", dict(MESSAGE, stream=True))
    assert status == 200
    assert body == START + DELTA + ERROR
    assert not harness.upstreams["eu"].seen


def test_429_cools_the_key_down_and_is_not_a_breaker_failure(harness: Harness) -> None:
    harness.upstreams["us"].handler = status_reply(429, retry_after="30")
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    us = backend(harness, "us")
    assert us.breaker.failures_in_window == 0
    assert us.keys.keys[0].cooldown_reason == "rate_limited"
    for _ in range(4):
        assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 200
    assert len(harness.upstreams["us"].seen) == 1  # cooling down: no more traffic
    harness.clock.advance(31)
    harness.upstreams["us"].handler = None
    for _ in range(4):
        harness.call("POST", "/v1/messages", MESSAGE)
    assert len(harness.upstreams["us"].seen) > 1


def test_401s_in_a_row_bench_the_key_and_pass_through(harness: Harness) -> None:
    config = base_config(failover={"max_attempts": 1})
    config["providers"][0]["backends"][1]["weight"] = 3  # eu weighs as much as us
    h = Harness(config)
    try:
        h.upstreams["us"].handler = status_reply(401)
        key = backend(h, "us").keys.keys[0]
        statuses = [h.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(4)]
        assert statuses.count(401) == 2  # us twice (us, eu, us, eu), then it is benched
        assert key.cooldown_reason == "rejected" and key.rejections == 2
        levels = [getattr(e.get("log_level"), "name", None) for e in h.logs.events
                  if "upstream key" in str(e.get("log_format", ""))]
        assert levels == ["error"]
        for _ in range(3):
            assert h.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert len(h.upstreams["us"].seen) == 2
    finally:
        h.close()


def test_one_401_between_successes_does_not_bench_the_key() -> None:
    config = base_config(failover={"max_attempts": 1})
    config["providers"][0]["backends"] = config["providers"][0]["backends"][:1]
    h = Harness(config)
    try:
        answers = iter([401, 200, 401, 200, 401])

        def flaky(request: Any, body: bytes) -> bytes:
            status = next(answers)
            payload = {"id": "m"} if status == 200 else {
                "type": "error", "error": {"type": "authentication_error", "message": "m"}}
            return json_reply(request, payload, status)

        h.upstreams["us"].handler = flaky
        got = [h.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(5)]
        assert got == [401, 200, 401, 200, 401]
        key = backend(h, "us").keys.keys[0]
        assert key.cooldown_reason is None and key.rejections == 3
    finally:
        h.close()


def test_a_403_is_relayed_and_benches_nothing() -> None:
    """The campaign: one request-specific 403 (a model the account may not use) benched
    the shared key for 300 s, and with one key every client got 503."""
    h = Harness(base_config(failover={"max_attempts": 1}))
    try:
        def forbidden_for_opus(request: Any, body: bytes) -> bytes:
            if b"opus" in body:
                return json_reply(request, {"type": "error", "error": {
                    "type": "permission_error", "message": "no access to opus"}}, 403)
            return json_reply(request, {"id": "m"})

        for name in ("us", "eu"):
            h.upstreams[name].handler = forbidden_for_opus
        for _ in range(3):
            status, _, body = h.call("POST", "/v1/messages", {**MESSAGE, "model": "claude-opus"})
            assert status == 403 and b"no access to opus" in body
        assert all(k.cooldown_reason is None for b in h.runtime.backends for k in b.keys.keys)
        assert [h.call("POST", "/v1/messages", MESSAGE)[0] for _ in range(4)] == [200] * 4
    finally:
        h.close()


def test_no_retry_when_max_attempts_is_one() -> None:
    h = Harness(base_config(failover={"max_attempts": 1}))
    try:
        h.upstreams["us"].handler = status_reply(529)
        status, headers, _ = h.call("POST", "/v1/messages", MESSAGE)
        assert status == 529
        assert "x-should-retry" not in headers
        assert not h.upstreams["eu"].seen
    finally:
        h.close()


def test_retry_budget_refuses_retries() -> None:
    h = Harness(base_config(failover={"retry_budget_ratio": 0, "retry_budget_min_per_second": 0}))
    try:
        h.upstreams["us"].handler = status_reply(503)
        status, _, _ = h.call("POST", "/v1/messages", MESSAGE)
        assert status == 503
        assert not h.upstreams["eu"].seen
        assert sample(h, "relayd_retries_refused_total",
                      {"provider": "anthropic", "reason": "budget"}) == 1
    finally:
        h.close()


def test_large_bodies_are_not_replayed() -> None:
    h = Harness(base_config(failover={"max_replay_bytes": 100}))
    try:
        h.upstreams["us"].handler = status_reply(503)
        status, _, _ = h.call("POST", "/v1/messages", dict(MESSAGE, pad="x" * 200))
        assert status == 503
        assert not h.upstreams["eu"].seen
    finally:
        h.close()


def test_breaker_opens_then_half_opens_after_cooldown() -> None:
    config = base_config(breaker={"window": 4, "failures": 2, "cooldown": 10})
    h = Harness(config)
    try:
        h.upstreams["us"].handler = status_reply(500)
        for _ in range(2):
            assert h.call("POST", "/v1/messages", MESSAGE)[0] == 200
        us = backend(h, "us")
        assert us.breaker.state == "open"
        seen = len(h.upstreams["us"].seen)
        for _ in range(4):
            assert h.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert len(h.upstreams["us"].seen) == seen  # open: skipped
        h.clock.advance(11)
        assert us.breaker.state == "half_open"
        h.upstreams["us"].handler = None
        for _ in range(2):
            h.call("POST", "/v1/messages", MESSAGE)
        assert us.breaker.state == "closed"
        assert len(h.upstreams["us"].seen) > seen
    finally:
        h.close()


def test_all_backends_unavailable_gives_503_with_retry_after() -> None:
    config = base_config(breaker={"window": 1, "failures": 1, "cooldown": 20})
    h = Harness(config)
    try:
        h.upstreams["us"].handler = status_reply(500)
        h.upstreams["eu"].handler = status_reply(500)
        status, headers, _ = h.call("POST", "/v1/messages", MESSAGE)
        assert status == 500 and headers["x-should-retry"] == ["false"]
        status, headers, body = h.call("POST", "/v1/messages", MESSAGE)
        assert status == 503
        assert 1 <= int(headers["retry-after"][0]) <= 20
        assert "no backend" in json.loads(body)["error"]["message"]
    finally:
        h.close()


def test_reload_reuses_unchanged_backends_and_retires_removed(harness: Harness) -> None:
    old = harness.runtime
    us, eu = backend(harness, "us"), backend(harness, "eu")
    changed = base_config()
    changed["providers"][0]["backends"][0]["weight"] = 7  # us: same URL, new weight
    changed["providers"][0]["backends"][1]["url"] = "http://elsewhere.test"  # eu: new URL
    del changed["providers"][1]  # openai removed ...
    changed["routes"] = changed["routes"][:1]
    config = parse_config(changed)
    change = plan_reload(old, config)
    new = RelayRuntime(config, harness.clock, carry=change)
    assert new.backends[0] is us and us.weight == 7
    assert new.backends[1] is not eu
    assert {b.name for b in change.retired} == {"eu", "main"}
    assert new.retry_budget is old.retry_budget


def test_readiness_reports_providers_without_usable_backends(harness: Harness) -> None:
    assert harness.runtime.readiness() == (True, [])
    main = backend(harness, "main")
    main.max_concurrent = 1
    main.in_flight = 10_000  # busy is still ready: its requests wait for a slot
    assert harness.runtime.readiness() == (True, [])
    for _ in range(main.breaker.config.failures):
        main.breaker.record_failure("test")
    ready, problems = harness.runtime.readiness()
    assert not ready and "openai" in problems[0]


def test_key_rotation_across_api_keys() -> None:
    config = base_config()
    config["providers"][1]["backends"][0].pop("api_key")
    config["providers"][1]["backends"][0]["api_keys"] = [{"api_key": "sk-one"},
                                                         {"api_key": "sk-two"}]
    h = Harness(config)
    try:
        for _ in range(4):
            h.call("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": []},
                   api="openai")
        keys = [r.headers[b"authorization"][0] for r in h.upstreams["main"].seen]
        assert keys == [b"Bearer sk-one", b"Bearer sk-two"] * 2
        assert CLIENT_KEY.encode() not in b"".join(keys)
    finally:
        h.close()


def test_batches_stick_to_the_first_backend_and_never_fail_over(harness: Harness) -> None:
    harness.own("anthropic.batch", "msgbatch_1", "us")
    harness.upstreams["us"].handler = status_reply(503)
    status, _, _ = harness.call("GET", "/v1/messages/batches/msgbatch_1")
    assert status == 503
    assert [r.path for r in harness.upstreams["us"].seen] == [b"/v1/messages/batches/msgbatch_1"]
    assert not harness.upstreams["eu"].seen
