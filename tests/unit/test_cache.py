"""The response cache on its own (key, controls, entries, memory bound, capture) and
through an in-memory relay (hits, scope, bypass, streams, stale-if-error, what is never
stored)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, OTHER_KEY, Harness, base_config, json_reply, lose_client
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from relayd.cache import CachedAnswer, cache_key, parse_cache_control, samples
from relayd.cache.entry import kept_headers
from relayd.cache.flights import KEEPALIVE, Capture
from relayd.cache.memory import MemoryCache
from relayd.config import ConfigErrors, parse_config
from relayd.providers import PROVIDERS, Usage

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16, "temperature": 0,
           "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}


def key(**changes: Any) -> str:
    arguments: dict[str, Any] = {
        "family": "anthropic", "endpoint": "messages", "targets": [("anthropic", "m")],
        "client": "team-a", "headers": Headers({b"anthropic-version": [b"2023-06-01"]}),
        "answer_headers": (b"anthropic-version", b"anthropic-beta"),
        "payload": {"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]},
    }
    arguments.update(changes)
    return cache_key(**arguments)


def entry(body: bytes = b"{}", *, now: float = 0.0, ttl: float = 60.0, stale: float = 0.0,
          route: str = "r", client: str = "team-a") -> CachedAnswer:
    return CachedAnswer(
        status=200, headers=((b"content-type", b"application/json"),), body=body,
        streamed=False, stored_at=now, expires_at=now + ttl, stale_until=now + ttl + stale,
        route=route, client=client, model="m", usage=Usage(1, 2, 3, 4),
    )


# -- the key -----------------------------------------------------------------------------------


def test_key_ignores_key_order_and_formatting() -> None:
    a = key(payload={"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]})
    b = key(payload={"messages": [{"role": "user"}], "max_tokens": 5, "model": "m"})
    assert a == b


def test_key_changes_with_what_changes_the_answer() -> None:
    base = key()
    assert key(client="team-b") != base
    assert key(client=None) != base  # shared entries are apart from any client's
    assert key(targets=[("anthropic", "other")]) != base
    assert key(targets=[("anthropic", "m"), ("openai", "m")]) != base
    assert key(endpoint="messages.count_tokens") != base
    assert key(family="openai") != base
    assert key(payload={"model": "m", "max_tokens": 6, "messages": [{"role": "user"}]}) != base
    beta = Headers({b"anthropic-version": [b"2023-06-01"], b"anthropic-beta": [b"x"]})
    assert key(headers=beta) != base
    gzip = Headers({b"anthropic-version": [b"2023-06-01"], b"accept-encoding": [b"gzip"]})
    assert key(headers=gzip) != base


def test_key_ignores_the_model_field_and_other_headers() -> None:
    """The targets name the model sent upstream; the relay key is never part of it."""
    base = key()
    assert key(payload={"model": "alias", "max_tokens": 5, "messages": [{"role": "user"}]}) == base
    other = Headers({b"anthropic-version": [b"2023-06-01"], b"x-api-key": [b"sk-secret"]})
    assert key(headers=other) == base


def test_sampling() -> None:
    assert samples({}) is True  # the APIs' default temperature is 1
    assert samples({"temperature": 0.7}) is True
    assert samples({"temperature": 0}) is False
    assert samples({"temperature": 0.0}) is False
    assert samples({"temperature": False}) is True
    assert samples({"temperature": "0"}) is True


# -- Cache-Control -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (b"no-store", (True, False, None)),
    (b"No-Cache", (False, True, None)),
    (b"max-age=30", (False, False, 30.0)),
    (b'max-age="5", no-cache', (False, True, 5.0)),
    (b"max-age=abc, private", (False, False, None)),
    (b"max-age=-1", (False, False, None)),
])
def test_cache_control(value: bytes, expected: tuple[bool, bool, float | None]) -> None:
    assert tuple(parse_cache_control(Headers({b"cache-control": [value]}))) == expected


def test_no_cache_control() -> None:
    assert tuple(parse_cache_control(Headers())) == (False, False, None)


# -- entries -----------------------------------------------------------------------------------


def test_entry_round_trip_keeps_every_byte() -> None:
    body = bytes(range(256)) * 3
    original = entry(body, now=5.0, stale=10.0)
    decoded = CachedAnswer.decode(original.encode())
    assert decoded is not None
    for name in CachedAnswer.__slots__:
        assert getattr(decoded, name) == getattr(original, name), name


@pytest.mark.parametrize(
    "data", [b"", b"RCE2\x00\x00\x00\x01{", b"RCE1\x00\x00\x00\x05nojson", b"42"]
)
def test_entry_decode_refuses_what_is_not_one(data: bytes) -> None:
    assert CachedAnswer.decode(data) is None


def test_fresh_and_max_age() -> None:
    e = entry(now=100.0, ttl=60.0)
    assert e.fresh(150.0, None)
    assert not e.fresh(160.0, None)
    assert not e.fresh(150.0, 10.0)
    assert e.fresh(105.0, 10.0)


def test_per_response_headers_are_not_kept() -> None:
    kept = kept_headers([
        (b"Content-Type", [b"application/json"]), (b"request-id", [b"req_up"]),
        (b"x-relayd-request-id", [b"req_1"]), (b"anthropic-ratelimit-requests-remaining", [b"3"]),
        (b"Date", [b"x"]), (b"content-length", [b"5"]), (b"anthropic-organization-id", [b"o"]),
    ])
    assert kept == ((b"content-type", b"application/json"), (b"anthropic-organization-id", b"o"))


# -- the memory level --------------------------------------------------------------------------


def test_memory_is_bounded_by_bytes_least_recently_used_out_first() -> None:
    one = entry(b"x" * 1000)
    cache = MemoryCache(one.size * 2)
    cache.put("a", entry(b"x" * 1000))
    cache.put("b", entry(b"x" * 1000))
    assert cache.get("a", 1.0) is not None  # a is now the most recently used
    cache.put("c", entry(b"x" * 1000))
    assert cache.get("b", 1.0) is None
    assert cache.get("a", 1.0) is not None and cache.get("c", 1.0) is not None
    assert cache.evictions == 1 and cache.size == 2 * one.size
    assert cache.put("huge", entry(b"x" * 10_000)) is False
    assert len(cache) == 2


def test_memory_drops_entries_past_their_stale_window() -> None:
    cache = MemoryCache(1 << 20)
    cache.put("a", entry(now=0.0, ttl=10.0, stale=5.0))
    assert cache.get("a", 12.0) is not None  # expired but within stale_if_error
    assert cache.get("a", 15.0) is None
    assert len(cache) == 0 and cache.size == 0


def test_memory_purge_by_route_and_client() -> None:
    cache = MemoryCache(1 << 20)
    cache.put("1", entry(route="r1", client="a"))
    cache.put("2", entry(route="r1", client="b"))
    cache.put("3", entry(route="r2", client="a"))
    assert cache.purge(route="r1", client="a") == 1
    assert cache.purge(client="a") == 1
    assert cache.purge() == 1
    assert len(cache) == 0 and cache.size == 0


# -- capture -----------------------------------------------------------------------------------


class WrittenRequest:
    def __init__(self, code: int = 200) -> None:
        self.code = code
        self.responseHeaders = Headers({b"content-type": [b"text/event-stream"],
                                        b"request-id": [b"req_up"]})


class RecordingJoiner:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def flight_started(self, status: int, headers: Any) -> None:
        self.events.append(("started", status))

    def flight_data(self, data: bytes) -> None:
        self.events.append(data)

    def flight_ended(self, entry: CachedAnswer | None, finished: bool) -> None:
        self.events.append(("ended", entry is not None, finished))


def test_capture_keeps_a_200_without_keepalives_and_shares_it_live() -> None:
    flights: dict[str, Capture] = {}
    capture = Capture("k", 1000, streamed=True)
    capture.flights = flights
    flights["k"] = capture
    early = RecordingJoiner()
    assert capture.join(early)
    request = WrittenRequest()
    capture.wrote(request, b"event: a\n\n")
    capture.wrote(request, KEEPALIVE)
    late = RecordingJoiner()
    assert capture.join(late)  # gets the head and what was sent so far at once
    capture.wrote(request, b"event: b\n\n")
    assert capture.body == b"event: a\n\nevent: b\n\n"
    assert capture.headers == ((b"content-type", b"text/event-stream"),)
    capture.finished = True
    capture.close(entry())
    assert early.events == [("started", 200), b"event: a\n\n", KEEPALIVE, b"event: b\n\n",
                            ("ended", True, True)]
    assert late.events == [("started", 200), b"event: a\n\n", b"event: b\n\n",
                           ("ended", True, True)]
    assert flights == {}


def test_capture_of_an_error_releases_its_joiners_at_once() -> None:
    flights: dict[str, Capture] = {}
    capture = Capture("k", 1000, streamed=False)
    capture.flights = flights
    flights["k"] = capture
    joiner = RecordingJoiner()
    assert capture.join(joiner)
    capture.wrote(WrittenRequest(529), b'{"type":"error"}')
    assert joiner.events == [("ended", False, False)]
    assert not capture.keeping and flights == {}
    assert not capture.join(RecordingJoiner())


def test_capture_past_its_limit_is_not_kept_nor_joinable() -> None:
    flights: dict[str, Capture] = {}
    capture = Capture("k", 10, streamed=True)
    capture.flights = flights
    flights["k"] = capture
    joiner = RecordingJoiner()
    capture.join(joiner)
    request = WrittenRequest()
    capture.wrote(request, b"0123456789")
    capture.wrote(request, b"more")
    assert not capture.keeping and capture.body == b"" and flights == {}
    assert joiner.events[-1] == b"more"  # a joiner already there still gets the bytes
    assert not capture.join(RecordingJoiner())


# -- configuration -----------------------------------------------------------------------------


def cached_config(route_cache: Any = None, **top: Any) -> dict[str, Any]:
    config = base_config(**top)
    config["routes"][0]["cache"] = {"ttl": 60} if route_cache is None else route_cache
    config["routes"][0]["name"] = "claude"
    return config


def test_config_defaults_and_errors_name_the_key() -> None:
    parsed = parse_config(cached_config({}))
    route = parsed.routes[0]
    assert route.cache is not None and route.cache.ttl == 60.0 and route.cache.scope == "client"
    assert parsed.cache.memory_bytes == 64 * 1024 * 1024
    with pytest.raises(ConfigErrors) as info:
        parse_config(cached_config({"ttl": 0, "scope": "everyone", "extra": 1},
                                   cache={"memory_bytes": 10, "max_entry_bytes": 20}))
    text = str(info.value)
    assert "routes[0].cache.ttl" in text
    assert "routes[0].cache.scope" in text
    assert "routes[0].cache.extra" in text
    assert "cache.max_entry_bytes" in text


def test_route_names_are_unique() -> None:
    config = cached_config()
    config["routes"][1]["name"] = "claude"
    with pytest.raises(ConfigErrors, match=r"routes\[1\]\.name"):
        parse_config(config)


# -- through the relay -------------------------------------------------------------------------


@pytest.fixture
def harness() -> Iterator[Harness]:
    config = cached_config({"ttl": 60, "stale_if_error": 300})
    config["routes"][1]["cache"] = {"ttl": 60}
    h = Harness(config)
    yield h
    h.close()


def test_second_identical_call_is_a_hit(harness: Harness) -> None:
    first = harness.call("POST", "/v1/messages", MESSAGE)
    second = harness.call("POST", "/v1/messages", MESSAGE)
    assert first[0] == second[0] == 200
    assert first[1]["x-relayd-cache"] == ["miss"]
    assert second[1]["x-relayd-cache"] == ["hit"] and second[1]["age"] == ["0"]
    assert second[2] == first[2]
    assert second[1]["x-relayd-request-id"] != first[1]["x-relayd-request-id"]
    assert second[1]["content-length"] == [str(len(first[2]))]
    assert len(harness.upstreams["us"].seen) + len(harness.upstreams["eu"].seen) == 1
    hit = harness.logs.access()[-1]
    assert hit["cache"] == "hit" and hit["provider"] == "(cache)" and hit["attempts"] == 0


def test_entries_belong_to_their_client(harness: Harness) -> None:
    harness.call("POST", "/v1/messages", MESSAGE)
    other = harness.call("POST", "/v1/messages", MESSAGE, key=OTHER_KEY)
    assert other[1]["x-relayd-cache"] == ["miss"]


def test_shared_scope_serves_every_client() -> None:
    h = Harness(cached_config({"scope": "shared"}))
    try:
        h.call("POST", "/v1/messages", MESSAGE)
        shared = h.call("POST", "/v1/messages", MESSAGE, key=OTHER_KEY)
        assert shared[1]["x-relayd-cache"] == ["hit"]
    finally:
        h.close()


@pytest.mark.parametrize(("change", "headers"), [
    ({"temperature": 1}, {}),
    ({"temperature": None}, {}),
    ({}, {"cache-control": "no-store"}),
])
def test_bypass_neither_looks_up_nor_stores(
    harness: Harness, change: dict[str, Any], headers: dict[str, str]
) -> None:
    body = {k: v for k, v in {**MESSAGE, **change}.items() if v is not None}
    assert harness.call("POST", "/v1/messages", body, headers=headers)[1]["x-relayd-cache"] == [
        "bypass"]
    again = harness.call("POST", "/v1/messages", body)
    assert again[1]["x-relayd-cache"] == ["miss" if change == {} else "bypass"]


def test_no_cache_refreshes_the_entry(harness: Harness) -> None:
    harness.call("POST", "/v1/messages", MESSAGE)
    fresh = harness.call("POST", "/v1/messages", MESSAGE, headers={"cache-control": "no-cache"})
    assert fresh[1]["x-relayd-cache"] == ["bypass"]
    assert harness.call("POST", "/v1/messages", MESSAGE)[1]["x-relayd-cache"] == ["hit"]
    seen = len(harness.upstreams["us"].seen) + len(harness.upstreams["eu"].seen)
    assert seen == 2


def test_max_age_zero_refuses_an_entry_of_any_age(harness: Harness) -> None:
    harness.call("POST", "/v1/messages", MESSAGE)
    harness.clock.advance(1)
    again = harness.call("POST", "/v1/messages", MESSAGE, headers={"cache-control": "max-age=0"})
    assert again[1]["x-relayd-cache"] == ["miss"]


def test_errors_are_never_stored(harness: Harness) -> None:
    for upstream in harness.upstreams.values():
        upstream.handler = lambda request, body: json_reply(
            request, {"type": "error", "error": {"type": "invalid_request_error"}}, 400)
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 400
    assert harness.call("POST", "/v1/messages", MESSAGE)[1]["x-relayd-cache"] == ["miss"]


def test_stale_entry_served_when_every_target_fails(harness: Harness) -> None:
    first = harness.call("POST", "/v1/messages", MESSAGE)
    harness.clock.advance(61)  # expired, inside stale_if_error

    def overloaded(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"type": "error", "error": {"type": "overloaded_error"}}, 529)

    for upstream in harness.upstreams.values():
        upstream.handler = overloaded
    stale = harness.call("POST", "/v1/messages", MESSAGE)
    assert stale[0] == 200 and stale[1]["x-relayd-cache"] == ["stale"]
    assert stale[1]["age"] == ["61"] and stale[2] == first[2]
    harness.clock.advance(300)  # past the stale window: the failure is relayed
    assert harness.call("POST", "/v1/messages", MESSAGE)[0] == 529


def stream_reply(events: list[bytes]) -> Any:
    def reply(request: Request, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream")
        return b"".join(events)
    return reply


START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_s",'
         b'"usage":{"input_tokens":3}}}\n\n')
DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
         b'"delta":{"type":"text_delta","text":"hi"}}\n\n')
END = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
       b'"end_turn"},"usage":{"output_tokens":7}}\n\n'
       b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_stream_replayed_verbatim(harness: Harness) -> None:
    for upstream in harness.upstreams.values():
        upstream.handler = stream_reply([START, DELTA, END])
    body = {**MESSAGE, "stream": True}
    first = harness.call("POST", "/v1/messages", body)
    second = harness.call("POST", "/v1/messages", body)
    assert second[1]["x-relayd-cache"] == ["hit"]
    assert second[2] == first[2] == START + DELTA + END
    assert second[1]["content-type"] == ["text/event-stream"]
    assert harness.logs.access()[-1]["output_tokens"] == 7


def test_truncated_stream_is_never_stored(harness: Harness) -> None:
    for upstream in harness.upstreams.values():
        upstream.handler = stream_reply([START, DELTA])  # no message_stop
    body = {**MESSAGE, "stream": True}
    harness.call("POST", "/v1/messages", body)
    assert harness.call("POST", "/v1/messages", body)[1]["x-relayd-cache"] == ["miss"]


def test_openai_route_and_hits_counted_apart_in_usage(harness: Harness) -> None:
    def chat(request: Request, body: bytes) -> bytes:
        return json_reply(request, {"id": "c1", "object": "chat.completion", "choices": [],
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    harness.upstreams["main"].handler = chat
    harness.call("POST", "/v1/chat/completions", CHAT, api="openai")
    hit = harness.call("POST", "/v1/chat/completions", CHAT, api="openai")
    assert hit[1]["x-relayd-cache"] == ["hit"]
    snapshot: dict[str, Any] = {}
    harness.runtime.store.usage_snapshot().addCallback(snapshot.update)
    team = snapshot["clients"]["team-a"]
    assert team["requests"] == 1 and team["input_tokens"] == 5
    assert team["cached"]["requests"] == 1 and team["cached"]["input_tokens"] == 5
    stats = harness.runtime.response_cache.stats()
    assert stats["lookups"]["hit"] == 1 and stats["lookups"]["miss"] == 1
    assert stats["memory"]["entries"] == 1


def test_client_limits_count_a_hit_as_a_request() -> None:
    config = cached_config()
    config["clients"][0]["limits"] = {"requests_per_minute": 2}
    h = Harness(config)
    try:
        assert h.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert h.call("POST", "/v1/messages", MESSAGE)[1]["x-relayd-cache"] == ["hit"]
        refused = h.call("POST", "/v1/messages", MESSAGE)
        assert refused[0] == 429
        assert json.loads(refused[2])["error"]["type"] == "rate_limit_error"
    finally:
        h.close()


def test_reload_keeps_memory_unless_its_size_changes(harness: Harness) -> None:
    from relayd.runtime import RelayRuntime
    from relayd.runtime_diff import plan_reload

    harness.call("POST", "/v1/messages", MESSAGE)
    cache = harness.runtime.response_cache
    cache.model_lists[("anthropic",)] = (1e9, [])
    same = parse_config(cached_config({"ttl": 5}))
    runtime = RelayRuntime(same, harness.clock, carry=plan_reload(harness.runtime, same))
    assert runtime.response_cache is cache and len(cache.memory) == 1
    assert cache.model_lists == {}  # asked afresh: the providers may have changed
    bigger = parse_config(cached_config({"ttl": 5}, cache={"memory_bytes": 1 << 24}))
    RelayRuntime(bigger, harness.clock, carry=plan_reload(runtime, bigger))
    assert len(cache.memory) == 0 and cache.memory.max_bytes == 1 << 24


# -- coalescing in memory ----------------------------------------------------------------------


def send(harness: Harness, body: dict[str, Any]) -> list[Any]:
    """Start one request without waiting for it; the list gets its response."""
    results: list[Any] = []
    d = harness.client.request(
        "POST", "http://relay.test/v1/messages", data=json.dumps(body).encode(),
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
    )
    d.addBoth(results.append)
    harness.flush()
    return results


def read(harness: Harness, results: list[Any]) -> tuple[list[str], bytes]:
    assert results, "no answer yet"
    response = results[0]
    content: list[Any] = []
    harness.client.content(response).addBoth(content.append)
    harness.flush()
    assert content and isinstance(content[0], bytes), content
    states = response.headers.getRawHeaders(b"x-relayd-cache") or []
    return [state.decode() for state in states], content[0]


@pytest.mark.parametrize("streamed", [False, True])
def test_identical_requests_in_flight_share_one_upstream_call(streamed: bool) -> None:
    h = Harness(cached_config({"coalesce": True}))
    held = h.hold_upstreams()
    body = {**MESSAGE, "stream": streamed}
    try:
        waiting = [send(h, body) for _ in range(3)]
        assert len(held) == 1  # one went upstream, two wait for it
        request = held[0]
        if streamed:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(START + DELTA)
            h.flush()
            late = send(h, body)  # joins a stream under way: gets what was sent, then more
            request.write(END)
        else:
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"id":"msg_1","usage":{"input_tokens":3,"output_tokens":4}}')
            late = None
        request.finish()
        h.flush()
        answers = [read(h, w) for w in waiting + ([late] if late is not None else [])]
        assert [a[0] for a in answers] == [["miss"]] + [["hit"]] * (len(answers) - 1)
        assert len({a[1] for a in answers}) == 1
        assert len(held) == 1
        assert h.runtime.response_cache.coalesced == len(answers) - 1
        assert h.runtime.response_cache.flights == {}
    finally:
        h.close()


def test_waiters_of_a_failed_leader_go_upstream_themselves() -> None:
    h = Harness(cached_config({"coalesce": True}))
    held = h.hold_upstreams()
    try:
        first, second = send(h, MESSAGE), send(h, MESSAGE)
        assert len(held) == 1
        held[0].setResponseCode(400)
        held[0].setHeader(b"content-type", b"application/json")
        held[0].write(b'{"type":"error","error":{"type":"invalid_request_error"}}')
        held[0].finish()
        h.flush()
        assert len(held) == 2  # the waiter asked upstream itself
        held[1].setHeader(b"content-type", b"application/json")
        held[1].write(b'{"id":"msg_2"}')
        held[1].finish()
        h.flush()
        assert first[0].code == 400
        assert read(h, second) == (["miss"], b'{"id":"msg_2"}')
    finally:
        h.close()


class JoinedHost:
    """The exchange as a joiner sees it: what reached its client."""

    done = False
    usage: Any = None
    outcome = "ok"
    request_id = "req_test"
    family = PROVIDERS["anthropic"]

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.ended: list[tuple[bool, bool]] = []
        self.head = False
        host = self

        class Request:
            def write(self, data: bytes) -> None:
                host.written.append(data)

            def registerProducer(self, producer: Any, streaming: bool) -> None:
                pass

            def unregisterProducer(self) -> None:
                pass

        self.request = Request()

    def from_cache(self, usage: Any) -> None:
        self.head = True

    def stream_opened(self) -> None:
        pass

    def finish(self) -> None:
        broken = self.outcome != "ok"
        if broken:
            self.written.pop()  # the error event
        self.ended.append((self.usage is not None, not broken))
        self.done = True


def joiner_with_limit(limit: int) -> tuple[Any, JoinedHost]:
    from relayd.http.caching import FlightJoiner

    class Stage:
        host = JoinedHost()

        class cache:  # noqa: N801 - stands for the ResponseCache's config
            class config:  # noqa: N801
                max_entry_bytes = limit

        def write_head(self, headers: Any, state: str, age: float) -> None:
            pass

    stage = Stage()
    return FlightJoiner(stage), stage.host  # type: ignore[arg-type]


def test_a_paused_joiner_queues_for_itself_and_catches_up() -> None:
    joiner, host = joiner_with_limit(100)
    joiner.flight_started(200, ())
    joiner.flight_data(b"a")
    joiner.pauseProducing()
    joiner.flight_data(b"b")
    joiner.flight_data(b"c")
    joiner.flight_ended(entry(), True)
    assert host.written == [b"a"] and host.ended == []  # its client is slow: nothing ends
    joiner.resumeProducing()
    assert host.written == [b"a", b"b", b"c"] and host.ended == [(True, True)]


def test_a_joiner_too_far_behind_is_ended() -> None:
    joiner, host = joiner_with_limit(3)
    joiner.flight_started(200, ())
    joiner.pauseProducing()
    joiner.flight_data(b"ab")
    joiner.flight_data(b"cd")
    assert host.ended == [(False, False)]  # ended as a broken stream, queue dropped
    assert host.written == []


def leader_of(h: Harness) -> Any:
    """The exchange that leads the one flight in progress."""
    leaders = [e for e in h.resource.active if e.cache is not None and e.cache.capture]
    assert len(leaders) == 1
    return leaders[0]


def test_a_stream_goes_on_for_its_waiters_when_the_leaders_client_leaves() -> None:
    h = Harness(cached_config({"coalesce": True}))
    held = h.hold_upstreams()
    body = {**MESSAGE, "stream": True}
    try:
        send(h, body)
        waiter = send(h, body)
        upstream_request = held[0]
        upstream_request.setHeader(b"content-type", b"text/event-stream")
        upstream_request.write(START + DELTA)
        h.flush()
        leader = leader_of(h)
        lose_client(leader)
        assert not leader.done  # goes on for the waiter
        upstream_request.write(END)
        upstream_request.finish()
        h.flush()
        assert leader.done and leader.outcome == "client_gone"
        assert read(h, waiter) == (["hit"], START + DELTA + END)
        assert len(h.runtime.response_cache.memory) == 1  # complete: stored all the same
        assert h.call("POST", "/v1/messages", body)[1]["x-relayd-cache"] == ["hit"]
        assert len(held) == 1
    finally:
        h.close()


def test_a_leader_whose_client_and_waiters_all_left_stops() -> None:
    h = Harness(cached_config({"coalesce": True}))
    held = h.hold_upstreams()
    body = {**MESSAGE, "stream": True}
    try:
        send(h, body)
        send(h, body)
        held[0].setHeader(b"content-type", b"text/event-stream")
        held[0].write(START + DELTA)
        h.flush()
        leader = leader_of(h)
        joiner = next(e for e in h.resource.active if e is not leader)
        lose_client(leader)
        assert not leader.done
        lose_client(joiner)
        assert leader.done and joiner.done
        h.turn()  # (their access lines)
        assert h.resource.active == set()
        assert h.runtime.response_cache.flights == {}
        assert len(h.runtime.response_cache.memory) == 0
    finally:
        h.close()
