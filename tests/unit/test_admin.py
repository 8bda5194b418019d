"""The admin HTTP interface in memory: routes, token rules, readiness, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from relayd.http.admin import AdminResource, AdminSite, admin_site
from relayd.metrics import RelayMetrics

TOKEN = "admin-token-123"


@dataclass
class FakeBackend:
    name: str
    seen_now: list[float] = field(default_factory=list)

    def describe(self, now: float) -> dict[str, Any]:
        self.seen_now.append(now)
        return {"name": self.name, "now": now}


@dataclass
class FakeRuntime:
    backends: list[FakeBackend]
    ready: bool = True
    problems: list[str] = field(default_factory=list)

    def readiness(self) -> tuple[bool, list[str]]:
        return self.ready, self.problems


class Admin:
    """An AdminResource over fakes whose token, runtime and draining flag tests can set."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1234.5)
        self.metrics = RelayMetrics()
        self.runtime = FakeRuntime([FakeBackend("us"), FakeBackend("eu")])
        self.token = token
        self.draining = False
        self.resource = AdminResource(
            self.metrics, lambda: self.runtime, self.clock,
            get_token=lambda: self.token, is_draining=lambda: self.draining,
        )
        self.client: Any = StubTreq(self.resource)

    def call(
        self, method: str, path: str, *, token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, list[str]], bytes]:
        """One request, flushed; returns status, lower-cased headers and body."""
        sent = dict(headers or {})
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        d = self.client.request(method, "http://admin.test" + path, headers=sent)
        self.client.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "the admin resource did not answer"
        response = results[0]
        if hasattr(response, "raiseException"):
            response.raiseException()
        content: list[Any] = []
        self.client.content(response).addBoth(content.append)
        self.client.flush()
        assert content, "the admin resource did not finish the body"
        headers_out = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        return response.code, headers_out, content[0]


def as_json(headers: dict[str, list[str]], body: bytes) -> Any:
    assert headers["content-type"] == ["application/json"]
    return json.loads(body)


@pytest.fixture
def admin() -> Admin:
    return Admin()


