"""relayd's HTTP/1.1 client protocol (:mod:`relayd.client_protocol`): what it makes of
an answer compared with twisted.web's own ``HTTP11ClientProtocol`` on the same bytes,
split at every point; when the head is still arriving; failing, cancelling and aborting
a request; the body's transport and flow control. Over a StringTransport."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, RequestGenerationFailed
from twisted.web.http_headers import Headers

from relayd.client_protocol import (
    ClientProtocol,
    PreparedRequest,
    Request,
    RequestNotSent,
    ResponseFailed,
)


class BoomError(Exception):
    pass


def send() -> tuple[ClientProtocol, StringTransport, list[Any]]:
    protocol = ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    results: list[Any] = []
    request = Request(b"GET", b"/", Headers({b"host": [b"up.test"]}), None, persistent=True)
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


# -- the same outcome as twisted.web's HTTP11ClientProtocol on the same bytes -------------

_BODY = b'{"id": "msg_1", "content": []}'
_ANSWERS: dict[str, bytes] = {
    "plain": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_1\r\n"
        b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: %d\r\n\r\n" % len(_BODY) + _BODY
    ),
    "no phrase": b"HTTP/1.1 204\r\nX-A: 1\r\n\r\n",
    "status line only": b"HTTP/1.1 204 No Content\r\n\r\n",
    "not modified": b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    "folded header": (
        b"HTTP/1.1 200 OK\r\nX-Long: one\r\n two\r\n\tthree\r\nContent-Length: 2\r\n\r\nok"
    ),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ),
    "chunked with extensions and trailer": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
    ),
    "chunked cut short": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n wo"
    ),
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "chunk without CRLF": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"
    ),
    "sse stream": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (len(e), e)
            for e in [b"event: a\ndata: {}\n\n", b"event: b\ndata: {\"x\": 1}\n\n"]
        ) + b"0\r\n\r\n"
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
    "repeated length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 02\r\n\r\nok",
    "conflicting length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "length cut short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly",
    "bad status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "bad version": b"HTTP/x 200 OK\r\nContent-Length: 0\r\n\r\n",
    "no colon": b"HTTP/1.1 200 OK\r\nX-A 1\r\nContent-Length: 0\r\n\r\n",
    "continuation first": b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "bad length": b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    "long line": b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 17000 + b"\r\nContent-Length: 0\r\n\r\n",
    "leading blank line": b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "nothing": b"",
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


def _outcome(protocol_class: Any, method: bytes, pieces: list[bytes]) -> Any:
    """What a client protocol made of an answer arriving in ``pieces`` and then the
    connection's end: the response's status, headers (names in lower case) and body
    with how it ended, or the failure's class; whether the connection was handed back
    and whether it is being closed."""
    idle: list[Any] = []
    protocol = protocol_class(idle.append)
    transport = StringTransport()
    protocol.makeConnection(transport)
    results: list[Any] = []
    request = Request(method, b"/", Headers({b"host": [b"up.test"]}), None, persistent=True)
    protocol.request(request).addBoth(results.append)
    for piece in pieces:
        protocol.dataReceived(piece)
    handed_back = bool(idle)
    closing = transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    (result,) = results
    if isinstance(result, Failure):
        return ("failed", type(result.value).__name__, closing)
    body: list[Any] = []
    result.deliverBody(_Collect(body))
    data = b"".join(piece for piece in body if isinstance(piece, bytes))
    ending = [piece for piece in body if isinstance(piece, str)]
    headers = sorted((k.lower(), tuple(v)) for k, v in result.headers.getAllRawHeaders())
    return (
        result.version, result.code, result.phrase, result.length, headers, data, ending,
        handed_back, closing,
    )


@pytest.mark.parametrize("name", sorted(_ANSWERS))
@pytest.mark.parametrize("method", [b"POST", b"HEAD"])
def test_an_answer_is_read_as_twisted_reads_it(name: str, method: bytes) -> None:
    answer = _ANSWERS[name]
    assert _relayd(method, [answer]) == _twisted(method, [answer])
    # split at every point, and byte by byte
    step = max(1, len(answer) // 97)
    for cut in range(1, len(answer), step):
        pieces = [answer[:cut], answer[cut:]]
        assert _relayd(method, pieces) == _twisted(method, pieces), (name, cut)
    if len(answer) < 2000:
        pieces = [answer[i:i + 1] for i in range(len(answer))]
        assert _relayd(method, pieces) == _twisted(method, pieces)


class _Noting(ClientProtocol):
    """relayd's protocol, noting whether bytes followed an answer in the read ending it."""

    followed: list[bool] = []

    def _end_answer(self, rest: bytes) -> None:
        _Noting.followed.append(bool(rest))
        super()._end_answer(rest)


def _relayd(method: bytes, pieces: list[bytes]) -> Any:
    _Noting.followed = []
    return _outcome(_Noting, method, pieces)


def _twisted(method: bytes, pieces: list[bytes]) -> Any:
    """What twisted.web's protocol makes of it, with relayd's one deliberate difference:
    bytes after a whole answer in the read that ends it close the connection, where
    twisted.web drops them and hands the connection back for the next request."""
    outcome = _outcome(HTTP11ClientProtocol, method, pieces)
    if any(_Noting.followed) and outcome[0] != "failed":
        return (*outcome[:7], False, True)
    return outcome


