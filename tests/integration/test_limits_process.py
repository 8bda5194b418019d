"""Client limits shared by two ``twistd relayd`` processes through one real redis-server.

Requests go to both instances; the limits hold across them exactly, token limits are
settled on the usage the (streamed) responses reported, and a Redis outage switches to
the configured failure mode and back without a restart.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
from support import CLIENT_KEY, backend, relay_config, sha

from relayd.limits.policy import estimate_tokens
from relayd.testing.certs import TestCertificates
from relayd.testing.exposition import metric_samples
from relayd.testing.processes import (
    FakeUpstreamProcess,
    RedisServerProcess,
    RelaydProcess,
    wait_for,
)

LIMITED = "sk-relay-limited-client"
MESSAGE: dict[str, Any] = {
    "model": "claude-limits",
    "max_tokens": 200,
    "messages": [{"role": "user", "content": "count these tokens, please"}],
}


class Instance:
    def __init__(self, process: RelaydProcess) -> None:
        self.process = process
        self.url = process.url("http")
        self.admin = process.admin_url()

    def admin_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def ready(self) -> bool:
        return self.admin_get("/readyz")[0] == 200

    def metric(self, name: str) -> float | None:
        samples = metric_samples(self.admin_get("/metrics")[1].decode(), name)
        return samples[0][1] if samples else None

    def post(self, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body or MESSAGE).encode()
        request = urllib.request.Request(
            self.url + "/v1/messages",
            data=data,
            headers={"x-api-key": LIMITED, "anthropic-version": "2023-06-01",
                     "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, _lower(response.headers.items()), response.read()
        except urllib.error.HTTPError as error:
            return error.code, _lower(error.headers.items()), error.read()


def _lower(items: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


def anthropic_only(
    certs: TestCertificates, upstream: FakeUpstreamProcess, **extra: Any
) -> dict[str, Any]:
    config = relay_config(certs, [backend("a1", upstream)], [], health={"enabled": False},
                          **extra)
    config["routes"] = [r for r in config["routes"] if r["api"] == "anthropic"]
    config["providers"] = [p for p in config["providers"] if p["backends"]]
    return config


def start_pair(
    certs: TestCertificates,
    upstream: FakeUpstreamProcess,
    relayd_factory: Callable[..., RelaydProcess],
    redis: RedisServerProcess,
    limits: dict[str, Any],
    states: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
) -> tuple[Instance, Instance]:
    instances = []
    for name, extra_state in zip(("one", "two"), states, strict=True):
        config = anthropic_only(
            certs, upstream, admin={"address": "127.0.0.1:0"},
            state={"store": "redis", "url": redis.url, "timeout": 0.5, **extra_state},
        )
        config["clients"].append({"name": "limited", "key_sha256": sha(LIMITED), "limits": limits})
        instance = Instance(relayd_factory(config, name=name))
        wait_for(instance.ready, 15, f"relayd {name} to be ready", instance.process.log_path)
        instances.append(instance)
    return instances[0], instances[1]


def test_requests_per_minute_hold_exactly_across_two_instances(
    certs: TestCertificates,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
    redis_server: RedisServerProcess,
) -> None:
    upstream = upstream_factory("a1")
    one, two = start_pair(certs, upstream, relayd_factory, redis_server,
                          {"requests_per_minute": 60})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (one if i % 2 else two).post(), range(200)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 60 and statuses.count(429) == 140
    assert len(upstream.requests()) == 60
    for status, headers, body in results:
        if status == 429:
            assert json.loads(body)["error"]["type"] == "rate_limit_error"
            assert 1 <= int(headers["retry-after"]) <= 60
            assert headers["x-relayd-limit"] == "requests_per_minute"
        else:
            assert int(headers["anthropic-ratelimit-requests-limit"]) == 60
    # Both instances served some of the 60, and refused the rest.
    served = {name: sum(1 for i, (s, _, _) in enumerate(results) if s == 200 and i % 2 == odd)
              for name, odd in (("one", 1), ("two", 0))}
    assert served["one"] > 0 and served["two"] > 0


def test_tokens_per_minute_with_streams_settle_on_actual_usage(
    certs: TestCertificates,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
    redis_server: RedisServerProcess,
) -> None:
    upstream = upstream_factory("a1")
    reserved = estimate_tokens(dict(MESSAGE, stream=True), 0)
    # Learn what one streamed request really uses (through an unlimited client).
    probe = relayd_factory(anthropic_only(certs, upstream), name="probe")
    claude = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=probe.url("http"), max_retries=0)
    with claude.messages.stream(**MESSAGE) as stream:
        u = stream.get_final_message().usage
    actual = (u.input_tokens + u.output_tokens + (u.cache_read_input_tokens or 0)
              + (u.cache_creation_input_tokens or 0))
    assert actual < reserved  # settling matters: the reservation is larger than the use
    expected = 6
    # Request k fits while (k - 1) * actual settled + reserved <= limit: exactly `expected`.
    limit = (expected - 1) * actual + reserved + actual // 2
    one, two = start_pair(certs, upstream, relayd_factory, redis_server,
                          {"tokens_per_minute": limit})
    outcomes = []
    for i in range(expected + 6):
        instance = one if i % 2 else two
        client = anthropic.Anthropic(api_key=LIMITED, base_url=instance.url, max_retries=0)
        try:
            with client.messages.stream(**MESSAGE) as stream:
                stream.get_final_message()
            outcomes.append(200)
        except anthropic.RateLimitError as error:
            assert error.response.headers["x-relayd-limit"] == "tokens_per_minute"
            outcomes.append(429)
    assert outcomes == [200] * expected + [429] * 6
    status, body = one.admin_get("/admin/usage")
    assert status == 200
    totals = json.loads(body)["clients"]["limited"]
    assert totals["requests"] == expected  # shared: both instances' requests
    used = sum(totals[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                   "cache_write_tokens"))
    assert used == expected * actual <= limit
    assert json.loads(two.admin_get("/admin/usage")[1])["clients"]["limited"] == totals


def test_redis_outage_fails_open_or_closed_then_recovers(
    certs: TestCertificates,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
    redis_server: RedisServerProcess,
) -> None:
    upstream = upstream_factory("a1")
    open_, closed = start_pair(
        certs, upstream, relayd_factory, redis_server, {"requests_per_minute": 20},
        states=({"on_store_failure": "open", "fallback_instances": 2},
                {"on_store_failure": "closed"}),
    )
    assert [open_.post()[0] for _ in range(4)] == [200] * 4
    assert open_.metric("relayd_state_store_up") == 1.0
    redis_server.kill()
    open_results = [open_.post()[0] for _ in range(15)]
    closed_results = [closed.post() for _ in range(3)]
    # Open: this instance's local share, 20 / 2 instances, counted afresh.
    assert open_results == [200] * 10 + [429] * 5
    for status, headers, body in closed_results:
        assert status == 503 and "unreachable" in json.loads(body)["error"]["message"]
        assert int(headers["retry-after"]) >= 1
    assert open_.metric("relayd_state_store_up") == 0.0
    errors = open_.metric("relayd_state_store_errors_total")
    assert errors is not None and errors >= 1
    assert open_.process.log_text().count("state store: lost Redis") == 1  # logged once
    assert closed.admin_get("/readyz")[0] == 503
    redis_server.start()  # same port, empty
    wait_for(lambda: open_.metric("relayd_state_store_up") == 1.0, 15, "recovery (open)")
    wait_for(closed.ready, 15, "recovery (closed)")
    assert "Redis at" in open_.process.log_text() and "is back" in open_.process.log_text()
    after = [(open_ if i % 2 else closed).post()[0] for i in range(24)]
    assert after == [200] * 20 + [429] * 4  # shared again: 20 across both
