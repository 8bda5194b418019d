"""twisted.web's HTTP/1.1-or-HTTP/2 channel behind public names: the one place relayd
depends on its internals.

twisted.web serves HTTP/2 only through the private ``_GenericHTTPChannelProtocol`` (what
``HTTPFactory.protocol`` builds for every connection): it starts as an ``HTTPChannel``
and, on its first data, replaces that with an ``H2Connection`` (of the private
``twisted.web._http2``) when TLS negotiated ``h2`` by ALPN. There is no public way to
subclass it, to learn which protocol it chose, or to reach the channel it is serving
with, and the relay channel needs all three: its own ``HTTPChannel`` subclass behind
it (deadlines, connection tracking), HTTP/2 connections kept out of idle eviction, and
reading stopped once an HTTP/2 connection has ended (see
:class:`~relayd.http.channel.RelayChannel`).

:class:`GenericHTTPChannel` is that private class with public accessors for what relayd
reads of it. ``tests/unit/test_generic_channel.py`` checks them against the installed
Twisted and hyper-h2, so an upgrade that changes these internals fails a test rather
than production.
"""

from __future__ import annotations

from typing import Any

from h2.connection import ConnectionState
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

__all__ = ["GenericHTTPChannel"]

_H2_CLOSED = ConnectionState.CLOSED


class GenericHTTPChannel(_GenericHTTPChannelProtocol):
    """twisted.web's protocol that serves HTTP/1.1 through ``channel`` or switches to
    HTTP/2 when ALPN chose it, with what relayd reads of it as public names."""

    def __init__(self, channel: HTTPChannel) -> None:
        super().__init__(channel)

    @property
    def backing_channel(self) -> Any:
        """The channel serving the connection now: the ``HTTPChannel`` given, or the
        ``H2Connection`` that replaced it."""
        return self._channel

    @property
    def negotiated_protocol(self) -> bytes | None:
        """``b"h2"`` or ``b"http/1.1"`` once the first data chose one, else None."""
        negotiated: bytes | None = self._negotiatedProtocol
        return negotiated

    def h2_connection_closed(self) -> bool:
        """Whether this connection serves HTTP/2 and that connection has ended (a GOAWAY
        sent or received: a protocol error, a reset flood, the client's goodbye)."""
        if self._negotiatedProtocol != b"h2":
            return False
        conn = getattr(self._channel, "conn", None)  # hyper-h2's connection state
        return conn is not None and conn.state_machine.state is _H2_CLOSED
