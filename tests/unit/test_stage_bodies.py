"""Body sinks on their own (relayd.http.bodies) with a fake host: which sink an answer
gets, and what each does with its chunks, its end, and its failures."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any, cast

import pytest
from stage_fakes import (
    REQUEST_ID,
    BodyTransport,
    FakeAttemptHost,
    FakeResponse,
    FakeSinkHost,
    World,
    endpoint_of,
)
from twisted.internet.interfaces import ITransport

from relayd.errors import Outcome, Result
from relayd.http.attempt import UpstreamAttempt
from relayd.http.bodies import (
    MAX_COLLECTED_BODY,
    MAX_HELD_BYTES,
    MAX_REWRITTEN_BODY,
    BodySink,
    BufferedRewrite,
    CollectUsage,
    PassThrough,
    StreamSink,
    choose_sink,
)
from relayd.http.objects import ObjectKeeper
from relayd.http.planner import Pick
from relayd.http.translation import TRANSLATORS, UpstreamCall
from relayd.limits import MemoryStore
from relayd.providers import PROVIDERS, Usage

ANTHROPIC, OPENAI = PROVIDERS["anthropic"], PROVIDERS["openai"]
MESSAGES = endpoint_of("anthropic", "messages")
BATCHES = endpoint_of("anthropic", "messages.batches")
JSON, SSE = b"application/json", b"text/event-stream"

START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
PING = b'event: ping\ndata: {"type":"ping"}\n\n'
BLOCK = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
         b'"content_block":{"type":"text","text":""}}\n\n')
DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"hi"}}\n\n')
ERROR = (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
         b'"message":"busy"}}\n\n')
END = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
       b'"end_turn"},"usage":{"output_tokens":7}}\n\n'
       b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
KEEPALIVE = b": keepalive\n\n"
ANSWER = json.dumps({"id": "msg_1", "model": "claude-real",
                     "usage": {"input_tokens": 3, "output_tokens": 4}}).encode()


def plain_call() -> UpstreamCall:
    return UpstreamCall(ANTHROPIC, MESSAGES, b"/v1/messages", [], b"{}")


def renamed_call() -> UpstreamCall:
    """The client asked for claude-x; the upstream was asked for claude-real."""
    return UpstreamCall(ANTHROPIC, MESSAGES, b"/v1/messages", [], b"{}",
                        model="claude-x")


def translated_call() -> UpstreamCall:
    """An Anthropic client's call sent to an OpenAI upstream."""
    translator = TRANSLATORS[("anthropic", "messages")]
    return UpstreamCall(OPENAI, translator.upstream_endpoint, b"/v1/chat/completions",
                        [], b"{}", model="claude-x", translator=translator)


class Relay:
    """An attempt whose answer (``status``, ``content_type``) is relayed to a fake host."""

    def __init__(self, status: int = 200, content_type: bytes = JSON, *,
                 call: UpstreamCall | None = None, gzipped: bool = False,
                 next_pick: Pick | None = None) -> None:
        world = self.world = World()
        self.clock = world.clock
        backend = self.backend = world.backend("us")
        target = world.route("anthropic", "claude-x").targets[0]
        pick = Pick(target, backend, backend.keys.keys[0], call or plain_call())
        self.attempt = UpstreamAttempt(
            FakeAttemptHost(), pick, 1, clock=world.clock, metrics=world.metrics,
            request_id=REQUEST_ID, deadline=3600.0,
        )
        self.host = FakeSinkHost(world.clock, status=status, next_pick=next_pick)
        headers = {b"content-type": [content_type]}
        if gzipped:
            headers[b"content-encoding"] = [b"gzip"]
        self.response = FakeResponse(status, headers)
        self.transport = BodyTransport()

    def sink(self, objects: ObjectKeeper | None = None, keepalive: float = 0.0) -> BodySink:
        """The sink chosen for the answer, receiving its body from the attempt."""
        sink = choose_sink(self.host, self.attempt, self.response, objects=objects,
                           keepalive=keepalive, now=self.clock.seconds())
        self.attempt.receive(self.response, sink)
        self.attempt.makeConnection(cast(ITransport, self.transport))
        return sink

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.attempt.dataReceived(chunk)

    @property
    def written(self) -> list[bytes]:
        return self.host.client.written

    def counted(self, result: str) -> float:
        return self.world.sample("relayd_upstream_attempts_total", provider="anthropic",
                                 backend="us", result=result)


