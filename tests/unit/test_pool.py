"""The backend connection pool (:mod:`relayd.pool`) against the installed Twisted's Agent
and HTTP/1.1 client protocol, over in-memory transports driven by a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from relayd.pool import BytesProducer, ConnectionPool, PoolSender, head_too_large

URL = b"http://up.test/v1/messages"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
DONE = Failure(ConnectionDone())


@dataclass
class Connection:
    protocol: Any
    transport: StringTransport

    def answer(self, data: bytes = OK) -> None:
        self.protocol.dataReceived(data)

    def close(self, reason: type[Exception] = ConnectionDone) -> None:
        self.protocol.connectionLost(Failure(reason()))

    def sent(self) -> bytes:
        return self.transport.value()


@implementer(IAgentEndpointFactory)
@dataclass
class Endpoints:
    """Every connect() builds the protocol over a StringTransport, at once."""

    connections: list[Connection] = field(default_factory=list)
    refuse: bool = False

    def endpointForURI(self, uri: URI) -> Endpoints:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append(Connection(protocol, transport))
        return succeed(protocol)


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = DONE) -> None:
        self.done = reason


@dataclass
class Setup:
    clock: MemoryReactorClock
    endpoints: Endpoints
    pool: ConnectionPool
    agent: Agent

    def post(self, body: bytes = b'{"x":1}', producer: Any = None) -> list[Any]:
        """Send a POST; the list receives the response or the failure."""
        results: list[Any] = []
        d = self.agent.request(
            b"POST", URL, Headers(), producer if producer is not None else BytesProducer(body)
        )
        d.addBoth(results.append)
        self.last = d
        return results

    last: Deferred[IResponse] | None = None


@pytest.fixture
def setup() -> Iterator[Setup]:
    clock = MemoryReactorClock()
    endpoints = Endpoints()
    pool = ConnectionPool(clock, max_idle=2, idle_timeout=50.0)
    yield Setup(clock, endpoints, pool, Agent.usingEndpointFactory(clock, endpoints, pool=pool))


def read(response: IResponse) -> bytes:
    body = Body()
    response.deliverBody(body)
    assert body.done is not None and body.done.check(Exception) is not None
    return body.data


def test_a_finished_connection_is_reused(setup: Setup) -> None:
    first = setup.post()
    (conn,) = setup.endpoints.connections
    assert conn.sent().startswith(b"POST /v1/messages HTTP/1.1\r\n")
    conn.answer()
    assert read(first[0]) == b"ok"
    assert setup.pool.idle_connections() == 1
    second = setup.post()
    assert len(setup.endpoints.connections) == 1  # no new connection
    conn.answer()
    assert read(second[0]) == b"ok"
    assert (setup.pool.opened, setup.pool.reused, setup.pool.stale_retries) == (1, 1, 0)


def test_the_most_recently_idle_connection_goes_first(setup: Setup) -> None:
    one, two = setup.post(), setup.post()
    a, b = setup.endpoints.connections
    a.answer()
    read(one[0])
    b.answer()
    read(two[0])  # b went idle last
    setup.post()
    assert b.sent().count(b"POST ") == 2 and a.sent().count(b"POST ") == 1


def test_an_idle_connection_closed_by_the_upstream_leaves_the_pool(setup: Setup) -> None:
    results = setup.post()
    (conn,) = setup.endpoints.connections
    conn.answer()
    read(results[0])
    assert setup.pool.idle_connections() == 1
    conn.close()
    assert setup.pool.idle_connections() == 0
    assert not setup.clock.getDelayedCalls()  # its idle timer is gone too
    setup.post()
    assert len(setup.endpoints.connections) == 2  # a fresh one, not the dead one


def test_idle_connections_time_out_and_the_oldest_goes_beyond_max_idle(setup: Setup) -> None:
    pending = [setup.post() for _ in range(3)]
    for conn, results in zip(setup.endpoints.connections, pending, strict=True):
        conn.answer()
        read(results[0])
    a, b, c = setup.endpoints.connections
    assert setup.pool.idle_connections() == 2
    assert a.transport.disconnecting  # the oldest idle one was closed at the third
    setup.clock.advance(49)
    assert not b.transport.disconnecting
    setup.clock.advance(1)
    assert b.transport.disconnecting and c.transport.disconnecting
    assert setup.pool.idle_connections() == 0


def test_the_keep_alive_race_is_retried_once_on_a_fresh_connection(setup: Setup) -> None:
    """The upstream closed the idle connection as the POST went out: no answer byte came
    back, so the same request (body included) goes out again on a new connection."""
    first = setup.post()
    (old,) = setup.endpoints.connections
    old.answer()
    read(first[0])
    results = setup.post(b'{"again":true}')
    assert old.sent().endswith(b'{"again":true}')
    old.close(ConnectionLost)
    assert not results, "the race must not reach the caller"
    assert len(setup.endpoints.connections) == 2
    fresh = setup.endpoints.connections[1]
    assert fresh.sent().startswith(b"POST /v1/messages") and fresh.sent().endswith(
        b'{"again":true}'
    )
    fresh.answer()
    assert read(results[0]) == b"ok"
    assert setup.pool.stale_retries == 1


def test_a_failure_on_the_fresh_connection_is_reported(setup: Setup) -> None:
    first = setup.post()
    (old,) = setup.endpoints.connections
    old.answer()
    read(first[0])
    results = setup.post()
    old.close(ConnectionLost)
    setup.endpoints.connections[1].close(ConnectionLost)
    assert isinstance(results[0], Failure) and results[0].check(ResponseNeverReceived)
    assert len(setup.endpoints.connections) == 2  # one retry, not more


def test_a_new_connection_that_fails_is_not_retried(setup: Setup) -> None:
    results = setup.post()
    (conn,) = setup.endpoints.connections
    conn.close(ConnectionLost)
    assert isinstance(results[0], Failure) and results[0].check(ResponseNeverReceived)
    assert len(setup.endpoints.connections) == 1 and setup.pool.stale_retries == 0


def test_a_partial_answer_is_not_retried(setup: Setup) -> None:
    first = setup.post()
    (old,) = setup.endpoints.connections
    old.answer()
    read(first[0])
    results = setup.post()
    old.answer(b"HTTP/1.1 200 OK\r\nContent-")  # some bytes of an answer arrived
    old.close(ConnectionLost)
    assert isinstance(results[0], Failure) and results[0].check(ResponseFailed)
    assert not results[0].check(ResponseNeverReceived)
    assert len(setup.endpoints.connections) == 1


def test_a_cancelled_request_is_not_retried(setup: Setup) -> None:
    first = setup.post()
    (old,) = setup.endpoints.connections
    old.answer()
    read(first[0])
    results = setup.post()
    assert setup.last is not None
    setup.last.cancel()
    assert isinstance(results[0], Failure)
    assert len(setup.endpoints.connections) == 1 and setup.pool.stale_retries == 0


def test_a_body_that_cannot_be_sent_again_is_not_retried(setup: Setup) -> None:
    class OneShot(BytesProducer):
        replayable = False

    first = setup.post()
    (old,) = setup.endpoints.connections
    old.answer()
    read(first[0])
    results = setup.post(producer=OneShot(b"{}"))
    old.close(ConnectionLost)
    assert isinstance(results[0], Failure)
    assert len(setup.endpoints.connections) == 1


def test_close_cached_connections_closes_only_idle_ones(setup: Setup) -> None:
    done, busy = setup.post(), setup.post()
    a, b = setup.endpoints.connections
    a.answer()
    read(done[0])
    closed: list[object] = []
    setup.pool.closeCachedConnections().addBoth(closed.append)
    assert a.transport.disconnecting and not b.transport.disconnecting
    a.close()
    assert closed == [None]
    assert setup.pool.idle_connections() == 0 and not busy


def test_an_answer_head_without_end_is_cut_off(setup: Setup) -> None:
    """An upstream sending header lines without end would be buffered without bound."""
    results = setup.post()
    (conn,) = setup.endpoints.connections
    conn.answer(b"HTTP/1.1 200 OK\r\n")
    line = b"x-flood: " + b"a" * 1000 + b"\r\n"
    for _ in range(300):  # ~300 KB of headers, 64 KB per read
        if results:
            break
        conn.answer(line * 64)
    assert isinstance(results[0], Failure) and head_too_large(results[0])
    assert conn.transport.disconnecting


def test_a_large_first_read_with_a_small_head_is_fine(setup: Setup) -> None:
    results = setup.post()
    (conn,) = setup.endpoints.connections
    body = b"x" * 60_000
    conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert read(results[0]) == body


# -- PoolSender: the relay path's requests, serialized once, without an Agent ---------------


def sender(setup: Setup, host: bytes = b"up.test", port: int = 80,
           prefix: bytes = b"") -> PoolSender:
    return PoolSender(setup.pool, setup.endpoints, b"http", host, port, prefix)  # type: ignore[arg-type]


def test_sender_writes_what_agent_writes_for_the_same_request(setup: Setup) -> None:
    """Same request line, Host, headers, length and body as Agent on the installed
    Twisted (header names aside: HTTP names are case-insensitive, relayd's are lower)."""
    headers = [(b"content-type", b"application/json"), (b"x-api-key", b"sk-up")]
    results: list[Any] = []
    sender(setup).send(b"POST", b"/v1/messages?beta=true", headers, b'{"x":1}').addBoth(
        results.append
    )
    agent_headers = Headers({b"content-type": [b"application/json"], b"x-api-key": [b"sk-up"]})
    setup.agent.request(b"POST", b"http://up.test/v1/messages?beta=true", agent_headers,
                        BytesProducer(b'{"x":1}'))
    ours, agents = (c.sent() for c in setup.endpoints.connections)

    def parsed(raw: bytes) -> tuple[bytes, set[bytes], bytes]:
        head, _, body = raw.partition(b"\r\n\r\n")
        line, *fields = head.split(b"\r\n")
        return line, {f.lower() for f in fields}, body

    assert parsed(ours) == parsed(agents)
    assert parsed(ours) == (
        b"POST /v1/messages?beta=true HTTP/1.1",
        {b"host: up.test", b"content-type: application/json", b"x-api-key: sk-up",
         b"content-length: 7"},
        b'{"x":1}',
    )
    setup.endpoints.connections[0].answer()
    assert read(results[0]) == b"ok"


def test_sender_uses_the_path_prefix_the_port_and_no_length_without_a_body(
    setup: Setup,
) -> None:
    sender(setup, b"10.0.0.7", 8443, b"/proxy").send(b"GET", b"/v1/models", [], None)
    sender(setup, b"::1", 8080).send(b"POST", b"/v1/x", [], None)
    get, post = (c.sent() for c in setup.endpoints.connections)
    assert get == b"GET /proxy/v1/models HTTP/1.1\r\nHost: 10.0.0.7:8443\r\n\r\n"
    assert post == b"POST /v1/x HTTP/1.1\r\nHost: [::1]:8080\r\nContent-Length: 0\r\n\r\n"


def test_sender_cannot_be_made_to_split_a_header_or_the_request_line(setup: Setup) -> None:
    sender(setup).send(b"POST", b"/v1/m", [(b"x-a", b"1\r\nx-evil: 2")], b"{}")
    (conn,) = setup.endpoints.connections
    assert b"x-a: 1  x-evil: 2\r\n" in conn.sent()
    with pytest.raises(ValueError):
        sender(setup).send(b"POST", b"/v1/m HTTP/1.1\r\nX: y", [], b"{}")


def test_sender_shares_connections_with_the_agent_and_retries_the_race(setup: Setup) -> None:
    """Probes go through the Agent, relayed requests through the sender: one pool key,
    so they reuse each other's connections; the keep-alive race is retried with the same
    bytes (a prepared request can be written again)."""
    first = setup.post()
    (conn,) = setup.endpoints.connections
    conn.answer()
    read(first[0])
    results: list[Any] = []
    sender(setup).send(b"POST", b"/v1/messages", [], b'{"again":true}').addBoth(
        results.append
    )
    assert len(setup.endpoints.connections) == 1 and setup.pool.reused == 1
    conn.close(ConnectionLost)  # the upstream closed it as the request went out
    assert not results
    fresh = setup.endpoints.connections[1]
    assert conn.sent().endswith(fresh.sent())  # the same bytes, once more
    assert fresh.sent().endswith(b'{"again":true}')
    fresh.answer()
    assert read(results[0]) == b"ok"
    assert setup.pool.stale_retries == 1


def test_a_head_answer_through_the_sender_has_no_body(setup: Setup) -> None:
    results: list[Any] = []
    sender(setup).send(b"HEAD", b"/v1/models", [], None).addBoth(results.append)
    (conn,) = setup.endpoints.connections
    conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
    assert read(results[0]) == b""
    assert setup.pool.idle_connections() == 1  # the connection is free for the next one
