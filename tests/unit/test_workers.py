"""relayd.workers without processes: the config rules, the control channel, the daemon's
store as the workers see it, and the merge of their metrics and admin answers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from relay_harness import base_config
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relayd.config import ConfigErrors, parse_config
from relayd.limits import ObjectRecord, UsageRecord
from relayd.limits.checks import ConcurrencyCheck, WindowCheck
from relayd.limits.redis import StoreUnavailableError
from relayd.listeners import accept_one_at_a_time
from relayd.providers.base import Usage
from relayd.workers.channel import ChannelClosedError, ControlChannel, RemoteError
from relayd.workers.daemon import worker_count
from relayd.workers.merge import (
    Exposition,
    WorkerFamilies,
    merge_families,
    registry_families,
    sum_documents,
)
from relayd.workers.store import SETTLE_DELAY, DaemonStore, StoreHost

# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "held"), [(1, 1), (4, 4), ("auto", 0), (64, 64)])
def test_workers_values(value: object, held: int) -> None:
    assert parse_config(base_config(workers=value)).workers == held


@pytest.mark.parametrize("value", [0, 65, -1, "many", 2.5, True])
def test_workers_refuses_other_values(value: object) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config(base_config(workers=value))
    assert [e.path for e in info.value.errors] == ["workers"]
    assert "must be auto or an integer from 1 to 64" in str(info.value)


def test_auto_is_the_cpus_this_process_may_use() -> None:
    assert worker_count(parse_config(base_config(workers="auto"))) == len(os.sched_getaffinity(0))
    assert worker_count(parse_config(base_config(workers=3))) == 3


def _signing_and_per_address(**extra: Any) -> dict[str, Any]:
    config = base_config(edge={"per_address": {"rate": 5}}, **extra)
    config["clients"][0]["signing"] = {"secret_env": "SIGNING"}
    return config


@pytest.mark.parametrize("workers", [2, "auto"])
def test_per_worker_state_is_refused_with_the_memory_store(workers: object) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config(_signing_and_per_address(workers=workers),
                     environ={"SIGNING": "s" * 32})
    errors = {e.path: e.message for e in info.value.errors}
    assert set(errors) == {"clients[0].signing", "edge.per_address"}
    assert "replayed through another worker" in errors["clients[0].signing"]
    assert "once per worker" in errors["edge.per_address"]
    assert all("state.store: redis" in message for message in errors.values())


def test_per_worker_state_is_fine_with_one_worker_or_redis() -> None:
    environ = {"SIGNING": "s" * 32}
    parse_config(_signing_and_per_address(), environ=environ)
    parse_config(
        _signing_and_per_address(workers=2, state={"store": "redis",
                                                   "url": "redis://127.0.0.1:6379/0"}),
        environ=environ,
    )
    # Limits stay exact with the memory store: the daemon holds it.
    limited = base_config(workers=2)
    limited["clients"][0]["limits"] = {"requests_per_minute": 60}
    parse_config(limited)


# -- the control channel ----------------------------------------------------------------------


class Pair:
    """Two channels joined by string transports; :meth:`pump` delivers what was written."""

    def __init__(self, left: dict[str, Any], right: dict[str, Any]) -> None:
        self.lost: list[str] = []
        self.left = ControlChannel(left, on_lost=lambda: self.lost.append("left"))
        self.right = ControlChannel(right, on_lost=lambda: self.lost.append("right"))
        self.left_wire, self.right_wire = StringTransport(), StringTransport()
        self.left.makeConnection(self.left_wire)
        self.right.makeConnection(self.right_wire)

    def pump(self) -> None:
        while self.left_wire.value() or self.right_wire.value():
            sent, received = self.left_wire.value(), self.right_wire.value()
            self.left_wire.clear()
            self.right_wire.clear()
            if sent:
                self.right.dataReceived(sent)
            if received:
                self.left.dataReceived(received)


def _boom() -> None:
    raise ValueError("no such thing")


def test_calls_casts_and_errors_cross_the_channel() -> None:
    seen: list[Any] = []
    pair = Pair({}, {"add": lambda a, b: a + b, "note": seen.append, "boom": _boom})
    answers: list[Any] = []
    pair.left.call("add", 2, 3).addCallback(answers.append)
    pair.left.cast("note", {"x": 1})
    failed = pair.left.call("boom")
    errors: list[Any] = []
    failed.addErrback(errors.append)
    assert answers == [] and seen == []  # nothing before the bytes travel
    pair.pump()
    assert answers == [5] and seen == [{"x": 1}]
    assert errors[0].check(RemoteError) and "no such thing" in errors[0].getErrorMessage()


def test_a_lost_channel_fails_what_waits_and_refuses_new_calls() -> None:
    pair = Pair({}, {"add": lambda a, b: a + b})
    waiting: list[Any] = []
    pair.left.call("add", 1, 1).addErrback(waiting.append)
    pair.left.connectionLost()
    assert waiting[0].check(ChannelClosedError)
    assert pair.lost == ["left"]
    later: list[Any] = []
    pair.left.call("add", 1, 1).addErrback(later.append)
    assert later[0].check(ChannelClosedError)


# -- the daemon's store, from two workers ----------------------------------------------------


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


class Workers:
    """Two workers' DaemonStores on one daemon StoreHost."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.host = StoreHost(clock)
        self.settle_messages = 0

        def handlers(index: int) -> dict[str, Any]:
            given = self.host.handlers(index)

            def settle(queued: Any) -> None:
                self.settle_messages += 1
                given["settle"](queued)

            return {**given, "settle": settle}

        self.pairs = [Pair({}, handlers(index)) for index in range(2)]
        self.stores = [DaemonStore(pair.left, clock) for pair in self.pairs]

    def pump(self) -> None:
        for pair in self.pairs:
            pair.pump()


