"""Upstream backends at run time: a persistent connection pool and an Agent each.

Requests go out through :class:`twisted.web.client.Agent` directly (treq is built on the
same Agent): no cookie jar, no redirect following, no transparent decompression, and no
per-request URL or header re-processing on the hot path.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from relayd import __version__
from relayd.config.model import BackendConfig
from relayd.health import ActiveHealth, CircuitBreaker, HealthChecker
from relayd.keyring import KeyRing
from relayd.latency import PeakEwma
from relayd.pool import BytesProducer, ConnectionPool, PoolSender
from relayd.providers.base import IProvider

_CONNECTION_DONE = Failure(ConnectionDone())

# Active probes say who they are, so upstream logs (and tests) can tell them apart.
PROBE_USER_AGENT = b"relayd/" + __version__.encode() + b" health-probe"


def _tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A plain TCP endpoint for ``host``: straight to the address when it is one.

    ``HostnameEndpoint`` resolves even an IP literal through the reactor's resolver,
    which runs getaddrinfo in the thread pool: one thread round-trip per new connection,
    which a burst of new upstream connections queues behind a pool of a few threads.
    Host names still get it (and its happy-eyeballs connect).
    """
    bare = host[1:-1] if host.startswith("[") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, bare, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, bare, port, timeout=timeout)


@implementer(IAgentEndpointFactory)
class CachedEndpointFactory:
    """Agent endpoints built once per (scheme, host, port).

    Agent's standard factory builds a ``HostnameEndpoint`` (with an IDNA encoding of the
    host name) for every request, even when the pool then hands back a cached
    connection; a backend always talks to the same host, so build it once.
    """

    def __init__(self, reactor: Any, tls_policy: IPolicyForHTTPS, connect_timeout: float):
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = _tcp_endpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, self._connect_timeout
            )
            if uri.scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            elif uri.scheme != b"http":
                raise ValueError(f"unsupported scheme {uri.scheme!r}")
            self._cache[key] = endpoint
        return endpoint


