"""relayd's HTTP/1.1 client protocol: one request at a time on a pooled upstream connection.

twisted.web's ``HTTP11ClientProtocol`` parses an answer's head line by line
(``LineReceiver`` splitting its buffer per line), builds a ``Headers`` for the answer and
another for its connection headers, a ``TransportProxyProducer``, an
``HTTPClientParser`` with its own Deferred, a body decoder object and a ``Response``
whose every event goes through a state-dispatching function. Profiled under the relay's
load, that machinery was about a sixth of relayd's CPU per request. This protocol does
the same job for what relayd sends: the head is found and split once, framed by
``Content-Length``, chunked encoding or the connection's end, and the body is handed to
the response's protocol as it arrives.

What callers see is twisted.web's contract (:mod:`relayd.pool` and the Agent drive it as
they drive ``HTTP11ClientProtocol``):

* ``request(request)`` writes the request (``request.writeTo(transport)``) and returns a
  Deferred firing with an ``IResponse`` once the head is in; ``RequestNotSent`` if a
  request is in progress. Failures are twisted.web's: ``ResponseNeverReceived`` (the
  connection ended before any byte of an answer), ``ResponseFailed`` (a broken or
  partial head), ``RequestTransmissionFailed`` / ``RequestGenerationFailed`` (the
  request could not be written). Cancelling the Deferred before the head arrives aborts
  the connection; the failure then carries a ``CancelledError``.
* ``1xx`` answers are skipped; ``204``, ``304`` and answers to ``HEAD`` have no body.
* The response's body protocol gets ``dataReceived`` per piece and ``connectionLost``
  with ``ResponseDone`` (whole), ``PotentialDataLoss`` (an answer delimited by the
  connection's end) or ``ResponseFailed`` (cut short). Its transport pauses, resumes
  and stops the connection until the answer is over, and nothing after. Body data that
  arrives before a protocol is attached is kept, and reading pauses until one is.
* When an answer ends, the connection is handed back (the quiescent callback, before
  the body's ``connectionLost``) unless the answer said ``Connection: close``, the
  request is not persistent, or bytes followed the answer in the same read (an upstream
  out of step with its own framing: twisted.web drops those bytes and keeps the
  connection; relayd closes it, so that the next request cannot read them as its
  answer). An HTTP/1.0 answer without keep-alive is handed back as twisted.web does: the
  upstream's close then takes it out of the pool.
* A head larger than :data:`MAX_RESPONSE_HEAD`, or a line in it longer than
  :data:`MAX_LINE` (twisted's ``LineReceiver`` limit), fails the request and drops the
  connection.

``state`` is ``QUIESCENT`` when the connection can carry a request. The failures are
imported from ``twisted.web.client`` and, for the two it does not export, from
``twisted.web._newclient``: the one place relayd names that private module.
``tests/unit/test_client_protocol.py`` compares this protocol's outcome with
``HTTP11ClientProtocol``'s on the same bytes, split at every point.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    Request,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

__all__ = [
    "MAX_LINE",
    "MAX_RESPONSE_HEAD",
    "ClientProtocol",
    "PreparedRequest",
    "Request",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseFailed",
    "ResponseHeadTooLargeError",
    "ResponseNeverReceived",
    "UpstreamParseError",
]

log = Logger(namespace="relayd.upstream")

#: An upstream answer's status line and headers must fit in this many bytes, else the
#: connection is dropped as a failed response (header lines would be kept in memory
#: without end).
MAX_RESPONSE_HEAD = 256 * 1024

#: The longest line of a head (twisted's ``LineReceiver.MAX_LENGTH``): past it the
#: connection is dropped.
MAX_LINE = 16384

# A chunk-size line longer than this is not a chunk size.
_MAX_CHUNK_LINE = 4096

# Connection-control headers: they frame this answer on this connection and are kept
# out of ``response.headers`` (as twisted.web's parser does).
_CONNECTION_HEADERS = frozenset({
    b"content-length", b"connection", b"keep-alive", b"te", b"trailers",
    b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# In the answer to a HEAD request, Content-Length describes the entity (what a GET would
# get), not this answer's body: it stays in ``response.headers``.
_HEAD_CONNECTION_HEADERS = _CONNECTION_HEADERS - {b"content-length"}
_NO_BODY_CODES = (204, 304)

# Phases of the connection: no request; reading an answer's head; reading its body.
_IDLE, _HEAD, _BODY = 0, 1, 2
# Body framings.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2
# Where a chunked body is: a size line, chunk data, the CRLF after it, the trailer.
_SIZE, _DATA, _CRLF, _TRAILER = 0, 1, 2, 3

_HEX = frozenset(b"0123456789abcdefABCDEF")
_DONE = Failure(ResponseDone())


class ResponseHeadTooLargeError(Exception):
    """The upstream's status line and headers exceeded :data:`MAX_RESPONSE_HEAD`."""


