"""``balance: least_latency`` through real processes: two fake upstream backends of one
provider, one of them slow to answer; the official SDK as the client. Counts only (which
backend the fake upstreams say served), never timings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
from support import CLIENT_KEY, backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]


def served(upstream: FakeUpstreamProcess) -> int:
    return len([r for r in upstream.requests() if r["path"] == "/v1/messages"])


def run(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
    balance: str,
) -> tuple[int, int]:
    fast, slow = upstream_factory("a1"), upstream_factory("a2")
    slow.configure(latency=0.15)
    config: dict[str, Any] = relay_config(
        certs, [backend("a1", fast), backend("a2", slow)], [], health={"enabled": False},
    )
    config["providers"] = config["providers"][:1]  # Anthropic only
    config["routes"] = config["routes"][:1]
    config["providers"][0]["balance"] = balance
    relay = relayd_factory(config)
    client = anthropic.Anthropic(base_url=relay.url("http"), api_key=CLIENT_KEY, max_retries=0)
    for _ in range(40):
        answer = client.messages.create(model="claude-x", max_tokens=16,
                                        messages=[{"role": "user", "content": "hi"}])
        assert answer.content
    return served(fast), served(slow)


def test_least_latency_sends_most_requests_to_the_fast_backend(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    fast, slow = run(certs, upstream_factory, relayd_factory, "least_latency")
    assert fast + slow == 40
    # Sequential requests: after one slow sample the slow backend costs more than the
    # fast one until its peak fades (10 s), so it serves at most its first request or two.
    assert slow <= 3, (fast, slow)


def test_weighted_keeps_exact_shares_whatever_the_latency(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    assert run(certs, upstream_factory, relayd_factory, "weighted") == (20, 20)
