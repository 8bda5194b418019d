"""A whole request head in one pass (:mod:`relayd.whole_head`): the same outcome
as twisted.web's own channel taking it line by line, on the same bytes, whole and split
at every point. Over a StringTransport, with a resource that echoes what it got."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relayd.whole_head import feed_whole_head


class _Echo(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        headers = sorted(
            (name, tuple(values)) for name, values in request.requestHeaders.getAllRawHeaders()
        )
        body = request.content.read() if request.content is not None else b""
        return repr((request.method, request.uri, headers, body)).encode()


class _OnePass(HTTPChannel):
    """HTTPChannel.dataReceived as relayd's channel does it."""

    one_pass_lines = 0  # lines given by the one pass, not from inside the line receiver

    def lineReceived(self, line: bytes) -> None:
        if not self._busyReceiving:
            type(self).one_pass_lines += 1
        super().lineReceived(line)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        rest = feed_whole_head(self, data)
        if rest is not None:
            LineReceiver.dataReceived(self, rest)


def _outcome(channel_class: type[HTTPChannel], pieces: list[bytes]) -> Any:
    site = Site(_Echo())
    site.parsePOSTFormSubmission = False  # type: ignore[attr-defined]
    channel: Any = channel_class()
    channel.site = site
    channel.requestFactory = site.requestFactory
    channel.timeOut = None
    transport = StringTransport()
    channel.makeConnection(transport)
    raised = None
    try:
        for piece in pieces:
            channel.dataReceived(piece)
    except Exception as e:  # Twisted's own channel raises on some inputs: the same here
        raised = type(e).__name__
    written = re.sub(rb"Date: [^\r]*\r\n", b"", transport.value())
    return written, transport.disconnecting, raised


_BODY = b'{"model": "claude-x", "messages": []}'
_REQUESTS: dict[str, bytes] = {
    "post": (
        b"POST /v1/messages HTTP/1.1\r\nHost: relay\r\nx-api-key: k\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_BODY) + _BODY
    ),
    "get": b"GET /v1/models HTTP/1.1\r\nHost: relay\r\n\r\n",
    "no headers": b"GET / HTTP/1.1\r\n\r\n",
    "repeated header": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
    "folded header": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\tthree\r\n\r\n",
    "continuation first": b"GET / HTTP/1.1\r\n folded\r\nHost: a\r\n\r\n",
    "chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ),
    "pipelined": (
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"
    ),
    "leading blank line": b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: a\n\n",
    "bad request line": b"GARBAGE\r\nHost: a\r\n\r\n",
    "bad header": b"GET / HTTP/1.1\r\nHost a\r\nX-B: 2\r\n\r\n",
    "two lengths": b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    "bad length": b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\nab",
    "length and chunked": (
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "long line": b"GET / HTTP/1.1\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n",
    "headers too large": (
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        + b"\r\n"
    ),
    "close": b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /after HTTP/1.1\r\n\r\n",
    "http/1.0": b"GET / HTTP/1.0\r\nHost: a\r\n\r\nGET /after HTTP/1.0\r\n\r\n",
    "h2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "absolute target": b"GET http://other/x HTTP/1.1\r\nHost: a\r\n\r\n",
    "nul in header": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "expect continue": (
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    ),
}


@pytest.mark.parametrize("name", sorted(_REQUESTS))
def test_a_whole_head_is_taken_as_twisted_takes_it_line_by_line(name: str) -> None:
    data = _REQUESTS[name]
    assert _outcome(_OnePass, [data]) == _outcome(HTTPChannel, [data])
    step = max(1, len(data) // 97)
    for cut in range(1, len(data), step):
        pieces = [data[:cut], data[cut:]]
        assert _outcome(_OnePass, pieces) == _outcome(HTTPChannel, pieces), (name, cut)


def test_the_one_pass_runs_and_the_large_body_is_not_split_per_line() -> None:
    """The comparison above would pass if the one pass never ran: it does."""
    body = b"x" * 60000
    data = b"POST / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    _OnePass.one_pass_lines = 0
    written, _, _ = _outcome(_OnePass, [data])
    assert written.startswith(b"HTTP/1.1 200 OK") and body in written
    assert _OnePass.one_pass_lines == 4  # the head lines; the blank line and body: Twisted
    channel = _OnePass()
    channel.line_mode = 1
    assert feed_whole_head(channel, data[:40]) == data[:40]  # no whole head: untouched