class UpstreamParseError(Exception):
    """The upstream's answer is not HTTP/1.1 relayd can read."""


class _DataLossError(Exception):
    """The connection ended before the answer's body did."""


class ResponseHeaders:
    """An answer's headers: names in lower case, values in arrival order.

    What relayd and twisted.web's callers read of ``IResponse.headers``
    (``getRawHeaders``, ``getAllRawHeaders``, ``hasHeader``), without ``Headers``'
    per-header name encoding. Values are cleaned of CR and LF as ``Headers`` cleans them.
    """

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        self._raw: dict[bytes, list[bytes]] = {}

    def getRawHeaders(self, name: bytes | str, default: Any = None) -> Any:
        key = name.encode("iso-8859-1") if isinstance(name, str) else name
        values = self._raw.get(key.lower())
        if values is None:
            return default
        if isinstance(name, str):
            return [value.decode("utf-8") for value in values]
        return values

    def getAllRawHeaders(self) -> Any:
        return iter(self._raw.items())

    def hasHeader(self, name: bytes | str) -> bool:
        key = name.encode("iso-8859-1") if isinstance(name, str) else name
        return key.lower() in self._raw

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._raw!r})"


class _BodyTransport:
    """The transport a body protocol sees: pauses, resumes, stops or aborts the
    connection while its answer lasts, and nothing once the connection has moved on."""

    __slots__ = ("_transport",)

    disconnecting = False

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def detach(self) -> None:
        self._transport = None

    def pauseProducing(self) -> None:
        if self._transport is not None:
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._transport is not None:
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._transport is not None:
            self._transport.stopProducing()

    def loseConnection(self) -> None:
        if self._transport is not None:
            self._transport.loseConnection()

    def abortConnection(self) -> None:
        """(What ``readBody`` calls when its Deferred is cancelled.)"""
        if self._transport is not None:
            self._transport.abortConnection()


@implementer(IResponse)
class Response:
    """An upstream answer: status, headers and a body delivered to one protocol."""

    __slots__ = ("__weakref__", "_ended", "_held", "_kept", "_protocol", "_transport", "code",
                 "headers", "length", "phrase", "previousResponse", "request", "version")

    def __init__(self, version: tuple[bytes, int, int], code: int, phrase: bytes,
                 headers: ResponseHeaders, transport: _BodyTransport, request: Any) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length: Any = UNKNOWN_LENGTH
        self.request = request
        self.previousResponse = None
        self._transport = transport
        self._protocol: Any = None
        self._kept: list[bytes] = []  # body data before a protocol was attached
        self._ended: Failure | None = None  # how the body ended, before a protocol
        self._held = False  # reading paused until a protocol is attached

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response  # type: ignore[assignment]

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body of this response is delivered already")
        self._protocol = protocol
        protocol.makeConnection(self._transport)
        kept, self._kept = self._kept, []
        for data in kept:
            protocol.dataReceived(data)
        ended = self._ended
        if ended is not None:
            self._ended = None
            protocol.connectionLost(ended)
        elif self._held:
            self._held = False
            self._transport.resumeProducing()

    # -- from the protocol ----------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        else:
            self._kept.append(data)

    def _end(self, reason: Failure) -> None:
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None  # (a body protocol may refer back to the response)
            protocol.connectionLost(reason)
        else:
            self._ended = reason


