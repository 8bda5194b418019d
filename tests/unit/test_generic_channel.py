"""The adapter over twisted.web's private HTTP/1.1-or-HTTP/2 channel
(:mod:`relayd.http.generic_channel`) against the installed Twisted and hyper-h2: which
protocol it chose, the channel behind it, and an HTTP/2 connection that has ended.
Over in-memory transports; no socket."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.server import Site

from relayd.http.generic_channel import GenericHTTPChannel

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, stream 0


class AlpnTransport(StringTransport):
    """A transport on which TLS negotiated ``protocol`` (as TLSMemoryBIOProtocol says)."""

    def __init__(self, protocol: bytes | None) -> None:
        super().__init__()
        self.negotiatedProtocol = protocol


def connect(negotiated: bytes | None) -> tuple[GenericHTTPChannel, HTTPChannel, AlpnTransport]:
    http1 = HTTPChannel()
    protocol = GenericHTTPChannel(http1)
    site = Site(notFound(), reactor=MemoryReactorClock())
    protocol.site = site
    protocol.factory = site
    protocol.requestFactory = site.requestFactory
    protocol.callLater = MemoryReactorClock().callLater
    protocol.timeOut = None
    transport = AlpnTransport(negotiated)
    protocol.makeConnection(transport)
    return protocol, http1, transport


def test_before_any_data_nothing_is_chosen_and_the_given_channel_serves() -> None:
    protocol, http1, _ = connect(b"h2")
    assert protocol.negotiated_protocol is None
    assert protocol.backing_channel is http1
    assert not protocol.h2_connection_closed()


def test_http1_keeps_the_given_channel() -> None:
    for negotiated in (None, b"http/1.1"):
        protocol, http1, transport = connect(negotiated)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert protocol.negotiated_protocol == b"http/1.1"
        assert protocol.backing_channel is http1
        assert http1.transport is transport
        assert not protocol.h2_connection_closed()


def test_h2_switches_to_an_http2_connection_on_the_same_transport() -> None:
    protocol, http1, transport = connect(b"h2")
    protocol.dataReceived(H2_PREFACE + EMPTY_SETTINGS)
    assert protocol.negotiated_protocol == b"h2"
    channel: Any = protocol.backing_channel
    assert channel is not http1 and not isinstance(channel, HTTPChannel)
    assert channel.transport is transport
    assert not protocol.h2_connection_closed()
    assert not transport.disconnecting


def test_an_http2_protocol_error_ends_the_connection() -> None:
    protocol, _, transport = connect(b"h2")
    protocol.dataReceived(H2_PREFACE + EMPTY_SETTINGS)
    protocol.dataReceived(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # bad
    assert protocol.h2_connection_closed()
    assert transport.disconnecting  # Twisted closes it gracefully (GOAWAY first)
