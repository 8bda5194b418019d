"""RelayMetrics: each method's samples, the scrape-time backend collector, promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

import relayd
from relayd.metrics import RelayMetrics
from relayd.providers.base import Usage

SECRET = "sk-SECRET-never-in-metrics"

FINISHED: dict[str, Any] = {
    "client": "team-a", "api": "anthropic", "provider": "anthropic", "backend": "us",
    "model": "claude-sonnet-4-5", "status": 200, "outcome": "ok", "total": 1.5,
    "ttfb": 0.25, "upstream_wait": 1.4995,
    "usage": Usage(input_tokens=10, output_tokens=20, cache_read_tokens=0,
                   cache_write_tokens=None),
}


def value(metrics: RelayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- fakes of the runtime contract ---------------------------------------------------------


@dataclass
class FakeKey:
    index: int
    cooldown_until: float = 0.0
    secret: str = SECRET


@dataclass
class FakeKeySet:
    keys: tuple[FakeKey, ...]


@dataclass
class FakeHealth:
    healthy: bool = True


@dataclass
class FakeBreaker:
    state: str = "closed"


@dataclass
class FakeBackend:
    provider_name: str
    name: str
    weight: int = 1
    priority: int = 0
    in_flight: int = 0
    health: FakeHealth = field(default_factory=FakeHealth)
    breaker: FakeBreaker = field(default_factory=FakeBreaker)
    keys: FakeKeySet = field(default_factory=lambda: FakeKeySet((FakeKey(0),)))
    pool: FakePool | None = None


@dataclass
class FakeRuntime:
    backends: list[FakeBackend]


@dataclass
class FakePool:
    idle: int
    opened: int = 0
    stale_retries: int = 0

    def idle_connections(self) -> int:
        return self.idle


def fake_runtime(clock: MemoryReactorClock) -> FakeRuntime:
    return FakeRuntime([
        FakeBackend(
            "anthropic", "us", weight=3, priority=0, in_flight=2,
            keys=FakeKeySet((FakeKey(0), FakeKey(1, cooldown_until=clock.seconds() + 30.0),
                             FakeKey(2, cooldown_until=clock.seconds() - 5.0))),
            pool=FakePool(3, opened=7, stale_retries=2),
        ),
        FakeBackend(
            "anthropic", "eu", weight=1, priority=1,
            health=FakeHealth(False), breaker=FakeBreaker("open"),
        ),
    ])


@pytest.fixture
def clock() -> MemoryReactorClock:
    c = MemoryReactorClock()
    c.advance(1000.0)
    return c


@implementer(ILogObserver)
class LogCapture:
    """Collects log events."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


# -- request-path metrics ------------------------------------------------------------------


def test_build_info_and_own_registry() -> None:
    """build_info carries the version; nothing lands in the global default registry."""
    metrics = RelayMetrics()
    assert value(metrics, "relayd_build_info", version=relayd.__version__) == 1.0
    assert REGISTRY.get_sample_value("relayd_requests_in_flight") is None
    # A second instance has its own registry: no duplicate-name clash.
    other = RelayMetrics(CollectorRegistry())
    assert other.registry is not metrics.registry


def test_request_started_and_finished() -> None:
    metrics = RelayMetrics()
    metrics.request_started(stream=True)
    metrics.request_started()
    assert value(metrics, "relayd_requests_in_flight") == 2.0
    metrics.request_finished(**FINISHED)
    assert value(metrics, "relayd_requests_in_flight") == 1.0
    assert value(
        metrics, "relayd_requests_total", client="team-a", api="anthropic",
        provider="anthropic", backend="us", model="claude-sonnet-4-5", status="200",
    ) == 1.0
    assert value(
        metrics, "relayd_request_duration_seconds_sum", api="anthropic", provider="anthropic"
    ) == 1.5
    assert value(
        metrics, "relayd_time_to_first_byte_seconds_count", api="anthropic",
        provider="anthropic",
    ) == 1.0
    # 1.5 - 1.4995 = 0.0005: in the 0.0005 bucket, not in the 0.00025 one.
    assert value(
        metrics, "relayd_relay_overhead_seconds_bucket", api="anthropic", le="0.0005"
    ) == 1.0
    assert value(
        metrics, "relayd_relay_overhead_seconds_bucket", api="anthropic", le="0.00025"
    ) == 0.0
    tokens = {"client": "team-a", "provider": "anthropic", "model": "claude-sonnet-4-5"}
    assert value(metrics, "relayd_tokens_total", kind="input", **tokens) == 10.0
    assert value(metrics, "relayd_tokens_total", kind="output", **tokens) == 20.0
    # Zero and None counts create no series at all.
    assert value(metrics, "relayd_tokens_total", kind="cache_read", **tokens) is None
    assert value(metrics, "relayd_tokens_total", kind="cache_write", **tokens) is None


