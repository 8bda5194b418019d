"""The load-and-fault suite: relayd with its default settings, as real processes on
127.0.0.1, under the traffic that broke the first release in the field.

Each scenario fails loudly on counts, statuses, logs and (for the soak) an RSS bound;
timings are reported (tests/load/conftest.py), never asserted. Clients are the asyncio
load generator of :mod:`relayd.testing.loadgen`, speaking raw HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relayd.testing.exposition import metric_sum
from relayd.testing.loadgen import (
    HttpConnection,
    Response,
    Tally,
    Target,
    build_request,
    chat_body,
    check,
    concurrent_batch,
    connect,
    give_up,
    hang_up_mid_answer,
    memory_kib,
    message_body,
    percentile,
    send_once,
)
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess

CLIENT_KEY = "sk-relay-load-and-faults"
MIB = 1024

# The soak: at least this many requests and streams, and the RSS bound after warm-up.
SOAK_REQUESTS = 100_000
SOAK_STREAMS = 10_000
SOAK_RSS_GROWTH_MIB = 10  # ~100 bytes per request leaked would exceed it


def default_config(upstream: FakeUpstreamProcess) -> dict[str, Any]:
    """relayd as an operator would first configure it: nothing tuned."""
    return {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "clients": [{"name": "load", "key_sha256": hashlib.sha256(CLIENT_KEY.encode())
                     .hexdigest()}],
        "providers": [
            {"name": "anthropic", "type": "anthropic",
             "backends": [{"name": "a", "url": upstream.url, "api_key": "sk-up-a"}]},
            {"name": "openai", "type": "openai",
             "backends": [{"name": "o", "url": upstream.url, "api_key": "sk-up-o"}]},
        ],
        "routes": [{"api": "anthropic", "provider": "anthropic"},
                   {"api": "openai", "provider": "openai"}],
        # Test plumbing, not tuning: the fake upstream's per-request knobs are headers.
        "forward_headers": ["x-fake-*"],
    }


@dataclass
class Stack:
    upstream: FakeUpstreamProcess
    relay: RelaydProcess

    @property
    def port(self) -> int:
        return int(self.relay.url().rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.relay.process is not None
        return self.relay.process.pid

    def admin(self, path: str) -> bytes:
        with urllib.request.urlopen(self.relay.admin_url() + path, timeout=10) as response:
            data: bytes = response.read()
            return data

    def backends(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.admin("/admin/backends"))["backends"]
        return found

    def counter(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples that carry ``labels``."""
        return metric_sum(self.admin("/metrics").decode(), name, **labels)

    def bad_log_lines(self) -> list[str]:
        """Lines at error or critical level, tracebacks and unhandled Deferred errors."""
        return [
            line for line in self.relay.log_text().splitlines()
            if "#critical]" in line or "#error]" in line or "Traceback" in line
            or "Unhandled error" in line
        ]

    def access_outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for line in self.relay.log_text().splitlines():
            if "[relayd.access#" in line:
                outcome = line.split(" outcome=", 1)[1].split(" ", 1)[0]
                counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def request(self, body: bytes, path: str = "/v1/messages",
                headers: dict[str, str] | None = None) -> bytes:
        return build_request(self.port, CLIENT_KEY, body, path, headers)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    upstream = FakeUpstreamProcess(tmp_path / "upstream", "upstream").start()
    relay: RelaydProcess | None = None
    try:
        relay = RelaydProcess(tmp_path / "relayd", default_config(upstream)).start(1)
        yield Stack(upstream, relay)
    finally:
        if relay is not None:
            relay.stop()
        upstream.stop()


def failures(results: list[Any], stream: bool) -> list[str]:
    """Why each result that is not a complete, successful answer is not."""
    reasons = []
    for result in results:
        if isinstance(result, BaseException):
            reasons.append(f"{type(result).__name__}: {result}")
        elif (why := check(result, stream, via_relay=True)) is not None:
            reasons.append(why)
    return reasons


def rss_mib(pid: int) -> dict[str, float]:
    memory = memory_kib(pid)
    return {"rss_mib": round(memory["VmRSS"] / MIB, 1),
            "peak_rss_mib": round(memory["VmHWM"] / MIB, 1)}


