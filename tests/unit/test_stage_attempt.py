"""One upstream attempt on its own (relayd.http.attempt.UpstreamAttempt), with a fake
host and a fake Agent: what it sends, its timers, how it classifies failures and judges
statuses, and that its verdict reaches the metrics and the breaker once."""

from __future__ import annotations

from typing import Any

import pytest
from relay_harness import base_config
from stage_fakes import REQUEST_ID, FakeAttemptHost, FakeResponse, RecordingSink, World
from twisted.internet.error import ConnectError, ConnectionDone, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from relayd.errors import Result
from relayd.http.attempt import MAX_RESPONSE_HEADERS, UpstreamAttempt
from relayd.pool import ResponseHeadTooLargeError
from relayd.upstream import Backend

TIMEOUTS = {"first_byte": 10, "idle": 5, "total": 30}


class Setup:
    """An attempt on backend ``us`` (or another), sent, with its host and agent."""

    def __init__(self, world: World | None = None, *, backend: str = "us",
                 sink: RecordingSink | None = None, deadline: float | None = None,
                 payload: dict[str, Any] | None = None, api: str = "anthropic",
                 endpoint: str = "messages", method: bytes = b"POST") -> None:
        self.world = world or World(base_config(timeouts=TIMEOUTS))
        planner = self.world.planner(payload, api=api, endpoint=endpoint)
        pick = planner.next()
        while pick is not None and pick.backend.name != backend:
            pick = planner.next()
        assert pick is not None
        self.backend: Backend = pick.backend
        self.host = FakeAttemptHost(sink)
        self.sink = sink
        now = self.world.clock.seconds()
        self.attempt = UpstreamAttempt(
            self.host, pick, 1, clock=self.world.clock, metrics=self.world.metrics,
            request_id=REQUEST_ID,
            deadline=now + (deadline if deadline is not None else self.backend.timeouts.total),
        )
        self.attempt.send(method)
        self.agent = self.world.agents[self.backend.name]

    def counted(self, result: str) -> float:
        backend = self.backend
        return self.world.sample("relayd_upstream_attempts_total",
                                 provider=backend.provider_name, backend=backend.name,
                                 result=result)

    def answer(self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None
               ) -> FakeResponse:
        response = FakeResponse(code, headers)
        self.agent.last.deferred.callback(response)
        return response

    def fail(self, failure: Failure) -> None:
        self.agent.last.deferred.errback(failure)

    def advance(self, seconds: float) -> None:
        self.world.clock.advance(seconds)


def streaming() -> Setup:
    """An attempt whose 200 answer was taken into a recording sink."""
    s = Setup(sink=RecordingSink())
    s.answer(200, {b"content-type": [b"text/event-stream"]})
    return s


# -- sending ---------------------------------------------------------------------------------


def test_the_key_and_account_headers_go_on_a_copy_of_the_calls_headers() -> None:
    s = Setup()
    sent = s.agent.last
    assert (sent.method, sent.uri) == (b"POST", b"http://up-us.test/v1/messages")
    assert sent.headers.getRawHeaders(b"x-api-key") == [b"sk-up-us"]
    assert all(name != b"x-api-key" for name, _ in s.attempt.call.headers)  # next key: clean
    assert sent.body is not None and sent.body.length == len(s.attempt.call.body)


def test_a_backends_own_account_headers_are_sent() -> None:
    built = base_config()
    built["providers"][1]["backends"][0]["organization"] = "org-relayd"
    s = Setup(World(built), backend="main", payload={"model": "gpt-4o"}, api="openai",
              endpoint="chat.completions")
    headers = s.agent.last.headers
    assert headers.getRawHeaders(b"authorization") == [b"Bearer sk-up-oai"]
    assert headers.getRawHeaders(b"openai-organization") == [b"org-relayd"]


def test_a_get_without_a_body_sends_no_body() -> None:
    world = World()
    call = world.call({"model": "claude-x"}, body=b"")
    planner = world.planner(endpoint="models.item", call=call)
    pick = planner.next()
    assert pick is not None
    attempt = UpstreamAttempt(FakeAttemptHost(), pick, 1, clock=world.clock,
                              metrics=world.metrics, request_id=REQUEST_ID, deadline=3600.0)
    attempt.send(b"GET")
    assert world.agents[pick.backend.name].last.body is None


