"""Signed requests through real processes: two relayd instances on one Redis, the
official SDK signing in an httpx event hook, a replay on the other instance, a stale
timestamp, and Redis going away (signing clients fail closed, the others are served)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from support import CLIENT_KEY, LIMITED_KEY, backend, relay_config

from relayd.signing import sign_headers
from relayd.testing.certs import TestCertificates
from relayd.testing.processes import FakeUpstreamProcess, RedisServerProcess, RelaydProcess

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]
SECRET = "integration-signing-secret-0123"
BODY = json.dumps({"model": "claude-x", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def signed_sdk(relay: RelaydProcess) -> anthropic.Anthropic:
    def sign(request: Any) -> None:
        request.headers.update(sign_headers(SECRET, request.method, str(request.url),
                                            request.read()))

    return anthropic.Anthropic(
        base_url=relay.url("http"), api_key=CLIENT_KEY, max_retries=0,
        http_client=anthropic.DefaultHttpxClient(event_hooks={"request": [sign]}),
    )


def post(relay: RelaydProcess, headers: dict[str, str], key: str = CLIENT_KEY) -> Any:
    return httpx2.post(relay.url("http") + "/v1/messages", content=BODY, timeout=10,
                       headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                                "content-type": "application/json", **headers})


@pytest.fixture
def pair(
    tmp_path: Path, certs: TestCertificates, upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory, redis_server: RedisServerProcess,
) -> tuple[RelaydProcess, RelaydProcess, FakeUpstreamProcess, RedisServerProcess]:
    secret = tmp_path / "signing-secret"
    secret.write_text(SECRET)
    upstream = upstream_factory("a1")
    config = relay_config(certs, [backend("a1", upstream)], [], health={"enabled": False},
                          state={"store": "redis", "url": redis_server.url, "timeout": 0.5})
    config["providers"] = config["providers"][:1]
    config["routes"] = config["routes"][:1]
    config["clients"][0]["signing"] = {"secret_file": str(secret), "window": 5}
    return (relayd_factory(config, name="first"), relayd_factory(config, name="second"),
            upstream, redis_server)


def messages(upstream: FakeUpstreamProcess) -> int:
    return len([r for r in upstream.requests() if r["path"] == "/v1/messages"])


def test_the_sdk_signs_in_a_hook_and_a_replay_on_the_other_instance_is_refused(
    pair: tuple[RelaydProcess, RelaydProcess, FakeUpstreamProcess, RedisServerProcess],
) -> None:
    first, second, upstream, _ = pair
    for relay in (first, second):
        sdk = signed_sdk(relay)
        for _ in range(3):
            answer = sdk.messages.create(model="claude-x", max_tokens=16,
                                         messages=[{"role": "user", "content": "hi"}])
            assert answer.content
    assert messages(upstream) == 6
    headers = sign_headers(SECRET, "POST", "/v1/messages", BODY)
    assert post(first, headers).status_code == 200
    replay = post(second, headers)
    assert replay.status_code == 401
    assert replay.headers["x-should-retry"] == "false"
    assert "nonce was used before" in replay.json()["error"]["message"]
    assert messages(upstream) == 7  # the replay never reached it
    # The SDK gives up at once on a refused signature (x-should-retry: false).
    unsigned = anthropic.Anthropic(base_url=first.url("http"), api_key=CLIENT_KEY)
    with pytest.raises(anthropic.AuthenticationError):
        unsigned.messages.create(model="claude-x", max_tokens=16,
                                 messages=[{"role": "user", "content": "hi"}])


def test_a_stale_timestamp_is_refused_and_redis_away_fails_closed(
    pair: tuple[RelaydProcess, RelaydProcess, FakeUpstreamProcess, RedisServerProcess],
) -> None:
    first, _, upstream, redis = pair
    stale = post(first, sign_headers(SECRET, "POST", "/v1/messages", BODY,
                                     now=time.time() - 10))
    assert stale.status_code == 401 and "more than 5 s old" in stale.json()["error"]["message"]
    assert messages(upstream) == 0
    redis.kill()
    # Another client (it does not sign) is served; the signing client cannot be checked.
    assert post(first, {}, key=LIMITED_KEY).status_code == 200
    closed = post(first, sign_headers(SECRET, "POST", "/v1/messages", BODY))
    assert closed.status_code == 503, closed.text
    assert "records nonces is unreachable" in closed.json()["error"]["message"]