@pytest.fixture
def workers(clock: MemoryReactorClock) -> Iterator[Workers]:
    yield Workers(clock)


def test_a_limit_holds_across_workers(workers: Workers) -> None:
    check = WindowCheck("team-a:rpm", 60, 1, "requests_per_minute", "client")
    decisions: list[Any] = []
    for n in range(200):
        workers.stores[n % 2].admit([check]).addCallback(decisions.append)
    workers.pump()
    assert len(decisions) == 200
    assert sum(d.allowed for d in decisions) == 60


def test_settlements_are_batched_and_sent_before_the_next_call(
    workers: Workers, clock: MemoryReactorClock
) -> None:
    store = workers.stores[0]
    record = UsageRecord("team-a", "claude", "anthropic", "us", Usage(10, 5))
    for _ in range(3):
        store.settle((), (), record)
    clock.advance(0)
    workers.pump()
    assert workers.settle_messages == 0  # usage alone waits for more
    clock.advance(SETTLE_DELAY)
    workers.pump()
    assert workers.settle_messages == 1
    lease = ConcurrencyCheck("team-a:c", 2, "lease-1", 60.0, "max_concurrent", "client")
    store.settle((), (), record)
    store.settle((), (lease,), record)  # a slot given back goes at the end of the turn
    clock.advance(0)
    workers.pump()
    assert workers.settle_messages == 2
    store.settle((), (), record)
    snapshot: list[Any] = []
    store.usage_snapshot().addCallback(snapshot.append)  # sends the queued one first
    workers.pump()
    assert workers.settle_messages == 3
    assert snapshot[0]["clients"]["team-a"]["requests"] == 6


def test_objects_claimed_through_one_worker_are_known_to_the_other(workers: Workers) -> None:
    record = ObjectRecord("team-a", "anthropic", "us")
    workers.stores[0].claim("batch", "msgbatch_1", record)
    found: list[Any] = []
    workers.stores[1].owners("batch", ["msgbatch_1", "msgbatch_2"]).addCallback(found.append)
    workers.pump()
    assert found == [[record, None]]


def test_without_the_daemon_owners_are_unavailable_and_admission_is_local(
    workers: Workers,
) -> None:
    store = workers.stores[0]
    workers.pairs[0].left.connectionLost()
    failed: list[Any] = []
    store.owners("batch", ["x"]).addErrback(failed.append)
    assert failed[0].check(StoreUnavailableError)
    check = WindowCheck("team-a:rpm", 1, 1, "requests_per_minute", "client")
    decisions: list[Any] = []
    for _ in range(2):
        store.admit([check]).addCallback(decisions.append)
    assert [d.allowed for d in decisions] == [True, False]
    assert all(d.degraded for d in decisions)  # settled locally, as the gate is told
    assert store.describe() == {"store": "memory", "reachable": False, "held_by": "daemon"}


def test_the_slots_of_a_worker_that_died_are_given_back(workers: Workers) -> None:
    lease = [ConcurrencyCheck("team-a:c", 2, f"lease-{n}", 3600.0, "max_concurrent", "client")
             for n in range(3)]
    decisions: list[Any] = []
    workers.stores[0].admit([lease[0]]).addCallback(decisions.append)
    workers.stores[0].admit([lease[1]]).addCallback(decisions.append)
    workers.pump()
    workers.stores[1].admit([lease[2]]).addCallback(decisions.append)
    workers.pump()
    assert [d.allowed for d in decisions] == [True, True, False]  # two slots, both held
    workers.host.worker_gone(0)  # worker 0 was killed with its two requests
    workers.stores[1].admit([lease[2]]).addCallback(decisions.append)
    workers.pump()
    assert decisions[-1].allowed