def assert_backends_in_service(stack: Stack) -> None:
    backends = stack.backends()
    assert backends, "the admin listener reported no backend"
    for backend in backends:
        assert backend["breaker"]["state"] == "closed", backend
        assert backend["in_flight"] == 0, backend
        assert backend["last_error"] is None, backend


# -- clients that give up -------------------------------------------------------------------


def test_clients_giving_up_before_the_first_byte_leave_the_backend_in_service(
    stack: Stack, report: dict[str, Any]
) -> None:
    """The field report: 50 streaming clients giving up after 0.2 s on an upstream that
    needs 1 s opened the breaker of the only backend, and 1300 requests got 503; a load
    generator closing its keep-alive connections mid-request did the same."""
    stack.upstream.configure(latency=1.0)
    stream = stack.request(message_body(stream=True))
    plain = stack.request(message_body(stream=False))
    port = stack.port

    async def scenario() -> tuple[list[bytes], list[Any]]:
        early = await asyncio.gather(*(give_up(port, stream, 0.2) for _ in range(100)))
        # A load generator ending its run: keep-alive connections closed mid-request.
        conns: list[HttpConnection] = [await connect(port) for _ in range(50)]
        pending = [asyncio.ensure_future(conn.request(plain)) for conn in conns]
        await asyncio.sleep(0.3)
        for conn in conns:
            assert conn.transport is not None
            conn.transport.abort()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.sleep(0.2)
        after = await asyncio.gather(
            *(send_once(port, stream if i % 2 else plain, 60) for i in range(200)),
            return_exceptions=True,
        )
        return early, list(after)

    early, after = asyncio.run(scenario())
    assert all(received == b"" for received in early), "a client got bytes before giving up"
    problems = failures([r for i, r in enumerate(after) if i % 2 == 0], stream=False)
    problems += failures([r for i, r in enumerate(after) if i % 2], stream=True)
    assert not problems, problems[:5]
    assert_backends_in_service(stack)
    assert stack.counter("relayd_upstream_attempts_total", result="client_gone") == 150
    for result in ("no_response", "connect_error", "timeout"):
        assert stack.counter("relayd_upstream_attempts_total", result=result) == 0
    assert stack.counter("relayd_client_disconnects_total", stage="before_response") == 150
    assert not stack.bad_log_lines(), stack.bad_log_lines()[:10]
    assert "circuit breaker" not in stack.relay.log_text()
    assert stack.access_outcomes() == {"client_gone": 150, "ok": 200}
    report.update(gave_up=150, then_served=200, **rss_mib(stack.pid))


# -- a burst --------------------------------------------------------------------------------


def test_a_burst_of_1000_streams_to_one_backend_is_served_in_full(
    stack: Stack, report: dict[str, Any]
) -> None:
    """The field report: with the default per-backend cap of 256, a burst of 1000 streams
    got 479 immediate 503s, and the default accept backlog of 50 made connections wait."""
    stack.upstream.configure(chunk_delay=0.01, chunks=5)
    stream = stack.request(message_body(stream=True))
    port = stack.port

    async def burst() -> tuple[list[Any], float]:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(send_once(port, stream, 120) for _ in range(1000)), return_exceptions=True
        )
        return list(results), time.perf_counter() - started

    results, seconds = asyncio.run(burst())
    problems = failures(results, stream=True)
    assert not problems, (len(problems), problems[:5])
    assert_backends_in_service(stack)
    assert not stack.bad_log_lines(), stack.bad_log_lines()[:10]
    ttfb = [(r.first_body - r.sent) * 1000 for r in results if isinstance(r, Response)]
    report.update(
        streams=1000, completed=len(results) - len(problems), wall_s=round(seconds, 2),
        ttfb_p50_ms=round(percentile(ttfb, 50), 1), ttfb_p99_ms=round(percentile(ttfb, 99), 1),
        **rss_mib(stack.pid),
    )


# -- a drain --------------------------------------------------------------------------------