# -- timers ----------------------------------------------------------------------------------


def test_no_answer_within_first_byte_cancels_the_request_as_a_timeout() -> None:
    s = Setup()
    s.advance(9.9)
    assert not s.agent.last.cancelled and not s.host.failed
    s.advance(0.1)
    assert s.agent.last.cancelled
    assert s.host.failed == [(Result.TIMEOUT, "no response within 10s", False)]
    assert s.attempt.timed_out == "first_byte"
    assert s.counted(Result.TIMEOUT) == 1
    assert s.backend.breaker.failures_in_window == 1
    assert s.backend.in_flight == 0  # a failed attempt gives its slot back itself


def test_the_first_byte_timer_never_outlasts_the_total_deadline() -> None:
    s = Setup(deadline=3)
    s.advance(3)
    assert s.agent.last.cancelled and s.host.failed[0][0] == Result.TIMEOUT


def test_an_idle_gap_after_the_answer_ends_the_body_as_timed_out() -> None:
    s = streaming()
    response = s.host.responded[0]
    assert isinstance(response, FakeResponse)
    response.connect()
    assert s.host.body_started == 1
    s.advance(4)
    response.send(b"data: 1\n\n")  # data resets the idle gap
    s.advance(4)
    assert s.attempt.timed_out is None and not s.host.body_ended
    s.advance(1)
    assert s.attempt.timed_out == "idle"
    assert s.host.body_ended == [False] and response.transport.stopped == 1
    assert s.sink is not None and s.sink.fed == [b"data: 1\n\n"] and s.sink.ended == [False]


def test_the_idle_timer_replaces_the_first_byte_one_without_a_reset() -> None:
    """The answer's head swaps the first-byte timer for the idle one by a cancel and a
    new call: a reset to a sooner time searches every pending call of the reactor."""
    s = Setup(sink=RecordingSink())
    first_byte = s.attempt.timer
    assert first_byte is not None and first_byte.getTime() == TIMEOUTS["first_byte"]
    s.advance(1)
    s.answer(200, {b"content-type": [b"text/event-stream"]})
    idle = s.attempt.timer
    assert not first_byte.active() and idle is not first_byte  # cancelled: not yet due
    assert idle is not None and idle.active() and idle.getTime() == 1 + TIMEOUTS["idle"]
    assert s.world.clock.getDelayedCalls() == [idle]


def test_the_total_deadline_caps_a_body_that_keeps_coming() -> None:
    s = Setup(sink=RecordingSink(), deadline=12)
    response = s.answer(200)
    response.connect()
    for _ in range(2):
        s.advance(4)
        response.send(b"x")
    s.advance(3.9)
    assert s.attempt.timed_out is None
    s.advance(0.1)  # 12 s after the start, though the last data came 4 s ago
    assert s.attempt.timed_out == "total"
    assert s.host.body_ended == [False]


def test_data_after_the_body_ended_is_not_fed() -> None:
    s = streaming()
    response = s.host.responded[0]
    assert isinstance(response, FakeResponse)
    response.connect()
    response.send(b"a")
    response.end()
    response.send(b"b")
    assert s.sink is not None and s.sink.fed == [b"a"]
    assert s.host.body_ended == [True]


def test_a_sink_that_raises_reaches_the_hosts_errback() -> None:
    s = streaming()
    assert s.sink is not None
    s.sink.fail_on_feed = RuntimeError("sink bug")
    response = s.host.responded[0]
    assert isinstance(response, FakeResponse)
    response.connect()
    response.send(b"a")
    assert len(s.host.unexpected) == 1 and s.host.unexpected[0].check(RuntimeError)


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "result", "message"), [
    (Failure(ConnectError("refused")), Result.CONNECT_ERROR, "could not connect"),
    (Failure(DNSLookupError("no such host")), Result.CONNECT_ERROR, "could not connect"),
    (Failure(ResponseFailed([Failure(ResponseHeadTooLargeError())])), Result.BAD_HEADERS,
     "response head larger than"),
    (Failure(ResponseNeverReceived([Failure(ConnectionDone())])), Result.NO_RESPONSE,
     "connection closed without a response"),
])
def test_a_failed_request_is_classified_counted_and_reported(
    failure: Failure, result: str, message: str
) -> None:
    s = Setup()
    s.fail(failure)
    assert len(s.host.failed) == 1
    reported, text, answered = s.host.failed[0]
    assert (reported, answered) == (result, False) and text.startswith(message)
    assert s.counted(result) == 1
    assert s.backend.breaker.failures_in_window == 1
    assert s.backend.last_error == text
    assert s.backend.in_flight == 0 and s.world.clock.getDelayedCalls() == []