def test_a_sync_answers_after_the_settlements_before_it(workers: Workers) -> None:
    store = workers.stores[0]
    store.settle((), (), UsageRecord("team-a", "m", "anthropic", "us", Usage(1, 1)))
    synced: list[Any] = []
    store.sync().addCallback(synced.append)
    workers.pump()
    assert synced == [None] and workers.settle_messages == 1


def test_the_host_refuses_other_operations(clock: MemoryReactorClock) -> None:
    with pytest.raises(ValueError, match="unknown store operation"):
        StoreHost(clock).call("close", ())


# -- merging the workers' metrics and answers -------------------------------------------------


def _worker_registry(requests: int, healthy: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("relayd_requests_total", "Requests.", ["status"], registry=registry)
    counter.labels("200").inc(requests)
    Gauge("relayd_backend_healthy", "Healthy.", ["backend"], registry=registry).labels(
        "us").set(healthy)
    Gauge("relayd_streams_open", "Streams.", registry=registry).set(requests // 10)
    Gauge("relayd_backend_weight", "Weight.", ["backend"], registry=registry).labels(
        "us").set(3)
    Histogram("relayd_request_duration_seconds", "Duration.", buckets=(1.0,),
              registry=registry).observe(0.5)
    Counter("relayd_config_reloads_total", "Reloads.", registry=registry).inc()
    return registry


def _samples(families: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families for s in family.samples
    }


def test_metrics_are_summed_labelled_or_shown_once() -> None:
    first = registry_families(_worker_registry(30, 1.0))
    second = registry_families(_worker_registry(12, 0.0))
    merged = merge_families([(0, first), (1, second)])
    samples = _samples(merged)
    assert samples[("relayd_requests_total", (("status", "200"),))] == 42
    assert samples[("relayd_streams_open", ())] == 3 + 1
    assert samples[("relayd_request_duration_seconds_count", ())] == 2
    assert samples[("relayd_request_duration_seconds_bucket", (("le", "1.0"),))] == 2
    assert samples[("relayd_backend_healthy", (("backend", "us"), ("worker", "0")))] == 1
    assert samples[("relayd_backend_healthy", (("backend", "us"), ("worker", "1")))] == 0
    assert samples[("relayd_backend_weight", (("backend", "us"),))] == 3  # not 6
    created = [value for (name, _), value in samples.items()
               if name == "relayd_requests_created"]
    stamps = [value for family in first + second for name, _, value in family[4]
              if name == "relayd_requests_created"]
    assert created == [min(stamps)]  # when the first worker started counting
    assert not any(name.startswith("relayd_config_reloads") for name, _ in samples)
    exposition = generate_latest(Exposition(CollectorRegistry(), merged)).decode()
    assert exposition.count("# TYPE relayd_requests_total counter") == 1


def test_sums_never_go_backwards_when_a_worker_is_late_or_gone() -> None:
    families = WorkerFamilies()

    def total(answers: dict[int, Any]) -> float:
        return _samples(families.merged(answers))[("relayd_requests_total", (("status", "200"),))]

    def worker(index: int, requests: int) -> tuple[int, Any]:
        return index, registry_families(_worker_registry(requests, 1.0))

    # Serial numbers 1 and 2 are workers 0 and 1; serial 3 is worker 0 started again.
    assert total({1: worker(0, 30), 2: worker(1, 10)}) == 40
    assert total({2: worker(1, 12)}) == 42  # worker 0 was late: its last answer counts
    families.worker_gone(1)  # killed; its replacement starts from zero
    assert total({3: worker(0, 1), 2: worker(1, 12)}) == 43
    samples = _samples(families.merged({}))
    assert ("relayd_backend_healthy", (("backend", "us"), ("worker", "0"))) in samples
    families.worker_gone(3)
    families.worker_gone(2)
    samples = _samples(families.merged({}))
    assert samples[("relayd_requests_total", (("status", "200"),))] == 43
    assert not any(name == "relayd_backend_healthy" for name, _ in samples)  # gauges go


def test_sum_documents_adds_numbers_and_keeps_the_rest() -> None:
    documents = [
        {"lookups": {"hit": 2, "miss": 1}, "memory": {"entries": 3}, "route": "r", "on": True},
        {"lookups": {"hit": 5, "bypass": 1}, "memory": {"entries": 4}, "route": "r", "on": True},
    ]
    assert sum_documents(documents) == {
        "lookups": {"hit": 7, "miss": 1, "bypass": 1}, "memory": {"entries": 7},
        "route": "r", "on": True,
    }


def test_an_adopted_port_accepts_one_connection_per_wake_up() -> None:
    class Port:
        numberAccepts = 100
        reads = 0

        def doRead(self) -> None:
            self.reads += 1
            self.numberAccepts += 20  # what Twisted does after a full accept loop

    port = Port()
    accept_one_at_a_time(port)
    for _ in range(3):
        port.doRead()
        assert port.numberAccepts == 21  # it was 1 for the loop that just ran
    assert port.reads == 3
