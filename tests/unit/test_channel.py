"""The relay's HTTP channel against the installed Twisted: half-closing clients."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayd.http.channel import relay_channel


class Later(Resource):
    """Answers when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


class ChannelSite(Site):
    protocol = relay_channel  # as RelaySite has it


def connect() -> tuple[Any, StringTransport, Later]:
    resource = Later()
    site = ChannelSite(resource, reactor=MemoryReactorClock())
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, resource


REQUEST = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_the_channel_accepts_half_closes() -> None:
    protocol, _, _ = connect()
    assert IHalfCloseableProtocol.providedBy(protocol)


def test_a_request_whose_client_half_closed_is_answered_then_closed() -> None:
    """The campaign: a client that half-closes after its request got no answer (499)."""
    protocol, transport, resource = connect()
    protocol.dataReceived(REQUEST)
    protocol.readConnectionLost()
    assert not transport.disconnecting
    (request,) = resource.pending
    assert not request._disconnected
    request.write(b"answer")
    request.finish()
    assert b"answer" in transport.value()
    assert transport.disconnecting  # closed once the answer is out


def test_a_half_close_before_the_request_is_complete_closes_at_once() -> None:
    protocol, transport, resource = connect()
    protocol.dataReceived(REQUEST[:40])
    protocol.readConnectionLost()
    assert transport.disconnecting and not resource.pending


def test_an_idle_connection_that_half_closes_is_closed() -> None:
    protocol, transport, _ = connect()
    protocol.readConnectionLost()
    assert transport.disconnecting
