"""The HTTP channel of a relay listener: twisted.web's, optionally answering half-closes.

A client may shut down its sending side once its request is sent (``shutdown(SHUT_WR)``;
some scripted tools do) and still read the answer. On the wire that end-of-file is the
same FIN a client sends when it closes its socket because its user pressed "stop", and
nothing tells the two apart before relayd writes to it. So by default (``half_close:
cancel``) end-of-file means the client is gone: the upstream call is cancelled at once
and no tokens are burned for nobody, as nginx (499) and Go's net/http do. With
``half_close: answer`` the channel provides ``IHalfCloseableProtocol``: a request received
in full is answered, then the connection closes; the price is that a client that closed
its socket is only noticed when its answer is written (for a non-streamed answer: after
the upstream produced all of it). A half-close before the request is complete closes the
connection at once either way.

This module is where relayd depends on twisted.web's channel internals (the private
``_GenericHTTPChannelProtocol`` that switches between HTTP/1.1 and HTTP/2, and
``HTTPChannel``'s ``requests`` and ``persistent``); ``tests/unit/test_channel.py``
exercises it against the installed Twisted.
"""

from __future__ import annotations

from typing import Protocol

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


class HalfCloseChoice(Protocol):
    """What :func:`relay_channel` asks of its Site."""

    def answers_half_close(self) -> bool: ...


def relay_channel(site: HalfCloseChoice) -> _GenericHTTPChannelProtocol:
    """``Site.protocol``: the channel protocol for one new connection, as configured."""
    if site.answers_half_close():
        return RelayChannel(HTTPChannel())
    return _GenericHTTPChannelProtocol(HTTPChannel())
