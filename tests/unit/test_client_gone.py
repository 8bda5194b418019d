"""Clients that hang up, and drains that abort, are not backend failures.

Each test ends an exchange from the client's side (or the drain's) at a different stage
and checks what the backend's breaker, the metrics and the logs were told. The upstream
agents here fail the way Twisted's Agent does when relayd cancels a call: an answer
being waited for fails with ``ResponseNeverReceived([CancelledError])``, a connect in
progress with a DNS or connecting-cancelled error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from relay_harness import CLIENT_KEY, Harness, base_config, lose_client
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IAgent, IResponse
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": []}
STREAM = {**MESSAGE, "stream": True}
START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"hi"}}\n\n')


@implementer(IAgent)
class CancellableAgent:
    """Never answers by itself; a cancelled call fails with what ``on_cancel`` makes."""

    def __init__(self, on_cancel: Callable[[], Failure]) -> None:
        self.on_cancel = on_cancel
        self.calls: list[Deferred[IResponse]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[IResponse]:  # noqa: N803
        d: Deferred[IResponse] = Deferred(lambda d: d.errback(self.on_cancel()))
        self.calls.append(d)
        return d


def never_received() -> Failure:
    return Failure(ResponseNeverReceived([Failure(CancelledError())]))


def lookup_cancelled() -> Failure:
    return Failure(DNSLookupError("Couldn't find the hostname '127.0.0.1'"))


def one_backend(**backend: Any) -> dict[str, Any]:
    config = base_config()
    config["providers"][0]["backends"] = [
        {"name": "us", "url": "http://up-us.test", "api_key": "sk-up-us", **backend}
    ]
    return config


def start(h: Harness, body: object = MESSAGE, answers: list[Any] | None = None) -> Any:
    """Send one request and return its Exchange, left waiting on the upstream;
    ``answers`` receives the client's response."""
    d = h.client.request(
        "POST", "http://relay.test/v1/messages",
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
        data=json.dumps(body).encode(),
    )
    if answers is not None:
        d.addBoth(answers.append)
    h.flush()
    (exchange,) = [e for e in h.resource.active if not e.done]
    return exchange


def sample(h: Harness, name: str, **labels: str) -> float:
    return h.resource.metrics.registry.get_sample_value(name, labels) or 0.0


def critical_lines(h: Harness) -> list[Any]:
    return [e for e in h.logs.events if e.get("log_level") is not None
            and e["log_level"].name in ("critical", "error")]


def backend(h: Harness) -> Any:
    (b,) = [b for b in h.runtime.backends if b.name == "us"]
    return b


def test_fifty_clients_giving_up_before_the_answer_leave_the_breaker_closed() -> None:
    """The field report: 50 streaming clients giving up before a slow upstream's first
    byte opened the breaker of the only, healthy, backend."""
    agent = CancellableAgent(never_received)
    h = Harness(one_backend(), agents={"us": agent})
    try:
        for _ in range(50):
            lose_client(start(h, STREAM))
        b = backend(h)
        assert b.breaker.state == "closed"
        assert b.breaker.failures_in_window == 0
        assert b.in_flight == 0 and b.last_error is None
        assert len(agent.calls) == 50 and all(d.called for d in agent.calls)
        assert sample(h, "relayd_upstream_attempts_total", provider="anthropic",
                      backend="us", result="client_gone") == 50
        assert sample(h, "relayd_client_disconnects_total", api="anthropic",
                      stage="before_response") == 50
        assert not critical_lines(h)
        assert not [e for e in h.logs.events if "failed" in str(e.get("log_format", ""))]
        h.turn()
        lines = h.logs.access()
        assert len(lines) == 50
        assert {(line["status"], line["outcome"]) for line in lines} == {(499, "client_gone")}
    finally:
        h.close()


