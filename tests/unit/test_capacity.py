"""Backend capacity: no cap by default; with a cap, another backend first, then a bounded
wait for a slot (FIFO), then a 503 with retry-after."""

from __future__ import annotations

import json
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config
from twisted.web.server import NOT_DONE_YET, Request

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": []}
ANSWER = json.dumps({"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()


class Held:
    """An upstream handler that keeps every request open until told to answer it."""

    def __init__(self) -> None:
        self.open: list[Request] = []

    def __call__(self, request: Request, body: bytes) -> Any:
        self.open.append(request)
        return NOT_DONE_YET

    def answer(self, h: Harness, index: int = 0) -> None:
        request = self.open.pop(index)
        request.setHeader(b"content-type", b"application/json")
        request.write(ANSWER)
        request.finish()
        h.flush()


def capped(cap: int | None = 1, **top: Any) -> Harness:
    config = base_config(**top)
    if cap is not None:
        config["providers"][1]["backends"][0]["max_concurrent"] = cap
    return Harness(config)


def send(h: Harness, results: list[Any], body: object = CHAT) -> None:
    d = h.client.request(
        "POST", "http://relay.test/v1/chat/completions",
        headers={"authorization": f"Bearer {CLIENT_KEY}"}, data=json.dumps(body).encode(),
    )
    d.addBoth(results.append)
    h.flush()


def sample(h: Harness, name: str, **labels: str) -> float:
    return h.resource.metrics.registry.get_sample_value(name, labels) or 0.0


def content(h: Harness, response: Any) -> bytes:
    out: list[bytes] = []
    h.client.content(response).addCallback(out.append)
    h.flush()
    return out[0]


@pytest.fixture
def held() -> Held:
    return Held()


def test_no_cap_by_default_a_burst_reaches_the_upstream(held: Held) -> None:
    """The field report: the 257th concurrent request got an immediate 503."""
    h = capped(None)
    try:
        h.upstreams["main"].handler = held
        results: list[Any] = []
        for _ in range(600):
            send(h, results)
        assert len(held.open) == 600 and not results
        assert h.runtime.backends[-1].max_concurrent is None
        while held.open:
            held.answer(h)
        assert [r.code for r in results] == [200] * 600
    finally:
        h.close()


def test_a_request_waits_for_a_slot_and_is_served_when_one_frees(held: Held) -> None:
    h = capped(1)
    try:
        h.upstreams["main"].handler = held
        first: list[Any] = []
        second: list[Any] = []
        send(h, first)
        send(h, second)
        assert len(held.open) == 1 and not second
        assert sample(h, "relayd_queued_requests") == 1
        h.clock.advance(2)
        held.answer(h)  # the first ends: its slot goes to the waiting request at once
        assert first[0].code == 200
        assert len(held.open) == 1 and sample(h, "relayd_queued_requests") == 0
        held.answer(h)
        assert second[0].code == 200
        assert sample(h, "relayd_queue_wait_seconds_count") == 1
        assert sample(h, "relayd_queue_wait_seconds_sum") == 2.0
        assert [line["outcome"] for line in h.logs.access()] == ["ok", "ok"]
    finally:
        h.close()


def test_waiting_requests_are_served_in_arrival_order(held: Held) -> None:
    h = capped(1)
    try:
        h.upstreams["main"].handler = held
        results: list[list[Any]] = [[] for _ in range(4)]
        for i, result in enumerate(results):
            send(h, result, {**CHAT, "user": f"u{i}"})
        for _ in range(4):
            held.answer(h)
        order = [json.loads(r.body)["user"] for r in h.upstreams["main"].seen]
        assert order == ["u0", "u1", "u2", "u3"]
        assert all(r[0].code == 200 for r in results)
    finally:
        h.close()


def test_a_wait_past_queue_timeout_is_a_503_with_retry_after(held: Held) -> None:
    h = capped(1, queue_timeout=5)
    try:
        h.upstreams["main"].handler = held
        send(h, [])
        waiting: list[Any] = []
        send(h, waiting)
        h.clock.advance(4.9)
        assert not waiting
        h.clock.advance(0.1)
        h.flush()
        response = waiting[0]
        assert response.code == 503
        assert response.headers.getRawHeaders(b"retry-after") == [b"1"]
        assert "free slot within 5s" in json.loads(content(h, response))["error"]["message"]
        assert sample(h, "relayd_queue_refusals_total", reason="timeout") == 1
        assert h.logs.access()[-1]["outcome"] == "queue_timeout"
        assert sample(h, "relayd_queued_requests") == 0
        assert len(h.upstreams["main"].seen) == 1  # the timed-out one never went upstream
    finally:
        h.close()


def test_a_full_queue_refuses_at_once(held: Held) -> None:
    h = capped(1, max_queued=1)
    try:
        h.upstreams["main"].handler = held
        send(h, [])
        send(h, [])
        third: list[Any] = []
        send(h, third)
        assert third[0].code == 503
        assert sample(h, "relayd_queue_refusals_total", reason="full") == 1
        assert h.logs.access()[-1]["outcome"] == "queue_full"
    finally:
        h.close()


def test_another_backend_is_preferred_to_waiting(held: Held) -> None:
    config = base_config()
    for backend in config["providers"][0]["backends"]:
        backend["max_concurrent"] = 1
    h = Harness(config)
    try:
        h.upstreams["us"].handler = h.upstreams["eu"].handler = held
        results: list[Any] = []
        for _ in range(3):
            h.client.request(
                "POST", "http://relay.test/v1/messages",
                headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
                data=json.dumps(MESSAGE).encode(),
            ).addBoth(results.append)
            h.flush()
        # One on each backend, the third waits.
        assert (len(h.upstreams["us"].seen), len(h.upstreams["eu"].seen)) == (1, 1)
        assert sample(h, "relayd_queued_requests") == 1
    finally:
        h.close()


def test_a_client_that_leaves_while_waiting_gives_up_its_place(held: Held) -> None:
    h = capped(1)
    try:
        h.upstreams["main"].handler = held
        send(h, [])
        send(h, [])
        (waiting,) = [e for e in h.resource.active if e.wait is not None]
        waiting.request.connectionLost(Exception("gone"))
        assert sample(h, "relayd_queued_requests") == 0
        assert not h.runtime.backends[-1].waiters
        held.answer(h)  # the freed slot wakes nobody
        assert len(h.upstreams["main"].seen) == 1
        line = h.logs.access()[0]
        assert (line["status"], line["outcome"]) == (499, "client_gone")
    finally:
        h.close()


def test_an_open_breaker_is_not_waited_for() -> None:
    h = capped(1)
    try:
        main = h.runtime.backends[-1]
        for _ in range(main.breaker.config.failures):
            main.breaker.record_failure("test")
        status, _, _ = h.call("POST", "/v1/chat/completions", CHAT, api="openai")
        assert status == 503 and h.logs.access()[-1]["outcome"] == "no_backend"
        assert sample(h, "relayd_queued_requests") == 0
    finally:
        h.close()