def test_request_finished_repeats_and_edge_cases() -> None:
    """Same labels accumulate; no ttfb and no usage are fine; overhead never negative."""
    metrics = RelayMetrics()
    labels = {"client": "team-a", "api": "openai", "provider": "oai", "backend": "b1",
              "model": "gpt-4o", "status": "502"}
    for _ in range(3):
        metrics.request_started()
        metrics.request_finished(
            **{**FINISHED, "api": "openai", "provider": "oai", "backend": "b1",
               "model": "gpt-4o", "status": 502, "outcome": "upstream_error",
               "ttfb": None, "total": 0.5, "upstream_wait": 0.7,
               "usage": Usage(cache_read_tokens=7, cache_write_tokens=4)},
        )
    assert value(metrics, "relayd_requests_in_flight") == 0.0
    assert value(metrics, "relayd_requests_total", **labels) == 3.0
    assert value(
        metrics, "relayd_time_to_first_byte_seconds_count", api="openai", provider="oai"
    ) is None
    assert value(metrics, "relayd_relay_overhead_seconds_sum", api="openai") == 0.0
    assert value(metrics, "relayd_relay_overhead_seconds_count", api="openai") == 3.0
    tokens = {"client": "team-a", "provider": "oai", "model": "gpt-4o"}
    assert value(metrics, "relayd_tokens_total", kind="cache_read", **tokens) == 21.0
    assert value(metrics, "relayd_tokens_total", kind="cache_write", **tokens) == 12.0
    assert value(metrics, "relayd_tokens_total", kind="input", **tokens) is None

    metrics.request_started()
    metrics.request_finished(**{**FINISHED, "usage": None})
    assert value(
        metrics, "relayd_requests_total", client="team-a", api="anthropic",
        provider="anthropic", backend="us", model="claude-sonnet-4-5", status="200",
    ) == 1.0


def test_streams_open_gauge() -> None:
    metrics = RelayMetrics()
    metrics.stream_opened()
    metrics.stream_opened()
    metrics.stream_closed()
    assert value(metrics, "relayd_streams_open") == 1.0


def test_upstream_counters() -> None:
    metrics = RelayMetrics()
    metrics.upstream_attempt("anthropic", "us", "ok")
    metrics.upstream_attempt("anthropic", "us", "status_529")
    metrics.upstream_attempt("anthropic", "us", "status_529")
    metrics.retry("anthropic", "status_529")
    metrics.failover("anthropic", "status_529")
    metrics.retry_refused("anthropic", "budget")
    assert value(
        metrics, "relayd_upstream_attempts_total", provider="anthropic", backend="us",
        result="ok",
    ) == 1.0
    assert value(
        metrics, "relayd_upstream_attempts_total", provider="anthropic", backend="us",
        result="status_529",
    ) == 2.0
    assert value(
        metrics, "relayd_upstream_retries_total", provider="anthropic", reason="status_529"
    ) == 1.0
    assert value(
        metrics, "relayd_failovers_total", provider="anthropic", reason="status_529"
    ) == 1.0
    assert value(
        metrics, "relayd_retries_refused_total", provider="anthropic", reason="budget"
    ) == 1.0


