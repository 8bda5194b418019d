"""Failover, circuit breakers, health checks and the retry budget, with real processes.

Each test starts fake upstreams and ``twistd -n relayd`` (with its admin listener) on
127.0.0.1, injects faults through the fakes' knobs (or kills a fake outright) and checks
what the official SDKs see, what the upstreams received, the access log, the
``/admin/backends`` state and the Prometheus metrics. Every loop is bounded in count,
every wait is a bounded poll on a condition; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from support import CLIENT_KEY, sha

from relayd.testing.exposition import metric_sum
from relayd.testing.fakeprovider import reply_text
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess, wait_for

_ACCESS_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_FULL_REPLY = reply_text(5)  # the fake's default reply: five chunks

# Small intervals so that detection and recovery take about a second, not minutes.
_HEALTH: dict[str, Any] = {
    "interval": 0.5, "timeout": 0.5, "unhealthy_after": 2, "healthy_after": 2,
}
_BREAKER: dict[str, Any] = {
    "window": 10, "failures": 3, "cooldown": 1, "max_cooldown": 4,
}
_NO_HEALTH: dict[str, Any] = {"enabled": False}
# A breaker that never opens, for tests about something else.
_NO_BREAKER: dict[str, Any] = {"window": 1000, "failures": 1000}


def upstream_key(name: str) -> str:
    return f"sk-upstream-{name}"


def backend_entry(name: str, upstream: FakeUpstreamProcess, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "url": upstream.url, **extra}
    if "api_keys" not in entry:
        entry["api_key"] = upstream_key(name)
    return entry


def failover_config(
    anthropic_backends: list[dict[str, Any]],
    openai_backends: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """One plain listener, the admin listener, one client, and quick health/breakers."""
    providers = [{"name": "anthropic", "type": "anthropic", "backends": anthropic_backends}]
    routes = [{"api": "anthropic", "provider": "anthropic"}]
    if openai_backends:
        providers.append({"name": "openai", "type": "openai", "backends": openai_backends})
        routes.append({"api": "openai", "provider": "openai"})
    config: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "clients": [{"name": "team-a", "key_sha256": sha(CLIENT_KEY)}],
        "providers": providers,
        "routes": routes,
        "timeouts": {"connect": 2, "first_byte": 2},
        "health": dict(_HEALTH),
        "breaker": dict(_BREAKER),
        "failover": {"max_attempts": 3, "retry_budget_ratio": 1.0},
    }
    config.update(sections)
    return config


@dataclass
class Relay:
    """A running relay plus the ways to look inside it."""

    process: RelaydProcess
    admin_url: str

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=CLIENT_KEY,
            base_url=self.process.url("http"),
            http_client=httpx2.Client(timeout=30),
            max_retries=0,
        )

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=CLIENT_KEY,
            base_url=self.process.url("http") + "/v1",
            http_client=httpx2.Client(timeout=30),
            max_retries=0,
        )

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.admin_url + path, timeout=10) as response:
            body: bytes = response.read()
            return body

    def backends(self) -> dict[str, dict[str, Any]]:
        """``/admin/backends`` keyed by backend name."""
        document = json.loads(self._get("/admin/backends"))
        return {b["name"]: b for b in document["backends"]}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return metric_sum(self._get("/metrics").decode(), name, **labels)

    def _parse_access_lines(self) -> list[dict[str, str]]:
        lines = []
        for line in self.process.log_text().splitlines():
            _, marker, rest = line.partition(" access request_id=")
            if not marker:
                continue
            fields = {}
            for key, raw in _ACCESS_FIELD.findall("request_id=" + rest):
                fields[key] = json.loads(raw) if raw.startswith('"') else raw
            lines.append(fields)
        return lines

    def access_lines(self, count: int) -> list[dict[str, str]]:
        """The access-log lines as field dicts, once there are ``count`` of them.

        The relay logs a request just after answering it, so the client can be done a
        moment before the line is written.
        """
        def enough() -> list[dict[str, str]] | None:
            lines = self._parse_access_lines()
            return lines if len(lines) >= count else None

        found: list[dict[str, str]] = wait_for(
            enough, 10, f"{count} access-log lines", self.process.log_path
        )
        return found


@pytest.fixture
def start_relay(relayd_factory: Callable[..., RelaydProcess]) -> Callable[..., Relay]:
    def start(config: dict[str, Any]) -> Relay:
        process = relayd_factory(config)
        return Relay(process, process.admin_url())

    return start


@pytest.fixture
def upstreams(
    upstream_factory: Callable[[str], FakeUpstreamProcess],
) -> Iterator[Callable[..., list[FakeUpstreamProcess]]]:
    def start(*names: str) -> list[FakeUpstreamProcess]:
        return [upstream_factory(name) for name in names]

    yield start


def ask(client: anthropic.Anthropic, text: str = "x") -> anthropic.types.Message:
    return client.messages.create(
        model="claude-test-1", max_tokens=16, messages=[{"role": "user", "content": text}]
    )


def kill(upstream: FakeUpstreamProcess) -> None:
    """SIGKILL the fake upstream we started (a crash, not a clean shutdown)."""
    assert upstream.process is not None
    upstream.process.kill()
    upstream.process.wait(10)


def requests_to(*upstreams: FakeUpstreamProcess) -> int:
    return sum(len(u.requests()) for u in upstreams)


# -------------------------------------------------------------------------- scenarios


def test_killing_one_of_three_backends_under_load_is_invisible(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a, b, c = upstreams("a", "b", "c")
    for upstream in (a, b, c):
        upstream.configure(latency=0.05)  # keeps requests in flight when the kill lands
    relay = start_relay(failover_config([backend_entry(n, u) for n, u in
                                         (("a", a), ("b", b), ("c", c))]))
    total, workers, kill_after = 150, 6, 50
    done = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(count: int) -> None:
        client = relay.anthropic()
        for i in range(count):
            try:
                ask(client, f"load {i}")
            except Exception as exc:
                with lock:
                    errors.append(exc)
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=work, args=(total // workers,)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: done[0] >= kill_after, 60, "a third of the load")
        kill(c)
    finally:
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert done[0] == total
    assert errors == []

    lines = relay.access_lines(total)
    assert len(lines) == total
    assert {line["status"] for line in lines} == {"200"}
    assert any(line["attempts"] == "2" for line in lines), "no request failed over"

    # The dead backend is detected (active health) and then gets no more attempts.
    wait_for(lambda: not relay.backends()["c"]["healthy"], 20, "c to be marked unhealthy")
    before = relay.metric("relayd_upstream_attempts_total", backend="c")
    client = relay.anthropic()
    for i in range(30):
        assert ask(client, f"after {i}").content
    assert relay.metric("relayd_upstream_attempts_total", backend="c") == before
    assert relay.metric("relayd_failovers_total", provider="anthropic") >= 1
    assert len(a.requests()) > 0 and len(b.requests()) > 0


def test_529_storm_opens_the_breaker_and_recovery_closes_it(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a, b = upstreams("a", "b")
    relay = start_relay(failover_config(
        [backend_entry("a", a), backend_entry("b", b)],
        health=_NO_HEALTH,  # the breaker alone must take a out and bring it back
        breaker={"window": 10, "failures": 3, "cooldown": 3, "max_cooldown": 6},
    ))
    client = relay.anthropic()
    a.configure(status=529)
    for i in range(30):
        assert ask(client, f"storm {i}").content  # served by b after a's 529
        if relay.backends()["a"]["breaker"]["state"] == "open":
            break
    opened = relay.backends()["a"]["breaker"]
    assert opened["state"] == "open"
    assert opened["last_failure"] == "upstream answered 529"
    assert {r["status"] for r in a.requests()} == {529}

    # While open, a gets nothing.
    seen_by_a = len(a.requests())
    for i in range(10):
        assert ask(client, f"open {i}").content
    still = relay.backends()["a"]["breaker"]
    assert still["state"] == "open"
    # The same open period (a re-opening would have a longer, doubled cooldown).
    assert still["reopens_in"] <= opened["reopens_in"]
    assert len(a.requests()) == seen_by_a

    # a recovers; after the cooldown a half-open trial succeeds and closes the breaker.
    a.configure()
    sent = [0]

    def closed_again() -> bool:
        assert sent[0] < 400, "a never came back"
        assert ask(client, "recovery").content
        sent[0] += 1
        return bool(relay.backends()["a"]["breaker"]["state"] == "closed")

    wait_for(closed_again, 20, "a's breaker to close")
    assert len(a.requests()) > seen_by_a
    assert a.requests()[-1]["status"] == 200
    recovered = len(a.requests())
    for i in range(10):
        assert ask(client, f"closed {i}").content
    assert len(a.requests()) - recovered >= 3  # a is back in the rotation


def test_hanging_backend_fails_over_after_first_byte_timeout(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a, b = upstreams("a", "b")
    a.configure(hang=True)
    relay = start_relay(failover_config(
        [backend_entry("a", a), backend_entry("b", b)],
        health=_NO_HEALTH,
        timeouts={"connect": 2, "first_byte": 1},
    ))
    client = relay.anthropic()
    for i in range(2):  # weighted round-robin: one of two requests goes to a first
        message = ask(client, f"hang {i}")
        assert message.content[0].type == "text" and message.content[0].text == _FULL_REPLY
    assert len(a.requests()) == 1
    assert len(b.requests()) == 2
    lines = relay.access_lines(2)
    failed_over = [line for line in lines if line["attempts"] == "2"]
    assert len(failed_over) == 1
    assert failed_over[0]["status"] == "200"
    assert failed_over[0]["outcome"] == "ok"
    assert failed_over[0]["backend"] == "b"
    # The relay gave up on a's request and closed it.
    wait_for(lambda: a.requests()[0]["client_disconnected"], 10, "a to see the cancellation")
    breaker = relay.backends()["a"]["breaker"]
    assert breaker["last_failure"] == "no response within 1s"
    assert breaker["state"] == "closed"  # one failure is below the threshold
    assert relay.metric("relayd_upstream_attempts_total", backend="a", result="timeout") == 1
    assert relay.metric("relayd_failovers_total", reason="timeout") == 1


def test_drop_after_content_started_is_an_explicit_error(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a1, a2, o1, o2 = upstreams("a1", "a2", "o1", "o2")
    for upstream in (a1, a2, o1, o2):
        upstream.configure(drop_after=3)
    relay = start_relay(failover_config(
        [backend_entry("a1", a1), backend_entry("a2", a2)],
        [backend_entry("o1", o1), backend_entry("o2", o2)],
    ))
    pieces: list[str] = []
    with pytest.raises(anthropic.APIError) as info:
        with relay.anthropic().messages.stream(
            model="claude-test-1", max_tokens=64, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            for text in stream.text_stream:
                pieces.append(text)
    assert "broke off" in str(info.value)
    assert pieces == ["Hello"]  # content had reached the client: no failover possible
    assert requests_to(a1, a2) == 1

    chunks = relay.openai().chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
    )
    texts: list[str] = []
    with pytest.raises(openai.APIError) as oinfo:
        for chunk in chunks:
            texts.extend(c.delta.content or "" for c in chunk.choices)
    assert "broke off" in str(oinfo.value)
    assert "".join(texts) == "Hello from"
    assert requests_to(o1, o2) == 1

    lines = relay.access_lines(2)
    assert [(line["api"], line["outcome"], line["attempts"]) for line in lines] == [
        ("anthropic", "upstream_broken", "1"),
        ("openai", "upstream_broken", "1"),
    ]


def test_error_event_before_content_fails_over_invisibly(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a1, a2 = upstreams("a1", "a2")
    a1.configure(stream_error=True)  # message_start, then an error event: no content yet
    relay = start_relay(failover_config([backend_entry("a1", a1), backend_entry("a2", a2)]))
    client = relay.anthropic()
    sent = 0
    for i in range(4):  # round-robin sends one of the first two streams to a1
        if a1.requests():
            break
        sent += 1
        with client.messages.stream(
            model="claude-test-1", max_tokens=64,
            messages=[{"role": "user", "content": f"a {i}"}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == _FULL_REPLY
        assert final.stop_reason == "end_turn"
    assert len(a1.requests()) == 1
    assert a1.requests()[0]["events_sent"] == 2
    failed_over = [line for line in relay.access_lines(sent) if line["attempts"] == "2"]
    assert [(line["backend"], line["outcome"], line["stream"]) for line in failed_over] == [
        ("a2", "ok", "True")
    ]
    assert relay.metric("relayd_failovers_total", reason="stream_error") == 1


def test_openai_error_event_after_role_chunk_fails_over_invisibly(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a1, o1, o2 = upstreams("a1", "o1", "o2")
    o1.configure(stream_error=True)  # the role chunk, then an error chunk: no content yet
    relay = start_relay(failover_config(
        [backend_entry("a1", a1)], [backend_entry("o1", o1), backend_entry("o2", o2)]
    ))
    client = relay.openai()
    sent = 0
    for i in range(4):  # round-robin sends one of the first two streams to o1
        if o1.requests():
            break
        sent += 1
        chunks = list(client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"o {i}"}], stream=True
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == _FULL_REPLY
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(o1.requests()) == 1
    failed_over = [line for line in relay.access_lines(sent) if line["attempts"] == "2"]
    assert [(line["backend"], line["outcome"]) for line in failed_over] == [("o2", "ok")]


def _hammer(relay: Relay, count: int) -> list[tuple[int, str | None]]:
    """Send ``count`` requests that all fail; their statuses and x-should-retry headers."""
    client = relay.anthropic()
    seen = []
    for i in range(count):
        with pytest.raises(anthropic.APIStatusError) as info:
            ask(client, f"fail {i}")
        seen.append((info.value.status_code, info.value.response.headers.get("x-should-retry")))
    return seen


def test_retry_budget_caps_amplification(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    fakes = upstreams("a", "b", "c")
    ratio, n = 0.1, 100
    relay = start_relay(failover_config(
        [backend_entry(name, u) for name, u in zip("abc", fakes, strict=True)],
        health=_NO_HEALTH, breaker=_NO_BREAKER,
        failover={"max_attempts": 3, "retry_budget_ratio": ratio,
                  "retry_budget_min_per_second": 0},
    ))
    for upstream in fakes:
        upstream.configure(status=503)
    seen = _hammer(relay, n)
    assert {status for status, _ in seen} == {503}
    upstream_total = requests_to(*fakes)
    retries = relay.metric("relayd_upstream_retries_total")
    assert upstream_total == n + retries
    # The budget covers the last 10 s; a few spare retries in case the run spans more.
    assert upstream_total <= n * (1 + ratio) + 5
    assert relay.metric("relayd_retries_refused_total", reason="budget") > 0
    # A retried request still gives up with "do not retry" on the last upstream answer.
    assert (503, "false") in seen


def test_generous_retry_budget_lets_every_retry_through(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    fakes = upstreams("a", "b", "c")
    n = 30
    relay = start_relay(failover_config(
        [backend_entry(name, u) for name, u in zip("abc", fakes, strict=True)],
        health=_NO_HEALTH, breaker=_NO_BREAKER,
        failover={"max_attempts": 3, "retry_budget_ratio": 1.0,
                  "retry_budget_min_per_second": 100},
    ))
    for upstream in fakes:
        upstream.configure(status=503)
    seen = _hammer(relay, n)
    assert seen == [(503, "false")] * n
    assert requests_to(*fakes) == 3 * n  # every request tried all three backends
    assert [line["attempts"] for line in relay.access_lines(n)] == ["3"] * n
    assert relay.metric("relayd_retries_refused_total", reason="budget") == 0
    assert relay.metric("relayd_retries_refused_total", reason="no_backend") == 0


def test_priority_tier_backup_takes_over_when_tier_zero_dies(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    main, backup = upstreams("main", "backup")
    relay = start_relay(failover_config(
        [backend_entry("main", main, priority=0), backend_entry("backup", backup, priority=1)],
        # Without probes, only the failed requests themselves take main out (its breaker),
        # so which requests fail over does not depend on when a probe happens to run.
        health=_NO_HEALTH,
    ))
    client = relay.anthropic()
    for i in range(10):
        assert ask(client, f"tier0 {i}").content
    assert len(main.requests()) == 10
    assert len(backup.requests()) == 0

    kill(main)
    for i in range(20):
        assert ask(client, f"tier1 {i}").content
    assert len(backup.requests()) == 20
    lines = relay.access_lines(30)
    assert {line["status"] for line in lines} == {"200"}
    assert [line["backend"] for line in lines] == ["main"] * 10 + ["backup"] * 20
    # The first requests after the kill tried main and failed over, until the third
    # failure opened main's breaker.
    assert [line["attempts"] for line in lines[10:13]] == ["2"] * 3
    assert relay.backends()["main"]["breaker"]["state"] != "closed"
    assert relay.metric("relayd_failovers_total", provider="anthropic") >= 3


def test_429_cools_the_keys_down_without_tripping_the_breaker(
    upstreams: Callable[..., list[FakeUpstreamProcess]], start_relay: Callable[..., Relay]
) -> None:
    a, b = upstreams("a", "b")
    keys = ["sk-upstream-a-k1", "sk-upstream-a-k2"]
    a.configure(status=429, retry_after=30)
    relay = start_relay(failover_config([
        backend_entry("a", a, api_keys=[{"api_key": k} for k in keys]),
        backend_entry("b", b),
    ]))
    client = relay.anthropic()
    for i in range(10):
        assert ask(client, f"limited {i}").content  # never a 429 for the client
    # Each of a's keys was tried once, got a 429 and is now cooling down: a gets no more.
    assert sorted(r["headers"]["x-api-key"][0] for r in a.requests()) == keys
    assert len(b.requests()) == 10
    state = relay.backends()["a"]
    assert [key["cooldown_reason"] for key in state["keys"]] == ["rate_limited"] * 2
    assert all(0 < key["cooldown_remaining"] <= 30 for key in state["keys"])
    assert state["available"] is False
    assert state["breaker"]["state"] == "closed"
    assert state["breaker"]["last_failure"] is None
    assert state["healthy"] is True
    assert relay.metric("relayd_upstream_attempts_total", backend="a", result="status_429") == 2
    assert [line["attempts"] for line in relay.access_lines(10)].count("2") == 2