def test_metrics_exposition_without_token(admin: Admin) -> None:
    admin.metrics.upstream_attempt("anthropic", "us", "ok")
    status, headers, body = admin.call("GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == [CONTENT_TYPE_LATEST]
    assert b"# TYPE relayd_upstream_attempts_total counter" in body
    assert (
        b'relayd_upstream_attempts_total{backend="us",provider="anthropic",result="ok"} 1.0'
        in body
    )


def test_healthz(admin: Admin) -> None:
    status, headers, body = admin.call("GET", "/healthz")
    assert status == 200
    assert as_json(headers, body) == {"status": "ok"}
    assert headers["cache-control"] == ["no-store"]


def test_readyz_ready(admin: Admin) -> None:
    status, headers, body = admin.call("GET", "/readyz")
    assert (status, as_json(headers, body)) == (200, {"status": "ready"})


def test_readyz_not_ready(admin: Admin) -> None:
    admin.runtime.ready = False
    admin.runtime.problems = ["anthropic: no healthy backend", "openai: no healthy backend"]
    status, headers, body = admin.call("GET", "/readyz")
    assert status == 503
    assert as_json(headers, body) == {
        "status": "not ready",
        "problems": ["anthropic: no healthy backend", "openai: no healthy backend"],
    }


def test_readyz_draining_wins(admin: Admin) -> None:
    admin.draining = True
    status, headers, body = admin.call("GET", "/readyz")
    assert (status, as_json(headers, body)) == (503, {"status": "draining"})


def test_backends_with_the_right_token(admin: Admin) -> None:
    status, headers, body = admin.call("GET", "/admin/backends", token=TOKEN)
    assert status == 200
    assert as_json(headers, body) == {
        "backends": [{"name": "us", "now": 1234.5}, {"name": "eu", "now": 1234.5}]
    }


def test_backends_follow_the_current_runtime(admin: Admin) -> None:
    admin.runtime = FakeRuntime([FakeBackend("new")])
    _, headers, body = admin.call("GET", "/admin/backends", token=TOKEN)
    assert [b["name"] for b in as_json(headers, body)["backends"]] == ["new"]


def test_backends_without_token_is_401(admin: Admin) -> None:
    status, headers, body = admin.call("GET", "/admin/backends")
    assert status == 401
    assert headers["www-authenticate"][0].startswith("Bearer")
    assert set(as_json(headers, body)) == {"error"}
    assert admin.runtime.backends[0].seen_now == []


@pytest.mark.parametrize("authorization", [
    f"Bearer {TOKEN}x", "Bearer wrong", f"Basic {TOKEN}", "Bearer", TOKEN, "Bearer ",
])
def test_backends_with_a_wrong_token_is_401(admin: Admin, authorization: str) -> None:
    status, headers, body = admin.call(
        "GET", "/admin/backends", headers={"authorization": authorization}
    )
    assert status == 401
    assert headers["www-authenticate"][0].startswith("Bearer")
    assert set(as_json(headers, body)) == {"error"}
    assert TOKEN not in body.decode()


def test_bearer_scheme_is_case_insensitive(admin: Admin) -> None:
    status, _, _ = admin.call(
        "GET", "/admin/backends", headers={"authorization": f"bearer {TOKEN}"}
    )
    assert status == 200


def test_token_is_read_per_request(admin: Admin) -> None:
    """A reload that changes the token takes effect at the next request."""
    admin.token = "rotated"
    assert admin.call("GET", "/admin/backends", token=TOKEN)[0] == 401
    assert admin.call("GET", "/admin/backends", token="rotated")[0] == 200


@pytest.mark.parametrize("configured", [None, ""])
def test_no_token_configured_leaves_admin_open(configured: str | None) -> None:
    admin = Admin(token=configured)
    status, headers, body = admin.call("GET", "/admin/backends")
    assert status == 200
    assert len(as_json(headers, body)["backends"]) == 2
    # A presented token is simply ignored.
    assert admin.call("GET", "/admin/backends", token="anything")[0] == 200
    assert admin.call("GET", "/admin/nope")[0] == 404


def test_public_routes_need_no_token(admin: Admin) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        assert admin.call("GET", path)[0] == 200, path
        assert admin.call("GET", path, token="wrong")[0] == 200, path


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/", "/admin", "/healthz/x"])
def test_unknown_path_is_404(admin: Admin, path: str) -> None:
    status, headers, body = admin.call("GET", path)
    assert (status, as_json(headers, body)) == (404, {"error": "not found"})


def test_unknown_admin_path_is_401_without_token_and_404_with_it(admin: Admin) -> None:
    status, headers, body = admin.call("GET", "/admin/nope")
    assert status == 401
    assert set(as_json(headers, body)) == {"error"}
    status, headers, body = admin.call("GET", "/admin/nope", token=TOKEN)
    assert (status, as_json(headers, body)) == (404, {"error": "not found"})


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/admin/backends"])
def test_other_methods_are_405(admin: Admin, method: str, path: str) -> None:
    status, headers, body = admin.call(method, path, token=TOKEN)
    assert (status, as_json(headers, body)) == (405, {"error": "method not allowed"})
    assert headers["allow"] == ["GET, HEAD"]


def test_admin_methods_need_the_token_first(admin: Admin) -> None:
    assert admin.call("POST", "/admin/backends")[0] == 401


def test_head_gets_headers_and_no_body(admin: Admin) -> None:
    status, headers, body = admin.call("HEAD", "/healthz")
    assert status == 200
    assert body == b""
    assert headers["content-type"] == ["application/json"]


def test_handler_failure_is_a_json_500(admin: Admin) -> None:
    def broken() -> tuple[bool, list[str]]:
        raise RuntimeError("boom")

    admin.runtime.readiness = broken  # type: ignore[method-assign]
    status, headers, body = admin.call("GET", "/readyz")
    assert (status, as_json(headers, body)) == (500, {"error": "internal error"})
    assert b"boom" not in body
    # Still serving afterwards.
    assert admin.call("GET", "/healthz")[0] == 200


def test_admin_site_settings(admin: Admin) -> None:
    site = admin_site(admin.resource)
    assert isinstance(site, Site) and isinstance(site, AdminSite)
    assert site.resource is admin.resource
    assert site.noisy is False
    assert site._parsePOSTFormSubmission is False
    assert site.reactor is admin.clock
    site.log(object())  # access logging is off: a no-op, not an error
    body = site.getContentFile(10)
    body.write(b"0123456789")
    assert body.getvalue() == b""


def test_usage_endpoint_shows_the_ledger() -> None:
    from relayd.accounting import UsageLedger
    from relayd.providers.base import Usage

    ledger = UsageLedger()
    ledger.record("team-a", "claude-x", "anthropic", "us", Usage(10, 3, 4, None))
    ledger.record("team-a", "claude-x", "anthropic", "us", Usage(1, 1, None, 2))
    ledger.record("team-a", "gpt-4o", "openai", "main", None)
    snapshot = ledger.snapshot()
    assert snapshot["clients"]["team-a"] == {
        "requests": 3, "input_tokens": 11, "output_tokens": 4,
        "cache_read_tokens": 4, "cache_write_tokens": 2,
    }
    assert [e["model"] for e in snapshot["entries"]] == ["claude-x", "gpt-4o"]
    assert snapshot["entries"][0]["requests"] == 2


class SlowStore:
    """A state store whose usage snapshot arrives when the test says so."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def usage_snapshot(self) -> Any:
        d: Deferred[dict[str, Any]] = Deferred()
        self.pending.append(d)
        return d

    def describe(self) -> dict[str, Any]:
        return {"store": "slow"}


def test_a_late_answer_to_a_client_that_left_is_dropped() -> None:
    admin = Admin()
    store = SlowStore()
    admin.runtime.store = store  # type: ignore[attr-defined]
    site = admin_site(admin.resource)
    for leaves in (False, True):
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"GET /admin/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode() + b"\r\n\r\n"
        )
        if leaves:
            channel.connectionLost(Failure(ConnectionDone()))
        d = store.pending[-1]
        d.callback({"clients": {}})
        assert d.result is None  # answered or dropped, no error in the chain
        assert (b'"clients":{}' in transport.value()) is not leaves


def test_cache_stats_and_purge() -> None:
    from relayd.cache import CachedAnswer, ResponseCache
    from relayd.config.model import CacheConfig
    from relayd.limits import MemoryStore

    admin = Admin()
    cache = ResponseCache(CacheConfig(), MemoryStore(admin.clock), admin.clock)
    for key, route, client in (("1", "r1", "a"), ("2", "r1", "b"), ("3", "r2", "a")):
        cache.memory.put(key, CachedAnswer(
            status=200, headers=(), body=b"{}", streamed=False, stored_at=0.0,
            expires_at=1e9, stale_until=1e9, route=route, client=client, model="m", usage=None,
        ))
    admin.runtime.response_cache = cache  # type: ignore[attr-defined]
    status, headers, body = admin.call("GET", "/admin/cache", token=TOKEN)
    assert status == 200 and as_json(headers, body)["memory"]["entries"] == 3
    assert admin.call("GET", "/admin/cache/purge?route=r1", token=TOKEN)[0] == 405
    assert admin.call("POST", "/admin/cache/purge?route=r1", token=None)[0] == 401
    status, headers, body = admin.call("POST", "/admin/cache/purge?route=r1&client=a",
                                       token=TOKEN)
    assert status == 200
    assert as_json(headers, body) == {"route": "r1", "client": "a", "purged": {"memory": 1}}
    status, headers, body = admin.call("POST", "/admin/cache/purge", token=TOKEN)
    assert as_json(headers, body)["purged"] == {"memory": 2} and len(cache.memory) == 0