def test_sigterm_while_streams_run_and_clients_hang_up(
    stack: Stack, report: dict[str, Any]
) -> None:
    """Every stream its client did not cut completes through the drain; clients hanging
    up before the first byte and mid-stream, before and during the drain, cause no
    critical line (the field report: 'Request.finish called on a request after its
    connection was lost')."""
    stack.upstream.configure(chunk_delay=0.1, chunks=10)  # ~1.3 s per stream
    stream = stack.request(message_body(stream=True))
    slow = stack.request(message_body(stream=True), headers={"x-fake-latency": "1.5"})
    port = stack.port

    async def scenario() -> dict[str, list[Any]]:
        groups: dict[str, list[Coroutine[Any, Any, Any]]] = {
            "complete": [send_once(port, stream, 60) for _ in range(150)],
            "gone_mid_stream_before_drain": [hang_up_mid_answer(port, stream, 30)
                                             for _ in range(25)],
            "gone_before_first_byte_in_drain": [give_up(port, slow, 0.8) for _ in range(25)],
            "gone_mid_stream_in_drain": [give_up(port, stream, 0.8) for _ in range(25)],
        }
        tasks = {name: [asyncio.ensure_future(c) for c in coros]
                 for name, coros in groups.items()}
        await asyncio.sleep(0.5)
        stack.relay.signal(signal.SIGTERM)
        return {name: list(await asyncio.gather(*group, return_exceptions=True))
                for name, group in tasks.items()}

    results = asyncio.run(scenario())
    assert stack.relay.process is not None
    exit_code = stack.relay.process.wait(60)
    problems = failures(results["complete"], stream=True)
    assert not problems, (len(problems), problems[:5])
    assert all(r == b"" for r in results["gone_before_first_byte_in_drain"])
    assert all(isinstance(r, bytes) and b"event: message_start" in r
               for r in results["gone_mid_stream_in_drain"])
    assert exit_code == 0
    log = stack.relay.log_text()
    assert "draining" in log
    assert not stack.bad_log_lines(), stack.bad_log_lines()[:10]
    assert stack.access_outcomes() == {"ok": 150, "client_gone": 75}
    report.update(completed=150, hung_up=75, exit_code=exit_code)


# -- the soak -------------------------------------------------------------------------------


