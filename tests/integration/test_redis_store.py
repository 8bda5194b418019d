"""The Redis store against a real redis-server: the Lua scripts, sharing, failure modes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from relayd.config.model import StateConfig
from relayd.limits import ObjectRecord, RedisStore, UsageRecord
from relayd.limits.checks import (
    ConcurrencyCheck,
    Decision,
    PeriodCheck,
    Ticket,
    WindowCheck,
    period_number,
)
from relayd.limits.redis import StoreUnavailableError
from relayd.limits.redis_connection import RECONNECT_MAX_DELAY
from relayd.providers.base import Usage
from relayd.testing.certs import TestCertificates, make_certificates
from relayd.testing.processes import ProcessGroup, RedisServerProcess

PREFIX = "{t}"


def config(server: RedisServerProcess, **overrides: Any) -> StateConfig:
    values: dict[str, Any] = {
        "store": "redis",
        "url": server.url,
        "host": "127.0.0.1",
        "port": server.port,
        "key_prefix": "t",
        "timeout": 0.5,
    }
    values.update(overrides)
    return StateConfig(**values)


def rpm(limit: int) -> WindowCheck:
    return WindowCheck(f"{PREFIX}:client:a:rpm", limit, 1, "requests_per_minute", "client")


def tpm(limit: int, amount: int, key: str = "client:a:tpm", scope: str = "client") -> WindowCheck:
    return WindowCheck(f"{PREFIX}:{key}", limit, amount, "tokens_per_minute", scope)


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> Generator[Any, Any, None]:
    """Let the reactor run until ``predicate`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield deferLater(reactor, 0.02, lambda: None)


def ready(store: RedisStore) -> Generator[Any, Any, None]:
    yield from until(lambda: store.state != "connecting")
    assert store.state == "up"


@pytest.fixture
def stores() -> Generator[list[RedisStore], None, None]:
    made: list[RedisStore] = []
    yield made
    for store in made:
        store.close()


def new_store(stores: list[RedisStore], cfg: StateConfig, **kwargs: Any) -> RedisStore:
    store = RedisStore(cfg, reactor, **kwargs)
    stores.append(store)
    return store


@pytest_twisted.inlineCallbacks
def test_window_limit_is_shared_and_exact(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    one = new_store(stores, config(redis_server))
    two = new_store(stores, config(redis_server))
    yield from ready(one)
    yield from ready(two)
    decisions: list[Decision] = []
    for i in range(25):
        decisions.append((yield (one if i % 2 else two).admit([rpm(10)])))
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 15
    assert [d.states[0].used for d in decisions[:10]] == list(range(1, 11))
    assert all(d.store == "redis" and not d.degraded for d in decisions)
    refused = decisions[-1]
    assert refused.failed == rpm(10) and refused.retry_after is not None
    assert 58 < refused.retry_after <= 60
    ttl = int(redis_server.command("TTL", f"{PREFIX}:client:a:rpm").split(b"\r\n")[0][1:])
    assert 0 < ttl <= 61


@pytest_twisted.inlineCallbacks
def test_all_or_nothing_and_settle(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    store = new_store(stores, config(redis_server))
    yield from ready(store)
    first = yield store.admit([rpm(10), tpm(100, 80)])
    assert first.allowed
    refused = yield store.admit([rpm(10), tpm(100, 30)])
    assert not refused.allowed and refused.failed == tpm(100, 30)
    # Settle the 80 reserved to 20 actually used: 80 more now fit, and rpm counted 2.
    adjustments, releases = Ticket.of(first).settle({"client": (20, True)})
    store.settle(adjustments, releases, None)
    ok = yield store.admit([rpm(10), tpm(100, 80)])
    assert ok.allowed and [s.used for s in ok.states] == [2, 100]


@pytest_twisted.inlineCallbacks
def test_budgets_and_concurrency(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    store = new_store(stores, config(redis_server))
    yield from ready(store)
    month = PeriodCheck(f"{PREFIX}:client:a:month", 100, 60, "tokens_per_month", "client", "month")
    day = PeriodCheck(f"{PREFIX}:client:a:day", 1000, 60, "tokens_per_day", "client", "day")
    admitted = yield store.admit([month, day])
    now = time.time()
    assert admitted.allowed
    assert admitted.states[0].slot == period_number("month", now)  # Lua's calendar = Python's
    assert admitted.states[1].slot == period_number("day", now)
    refused = yield store.admit([month, day])
    assert not refused.allowed and refused.failed == month and refused.retry_after is None
    ttl = int(redis_server.command("TTL", month.key).split(b"\r\n")[0][1:])
    assert 86400 < ttl <= 32 * 86400

    def lease(name: str) -> ConcurrencyCheck:
        return ConcurrencyCheck(f"{PREFIX}:client:a:inflight", 1, name, 30.0, "max_concurrent",
                                "client")

    held = yield store.admit([lease("r1")])
    assert held.allowed
    assert not (yield store.admit([lease("r2")])).allowed
    store.settle(*Ticket.of(held).settle({"client": (0, True)}), None)
    assert (yield store.admit([lease("r2")])).allowed


@pytest_twisted.inlineCallbacks
def test_usage_is_shared(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    one = new_store(stores, config(redis_server))
    two = new_store(stores, config(redis_server))
    yield from ready(one)
    yield from ready(two)
    usage = Usage(input_tokens=3, output_tokens=4, cache_write_tokens=2)
    one.settle([], [], UsageRecord("a", "m", "p", "b", usage))
    two.settle([], [], UsageRecord("a", "m", "p", "b", usage))
    snapshot: dict[str, Any] = {}
    for _ in range(50):
        snapshot = yield one.usage_snapshot()
        if snapshot["clients"].get("a", {}).get("requests") == 2:
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert snapshot["clients"]["a"] == {
        "requests": 2, "input_tokens": 6, "output_tokens": 8, "cache_read_tokens": 0,
        "cache_write_tokens": 4,
    }
    fields = redis_server.command("HKEYS", f"{PREFIX}:usage").decode()
    assert json.dumps(["a", "m", "p", "b", "requests"]) in fields


@pytest_twisted.inlineCallbacks
def test_outage_fails_open_with_a_local_share_then_recovers(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    events: list[str] = []
    store = new_store(
        stores,
        config(redis_server, fallback_instances=2),
        on_event=lambda name, what: events.append(what),
    )
    yield from ready(store)
    assert (yield store.admit([rpm(10)])).allowed
    redis_server.kill()
    started = time.monotonic()
    decisions = []
    for _ in range(8):
        decisions.append((yield store.admit([rpm(10)])))
    assert time.monotonic() - started < 5  # never waits longer than the timeout
    assert store.state == "down"
    assert all(d.degraded and d.store == "fallback" for d in decisions)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3  # 10 / 2 instances
    store.settle([], [], UsageRecord("a", "m", "p", "b", Usage(input_tokens=5)))
    assert "down" in events and any(e.startswith("error:") for e in events)
    redis_server.start()
    yield from until(lambda: store.state == "up")
    assert events[-1] == "up"
    back = yield store.admit([rpm(10)])
    assert back.allowed and not back.degraded and back.states[0].used == 1  # fresh server
    # Usage counted during the outage reached Redis once it was back.
    snapshot: dict[str, Any] = {}
    for _ in range(50):
        snapshot = yield store.usage_snapshot()
        if snapshot["clients"]:
            break
        yield deferLater(reactor, 0.02, lambda: None)
    assert snapshot["clients"]["a"]["input_tokens"] == 5


@pytest_twisted.inlineCallbacks
def test_outage_fails_closed_when_configured(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    store = new_store(stores, config(redis_server, on_store_failure="closed"))
    yield from ready(store)
    redis_server.kill()
    refused = yield store.admit([rpm(10)])
    assert not refused.allowed and refused.failed is None and refused.degraded
    redis_server.start()
    yield from until(lambda: store.state == "up")
    assert (yield store.admit([rpm(10)])).allowed


@pytest_twisted.inlineCallbacks
def test_password_is_used(
    processes: ProcessGroup, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    server = processes.redis(password="s3cret-pw")
    good = new_store(stores, config(server, password="s3cret-pw"))
    yield from ready(good)
    assert (yield good.admit([rpm(1)])).allowed
    bad = new_store(stores, config(server, password="wrong"))
    yield from until(lambda: bad.state != "connecting")
    assert bad.state == "down"
    decision: Deferred[Decision] = bad.admit([rpm(1)])
    assert (yield decision).degraded


@pytest_twisted.inlineCallbacks
def test_tls_with_a_pinned_ca(
    tmp_path: Any, certs: TestCertificates, processes: ProcessGroup, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    server = processes.redis(tls=(certs.chain, certs.key, certs.ca))
    store = new_store(stores, config(server, tls=True, ca_file=str(certs.ca)))
    yield from ready(store)
    assert (yield store.admit([rpm(1)])).allowed
    # A CA that did not sign the server's certificate: never connects.
    other = make_certificates(tmp_path / "other")
    untrusting = new_store(stores, config(server, tls=True, ca_file=str(other.ca)))
    yield from until(lambda: untrusting.state != "connecting")
    assert untrusting.state == "down"


def test_reconnect_attempts_stay_close_together(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> None:
    """The campaign: recovery was noticed 8-14 s late, behind txredisapi's reconnect delay
    that grows to 10 s; relayd caps it so a returning Redis is seen within ~2 s."""
    store = new_store(stores, config(redis_server))
    factory = store._connection.factory
    delays = [factory.retryDelay(attempt) for attempt in range(1, 40)]
    assert max(delays) <= RECONNECT_MAX_DELAY * 2  # a cap of 1 s, with txredisapi's jitter
    assert RECONNECT_MAX_DELAY <= 1.0


@pytest_twisted.inlineCallbacks
def test_object_records_are_shared_and_survive_an_outage_locally(
    redis_server: RedisServerProcess, stores: list[RedisStore]
) -> Generator[Any, Any, None]:
    one = new_store(stores, config(redis_server))
    two = new_store(stores, config(redis_server))
    yield from ready(one)
    yield from ready(two)
    record = ObjectRecord("team-a", "anthropic", "us")
    yield one.claim("anthropic.batch", "msgbatch_1", record)
    assert (yield two.owners("anthropic.batch", ["msgbatch_1", "msgbatch_2"])) == [record, None]
    ttl = int(redis_server.command("TTL", f"{PREFIX}:object:anthropic.batch:msgbatch_1")
              .decode().strip(":\r\n"))
    assert 30 * 24 * 3600 < ttl <= 31 * 24 * 3600
    redis_server.kill()
    # What this instance recorded stays reachable here; others' records cannot be read.
    assert (yield one.owners("anthropic.batch", ["msgbatch_1"])) == [record]
    failed: list[Any] = []
    yield two.owners("anthropic.batch", ["msgbatch_1"]).addErrback(failed.append)
    assert failed and failed[0].check(StoreUnavailableError)