def test_config_reload() -> None:
    """Known results start at 0; only ``ok`` stamps the last-success time."""
    metrics = RelayMetrics()
    assert value(metrics, "relayd_config_reloads_total", result="invalid") == 0.0
    metrics.config_reload("invalid")
    assert value(metrics, "relayd_config_reloads_total", result="invalid") == 1.0
    assert value(metrics, "relayd_config_last_reload_success_timestamp_seconds") == 0.0
    metrics.config_reload("ok")
    assert value(metrics, "relayd_config_reloads_total", result="ok") == 1.0
    stamp = value(metrics, "relayd_config_last_reload_success_timestamp_seconds")
    assert stamp is not None and stamp > 1.6e9


# -- the backend collector -----------------------------------------------------------------


def test_collector_without_source_yields_nothing() -> None:
    metrics = RelayMetrics()
    assert b"relayd_backend_" not in generate_latest(metrics.registry)


def test_collector_reads_the_runtime(clock: MemoryReactorClock) -> None:
    metrics = RelayMetrics()
    runtime = fake_runtime(clock)
    metrics.set_runtime_source(lambda: runtime, clock)
    us = {"provider": "anthropic", "backend": "us"}
    eu = {"provider": "anthropic", "backend": "eu"}
    assert value(metrics, "relayd_backend_healthy", **us) == 1.0
    assert value(metrics, "relayd_backend_healthy", **eu) == 0.0
    assert value(metrics, "relayd_backend_breaker_state", state="closed", **us) == 1.0
    assert value(metrics, "relayd_backend_breaker_state", state="open", **us) == 0.0
    assert value(metrics, "relayd_backend_breaker_state", state="half_open", **us) == 0.0
    assert value(metrics, "relayd_backend_breaker_state", state="open", **eu) == 1.0
    assert value(metrics, "relayd_backend_breaker_state", state="closed", **eu) == 0.0
    assert value(metrics, "relayd_backend_in_flight", **us) == 2.0
    assert value(metrics, "relayd_backend_weight", **us) == 3.0
    assert value(metrics, "relayd_backend_priority", **eu) == 1.0
    assert value(metrics, "relayd_upstream_key_cooldown_seconds", key="0", **us) == 0.0
    assert value(metrics, "relayd_upstream_key_cooldown_seconds", key="1", **us) == 30.0
    assert value(metrics, "relayd_upstream_key_cooldown_seconds", key="2", **us) == 0.0
    assert value(metrics, "relayd_pool_connections", state="idle", **us) == 3.0
    assert value(metrics, "relayd_pool_connections", state="idle", **eu) == 0.0
    assert value(metrics, "relayd_upstream_connections_opened_total", **us) == 7.0
    assert value(metrics, "relayd_upstream_stale_connection_retries_total", **us) == 2.0
    assert value(metrics, "relayd_upstream_stale_connection_retries_total", **eu) == 0.0

    # Read at scrape time: the clock and the runtime's live fields are seen at once.
    clock.advance(10.0)
    runtime.backends[0].in_flight = 5
    runtime.backends[1].breaker.state = "half_open"
    assert value(metrics, "relayd_upstream_key_cooldown_seconds", key="1", **us) == 20.0
    assert value(metrics, "relayd_backend_in_flight", **us) == 5.0
    assert value(metrics, "relayd_backend_breaker_state", state="half_open", **eu) == 1.0
    assert value(metrics, "relayd_backend_breaker_state", state="open", **eu) == 0.0


def test_collector_never_exports_a_key_secret(clock: MemoryReactorClock) -> None:
    metrics = RelayMetrics()
    runtime = fake_runtime(clock)
    metrics.set_runtime_source(lambda: runtime, clock)
    text = generate_latest(metrics.registry)
    assert b"relayd_upstream_key_cooldown_seconds{" in text
    assert SECRET.encode() not in text
    assert b"SECRET" not in text