def test_soak_with_reloads_and_hang_ups_keeps_memory_flat(
    stack: Stack, report: dict[str, Any]
) -> None:
    """At least 100,000 requests and 10,000 streams over both APIs, a reload every few
    seconds and clients hanging up mid-stream, with relayd's RSS sampled throughout: no
    failure, and RSS after warm-up grows by less than the stated bound."""
    stack.upstream.configure(chunk_delay=0.001)
    port = stack.port
    targets = [
        Target("anthropic", port, stack.request(message_body(False)),
               stack.request(message_body(True)), via_relay=True),
        Target("openai", port, stack.request(chat_body(False), "/v1/chat/completions"),
               stack.request(chat_body(True), "/v1/chat/completions"), via_relay=True),
    ]
    warmup = SOAK_REQUESTS // 10
    tally = Tally("soak")
    samples: list[tuple[float, float]] = []  # (requests done so far, RSS MiB)
    progress = {"done": 0}
    reloads = 0
    hang_ups = 0

    async def sample_rss(stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append((progress["done"], memory_kib(stack.pid)["VmRSS"] / MIB))
            await asyncio.sleep(0.5)

    async def reload_every(seconds: float, stop: asyncio.Event) -> None:
        nonlocal reloads
        while not stop.is_set():
            await asyncio.sleep(seconds)
            stack.relay.signal(signal.SIGHUP)
            reloads += 1

    async def hang_up_now_and_then(stop: asyncio.Event) -> None:
        nonlocal hang_ups
        while not stop.is_set():
            await hang_up_mid_answer(port, targets[hang_ups % 2].stream, 30)
            hang_ups += 1
            await asyncio.sleep(0.05)

    async def batches(stream: bool, total: int, concurrency: int, step: int) -> int:
        ok = 0
        for start in range(0, total, step):
            for target in targets:
                ok += await concurrent_batch(target, step // 2, concurrency, stream, tally)
            if not stream:
                progress["done"] = start + step
        return ok

    async def soak() -> tuple[int, int, float]:
        stop = asyncio.Event()
        background = [asyncio.ensure_future(sample_rss(stop)),
                      asyncio.ensure_future(reload_every(5.0, stop)),
                      asyncio.ensure_future(hang_up_now_and_then(stop))]
        started = time.perf_counter()
        plain_ok, stream_ok = await asyncio.gather(
            batches(False, SOAK_REQUESTS, 24, 5000), batches(True, SOAK_STREAMS, 8, 1000)
        )
        seconds = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*background)
        return plain_ok, stream_ok, seconds

    plain_ok, stream_ok, seconds = asyncio.run(soak())
    assert tally.failures == 0, tally.reasons
    assert (plain_ok, stream_ok) == (SOAK_REQUESTS, SOAK_STREAMS)
    assert_backends_in_service(stack)
    assert not stack.bad_log_lines(), stack.bad_log_lines()[:10]
    assert stack.counter("relayd_config_reloads_total", result="ok") == reloads > 0
    baseline = max(rss for done, rss in samples if done <= warmup)
    after = [rss for done, rss in samples if done > warmup]
    growth = max(after) - baseline
    report.update(
        requests=plain_ok, streams=stream_ok, hang_ups=hang_ups, reloads=reloads,
        seconds=round(seconds, 1), req_per_s=round((plain_ok + stream_ok) / seconds),
        rss_after_warmup_mib=round(baseline, 1), rss_max_mib=round(max(after), 1),
        rss_end_mib=round(after[-1], 1), rss_growth_mib=round(growth, 1),
        rss_samples=len(samples),
    )
    assert growth < SOAK_RSS_GROWTH_MIB, report


# -- the response cache under hang-ups --------------------------------------------------------


def test_coalesced_requests_with_hang_ups_at_every_stage(
    tmp_path: Path, report: dict[str, Any]
) -> None:
    """Identical requests on a coalescing route, JSON and streamed, while a third of the
    clients give up before the first byte or hang up mid-answer (leaders among them):
    every client that stays gets a complete answer (a leader whose client left goes on
    for its waiters); no flight is left behind; the backend stays in service."""
    import random

    upstream = FakeUpstreamProcess(tmp_path / "upstream", "upstream").start()
    config = default_config(upstream)
    config["routes"][0]["cache"] = {"ttl": 1, "sampled": True, "coalesce": True}
    relay = RelaydProcess(tmp_path / "relayd", config).start(1)
    stack = Stack(upstream, relay)
    upstream.configure(chunk_delay=0.02, latency=0.05)
    chooser = random.Random(14)
    port = stack.port
    kept: list[tuple[bool, Any]] = []
    hung = 0

    async def scenario() -> None:
        nonlocal hung
        for round_ in range(12):
            streamed = round_ % 2 == 1
            body = json.loads(message_body(stream=streamed))
            body["messages"][0]["content"] = f"question {round_ // 2}"  # a new key each pair
            data = stack.request(json.dumps(body).encode())

            async def one(mode: float, data: bytes = data, streamed: bool = streamed) -> None:
                nonlocal hung
                if mode < 0.17:
                    await give_up(port, data, mode / 2)
                    hung += 1
                elif mode < 0.34:
                    try:
                        await hang_up_mid_answer(port, data, 10)
                    except Exception:  # closed before any body byte: also a hang-up
                        pass
                    hung += 1
                else:
                    kept.append((streamed, await send_once(port, data, 30)))

            await asyncio.gather(*(one(chooser.random()) for _ in range(30)))
            await asyncio.sleep(1.05)  # past the ttl: the next pair starts afresh

    try:
        asyncio.run(scenario())
        problems = [
            why for streamed, response in kept
            if (why := check(response, streamed, via_relay=True)) is not None
        ]
        assert not problems, problems[:5]
        stats = json.loads(stack.admin("/admin/cache"))
        assert stats["in_flight"] == 0
        assert stats["coalesced"] > 0 and stats["lookups"]["hit"] > 0
        assert_backends_in_service(stack)
        assert not stack.bad_log_lines(), stack.bad_log_lines()[:10]
        report.update(requests=len(kept) + hung, hung_up=hung, answered=len(kept),
                      coalesced=stats["coalesced"],
                      upstream_requests=len(upstream.requests()))
    finally:
        relay.stop()
        upstream.stop()


# -- sessions -------------------------------------------------------------------------------


def test_pinned_sessions_under_load_survive_a_dead_backend_reloads_and_hang_ups(
    tmp_path: Path, report: dict[str, Any]
) -> None:
    """Session affinity is on by default. 150 concurrent sessions (Claude Code's session
    header) stream against two backends; then one backend dies and the relay reloads
    while the sessions go on, clients hanging up mid-stream throughout. Every request a
    client did not cut completes (a pin never makes a request fail), the dead backend's
    sessions move, and nothing is left in flight."""
    ups = [FakeUpstreamProcess(tmp_path / name, name).start() for name in ("u1", "u2")]
    relay: RelaydProcess | None = None
    try:
        config = default_config(ups[0])
        config["providers"][0]["backends"] = [
            {"name": f"a{i}", "url": up.url, "api_key": f"sk-up-{i}"}
            for i, up in enumerate(ups, 1)
        ]
        for up in ups:
            up.configure(chunk_delay=0.02, chunks=10)
        relay = RelaydProcess(tmp_path / "relayd", config).start(1)
        stack = Stack(ups[0], relay)
        port = stack.port
        sessions = [stack.request(message_body(True),
                                  headers={"x-claude-code-session-id": f"session-{i}"})
                    for i in range(150)]

        async def after(delay: float, request: Coroutine[Any, Any, Any]) -> Any:
            await asyncio.sleep(delay)
            return await request

        async def turn(hang_up_every: int) -> tuple[list[Any], list[Any]]:
            # Sessions are not in lockstep: their turns start spread over 0.45 s (still
            # ~100 streams at once). A burst of 150 in the same millisecond onto a backend
            # that just died would meet the retry budget, pins or not (docs/operations.md).
            kept = [after(i * 0.003, send_once(port, s, 60)) for i, s in enumerate(sessions)
                    if i % hang_up_every]
            cut = [after(i * 0.003, hang_up_mid_answer(port, s, 30))
                   for i, s in enumerate(sessions) if not i % hang_up_every]
            results = await asyncio.gather(*kept, *cut, return_exceptions=True)
            return list(results[:len(kept)]), list(results[len(kept):])

        async def scenario() -> dict[str, Any]:
            first = await turn(5)  # the sessions are pinned, 30 clients hang up
            await asyncio.sleep(0.2)
            ups[1].stop()  # a2 dies: its sessions must move
            reload = asyncio.get_running_loop().call_later(0.3, relay.signal, signal.SIGHUP)
            second = await turn(7)
            third = await turn(6)
            reload.cancel()
            return {"first": first, "second": second, "third": third}

        results = asyncio.run(scenario())
        for name, (kept, cut) in results.items():
            problems = failures(kept, stream=True)
            assert not problems, (name, len(problems), problems[:5])
            assert all(not isinstance(r, BaseException) for r in cut), (name, cut[:3])
        assert stack.counter("relayd_affinity_hits_total") > 0
        moved = (stack.counter("relayd_affinity_repins_total", reason="failed")
                 + stack.counter("relayd_affinity_repins_total", reason="breaker")
                 + stack.counter("relayd_affinity_repins_total", reason="unhealthy"))
        assert moved > 0
        assert not stack.bad_log_lines(), stack.bad_log_lines()[:10]
        odd = [line for line in relay.log_text().splitlines() if "[relayd.access#" in line
               and " outcome=ok " not in line and " outcome=client_gone " not in line]
        refused = {r: stack.counter("relayd_retries_refused_total", reason=r)
                   for r in ("budget", "attempts", "body_too_large", "no_backend")}
        assert not odd, (refused, "\n".join(odd[:5]))
        assert all(b["in_flight"] == 0 for b in stack.backends())
        report.update(sessions=150, moved=moved,
                      hits=stack.counter("relayd_affinity_hits_total"),
                      outcomes=stack.access_outcomes())
    finally:
        if relay is not None:
            relay.stop()
        for up in ups:
            up.stop()
