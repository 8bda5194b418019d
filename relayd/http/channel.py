"""The HTTP channel of a relay listener: twisted.web's, with deadlines for a request's head
and body, reports of idle and busy connections, and optionally half-close answering.

**Deadlines.** twisted.web's only client timeout is an idle timer that every byte
resets, so a client sending a partial request line and one byte every few seconds (the
slowloris attack) held its connection forever. Here a request's head must be complete
within ``connections.head_timeout`` seconds of its first byte, and its body within
``connections.body_timeout`` of the head; past either the client gets a 408 and the
connection closes. Connections that say nothing are closed by the idle timeout.

**Idle and busy.** The channel tells its :class:`~relayd.http.connections.ConnectionTracker`
when a connection starts being served (its head is complete) and when it is idle again,
so the tracker can evict the oldest idle connection when the connection bound is reached.

**Half-close.** A client may shut down its sending side once its request is sent
(``shutdown(SHUT_WR)``) and still read the answer. On the wire that end-of-file is the
same FIN a client sends when it closes its socket because its user pressed "stop", and
nothing tells the two apart before relayd writes to it. So by default (``half_close:
cancel``) end-of-file means the client is gone: the upstream call is cancelled at once,
as nginx (499) and Go's net/http do. With ``half_close: answer`` the channel provides
``IHalfCloseableProtocol``: a request received in full is answered, then the connection
closes; the price is that a client that closed its socket is only noticed when its
answer is written. A half-close before the request is complete closes at once either way.

The HTTP/1.1-or-HTTP/2 switch it builds on is twisted.web's private one, reached only
through :mod:`relayd.http.generic_channel`; this module uses ``HTTPChannel``'s
overridable hooks, ``requests`` and ``persistent``. ``tests/unit/test_channel.py``
exercises it against the installed Twisted.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from zope.interface import implementer

from relayd.config.model import ConnectionsConfig
from relayd.http.generic_channel import GenericHTTPChannel
from relayd.providers import family_of
from relayd.whole_head import feed_whole_head

if TYPE_CHECKING:
    from relayd.http.connections import ConnectionTracker


_CONNECTION_DONE = Failure(ConnectionDone())
_GOAWAY_GRACE = 2.0  # seconds a closed HTTP/2 connection has to flush its GOAWAY


class RelayHTTPChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 channel, with head and body deadlines and state reports."""

    def __init__(self, owner: RelayChannel, config: ConnectionsConfig) -> None:
        super().__init__()
        self._owner = owner
        self._config = config
        self._deadline: IDelayedCall | None = None
        self._between_requests = True  # the next byte starts a request's head
        self._waiting_for: str | None = None  # "head" or "body" while one is incomplete
        self._local_address: IAddress | None = None
        self._peer_address: IAddress | None = None

    # twisted.web's Request asks for both addresses when it is made: a getsockname system
    # call and two address objects per request, for what a connection never changes.

    def getHost(self) -> IAddress:
        address = self._local_address
        if address is None:
            assert self.transport is not None
            address = self._local_address = self.transport.getHost()
        return address

    def getPeer(self) -> IAddress:
        address = self._peer_address
        if address is None:
            assert self.transport is not None
            address = self._peer_address = self.transport.getPeer()
        return address

    def dataReceived(self, data: bytes) -> None:
        if self._between_requests and data:
            self._between_requests = False
            self._waiting_for = "head"
        self.resetTimeout()  # HTTPChannel.dataReceived, with the head in one pass
        rest = feed_whole_head(self, data)
        if rest is not None:
            LineReceiver.dataReceived(self, rest)
        # A deadline only for what is still missing once this read is parsed: a request
        # that arrives whole in one read (most do) needs no timer at all.
        stage = self._waiting_for
        if stage is not None and self._deadline is None and self.connected:
            config = self._config
            self._arm(config.head_timeout if stage == "head" else config.body_timeout, stage)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        self._disarm()
        self._waiting_for = "body"
        self._owner.tracker.busy(self._owner)

    def allContentReceived(self) -> None:
        self._disarm()
        self._waiting_for = None
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._between_requests = True
        self._owner.tracker.idle(self._owner)
        super().requestDone(request)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self, seconds: float, stage: str) -> None:
        if seconds > 0:
            call_later: Any = self.callLater  # the reactor's, set by the Site
            self._deadline = call_later(seconds, self._too_slow, stage)

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self, stage: str) -> None:
        """The request's head (or body) did not arrive in time: 408, and close."""
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        self._owner.tracker.timed_out(stage)
        seconds = self._config.head_timeout if stage == "head" else self._config.body_timeout
        headers = self.requests[-1].requestHeaders if stage == "body" and self.requests else None
        family = family_of(headers) if headers is not None else family_of(_NO_HEADERS)
        body = family.render_error(
            408,
            f"the request's {stage} did not arrive within {seconds:g}s",
            "req_" + os.urandom(12).hex(),
        )
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        transport.loseConnection()


class _NoHeaders:
    def hasHeader(self, name: bytes) -> bool:
        return False


_NO_HEADERS: Any = _NoHeaders()


class RelayChannel(GenericHTTPChannel):
    """One client connection of a relay listener: twisted.web's HTTP/1.1-or-HTTP/2
    switch, registered with the connection tracker while it is open."""

    def __init__(self, tracker: ConnectionTracker, config: ConnectionsConfig) -> None:
        super().__init__(RelayHTTPChannel(self, config))
        self.tracker = tracker
        self.address: str | None = None
        self._h2 = False
        self._closing = False

    def dataReceived(self, data: bytes) -> None:
        if self._h2 and self.h2_connection_closed():
            # The HTTP/2 connection ended (a protocol error, a reset flood): Twisted
            # closes it gracefully and keeps reading, and hyper-h2 buffers what still
            # comes without bound (a CONTINUATION flood grew RSS by 800 MB). Read no
            # more: the GOAWAY already written still goes out; abort if it cannot.
            transport: Any = self.backing_channel.transport
            if transport is not None and not self._closing:
                self._closing = True
                transport.pauseProducing()
                self.callLater(_GOAWAY_GRACE, transport.abortConnection)
            return
        super().dataReceived(data)
        if not self._h2 and self.negotiated_protocol == b"h2":
            # An HTTP/2 connection multiplexes requests: never evicted as idle.
            self._h2 = True
            self.tracker.busy(self)

    def makeConnection(self, transport: Any) -> None:
        peer = transport.getPeer()
        self.address = getattr(peer, "host", None)
        self.tracker.opened(self)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        self.tracker.closed(self)
        super().connectionLost(reason)

    def close(self) -> None:
        """Close this connection (evicted)."""
        transport = self.backing_channel.transport
        if transport is not None:
            transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class HalfClosingRelayChannel(RelayChannel):
    """A relay channel that answers a request whose client half-closed."""

    def readConnectionLost(self) -> None:
        channel = self.backing_channel
        if isinstance(channel, HTTPChannel) and any(
            request.method != Request.method for request in channel.requests
        ):
            # A whole request was received and is being answered: finish it, then close
            # (the channel closes non-persistent connections when a request is done).
            channel.persistent = False
            return
        self.close()

    def writeConnectionLost(self) -> None:
        self.close()