class ClientProtocol(Protocol):
    """One upstream connection, one request at a time (see the module's description)."""

    transport: Any  # a TCP (or TLS) transport, once connected

    def __init__(self, quiescent_callback: Any = None) -> None:
        self._quiescent_callback = quiescent_callback
        self._state = "QUIESCENT"
        self._abort_waiters: list[Deferred[None]] = []
        self._phase = _IDLE
        self._request: Any = None
        self._answered: Deferred[IResponse] | None = None  # until the head is in
        self._response: Response | None = None  # while its body is read
        self._body_transport: _BodyTransport | None = None
        self._buffer = b""  # head bytes so far; or an unfinished chunk-size line
        self._received = False  # any byte of an answer to this request
        self._framing = _LENGTH
        self._remaining = 0  # body bytes (or chunk bytes) still to come
        self._chunk_state = _SIZE
        self._persistent = True

    @property
    def state(self) -> str:
        return self._state

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def receiving_head(self) -> bool:
        """Whether a request was sent and its answer's head is not all in yet."""
        return self._phase == _HEAD

    # -- sending --------------------------------------------------------------------------

    def request(self, request: Any) -> Deferred[IResponse]:
        if self._state != "QUIESCENT":
            return fail(RequestNotSent())
        self._state = "TRANSMITTING"
        self._request = request
        self._phase = _HEAD
        self._buffer = b""
        self._received = False
        answered: Deferred[IResponse] = Deferred(self._cancel)
        self._answered = answered
        if type(request) is PreparedRequest:
            # Its bytes are made: one write, no Deferred for the writing.
            try:
                self.transport.write(request.data)
            except BaseException:
                self._not_written(Failure())
            else:
                self._written(None)
            return answered
        try:
            written = request.writeTo(self.transport)
        except BaseException:
            written = fail()
        written.addCallbacks(self._written, self._not_written)
        return answered

    def _written(self, _: object) -> None:
        if self._state == "TRANSMITTING":
            self._state = "WAITING"

    def _not_written(self, failure: Failure) -> None:
        if self._state != "TRANSMITTING":
            return
        self._state = "GENERATION_FAILED"
        self.transport.abortConnection()
        answered, self._answered = self._answered, None
        self._phase = _IDLE
        if answered is not None:
            answered.errback(Failure(RequestGenerationFailed([failure])))

    def _cancel(self, answered: Deferred[IResponse]) -> None:
        # Cancelled before the head arrived: the connection is dropped with the request.
        self.transport.abortConnection()
        self._fail_head(Failure(CancelledError()))

    # -- receiving ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            phase = self._phase
            if phase == _BODY:
                self._body(data)
            elif phase == _HEAD:
                self._head(data)
            elif data:
                # Bytes nobody asked for: the connection can no longer be trusted.
                self.transport.loseConnection()
        except BaseException:
            self.fail_response(Failure())

    def _head(self, data: bytes) -> None:
        self._received = True
        buffer = self._buffer + data if self._buffer else data
        while True:
            # Lines end with LF and an optional CR before it (as twisted.web reads them);
            # the head ends at the first empty line: usually the first CRLF CRLF.
            end = buffer.find(b"\r\n\r\n")
            skip = 4
            if end < 0 or buffer.find(b"\n\n", 0, end) >= 0 or (
                buffer.find(b"\n\r\n", 0, end + 3) >= 0
            ):
                end = buffer.find(b"\n\r\n")
                skip = 3
                bare = buffer.find(b"\n\n", 0, end if end >= 0 else len(buffer))
                if bare >= 0:
                    end, skip = bare, 2
            if end < 0:
                self._buffer = buffer
                if len(buffer) > MAX_RESPONSE_HEAD:
                    self.fail_response(Failure(ResponseHeadTooLargeError(MAX_RESPONSE_HEAD)))
                elif len(buffer) - _line_start(buffer) > MAX_LINE:
                    self.fail_response(Failure(UpstreamParseError("header line too long")))
                return
            if end > MAX_RESPONSE_HEAD:
                self.fail_response(Failure(ResponseHeadTooLargeError(MAX_RESPONSE_HEAD)))
                return
            response = self._parse_head(buffer[:end])
            buffer = buffer[end + skip:]
            if response is not None:
                break
            # A 1xx answer: the real one follows.
        self._buffer = b""
        self._start_body(response, buffer)

    def _parse_head(self, head: bytes) -> Response | None:
        crlf = head.count(b"\r\n")
        # The usual head: CRLF line ends only, no folded line, no line too long.
        plain = (
            head.count(b"\n") == crlf and head.count(b"\r") == crlf
            and b"\n " not in head and b"\n\t" not in head
            and (len(head) <= MAX_LINE or max(map(len, head.split(b"\r\n"))) <= MAX_LINE)
        )
        lines = head.split(b"\r\n") if plain else head.split(b"\n")
        status = lines[0]
        if status[-1:] == b"\r":
            status = status[:-1]
        parts = status.split(b" ", 2)
        if len(parts) == 3:
            version, code_text, phrase = parts
        elif len(parts) == 2:
            (version, code_text), phrase = parts, b""
        else:
            raise UpstreamParseError(f"bad status line {status[:100]!r}")
        if not code_text.isdigit():
            raise UpstreamParseError(f"bad status code {status[:100]!r}")
        code = int(code_text)
        parsed_version = _version(version)
        headers = ResponseHeaders()
        raw = headers._raw
        connection: dict[bytes, list[bytes]] = {}
        head_request = self._request.method == b"HEAD"
        control = _HEAD_CONNECTION_HEADERS if head_request else _CONNECTION_HEADERS
        if not plain:
            _parse_header_lines(lines, raw, connection, control)
        else:
            # (the per-line work of _add, inlined: values hold no CR or LF here)
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon:
                    raise UpstreamParseError(f"header line without a colon {line[:100]!r}")
                name = name.lower()
                value = value.strip()
                if name in control:
                    connection.setdefault(name, []).append(value)
                    continue
                values = raw.get(name)
                if values is None:
                    raw[name] = [value]
                else:
                    values.append(value)
        if 100 <= code < 200:
            log.info("ignoring an unexpected {code} answer", code=code)
            return None
        transport = self._body_transport = _BodyTransport(self.transport)
        response = Response(parsed_version, code, phrase, headers, transport, self._request)
        tokens = b",".join(connection.get(b"connection", ())).lower()
        self._persistent = self._request.persistent and b"close" not in tokens
        if code in _NO_BODY_CODES or head_request:
            response.length = 0
            self._remaining = 0
            self._framing = _LENGTH
            return response
        encodings = connection.get(b"transfer-encoding")
        if encodings:
            if encodings[0].strip().lower() != b"chunked":
                raise UpstreamParseError(f"unknown transfer encoding {encodings[0][:50]!r}")
            self._framing = _CHUNKED
            self._chunk_state = _SIZE
            return response
        length = _content_length(connection.get(b"content-length"))
        if length is None:
            self._framing = _UNTIL_CLOSE
            self._persistent = False
        else:
            response.length = length
            self._framing = _LENGTH
            self._remaining = length
        return response

    def _start_body(self, response: Response, rest: bytes) -> None:
        self._response = response
        self._phase = _BODY
        answered, self._answered = self._answered, None
        empty = self._framing == _LENGTH and self._remaining == 0
        if empty:
            self._end_answer(rest)
        if answered is not None:
            answered.callback(response)
        if empty or self._response is not response:
            return
        if response._protocol is None:
            # Nobody reads the body yet: hold the connection until somebody does.
            response._held = True
            self.transport.pauseProducing()
        if rest:
            self._body(rest)

    def _body(self, data: bytes) -> None:
        framing = self._framing
        response = self._response
        assert response is not None
        if framing == _LENGTH:
            remaining = self._remaining
            size = len(data)
            if size < remaining:
                self._remaining = remaining - size
                response._data(data)
                return
            self._remaining = 0
            if size == remaining:
                response._data(data)
                self._end_answer(b"")
            else:
                response._data(data[:remaining])
                self._end_answer(data[remaining:])
        elif framing == _CHUNKED:
            self._chunks(data, response)
        else:
            response._data(data)

    def _chunks(self, data: bytes, response: Response) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        position = 0
        size = len(data)
        state = self._chunk_state
        while position < size:
            if state == _DATA:
                remaining = self._remaining
                take = min(remaining, size - position)
                response._data(data if take == size else data[position:position + take])
                position += take
                self._remaining = remaining - take
                if take < remaining:
                    break
                state = _CRLF
            elif state == _SIZE or state == _TRAILER:
                eol = data.find(b"\r\n", position)
                if eol < 0:
                    if size - position > _MAX_CHUNK_LINE:
                        raise UpstreamParseError("chunk size line too long")
                    self._buffer = data[position:]
                    break
                line = data[position:eol]
                position = eol + 2
                if state == _TRAILER:
                    if not line:
                        self._chunk_state = _SIZE
                        self._end_answer(data[position:])
                        return
                    continue
                digits = line.partition(b";")[0].strip()
                if not digits or not _HEX.issuperset(digits):
                    raise UpstreamParseError(f"bad chunk size {line[:50]!r}")
                chunk = int(digits, 16)
                if chunk == 0:
                    state = _TRAILER
                else:
                    self._remaining = chunk
                    state = _DATA
            else:  # _CRLF
                if size - position < 2:
                    self._buffer = data[position:]
                    break
                if data[position:position + 2] != b"\r\n":
                    raise UpstreamParseError("chunk data not followed by CRLF")
                position += 2
                state = _SIZE
            if self._response is not response:
                return  # failed on the way
        self._chunk_state = state

    def _body_over(self) -> Response | None:
        """The exchange of the answer being read is over: no request, the body's
        transport detached. Returns that answer, for its body's end."""
        response = self._response
        self._response = None
        self._phase = _IDLE
        self._request = None
        transport = self._body_transport
        self._body_transport = None
        if transport is not None:
            transport.detach()
        return response

    def _end_answer(self, rest: bytes) -> None:
        """The answer is whole: the connection goes back (or away), then the body ends."""
        response = self._body_over()
        # Bytes after the answer (``rest``): the upstream is out of step; not reused.
        if self._state == "WAITING" and self._persistent and not rest:
            self._state = "QUIESCENT"
            self.transport.resumeProducing()
            callback = self._quiescent_callback
            if callback is not None:
                try:
                    callback(self)
                except Exception:
                    log.failure("while handing a connection back to its pool")
                    self.transport.loseConnection()
        else:
            if self._state in ("WAITING", "TRANSMITTING"):
                self._state = "CLOSING"
            self.transport.loseConnection()
        if response is not None:
            response._end(_DONE)

    # -- failures -------------------------------------------------------------------------

    def fail_response(self, reason: Failure) -> None:
        """Close the connection and fail the request in progress with ``reason``: its
        Deferred errbacks with a ``ResponseFailed`` holding it (or, once the head is in,
        the body's protocol hears it)."""
        self.transport.loseConnection()
        if self._phase == _HEAD:
            self._fail_head(reason)
        elif self._phase == _BODY:
            self._fail_body(reason)

    def _fail_head(self, reason: Failure) -> None:
        answered, self._answered = self._answered, None
        self._phase = _IDLE
        self._request = None
        self._buffer = b""
        if answered is not None:
            kind = ResponseFailed if self._received else ResponseNeverReceived
            answered.errback(Failure(kind([reason])))

    def _fail_body(self, reason: Failure) -> None:
        response = self._body_over()
        if response is None:
            return
        if self._framing == _UNTIL_CLOSE:
            # Its end is the connection's: whatever the reason, the body may be whole.
            response._end(Failure(PotentialDataLoss()))
        else:
            response._end(Failure(ResponseFailed([reason, Failure(_DataLossError())], response)))

    def connectionLost(self, reason: Failure = _DONE) -> None:
        state = self._state
        self._state = "CONNECTION_LOST"
        if state == "ABORTING":
            reason = Failure(AbortedByRelayError("closed by relayd"))
        phase = self._phase
        if phase == _HEAD:
            if state == "TRANSMITTING":
                answered, self._answered = self._answered, None
                self._phase = _IDLE
                request, self._request = self._request, None
                if answered is not None:
                    answered.errback(Failure(RequestTransmissionFailed([reason])))
                stop = getattr(request, "stopWriting", None)
                if stop is not None:
                    stop()
            else:
                self._fail_head(reason)
        elif phase == _BODY:
            self._fail_body(reason)
        waiters, self._abort_waiters = self._abort_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def abort(self) -> Deferred[None]:
        """Close the connection; fires once it is closed (a request in progress fails)."""
        if self._state == "CONNECTION_LOST":
            return succeed(None)
        self.transport.loseConnection()
        self._state = "ABORTING"
        done: Deferred[None] = Deferred()
        self._abort_waiters.append(done)
        return done


