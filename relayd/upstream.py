"""Upstream backends at run time: a persistent connection pool and an Agent each.

Requests go out through :class:`twisted.web.client.Agent` directly (treq is built on the
same Agent): no cookie jar, no redirect following, no transparent decompression, and no
per-request URL or header re-processing on the hot path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from relayd.config.model import BackendConfig
from relayd.providers.base import IProvider


@implementer(IBodyProducer)
class BytesProducer:
    """Sends a request body held in memory in one write, with a known length.

    ``FileBodyProducer`` would schedule a cooperator task per request; a body the relay
    already holds needs no such pacing.
    """

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Backend:
    """One upstream endpoint: its pool, its Agent, its injected credentials, its load.

    ``in_flight`` counts requests between choosing this backend and finishing the
    response; the balancer skips a backend once it reaches ``max_concurrent``.
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
        self.config = config
        self.name = config.name
        self.provider = provider
        self.provider_name = provider_name
        self.weight = config.weight
        self.max_concurrent = config.max_concurrent
        self.timeouts = config.timeouts
        self.base_url = config.url.encode("ascii")
        self.auth_headers = provider.auth_headers(config.api_key)
        self.in_flight = 0
        self.pool: HTTPConnectionPool | None = None
        if agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = config.pool.max_idle_connections
            pool.cachedConnectionTimeout = config.pool.idle_timeout  # type: ignore[assignment]
            pool.retryAutomatically = False
            self.pool = pool
            agent = Agent(
                reactor,
                contextFactory=tls_policy or BrowserLikePolicyForHTTPS(),
                connectTimeout=config.timeouts.connect,
                pool=pool,
            )
        self.agent = agent

    def has_capacity(self) -> bool:
        return self.in_flight < self.max_concurrent

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (in-flight ones finish on their own)."""
        if self.pool is None:
            return succeed(None)
        return self.pool.closeCachedConnections()

    def __repr__(self) -> str:
        return f"<Backend {self.provider_name}/{self.name} {self.config.url}>"
