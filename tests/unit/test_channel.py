"""The relay's HTTP channel and connection bounds against the installed Twisted:
slow clients, half-closing clients, and the connection bound with eviction."""

from __future__ import annotations

import json
from typing import Any

import pytest
from relay_harness import base_config
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayd.config import parse_config
from relayd.http.connections import Refused
from relayd.http.site import RelaySite
from relayd.metrics import RelayMetrics
from relayd.runtime import RelayRuntime


class Later(Resource):
    """Answers when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


class Setup:
    def __init__(self, **top: Any) -> None:
        self.clock = MemoryReactorClock()
        runtime = RelayRuntime(parse_config(base_config(**top)), self.clock)
        self.metrics = RelayMetrics()
        self.site = RelaySite(lambda: runtime, self.clock, self.metrics)
        self.later = Later()
        self.site.resource = self.later

    def connect(self, host: str = "10.0.0.1") -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


REQUEST = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_half_close_is_answered_only_when_configured() -> None:
    """By default end-of-file is a client gone (its upstream call is cancelled at once):
    a FIN from a client that closed its socket looks the same as a half-close."""
    assert not IHalfCloseableProtocol.providedBy(Setup().connect()[0])
    assert IHalfCloseableProtocol.providedBy(Setup(half_close="answer").connect()[0])


def test_a_request_whose_client_half_closed_is_answered_then_closed() -> None:
    """The campaign: a client that half-closes after its request got no answer (499)."""
    setup = Setup(half_close="answer")
    protocol, transport = setup.connect()
    protocol.dataReceived(REQUEST)
    protocol.readConnectionLost()
    assert not transport.disconnecting
    (request,) = setup.later.pending
    request.write(b"answer")
    request.finish()
    assert b"answer" in transport.value()
    assert transport.disconnecting  # closed once the answer is out


def test_a_half_close_before_the_request_is_complete_closes_at_once() -> None:
    setup = Setup(half_close="answer")
    protocol, transport = setup.connect()
    protocol.dataReceived(REQUEST[:40])
    protocol.readConnectionLost()
    assert transport.disconnecting and not setup.later.pending


def test_a_slowloris_head_gets_408_at_its_deadline_however_it_trickles() -> None:
    """The campaign: a partial request line plus one byte every 5 s kept a connection
    open forever (each byte reset the idle timer)."""
    setup = Setup()
    protocol, transport = setup.connect()
    protocol.dataReceived(b"POST /v1/mess")
    for _ in range(3):
        setup.clock.advance(5)
        protocol.dataReceived(b"a")
    setup.clock.advance(4.9)
    assert not transport.disconnecting
    setup.clock.advance(0.1)  # 20 s since the head's first byte
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"head did not arrive within 20s" in transport.value()
    assert transport.disconnecting
    assert setup.sample("relayd_client_connections_closed_total", reason="head_timeout") == 1


def test_a_trickling_body_gets_408_in_the_callers_shape() -> None:
    setup = Setup(connections={"body_timeout": 30})
    protocol, transport = setup.connect()
    protocol.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nanthropic-version: "
                          b"2023-06-01\r\nContent-Length: 100\r\n\r\n{\"mo")
    setup.clock.advance(29)
    protocol.dataReceived(b"del")
    assert not transport.disconnecting
    setup.clock.advance(1)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "body did not arrive within 30s" in error["error"]["message"]
    assert not setup.later.pending


def test_an_idle_keep_alive_connection_has_no_head_deadline() -> None:
    setup = Setup()
    protocol, transport = setup.connect()
    protocol.dataReceived(REQUEST)
    (request,) = setup.later.pending
    request.finish()
    setup.clock.advance(50)  # below the idle timeout (60 s); no head has started
    assert not transport.disconnecting
    protocol.dataReceived(REQUEST)  # the next request on the same connection
    assert len(setup.later.pending) == 2


class CountingTransport(StringTransport):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked = 0

    def getHost(self) -> Any:
        self.asked += 1
        return super().getHost()


def test_a_connections_addresses_are_asked_of_its_transport_once() -> None:
    """twisted.web's Request asks for the local address (getsockname) per request."""
    setup = Setup()
    peer = IPv4Address("TCP", "10.0.0.1", 40000)
    protocol = setup.site.buildProtocol(peer)
    transport = CountingTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    for _ in range(3):
        protocol.dataReceived(REQUEST)
        setup.later.pending[-1].finish()
    first, *rest = setup.later.pending
    assert len(rest) == 2 and transport.asked == 1
    assert all(r.getHost() is first.getHost() for r in rest)
    assert first.getClientAddress() == peer