def test_an_answer_with_too_many_headers_is_a_failure_of_its_head() -> None:
    s = Setup()
    headers = {b"x-h%d" % i: [b"v"] for i in range(MAX_RESPONSE_HEADERS + 1)}
    response = s.answer(200, headers)
    assert s.host.responded == []
    assert s.host.failed == [(Result.BAD_HEADERS, "response has 201 headers (at most 200)", True)]
    assert response.protocol is not None  # its body is read away, for the connection's sake
    assert s.counted(Result.BAD_HEADERS) == 1 and s.counted(Result.OK) == 0
    assert s.backend.breaker.failures_in_window == 1


# -- judging statuses ------------------------------------------------------------------------


@pytest.mark.parametrize(("retry_after", "cooldown"), [
    ([b"3000"], 600.0), ([b"0"], 1.0), (None, 5.0), ([b"12"], 12.0),
])
def test_a_429_cools_its_key_for_the_clamped_retry_after(
    retry_after: list[bytes] | None, cooldown: float
) -> None:
    s = Setup()
    s.advance(2)
    s.answer(429, {b"retry-after": retry_after} if retry_after else {})
    key = s.attempt.key
    assert key.cooldown_until == 2 + cooldown and key.cooldown_reason == "rate_limited"
    assert s.counted("status_429") == 1
    assert s.backend.breaker.failures_in_window == 0  # a key's limit, not a broken backend
    assert len(s.host.responded) == 1


def answer_on_us(world: World, code: int) -> Setup:
    s = Setup(world)
    s.answer(code)
    return s


def test_two_401s_in_a_row_bench_the_key() -> None:
    world = World()
    first = answer_on_us(world, 401)
    key = first.attempt.key
    assert key.cooldown_until == 0 and first.counted("status_401") == 1
    answer_on_us(world, 401)
    assert key.cooldown_reason == "rejected" and key.cooldown_until > world.clock.seconds()
    assert first.counted("status_401") == 2
    assert first.backend.breaker.failures_in_window == 0


def test_a_success_between_two_401s_keeps_the_key() -> None:
    world = World()
    key = answer_on_us(world, 401).attempt.key
    answer_on_us(world, 200)
    answer_on_us(world, 401)
    assert key.cooldown_until == 0 and key.cooldown_reason is None


def test_a_403_is_the_requests_problem_not_the_backends_or_the_keys() -> None:
    s = answer_on_us(World(), 403)
    assert s.counted("status_403") == 1
    assert s.backend.breaker.failures_in_window == 0 and s.backend.last_error is None
    assert s.attempt.key.cooldown_until == 0 and s.attempt.key.rejections == 0
    assert s.attempt.judged


def test_a_5xx_is_a_failure_of_the_backend() -> None:
    s = answer_on_us(World(), 503)
    assert s.counted("status_503") == 1
    assert s.backend.breaker.failures_in_window == 1
    assert s.backend.last_error == "upstream answered 503"
    assert len(s.host.responded) == 1  # the host decides whether to retry or relay it


def half_open() -> World:
    built = base_config()
    built["providers"][0]["breaker"] = {"failures": 1, "window": 1, "cooldown": 5}
    world = World(built)
    us = world.backend("us")
    us.breaker.record_failure("test")
    world.clock.advance(5)
    assert us.breaker.state == "half_open"
    return world


def test_a_success_closes_a_half_open_breaker() -> None:
    s = answer_on_us(half_open(), 200)
    assert s.counted(Result.OK) == 1 and s.backend.breaker.state == "closed"