def test_collector_follows_a_runtime_swap(clock: MemoryReactorClock) -> None:
    """A reload swaps the runtime: the next scrape shows the new backends only."""
    metrics = RelayMetrics()
    current: list[FakeRuntime] = [fake_runtime(clock)]
    metrics.set_runtime_source(lambda: current[0], clock)
    assert value(metrics, "relayd_backend_weight", provider="anthropic", backend="us") == 3.0
    current[0] = FakeRuntime([FakeBackend("openai", "primary", weight=7)])
    assert value(metrics, "relayd_backend_weight", provider="openai", backend="primary") == 7.0
    assert value(metrics, "relayd_backend_weight", provider="anthropic", backend="us") is None
    assert b'backend="us"' not in generate_latest(metrics.registry)


def test_unknown_breaker_state_is_still_shown(clock: MemoryReactorClock) -> None:
    metrics = RelayMetrics()
    runtime = FakeRuntime([FakeBackend("p", "b", breaker=FakeBreaker("forced_open"))])
    metrics.set_runtime_source(lambda: runtime, clock)
    labels = {"provider": "p", "backend": "b"}
    assert value(metrics, "relayd_backend_breaker_state", state="forced_open", **labels) == 1.0
    assert value(metrics, "relayd_backend_breaker_state", state="closed", **labels) == 0.0


def test_collector_failure_is_logged_and_the_scrape_survives(
    clock: MemoryReactorClock,
) -> None:
    metrics = RelayMetrics()

    def broken() -> Any:
        raise RuntimeError("no runtime yet")

    metrics.set_runtime_source(broken, clock)
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        text = generate_latest(metrics.registry)
    finally:
        globalLogPublisher.removeObserver(capture)
    assert b"relayd_requests_in_flight" in text
    assert b"relayd_backend_" not in text
    assert any(e.get("log_failure") is not None for e in capture.events)


# -- promtool ------------------------------------------------------------------------------


def exercised_metrics(clock: MemoryReactorClock) -> RelayMetrics:
    """A RelayMetrics with a sample in every metric family."""
    metrics = RelayMetrics()
    metrics.request_started()
    metrics.stream_opened()
    metrics.request_finished(
        **{**FINISHED, "usage": Usage(input_tokens=1, output_tokens=2, cache_read_tokens=3,
                                      cache_write_tokens=4)},
    )
    metrics.upstream_attempt("anthropic", "us", "ok")
    metrics.retry("anthropic", "timeout")
    metrics.failover("anthropic", "timeout")
    metrics.retry_refused("anthropic", "attempts")
    metrics.config_reload("ok")
    runtime = fake_runtime(clock)
    metrics.set_runtime_source(lambda: runtime, clock)
    return metrics


def test_exposition_passes_promtool(clock: MemoryReactorClock, tmp_path: Any) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("RELAYD_SKIP_PROMTOOL") == "1":
            pytest.skip("promtool not installed and RELAYD_SKIP_PROMTOOL=1")
        pytest.fail(
            "promtool is not installed: install Debian's 'prometheus' package "
            "(apt-get install -y prometheus) or set RELAYD_SKIP_PROMTOOL=1 to skip this check"
        )
    text = generate_latest(exercised_metrics(clock).registry)
    for name in (
        b"relayd_build_info", b"relayd_requests_in_flight", b"relayd_streams_open",
        b"relayd_requests_total", b"relayd_request_duration_seconds_bucket",
        b"relayd_time_to_first_byte_seconds_bucket", b"relayd_relay_overhead_seconds_bucket",
        b"relayd_tokens_total", b"relayd_upstream_attempts_total",
        b"relayd_upstream_retries_total", b"relayd_failovers_total",
        b"relayd_retries_refused_total", b"relayd_config_reloads_total",
        b"relayd_config_last_reload_success_timestamp_seconds", b"relayd_backend_healthy",
        b"relayd_backend_breaker_state", b"relayd_backend_in_flight", b"relayd_backend_weight",
        b"relayd_backend_priority", b"relayd_upstream_key_cooldown_seconds",
        b"relayd_pool_connections",
    ):
        assert name + b"{" in text or name + b" " in text, name
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"promtool check metrics failed:\n{result.stdout.decode()}{result.stderr.decode()}"
    )
