"""twisted.web's HTTP/1.1 client protocol behind public names: the one place relayd
depends on ``twisted.web._newclient``.

relayd's backend connection pool (:mod:`relayd.pool`) hands the Agent connections of its
own, as ``HTTPConnectionPool`` does: that means building the client protocol the Agent
sends its requests over, ``HTTP11ClientProtocol``, and recognising the failures it
raises. Those live in the private ``twisted.web._newclient`` (``twisted.web.client``
imports some of them, but as public API it offers only the failures in its
``__all__``). The pool also bounds the size of an answer's head, for which it must know
whether the head is still arriving and fail the request when it is too large: both are
private state of the protocol (its parser and ``_giveUp``). And it hands an answer's
head to the parser in one pass when the head arrives whole
(:func:`relayd.whole_head.feed_whole_head`), and unties a finished parser from its body
decoder, a reference cycle otherwise left for every chunked answer.

:class:`ClientProtocol` is ``HTTP11ClientProtocol`` with those as public methods.
``tests/unit/test_client_protocol.py`` checks them against the installed Twisted, so an
upgrade that changes these internals fails a test rather than production.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HEADER,
    STATUS,
    HTTP11ClientProtocol,
    Request,
    RequestNotSent,
)
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from relayd.whole_head import feed_whole_head

__all__ = [
    "ClientProtocol",
    "PreparedRequest",
    "Request",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseFailed",
    "ResponseNeverReceived",
]


class ClientProtocol(HTTP11ClientProtocol):
    """twisted.web's HTTP/1.1 client protocol, with what relayd's pool needs of its
    state as public methods."""

    def receiving_head(self) -> bool:
        """Whether a request was sent and its answer's status line and headers are not
        all in yet."""
        parser = self._parser
        return parser is not None and parser.state in (STATUS, HEADER)

    def fail_response(self, reason: Failure) -> None:
        """Close the connection and fail the request in progress (its Deferred errbacks
        with a ``ResponseFailed`` holding ``reason``)."""
        self._giveUp(reason)

    def _disconnectParser(self, reason: Failure) -> None:
        # A finished parser and its body decoder refer to each other (the decoder holds
        # the parser's ``_finished``): left so, every chunked answer (every stream) is
        # garbage for the cyclic collector, with its response and headers. Break it.
        parser = self._parser
        super()._disconnectParser(reason)
        if parser is not None:
            parser.bodyDecoder = None

    def dataReceived(self, data: bytes) -> None:
        # HTTP11ClientProtocol.dataReceived, with a whole head in one pass
        # (relayd.whole_head); as there, any failure of the parser fails the request.
        parser = self._parser
        if parser is None:
            super().dataReceived(data)
            return
        try:
            parser._everReceivedData = True  # what HTTPClientParser.dataReceived notes
            rest = feed_whole_head(parser, data)
            if rest is not None:
                parser.dataReceived(rest)
        except BaseException:
            self._giveUp(Failure())


class PreparedRequest(Request):
    """A request whose bytes (request line, headers, body) are made already.

    ``Request.writeTo`` writes the head through a ``Headers`` object (re-validating and
    re-encoding every header) and the body through a producer with a chain of Deferreds;
    relayd holds the whole request in memory, so it is written in one go. The protocol
    reads ``method`` (a HEAD answer has no body) and ``persistent`` (keep-alive) of the
    request; ``bodyProducer`` is None (nothing to stop, and the same bytes can be sent
    again on a fresh connection).
    """

    def __init__(self, method: bytes, uri: bytes, data: bytes) -> None:
        self.method = method
        self.uri = uri
        self.headers = None
        self.bodyProducer = None
        self.persistent = True
        self._data = data

    def writeTo(self, transport: Any) -> Deferred[None]:
        transport.write(self._data)
        return succeed(None)

    def stopWriting(self) -> None:
        """Nothing to stop: the request was written whole."""