def retry_pick() -> Pick:
    world = World()
    pick = world.planner().next()
    assert pick is not None
    return pick


# -- choosing the sink -----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "content_type", "call", "kind", "began"), [
    (200, SSE, plain_call, StreamSink, False),  # held back until its content starts
    (400, SSE, plain_call, StreamSink, True),
    (200, JSON, plain_call, CollectUsage, True),
    (201, b"application/json; charset=utf-8", plain_call, CollectUsage, True),
    (404, JSON, plain_call, PassThrough, True),
    (200, b"text/plain", plain_call, PassThrough, True),
    (200, JSON, renamed_call, BufferedRewrite, False),
    (400, JSON, renamed_call, PassThrough, True),  # a renamed call's errors pass as they are
    (400, JSON, translated_call, BufferedRewrite, False),  # reshaped for the client's API
    (200, SSE, renamed_call, StreamSink, False),
])
def test_each_answer_gets_its_sink(status: int, content_type: bytes, call: Any, kind: type,
                                   began: bool) -> None:
    relay = Relay(status, content_type, call=call())
    sink = relay.sink()
    assert type(sink) is kind
    assert relay.host.events == (["begin"] if began else [])
    assert sink.streaming is (kind is StreamSink)


def test_a_rewritten_stream_gets_a_rewriter_and_a_plain_one_none() -> None:
    renamed = Relay(200, SSE, call=renamed_call()).sink()
    plain = Relay(200, SSE).sink()
    assert isinstance(renamed, StreamSink) and renamed.rewriter is not None
    assert isinstance(plain, StreamSink) and plain.rewriter is None


def keeper(role: str) -> ObjectKeeper:
    return ObjectKeeper(MemoryStore(World().clock), BATCHES, role, "team-a")


def test_an_object_calls_json_success_is_rewritten_and_its_errors_are_not() -> None:
    assert type(Relay(200).sink(objects=keeper("list"))) is BufferedRewrite
    assert type(Relay(404).sink(objects=keeper("list"))) is PassThrough


def test_only_a_create_calls_stream_records_the_object_it_made() -> None:
    create = Relay(200, SSE).sink(objects=keeper("create"))
    listing = Relay(200, SSE).sink(objects=keeper("list"))
    assert isinstance(create, StreamSink) and create.objects is not None
    assert isinstance(listing, StreamSink) and listing.objects is None


# -- PassThrough and CollectUsage ------------------------------------------------------------


def test_pass_through_writes_every_chunk_after_the_head_and_finishes() -> None:
    relay = Relay(404)
    sink = relay.sink()
    relay.feed(b"a", b"b")
    assert relay.written == [b"a", b"b"]
    sink.end(True)
    assert relay.host.events == ["begin", "finished", "finish"]
    assert relay.host.outcome == Outcome.OK


@pytest.mark.parametrize(("timed_out", "outcome"), [
    (None, Outcome.UPSTREAM_BROKEN), ("idle", Outcome.TIMEOUT_IDLE),
    ("total", Outcome.TIMEOUT_TOTAL),
])
def test_a_broken_pass_through_body_is_cut_off(timed_out: str | None, outcome: str) -> None:
    relay = Relay(404)
    sink = relay.sink()
    relay.feed(b"a")
    relay.attempt.timed_out = timed_out
    sink.end(False)
    assert relay.host.events == ["begin", "finished", "cut_off"]
    assert relay.host.outcome == outcome
    assert relay.counted(Result.BODY_BROKEN) == 1
    assert relay.backend.breaker.failures_in_window == 1
    assert relay.backend.last_error == f"response body {outcome}"


def test_collect_usage_relays_a_success_and_reads_its_usage() -> None:
    relay = Relay(200)
    sink = relay.sink()
    relay.feed(ANSWER[:10], ANSWER[10:])
    sink.end(True)
    assert b"".join(relay.written) == ANSWER
    assert relay.host.events == ["begin", "finished", "finish"]
    # Read once the answer is sent, when the exchange is settled; not before.
    assert relay.host.usage is None
    assert sink.final_usage() == Usage(input_tokens=3, output_tokens=4)


