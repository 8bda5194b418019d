"""The relay's HTTP channel against the installed Twisted: half-closing clients."""

from __future__ import annotations

import functools
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
    answer = True

    def answers_half_close(self) -> bool:
        return self.answer


def connect(answer: bool = True) -> tuple[Any, StringTransport, Later]:
    resource = Later()
    site = ChannelSite(resource, reactor=MemoryReactorClock())
    site.answer = answer
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, resource


REQUEST = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_the_channel_accepts_half_closes_only_when_configured() -> None:
    """By default end-of-file is a client gone (its upstream call is cancelled at once):
    a FIN from a client that closed its socket looks the same as a half-close."""
    assert IHalfCloseableProtocol.providedBy(connect(answer=True)[0])
    assert not IHalfCloseableProtocol.providedBy(connect(answer=False)[0])


def test_the_relay_site_follows_the_configuration() -> None:
    from relay_harness import base_config

    from relayd.config import parse_config
    from relayd.http.site import RelaySite
    from relayd.runtime import RelayRuntime

    clock = MemoryReactorClock()
    for setting, halfclosable in (("cancel", False), ("answer", True)):
        runtime = RelayRuntime(parse_config(base_config(half_close=setting)), clock)
        site = RelaySite(functools.partial(lambda r: r, runtime), clock)
        assert IHalfCloseableProtocol.providedBy(site.buildProtocol(None)) is halfclosable


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
