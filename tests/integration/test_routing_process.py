"""Routing that knows the client, through real processes: session affinity (alone, and
shared by two instances through Redis), region routing by client address (a MaxMind DB
written at test time, a trusted proxy's X-Forwarded-For, a forged one), and the three
features of issue 15 together while backends fail. Counts only, never timings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
from support import CLIENT_KEY, UPSTREAM_KEYS, backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.exposition import metric_samples
from relayd.testing.geodb import write_country_db
from relayd.testing.processes import (
    FakeUpstreamProcess,
    RedisServerProcess,
    RelaydProcess,
    wait_for,
)

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]
SESSION = "x-claude-code-session-id"
UPSTREAM_NAMES = {key: name for name, key in UPSTREAM_KEYS.items()}


def anthropic_only(config: dict[str, Any]) -> dict[str, Any]:
    config["providers"] = config["providers"][:1]
    config["routes"] = config["routes"][:1]
    return config


def client(relay: RelaydProcess, local_address: str | None = None) -> anthropic.Anthropic:
    http = None
    if local_address is not None:
        http = anthropic.DefaultHttpxClient(
            transport=httpx2.HTTPTransport(local_address=local_address)
        )
    return anthropic.Anthropic(base_url=relay.url("http"), api_key=CLIENT_KEY, max_retries=0,
                               http_client=http)


def ask(sdk: anthropic.Anthropic, session: str | None = None, system: str = "be brief",
        forwarded: str | None = None) -> None:
    headers = {}
    if session is not None:
        headers[SESSION] = session
    if forwarded is not None:
        headers["x-forwarded-for"] = forwarded
    answer = sdk.messages.create(
        model="claude-x", max_tokens=16, system=system,
        messages=[{"role": "user", "content": "hi"}], extra_headers=headers,
    )
    assert answer.content


def sessions_by_backend(*upstreams: FakeUpstreamProcess) -> dict[str, set[str]]:
    """Which backends served each session (by the session header they received)."""
    found: dict[str, set[str]] = {}
    for upstream in upstreams:
        for record in upstream.requests():
            if record["path"] != "/v1/messages":
                continue
            headers = record["headers"]
            name = UPSTREAM_NAMES[headers["x-api-key"][0]]
            for session in headers.get(SESSION, []):
                found.setdefault(session, set()).add(name)
    return found


def served(upstream: FakeUpstreamProcess) -> int:
    return len([r for r in upstream.requests() if r["path"] == "/v1/messages"])


def usage(relay: RelaydProcess) -> dict[str, Any]:
    answer = httpx2.get(relay.admin_url() + "/admin/usage", timeout=10)
    assert answer.status_code == 200
    result: dict[str, Any] = answer.json()
    return result


def run_sessions(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
    affinity: dict[str, Any],
) -> tuple[dict[str, set[str]], dict[str, Any]]:
    a1, a2 = upstream_factory("a1"), upstream_factory("a2")
    for upstream in (a1, a2):
        upstream.configure(prompt_cache=True)
    config = anthropic_only(relay_config(
        certs, [backend("a1", a1), backend("a2", a2)], [], health={"enabled": False},
        admin={"address": "127.0.0.1:0"},
    ))
    config["routes"][0]["affinity"] = affinity
    relay = relayd_factory(config)
    sdk = client(relay)
    # Five sessions (an odd number: without affinity the 1:1 round robin then sends each
    # session to the other backend on its next turn).
    for _turn in range(4):
        for index in range(5):
            ask(sdk, session=f"session-{index}", system=f"you are agent {index}")
    return sessions_by_backend(a1, a2), usage(relay)


def test_sessions_stick_and_their_prompt_cache_reads_show_in_usage(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    sessions, totals = run_sessions(certs, upstream_factory, relayd_factory, {})
    assert len(sessions) == 5 and all(len(where) == 1 for where in sessions.values())
    # New sessions are balanced by weight (1:1).
    assert Counter(next(iter(w)) for w in sessions.values()) == {"a1": 3, "a2": 2}
    backends = totals["backends"]
    # Each session writes its prompt prefix once and reads it on its three later turns.
    assert sum(b["cache_write_tokens"] for b in backends.values()) == 5 * 1000
    assert sum(b["cache_read_tokens"] for b in backends.values()) == 15 * 1000
    assert all(b["cache_read_share"] > 0.7 for b in backends.values()), backends


def test_without_affinity_sessions_spread_and_pay_cache_writes_twice(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    sessions, totals = run_sessions(certs, upstream_factory, relayd_factory, {"key": "none"})
    assert all(where == {"a1", "a2"} for where in sessions.values())
    backends = totals["backends"]
    assert sum(b["cache_write_tokens"] for b in backends.values()) == 10 * 1000


def test_two_instances_share_pins_through_redis(
    certs: TestCertificates,
    upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
    redis_server: RedisServerProcess,
) -> None:
    a1, a2 = upstream_factory("a1"), upstream_factory("a2")
    config = anthropic_only(relay_config(
        certs, [backend("a1", a1), backend("a2", a2)], [], health={"enabled": False},
        state={"store": "redis", "url": redis_server.url, "timeout": 0.5},
    ))
    first = relayd_factory(config, name="first")
    second = relayd_factory(config, name="second")
    clients = [client(first), client(second)]
    ask(clients[1])  # no session: the second's round robin is now one step on
    for turn in range(6):
        for index in range(4):
            ask(clients[(turn + index) % 2], session=f"shared-{index}")
    sessions = sessions_by_backend(a1, a2)
    assert len(sessions) == 4 and all(len(where) == 1 for where in sessions.values()), sessions
    # The reply in the wire format: the keys are the lines that are not lengths.
    reply = redis_server.command("KEYS", "{relayd}:pin:*").split()
    keys = [line.decode() for line in reply if line.startswith(b"{relayd}:pin:")]
    assert len(keys) == 4
    ttl = int(redis_server.command("PTTL", keys[0]).strip().lstrip(b":"))
    assert 0 < ttl <= 300_000
    # Redis goes away: pins are read from each instance's memory, and no request fails.
    redis_server.kill()
    for turn in range(2):
        for index in range(4):
            ask(clients[turn], session=f"shared-{index}")
    assert all(len(where) == 1 for where in sessions_by_backend(a1, a2).values())


def regional_setup(
    tmp_path: Path, certs: TestCertificates, upstream_factory: UpstreamFactory,
    **extra: Any,
) -> tuple[dict[str, Any], dict[str, FakeUpstreamProcess]]:
    """Backends in three regions; 127.0.0.2 is in Germany, 127.0.0.3 in Japan."""
    database = write_country_db(str(tmp_path / "geo.mmdb"), {
        "127.0.0.2/32": ("DE", "EU"), "127.0.0.3/32": ("JP", "AS"),
    })
    ups = {"us": upstream_factory("a1"), "eu": upstream_factory("a2"),
           "asia": upstream_factory("o1")}
    backends = [
        {**backend("a1", ups["us"]), "name": "us-east", "region": "us"},
        {**backend("a2", ups["eu"]), "name": "eu-west", "region": "eu"},
        {**backend("o1", ups["asia"]), "name": "tokyo", "region": "asia"},
    ]
    config = anthropic_only(relay_config(
        certs, backends, [], health={"enabled": False},
        trusted_proxies=["127.0.0.1/32"], geoip={"database": database}, **extra,
    ))
    config["providers"][0]["regions"] = {"EU": "eu", "JP": "asia", "default": "us"}
    return config, ups


def test_clients_go_to_their_regions_backends_through_a_trusted_proxy(
    tmp_path: Path, certs: TestCertificates, upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
) -> None:
    config, ups = regional_setup(tmp_path, certs, upstream_factory)
    relay = relayd_factory(config)
    proxy = client(relay, local_address="127.0.0.1")  # the trusted proxy
    for _ in range(5):
        ask(proxy, forwarded="127.0.0.2")  # from Germany
    assert (served(ups["us"]), served(ups["eu"]), served(ups["asia"])) == (0, 5, 0)
    for _ in range(5):
        ask(proxy, forwarded="203.0.113.9, 127.0.0.3")  # Japan; a forged hop on the left
    assert (served(ups["us"]), served(ups["eu"]), served(ups["asia"])) == (0, 5, 5)
    for _ in range(5):
        ask(proxy, forwarded="192.0.2.1")  # not in the database: default
    assert (served(ups["us"]), served(ups["eu"]), served(ups["asia"])) == (5, 5, 5)
    # A forged header from a peer that is not a trusted proxy changes nothing: the
    # peer (127.0.0.5, not in the database) counts, and it is in the default region.
    direct = client(relay, local_address="127.0.0.5")
    for _ in range(5):
        ask(direct, forwarded="127.0.0.2")
    assert (served(ups["us"]), served(ups["eu"]), served(ups["asia"])) == (10, 5, 5)
    wait_for(lambda: "client_ip=127.0.0.5" in relay.log_text(), 10, "access lines",
             relay.log_path)
    assert "client_ip=127.0.0.3" in relay.log_text()
    # A direct client in Japan (no proxy) is located by its own address.
    for _ in range(3):
        ask(client(relay, local_address="127.0.0.3"))
    assert served(ups["asia"]) == 8


def test_all_three_together_never_fail_a_request_that_would_succeed(
    tmp_path: Path, certs: TestCertificates, upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
) -> None:
    """least_latency + region + affinity, while the backends sessions are pinned to and
    the region's own backend fail: every request still succeeds (as it would without
    the features), and the pins move."""
    config, ups = regional_setup(tmp_path, certs, upstream_factory,
                                 admin={"address": "127.0.0.1:0"})
    config["providers"][0]["balance"] = "least_latency"
    relay = relayd_factory(config)
    proxy = client(relay, local_address="127.0.0.1")
    for index in range(6):
        ask(proxy, session=f"eu-{index}", forwarded="127.0.0.2")
    assert served(ups["eu"]) == 6  # the region's backend took the new sessions
    ups["eu"].configure(status=529)  # overloaded: every request to it fails
    for _turn in range(3):
        for index in range(6):
            ask(proxy, session=f"eu-{index}", forwarded="127.0.0.2")
    assert served(ups["us"]) + served(ups["asia"]) == 18
    ups["eu"].stop()  # gone altogether: connection refused
    for index in range(6):
        ask(proxy, session=f"eu-{index}", forwarded="127.0.0.2")
        ask(proxy, session=f"new-{index}", forwarded="127.0.0.2")
    assert served(ups["us"]) + served(ups["asia"]) == 30
    metrics = httpx2.get(relay.admin_url() + "/metrics", timeout=10).text
    repins = {
        labels["reason"]: value
        for labels, value in metric_samples(metrics, "relayd_affinity_repins_total")
    }
    # Each eu session moved once: after its pinned backend failed it, or (once the
    # failures opened eu's breaker) before trying it.
    assert repins["failed"] + repins["breaker"] == 6, repins