def test_collect_usage_of_an_answer_cut_off_is_unknown() -> None:
    relay = Relay(200)
    sink = relay.sink()
    relay.feed(ANSWER)
    assert sink.final_usage() is None  # not whole yet
    sink.end(False)
    assert sink.final_usage() is None


def test_collect_usage_reads_a_gzipped_answer_and_relays_it_encoded() -> None:
    relay = Relay(200, gzipped=True)
    sink = relay.sink()
    encoded = gzip.compress(ANSWER)
    relay.feed(encoded)
    sink.end(True)
    assert relay.written == [encoded]
    assert sink.final_usage() == Usage(input_tokens=3, output_tokens=4)


def test_collect_usage_past_its_bound_still_relays_everything() -> None:
    relay = Relay(200)
    sink = relay.sink()
    big = json.dumps({"pad": "x" * MAX_COLLECTED_BODY,
                      "usage": {"input_tokens": 3, "output_tokens": 4}}).encode()
    chunk = 1024 * 1024
    relay.feed(*(big[i:i + chunk] for i in range(0, len(big), chunk)))
    sink.end(True)
    assert b"".join(relay.written) == big
    assert sink.final_usage() is None  # not kept past the bound, so not read
    assert relay.host.events[-1] == "finish"


def test_collect_usage_of_a_bad_gzip_body_relays_it_without_usage() -> None:
    relay = Relay(200, gzipped=True)
    sink = relay.sink()
    relay.feed(b"not gzip at all")
    sink.end(True)
    assert relay.written == [b"not gzip at all"]
    assert relay.host.usage is None and relay.host.events[-1] == "finish"


# -- BufferedRewrite -------------------------------------------------------------------------


def test_a_rewritten_answer_waits_for_its_end_then_goes_with_its_own_length() -> None:
    relay = Relay(200, call=renamed_call())
    sink = relay.sink()
    relay.feed(ANSWER[:20], ANSWER[20:])
    assert relay.host.events == [] and relay.written == []
    sink.end(True)
    rewritten = relay.host.began[0]
    assert rewritten is not None and rewritten[0] == 200
    assert json.loads(rewritten[1])["model"] == "claude-x"  # the client's name, back
    assert relay.written == [rewritten[1]]
    assert relay.host.events == ["finished", "begin", "finish"]
    assert relay.host.usage == Usage(input_tokens=3, output_tokens=4)


def test_a_translated_error_is_reshaped_for_the_clients_api() -> None:
    relay = Relay(400, call=translated_call())
    relay.host.status = 400
    sink = relay.sink()
    relay.feed(json.dumps({"error": {"message": "bad", "type": "invalid_request_error"}})
               .encode())
    sink.end(True)
    rewritten = relay.host.began[0]
    assert rewritten is not None and rewritten[0] == 400
    assert json.loads(rewritten[1])["type"] == "error"  # Anthropic's error shape
    assert relay.host.usage is None


def assert_refused_502(relay: Relay, problem: str) -> None:
    assert len(relay.host.refused) == 1
    refusal = relay.host.refused[0]
    assert (refusal.status, refusal.outcome) == (502, Outcome.UPSTREAM_BAD_BODY)
    assert problem in refusal.message
    assert relay.counted(Result.BAD_BODY) == 1
    assert relay.host.began == [] and relay.written == []