def test_the_differential_cases_reach_every_outcome() -> None:
    """The comparison above would pass if both sides failed everything: they don't."""
    outcomes = {name: _outcome(ClientProtocol, b"POST", [answer] if answer else [])
                for name, answer in _ANSWERS.items()}
    assert outcomes["plain"][5] == _BODY and outcomes["plain"][6] == ["ResponseDone"]
    assert outcomes["plain"][7] is True  # handed back to the pool
    assert outcomes["chunked"][5] == b"hello world"
    assert outcomes["until close"][6] == ["PotentialDataLoss"]
    assert outcomes["chunked cut short"][6] == ["ResponseFailed"]
    assert outcomes["close header"][7:] == (False, True)
    assert outcomes["two answers"][5:] == (b"ok", ["ResponseDone"], False, True)
    assert outcomes["bad status"][:2] == ("failed", "ResponseFailed")
    assert outcomes["nothing"][:2] == ("failed", "ResponseNeverReceived")


def test_a_body_read_later_holds_the_connection_until_then() -> None:
    protocol, transport, results = send()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    (response,) = results
    assert transport.producerState == "paused"  # nobody reads the body yet
    body: list[Any] = []
    response.deliverBody(_Collect(body))
    assert body == [b"hello"] and transport.producerState == "producing"
    protocol.dataReceived(b"world")
    assert body == [b"hello", b"world", "ResponseDone"]
    assert protocol.state == "QUIESCENT"


def test_a_body_transport_does_nothing_once_its_answer_is_over() -> None:
    """A body protocol that stops its transport late must not close the connection the
    pool has handed to the next request."""
    protocol, transport, results = send()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    (response,) = results
    collect = _Collect([])
    response.deliverBody(collect)
    protocol.dataReceived(b"ok")
    assert protocol.state == "QUIESCENT"
    body_transport: Any = collect.transport
    body_transport.stopProducing()
    body_transport.pauseProducing()
    assert not transport.disconnecting and transport.producerState == "producing"


def test_stopping_a_body_mid_way_closes_the_connection() -> None:
    protocol, transport, results = send()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
    body: list[Any] = []
    collect = _Collect(body)
    results[0].deliverBody(collect)
    assert body == [b"ok"]
    body_transport: Any = collect.transport
    body_transport.stopProducing()
    assert transport.producerState == "stopped"
    protocol.connectionLost(Failure(ConnectionDone()))
    assert body[-1] == "ResponseFailed" and protocol.state == "CONNECTION_LOST"


def test_cancelling_before_the_head_aborts_with_a_cancellation() -> None:
    protocol, transport, results = send()
    results_d = protocol.request(Request(b"GET", b"/", Headers(), None))
    refused: list[Any] = []
    results_d.addErrback(refused.append)
    assert refused and refused[0].check(RequestNotSent)  # one request at a time
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")  # a partial head
    protocol._answered.cancel()  # type: ignore[union-attr]
    (failure,) = results
    assert failure.check(ResponseFailed)
    assert any(r.check(CancelledError) for r in failure.value.reasons)
    assert transport.disconnecting


def test_a_prepared_request_is_written_whole_and_waits_for_its_answer() -> None:
    protocol = ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    data = b"POST /v1/messages HTTP/1.1\r\nHost: up.test\r\nContent-Length: 2\r\n\r\n{}"
    results: list[Any] = []
    protocol.request(PreparedRequest(b"POST", b"/v1/messages", data)).addBoth(results.append)
    assert transport.value() == data and protocol.state == "WAITING"
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert results[0].code == 200 and protocol.state == "QUIESCENT"


class _FailingTransport(StringTransport):
    def write(self, data: bytes) -> None:
        raise BoomError()


def test_a_prepared_request_that_cannot_be_written_fails_and_drops_the_connection() -> None:
    protocol = ClientProtocol()
    transport = _FailingTransport()
    protocol.makeConnection(transport)
    results: list[Any] = []
    protocol.request(PreparedRequest(b"GET", b"/", b"GET / HTTP/1.1\r\n\r\n")).addBoth(
        results.append
    )
    (failure,) = results
    assert failure.check(RequestGenerationFailed)
    assert failure.value.reasons[0].check(BoomError)
    assert protocol.state == "GENERATION_FAILED"


def test_abort_fires_once_the_connection_is_closed() -> None:
    protocol = ClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    done: list[Any] = []
    protocol.abort().addCallback(done.append)
    assert transport.disconnecting and not done
    protocol.connectionLost(Failure(ConnectionDone()))
    assert done == [None] and protocol.state == "CONNECTION_LOST"
    assert protocol.abort().called


def test_a_finished_chunked_answer_leaves_no_reference_cycle() -> None:
    """Every stream is a chunked answer: once it is over, its response, headers and body
    protocol are freed without the cyclic collector."""
    gc.collect()
    gc.disable()
    try:
        protocol, _, results = send()
        protocol.dataReceived(_ANSWERS["chunked"])
        (response,) = results
        body: list[Any] = []
        collect = _Collect(body)
        response.deliverBody(collect)
        assert b"".join(body[:-1]) == b"hello world" and body[-1] == "ResponseDone"
        freed = weakref.ref(response), weakref.ref(collect)
        del response, results, collect
        assert all(ref() is None for ref in freed)
    finally:
        gc.enable()
