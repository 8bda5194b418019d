"""relayd's connection to Redis: one txredisapi connection, reconnecting at most a second apart.

txredisapi's reconnect delay grows by e per failed attempt up to 10 s: Redis coming back
was noticed 8-14 s late (a window of 503s with ``on_store_failure: closed``). relayd
retries at most :data:`RECONNECT_MAX_DELAY` apart, so with the store's probe recovery is
seen within about 2 s.

``txredisapi.lazyConnectionPool`` hands back only the command handler, and the factory
that holds the reconnect delays and the count of live connections is a private
attribute of it. So this module does what ``lazyConnectionPool`` does with txredisapi's
public API instead (``RedisFactory``, its documented ``initialDelay``/``maxDelay``,
``startConnecting``, ``handler`` and ``size``), and keeps the factory.
``tests/unit/test_redis_connection.py`` checks that API against the installed txredisapi.

txredisapi schedules its reconnects and timeouts on the global reactor whatever it is
given, so the endpoint uses it too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint

from relayd.config.model import StateConfig

__all__ = ["RECONNECT_MAX_DELAY", "RedisConnection", "connect_redis", "redis_factory"]

RECONNECT_MAX_DELAY = 1.0


def redis_factory(config: StateConfig) -> Any:
    """The txredisapi factory of one lazily connecting connection for ``config``, with
    reconnects at most :data:`RECONNECT_MAX_DELAY` apart. Opens nothing."""
    import txredisapi

    factory = txredisapi.RedisFactory(
        f"{config.host}:{config.port}",
        config.db,
        1,  # one connection: commands reach Redis in the order they were sent
        isLazy=True,
        handler=txredisapi.ConnectionHandler,
        password=config.password,
        replyTimeout=max(config.timeout * 4, 2.0),
        convertNumbers=True,
        username=config.username,
    )
    factory.reconnect = True
    factory.initialDelay = min(factory.initialDelay, RECONNECT_MAX_DELAY / 2)
    factory.maxDelay = RECONNECT_MAX_DELAY
    return factory


def redis_endpoint(config: StateConfig) -> IStreamClientEndpoint:
    """Where ``config``'s Redis is: TCP, with TLS when ``config.tls``, checked against
    ``config.ca_file`` or the platform's trust store."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, config.host, config.port, timeout=config.timeout * 4
    )
    if config.tls:
        from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

        if config.ca_file is not None:
            with open(config.ca_file, "rb") as stream:
                trust: Any = Certificate.loadPEM(stream.read())
        else:
            trust = platformTrust()
        endpoint = wrapClientTLS(optionsForClientTLS(config.host, trustRoot=trust), endpoint)
    return endpoint


class RedisConnection:
    """One connection to Redis, kept up by txredisapi: its commands, and whether it is up.

    ``commands`` is txredisapi's handler (``eval``, ``set``, ``mget``, ``hgetall``,
    ``ping``, ...). It queues commands while it reconnects and would run them late, so
    callers ask :meth:`connected` first.
    """

    def __init__(self, factory: Any, endpoint: IStreamClientEndpoint) -> None:
        self.factory = factory
        self.commands: Any = factory.handler
        factory.startConnecting(endpoint)

    def connected(self) -> bool:
        """Whether a live connection is open now."""
        size: int = self.factory.size
        return size > 0

    def disconnect(self) -> Deferred[Any]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        d: Deferred[Any] = self.factory.disconnect()
        return d


def connect_redis(config: StateConfig) -> RedisConnection:
    """Start connecting to ``config``'s Redis (in the background, reconnecting)."""
    return RedisConnection(redis_factory(config), redis_endpoint(config))