class AbortedByRelayError(Exception):
    """The connection was closed by relayd (:meth:`ClientProtocol.abort`)."""


def _parse_header_lines(lines: list[bytes], raw: dict[bytes, list[bytes]],
                        connection: dict[bytes, list[bytes]], control: frozenset[bytes]) -> None:
    """The header lines of an unusual head (the status line first): bare LF line ends,
    folded lines, long lines; read as twisted.web reads them."""
    name = b""
    value = b""
    for line in lines[1:]:
        if len(line) > MAX_LINE:
            raise UpstreamParseError("header line too long")
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if not name:
                raise UpstreamParseError("a head starts with a continuation line")
            value += line
            continue
        if name:
            _add(raw, connection, name, value, control)
        if not line:
            name = b""
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            raise UpstreamParseError(f"header line without a colon {line[:100]!r}")
    if name:
        _add(raw, connection, name, value, control)


def _add(raw: dict[bytes, list[bytes]], connection: dict[bytes, list[bytes]], name: bytes,
         value: bytes, control: frozenset[bytes]) -> None:
    """One header: its name in lower case, its value stripped and cleaned of CR and LF,
    into ``connection`` if its name is in ``control``, else into ``raw``."""
    name = name.lower()
    value = value.strip()
    if b"\r" in value or b"\n" in value:
        value = b" ".join(value.splitlines())
    (connection if name in control else raw).setdefault(name, []).append(value)


