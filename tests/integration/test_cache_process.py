"""The response cache through real processes: ``twistd -n relayd``, the fake upstream, Redis.

Every check is on what the official SDKs (or a plain HTTP client) got, the
``x-relayd-cache`` header, what the fake upstream received, and ``/admin/cache``.
Concurrency is arranged by polling: a first request is known to be in flight (the fake
upstream has recorded it, and holds its answer for ``latency`` seconds) before the
identical ones are sent. No assertion is on how long anything took.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
from support import CLIENT_KEY, LIMITED_KEY, backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.exposition import metric_samples
from relayd.testing.processes import (
    FakeUpstreamProcess,
    RedisServerProcess,
    RelaydProcess,
    wait_for,
)

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]

MODEL = "claude-cache-1"
ANTHROPIC_HEADERS = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01",
                     "content-type": "application/json"}
# Long enough that every identical request is sent while the first one waits upstream.
LATENCY = 1.0


def message(text: str = "Hello cache", **extra: Any) -> dict[str, Any]:
    """A Messages request body the cache keeps (``temperature: 0``)."""
    return {"model": MODEL, "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "user", "content": text}], **extra}


def sdk(text: str = "Hello cache", model: str = MODEL) -> dict[str, Any]:
    """The same request as ``anthropic`` SDK arguments. The SDK (API version 2026-10-21)
    has no ``temperature`` parameter any more, so ``temperature: 0`` goes in the body."""
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}],
            "extra_body": {"temperature": 0}}


# -- configuration and processes ---------------------------------------------------------------


def cache_config(
    certs: TestCertificates,
    anthropic_up: FakeUpstreamProcess,
    openai_up: FakeUpstreamProcess | None = None,
    cache: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An admin listener, no health probes, routes ``claude`` (and ``gpt``) with ``cache``."""
    config = relay_config(
        certs, [backend("a1", anthropic_up)],
        [backend("o1", openai_up)] if openai_up is not None else [],
        admin={"address": "127.0.0.1:0"}, health={"enabled": False}, **extra,
    )
    settings = {} if cache is None else cache
    config["routes"] = routes or [
        {"api": "anthropic", "name": "claude", "models": ["claude-*"], "provider": "anthropic",
         "cache": settings},
    ]
    if openai_up is not None and routes is None:
        config["routes"].append(
            {"api": "openai", "name": "gpt", "provider": "openai", "cache": settings}
        )
    config["providers"] = [p for p in config["providers"] if p["backends"]]
    return config


@dataclass
class Relay:
    url: str  # the plain HTTP listener
    admin: str  # the admin listener
    log: Path

    def stats(self) -> dict[str, Any]:
        document: dict[str, Any] = httpx2.get(self.admin + "/admin/cache", timeout=10).json()
        return document

    def metric(self, name: str) -> float | None:
        """The first sample of ``name`` in ``/metrics``."""
        samples = metric_samples(httpx2.get(self.admin + "/metrics", timeout=10).text, name)
        return samples[0][1] if samples else None


def start(relayd_factory: RelaydFactory, config: dict[str, Any], name: str = "relayd") -> Relay:
    """Start a relay and wait until it is ready."""
    process: RelaydProcess = relayd_factory(config, name=name)
    relay = Relay(process.url("http"), process.admin_url(), process.log_path)

    def ready() -> bool:
        try:
            return httpx2.get(relay.admin + "/readyz", timeout=5).status_code == 200
        except httpx2.HTTPError:
            return False

    wait_for(ready, 20, f"relayd {name} to be ready", process.log_path)
    return relay


def anthropic_client(url: str, key: str = CLIENT_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key, base_url=url, max_retries=0,
        http_client=httpx2.Client(timeout=30, limits=httpx2.Limits(max_connections=40)),
    )


def post_message(url: str, body: dict[str, Any], **headers: str) -> httpx2.Response:
    """A raw ``POST /v1/messages`` (a stream's body is read whole)."""
    return httpx2.post(url + "/v1/messages", json=body, headers={**ANTHROPIC_HEADERS, **headers},
                       timeout=30)