def gzip_bomb(decoded: int) -> bytes:
    """A gzip stream of ``decoded`` zero bytes, compressed to a few dozen kilobytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(decoded // len(block))]
    parts.append(compressor.compress(bytes(decoded % len(block))))
    return b"".join(parts) + compressor.flush()


def test_a_rewritten_answer_past_its_bound_is_a_502_and_reading_stops() -> None:
    relay = Relay(200, call=renamed_call(), gzipped=True)
    sink = relay.sink()
    bomb = gzip_bomb(MAX_REWRITTEN_BODY + 1)
    assert len(bomb) < 1024 * 1024
    relay.feed(bomb)
    assert_refused_502(relay, f"is larger than {MAX_REWRITTEN_BODY} bytes")
    assert relay.host.client.unregistered == 1 and relay.transport.stopped == 1
    relay.feed(b"more")
    sink.end(True)
    assert len(relay.host.refused) == 1 and relay.host.events[-1] == "finished"


def test_a_rewritten_answer_that_is_not_gzip_is_a_502() -> None:
    relay = Relay(200, call=renamed_call(), gzipped=True)
    relay.sink()
    relay.feed(b"\x1f\x8b but not really")
    assert_refused_502(relay, "is not valid gzip")


def test_a_rewritten_answer_whose_gzip_is_cut_short_is_a_502_at_its_end() -> None:
    relay = Relay(200, call=renamed_call(), gzipped=True)
    sink = relay.sink()
    encoded = gzip.compress(ANSWER)
    relay.feed(encoded[: len(encoded) // 2])
    assert relay.host.refused == []
    sink.end(True)
    assert_refused_502(relay, "is not valid gzip")


def test_a_rewritten_success_that_is_not_json_is_a_502() -> None:
    relay = Relay(200, call=renamed_call())
    sink = relay.sink()
    relay.feed(b"<html>oops</html>")
    sink.end(True)
    assert_refused_502(relay, "not JSON")


@pytest.mark.parametrize(("timed_out", "status", "outcome"), [
    (None, 502, Outcome.UPSTREAM_BROKEN), ("idle", 504, Outcome.TIMEOUT_IDLE),
])
def test_a_broken_rewritten_answer_is_a_proper_error(timed_out: str | None, status: int,
                                                     outcome: str) -> None:
    relay = Relay(200, call=renamed_call())
    sink = relay.sink()
    relay.feed(ANSWER[:10])
    relay.attempt.timed_out = timed_out
    sink.end(False)
    assert [(r.status, r.outcome) for r in relay.host.refused] == [(status, outcome)]
    assert relay.counted(Result.BODY_BROKEN) == 1
    assert relay.written == []


def test_an_object_calls_answer_goes_through_its_keeper() -> None:
    relay = Relay(200)
    store = MemoryStore(relay.clock)
    sink = relay.sink(objects=ObjectKeeper(store, BATCHES, "create", "team-a"))
    relay.feed(json.dumps({"id": "msgbatch_1", "results_url": "https://up/x"}).encode())
    sink.end(True)
    rewritten = relay.host.began[0]
    assert rewritten is not None
    assert json.loads(rewritten[1])["results_url"] == (
        "http://127.0.0.1:8080/v1/messages/batches/msgbatch_1/results")
    record = store.owners_now("anthropic.batch", ["msgbatch_1"])[0]
    assert record is not None and (record.client, record.backend) == ("team-a", "us")


# -- StreamSink ------------------------------------------------------------------------------


def test_a_stream_is_held_until_its_content_starts() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink()
    relay.feed(START, PING)
    assert relay.host.events == [] and relay.written == []
    relay.feed(BLOCK)
    assert relay.host.events == ["begin"]
    assert relay.written == [START, PING, BLOCK]
    relay.feed(DELTA, END)
    sink.end(True)
    assert relay.written == [START, PING, BLOCK, DELTA, END]
    assert relay.host.events == ["begin", "finished", "finish"]
    assert relay.host.usage == Usage(output_tokens=7)
    assert sink.complete


def test_an_error_before_content_fails_over_unseen() -> None:
    pick = retry_pick()
    relay = Relay(200, SSE, next_pick=pick)
    relay.sink(keepalive=15)
    keepalives = len(relay.clock.getDelayedCalls())
    relay.feed(START, ERROR)
    assert relay.host.retried == [Result.STREAM_ERROR]
    assert len(relay.host.failed_over) == 1
    attempt, chosen, message = relay.host.failed_over[0]
    assert attempt is relay.attempt and chosen is pick
    assert message == "in-stream error before content"
    assert relay.written == [] and relay.host.events == ["fail_over"]
    assert relay.counted(Result.STREAM_ERROR) == 1
    assert len(relay.clock.getDelayedCalls()) == keepalives - 1  # its keepalive stopped


def test_an_error_before_content_without_a_retry_is_relayed_as_it_came() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink()
    relay.feed(START, ERROR)
    assert relay.host.events == ["begin"] and relay.written == [START, ERROR]
    sink.end(True)
    assert relay.host.events[-1] == "finish" and relay.host.outcome == Outcome.OK
    assert relay.counted(Result.STREAM_ERROR) == 1


def test_a_stream_held_past_its_bound_goes_live() -> None:
    relay = Relay(200, SSE)
    relay.sink()
    pings = b": " + b"x" * MAX_HELD_BYTES + b"\n\n"  # a comment: no content, no event
    relay.feed(START, pings)
    assert relay.host.events == ["begin"] and relay.written == [START, pings]


@pytest.mark.parametrize(("timed_out", "result"), [
    (None, Result.STREAM_BROKEN), ("first_byte", Result.TIMEOUT),
])
def test_a_held_stream_that_breaks_fails_over(timed_out: str | None, result: str) -> None:
    relay = Relay(200, SSE, next_pick=retry_pick())
    sink = relay.sink()
    relay.feed(START)
    relay.attempt.timed_out = timed_out
    sink.end(False)
    assert relay.host.retried == [result]
    assert relay.host.events == ["fail_over"] and relay.written == []
    assert relay.host.failed_over[0][2] == f"stream {result} before content"


def test_a_held_stream_that_breaks_with_no_retry_left_ends_with_an_error_event() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink()
    relay.feed(START)
    sink.end(False)
    assert relay.host.retried == [Result.STREAM_BROKEN]
    assert relay.host.events == ["begin", "finished", "finish"]
    assert relay.written[0] == START and relay.written[1].startswith(b"event: error\n")
    assert relay.host.outcome == Outcome.UPSTREAM_BROKEN
    assert relay.counted(Result.STREAM_BROKEN) == 1  # once, though both steps record it


def test_a_cut_mid_event_ends_with_an_error_event_on_a_fresh_line() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink()
    relay.feed(START, BLOCK, DELTA[:30])
    sink.end(False)
    assert relay.host.outcome == Outcome.UPSTREAM_BROKEN
    assert relay.counted(Result.STREAM_BROKEN) == 1
    error = relay.written[-1]
    assert error.startswith(b"\n\nevent: error\ndata: ")
    assert REQUEST_ID.encode() in error
    assert relay.host.events[-1] == "finish"


def test_a_cut_between_events_ends_with_the_error_event_alone() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink()
    relay.feed(START, BLOCK)
    relay.attempt.timed_out = "idle"
    sink.end(False)
    assert relay.host.outcome == Outcome.TIMEOUT_IDLE
    assert relay.counted(Result.TIMEOUT) == 1
    assert relay.written[-1].startswith(b"event: error\ndata: ")


def test_a_stream_without_its_final_event_is_truncated() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink()
    relay.feed(START, BLOCK, DELTA)
    sink.end(True)
    assert relay.host.outcome == Outcome.UPSTREAM_TRUNCATED
    assert relay.counted(Result.STREAM_TRUNCATED) == 1
    assert relay.written[-1].startswith(b"event: error\n")
    assert relay.host.events[-1] == "finish"


def test_an_error_statuss_stream_needs_no_final_event() -> None:
    relay = Relay(400, SSE)
    relay.host.status = 400
    sink = relay.sink()
    relay.feed(ERROR)
    sink.end(True)
    assert relay.written == [ERROR] and relay.host.outcome == Outcome.OK
    assert relay.counted(Result.STREAM_TRUNCATED) == 0


def test_keepalive_comments_fill_silences_between_events_only() -> None:
    relay = Relay(200, SSE)
    relay.sink(keepalive=15)
    relay.feed(START, BLOCK)  # live now, at t=0
    relay.clock.advance(10)
    relay.feed(DELTA[:30])  # half an event at t=10
    relay.clock.advance(5)
    assert KEEPALIVE not in relay.written  # 15 s after the start, but 5 after data
    relay.clock.advance(10)
    assert KEEPALIVE not in relay.written  # silent for 15 s, but inside an event
    relay.feed(DELTA[30:])
    relay.clock.advance(15)
    assert relay.written[-1] == KEEPALIVE
    assert relay.written.count(KEEPALIVE) == 1


def test_a_long_silence_releases_a_held_stream_with_a_keepalive() -> None:
    relay = Relay(200, SSE)
    relay.sink(keepalive=15)
    relay.feed(START)
    relay.clock.advance(15)
    assert relay.host.events == ["begin"]
    assert relay.written == [START, KEEPALIVE]


def test_stopping_a_stream_sink_stops_its_keepalive() -> None:
    relay = Relay(200, SSE)
    sink = relay.sink(keepalive=15)
    sink.stop()
    relay.clock.advance(60)
    assert relay.written == [] and relay.host.events == []
