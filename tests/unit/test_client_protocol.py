"""The adapter over twisted.web's private HTTP/1.1 client protocol
(:mod:`relayd.client_protocol`) against the installed Twisted: when an answer's head is
still arriving, and failing the request in progress. Over a StringTransport."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
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
