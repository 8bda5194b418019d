"""The leanest Twisted pass-through proxy we could write: the reference for relayd's CPU.

``relay_bench.py`` runs it next to relayd and drives both with the same batches, so
relayd's CPU per request and per stream can be read against what a minimal Twisted relay
costs on the same machine in the same run. It is twisted.web and Agent only (no treq):
a leaf ``Resource`` copies the request headers minus hop-by-hop and credentials, sets the
upstream key, sends the body with ``Agent`` on a persistent ``HTTPConnectionPool``, and
streams the answer back chunk by chunk as it arrives (so SSE streams pass through live),
with the upstream's ``Content-Length`` when it has one. No authentication, routing, body
inspection, metrics or access log.

``python bench/bare_proxy.py --upstream http://127.0.0.1:PORT --api-key KEY``
listens on 127.0.0.1 (``--port``, default 0 = ephemeral) and prints
``bare-proxy listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"trailer",
        b"proxy-connection",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length", b"x-api-key", b"authorization"}


@implementer(IBodyProducer)
class _Body:
    """The request body, held in memory, written in one go."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Any:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Relay(Protocol):
    """Writes each chunk of the upstream answer to the client as it arrives."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception("done"))) -> None:  # noqa: B008
        if not self.request.finished and not self.request._disconnected:
            self.request.finish()


class PassThrough(Resource):
    """Forwards every request to the upstream with Agent and streams back the answer."""

    isLeaf = True

    def __init__(self, upstream: bytes, api_key: bytes, agent: Agent) -> None:
        super().__init__()
        self.upstream = upstream
        self.api_key = api_key
        self.agent = agent

    def render(self, request: Request) -> Any:
        assert request.content is not None
        body = request.content.read()
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _NOT_FORWARDED:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"x-api-key", [self.api_key])
        d = self.agent.request(
            request.method, self.upstream + request.uri, headers, _Body(body) if body else None
        )

        def relay(response: IResponse) -> None:
            request.setResponseCode(response.code)
            out = request.responseHeaders
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _HOP_BY_HOP:
                    out.setRawHeaders(name, values)
            if response.length is not UNKNOWN_LENGTH:
                out.setRawHeaders(b"content-length", [b"%d" % response.length])
            response.deliverBody(_Relay(request))

        def fail(failure: Failure) -> None:
            if not request.finished and not request.startedWriting:
                request.setResponseCode(502)
                request.finish()

        d.addCallback(relay).addErrback(fail)
        return NOT_DONE_YET


class QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--api-key", required=True, help="credential sent upstream")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: ephemeral)")
    args = parser.parse_args(argv)
    reactor: Any = global_reactor
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    pool.retryAutomatically = False
    agent = Agent(reactor, pool=pool)
    site = QuietSite(
        PassThrough(args.upstream.rstrip("/").encode(), args.api_key.encode(), agent),
        parsePOSTFormSubmission=False,
    )
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    sys.stdout.write(f"bare-proxy listening on http://127.0.0.1:{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