def upstream_calls(upstream: FakeUpstreamProcess, path: str = "/v1/messages") -> list[Any]:
    return [r for r in upstream.requests() if r["path"] == path]


def in_flight(upstream: FakeUpstreamProcess, count: int = 1) -> bool:
    """The fake upstream has received ``count`` requests (still being answered or not)."""
    return len(upstream.requests()) >= count


def cache_header(response: Any) -> str | None:
    value: str | None = response.headers.get("x-relayd-cache")
    return value


# -- 1. JSON answers ---------------------------------------------------------------------------


def test_anthropic_create_twice_is_one_upstream_request(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    upstream = upstream_factory("a1")
    client = anthropic_client(start(relayd_factory, cache_config(certs, upstream)).url)
    first = client.messages.with_raw_response.create(**sdk())
    second = client.messages.with_raw_response.create(**sdk())
    assert cache_header(first) == "miss"
    assert cache_header(second) == "hit"
    assert "age" in second.headers and int(second.headers["age"]) >= 0
    one, two = first.parse(), second.parse()
    assert one.id == two.id and one.id.startswith("msg_")
    assert one.model_dump() == two.model_dump()
    assert len(upstream_calls(upstream)) == 1
    assert json.loads(upstream_calls(upstream)[0]["body"])["temperature"] == 0
    # The SDK's own request (no temperature: the API's default samples) is not cached.
    sampled = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hello cache"}]
    )
    assert cache_header(sampled) == "bypass"
    assert sampled.parse().id != one.id
    assert len(upstream_calls(upstream)) == 2


# -- 2. streams --------------------------------------------------------------------------------


def _stream_events(client: anthropic.Anthropic, body: dict[str, Any]) -> tuple[
    str | None, list[tuple[str, str]], str
]:
    """One ``messages.stream``: its cache header, events (type, text) and message id."""
    events: list[tuple[str, str]] = []
    with client.messages.stream(**body) as stream:
        header = cache_header(stream.response)
        for event in stream:
            text = ""
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text = event.delta.text
            elif event.type == "message_start":
                text = event.message.id
            elif event.type == "text":
                text = event.text
            events.append((event.type, text))
        final = stream.get_final_message()
    return header, events, final.id