def test_a_client_error_frees_a_half_open_trial_without_a_verdict() -> None:
    s = answer_on_us(half_open(), 404)
    assert s.counted(Result.CLIENT_ERROR) == 1
    breaker = s.backend.breaker
    assert breaker.state == "half_open" and breaker.trials_in_flight == 0


# -- the verdict, once -----------------------------------------------------------------------


def test_one_failure_per_attempt_reaches_the_metrics_and_the_breaker() -> None:
    s = Setup()
    s.attempt.record(Result.STREAM_BROKEN, failure="stream broke off")
    s.attempt.record(Result.TIMEOUT, failure="stream idle timeout")
    s.attempt.record(Result.OK)
    assert s.counted(Result.STREAM_BROKEN) == 1
    assert s.counted(Result.TIMEOUT) == 0 and s.counted(Result.OK) == 0
    assert s.backend.breaker.failures_in_window == 1
    assert s.backend.breaker.last_failure_reason == "stream broke off"


def test_a_failure_after_a_judged_success_still_reaches_the_breaker() -> None:
    s = Setup()
    assert not s.attempt.judged
    s.answer(200)
    assert s.attempt.judged and s.backend.breaker.failures_in_window == 0
    s.attempt.record(Result.BODY_BROKEN, failure="body upstream_broken")
    assert s.counted(Result.OK) == 1 and s.counted(Result.BODY_BROKEN) == 1
    assert s.backend.breaker.failures_in_window == 1
    s.attempt.record(Result.BODY_BROKEN, failure="again")
    assert s.counted(Result.BODY_BROKEN) == 1 and s.backend.breaker.failures_in_window == 1


def test_a_success_after_a_failure_is_ignored() -> None:
    world = half_open()
    s = Setup(world)
    s.attempt.record(Result.TIMEOUT, failure="no response")
    assert s.backend.breaker.state == "open"
    world.clock.advance(10)
    s.attempt.record(Result.OK)
    assert s.backend.breaker.state == "half_open"  # not closed by the ignored success
    assert s.counted(Result.OK) == 0


# -- the host lets go: detach, end, stop -----------------------------------------------------


def test_a_detached_attempt_reports_nothing() -> None:
    s = Setup(sink=RecordingSink())
    s.attempt.detach()
    response = s.answer(200)
    assert s.host.responded == [] and response.protocol is not None  # drained
    other = Setup(sink=RecordingSink())
    other.attempt.detach()
    other.fail(Failure(ConnectError("refused")))
    assert other.host.failed == []


def test_a_detached_attempt_feeds_its_sink_nothing_more() -> None:
    s = streaming()
    response = s.host.responded[0]
    assert isinstance(response, FakeResponse)
    response.connect()
    response.send(b"a")
    s.attempt.detach()
    response.send(b"b")
    response.end()
    assert s.sink is not None and s.sink.fed == [b"a"] and s.sink.ended == []
    assert s.host.body_ended == []


def test_an_answer_for_a_finished_host_is_discarded() -> None:
    s = Setup()
    s.host.done = True
    response = s.answer(200)
    assert s.host.responded == [] and response.protocol is not None


def test_end_releases_the_backend_slot_once_and_stops_the_timer() -> None:
    s = Setup()
    assert s.backend.in_flight == 1 and s.world.clock.getDelayedCalls()
    s.attempt.end()
    s.attempt.end()
    assert s.backend.in_flight == 0 and s.attempt.ended
    assert s.world.clock.getDelayedCalls() == []


def test_an_attempt_ended_and_stopped_before_its_answer_is_no_verdict() -> None:
    """The client left: cancelling the call says nothing about the backend."""
    s = Setup()
    s.attempt.end()
    s.attempt.stop()
    assert s.agent.last.cancelled
    assert s.host.failed == [] and s.counted(Result.NO_RESPONSE) == 0
    assert s.backend.breaker.failures_in_window == 0 and s.backend.in_flight == 0


def test_stop_while_the_body_flows_stops_reading_it() -> None:
    s = streaming()
    response = s.host.responded[0]
    assert isinstance(response, FakeResponse)
    response.connect()
    s.attempt.stop()
    assert response.transport.stopped == 1
