"""The adapter over twisted.web's private HTTP/1.1 client protocol
(:mod:`relayd.client_protocol`) against the installed Twisted: when an answer's head is
still arriving, failing the request in progress, and reading a whole head in one pass
(compared with what Twisted's own protocol makes of the same bytes). Over a
StringTransport."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.http_headers import Headers

from relayd.client_protocol import ClientProtocol, Request, ResponseFailed


class BoomError(Exception):
    pass


def send() -> tuple[ClientProtocol, StringTransport, list[Any]]:
    protocol = ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    results: list[Any] = []
    request = Request(b"GET", b"/", Headers({b"host": [b"up.test"]}), None)
    protocol.request(request).addBoth(results.append)
    return protocol, transport, results


def test_the_head_is_arriving_from_the_request_to_the_end_of_its_headers() -> None:
    idle = ClientProtocol()
    idle.makeConnection(StringTransport())
    assert not idle.receiving_head()  # no request sent
    protocol, transport, results = send()
    assert transport.value().startswith(b"GET / HTTP/1.1\r\n")
    assert protocol.receiving_head()  # waiting for the status line
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert protocol.receiving_head()  # headers
    protocol.dataReceived(b"Content-Length: 5\r\n")
    assert protocol.receiving_head() and not results
    protocol.dataReceived(b"\r\n")
    assert not protocol.receiving_head()  # the body now
    assert results and results[0].code == 200


def test_failing_the_response_closes_the_connection_with_the_reason() -> None:
    protocol, transport, results = send()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    protocol.fail_response(Failure(BoomError()))
    assert transport.disconnecting
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(ResponseFailed)
    reasons: list[Failure] = failure.value.reasons  # type: ignore[union-attr]
    assert any(reason.check(BoomError) for reason in reasons)
    assert not protocol.receiving_head()


# -- reading a whole head in one pass: the same outcome as Twisted's line parser ---------

_BODY = b'{"id": "msg_1", "content": []}'
_ANSWERS: dict[str, bytes] = {
    "plain": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_1\r\n"
        b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: %d\r\n\r\n" % len(_BODY) + _BODY
    ),
    "no phrase": b"HTTP/1.1 204\r\nX-A: 1\r\n\r\n",
    "status line only": b"HTTP/1.1 204 No Content\r\n\r\n",
    "folded header": (
        b"HTTP/1.1 200 OK\r\nX-Long: one\r\n two\r\n\tthree\r\nContent-Length: 2\r\n\r\nok"
    ),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ),
    "1xx first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ),
    "bare LF endings": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "mixed endings": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok",
    "until close": b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nall of it",
    "close header": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    "value spaces": b"HTTP/1.1 200 OK\r\nX-A:   padded   \r\nContent-Length: 0\r\n\r\n",
    "empty value": b"HTTP/1.1 200 OK\r\nX-A:\r\nContent-Length: 0\r\n\r\n",
    "bad status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "bad version": b"HTTP/x 200 OK\r\nContent-Length: 0\r\n\r\n",
    "no colon": b"HTTP/1.1 200 OK\r\nX-A 1\r\nContent-Length: 0\r\n\r\n",
    "continuation first": b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "bad length": b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    "long line": b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 17000 + b"\r\nContent-Length: 0\r\n\r\n",
    "leading blank line": b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "two answers": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"
    ),
}


class _Collect(Protocol):
    def __init__(self, out: list[Any]) -> None:
        self.out = out

    def dataReceived(self, data: bytes) -> None:
        self.out.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.out.append(type(reason.value).__name__)


def _outcome(protocol_class: type[HTTP11ClientProtocol], method: bytes, pieces: list[bytes]) -> Any:
    """What a client protocol made of an answer arriving in ``pieces``: the response's
    status, headers and body, or the failure; and the connection's state."""
    protocol = protocol_class()
    transport = StringTransport()
    protocol.makeConnection(transport)
    results: list[Any] = []
    request = Request(method, b"/", Headers({b"host": [b"up.test"]}), None, persistent=True)
    protocol.request(request).addBoth(results.append)
    for piece in pieces:
        protocol.dataReceived(piece)
    protocol.connectionLost(Failure(ConnectionDone()))
    (result,) = results
    if isinstance(result, Failure):
        reasons = getattr(result.value, "reasons", [])
        return ("failed", type(result.value).__name__, [type(r.value).__name__ for r in reasons])
    body: list[Any] = []
    result.deliverBody(_Collect(body))
    data = b"".join(piece for piece in body if isinstance(piece, bytes))
    ending = [piece for piece in body if isinstance(piece, str)]
    headers = sorted((k, tuple(v)) for k, v in result.headers.getAllRawHeaders())
    return (
        result.version, result.code, result.phrase, headers, data, ending,
        transport.disconnecting,
    )


@pytest.mark.parametrize("name", sorted(_ANSWERS))
@pytest.mark.parametrize("method", [b"POST", b"HEAD"])
def test_a_whole_head_is_read_as_twisted_reads_it_line_by_line(name: str, method: bytes) -> None:
    answer = _ANSWERS[name]
    expected = _outcome(HTTP11ClientProtocol, method, [answer])
    assert _outcome(ClientProtocol, method, [answer]) == expected
    # and split at every point (a head split across reads goes through the line parser
    # from the read that ends it partway)
    step = max(1, len(answer) // 97)
    for cut in range(1, len(answer), step):
        pieces = [answer[:cut], answer[cut:]]
        expected = _outcome(HTTP11ClientProtocol, method, pieces)
        assert _outcome(ClientProtocol, method, pieces) == expected, (name, cut)


def test_a_whole_head_in_one_read_takes_the_one_pass() -> None:
    """The differential test above would pass if the one pass never ran: it does."""
    protocol, _, results = send()
    parser = protocol._parser
    assert parser is not None
    # (line, whether it came from inside the line receiver's own loop)
    seen: list[tuple[bytes, bool]] = []
    line_received = parser.lineReceived

    def spy(line: bytes) -> None:
        seen.append((line, parser._busyReceiving))
        line_received(line)

    parser.lineReceived = spy  # type: ignore[method-assign]
    answer = _ANSWERS["plain"]
    protocol.dataReceived(answer)
    assert results and results[0].code == 200
    head_lines = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
    # every head line from the one pass; only the blank line ending it from the receiver
    assert seen == [(line, False) for line in head_lines] + [(b"\r", True)]


def test_a_finished_chunked_answer_leaves_no_reference_cycle() -> None:
    """Twisted's parser and its chunked body decoder refer to each other; after the
    answer the adapter unties them, so the parser is freed without the cyclic collector
    (every stream is a chunked answer)."""
    gc.collect()
    gc.disable()
    try:
        protocol, _, results = send()
        parser = weakref.ref(protocol._parser)
        protocol.dataReceived(_ANSWERS["chunked"])
        (response,) = results
        body: list[Any] = []
        response.deliverBody(_Collect(body))
        assert b"".join(body[:-1]) == b"hello world" and body[-1] == "ResponseDone"
        del response, results
        assert protocol._parser is None and parser() is None
    finally:
        gc.enable()