def test_stream_is_replayed_with_the_same_events_and_bytes(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    upstream = upstream_factory("a1")
    upstream.configure(chunks=6)
    url = start(relayd_factory, cache_config(certs, upstream)).url
    client = anthropic_client(url)
    head1, events1, id1 = _stream_events(client, sdk("stream me"))
    head2, events2, id2 = _stream_events(client, sdk("stream me"))
    assert (head1, head2) == ("miss", "hit")
    assert events1 == events2 and id1 == id2
    assert sum(1 for kind, _ in events1 if kind == "content_block_delta") == 6
    streamed = upstream_calls(upstream)
    assert len(streamed) == 1 and json.loads(streamed[0]["body"])["stream"] is True
    # The exact bytes: a second stream (another question) read raw, missed then hit.
    raw1 = post_message(url, message("raw bytes", stream=True))
    raw2 = post_message(url, message("raw bytes", stream=True))
    assert raw1.status_code == raw2.status_code == 200
    assert (cache_header(raw1), cache_header(raw2)) == ("miss", "hit")
    assert raw1.headers["content-type"].startswith("text/event-stream")
    assert raw2.headers["content-type"] == raw1.headers["content-type"]
    assert b"event: message_stop" in raw1.content
    assert raw2.content == raw1.content
    assert len(upstream_calls(upstream)) == 2


# -- 3. scope ----------------------------------------------------------------------------------


def test_client_scope_keeps_clients_apart_and_shared_scope_does_not(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    upstream = upstream_factory("a1")
    routes = [
        {"api": "anthropic", "name": "private", "models": ["claude-private"],
         "provider": "anthropic", "cache": {}},
        {"api": "anthropic", "name": "common", "models": ["claude-common"],
         "provider": "anthropic", "cache": {"scope": "shared"}},
    ]
    url = start(relayd_factory, cache_config(certs, upstream, routes=routes)).url
    team_a, team_b = anthropic_client(url), anthropic_client(url, LIMITED_KEY)
    private = sdk(model="claude-private")
    a = team_a.messages.with_raw_response.create(**private)
    b = team_b.messages.with_raw_response.create(**private)
    assert (cache_header(a), cache_header(b)) == ("miss", "miss")
    assert a.parse().id != b.parse().id
    assert len(upstream_calls(upstream)) == 2
    # Each client still has its own entry.
    assert cache_header(team_b.messages.with_raw_response.create(**private)) == "hit"
    common = sdk(model="claude-common")
    a = team_a.messages.with_raw_response.create(**common)
    b = team_b.messages.with_raw_response.create(**common)
    assert (cache_header(a), cache_header(b)) == ("miss", "hit")
    assert a.parse().id == b.parse().id
    assert len(upstream_calls(upstream)) == 3


# -- 4. coalescing in one process --------------------------------------------------------------


def _concurrently(
    upstream: FakeUpstreamProcess, count: int, call: Callable[[int], Any]
) -> list[Any]:
    """``call(0)`` first; once the upstream has it, ``call(1..count-1)`` all at once."""
    with ThreadPoolExecutor(count) as pool:
        first: Future[Any] = pool.submit(call, 0)
        wait_for(lambda: in_flight(upstream) or first.done(), 10, "the first request upstream")
        assert not first.done(), "the first request ended before the others were sent"
        barrier = threading.Barrier(count - 1)

        def together(i: int) -> Any:
            barrier.wait(10)
            return call(i)

        rest = [pool.submit(together, i) for i in range(1, count)]
        return [first.result(30)] + [f.result(30) for f in rest]


def test_coalescing_json_and_streams(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    upstream = upstream_factory("a1")
    upstream.configure(latency=LATENCY)
    relay = start(relayd_factory, cache_config(certs, upstream, cache={"coalesce": True}))
    client = anthropic_client(relay.url)

    def create(_: int) -> tuple[str | None, dict[str, Any]]:
        raw = client.messages.with_raw_response.create(**sdk("together"))
        return cache_header(raw), raw.parse().model_dump()

    answers = _concurrently(upstream, 20, create)
    assert len(upstream_calls(upstream)) == 1
    assert Counter(header for header, _ in answers) == {"miss": 1, "hit": 19}
    bodies = [body for _, body in answers]
    assert all(body == bodies[0] for body in bodies) and bodies[0]["content"][0]["text"]
    # They joined the one in flight (not hits on its stored answer, after it).
    wait_for(lambda: relay.stats()["lookups"]["hit"] == 19, 10, "the counters")
    assert relay.stats()["coalesced"] == 19

    upstream.reset()
    upstream.configure(latency=LATENCY, chunks=5, chunk_delay=0.02)
    streams = _concurrently(upstream, 20, lambda _: _stream_events(client, sdk("flow")))
    recorded = upstream_calls(upstream)
    assert len(recorded) == 1 and json.loads(recorded[0]["body"])["stream"] is True
    assert Counter(header for header, _, _ in streams) == {"miss": 1, "hit": 19}
    _, events, message_id = streams[0]
    assert sum(1 for kind, _ in events if kind == "content_block_delta") == 5
    assert events[-1][0] == "message_stop"
    assert all(e == events and i == message_id for _, e, i in streams)
    wait_for(lambda: relay.stats()["lookups"]["hit"] == 38, 10, "the counters")
    assert relay.stats()["coalesced"] == 38 and relay.stats()["in_flight"] == 0


# -- 5. two instances, one Redis ---------------------------------------------------------------


def redis_state(redis: RedisServerProcess) -> dict[str, Any]:
    """The ``state`` section sharing ``redis`` (and so the cache's shared level)."""
    return {"store": "redis", "url": redis.url, "timeout": 0.5}


def _cache_keys(redis: RedisServerProcess) -> bytes:
    return redis.command("KEYS", "*:cache:*")


def test_two_instances_share_entries_and_coalesce_through_redis(
    certs: TestCertificates,
    upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
    redis_server: RedisServerProcess,
) -> None:
    upstream = upstream_factory("a1")
    state = redis_state(redis_server)
    config = cache_config(certs, upstream, cache={"coalesce": True}, state=state)
    one, two = start(relayd_factory, config, "one"), start(relayd_factory, config, "two")
    a, b = anthropic_client(one.url), anthropic_client(two.url)

    first = a.messages.with_raw_response.create(**sdk("shared"))
    assert cache_header(first) == "miss"
    # The instance stores in Redis after answering: wait until the entry is there.
    wait_for(lambda: b"cache:claude:team-a:" in _cache_keys(redis_server), 10,
             "the entry in Redis")
    second = b.messages.with_raw_response.create(**sdk("shared"))
    assert cache_header(second) == "hit"
    assert second.parse().model_dump() == first.parse().model_dump()
    assert len(upstream_calls(upstream)) == 1
    stats = two.stats()
    assert stats["shared_hits"] == 1 and stats["shared"] == {"errors": 0}

    # Coalescing across instances: the first request holds the lock upstream; identical
    # ones on both instances wait for its answer.
    upstream.reset()
    upstream.configure(latency=LATENCY)
    clients = [a, b]

    def create(i: int) -> tuple[str | None, dict[str, Any]]:
        raw = clients[i % 2].messages.with_raw_response.create(**sdk("across"))
        return cache_header(raw), raw.parse().model_dump()

    answers = _concurrently(upstream, 10, create)
    assert len(upstream_calls(upstream)) == 1
    assert Counter(header for header, _ in answers) == {"miss": 1, "hit": 9}
    assert all(body == answers[0][1] for _, body in answers)
    # Four joined the flight on the first instance; on the second, one waited on the
    # Redis lock (and found the answer there), four joined it.
    wait_for(lambda: one.stats()["lookups"]["hit"] + two.stats()["lookups"]["hit"] == 10,
             10, "the counters")
    first_stats, second_stats = one.stats(), two.stats()
    assert first_stats["coalesced"] == 4
    assert second_stats["coalesced"] == 5 and second_stats["shared_hits"] == 2


def test_a_failed_lock_holder_releases_the_other_instances_waiters(
    certs: TestCertificates,
    upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
    redis_server: RedisServerProcess,
) -> None:
    """In one process a leader that gets no answer to share sends its joiners upstream at
    once (flights.py); across instances the waiter should not wait out coalesce_wait
    either once the lock holder is done."""
    upstream = upstream_factory("a1")
    state = redis_state(redis_server)
    config = cache_config(certs, upstream, cache={"coalesce": True}, state=state,
                          forward_headers=["x-fake-*"])
    config["cache"] = {"coalesce_wait": 5}
    one, two = start(relayd_factory, config, "one"), start(relayd_factory, config, "two")
    body = message("lock holder fails")
    with ThreadPoolExecutor(2) as pool:
        # Only the leader's request fails (the fake's knobs as headers: not in the key).
        leader = pool.submit(post_message, one.url, body, **{"x-fake-status": "400",
                                                             "x-fake-latency": "1"})
        wait_for(lambda: in_flight(upstream) or leader.done(), 10, "the leader upstream")
        assert not leader.done()
        waiter = pool.submit(post_message, two.url, body)
        assert leader.result(30).status_code == 400
        answer = waiter.result(30)
    assert answer.status_code == 200 and cache_header(answer) == "miss"
    assert "no answer from the instance coalescing" not in two.log.read_text()


# -- 6. Redis gone -----------------------------------------------------------------------------


def test_redis_outage_serves_from_memory_without_client_errors(
    certs: TestCertificates,
    upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
    redis_server: RedisServerProcess,
) -> None:
    upstream = upstream_factory("a1")
    state = redis_state(redis_server)
    relay = start(relayd_factory, cache_config(certs, upstream, cache={"coalesce": True},
                                               state=state))
    client = anthropic_client(relay.url)
    before = client.messages.with_raw_response.create(**sdk("before"))
    assert cache_header(before) == "miss"
    wait_for(lambda: b"cache:claude:team-a:" in _cache_keys(redis_server), 10,
             "the entry in Redis")
    redis_server.kill()
    results = [
        client.messages.with_raw_response.create(**sdk(text))
        for text in ("before", "after", "after", "after")
    ]
    assert [r.status_code for r in results] == [200] * 4
    assert [cache_header(r) for r in results] == ["hit", "miss", "hit", "hit"]
    assert results[0].parse().id == before.parse().id
    assert results[1].parse().id == results[2].parse().id == results[3].parse().id
    assert results[1].parse().id != before.parse().id
    assert len(upstream_calls(upstream)) == 2
    stats = relay.stats()
    assert stats["lookups"] == {"hit": 3, "miss": 2, "bypass": 0, "stale": 0}
    assert stats["shared"]["errors"] >= 1  # "after": its lookup, lock and store failed


def test_redis_outage_seen_by_the_cache_alone_is_reported(
    certs: TestCertificates,
    upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
    redis_server: RedisServerProcess,
) -> None:
    """No client limits: only the cache uses Redis. Its failures must still mark Redis
    down (logged once, ``relayd_state_store_up`` 0), as ``RedisStore.command`` says."""
    upstream = upstream_factory("a1")
    state = redis_state(redis_server)
    relay = start(relayd_factory, cache_config(certs, upstream, state=state))
    client = anthropic_client(relay.url)
    assert relay.metric("relayd_state_store_up") == 1.0
    redis_server.kill()
    counter = iter(range(1000))

    def seen_down() -> bool:
        answer = client.messages.with_raw_response.create(**sdk(f"q{next(counter)}"))
        assert answer.status_code == 200 and cache_header(answer) == "miss"
        return relay.metric("relayd_state_store_up") == 0.0

    wait_for(seen_down, 5, "relayd_state_store_up to fall to 0")
    assert relay.stats()["shared"]["errors"] >= 1


# -- 7. stale-if-error -------------------------------------------------------------------------


def test_stale_answer_when_every_target_fails(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    upstream = upstream_factory("a1")
    url = start(relayd_factory, cache_config(certs, upstream,
                                             cache={"ttl": 1, "stale_if_error": 300})).url
    original = post_message(url, message("keep me"))
    assert original.status_code == 200 and cache_header(original) == "miss"
    upstream.configure(status=529)
    seen: list[tuple[int, str | None]] = []

    def stale() -> httpx2.Response | None:
        response = post_message(url, message("keep me"))
        seen.append((response.status_code, cache_header(response)))
        return response if cache_header(response) == "stale" else None

    answer: httpx2.Response = wait_for(stale, 15, "a stale answer")
    assert all(status == 200 and state in ("hit", "stale") for status, state in seen), seen
    assert answer.content == original.content
    assert int(answer.headers["age"]) >= 1
    assert any(r["status"] == 529 for r in upstream_calls(upstream))
    # The upstream back: a fresh answer again.
    upstream.configure(status=None)
    fresh = post_message(url, message("keep me"))
    assert fresh.status_code == 200 and cache_header(fresh) == "miss"
    assert fresh.json()["id"] != original.json()["id"]


# -- 8. OpenAI, /admin/cache and purge ---------------------------------------------------------


def test_openai_chat_hit_admin_stats_and_purge(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    anthropic_up, openai_up = upstream_factory("a1"), upstream_factory("o1")
    relay = start(relayd_factory, cache_config(certs, anthropic_up, openai_up))
    admin = relay.admin
    client = openai.OpenAI(api_key=CLIENT_KEY, base_url=relay.url + "/v1",
                           max_retries=0, http_client=httpx2.Client(timeout=30))

    def chat() -> Any:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o", temperature=0, messages=[{"role": "user", "content": "Hi cache"}]
        )

    first, second = chat(), chat()
    assert (cache_header(first), cache_header(second)) == ("miss", "hit")
    assert first.parse().model_dump() == second.parse().model_dump()
    assert len(upstream_calls(openai_up, "/v1/chat/completions")) == 1

    counted = wait_for(lambda: (s := relay.stats())["lookups"]["hit"] == 1 and s, 10,
                       "the counters")
    assert counted["lookups"] == {"hit": 1, "miss": 1, "bypass": 0, "stale": 0}
    assert counted["stores"] == 1 and counted["memory"]["entries"] == 1
    assert counted["shared"] is None  # memory store: no shared level
    # Purging another route leaves it; purging this one empties it.
    other = httpx2.post(admin + "/admin/cache/purge?route=claude", timeout=10)
    assert other.status_code == 200 and other.json()["purged"] == {"memory": 0}
    assert cache_header(chat()) == "hit"
    purged = httpx2.post(admin + "/admin/cache/purge?route=gpt", timeout=10)
    assert purged.status_code == 200
    assert purged.json() == {"route": "gpt", "client": None, "purged": {"memory": 1}}
    assert httpx2.get(admin + "/admin/cache/purge", timeout=10).status_code == 405
    third = chat()
    assert cache_header(third) == "miss"
    assert third.parse().id != first.parse().id
    assert len(upstream_calls(openai_up, "/v1/chat/completions")) == 2


# -- 9. the client's Cache-Control -------------------------------------------------------------


def test_cache_control_from_the_client(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    upstream = upstream_factory("a1")
    url = start(relayd_factory, cache_config(certs, upstream)).url
    body = message("controls")

    def ask(**headers: str) -> tuple[str | None, str]:
        response = post_message(url, body, **headers)
        assert response.status_code == 200
        return cache_header(response), response.json()["id"]

    state, first = ask()
    assert state == "miss"
    state, unstored = ask(**{"cache-control": "no-store"})
    assert state == "bypass" and unstored != first
    assert ask() == ("hit", first)  # no-store kept nothing
    state, refreshed = ask(**{"cache-control": "no-cache"})
    assert state == "bypass" and refreshed not in (first, unstored)
    assert ask() == ("hit", refreshed)  # no-cache fetched anew and stored that
    assert ask(**{"cache-control": "max-age=3600"}) == ("hit", refreshed)
    state, younger = ask(**{"cache-control": "max-age=0"})
    assert state == "miss" and younger != refreshed
    assert len(upstream_calls(upstream)) == 4
    # The body's key order and spacing are not part of the key.
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)
    response = httpx2.post(url + "/v1/messages", content=reordered, headers=ANTHROPIC_HEADERS,
                           timeout=30)
    assert (cache_header(response), response.json()["id"]) == ("hit", younger)


def test_a_sampled_route_caches_the_sdks_default_request(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    """The SDK's request without ``temperature`` samples: cached with ``sampled: true``."""
    upstream = upstream_factory("a1")
    client = anthropic_client(
        start(relayd_factory, cache_config(certs, upstream, cache={"sampled": True})).url
    )
    plain: dict[str, Any] = {"model": MODEL, "max_tokens": 64,
                             "messages": [{"role": "user", "content": "hi"}]}
    first = client.messages.with_raw_response.create(**plain)
    second = client.messages.with_raw_response.create(**plain)
    assert (cache_header(first), cache_header(second)) == ("miss", "hit")
    assert first.parse().id == second.parse().id
    assert len(upstream_calls(upstream)) == 1