def test_at_the_bound_the_longest_idle_connection_makes_room() -> None:
    setup = Setup(connections={"max": 3})
    (first, t1), (second, t2), (busy, t3) = (setup.connect() for _ in range(3))
    busy.dataReceived(REQUEST)  # being served: never evicted
    second.dataReceived(b"GET /v1/mo")  # half a head: evictable
    setup.connect()
    assert t1.disconnecting and not t2.disconnecting and not t3.disconnecting
    first.connectionLost(None)
    assert setup.sample("relayd_client_connections_closed_total", reason="evicted") == 1
    assert setup.sample("relayd_client_connections") == 3


def test_at_the_bound_with_nothing_idle_new_connections_are_refused() -> None:
    setup = Setup(connections={"max": 2})
    for _ in range(2):
        protocol, _ = setup.connect()
        protocol.dataReceived(REQUEST)
    refused = setup.site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1))
    assert isinstance(refused, Refused)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.disconnecting
    assert setup.sample("relayd_client_connections_closed_total", reason="refused") == 1


def test_per_address_bound_is_opt_in() -> None:
    setup = Setup(connections={"per_address": 2})
    for _ in range(2):
        setup.connect("10.0.0.1")
    assert isinstance(setup.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)), Refused)
    assert not isinstance(setup.site.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1)), Refused)
    many = Setup()  # without it, one address (a NAT) may open many
    for _ in range(50):
        many.connect("10.0.0.1")
    assert many.sample("relayd_client_connections") == 50


def test_auto_bound_is_half_the_open_file_limit_left() -> None:
    import resource

    from relayd.http.connections import FD_RESERVE

    setup = Setup()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert setup.site.tracker.limit(setup.site._get_runtime().config.connections) == max(
        (soft - FD_RESERVE) // 2, 16
    )


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"max": 0}, "connections.max: must be auto or a positive integer, got 0"),
        ({"head_timeout": 0}, "connections.head_timeout: must be a positive number, got 0"),
        ({"per_address": "x"}, "connections.per_address: must be a positive integer, got string"),
    ],
)
def test_connection_settings_are_checked(section: dict[str, Any], error: str) -> None:
    from relayd.config import ConfigErrors

    with pytest.raises(ConfigErrors) as raised:
        parse_config(base_config(connections=section))
    assert [str(e) for e in raised.value.errors] == [error]


def test_a_request_that_arrives_whole_sets_no_deadline_at_all() -> None:
    """Head and body deadlines are only armed for what a read leaves missing."""
    setup = Setup()
    protocol, _ = setup.connect()

    def deadlines() -> list[Any]:
        calls: Any = setup.clock.getDelayedCalls()  # DelayedCalls: func, args
        return [c.args for c in calls if getattr(c.func, "__name__", "") == "_too_slow"]

    protocol.dataReceived(REQUEST)
    assert len(setup.later.pending) == 1
    assert deadlines() == []
    setup.later.pending[0].finish()
    protocol.dataReceived(REQUEST[:10])
    assert deadlines() == [("head",)]
    protocol.dataReceived(REQUEST[10:-1])
    assert deadlines() == [("body",)]
    protocol.dataReceived(REQUEST[-1:])
    assert len(setup.later.pending) == 2
    assert deadlines() == []