def test_a_client_gone_while_connecting_is_not_a_connect_error() -> None:
    h = Harness(one_backend(), agents={"us": CancellableAgent(lookup_cancelled)})
    try:
        for _ in range(10):
            lose_client(start(h))
        assert backend(h).breaker.failures_in_window == 0
        assert sample(h, "relayd_upstream_attempts_total", provider="anthropic",
                      backend="us", result="connect_error") == 0
        assert not critical_lines(h)
    finally:
        h.close()


def test_a_half_open_trial_whose_client_left_frees_its_slot() -> None:
    agent = CancellableAgent(never_received)
    h = Harness(one_backend(breaker={"failures": 1, "window": 1, "cooldown": 5}),
                agents={"us": agent})
    try:
        breaker = backend(h).breaker
        breaker.record_failure("test")
        assert breaker.state == "open"
        h.clock.advance(5)
        assert breaker.state == "half_open"
        trial = start(h)
        assert breaker.trials_in_flight == 1
        lose_client(trial)
        assert breaker.state == "half_open" and breaker.trials_in_flight == 0
        second = start(h)  # the slot is free again: the next request is the trial
        assert breaker.trials_in_flight == 1
        assert second.attempts == 1
    finally:
        h.close()


def test_a_client_leaving_mid_stream_is_not_a_broken_stream() -> None:
    def stream(request: Request, body: bytes) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(START + DELTA)
        return NOT_DONE_YET

    h = Harness(one_backend())
    try:
        h.upstreams["us"].handler = stream
        exchange = start(h, STREAM)
        assert exchange.request.startedWriting
        lose_client(exchange)
        h.flush()
        b = backend(h)
        assert b.breaker.failures_in_window == 0 and b.last_error is None
        assert sample(h, "relayd_upstream_attempts_total", provider="anthropic",
                      backend="us", result="stream_broken") == 0
        assert sample(h, "relayd_client_disconnects_total", api="anthropic",
                      stage="during_response") == 1
        assert not critical_lines(h)
        line = h.logs.access()[-1]
        assert (line["status"], line["outcome"]) == (200, "client_gone")
        assert b.in_flight == 0
    finally:
        h.close()


def test_an_upstream_that_breaks_mid_stream_still_counts_against_it() -> None:
    """The other side of the rule: the backend's own failure is still a failure."""
    def broken(request: Request, body: bytes) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(START + DELTA)
        request.channel.transport.loseConnection()  # type: ignore[union-attr]
        return NOT_DONE_YET

    h = Harness(one_backend())
    try:
        h.upstreams["us"].handler = broken
        status, _, body = h.call("POST", "/v1/messages", STREAM)
        assert status == 200 and b"event: error" in body
        assert backend(h).breaker.failures_in_window == 1
    finally:
        h.close()


def test_a_drain_that_aborts_a_waiting_request_blames_no_one() -> None:
    agent = CancellableAgent(never_received)
    h = Harness(one_backend(), agents={"us": agent})
    try:
        exchange = start(h)
        exchange.abort()
        assert agent.calls[0].called
        assert backend(h).breaker.failures_in_window == 0
        assert sample(h, "relayd_upstream_attempts_total", provider="anthropic",
                      backend="us", result="shutdown") == 1
        h.turn()
        assert h.logs.access()[-1]["outcome"] == "aborted"
        assert not critical_lines(h)
    finally:
        h.close()


def test_an_unexpected_error_cancels_the_upstream_call_and_answers_500() -> None:
    agent = CancellableAgent(never_received)
    h = Harness(one_backend(), agents={"us": agent})
    try:
        answers: list[Any] = []
        exchange = start(h, answers=answers)
        exchange.fail_unexpectedly()
        assert agent.calls[0].called  # the upstream call was not left running
        h.flush()
        (response,) = answers
        assert response.code == 500
        body: list[bytes] = []
        h.client.content(response).addCallback(body.append)
        h.flush()
        assert b"internal relay error" in body[0]
        assert backend(h).breaker.failures_in_window == 0
        assert sample(h, "relayd_upstream_attempts_total", provider="anthropic",
                      backend="us", result="relay_error") == 1
        assert backend(h).in_flight == 0
    finally:
        h.close()