def _line_start(buffer: bytes) -> int:
    """Where the unfinished last line of ``buffer`` starts."""
    return buffer.rfind(b"\n") + 1


def _version(text: bytes) -> tuple[bytes, int, int]:
    if text == b"HTTP/1.1":
        return (b"HTTP", 1, 1)
    protocol, slash, number = text.partition(b"/")
    major, dot, minor = number.partition(b".")
    if not (slash and dot and major.isdigit() and minor.isdigit()):
        raise UpstreamParseError(f"bad HTTP version {text[:50]!r}")
    return (protocol, int(major), int(minor))


def _content_length(values: list[bytes] | None) -> int | None:
    """The body's length from its Content-Length values (repeats must agree)."""
    if values is None:
        return None
    lengths = set()
    for value in b",".join(values).split(b","):
        value = value.strip(b" \t")
        if not value.isdigit():
            raise UpstreamParseError(f"bad Content-Length {b','.join(values)[:50]!r}")
        lengths.add(int(value))
    if len(lengths) != 1:
        raise UpstreamParseError(f"conflicting Content-Length {b','.join(values)[:50]!r}")
    return lengths.pop()


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
        self.data = data

    def writeTo(self, transport: Any) -> Deferred[None]:
        transport.write(self.data)
        return succeed(None)

    def stopWriting(self) -> None:
        """Nothing to stop: the request was written whole."""
