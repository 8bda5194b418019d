"""Edge rules through real processes: per-address limits shared by two relayd instances
through Redis (clients on 127.0.0.x addresses of their own), and content rules with the
official SDKs. Counts only."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from support import CLIENT_KEY, backend, relay_config
from test_reload_drain import metric_samples

from relayd.testing.certs import TestCertificates
from relayd.testing.processes import (
    FakeUpstreamProcess,
    RedisServerProcess,
    RelaydProcess,
    wait_for,
)

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]
BODY = json.dumps({"model": "claude-x", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def client_from(address: str) -> httpx2.Client:
    return httpx2.Client(transport=httpx2.HTTPTransport(local_address=address), timeout=10)


def post(client: httpx2.Client, relay: RelaydProcess, key: str = CLIENT_KEY) -> Any:
    return client.post(relay.url("http") + "/v1/messages", content=BODY,
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                                "content-type": "application/json"})


def test_a_flood_from_one_address_is_cut_across_instances_while_another_is_served(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
    redis_server: RedisServerProcess,
) -> None:
    upstream = upstream_factory("a1")
    config = relay_config(
        certs, [backend("a1", upstream)], [], health={"enabled": False},
        state={"store": "redis", "url": redis_server.url, "timeout": 0.5},
        # A slow rate, so that the test's own pace cannot refill the bucket.
        edge={"per_address": {"rate": 0.01, "burst": 4}},
    )
    config["providers"] = config["providers"][:1]
    config["routes"] = config["routes"][:1]
    config["admin"] = {"address": "127.0.0.1:0"}
    relays = [relayd_factory(config, name="first"), relayd_factory(config, name="second")]
    # Until an instance's Redis connection is up it keeps the bucket in memory: wait,
    # or a loaded machine lets the first requests pass on two buckets.
    for relay in relays:
        wait_for(lambda relay=relay: [v for _, v in metric_samples(
            relay, "relayd_state_store_up")] == [1.0], 15, "Redis up for both instances")
    flood = client_from("127.0.0.2")
    statuses = [post(flood, relays[i % 2]).status_code for i in range(12)]
    # One bucket for both instances: burst + 1 = 5 pass, wherever they land.
    assert statuses.count(200) == 5 and statuses.count(429) == 7, statuses
    refused = post(flood, relays[0])
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # A flood of bad keys from that address is cut before authentication too.
    assert post(flood, relays[1], key="sk-guess").status_code == 429
    calm = client_from("127.0.0.3")
    assert [post(calm, relays[i % 2]).status_code for i in range(4)] == [200] * 4
    assert len([r for r in upstream.requests() if r["path"] == "/v1/messages"]) == 9


def test_a_denied_prompt_never_reaches_the_upstream_streaming_or_not(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
) -> None:
    anthropic_up, openai_up = upstream_factory("a1"), upstream_factory("o1")
    config = relay_config(
        certs, [backend("a1", anthropic_up)], [backend("o1", openai_up)],
        health={"enabled": False},
        rules=[{"name": "cloud-keys", "match": {"pattern": r"AKIA[0-9A-Z]{16}"}}],
    )
    relay = relayd_factory(config)
    leaked = "my key is AKIAABCDEFGHIJKLMNOP"
    claude = anthropic.Anthropic(base_url=relay.url("http"), api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        claude.messages.create(model="claude-x", max_tokens=16,
                               messages=[{"role": "user", "content": leaked}])
    assert "cloud-keys" in str(refused.value) and "AKIA" not in str(refused.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        with claude.messages.stream(model="claude-x", max_tokens=16,
                                    messages=[{"role": "user", "content": leaked}]) as stream:
            stream.until_done()
    gpt = openai.OpenAI(base_url=relay.url("http") + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        gpt.chat.completions.create(model="gpt-x", stream=True,
                                    messages=[{"role": "user", "content": leaked}])
    assert anthropic_up.requests() == [] and openai_up.requests() == []
    # An innocent prompt goes through.
    assert claude.messages.create(model="claude-x", max_tokens=16,
                                  messages=[{"role": "user", "content": "hi"}]).content