class Backend:
    """One upstream endpoint at run time: pool, Agent, keys, breaker, health and load.

    ``in_flight`` counts requests between choosing this backend and finishing the
    response (:meth:`acquire`, :meth:`release`); the balancer skips a backend at its
    ``max_concurrent`` (when it has one), with an open breaker, or with every key cooling
    down. Requests waiting for one of its slots are in ``waiters``. A backend survives a
    reload that keeps its provider, name, URL, pool settings and connect timeout (see
    :meth:`same_connection_settings`); other settings are applied in place by
    :meth:`reconfigure`.
    """

    def __init__(
        self,
        config: BackendConfig,
        provider: IProvider,
        provider_name: str,
        reactor: Any,
        *,
        agent: IAgent | None = None,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self.provider = provider
        self.provider_name = provider_name
        self.name = config.name
        self.clock: IReactorTime = reactor
        self.url = config.url
        self.base_url = config.url.encode("ascii")
        self.in_flight = 0
        # Time to response headers (balance: least_latency): fed by every attempt.
        self.latency = PeakEwma()
        self.waiters: deque[QueuedRequest] = deque()  # oldest first
        self.retired = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.keys = KeyRing(self._key_material(config), reactor)
        self.breaker = CircuitBreaker(config.breaker, reactor)
        self.health = ActiveHealth(config.health)
        self.checker: HealthChecker | None = None
        self.pool: ConnectionPool | None = None
        self.sender: PoolSender | None = None  # the relay path's, without an Agent
        if agent is None:
            pool = ConnectionPool(
                reactor, config.pool.max_idle_connections, config.pool.idle_timeout
            )
            self.pool = pool
            endpoints = CachedEndpointFactory(
                reactor, tls_policy or BrowserLikePolicyForHTTPS(), config.timeouts.connect
            )
            agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
            uri = URI.fromBytes(self.base_url)
            self.sender = PoolSender(pool, endpoints.endpointForURI(uri), uri.scheme,
                                     uri.host, uri.port, uri.path)
        self.agent = agent
        self._apply(config)

    def _key_material(self, config: BackendConfig) -> list[tuple[str, list[tuple[bytes, bytes]]]]:
        return [(key, self.provider.auth_headers(key)) for key in config.api_keys]

    def _apply(self, config: BackendConfig) -> None:
        self.config = config
        self.weight = config.weight
        self.priority = config.priority
        self.region = config.region
        self.max_concurrent = config.max_concurrent
        self.timeouts = config.timeouts
        # relayd's own choice of the upstream account, sent with every call it makes.
        self.account_headers = [
            (name, value.encode())
            for name, value in (
                (b"openai-organization", config.organization),
                (b"openai-project", config.project),
            )
            if value is not None
        ]
        path = config.health.path
        self.probe_url = self.base_url + (path.encode() if path else self.provider.health_path)

    def same_connection_settings(self, config: BackendConfig) -> bool:
        """Whether ``config`` can be served by this object's pool and Agent."""
        return (
            config.url == self.config.url
            and config.pool == self.config.pool
            and config.timeouts.connect == self.config.timeouts.connect
        )

    def reconfigure(self, config: BackendConfig) -> None:
        """Apply a reloaded config with the same connection settings; keep all state."""
        self._apply(config)
        self.keys.reconfigure(self._key_material(config))
        self.breaker.reconfigure(config.breaker)
        self.health.reconfigure(config.health)
        if self.checker is not None:
            self.checker.reconfigure(config.health)

    def is_available(self) -> bool:
        """Can take a request now: capacity, breaker not open, a key not cooling down."""
        return self.has_capacity() and self.can_serve()

    def has_capacity(self) -> bool:
        """Below ``max_concurrent`` (always, without a cap)."""
        cap = self.max_concurrent
        return cap is None or self.in_flight < cap

    def can_serve(self) -> bool:
        """Would take a request given a free slot: breaker not open, a key usable."""
        return self.breaker.state != "open" and self.keys.available()

    def acquire(self) -> None:
        """Take a slot for a request about to go to this backend (see :meth:`release`)."""
        self.in_flight += 1

    def send(
        self,
        method: bytes,
        path: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> Deferred[IResponse]:
        """Send a relayed request (``path`` below the base URL, ``body`` None for none)
        on the backend's pool; through the Agent when one was given (tests)."""
        if self.sender is not None:
            return self.sender.send(method, path, headers, body)
        out = Headers()
        for name, value in headers:
            out.addRawHeader(name, value)
        producer = BytesProducer(body) if body is not None else None
        return self.agent.request(method, self.base_url + path, out, producer)

    def note_error(self, message: str) -> None:
        self.last_error = message
        self.last_error_at = self.clock.seconds()

    # -- active health checks -------------------------------------------------------------

    def service_headers(self) -> Headers:
        """Headers for relayd's own calls (probes, model lists): a key and what the
        provider requires besides it (e.g. anthropic-version)."""
        key = self.keys.choose() or self.keys.keys[0]
        headers = Headers()
        for name, value in key.auth_headers:
            headers.setRawHeaders(name, [value])
        for name, value in self.provider.probe_headers:
            headers.setRawHeaders(name, [value])
        for name, value in self.account_headers:
            headers.setRawHeaders(name, [value])
        return headers

    def probe(self) -> Deferred[None]:
        """One active probe: a cheap GET that must answer with a status below 500."""
        headers = self.service_headers()
        headers.setRawHeaders(b"user-agent", [PROBE_USER_AGENT])
        d = self.agent.request(b"GET", self.probe_url, headers)

        def check(response: IResponse) -> Deferred[None]:
            done: Deferred[None] = Deferred()
            response.deliverBody(_Drain(done))
            if response.code >= 500:
                raise ProbeFailedError(f"probe answered {response.code}")
            return done

        return d.addCallback(check)

    def start_health_checks(self, on_change: Callable[[Backend, bool], None]) -> None:
        if self.checker is None:
            self.checker = HealthChecker(
                self.config.health,
                self.health,
                self.probe,
                self.clock,
                on_change=lambda healthy: on_change(self, healthy),
            )
            self.checker.start()

    def stop_health_checks(self) -> None:
        if self.checker is not None:
            self.checker.stop()
            self.checker = None

    # -- retirement ---------------------------------------------------------------------------

    def retire(self) -> None:
        """Removed by a reload: no new requests; close the pool once in-flight ones end."""
        self.retired = True
        self.stop_health_checks()
        if self.in_flight == 0:
            self.close()

    def release(self) -> None:
        """One request is done with this backend: its slot goes to the request that has
        waited longest for one, if any (see :class:`QueuedRequest`)."""
        self.in_flight -= 1
        # A woken request may take the slot here, take one elsewhere or give up; then
        # the next in line gets the chance. (It never waits again on a backend with a
        # free slot, so this ends.)
        while self.waiters and self.has_capacity():
            self.waiters.popleft().slot_freed(self)
        if self.retired and self.in_flight == 0:
            self.close()

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (in-flight ones finish on their own)."""
        self.stop_health_checks()
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()

    def idle_connections(self) -> int:
        return self.pool.idle_connections() if self.pool is not None else 0

    def describe(self, now: float) -> dict[str, Any]:
        """The backend's state as JSON-able data (for /admin/backends)."""
        breaker = self.breaker
        return {
            "provider": self.provider_name,
            "name": self.name,
            "url": self.url,
            "weight": self.weight,
            "priority": self.priority,
            "healthy": self.health.healthy,
            "available": self.is_available(),
            "breaker": {
                "state": breaker.state,
                "reopens_in": (
                    round(max(breaker.opened_until - now, 0.0), 3)
                    if breaker.state == "open" and breaker.opened_until is not None
                    else None
                ),
                "last_failure": breaker.last_failure_reason,
            },
            "keys": [
                {
                    "index": key.index,
                    "cooldown_remaining": round(max(key.cooldown_until - now, 0.0), 3),
                    "cooldown_reason": key.cooldown_reason if key.cooldown_until > now else None,
                    "rejections": key.rejections,
                }
                for key in self.keys.keys
            ],
            "in_flight": self.in_flight,
            "max_concurrent": self.max_concurrent,
            "pool_idle_connections": self.idle_connections(),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_probe_at": self.health.last_probe_at,
            "last_probe_error": self.health.last_error,
        }

    def __repr__(self) -> str:
        return f"<Backend {self.provider_name}/{self.name} {self.url}>"


class QueuedRequest:
    """A request waiting for a free slot on any of the backends it may use.

    It waits in each such backend's ``waiters``; the first of them to release a slot
    hands it over by calling :meth:`slot_freed` (at once, so no newer request can take
    it first), which calls ``on_slot(backend)``: that must either take a slot (or give
    up) or :meth:`wait_on` again. :meth:`leave` stops the wait everywhere.
    """

    __slots__ = ("backends", "on_slot", "since", "timer")

    def __init__(self, on_slot: Callable[[Backend], None], since: float) -> None:
        self.on_slot = on_slot
        self.since = since  # clock time the wait began
        self.backends: list[Backend] = []  # where it waits now
        self.timer: IDelayedCall | None = None

    def wait_on(self, backends: Iterable[Backend]) -> None:
        for backend in backends:
            if backend not in self.backends:
                backend.waiters.append(self)
                self.backends.append(backend)

    def slot_freed(self, backend: Backend) -> None:
        self.backends.remove(backend)
        self.on_slot(backend)

    def leave(self) -> None:
        for backend in self.backends:
            backend.waiters.remove(self)
        self.backends = []
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class ProbeFailedError(Exception):
    """An active probe got an answer that means the backend is not serving."""


class _Drain(Protocol):
    """Reads a body to its end (so the connection can be reused) and fires ``done``."""

    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        if not self.done.called:
            self.done.callback(None)
