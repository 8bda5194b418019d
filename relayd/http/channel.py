"""The HTTP channel of a relay listener: twisted.web's, plus half-close.

A client may shut down its sending side once its request is sent (``shutdown(SHUT_WR)``;
some HTTP/1.0 clients and scripted tools do). Without ``IHalfCloseableProtocol`` the
reactor treats that end-of-file as the connection being lost, so relayd cancelled the
call and answered nobody (``499``). A half-closed client still reads: its request is
answered, then the connection closes. A client that half-closes before its request is
complete can never complete it: that connection closes at once.

This module is where relayd depends on twisted.web's channel internals (the private
``_GenericHTTPChannelProtocol`` that switches between HTTP/1.1 and HTTP/2, and
``HTTPChannel``'s ``requests`` and ``persistent``); ``tests/unit/test_channel.py``
exercises it against the installed Twisted.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.web.http import HTTPChannel, Request, _GenericHTTPChannelProtocol
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class RelayChannel(_GenericHTTPChannelProtocol):
    """twisted.web's channel protocol, answering a request whose client half-closed."""

    def readConnectionLost(self) -> None:
        channel = self._channel
        if isinstance(channel, HTTPChannel) and any(
            request.method != Request.method for request in channel.requests
        ):
            # A whole request was received and is being answered: finish it, then close
            # (the channel closes non-persistent connections when a request is done).
            channel.persistent = False
            return
        self._close()

    def writeConnectionLost(self) -> None:
        self._close()

    def _close(self) -> None:
        transport = self._channel.transport
        if transport is not None:
            transport.loseConnection()


def relay_channel(factory: object) -> RelayChannel:
    """``Site.protocol``: a channel protocol for one new connection."""
    return RelayChannel(HTTPChannel())
