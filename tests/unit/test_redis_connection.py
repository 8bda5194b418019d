"""relayd's Redis connection (:mod:`relayd.limits.redis_connection`) against the installed
txredisapi: the public factory API it builds on (so an upgrade that changes it fails
here, not in production), the reconnect cap, and the store asking ``connected()`` before
it hands txredisapi a command. No socket is opened."""

from __future__ import annotations

import math
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.config.model import StateConfig
from relayd.limits.checks import WindowCheck
from relayd.limits.redis import RedisStore
from relayd.limits.redis_connection import RECONNECT_MAX_DELAY, RedisConnection, redis_factory

STATE = StateConfig(
    store="redis", url="redis://u@127.0.0.1:6390/2", port=6390, db=2, username="u",
    password="pw", timeout=0.25,
)


@implementer(IStreamClientEndpoint)
class PendingEndpoint:
    """Records connection attempts; none ever completes (cancelling one is recorded)."""

    def __init__(self) -> None:
        self.attempts: list[Any] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts.append(factory)

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class FakeProtocol:
    """What txredisapi's factory pool needs of a live connection."""

    connected = 1

    def __init__(self) -> None:
        self.lost: Deferred[Any] = Deferred()

    def whenDisconnected(self) -> Deferred[Any]:
        return self.lost


def test_the_factory_is_txredisapis_with_the_settings_of_the_state_section() -> None:
    factory = redis_factory(STATE)
    assert isinstance(factory, txredisapi.RedisFactory)
    assert (factory.dbid, factory.poolsize, factory.isLazy) == (2, 1, True)
    assert (factory.username, factory.password) == ("u", "pw")
    assert factory.replyTimeout == 2.0  # max(timeout * 4, 2 s)
    assert factory.convertNumbers is True and factory.reconnect is True
    assert isinstance(factory.handler, txredisapi.ConnectionHandler)


def test_reconnect_attempts_are_at_most_a_second_apart() -> None:
    """The campaign: Redis coming back was noticed 8-14 s late, behind txredisapi's
    reconnect delay that grows to 10 s."""
    factory = redis_factory(STATE)
    factory.jitter = 0  # txredisapi's randomness, off for exact delays
    delays = [factory.retryDelay(attempt) for attempt in range(1, 40)]
    assert delays[0] == RECONNECT_MAX_DELAY / 2
    assert delays[1] == RECONNECT_MAX_DELAY  # 0.5 * e, capped
    assert max(delays) == RECONNECT_MAX_DELAY
    uncapped = txredisapi.RedisFactory("x:1", None, 1)
    uncapped.jitter = 0
    assert math.isclose(uncapped.retryDelay(3), min(1.0 * math.e**2, 10))  # what it replaces


def test_connected_follows_the_live_connections_of_the_factory() -> None:
    endpoint = PendingEndpoint()
    connection = RedisConnection(redis_factory(STATE), endpoint)
    assert len(endpoint.attempts) == 1  # started connecting at once
    assert connection.commands is connection.factory.handler
    assert not connection.connected()
    live = FakeProtocol()
    connection.factory.addConnection(live)
    assert connection.connected()
    live.lost.callback(live)  # txredisapi drops it from the pool
    assert not connection.connected()


def test_disconnect_stops_connecting() -> None:
    endpoint = PendingEndpoint()
    connection = RedisConnection(redis_factory(STATE), endpoint)
    done: list[Any] = []
    connection.disconnect().addBoth(done.append)
    assert endpoint.cancelled == 1
    assert done and not isinstance(done[0], Failure)


class FakeConnection:
    """A RedisConnection that is not connected and records any command."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.commands = self

    def connected(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        def command(*args: Any) -> Deferred[Any]:
            self.sent.append(name)
            return Deferred()

        return command


def test_the_store_sends_nothing_while_not_connected() -> None:
    clock = MemoryReactorClock()
    fake = FakeConnection()
    store = RedisStore(STATE, clock, connection=fake)  # type: ignore[arg-type]
    clock.advance(2)  # past the startup grace: Redis is down
    assert store.state == "down"
    decisions: list[Any] = []
    check = WindowCheck("k", 10, 1, "requests_per_minute", "client")
    store.admit([check]).addCallback(decisions.append)
    assert decisions and decisions[0].degraded and decisions[0].allowed
    assert fake.sent == []
    store.close()
